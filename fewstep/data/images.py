"""Static image datasets read from local folders (fewstep never downloads).

Small sets are decoded once into a ``uint8`` cache (keyed by the source's files, so it is rebuilt
when they change) and held in memory: ``cifar10``, ``cifar100``, ``fashion_mnist``,
``tiny_imagenet``. Large sets in ImageNet's layout (``imagefolder``) are decoded per sample in the
DataLoader's workers, with random-resized-crop + flip for training and resize + centre-crop for
evaluation. Every loader carves its validation split from the training data with the run's seed;
the official test (or val) split is the test split. Layouts: ``docs/datasets.md``. The machinery
they share (decoding, the cache, image tensors, augmentation) is :mod:`fewstep.data.image_base`.

Bad input is named: a folder in none of the known layouts (where fewstep looked, which layouts it
accepts), a corrupt or truncated image (its path; with ``skip_corrupt=True`` it is skipped and the
count is logged), class folders that differ between splits.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import torch

from .datasets import DataBundle, carve_val, register
from .image_base import (  # noqa: F401  (Augment, batch_augment, decode_image, ImageTensors: re-exported)
    IMAGE_EXTS, IMAGENET_MEAN, IMAGENET_STD, Augment, FolderDataset, ImageTensors, _class_files, _decode_members,
    _root, batch_augment, cached, class_index, decode_image, image_bundle,
)

log = logging.getLogger("fewstep")


# ------------------------------------------------------------------------------------------ CIFAR
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
CIFAR_LAYOUT = (
    "the python-pickle batches cifar-10-batches-py/{data_batch_1..5,test_batch}, or image folders "
    "{train,test}/<class>/*.jpg|*.png (classes sorted by name give the label order), or a folder "
    "holding cifar10-jpeg.tar.gz"
)
CIFAR100_LAYOUT = (
    "the python-pickle files cifar-100-python/{train,test,meta}, or image folders "
    "{train,test}/<class>/*.jpg|*.png (classes sorted by name give the label order)"
)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _pixels(d: dict) -> np.ndarray:
    return np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _folder_arrays(tag: str, folder: Path, skip_corrupt: bool):
    def build():
        members = [(split, cls, p, str(p)) for split in ("train", "test") for cls, p in _class_files(folder / split)]
        per, _ = _decode_members(members, f"{tag} images", skip_corrupt, size=(32, 32))
        for split in ("train", "test"):
            if split not in per:
                raise FileNotFoundError(f"no {split} images under {folder / split}")
        return class_index(per)

    return cached(tag, [folder / "train", folder / "test"], build, extra=f"skip={skip_corrupt}")


def _cifar_arrays(root, skip_corrupt: bool = False):
    root = _root(root)
    for cand in (root, root / "cifar-10-batches-py"):
        if (cand / "data_batch_1").is_file():
            parts = [_unpickle(cand / f"data_batch_{i}") for i in range(1, 6)]
            te = _unpickle(cand / "test_batch")
            return {"train": (np.concatenate([_pixels(p) for p in parts]),
                              np.concatenate([np.array(p[b"labels"]) for p in parts])),
                    "test": (_pixels(te), np.array(te[b"labels"]))}, CIFAR_CLASSES
    for cand in (root, root / "cifar10-jpeg"):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            return _folder_arrays("cifar10", cand, skip_corrupt)
    tar = root / "cifar10-jpeg.tar.gz" if root.is_dir() else root
    if tar.is_file() and tar.name.endswith((".tar.gz", ".tgz", ".tar")):
        def build():
            def stream():
                with tarfile.open(tar) as tf:
                    for m in tf:
                        parts = Path(m.name).parts
                        if m.isfile() and len(parts) >= 3 and parts[-3] in ("train", "test"):
                            yield parts[-3], parts[-2], tf.extractfile(m).read(), f"{tar}:{m.name}"

            per, _ = _decode_members(stream(), f"decoding {tar.name}", skip_corrupt, size=(32, 32))
            return class_index(per)

        return cached("cifar10", tar, build, extra=f"skip={skip_corrupt}")
    raise FileNotFoundError(f"CIFAR-10 not found under {root}; expected {CIFAR_LAYOUT}")


@register("cifar10")
def cifar10(root: str = "../shared/data", val_fraction: float = 0.1, seed: int = 0, augment: bool = True,
            cutout: int = 0, skip_corrupt: bool = False, **_ignored) -> DataBundle:
    """CIFAR-10 from pickle batches, image folders or the local JPEG archive; normalised per channel."""
    arrays, classes = _cifar_arrays(root, skip_corrupt)
    return image_bundle("cifar10", arrays, classes, CIFAR_MEAN, CIFAR_STD, val_fraction, seed, augment, cutout)


@register("cifar100")
def cifar100(root: str = "../shared/data", val_fraction: float = 0.1, seed: int = 0, augment: bool = True,
             cutout: int = 0, coarse: bool = False, skip_corrupt: bool = False, **_ignored) -> DataBundle:
    """CIFAR-100 from ``cifar-100-python/{train,test,meta}`` (fine labels, or the 20 superclasses with
    ``coarse=True``) or image folders; normalised per channel."""
    root = _root(root)
    key = b"coarse_labels" if coarse else b"fine_labels"
    for cand in (root, root / "cifar-100-python"):
        if (cand / "train").is_file() and (cand / "test").is_file():
            tr, te = _unpickle(cand / "train"), _unpickle(cand / "test")
            meta = _unpickle(cand / "meta") if (cand / "meta").is_file() else {}
            names = meta.get(b"coarse_label_names" if coarse else b"fine_label_names")
            n = 20 if coarse else 100
            classes = [c.decode() for c in names] if names else [str(i) for i in range(n)]
            arrays = {"train": (_pixels(tr), np.array(tr[key])), "test": (_pixels(te), np.array(te[key]))}
            return image_bundle("cifar100", arrays, classes, CIFAR100_MEAN, CIFAR100_STD, val_fraction, seed, augment,
                                cutout)
    for cand in (root, root / "cifar100"):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            if coarse:
                raise ValueError("coarse labels need the pickle layout (cifar-100-python/meta names the superclasses); "
                                 f"the image folders under {cand} carry only their class names")
            arrays, classes = _folder_arrays("cifar100", cand, skip_corrupt)
            return image_bundle("cifar100", arrays, classes, CIFAR100_MEAN, CIFAR100_STD, val_fraction, seed, augment,
                                cutout)
    raise FileNotFoundError(f"CIFAR-100 not found under {root} (looked in {root} and {root / 'cifar-100-python'}); "
                            f"expected {CIFAR100_LAYOUT}")


# ------------------------------------------------------------------------------------------ Fashion-MNIST
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")
FASHION_LAYOUT = ("the four idx files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
                  "t10k-labels-idx1-ubyte (each may be .gz)")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format, gzipped or not) as a numpy array; a malformed one raises naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read idx file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: its header says {dims} ({int(np.prod(dims))} bytes), it holds {body.size}")
    return body.reshape(dims).copy()  # writable (frombuffer is read-only)


def _fashion_folder(root: Path) -> "Path | None":
    for cand in (root, root / "fashion-mnist", root / "fashion_mnist", root / "FashionMNIST" / "raw", FASHION_SYSTEM):
        if all((cand / f).is_file() or (cand / f"{f}.gz").is_file() for f in FASHION_FILES):
            return cand
    return None


@register("fashion_mnist")
def fashion_mnist(root: str = "../shared/data", val_fraction: float = 0.1, seed: int = 0, augment: bool = True,
                  cutout: int = 0, **_ignored) -> DataBundle:
    """Fashion-MNIST (28×28 grey, 10 classes) from its idx files; found under ``root`` or where Debian's
    ``dataset-fashion-mnist`` installs them, ``/usr/share/datasets/fashion-mnist/``."""
    root = _root(root)
    folder = _fashion_folder(root)
    if folder is None:
        raise FileNotFoundError(f"Fashion-MNIST not found (looked in {root}, {root / 'fashion-mnist'}, "
                                f"{root / 'fashion_mnist'}, {root / 'FashionMNIST/raw'} and {FASHION_SYSTEM}); "
                                f"expected {FASHION_LAYOUT}. On Debian: apt install dataset-fashion-mnist")

    def get(f):
        return read_idx(folder / f if (folder / f).is_file() else folder / f"{f}.gz")

    xtr, ytr, xte, yte = (get(f) for f in FASHION_FILES)
    for x, y, what in ((xtr, ytr, "train"), (xte, yte, "t10k")):
        if x.ndim != 3 or len(x) != len(y):
            raise ValueError(f"Fashion-MNIST {what} files in {folder} disagree: images {x.shape}, labels {y.shape}")
    arrays = {"train": (xtr[..., None], ytr.astype(np.int64)), "test": (xte[..., None], yte.astype(np.int64))}
    return image_bundle("fashion_mnist", arrays, FASHION_CLASSES, FASHION_MEAN, FASHION_STD, val_fraction, seed,
                        augment, cutout, pad=2)


# ------------------------------------------------------------------------------------------ Tiny-ImageNet
TINY_LAYOUT = ("tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
               "val/val_annotations.txt (its val set is fewstep's test split)")


@register("tiny_imagenet")
def tiny_imagenet(root: str = "../shared/data", val_fraction: float = 0.1, seed: int = 0, augment: bool = True,
                  cutout: int = 0, skip_corrupt: bool = False, **_ignored) -> DataBundle:
    """Tiny-ImageNet (64×64 RGB, 200 classes) in its official layout, decoded once into the cache; the
    official val set is the test split. Normalised with ImageNet's statistics."""
    root = _root(root)
    folder = next((c for c in (root, root / "tiny-imagenet-200") if (c / "wnids.txt").is_file()), None)
    if folder is None:
        raise FileNotFoundError(f"Tiny-ImageNet not found (looked for wnids.txt in {root} and "
                                f"{root / 'tiny-imagenet-200'}); expected {TINY_LAYOUT}")
    wnids = [w.strip() for w in (folder / "wnids.txt").read_text().split() if w.strip()]
    ann = folder / "val" / "val_annotations.txt"
    if not ann.is_file() or not (folder / "train").is_dir():
        raise FileNotFoundError(f"{folder} lacks train/ or val/val_annotations.txt; expected {TINY_LAYOUT}")

    def build():
        members = []
        for w in wnids:
            files = sorted(p for p in (folder / "train" / w / "images").glob("*") if p.suffix.lower() in IMAGE_EXTS)
            if not files:
                raise FileNotFoundError(f"class {w} (wnids.txt) has no images in {folder / 'train' / w / 'images'}")
            members += [("train", w, p, str(p)) for p in files]
        for line in ann.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] not in wnids:
                raise ValueError(f"{ann}: image {parts[0]} has class {parts[1]!r}, which is not in wnids.txt")
            members.append(("test", parts[1], folder / "val" / "images" / parts[0], str(folder / "val" / "images" / parts[0])))
        per, _ = _decode_members(members, "Tiny-ImageNet images", skip_corrupt, size=(64, 64))
        return {s: (x, np.array([wnids.index(c) for c in cs], dtype=np.int64)) for s, (x, cs) in per.items()}, wnids

    arrays, classes = cached("tiny_imagenet", [folder / "wnids.txt", folder / "train", folder / "val"], build,
                             extra=f"skip={skip_corrupt}")
    return image_bundle("tiny_imagenet", arrays, classes, IMAGENET_MEAN, IMAGENET_STD, val_fraction, seed, augment,
                        cutout, pad=8)


# ------------------------------------------------------------------------------------------ image folders
IMAGEFOLDER_LAYOUT = "{train,val}/<class>/*.jpg|*.jpeg|*.png (ImageNet's layout; val is the test split)"


@register("imagefolder")
def imagefolder(root: str = "../shared/data", val_fraction: float = 0.1, seed: int = 0, augment: bool = True,
                size=None, skip_corrupt: bool = False, **_ignored) -> DataBundle:
    """Any ``{train,val}/<class>/*`` tree of JPEG/PNG images (ImageNet's layout), decoded per sample;
    ``size`` ``[H, W]`` (default 224×224). ``skip_corrupt=True`` checks every file once at load and
    leaves out (and counts) the ones that do not decode."""
    root = _root(root)
    if not ((root / "train").is_dir() and (root / "val").is_dir()):
        raise FileNotFoundError(f"no image folders under {root} (looked for {root / 'train'} and {root / 'val'}); "
                                f"expected {IMAGEFOLDER_LAYOUT}")
    size = tuple(size) if size is not None else (224, 224)
    per = {s: _class_files(root / s) for s in ("train", "val")}
    for s, items in per.items():
        if not items:
            raise FileNotFoundError(f"no images in {root / s}; expected {IMAGEFOLDER_LAYOUT}")
    _, classes = class_index({s: (None, [c for c, _ in per[s]]) for s in per}, splits=("train", "val"))
    if skip_corrupt:
        from PIL import Image

        bad = []
        for s in per:
            keep = []
            for c, p in per[s]:
                try:
                    with Image.open(p) as im:
                        im.verify()
                    keep.append((c, p))
                except (OSError, ValueError, SyntaxError):
                    bad.append(str(p))
            per[s] = keep
        if bad:
            log.warning("skipped %d corrupt image(s) (skip_corrupt): %s%s", len(bad), ", ".join(bad[:5]),
                        " ..." if len(bad) > 5 else "")
    items = {s: [(p, classes.index(c)) for c, p in per[s]] for s in per}
    labels = torch.tensor([y for _, y in items["train"]])
    tr, va = carve_val(len(labels), val_fraction, seed, labels)
    train = FolderDataset([items["train"][i] for i in tr.tolist()], size, train=augment)
    val = FolderDataset([items["train"][i] for i in va.tolist()], size, train=False)
    test = FolderDataset(items["val"], size, train=False)
    return DataBundle("imagefolder", train, val, test, (3, *size), len(classes), "static", classes=classes)
