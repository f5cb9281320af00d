"""Static image datasets read from local folders (fewstep never downloads).

Small sets are decoded once into a ``uint8`` cache (keyed by the source's files, so it is rebuilt
when they change) and held in memory: ``cifar10``, ``cifar100``, ``fashion_mnist``,
``tiny_imagenet``. Large sets in ImageNet's layout (``imagefolder``) are decoded per sample in the
DataLoader's workers, with random-resized-crop + flip for training and resize + centre-crop for
evaluation. Every loader carves its validation split from the training data with the run's seed;
the official test (or val) split is the test split. Layouts: ``docs/datasets.md``.

Bad input is named: a folder in none of the known layouts (where fewstep looked, which layouts it
accepts), a corrupt or truncated image (its path; with ``skip_corrupt=True`` it is skipped and the
count is logged), class folders that differ between splits.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .archive import cache_dir
from .datasets import DataBundle, carve_val, register

log = logging.getLogger("fewstep")

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------ decoding
def decode_image(data: "bytes | Path", name: str = "", mode: str = "RGB") -> np.ndarray:
    """``uint8 [H, W, C]`` of an image file or its bytes; a corrupt or truncated image raises a ValueError
    naming it."""
    from PIL import Image

    try:
        src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else open(data, "rb")
        with src, Image.open(src) as im:
            im.load()  # decode now: a truncated file fails here, not later
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"corrupt or truncated image {name or data}: {exc}") from None


def _decode_members(members, desc: str, skip_corrupt: bool, mode: str = "RGB", size=None):
    """members: iterable of ``(split, class, bytes_or_path, name)`` → ``{split: (x uint8 [N,H,W,C], classes)}``."""
    from tqdm.auto import tqdm

    acc: dict = {}
    skipped: list[str] = []
    for split, cls, data, name in tqdm(members, desc=desc, leave=False, disable=None):
        try:
            a = decode_image(data, name, mode)
        except ValueError:
            if not skip_corrupt:
                raise
            skipped.append(name)
            continue
        if size is not None and a.shape[:2] != tuple(size):
            raise ValueError(f"image {name} is {a.shape[1]}x{a.shape[0]} pixels; this dataset's images are "
                             f"{size[1]}x{size[0]}")
        acc.setdefault(split, ([], []))
        acc[split][0].append(a)
        acc[split][1].append(cls)
    if skipped:
        log.warning("skipped %d corrupt image(s) (skip_corrupt): %s%s", len(skipped), ", ".join(skipped[:5]),
                    " ..." if len(skipped) > 5 else "")
    return {s: (np.stack(xs), cs) for s, (xs, cs) in acc.items()}, len(skipped)


def class_index(per_split: dict, splits=("train", "test")) -> tuple[dict, list[str]]:
    """Class names → labels (sorted names), refusing class folders that differ between the splits."""
    names = {s: sorted(set(per_split[s][1])) for s in splits}
    first = names[splits[0]]
    for s in splits[1:]:
        if names[s] != first:
            only_a, only_b = sorted(set(first) - set(names[s])), sorted(set(names[s]) - set(first))
            raise ValueError(f"class folders differ between {splits[0]} and {s}: only in {splits[0]}: "
                             f"{only_a[:5]}, only in {s}: {only_b[:5]}")
    out = {s: (per_split[s][0], np.array([first.index(c) for c in per_split[s][1]], dtype=np.int64)) for s in splits}
    return out, first


def _class_files(folder: Path) -> list[tuple[str, Path]]:
    return [(p.parent.name, p) for p in sorted(folder.glob("*/*")) if p.suffix.lower() in IMAGE_EXTS and p.is_file()]


# ------------------------------------------------------------------------------------------ cache
def _fingerprint(sources) -> str:
    """Files: their path, size and mtime. Folders: the same for every file under them (so an edit, a new
    image or a removed one all change it)."""
    h = hashlib.sha1()
    for source in sources:
        h.update(str(source.resolve()).encode())
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for p in files:
            st = p.stat()
            h.update(f"|{p.relative_to(source) if p != source else ''}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cached(tag: str, source: "Path | list[Path]", build, extra: str = ""):
    """Decode once: ``build()`` → ``({split: (x, y)}, classes)`` kept as ``.npz`` in the cache, keyed by the
    fingerprint of the source files or folders (``extra`` adds the options that change the result)."""
    fp = _fingerprint(source if isinstance(source, list) else [source])
    key = fp if not extra else hashlib.sha1((fp + extra).encode()).hexdigest()[:16]
    path = cache_dir() / f"{tag}-{key}.npz"
    if path.is_file():
        with np.load(path) as z:
            splits = [str(s) for s in z["splits"]]
            return {s: (z[f"x_{s}"], z[f"y_{s}"]) for s in splits}, [str(c) for c in z["classes"]]
    arrays, classes = build()
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, splits=np.array(list(arrays)), classes=np.array(classes),
             **{f"x_{s}": x for s, (x, _) in arrays.items()}, **{f"y_{s}": y for s, (_, y) in arrays.items()})
    os.replace(tmp, path)
    return arrays, classes


# ------------------------------------------------------------------------------------------ tensors
class Augment:
    """Pad-and-crop, horizontal flip and optional cutout on a ``[C, H, W]`` tensor."""

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


def batch_augment(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """:class:`Augment` on a whole normalised batch ``[N, C, H, W]`` at once, on its device: a random
    pad-and-crop offset, flip and cutout square per sample, drawn from ``generator`` (on that device)."""
    n, c, h, w = x.shape
    dev = x.device
    if aug.pad:
        p = aug.pad
        xp = torch.nn.functional.pad(x, (p,) * 4)
        off = torch.randint(0, 2 * p + 1, (2, n), device=dev, generator=generator)
        rows = (off[0][:, None] + torch.arange(h, device=dev))[:, None, :, None]  # [N, 1, H, 1]
        cols = (off[1][:, None] + torch.arange(w, device=dev))[:, None, None, :]  # [N, 1, 1, W]
        x = xp[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
               rows, cols]
    if aug.flip:
        flip = torch.rand(n, device=dev, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if aug.cutout:
        cy = torch.randint(0, h, (n,), device=dev, generator=generator)[:, None, None]
        cx = torch.randint(0, w, (n,), device=dev, generator=generator)[:, None, None]
        r = aug.cutout // 2
        yy, xx = torch.arange(h, device=dev)[None, :, None], torch.arange(w, device=dev)[None, None, :]
        hole = (yy >= cy - r) & (yy < cy + r) & (xx >= cx - r) & (xx < cx + r)
        x = x.masked_fill(hole[:, None], 0.0)
    return x


class ImageTensors(Dataset):
    """Rows ``index`` of ``uint8`` images ``[N, C, H, W]`` held in memory (a quarter of float32's size),
    normalised as they are read. Two ways to read them, giving the same tensors without augmentation:
    ``ds[i]`` (one sample, per-sample :class:`Augment`: the DataLoader path) and :meth:`batch` (a whole
    batch moved to the training device, then normalised and augmented there: the fast path)."""

    def __init__(self, images: torch.Tensor, y: torch.Tensor, mean, std, index=None, augment: "Augment | None" = None,
                 split: "str | None" = None):
        self.images, self.y, self.augment, self.split = images, y, augment, split
        c = images.shape[1]
        self.mean, self.std = torch.tensor(mean).view(c, 1, 1), torch.tensor(std).view(c, 1, 1)
        self.index = torch.arange(len(y)) if index is None else torch.as_tensor(index)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        j = int(self.index[i])
        x = ((self.images[j].float() / 255.0) - self.mean) / self.std
        if self.augment is not None:
            x = self.augment(x)
        return x, self.y[j]

    def batch(self, positions: torch.Tensor, device, generator: "torch.Generator | None" = None):
        """Samples ``positions`` (of this split) as one batch on ``device``; augmented with ``generator``
        (a generator on ``device``) when this split augments."""
        j = self.index[positions]
        x = self.images[j].to(device, non_blocking=True).float()
        x = ((x / 255.0) - self.mean.to(device)) / self.std.to(device)
        if self.augment is not None and generator is not None:
            x = batch_augment(x, self.augment, generator)
        return x, self.y[j].to(device, non_blocking=True)


def _bundle(name, arrays, classes, mean, std, val_fraction, seed, augment, cutout, pad=4, flip=True) -> DataBundle:
    """In-memory ``uint8`` images from ``[N, H, W, C]`` arrays, normalised when read; validation carved from train."""
    def prep(x):
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()

    xtr, ytr = prep(arrays["train"][0]), torch.from_numpy(np.asarray(arrays["train"][1])).long()
    xte, yte = prep(arrays["test"][0]), torch.from_numpy(np.asarray(arrays["test"][1])).long()
    tr, va = carve_val(len(ytr), val_fraction, seed, ytr)
    aug = Augment(pad=pad, flip=flip, cutout=cutout) if augment else None
    return DataBundle(name, ImageTensors(xtr, ytr, mean, std, tr, aug), ImageTensors(xtr, ytr, mean, std, va),
                      ImageTensors(xte, yte, mean, std), tuple(xtr.shape[1:]), len(classes), "static",
                      classes=list(classes))


def _root(root) -> Path:
    return Path(os.path.expanduser(str(root)))


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
    return _bundle("cifar10", arrays, classes, CIFAR_MEAN, CIFAR_STD, val_fraction, seed, augment, cutout)


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
            return _bundle("cifar100", arrays, classes, CIFAR100_MEAN, CIFAR100_STD, val_fraction, seed, augment,
                           cutout)
    for cand in (root, root / "cifar100"):
        if (cand / "train").is_dir() and (cand / "test").is_dir():
            if coarse:
                raise ValueError("coarse labels need the pickle layout (cifar-100-python/meta names the superclasses); "
                                 f"the image folders under {cand} carry only their class names")
            arrays, classes = _folder_arrays("cifar100", cand, skip_corrupt)
            return _bundle("cifar100", arrays, classes, CIFAR100_MEAN, CIFAR100_STD, val_fraction, seed, augment,
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
    return _bundle("fashion_mnist", arrays, FASHION_CLASSES, FASHION_MEAN, FASHION_STD, val_fraction, seed, augment,
                   cutout, pad=2)


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
    return _bundle("tiny_imagenet", arrays, classes, IMAGENET_MEAN, IMAGENET_STD, val_fraction, seed, augment, cutout,
                   pad=8)


# ------------------------------------------------------------------------------------------ image folders
IMAGEFOLDER_LAYOUT = "{train,val}/<class>/*.jpg|*.jpeg|*.png (ImageNet's layout; val is the test split)"


class FolderDataset(Dataset):
    """Images decoded per sample (in the DataLoader's workers): random-resized-crop + flip when
    ``train``, else resize of the shorter side to size/0.875 and a centre crop; normalised."""

    def __init__(self, items: list, size, train: bool, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.items, self.size, self.train = items, tuple(size), train
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        self.split = None

    def __len__(self):
        return len(self.items)

    def _crop(self, im):
        from PIL import Image

        h, w = self.size
        W, H = im.size
        if self.train:  # random-resized-crop: area 8–100 %, aspect 3/4–4/3 (10 tries, then the centre)
            for _ in range(10):
                area = W * H * float(torch.empty(()).uniform_(0.08, 1.0))
                logr = torch.empty(()).uniform_(np.log(3 / 4), np.log(4 / 3))
                ratio = float(torch.exp(logr))
                cw, ch = int(round((area * ratio) ** 0.5)), int(round((area / ratio) ** 0.5))
                if 0 < cw <= W and 0 < ch <= H:
                    x0 = int(torch.randint(0, W - cw + 1, ()))
                    y0 = int(torch.randint(0, H - ch + 1, ()))
                    im = im.resize((w, h), Image.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
                    return im.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(()) < 0.5 else im
        scale = max(h, w) / 0.875 / min(W, H)
        im = im.resize((max(w, int(round(W * scale))), max(h, int(round(H * scale)))), Image.BILINEAR)
        W, H = im.size
        x0, y0 = (W - w) // 2, (H - h) // 2
        return im.crop((x0, y0, x0 + w, y0 + h))

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.items[i]
        try:
            with Image.open(path) as im:
                im = self._crop(im.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:
            raise ValueError(f"corrupt or truncated image {path}: {exc}") from None
        x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
        return (x - self.mean) / self.std, label


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
