"""Run folders and checkpoints: what fewstep writes in a run folder, the refusal to write into a folder it
did not create, atomic checkpoint writes, and loading a checkpoint with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from . import config as _config

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
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a fewstep checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt
