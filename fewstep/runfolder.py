"""Run folders and checkpoints: what fewstep writes in a run folder, the refusal to write into a folder it
did not create, atomic checkpoint writes, loading a checkpoint with ``torch.load(weights_only=True)``, and
rebuilding a run's data and network from its config (:func:`load_run`, or :func:`load_network` without the
dataset). :mod:`fewstep.train` re-exports these names."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import NamedTuple

import torch
import yaml

from . import config as _config
from . import models as _models
from .data import datasets as _datasets

CHECKPOINT_FORMAT = "fewstep-checkpoint-v1"


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# What fewstep writes in a run folder (train, eval, cutoff, tradeoff, ablate's analysis).
RUN_FILES = ("config.yaml", "checkpoint.pt", "checkpoint.pt.tmp", "log.csv", "metrics.json", "analysis.json",
             "conversion.json",
             "tradeoff.json", "tradeoff.png", "accuracy_per_step.png", "tb")
RUN_PATTERNS = ("eval_*.json", "calibration_*.json", "cutoff_*.json", "cutoff_*_exits.png")


def is_run_file(name: str) -> bool:
    import fnmatch

    return name in RUN_FILES or any(fnmatch.fnmatch(name, p) for p in RUN_PATTERNS)


def check_run_folder(out) -> None:
    """Refuse an ``--out`` that holds files fewstep did not write: never overwrite a user's file."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if (out / "checkpoint.pt").is_file():
        return  # a run folder: training resumes
    # Without a checkpoint, only what a run interrupted before its first epoch leaves may be there.
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ("config.yaml", "tb", "checkpoint.pt.tmp"))
    if not foreign and (out / "config.yaml").is_file():
        try:
            _config.from_dict(yaml.safe_load((out / "config.yaml").read_text()))
        except Exception:
            foreign = ["config.yaml (not a fewstep config)"]
    if foreign:
        more = f" and {len(foreign) - 8} more" if len(foreign) > 8 else ""
        raise ValueError(f"{out} is not empty and is not a fewstep run folder (no checkpoint.pt); it holds "
                         f"{', '.join(foreign[:8])}{more}. Choose a new or empty --out folder")


def make_room(out, overwrite: bool, remove: bool = True) -> None:
    """``out`` may become a new run folder (``fewstep convert``, ``fewstep import``): absent or empty, or, with
    ``overwrite``, a run folder, which ``remove`` then deletes whole. Anything else is refused and left as it is."""
    import shutil

    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise ValueError(f"--out {out} already exists and is not empty; pass --overwrite to replace it")
    if out.is_dir() and not (out / "checkpoint.pt").is_file():
        raise ValueError(f"--out {out} is not a fewstep run folder (no checkpoint.pt); refusing to overwrite it")
    if remove:
        shutil.rmtree(out) if out.is_dir() else out.unlink()


def clear_run_folder(out) -> None:
    """Delete what fewstep wrote in a run folder (and nothing else)."""
    import shutil

    out = Path(out)
    check_run_folder(out)
    if out.is_dir():
        for p in out.iterdir():
            if is_run_file(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def load_checkpoint(path) -> dict:
    """A run's ``checkpoint.pt`` as a dict, read with ``torch.load(weights_only=True)``; a missing file or one that
    is not a fewstep checkpoint raises naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fewstep checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available; use device: auto or cpu")
    return dev


def load_data(cfg: _config.Config) -> _datasets.DataBundle:
    d = cfg.data
    extra = {k: getattr(d, k) for k in ("by", "polarities", "window_us", "max_shift", "flip", "event_drop")}
    for k in ("size", "sensor_size"):  # loaders keep their own defaults where unset
        if getattr(d, k) is not None:
            extra[k] = getattr(d, k)
    for k in ("coarse", "skip_corrupt"):  # image-only keys, passed where set (the config checks where they apply)
        if getattr(d, k):
            extra[k] = True
    return _datasets.load(d.name, root=d.root, T=d.T, val_fraction=d.val_fraction, seed=cfg.train.seed,
                          augment=d.augment, cutout=d.cutout, binarize=d.binarize, **extra)


def build_model(cfg: _config.Config, bundle: _datasets.DataBundle) -> torch.nn.Module:
    m = cfg.model
    norm = {} if m.norm == "bn" else {"norm": m.norm, "T": cfg.data.T}
    if m.neuron in ("qcfs", "qcfs_if"):  # ANN→SNN conversion (fewstep.qcfs)
        norm["levels"] = m.levels
    return _models.create(m.name, input_shape=bundle.input_shape, num_classes=bundle.num_classes, neuron=m.neuron,
                          tau=m.tau, theta=m.theta, v0=m.v0, reset=m.reset, detach_reset=m.detach_reset,
                          surrogate=m.surrogate, learn_theta=m.learn_theta, **norm, **(m.options or {}))


class DataMeta(NamedTuple):
    """What rebuilding a run's network and naming its classes needs of its data (stored in the checkpoint)."""

    input_shape: tuple
    num_classes: int
    kind: str
    classes: list


def data_meta(bundle) -> dict:
    """The checkpoint's ``"data"`` entry for ``bundle`` (plain lists and strings: loads with weights_only)."""
    return {"input_shape": [int(s) for s in bundle.input_shape], "num_classes": int(bundle.num_classes),
            "kind": str(bundle.kind), "classes": [str(c) for c in (bundle.classes or [])]}


def _open_run(run_dir, weights: str):
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint.pt").is_file():
        raise FileNotFoundError(f"{run_dir} is not a fewstep run folder (no checkpoint.pt); train one with "
                                "'fewstep train CONFIG --out DIR'")
    if weights not in ("best", "last"):
        raise ValueError(f"weights must be 'best' or 'last', got {weights!r}")
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    state = ckpt["best_model"] if weights == "best" and ckpt["best_model"] is not None else ckpt["model"]
    return ckpt, _files_in(_config.from_dict(ckpt["config"]), run_dir), state


def _files_in(cfg: _config.Config, run_dir) -> _config.Config:
    """``cfg`` with the NIR file of a model ``nir`` (``fewstep import``, which names it relative to the run folder
    so that the folder can move) made a path to the run folder's copy."""
    graph = (cfg.model.options or {}).get("graph")
    if cfg.model.name != "nir" or not graph or os.path.isabs(graph):
        return cfg
    options = {**cfg.model.options, "graph": str(Path(run_dir).resolve() / graph)}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, options=options))


def _rebuild(cfg, shapes, state, device):
    model = build_model(cfg, shapes)
    model.load_state_dict(state)
    return model.to(resolve_device(device)).eval()


def with_data_root(cfg: _config.Config, data_root) -> _config.Config:
    """``cfg`` reading its dataset from ``data_root`` (made absolute; ``~`` expanded)."""
    return _config.with_absolute_root(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=str(data_root))))


def load_run(run_dir, weights: str = "best", device: str = "cpu", data_root=None):
    """Rebuild ``(model, cfg, bundle)`` of a finished or interrupted run folder (reads its dataset).

    ``weights`` is ``"best"`` (best on validation) or ``"last"``. ``data_root`` reads the dataset from another
    folder than the one the run was trained on (a run or its data moved to another machine); the returned
    ``cfg`` then holds it as ``data.root``. The split itself is unchanged: it follows the run's seed.
    """
    _, cfg, state = _open_run(run_dir, weights)
    if data_root is not None:
        cfg = with_data_root(cfg, data_root)
    bundle = _run_data(run_dir, cfg, given=data_root is not None)
    return _rebuild(cfg, bundle, state, device), cfg, bundle


def _run_data(run_dir, cfg: _config.Config, given: bool = False) -> _datasets.DataBundle:
    """A run's dataset; when it is missing, the error says where the run's config looked (or, ``given``, that
    the caller's data root was read instead)."""
    try:
        return load_data(cfg)
    except FileNotFoundError as e:
        root = cfg.data.root
        if given:
            raise FileNotFoundError(f"{e}\n(the data root given for {run_dir}: {root})") from e
        where = (f"relative to the working directory {os.getcwd()} (runs trained before fewstep stored "
                 "the root as an absolute path keep it as written: run from the folder it was trained in)" if not os.path.isabs(os.path.expanduser(root))
                 else "as it was when the run was trained")
        raise FileNotFoundError(f"{e}\n{run_dir} was trained on data.root {root!r}, read {where}; where the data "
                                "lies elsewhere now, give that folder: --data-root DIR (load_run(..., data_root=DIR))") from e


def load_network(run_dir, weights: str = "best", device: str = "cpu"):
    """``(model, cfg, meta)`` of a run folder without reading its dataset: ``meta`` (:class:`DataMeta`) holds
    the input shape, class count and names that the checkpoint stores. A checkpoint written before it stored
    them (2026-12-02) is rebuilt from its dataset, as :func:`load_run` does, and ``meta`` is then the bundle."""
    ckpt, cfg, state = _open_run(run_dir, weights)
    d = ckpt.get("data")
    if d is None:
        bundle = _run_data(run_dir, cfg)
        return _rebuild(cfg, bundle, state, device), cfg, bundle
    meta = DataMeta(tuple(d["input_shape"]), int(d["num_classes"]), d["kind"], list(d["classes"]))
    return _rebuild(cfg, meta, state, device), cfg, meta
