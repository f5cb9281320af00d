"""Run configuration: five sections (``data``, ``model``, ``train``, ``regularizer``, ``trt``) as dataclasses.

YAML files and ``--set section.key=value`` overrides are checked against these fields; an unknown
key is an error that lists the valid ones. ``docs/config.md`` documents every field.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .recipes import SHIPPED, describe, resolve, shipped  # noqa: F401  (the shipped configs, by name)


@dataclass
class DataConfig:
    name: str = "digits"            # a dataset from fewstep.data.available()
    root: str = "../shared/data"    # local folder (or folder holding the dataset's .tar.gz)
    T: int = 4                      # timesteps (event datasets: number of frames)
    encoding: str = "direct"        # static data only: direct | poisson
    val_fraction: float = 0.15      # share of the training data held out for validation
    augment: bool = True            # dataset-specific training augmentation (CIFAR: crop + flip)
    cutout: int = 0                 # cutout size in pixels (0 = off): cifar10, cifar100, fashion_mnist, tiny_imagenet
    coarse: bool = False            # cifar100: the 20 superclasses instead of the 100 fine labels
    skip_corrupt: bool = False      # image folders: skip (and count in the log) images that do not decode
    loader: str = "auto"            # in-memory images: sample (DataLoader) | batch (whole batches on the device) | auto
    binarize: bool = False          # event frames: 1 where any event, instead of counts
    by: str = "time"                # event framing: equal-time bins (time) or equal event counts (count)
    size: Any = None                # event frames: [H, W] to rescale to (e.g. [48, 48]); imagefolder: crop size
    polarities: int = 2             # event frames: 2 (ON/OFF channels) or 1 (merged)
    window_us: Any = None           # event frames: keep only the first window_us microseconds
    max_shift: int = 0              # event augmentation: random translation shared by all frames (pixels)
    flip: bool = True               # event augmentation: horizontal flip where label-preserving
    event_drop: float = 0.0         # event augmentation: drop each event with this probability
    sensor_size: Any = None         # eventfolder (required), ncaltech101: the sensor's [width, height] in pixels


@dataclass
class ModelConfig:
    name: str = "cnn"               # a model from fewstep.models.available()
    neuron: str = "lif"             # lif | if | qcfs (an ANN to convert, T = 1) | qcfs_if (its converted IF neuron)
    tau: float = 0.5                # multiplicative leak
    theta: float = 1.0              # threshold
    v0: float = 0.0                 # initial membrane
    reset: str = "hard"             # hard | soft
    detach_reset: bool = False
    surrogate: Any = "zif"          # name, or {name: zif, gamma: 1.0}
    learn_theta: bool = False
    norm: str = "bn"                # bn | tebn (BatchNorm over T·N with a learnable per-step scale, METHODS §7)
    levels: int = 8                 # QCFS quantisation levels L (neuron qcfs / qcfs_if only; METHODS §6)
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
    warmup_epochs: int = 0          # linear warm-up of the learning rate over the first epochs (then the schedule)
    loss: str = "tet"               # ce (mean over time) | tet
    tet_lambda: float = 1e-3
    tet_phi: float = 1.0
    grad_clip: float = 0.0          # max grad norm, 0 = off
    mixup: float = 0.0              # mixup's α (Beta(α, α) mixing weight; 0 = off); the general SNN recipe uses 0.1
    amp: bool = True                # bfloat16 autocast on CUDA (ignored on CPU)
    device: str = "auto"            # auto | cpu | cuda | cuda:1 ...
    seed: int = 0
    num_workers: int = 0
    eval_batch_size: int = 256
    progress: bool = True           # tqdm bars (auto-off when not a terminal)
    tune_malloc: bool = True        # CPU training: let glibc reuse large buffers (fewstep.runtime.tune_cpu_allocator)
    sync_bn: bool = False           # torchrun on CUDA: BatchNorm statistics over all processes (fewstep.distributed)


@dataclass
class RegularizerConfig:
    name: str = "none"              # none | rcs | str | rcs+str | rcs_ann
    rcs_weight: float = 0.003       # α (seed scripts: 0.001–0.005)
    rcs_beta: float = 0.3           # tail fraction of T for the target and the correct mask
    rcs_reduction: str = "max"      # max (paper) | mean, over the batch
    rcs_correct_only: bool = True   # regularise only samples right at every tail step
    str_weight: float = 0.1         # λ_STR (paper: 0.05–0.1 frame data, 0.5 event data)
    str_form: str = "share"         # share (METHODS §3) | tail | log
    rcs_ann_weight: float = 0.003   # α of RCS-ANN (an ANN trained for conversion, METHODS §1)
    rcs_ann_reduction: str = "max"  # max | mean, over the batch
    rcs_ann_correct_only: bool = True
    rcs_ann_max_scope: str = "sample"  # sample (METHODS) | batch (the seed code's batch-global max)


@dataclass
class TRTConfig:
    enabled: bool = False           # temporal reversed training (fewstep/trt.py; a documented reading)
    reverse: str = "auto"           # auto (event data: input, images: layer) | input | layer
    reverse_at: Any = None          # spiking layer whose spikes are flipped (reverse: layer); null = the first
    consistency: str = "kl"         # kl | sym_kl | mse, between time-averaged logits
    lam: float = 1.0                # λ, weight of the consistency term
    tau: float = 2.0                # temperature of kl / sym_kl
    reversed_weight: float = 1.0    # weight of the reversed branch's loss
    star_weight: float = 1.0        # weight of the star head's cross-entropy
    share_head: bool = True         # the reversed branch uses the model's head (else a training-only copy)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    trt: TRTConfig = field(default_factory=TRTConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def dump(self, path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _number(v, key: str, integer: bool):
    """A config number from YAML: also the strings PyYAML leaves unparsed (``1e-3``, ``1E5``, ``+1e3``)."""
    if isinstance(v, str):
        try:
            v = float(v.strip().replace("_", ""))
        except ValueError:
            raise ValueError(f"config key '{key}' must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"config key '{key}' must be a number, got {v!r}")
    if math.isnan(v):
        raise ValueError(f"config key '{key}' must be a number, got NaN")
    if integer:
        if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
            raise ValueError(f"config key '{key}' must be a whole number, got {v!r}")
        return int(v)
    return float(v)


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
        key = f"{where}.{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ValueError(f"config key '{key}' must be true/false, got {v!r}")
        elif isinstance(default, (int, float)):
            setattr(obj, f.name, _number(v, key, isinstance(default, int)))
        elif isinstance(default, str) and not isinstance(v, str) and not (f.type in ("Any", Any) and isinstance(v, dict)):
            raise ValueError(f"config key '{key}' must be a string, got {v!r}")
    return obj


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "regularizer": RegularizerConfig,
            "trt": TRTConfig}
CHOICES = {  # keys with a fixed set of values, checked before anything is loaded
    ("data", "encoding"): ("direct", "poisson"),
    ("data", "by"): ("time", "count"),
    ("data", "loader"): ("auto", "sample", "batch"),
    ("model", "neuron"): ("lif", "if", "qcfs", "qcfs_if"),
    ("model", "reset"): ("hard", "soft"),
    ("model", "norm"): ("bn", "tebn"),
    ("train", "optimizer"): ("sgd", "adamw"),
    ("train", "schedule"): ("cosine", "constant"),
    ("train", "loss"): ("ce", "tet"),
    ("regularizer", "rcs_reduction"): ("max", "mean"),
    ("regularizer", "str_form"): ("share", "tail", "log"),
    ("regularizer", "rcs_ann_reduction"): ("max", "mean"),
    ("regularizer", "rcs_ann_max_scope"): ("sample", "batch"),
    ("trt", "reverse"): ("auto", "input", "layer"),
    ("trt", "consistency"): ("kl", "sym_kl", "mse"),
}
INF = math.inf
# (low, high, low inclusive, high inclusive) for every numeric key, checked before anything is loaded
RANGES = {
    ("data", "T"): (1, INF, True, True),
    ("data", "val_fraction"): (0.0, 1.0, False, False),
    ("data", "cutout"): (0, 32, True, True),
    ("data", "polarities"): (1, 2, True, True),
    ("data", "max_shift"): (0, INF, True, True),
    ("data", "event_drop"): (0.0, 1.0, True, False),
    ("model", "tau"): (0.0, 1.0, False, True),
    ("model", "theta"): (0.0, INF, False, False),
    ("model", "v0"): (-INF, INF, False, False),
    ("model", "levels"): (1, 4096, True, True),
    ("train", "epochs"): (1, INF, True, True),
    ("train", "batch_size"): (1, INF, True, True),
    ("train", "lr"): (0.0, INF, False, False),
    ("train", "momentum"): (0.0, 1.0, True, False),
    ("train", "weight_decay"): (0.0, INF, True, False),
    ("train", "tet_lambda"): (0.0, 1.0, True, True),
    ("train", "tet_phi"): (-INF, INF, False, False),
    ("train", "grad_clip"): (0.0, INF, True, False),
    ("train", "warmup_epochs"): (0, INF, True, True),
    ("train", "mixup"): (0.0, INF, True, False),
    ("train", "seed"): (0, 2**63 - 1, True, True),
    ("train", "num_workers"): (0, 256, True, True),
    ("train", "eval_batch_size"): (1, INF, True, True),
    ("regularizer", "rcs_weight"): (0.0, INF, True, False),
    ("regularizer", "rcs_beta"): (0.0, 1.0, False, True),
    ("regularizer", "str_weight"): (0.0, INF, True, False),
    ("regularizer", "rcs_ann_weight"): (0.0, INF, True, False),
    ("trt", "lam"): (0.0, INF, True, False),
    ("trt", "tau"): (0.0, INF, False, False),
    ("trt", "reversed_weight"): (0.0, INF, True, False),
    ("trt", "star_weight"): (0.0, INF, True, False),
}


def describe_range(lo, hi, lo_in, hi_in) -> str:
    if lo == -INF and hi == INF:
        return "a finite number"
    if hi == INF:
        return f"{'>=' if lo_in else '>'} {lo:g}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def _in_range(v, lo, hi, lo_in, hi_in) -> bool:
    if not math.isfinite(v) and (lo, hi) == (-INF, INF):
        return False
    return (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)


def _check(cfg: Config) -> Config:
    from . import regularizers

    for (sec, key), valid in CHOICES.items():
        v = getattr(getattr(cfg, sec), key)
        if v not in valid:
            raise ValueError(f"config key '{sec}.{key}' must be one of {list(valid)}, got {v!r}")
    for (sec, key), rng in RANGES.items():
        v = getattr(getattr(cfg, sec), key)
        if not _in_range(v, *rng):
            raise ValueError(f"config key '{sec}.{key}' = {v!r} is out of range: it must be {describe_range(*rng)}")
    d = cfg.data
    if d.size is not None and not (isinstance(d.size, (list, tuple)) and len(d.size) == 2
                                   and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in d.size)):
        raise ValueError(f"config key 'data.size' must be null or [H, W] with two whole numbers >= 1, got {d.size!r}")
    if d.sensor_size is not None and not (isinstance(d.sensor_size, (list, tuple)) and len(d.sensor_size) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in d.sensor_size)):
        raise ValueError("config key 'data.sensor_size' must be null or [width, height] with two whole numbers >= 1, "
                         f"got {d.sensor_size!r}")
    if d.window_us is not None:
        w = _number(d.window_us, "data.window_us", False)
        if not w > 0:
            raise ValueError(f"config key 'data.window_us' = {d.window_us!r} is out of range: it must be null or > 0")
        d.window_us = w
    _check_data_family(cfg.data)
    if not isinstance(cfg.model.options, dict):
        raise ValueError(f"config key 'model.options' must be a mapping, got {cfg.model.options!r}")
    if cfg.model.norm == "tebn" and cfg.model.name == "mlp":
        raise ValueError("model.norm: tebn needs BatchNorm layers, which model 'mlp' has none of; use model.norm: bn")
    _check_names(cfg)
    _check_qcfs(cfg)
    if cfg.train.warmup_epochs >= cfg.train.epochs:
        raise ValueError(f"config key 'train.warmup_epochs' = {cfg.train.warmup_epochs} must be smaller than "
                         f"train.epochs = {cfg.train.epochs}")
    regularizers.parse(cfg.regularizer.name)
    if cfg.trt.enabled and cfg.data.T < 2:
        raise ValueError(f"trt.enabled needs data.T >= 2 (TRT reverses spike trains in time); data.T = {cfg.data.T}: "
                         "nothing to reverse")
    if cfg.trt.reverse_at is not None and not isinstance(cfg.trt.reverse_at, str):
        raise ValueError(f"config key 'trt.reverse_at' must be null or a spiking layer name, got {cfg.trt.reverse_at!r}")
    return cfg


def _check_qcfs(cfg: Config) -> None:
    m = cfg.model
    if m.neuron not in ("qcfs", "qcfs_if") and m.levels != ModelConfig.levels:
        raise ValueError(f"config key 'model.levels' is QCFS's quantisation and applies to model.neuron qcfs only "
                         f"(model.neuron is {m.neuron!r}); leave it at {ModelConfig.levels}")
    if m.neuron == "qcfs":
        if cfg.data.T != 1:
            raise ValueError(f"model.neuron: qcfs trains an ANN, which has one step: set data.T: 1 (got {cfg.data.T}); "
                             "convert it to an SNN of T steps afterwards with 'fewstep convert RUN --out DIR --T 64'")
        if m.norm != "bn":
            raise ValueError("model.neuron: qcfs needs model.norm: bn (TEBN's per-step scales do not survive "
                             "conversion to another T)")
        if cfg.trt.enabled:
            raise ValueError("trt.enabled needs spiking neurons; model.neuron: qcfs is an ANN for conversion")


EVENT_KEYS = ("binarize", "by", "size", "polarities", "window_us", "max_shift", "flip", "event_drop")
STATIC_KEYS = ("encoding", "cutout", "coarse", "skip_corrupt", "loader")
ONLY = {  # keys that mean something for some datasets only
    "cutout": ("cifar10", "cifar100", "fashion_mnist", "tiny_imagenet"),
    "coarse": ("cifar100",),
    "skip_corrupt": ("cifar10", "cifar100", "tiny_imagenet", "imagefolder"),
    "sensor_size": ("eventfolder", "ncaltech101"),
}
SIZED_IMAGES = ("imagefolder",)  # image datasets that take data.size
IN_MEMORY_IMAGES = ("cifar10", "cifar100", "fashion_mnist", "tiny_imagenet")  # data.loader: batch


def _check_data_family(d: DataConfig) -> None:
    """Keys that only mean something for event data (or only for images) must not be set for the other:
    they would be silently ignored."""
    from .data import datasets

    if d.name not in datasets.DATASETS:
        return  # reported by _check_names
    event = d.name in datasets.EVENT_DATASETS
    defaults = DataConfig()
    for key in (STATIC_KEYS if event else EVENT_KEYS):
        if key == "size" and d.name in SIZED_IMAGES:
            continue
        if getattr(d, key) != getattr(defaults, key):
            what = "image" if event else "event"
            raise ValueError(f"config key 'data.{key}' = {getattr(d, key)!r} applies to {what} datasets only; "
                             f"{d.name!r} is {'an event' if event else 'an image'} dataset")
    if d.loader == "batch" and d.name not in IN_MEMORY_IMAGES:
        raise ValueError(f"config key 'data.loader' = 'batch' applies to the in-memory image datasets "
                         f"{', '.join(IN_MEMORY_IMAGES)}, not {d.name!r}; use 'auto' or 'sample'")
    for key, names in ONLY.items():
        if getattr(d, key) != getattr(defaults, key) and d.name not in names:
            raise ValueError(f"config key 'data.{key}' applies to {', '.join(names)} only, not {d.name!r}")


def _positive_ints(v) -> bool:
    items = v if isinstance(v, (list, tuple)) else [v]
    return len(items) > 0 and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in items)


OPTION_CHECKS = {  # model options shared by several models: (test, what is valid)
    "dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "in [0, 1)"),
    "channels": (_positive_ints, "a list of whole numbers >= 1"),
    "hidden": (_positive_ints, "a whole number >= 1 (mlp: a list of them)"),
    "widths": (_positive_ints, "a list of whole numbers >= 1"),
    "blocks": (_positive_ints, "a list of whole numbers >= 1"),
    "cfg": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(x == "A" or _positive_ints(x) for x in v),
            "a list of channel counts >= 1 and 'A' (2x2 average pooling)"),
    "stem": (lambda v: v in ("cifar", "imagenet"), "'cifar' (conv3x3) or 'imagenet' (conv7x7/2 + max-pool 3x3/2)"),
}


def _check_model_options(m: ModelConfig) -> None:
    """``model.options`` against the chosen model's builder: names, and the values of the common options."""
    import inspect

    from .models import registry

    params = inspect.signature(registry.MODELS[m.name]).parameters
    valid = [k for k, p in params.items() if p.kind != p.VAR_KEYWORD and k not in ("input_shape", "num_classes")]
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        valid += ["learn_tau", "backend"]  # neuron options that are not keys of the model section
    bad = sorted(set(m.options) - set(valid))
    if bad:
        raise ValueError(f"config key(s) {[f'model.options.{b}' for b in bad]} unknown for model {m.name!r}; valid "
                         f"options: {valid} (neuron options such as tau are keys of the model section)")
    for k, v in m.options.items():
        if k in OPTION_CHECKS and not OPTION_CHECKS[k][0](v):
            raise ValueError(f"config key 'model.options.{k}' = {v!r} is out of range: it must be {OPTION_CHECKS[k][1]}")


def _check_names(cfg: Config) -> None:
    """Names that live in registries: dataset, model, surrogate and device, before any data is loaded."""
    from . import surrogate
    from .data import datasets
    from .models import registry

    if cfg.data.name not in datasets.DATASETS:
        raise ValueError(f"config key 'data.name': unknown dataset {cfg.data.name!r}; valid names: "
                         f"{', '.join(datasets.available())}")
    if cfg.model.name not in registry.MODELS:
        raise ValueError(f"config key 'model.name': unknown model {cfg.model.name!r}; valid names: "
                         f"{', '.join(registry.available())}")
    try:
        surrogate.get(cfg.model.surrogate)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"config key 'model.surrogate': {exc}") from None
    _check_model_options(cfg.model)
    if cfg.model.name == "nir":  # the graph decides these; set, they would be silently ignored
        from .models.imported import GRAPH_DECIDES

        given = [f"model.{k}" for k in GRAPH_DECIDES if getattr(cfg.model, k) != getattr(ModelConfig, k)]
        if given:
            raise ValueError(f"config key(s) {given} do not apply to model 'nir': its NIR graph decides the layers and "
                             "neurons (leave them out)")
    dev = cfg.train.device
    if dev != "auto":
        import torch

        try:
            torch.device(dev)
        except (RuntimeError, TypeError):
            raise ValueError(f"config key 'train.device' = {dev!r}: use auto, cpu, cuda or cuda:N") from None


def from_dict(d: dict | None) -> Config:
    """A checked :class:`Config` from nested dicts (``{"data": {...}, "model": {...}, ...}``); keys left out take
    their defaults, unknown sections or keys and values out of range raise ``ValueError`` naming them."""
    d = dict(d or {})
    bad = sorted(set(d) - set(SECTIONS))
    if bad:
        raise ValueError(f"unknown config section(s) {bad}; valid sections: {', '.join(SECTIONS)}")
    return _check(Config(**{name: _section(cls, d.get(name), name) for name, cls in SECTIONS.items()}))


def with_absolute_root(cfg: Config) -> Config:
    """``cfg`` with ``data.root`` made absolute against the working directory (``~`` expanded), so that a run
    folder's config still finds its dataset when it is read from another directory (``fewstep eval RUN``)."""
    import dataclasses
    import os

    root = os.path.abspath(os.path.expanduser(cfg.data.root))
    return cfg if root == cfg.data.root else dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root))


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
    """Read a YAML config (a file, or a shipped config by name: :func:`resolve`; the defaults when ``path`` is
    None) and apply overrides."""
    d: dict = {}
    if path is not None:
        p = resolve(path)
        d = yaml.safe_load(p.read_text()) or {}
        if not isinstance(d, dict):
            raise ValueError(f"{p}: a config must be a mapping with sections {', '.join(SECTIONS)}")
    return from_dict(apply_overrides(d, overrides or []))
