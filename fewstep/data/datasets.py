"""Datasets by name: ``digits`` here; the event datasets of :mod:`fewstep.data.event_sets` (``nmnist``,
``dvs_gesture``, ``cifar10_dvs``, ``ncaltech101``, ``eventfolder``; framed and cached by
:mod:`fewstep.data.event_datasets`); and the static image datasets of :mod:`fewstep.data.images` (``cifar10``,
``cifar100``, ``fashion_mnist``, ``tiny_imagenet``, ``imagefolder``).

:func:`load` returns a :class:`DataBundle` with ``train`` / ``val`` / ``test`` splits. The
validation split is carved from the training data with a fixed seed; nothing is selected or
calibrated on ``test``. Samples are ``(x, y)``: static images ``x[C, H, W]`` (encoded over time
by the training loop) or event frames ``x[T, P, H, W]``.

Loaders read local folders (or a local ``.tar.gz`` of them) and never download.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.data import Dataset

DATASETS: dict[str, Callable[..., "DataBundle"]] = {}
EVENT_DATASETS = {"nmnist", "dvs_gesture", "cifar10_dvs", "ncaltech101", "eventfolder"}  # framed event data (kind "frames")


def register(name: str):
    """Decorator: make a loader ``fn(**options) -> DataBundle`` available as ``load(name)`` and ``data.name``."""
    def deco(fn):
        DATASETS[name] = fn
        return fn

    return deco


def available() -> list[str]:
    """The registered dataset names, sorted (what :func:`load` and the config's ``data.name`` take)."""
    return sorted(DATASETS)


@dataclass
class DataBundle:
    """A dataset's three splits (``train``, ``val`` carved from the training data with a fixed seed, ``test``) with
    what a model needs of them: ``input_shape`` of one frame or image, ``num_classes``, their names, and ``kind``
    (``"static"`` images, encoded over T by the model's caller, or ``"frames"``, already ``[T, ...]``)."""
    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple
    num_classes: int
    kind: str  # "static" (images, encoded over T) or "frames" (already [T, ...])
    T: int | None = None
    classes: list = field(default_factory=list)

    split_file: str | None = None

    def __post_init__(self):
        for name in ("train", "val", "test"):  # datasets know their split: calibration refuses "test"
            getattr(self, name).split = name

    def split(self, name: str) -> Dataset:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; valid: train, val, test")
        return getattr(self, name)


class ArrayDataset(Dataset):
    """Rows ``index`` of tensors ``x``, ``y``, with an optional per-sample ``transform``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, index=None, transform=None, split: str | None = None):
        self.x, self.y = x, y
        self.split = split
        self.index = torch.arange(len(y)) if index is None else torch.as_tensor(index)
        self.transform = transform

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        j = int(self.index[i])
        x = self.x[j]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.y[j]


def carve_val(n: int, val_fraction: float, seed: int, labels: torch.Tensor | None = None):
    """Split ``range(n)`` into (train, val) indices with a fixed seed, stratified by label when given."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1): a validation split is required, got {val_fraction}")
    g = torch.Generator().manual_seed(int(seed))
    if labels is None:
        perm = torch.randperm(n, generator=g)
        k = max(1, int(round(n * val_fraction)))
        return perm[k:].sort().values, perm[:k].sort().values
    tr, va = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = max(1, int(round(len(idx) * val_fraction)))
        va.append(idx[:k])
        tr.append(idx[k:])
    return torch.cat(tr).sort().values, torch.cat(va).sort().values


def load(name: str, **kwargs) -> DataBundle:
    """Load a registered dataset (see each loader for its options)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(available())}")
    return DATASETS[name](**kwargs)


# --------------------------------------------------------------------------------------- digits
@register("digits")
def digits(val_fraction: float = 0.15, seed: int = 0, test_fraction: float = 0.2, **_ignored) -> DataBundle:
    """scikit-learn's bundled 8×8 UCI digits (1,797 images; no download). Pixels scaled to [0, 1].

    The test split is fixed (20 %, stratified, seed 0) whatever the run's seed.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    rest, test = carve_val(len(y), test_fraction, 0, y)
    tr, va = carve_val(len(rest), val_fraction, seed, y[rest])
    return DataBundle("digits", ArrayDataset(x, y, rest[tr]), ArrayDataset(x, y, rest[va]), ArrayDataset(x, y, test),
                      (1, 8, 8), 10, "static", classes=[str(i) for i in range(10)])


# The event datasets (nmnist, dvs_gesture, cifar10_dvs, ncaltech101, eventfolder) register themselves in
# event_sets, the static image datasets (cifar10, cifar100, fashion_mnist, tiny_imagenet, imagefolder) in images.
from . import event_sets  # noqa: E402,F401
from . import images  # noqa: E402,F401
