"""What every static image dataset of :mod:`fewstep.data.images` is made of.

Decoding (a corrupt or truncated image raises naming it), the class index of a folder tree, the
decode cache (``uint8`` arrays in ``.npz``, keyed by the fingerprint of the source files), in-memory
image tensors normalised as they are read, with per-sample and whole-batch augmentation, and the
per-sample dataset of large image folders. The dataset families themselves (their layouts, where
they are looked for, their statistics) live in :mod:`fewstep.data.images`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .archive import cache_dir
from .datasets import DataBundle, carve_val

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


def image_bundle(name, arrays, classes, mean, std, val_fraction, seed, augment, cutout, pad=4, flip=True) -> DataBundle:
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
