"""Datasets by name: ``digits``; the event datasets ``nmnist``, ``dvs_gesture``, ``cifar10_dvs``,
``ncaltech101`` (framed and cached by :mod:`fewstep.data.event_datasets`); and the static image datasets
of :mod:`fewstep.data.images` (``cifar10``, ``cifar100``, ``fashion_mnist``, ``tiny_imagenet``,
``imagefolder``).

:func:`load` returns a :class:`DataBundle` with ``train`` / ``val`` / ``test`` splits. The
validation split is carved from the training data with a fixed seed; nothing is selected or
calibrated on ``test``. Samples are ``(x, y)``: static images ``x[C, H, W]`` (encoded over time
by the training loop) or event frames ``x[T, P, H, W]``.

Loaders read local folders (or a local ``.tar.gz`` of them) and never download.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from .archive import cache_dir, locate

DATASETS: dict[str, Callable[..., "DataBundle"]] = {}
EVENT_DATASETS = {"nmnist", "dvs_gesture", "cifar10_dvs", "ncaltech101"}  # framed event data (kind "frames")


def register(name: str):
    def deco(fn):
        DATASETS[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(DATASETS)


@dataclass
class DataBundle:
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


# --------------------------------------------------------------------------------------- N-MNIST
NMNIST_LAYOUT = (
    "either the original N-MNIST folders Train/<class>/*.bin and Test/<class>/*.bin, or the subset "
    "layout nmnist-small/<id>.bs2 with train1K.txt and test100.txt (header '#sample #class', then "
    "'id<TAB>class'), or a folder holding nmnist-small.tar.gz"
)


def _read_id_list(path: Path) -> list[tuple[int, int]]:
    rows = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{ln}: expected 'id<TAB>class', got {line!r}")
        rows.append((int(parts[0]), int(parts[1])))
    return rows


def _nmnist_files(root) -> tuple[list, list]:
    root = Path(os.path.expanduser(str(root)))
    if (root / "Train").is_dir() and (root / "Test").is_dir():
        out = []
        for split in ("Train", "Test"):
            files = [(p, int(p.parent.name)) for p in sorted((root / split).glob("*/*.bin"))]
            if not files:
                raise FileNotFoundError(f"no .bin files under {root / split}/<class>/; expected {NMNIST_LAYOUT}")
            out.append(files)
        return out[0], out[1]
    folder = locate(root, "nmnist-small", "nmnist-small.tar.gz", "train1K.txt", NMNIST_LAYOUT)
    lists = []
    for name in ("train1K.txt", "test100.txt"):
        ids = _read_id_list(folder / name)
        lists.append([(folder / f"{i}.bs2", c) for i, c in ids])
    return lists[0], lists[1]


def _framing(T, by="time", size=None, polarities=2, binarize=False, window_us=None):
    from .event_datasets import Framing

    if T is None:
        raise ValueError("event datasets need T (the number of frames)")
    return Framing(int(T), by, tuple(size) if size else None, int(polarities), bool(binarize), window_us)


MEMORY_SAMPLES = 5000  # event datasets up to this size also keep their frames in memory; larger ones read the disk cache


def _event_bundle(name, train_items, test_items, reader, sensor_size, framing, val_fraction, seed, classes,
                  augment, build=True, memory=False) -> DataBundle:
    from .event_datasets import EventFrames, FileSource

    train = EventFrames(name, FileSource(train_items, reader, sensor_size), framing, memory=memory)
    test = EventFrames(name, FileSource(test_items, reader, sensor_size), framing, memory=memory)
    if build:
        train.build_cache(f"{name} train: framing")
        test.build_cache(f"{name} test: framing")
    tr, va = carve_val(len(train), val_fraction, seed, train.y)
    return DataBundle(name, train.view(tr, augment), train.view(va), test, framing.shape(sensor_size)[1:],
                      len(classes), "frames", T=framing.T, classes=list(classes))


def _augment(augment, max_shift, flip, event_drop, flip_valid):
    from .event_datasets import EventAugment

    if not augment or not (max_shift or (flip and flip_valid) or event_drop):
        return None
    return EventAugment(max_shift, flip and flip_valid, event_drop)


@register("nmnist")
def nmnist(root: str = "../shared/data", T: int = 10, val_fraction: float = 0.1, seed: int = 0,
           binarize: bool = False, by: str = "time", size=None, polarities: int = 2, window_us=None,
           augment: bool = True, max_shift: int = 0, event_drop: float = 0.0, **_ignored) -> DataBundle:
    """N-MNIST (Orchard et al. 2015), 34×34, 2 polarities, framed per :class:`Framing` (cached on disk).

    Official split (Train/Test), or the subset lists. Flips are not label-preserving for digits.
    """
    from .event_datasets import Item

    framing = _framing(T, by, size, polarities, binarize, window_us)
    train_files, test_files = _nmnist_files(root)
    items = lambda files: [Item(str(p), c) for p, c in files]  # noqa: E731
    return _event_bundle("nmnist", items(train_files), items(test_files), "nmnist", (34, 34), framing, val_fraction,
                         seed, [str(i) for i in range(10)], _augment(augment, max_shift, False, event_drop, False),
                         memory=len(train_files) + len(test_files) <= MEMORY_SAMPLES)


# --------------------------------------------------------------------------------------- DVS128 Gesture
GESTURE_CLASSES = ["hand clap", "right hand wave", "left hand wave", "right arm clockwise",
                   "right arm counter-clockwise", "left arm clockwise", "left arm counter-clockwise", "arm roll",
                   "air drums", "air guitar", "other"]
GESTURE_LAYOUT = ("a folder (or its DvsGesture/ subfolder) of userNN_<lighting>.aedat AEDAT 3.1 recordings, each "
                  "with userNN_<lighting>_labels.csv ('class,startTime_usec,endTime_usec'), and optionally "
                  "trials_to_train.txt / trials_to_test.txt")


def _gesture_items(folder: Path, files: list[Path]) -> list:
    from .event_datasets import Item

    items = []
    for f in files:
        csv = f.with_name(f.stem + "_labels.csv")
        if not csv.is_file():
            raise FileNotFoundError(f"{f}: its labels file {csv.name} is missing; expected {GESTURE_LAYOUT}")
        for ln, line in enumerate(csv.read_text().splitlines(), 1):
            parts = [v.strip() for v in line.split(",")]
            if not line.strip() or not parts[0].lstrip("-").isdigit():
                continue  # header
            if len(parts) != 3:
                raise ValueError(f"{csv}:{ln}: expected 'class,startTime_usec,endTime_usec', got {line!r}")
            c, start, end = (int(v) for v in parts)
            if not 1 <= c <= 11 or end <= start:
                raise ValueError(f"{csv}:{ln}: class {c} must be 1..11 and start < end, got {line!r}")
            items.append(Item(str(f), c - 1, start, end))
    return items


@register("dvs_gesture")
def dvs_gesture(root: str = "../shared/data", T: int = 16, val_fraction: float = 0.1, seed: int = 0,
                binarize: bool = False, by: str = "time", size=None, polarities: int = 2, window_us=None,
                augment: bool = True, max_shift: int = 0, event_drop: float = 0.0, **_ignored) -> DataBundle:
    """DVS128 Gesture (Amir et al. 2017): 11 classes, 128×128. Each recording is cut into its labelled
    gestures. Split: trials_to_train/test.txt when present, else users ≥ 24 are test. No flips (left
    and right arm gestures are different classes)."""
    root = Path(os.path.expanduser(str(root)))
    folder = next((c for c in (root, root / "DvsGesture") if c.is_dir() and any(c.glob("user*.aedat"))), None)
    if folder is None:
        raise FileNotFoundError(f"DVS128 Gesture not found: no user*.aedat in {root} or {root / 'DvsGesture'}; "
                                f"expected {GESTURE_LAYOUT}")
    files = sorted(folder.glob("user*.aedat"))
    lists = [folder / "trials_to_train.txt", folder / "trials_to_test.txt"]
    if all(p.is_file() for p in lists):
        names = [{ln.strip() for ln in p.read_text().splitlines() if ln.strip()} for p in lists]
        train_f = [f for f in files if f.name in names[0]]
        test_f = [f for f in files if f.name in names[1]]
    else:
        import re

        def user(f):
            m = re.match(r"user(\d+)", f.name)
            if not m:
                raise ValueError(f"{f}: cannot read the user number from the file name; expected userNN_<lighting>.aedat")
            return int(m.group(1))

        train_f = [f for f in files if user(f) < 24]
        test_f = [f for f in files if user(f) >= 24]
    framing = _framing(T, by, size, polarities, binarize, window_us)
    return _event_bundle("dvs_gesture", _gesture_items(folder, train_f), _gesture_items(folder, test_f), "aedat31",
                         (128, 128), framing, val_fraction, seed, GESTURE_CLASSES,
                         _augment(augment, max_shift, False, event_drop, False))


# --------------------------------------------------------------------------------------- class-folder datasets
def _class_folder_split(folder: Path, pattern: str, train_share: float, name: str):
    """Per class (sub-folder, sorted), the first ``train_share`` of the sorted files train, the rest test.
    The split is written to ``$FEWSTEP_CACHE/splits/`` and returned."""
    from .event_datasets import Item

    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob(pattern)))
    train, test, record = [], [], {}
    for c, cls in enumerate(classes):
        files = sorted((folder / cls).glob(pattern))
        k = min(len(files) - 1, int(round(train_share * len(files)))) if len(files) > 1 else len(files)
        train += [Item(str(f), c) for f in files[:k]]
        test += [Item(str(f), c) for f in files[k:]]
        record[cls] = {"train": [f.name for f in files[:k]], "test": [f.name for f in files[k:]]}
    split_dir = cache_dir() / "splits"
    split_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:12]
    path = split_dir / f"{name}-{key}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"root": str(folder), "train_share": train_share, "classes": record}, indent=1))
    os.replace(tmp, path)
    return classes, train, test, path


def _find_class_root(root, subdirs, pattern, layout, what):
    root = Path(os.path.expanduser(str(root)))
    for cand in [root] + [root / s for s in subdirs]:
        if cand.is_dir() and any(cand.glob(f"*/{pattern}")):
            return cand
    raise FileNotFoundError(f"{what} not found: no <class>/{pattern} under {root} or "
                            f"{', '.join(str(root / s) for s in subdirs)}; expected {layout}")


@register("cifar10_dvs")
def cifar10_dvs(root: str = "../shared/data", T: int = 10, val_fraction: float = 0.1, seed: int = 0,
                binarize: bool = False, by: str = "time", size=(48, 48), polarities: int = 2, window_us=None,
                augment: bool = True, max_shift: int = 5, flip: bool = True, event_drop: float = 0.0,
                **_ignored) -> DataBundle:
    """CIFAR10-DVS (Li et al. 2017): 10 × 1000 AEDAT 2.0 recordings (DVS128), split 90/10 per class
    deterministically (sorted file names; recorded in ``$FEWSTEP_CACHE/splits``). Default size 48×48."""
    folder = _find_class_root(root, ["CIFAR10DVS", "cifar10_dvs", "CIFAR10-DVS"], "*.aedat",
                              "<class>/*.aedat folders (airplane, automobile, ...)", "CIFAR10-DVS")
    classes, train, test, split_file = _class_folder_split(folder, "*.aedat", 0.9, "cifar10_dvs")
    b = _event_bundle("cifar10_dvs", train, test, "cifar10dvs", (128, 128), _framing(T, by, size, polarities, binarize,
                      window_us), val_fraction, seed, classes, _augment(augment, max_shift, flip, event_drop, True))
    b.split_file = str(split_file)
    return b


@register("ncaltech101")
def ncaltech101(root: str = "../shared/data", T: int = 10, val_fraction: float = 0.1, seed: int = 0,
                binarize: bool = False, by: str = "time", size=(48, 48), polarities: int = 2, window_us=None,
                augment: bool = True, max_shift: int = 5, flip: bool = True, event_drop: float = 0.0,
                sensor_size=(240, 180), **_ignored) -> DataBundle:
    """N-Caltech101 (Orchard et al. 2015): <class>/*.bin in the N-MNIST 40-bit format on an ATIS of up to
    240×180. Every class folder is used (BACKGROUND_Google too when present); split 90/10 per class
    deterministically (sorted file names; recorded in ``$FEWSTEP_CACHE/splits``). Default size 48×48."""
    folder = _find_class_root(root, ["Caltech101", "N-Caltech101", "ncaltech101"], "*.bin",
                              "<class>/image_NNNN.bin folders", "N-Caltech101")
    classes, train, test, split_file = _class_folder_split(folder, "*.bin", 0.9, "ncaltech101")
    b = _event_bundle("ncaltech101", train, test, "nmnist", tuple(sensor_size), _framing(T, by, size, polarities,
                      binarize, window_us), val_fraction, seed, classes,
                      _augment(augment, max_shift, flip, event_drop, True))
    b.split_file = str(split_file)
    return b


# Static image datasets (cifar10, cifar100, fashion_mnist, tiny_imagenet, imagefolder) register themselves there.
from . import images  # noqa: E402,F401
