"""Framing events into ``[T, P, H, W]`` tensors of per-polarity event counts.

Equal-time bins (METHODS §0): with ``t0 = t.min()``, ``span = t.max() - t0``, an event goes to bin
``min(floor((t - t0) / span · T), T - 1)``. The last bin is closed, so **every** event lands in a
frame (``frames.sum() == len(events)`` unless ``binarize``). Empty bins are fine (all zero). If
all events share one timestamp they all fall in bin 0.
"""

from __future__ import annotations

import numpy as np

from .events import check_events


def to_frames(events: np.ndarray, sensor_size, n_bins: int, binarize: bool = False, polarities: int = 2,
              source: str = "events") -> np.ndarray:
    """Frame ``events`` on a ``sensor_size = (W, H)`` sensor into ``[n_bins, polarities, H, W]`` float32."""
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    w, h = int(sensor_size[0]), int(sensor_size[1])
    check_events(events, (w, h), source)
    frames = np.zeros((n_bins, polarities, h, w), dtype=np.float32)
    if len(events) == 0:
        return frames
    p = events["p"].astype(np.int64)
    if polarities == 1:
        p = np.zeros_like(p)
    elif p.min() < 0 or p.max() >= polarities:
        raise ValueError(f"{source}: polarity values {sorted(set(np.unique(p).tolist()))} do not fit {polarities} channels")
    t = events["t"].astype(np.int64)
    t0, span = t.min(), t.max() - t.min()
    if span == 0:
        b = np.zeros(len(t), dtype=np.int64)
    else:
        b = np.minimum(((t - t0) * n_bins) // span, n_bins - 1)
    flat = ((b * polarities + p) * h + events["y"].astype(np.int64)) * w + events["x"].astype(np.int64)
    counts = np.bincount(flat, minlength=frames.size)
    frames = counts.reshape(frames.shape).astype(np.float32)
    if binarize:
        frames = (frames > 0).astype(np.float32)
    return frames
