"""Run configuration: three sections (``data``, ``model``, ``train``) as dataclasses.

YAML files and ``--set section.key=value`` overrides are checked against these fields; an unknown
key is an error that lists the valid ones. ``docs/config.md`` documents every field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    name: str = "digits"            # a dataset from fewstep.data.available()
    root: str = "../shared/data"    # local folder (or folder holding the dataset's .tar.gz)
    T: int = 4                      # timesteps (event datasets: number of frames)
    encoding: str = "direct"        # static data only: direct | poisson
    val_fraction: float = 0.15      # share of the training data held out for validation
    augment: bool = True            # dataset-specific training augmentation (CIFAR: crop + flip)
    cutout: int = 0                 # CIFAR cutout size in pixels (0 = off)
    binarize: bool = False          # event frames: 1 where any event, instead of counts
    by: str = "time"                # event framing: equal-time bins (time) or equal event counts (count)
    size: Any = None                # event frames: [H, W] to rescale to (e.g. [48, 48]); null = dataset default
    polarities: int = 2             # event frames: 2 (ON/OFF channels) or 1 (merged)
    window_us: Any = None           # event frames: keep only the first window_us microseconds
    max_shift: int = 0              # event augmentation: random translation shared by all frames (pixels)
    flip: bool = True               # event augmentation: horizontal flip where label-preserving
    event_drop: float = 0.0         # event augmentation: drop each event with this probability


@dataclass
class ModelConfig:
    name: str = "cnn"               # a model from fewstep.models.available()
    neuron: str = "lif"             # lif | if
    tau: float = 0.5                # multiplicative leak
    theta: float = 1.0              # threshold
    v0: float = 0.0                 # initial membrane
    reset: str = "hard"             # hard | soft
    detach_reset: bool = False
    surrogate: Any = "zif"          # name, or {name: zif, gamma: 1.0}
    learn_theta: bool = False
    options: dict = field(default_factory=dict)  # model-specific (channels, hidden, widths, ...)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "adamw"        # sgd | adamw
    lr: float = 2e-3
    momentum: float = 0.9           # sgd only
    weight_decay: float = 0.0
    schedule: str = "cosine"        # cosine | constant
    loss: str = "tet"               # ce (mean over time) | tet
    tet_lambda: float = 1e-3
    tet_phi: float = 1.0
    grad_clip: float = 0.0          # max grad norm, 0 = off
    amp: bool = True                # bfloat16 autocast on CUDA (ignored on CPU)
    device: str = "auto"            # auto | cpu | cuda | cuda:1 ...
    seed: int = 0
    num_workers: int = 0
    eval_batch_size: int = 256
    progress: bool = True           # tqdm bars (auto-off when not a terminal)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def dump(self, path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _section(cls, values: dict, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"config section '{where}' must be a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(values) - names)
    if bad:
        raise ValueError(f"unknown config key(s) {[f'{where}.{b}' for b in bad]}; valid keys in '{where}': {sorted(names)}")
    obj = cls(**values)
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ValueError(f"config key '{where}.{f.name}' must be true/false, got {v!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"config key '{where}.{f.name}' must be a number, got {v!r}")
            if isinstance(default, float):
                setattr(obj, f.name, float(v))
    return obj


def from_dict(d: dict | None) -> Config:
    d = dict(d or {})
    bad = sorted(set(d) - {"data", "model", "train"})
    if bad:
        raise ValueError(f"unknown config section(s) {bad}; valid sections: data, model, train")
    return Config(_section(DataConfig, d.get("data"), "data"), _section(ModelConfig, d.get("model"), "model"),
                  _section(TrainConfig, d.get("train"), "train"))


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` (value parsed as YAML; ``model.options.hidden=64`` reaches inside dicts)."""
    d = {k: dict(v or {}) for k, v in d.items()}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2:
            raise ValueError(f"--set key must be section.key (e.g. train.lr=0.01), got {key!r}")
        node = d.setdefault(parts[0], {})
        for p in parts[1:-1]:
            node[p] = dict(node.get(p) or {})
            node = node[p]
        node[parts[-1]] = yaml.safe_load(raw)
    return d


def load(path=None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    d: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        d = yaml.safe_load(p.read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{p}: a config must be a mapping with sections data, model, train")
    return from_dict(apply_overrides(d, overrides or []))
