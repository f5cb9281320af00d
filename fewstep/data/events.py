"""Event streams as numpy structured arrays with fields ``x, y, t, p`` (Tonic's convention).

``t`` is in microseconds, ``p`` is 0 (OFF) or 1 (ON). Readers validate what they decode and raise
:class:`EventFileError` naming the file, never return silently wrong events.
"""

from __future__ import annotations

import os

import numpy as np

EVENT_DTYPE = np.dtype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "<i1")])


class EventFileError(ValueError):
    """A corrupt or unexpected event file."""


def make_events(x, y, t, p) -> np.ndarray:
    """Build a structured event array from four equally long sequences."""
    n = len(t)
    if not (len(x) == len(y) == len(p) == n):
        raise ValueError(f"x, y, t, p must have the same length, got {len(x)}, {len(y)}, {n}, {len(p)}")
    ev = np.empty(n, dtype=EVENT_DTYPE)
    ev["x"], ev["y"], ev["t"], ev["p"] = x, y, t, p
    return ev


def check_events(ev: np.ndarray, sensor_size, source: str = "events") -> np.ndarray:
    """Raise if ``ev`` is not a structured event array inside ``sensor_size = (W, H)``."""
    if ev.dtype.names is None or not {"x", "y", "t", "p"} <= set(ev.dtype.names):
        raise EventFileError(f"{source}: expected a structured array with fields x, y, t, p, got dtype {ev.dtype}")
    if len(ev) == 0:
        return ev
    w, h = int(sensor_size[0]), int(sensor_size[1])
    bad = (ev["x"] < 0) | (ev["x"] >= w) | (ev["y"] < 0) | (ev["y"] >= h)
    if bad.any():
        i = int(np.argmax(bad))
        raise EventFileError(
            f"{source}: event {i} at (x={int(ev['x'][i])}, y={int(ev['y'][i])}) lies outside the "
            f"{w}x{h} sensor ({int(bad.sum())} such events)"
        )
    return ev


def decode_nmnist(buf: bytes | np.ndarray, source: str = "buffer", sensor_size=(34, 34)) -> np.ndarray:
    """Decode the N-MNIST / N-Caltech101 40-bit format: per event 5 big-endian bytes
    ``x:8 | y:8 | p:1 | t:23`` (microseconds)."""
    a = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.astype(np.uint8, copy=False)
    if a.size % 5:
        raise EventFileError(
            f"{source}: size {a.size} bytes is not a multiple of 5 (the N-MNIST format stores 5 bytes per event); "
            "the file is truncated or not in this format"
        )
    a = a.reshape(-1, 5).astype(np.int64)
    t = ((a[:, 2] & 0x7F) << 16) | (a[:, 3] << 8) | a[:, 4]
    ev = make_events(a[:, 0], a[:, 1], t, a[:, 2] >> 7)
    return check_events(ev, sensor_size, source)


def read_nmnist(path: "str | os.PathLike", sensor_size=(34, 34)) -> np.ndarray:
    """Read one N-MNIST ``.bin`` / ``.bs2`` recording (see :func:`decode_nmnist`)."""
    path = os.fspath(path)
    check_event_file(path)
    with open(path, "rb") as f:
        return decode_nmnist(f.read(), path, sensor_size)


def check_event_file(path: str) -> None:
    """A missing or empty (0-byte) event file is an error naming it: an empty recording is not data."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"event file not found: {path}")
    if os.path.getsize(path) == 0:
        raise EventFileError(f"{path} is empty (0 bytes), not a recording: a failed or interrupted copy? "
                             "Copy it again or remove it from the dataset folder")


def encode_nmnist(ev: np.ndarray) -> bytes:
    """Inverse of :func:`decode_nmnist` (x, y < 256, t < 2**23 µs)."""
    x, y, t, p = (ev[k].astype(np.int64) for k in ("x", "y", "t", "p"))
    if len(ev) and (x.min() < 0 or x.max() > 255 or y.min() < 0 or y.max() > 255 or t.min() < 0 or t.max() >= 1 << 23):
        raise ValueError("events do not fit the 40-bit N-MNIST format (x, y in 0..255, t in 0..2**23-1)")
    out = np.empty((len(ev), 5), dtype=np.uint8)
    out[:, 0], out[:, 1] = x, y
    out[:, 2] = (p.astype(np.int64) << 7) | (t >> 16)
    out[:, 3], out[:, 4] = (t >> 8) & 0xFF, t & 0xFF
    return out.tobytes()


def write_nmnist(path: "str | os.PathLike", ev: np.ndarray) -> None:
    with open(path, "wb") as f:
        f.write(encode_nmnist(ev))


def read_numpy(path: "str | os.PathLike", sensor_size=None) -> np.ndarray:
    """Events saved with numpy. ``.npy``: a structured array with fields ``x, y, t, p`` (Tonic's layout; any field
    order, any integer widths); ``.npz``: those four arrays by name, or one such structured array. ``t`` must be
    whole microseconds (integers); ``p`` 0/1, boolean, or -1/+1 (read as 0/1). Events are put in time order
    (stable) if they are not. Loaded with ``allow_pickle=False``."""
    import zipfile

    path = os.fspath(path)
    check_event_file(path)
    expect = ("a structured array with fields x, y, t, p (Tonic's layout) in a .npy, or an .npz holding the "
              "arrays x, y, t, p")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise EventFileError(f"{path}: not a readable numpy file ({exc}); expected {expect}") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            keys = list(data.files)
            if {"x", "y", "t", "p"} <= set(keys):
                cols = {k: data[k] for k in ("x", "y", "t", "p")}
            elif len(keys) == 1 and data[keys[0]].dtype.names:
                arr = data[keys[0]]
                cols = None
            else:
                raise EventFileError(f"{path}: holds the arrays {', '.join(keys) or 'none'}; expected {expect}")
    else:
        arr, cols = data, None
    if cols is None:
        if arr.dtype.names is None or not {"x", "y", "t", "p"} <= set(arr.dtype.names):
            raise EventFileError(f"{path}: array of dtype {arr.dtype} (shape {arr.shape}); expected {expect}")
        cols = {k: arr[k] for k in ("x", "y", "t", "p")}
    cols = {k: np.asarray(v) for k, v in cols.items()}
    n = len(cols["t"]) if cols["t"].ndim == 1 else -1
    if any(v.ndim != 1 or len(v) != n for v in cols.values()):
        raise EventFileError(f"{path}: x, y, t, p must be 1-D and equally long, got shapes "
                             f"{', '.join(f'{k} {v.shape}' for k, v in cols.items())}")
    for k in ("x", "y", "t"):
        if not np.issubdtype(cols[k].dtype, np.integer):
            unit = " (whole microseconds; seconds? multiply by 1e6 and round)" if k == "t" else ""
            raise EventFileError(f"{path}: {k} has dtype {cols[k].dtype}; expected integers{unit}")
    p = cols["p"]
    if p.dtype == bool:
        p = p.astype(np.int64)
    elif not np.issubdtype(p.dtype, np.integer):
        raise EventFileError(f"{path}: p has dtype {p.dtype}; expected 0/1, booleans or -1/+1")
    else:
        values = set(np.unique(p).tolist())
        if values <= {-1, 1}:
            p = (p > 0).astype(np.int64)
        elif not values <= {0, 1}:
            raise EventFileError(f"{path}: p takes the values {sorted(values)[:6]}; expected 0/1, booleans or -1/+1")
    ev = make_events(cols["x"], cols["y"], cols["t"], p)
    if n > 1 and (np.diff(ev["t"]) < 0).any():
        ev = ev[np.argsort(ev["t"], kind="stable")]
    return check_events(ev, sensor_size, path) if sensor_size is not None else ev
