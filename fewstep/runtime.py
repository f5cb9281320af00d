"""Process-level settings for CPU training and inference.

:func:`tune_cpu_allocator`. A multi-step SNN folds time into the batch, so its activations are
``T·N·C·H·W`` floats: 32 and 64 MiB for the widest layers of the issue-4 CNN (T = 4, batch 32),
several per layer and training step. glibc's ``malloc`` hands every request above its mmap
threshold (it adapts, but never beyond 32 MiB) fresh ``mmap`` pages and unmaps them on ``free``,
so each such buffer costs page faults and kernel page-zeroing on every step. Raising the threshold
(and the trim threshold, so the freed top of the heap is kept) lets those buffers be recycled.
fewstep's own kernels already avoid most of this (the fused LIF keeps one-step buffers), so the
gain is modest. Measured with ``bench/train_step.py`` on a 2-core CPU (fewstep, one training step):

=================================  =========  ============
malloc                              s / step   peak RSS MB
=================================  =========  ============
glibc defaults                        0.68         689
this function (64 MiB threshold)      0.64         894
=================================  =========  ============

(On the CIFAR-10 VGG of ``configs/cifar10_vgg_cpu.yaml`` the gain was 1.69×, docs/performance.md.)
Streaming inference suffers more: early exit changes the batch size from step to step, and with
glibc's defaults the heap is trimmed and mapped again over and over (about 27,000 page faults per
pass of the N-MNIST benchmark, docs/anytime.md). :func:`tune_for_device` applies the tuning when
the device is the CPU.

It trades memory for time: a heap fragments, and memory freed after the peak stays with the
process. The Trainer calls it when it trains on the CPU (``train.tune_malloc``), and so do the
inference commands of the CLI (``eval``, ``cutoff``, ``tradeoff``, ``stream``, ``energy``) and the
benchmarks; a library caller decides for its own process. ``FEWSTEP_TUNE_MALLOC=0`` makes it a
no-op everywhere and ``FEWSTEP_MALLOC_MMAP_MB=<MiB>`` sets the threshold. It does nothing where the
C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger("fewstep")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
DEFAULT_MMAP_THRESHOLD_MB = 64
_applied: dict = {}


def tune_cpu_allocator(mmap_threshold_mb: "int | None" = None) -> bool:
    """Let glibc recycle CPU buffers up to ``mmap_threshold_mb`` MiB (default 64, or
    ``$FEWSTEP_MALLOC_MMAP_MB``); True if the setting is in force. Process-wide; idempotent.
    ``FEWSTEP_TUNE_MALLOC=0`` makes it a no-op."""
    if os.environ.get("FEWSTEP_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    if mmap_threshold_mb is None:
        env = os.environ.get("FEWSTEP_MALLOC_MMAP_MB", "")
        if env and not env.isdigit():
            raise ValueError(f"FEWSTEP_MALLOC_MMAP_MB must be a whole number of MiB, got {env!r}")
        mmap_threshold_mb = int(env) if env else DEFAULT_MMAP_THRESHOLD_MB
    if mmap_threshold_mb in _applied:
        return _applied[mmap_threshold_mb]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            if hasattr(libc, "gnu_get_libc_version"):
                ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold_mb) << 20)) and bool(
                    libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))
        except (OSError, AttributeError) as exc:
            log.debug("fewstep: malloc tuning skipped (%s)", exc)
    _applied.clear()
    _applied[mmap_threshold_mb] = ok
    return ok


def tune_for_device(device) -> bool:
    """:func:`tune_cpu_allocator` when ``device`` (a name such as ``"cpu"`` or ``"cuda:0"``, or a
    ``torch.device``) is the CPU; False, and nothing changed, for any other device."""
    kind = device.type if hasattr(device, "type") else str(device or "cpu").split(":")[0].strip().lower()
    return tune_cpu_allocator() if kind == "cpu" else False


def allocator_status() -> str:
    """One line for logs and benchmarks."""
    if not _applied:
        return "malloc defaults"
    (mb, ok), = _applied.items()
    return f"malloc mmap threshold {mb} MiB" if ok else "malloc defaults (tuning unavailable)"
