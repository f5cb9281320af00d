"""Datasets by name: ``digits``, ``nmnist``, ``cifar10``.

:func:`load` returns a :class:`DataBundle` with ``train`` / ``val`` / ``test`` splits. The
validation split is carved from the training data with a fixed seed; nothing is selected or
calibrated on ``test``. Samples are ``(x, y)``: static images ``x[C, H, W]`` (encoded over time
by the training loop) or event frames ``x[T, P, H, W]``.

Loaders read local folders (or a local ``.tar.gz`` of them) and never download.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .archive import cache_dir, locate
from .events import read_nmnist
from .frames import to_frames

DATASETS: dict[str, Callable[..., "DataBundle"]] = {}


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


def frame_files(files, T: int, sensor_size, binarize=False, desc="framing") -> tuple[torch.Tensor, torch.Tensor]:
    from tqdm.auto import tqdm

    xs = np.empty((len(files), T, 2, sensor_size[1], sensor_size[0]), dtype=np.float32)
    for i, (path, _) in enumerate(tqdm(files, desc=desc, leave=False, disable=None)):
        xs[i] = to_frames(read_nmnist(path, sensor_size), sensor_size, T, binarize=binarize, source=str(path))
    return torch.from_numpy(xs), torch.tensor([c for _, c in files], dtype=torch.long)


@register("nmnist")
def nmnist(root: str = "../shared/data", T: int = 10, val_fraction: float = 0.1, seed: int = 0,
           binarize: bool = False, **_ignored) -> DataBundle:
    """N-MNIST (Orchard et al. 2015), 34×34, 2 polarities, framed into ``T`` equal-time bins of counts."""
    if T is None or int(T) < 1:
        raise ValueError(f"nmnist needs T >= 1 frames, got {T}")
    train_files, test_files = _nmnist_files(root)
    xtr, ytr = frame_files(train_files, T, (34, 34), binarize, "N-MNIST train")
    xte, yte = frame_files(test_files, T, (34, 34), binarize, "N-MNIST test")
    tr, va = carve_val(len(ytr), val_fraction, seed, ytr)
    return DataBundle("nmnist", ArrayDataset(xtr, ytr, tr), ArrayDataset(xtr, ytr, va), ArrayDataset(xte, yte),
                      (2, 34, 34), 10, "frames", T=int(T), classes=[str(i) for i in range(10)])


# --------------------------------------------------------------------------------------- CIFAR-10
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_LAYOUT = (
    "the python-pickle batches cifar-10-batches-py/{data_batch_1..5,test_batch}, or image folders "
    "{train,test}/<class>/*.jpg|*.png (classes sorted by name give the label order), or a folder "
    "holding cifar10-jpeg.tar.gz"
)


def _decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _images_from_members(members, desc):
    """members: iterable of (split, class_name, bytes) → dict split -> (x uint8 [N,32,32,3], y)."""
    from tqdm.auto import tqdm

    acc: dict = {"train": ([], []), "test": ([], [])}
    names: set = set()
    for split, cls, data in tqdm(members, desc=desc, leave=False, disable=None):
        names.add(cls)
        acc[split][0].append(_decode_image(data))
        acc[split][1].append(cls)
    classes = sorted(names)
    out = {}
    for split, (xs, cs) in acc.items():
        if not xs:
            raise FileNotFoundError(f"no {split} images found; expected {CIFAR_LAYOUT}")
        out[split] = (np.stack(xs), np.array([classes.index(c) for c in cs], dtype=np.int64))
    return out, classes


def _cifar_arrays(root):
    root = Path(os.path.expanduser(str(root)))
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file():
            def unpickle(p):
                with open(p, "rb") as f:
                    d = pickle.load(f, encoding="bytes")
                return d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(d[b"labels"])

            parts = [unpickle(cand / f"data_batch_{i}") for i in range(1, 6)]
            xte, yte = unpickle(cand / "test_batch")
            return {"train": (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])),
                    "test": (xte, yte)}, CIFAR_CLASSES
    for cand in (root, root / "cifar10-jpeg"):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            def walk():
                for split in ("train", "test"):
                    for p in sorted((cand / split).glob("*/*")):
                        if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                            yield split, p.parent.name, p.read_bytes()

            return _cached(cand, lambda: _images_from_members(walk(), "CIFAR-10 images"))
    tar = root / "cifar10-jpeg.tar.gz" if root.is_dir() else root
    if tar.is_file() and tar.name.endswith((".tar.gz", ".tgz", ".tar")):
        def stream():
            with tarfile.open(tar) as tf:
                for m in tf:
                    parts = Path(m.name).parts
                    if m.isfile() and len(parts) >= 3 and parts[-3] in ("train", "test"):
                        yield parts[-3], parts[-2], tf.extractfile(m).read()

        return _cached(tar, lambda: _images_from_members(stream(), f"decoding {tar.name}"))
    raise FileNotFoundError(f"CIFAR-10 not found under {root}; expected {CIFAR_LAYOUT}")


def _cached(source: Path, build):
    """Decode once, keep ``uint8`` arrays in the cache keyed by the source path, size and mtime."""
    st = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    path = cache_dir() / f"cifar10-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            classes = [str(c) for c in z["classes"]]
            return {"train": (z["xtr"], z["ytr"]), "test": (z["xte"], z["yte"])}, classes
    arrays, classes = build()
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, xtr=arrays["train"][0], ytr=arrays["train"][1], xte=arrays["test"][0], yte=arrays["test"][1],
             classes=np.array(classes))
    os.replace(tmp, path)
    return arrays, classes


class Augment:
    """Pad-4 random crop, horizontal flip and optional cutout on a ``[C, H, W]`` tensor."""

    def __init__(self, pad: int = 4, flip: bool = True, cutout: int = 0):
        self.pad, self.flip, self.cutout = pad, flip, cutout

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = x.shape
        if self.pad:
            xp = torch.nn.functional.pad(x, (self.pad,) * 4)
            i, j = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = xp[:, i:i + h, j:j + w]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.cutout:
            cy, cx = torch.randint(0, h, ()).item(), torch.randint(0, w, ()).item()
            r = self.cutout // 2
            x = x.clone()
            x[:, max(0, cy - r):cy + r, max(0, cx - r):cx + r] = 0
        return x


@register("cifar10")
def cifar10(root: str = "../shared/data", val_fraction: float = 0.1, seed: int = 0, augment: bool = True,
            cutout: int = 0, **_ignored) -> DataBundle:
    """CIFAR-10 from pickle batches, image folders or the local JPEG archive; normalised per channel."""
    arrays, classes = _cifar_arrays(root)
    mean = torch.tensor(CIFAR_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(3, 1, 1)

    def prep(x):
        return ((torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255.0) - mean) / std

    xtr, ytr = prep(arrays["train"][0]), torch.from_numpy(arrays["train"][1]).long()
    xte, yte = prep(arrays["test"][0]), torch.from_numpy(arrays["test"][1]).long()
    tr, va = carve_val(len(ytr), val_fraction, seed, ytr)
    aug = Augment(cutout=cutout) if augment else None
    return DataBundle("cifar10", ArrayDataset(xtr, ytr, tr, aug), ArrayDataset(xtr, ytr, va), ArrayDataset(xte, yte),
                      (3, 32, 32), 10, "static", classes=list(classes))
