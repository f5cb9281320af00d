"""Event datasets at full scale: framing parameters, a disk cache of framed samples, augmentations.

A sample is read from its file, cut (gestures), framed into ``[T, P, H, W]`` and stored in the cache
(``$FEWSTEP_CACHE/frames/<dataset>/<key>.npy``). The key hashes the dataset, the file's path, size
and modification time, the cut, and every framing parameter, so a change of any of them never
serves a stale sample. Writes go to a temporary file renamed into place, so two processes can build
the cache at once. :meth:`EventFrames.build_cache` fills it with a progress bar.

Sources: files on disk (:class:`FileSource`) or any Tonic-style dataset whose items are
``(structured events with x, y, t, p, label)`` (:func:`from_tonic`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .archive import cache_dir
from .events import EventFileError, check_events, make_events

CUT_TOLERANCE_US = 100_000  # a labelled cut may overhang the recorded events by 100 ms
from .frames import to_frames


@dataclass(frozen=True)
class Framing:
    """How events become frames.

    T: number of frames. by: ``"time"`` (equal-time bins) or ``"count"`` (equal event counts).
    size: ``(H, W)`` to rescale coordinates to (e.g. ``(48, 48)``), or None for the sensor size.
    polarities: 2 (ON/OFF channels) or 1 (merged). binarize: 1 where any event instead of counts.
    window_us: keep only the first ``window_us`` microseconds of each sample (None = all).
    """

    T: int
    by: str = "time"
    size: tuple | None = None
    polarities: int = 2
    binarize: bool = False
    window_us: float | None = None

    def __post_init__(self):
        if int(self.T) < 1:
            raise ValueError(f"framing needs T >= 1, got {self.T}")
        if self.by not in ("time", "count"):
            raise ValueError(f"framing 'by' must be 'time' or 'count', got {self.by!r}")
        if self.polarities not in (1, 2):
            raise ValueError(f"polarities must be 1 or 2, got {self.polarities}")
        if self.size is not None:
            object.__setattr__(self, "size", tuple(int(s) for s in self.size))

    def shape(self, sensor_size) -> tuple:
        h, w = self.size if self.size else (sensor_size[1], sensor_size[0])
        return (self.T, self.polarities, h, w)


def frame_events(events: np.ndarray, sensor_size, f: Framing, source: str = "events") -> np.ndarray:
    """``events`` from a ``sensor_size = (W, H)`` sensor → ``[T, P, H', W']`` float32 per :class:`Framing`."""
    w, h = int(sensor_size[0]), int(sensor_size[1])
    ev = check_events(events, (w, h), source)
    if f.window_us is not None and len(ev):
        ev = ev[ev["t"] < ev["t"].min() + f.window_us]
    if f.size is not None:
        H, W = f.size
        ev = make_events(ev["x"].astype(np.int64) * W // w, ev["y"].astype(np.int64) * H // h, ev["t"], ev["p"])
        w, h = W, H
    if f.by == "time":
        return to_frames(ev, (w, h), f.T, f.binarize, f.polarities, source)
    frames = np.zeros((f.T, f.polarities, h, w), np.float32)
    n = len(ev)
    if n:
        b = np.arange(n, dtype=np.int64) * f.T // n
        p = ev["p"].astype(np.int64) if f.polarities == 2 else np.zeros(n, np.int64)
        flat = ((b * f.polarities + p) * h + ev["y"].astype(np.int64)) * w + ev["x"].astype(np.int64)
        frames = np.bincount(flat, minlength=frames.size).reshape(frames.shape).astype(np.float32)
        if f.binarize:
            frames = (frames > 0).astype(np.float32)
    return frames


@dataclass(frozen=True)
class Item:
    """One sample: a file, its label, and optionally a time cut ``[start_us, end_us)``."""

    path: str
    label: int
    start_us: int | None = None
    end_us: int | None = None


class FileSource:
    """Samples stored as files, decoded by a reader from :data:`READERS` (by name, so it pickles)."""

    def __init__(self, items: list[Item], reader: str, sensor_size):
        if reader not in READERS:
            raise ValueError(f"unknown event reader {reader!r}; valid: {sorted(READERS)}")
        self.items, self.reader, self.sensor_size = list(items), reader, tuple(sensor_size)
        self._last = (None, None)

    def __len__(self):
        return len(self.items)

    def label(self, i) -> int:
        return self.items[i].label

    def ident(self, i) -> str:
        it = self.items[i]
        st = os.stat(it.path)
        return (f"{os.path.abspath(it.path)}|{st.st_size}|{st.st_mtime_ns}|{it.start_us}|{it.end_us}|{self.reader}|"
                f"{self.sensor_size}")

    def events(self, i) -> np.ndarray:
        it = self.items[i]
        st = os.stat(it.path)
        stamp = (it.path, st.st_size, st.st_mtime_ns)  # a rewritten file is read again
        if self._last[0] != stamp:  # gestures of one recording are read once in a row
            self._last = (stamp, READERS[self.reader](it.path, self.sensor_size))
        ev = self._last[1]
        if it.start_us is not None:
            t0, t1 = (int(ev["t"].min()), int(ev["t"].max())) if len(ev) else (0, -1)
            if it.start_us < t0 - CUT_TOLERANCE_US or it.end_us > t1 + CUT_TOLERANCE_US:
                raise EventFileError(f"{it.path}: labelled cut [{it.start_us}, {it.end_us}) µs lies outside the "
                                     f"recording's events [{t0}, {t1}] µs (check its labels file)")
            ev = ev[(ev["t"] >= it.start_us) & (ev["t"] < it.end_us)]
        return ev

    def describe(self, i) -> str:
        it = self.items[i]
        return it.path if it.start_us is None else f"{it.path} [{it.start_us}, {it.end_us}) µs"


class TonicSource:
    """Any indexable dataset whose items are ``(events, label)`` with events carrying x, y, t, p."""

    def __init__(self, dataset, sensor_size, name: str):
        self.dataset, self.sensor_size, self.name = dataset, tuple(sensor_size[:2]), name

    def __len__(self):
        return len(self.dataset)

    def _item(self, i):
        return self.dataset[i]

    def label(self, i) -> int:
        return int(self._item(i)[1])

    def ident(self, i) -> str:
        return f"tonic:{self.name}:{i}"

    def events(self, i) -> np.ndarray:
        ev = self._item(i)[0]
        return make_events(ev["x"], ev["y"], ev["t"], np.asarray(ev["p"]).astype(np.int64))

    def describe(self, i) -> str:
        return f"{self.name}[{i}]"


class EventAugment:
    """Training augmentations on frames ``[T, P, H, W]``: a random translation shared by all frames
    (up to ``max_shift`` pixels, zero fill), horizontal flip (only where it keeps the label valid), and
    event drop (each event kept with probability 1 − ``drop``: binomial thinning of the counts)."""

    def __init__(self, max_shift: int = 0, flip: bool = False, drop: float = 0.0):
        if not 0.0 <= drop < 1.0:
            raise ValueError(f"event drop must be in [0, 1), got {drop}")
        self.max_shift, self.flip, self.drop = int(max_shift), bool(flip), float(drop)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop:
            x = torch.binomial(x, torch.full_like(x, 1 - self.drop))
        if self.max_shift:
            dy, dx = torch.randint(-self.max_shift, self.max_shift + 1, (2,)).tolist()
            out = torch.zeros_like(x)
            H, W = x.shape[-2:]
            out[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
                x[..., max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
            x = out
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x


class EventFrames(Dataset):
    """Framed samples of a source, cached on disk (and optionally in memory); ``view`` makes splits."""

    def __init__(self, name: str, source, framing: Framing, cache: bool = True, memory: bool = False,
                 index=None, transform=None, split: str | None = None):
        self.name, self.source, self.framing = name, source, framing
        self.cache, self.transform, self.split = cache, transform, split
        self.index = torch.arange(len(source)) if index is None else torch.as_tensor(index)
        self._memory = {} if memory else None
        self._dir = cache_dir() / "frames" / name
        self._fkey = json.dumps(asdict(framing), sort_keys=True)

    @property
    def y(self) -> torch.Tensor:
        return torch.tensor([self.source.label(int(j)) for j in self.index], dtype=torch.long)

    def view(self, index, transform=None, split=None) -> "EventFrames":
        v = copy.copy(self)  # shares the source and the in-memory store
        v.index = self.index[torch.as_tensor(index)]
        v.transform, v.split = transform, split
        return v

    def __len__(self):
        return len(self.index)

    def _path(self, j: int) -> Path:
        key = hashlib.sha1(f"{self.name}|{self.source.ident(j)}|{self._fkey}".encode()).hexdigest()
        return self._dir / f"{key}.npy"

    def frames(self, j: int) -> np.ndarray:
        if self._memory is not None and j in self._memory:
            return self._memory[j]
        path = self._path(j) if self.cache else None
        if path is not None and path.is_file():
            x = np.load(path)
        else:
            x = frame_events(self.source.events(j), self.source.sensor_size, self.framing, self.source.describe(j))
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npy")
                np.save(tmp, x)
                os.replace(tmp, path)
        if self._memory is not None:
            self._memory[j] = x
        return x

    def __getitem__(self, i):
        j = int(self.index[i])
        x = torch.from_numpy(self.frames(j))
        if self.transform is not None:
            x = self.transform(x)
        return x, self.source.label(j)

    def build_cache(self, desc: str | None = None) -> None:
        """Frame every sample not yet cached, with a progress bar."""
        from tqdm.auto import tqdm

        todo = [int(j) for j in self.index if not (self.cache and self._path(int(j)).is_file())
                and not (self._memory is not None and int(j) in self._memory)]
        for j in tqdm(todo, desc=desc or f"framing {self.name}", leave=False, disable=None if todo else True):
            self.frames(j)


def from_tonic(dataset, sensor_size, framing: Framing, name: str, cache: bool = True) -> EventFrames:
    """Wrap a Tonic dataset (items ``(events, label)``) into fewstep's framing and cache.

    ``name`` identifies the dataset in the cache: use a different one for different contents.
    """
    return EventFrames(name, TonicSource(dataset, sensor_size, name), framing, cache=cache)


def _read_cifar10dvs(path, sensor_size):
    """CIFAR10-DVS (AEDAT 2.0, DVS128), reoriented as the reference MATLAB reader does:
    ``x = 127 − y_raw``, ``y = 127 − x_raw``, ``p = 1 − p_raw``."""
    from .aedat import read_aedat2

    ev = read_aedat2(path, (128, 128))
    return make_events(127 - ev["y"].astype(np.int64), 127 - ev["x"].astype(np.int64), ev["t"], 1 - ev["p"])


def _read_nmnist(path, sensor_size):
    from .events import read_nmnist

    return read_nmnist(path, sensor_size)


def _read_aedat31(path, sensor_size):
    from .aedat import read_aedat31

    return read_aedat31(path, sensor_size)


def _read_aedat2(path, sensor_size):
    from .aedat import read_aedat2

    return read_aedat2(path, sensor_size)


def _read_aedat4(path, sensor_size):
    from .aedat import read_aedat4

    return read_aedat4(path, sensor_size)


def _read_numpy(path, sensor_size):
    from .events import read_numpy

    return read_numpy(path, sensor_size)


# a recording's format by its file suffix (``.aedat``: AEDAT 2.0 or 3.1, by its header's version line)
SUFFIX_READERS = {".bin": "nmnist", ".bs2": "nmnist", ".aedat4": "aedat4", ".npy": "numpy", ".npz": "numpy"}
RECORDING_SUFFIXES = (".aedat", ".aedat4", ".bin", ".bs2", ".npy", ".npz")


FORMATS = ("N-MNIST's 40-bit binary events (.bin, .bs2), AEDAT 2.0 (DVS128 addresses) or 3.1 (.aedat), AEDAT 4 "
           "(.aedat4, with the aedat package), numpy arrays x, y, t, p (.npy, .npz)")


def recordings_in(folder) -> list[Path]:
    """The recordings directly in ``folder`` (files ending in :data:`RECORDING_SUFFIXES`), in name order."""
    return sorted(f for f in Path(folder).iterdir() if f.is_file() and f.suffix.lower() in RECORDING_SUFFIXES)


def reader_for(path) -> str:
    """The reader of a recording of any format fewstep reads: by its suffix, and for ``.aedat`` by the version
    line its header starts with (``#!AER-DAT2.0`` or ``#!AER-DAT3.1``)."""
    path = os.fspath(path)
    suffix = Path(path).suffix.lower()
    if suffix in SUFFIX_READERS:
        return SUFFIX_READERS[suffix]
    if suffix != ".aedat":
        raise EventFileError(f"{path}: fewstep does not know the format of {suffix or 'suffix-less'} files; it reads "
                             f"{FORMATS}")
    with open(path, "rb") as f:
        head = f.read(16)
    for version, reader in ((b"#!AER-DAT2", "aedat2"), (b"#!AER-DAT3", "aedat31"), (b"#!AER-DAT4", "aedat4")):
        if head.startswith(version):
            return reader
    raise EventFileError(f"{path}: no '#!AER-DAT2.0' or '#!AER-DAT3.1' version line at the start (it begins "
                         f"{head[:12]!r}): fewstep reads AEDAT 2.0, 3.1 and 4 files, not AEDAT 1.0")


def _read_any(path, sensor_size):
    reader = reader_for(path)
    if reader == "aedat2" and tuple(sensor_size) != (128, 128):
        raise EventFileError(f"{os.fspath(path)}: AEDAT 2.0 files are decoded as DVS128 recordings (128x128), but "
                             f"the sensor is given as {sensor_size[0]}x{sensor_size[1]}; other cameras' AEDAT 2.0 "
                             "address layouts are not read (convert the recording to .npy or AEDAT 3.1)")
    return READERS[reader](path, sensor_size)


READERS = {"nmnist": _read_nmnist, "aedat31": _read_aedat31, "cifar10dvs": _read_cifar10dvs, "aedat2": _read_aedat2,
           "aedat4": _read_aedat4, "numpy": _read_numpy, "auto": _read_any}
