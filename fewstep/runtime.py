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

Inference in a fresh process needs a higher threshold than training. A full-T pass folds T and the
evaluation batch into one batch (up to 4096 sample-steps, :data:`fewstep.metrics.MAX_SAMPLE_STEPS`), so a
convolution's output reaches hundreds of MB (411 MB in the Fashion-MNIST ``cnn``'s first layer), and nothing a
training run left in the heap is there to recycle it. ``fewstep eval`` over Fashion-MNIST's 10 000 test
images on a 2-core CPU: 8.0–8.6 s at 64 MiB (2.5–4.2 s of it in the kernel), 6.7–7.0 s at 1 GiB (0.5–0.8 s),
peak RSS 885–1032 against 837–1180 MB (it moves with how the heap fragments); the N-MNIST ``cnn``'s full-T
throughput at batch 100, T = 10: 413 → 826 images/s (docs/performance.md). Training itself gained nothing from
the higher threshold (its heap already holds such buffers), so the Trainer keeps 64 MiB.

It trades memory for time: a heap fragments, and memory freed after the peak stays with the
process. The Trainer calls it when it trains on the CPU (``train.tune_malloc``; 64 MiB), and so do the
inference commands of the CLI (``eval``, ``cutoff``, ``tradeoff``, ``stream``, ``energy``; 1 GiB) and the
benchmarks (as the CLI's inference commands); a library caller decides for its own process.
``FEWSTEP_TUNE_MALLOC=0`` makes it a no-op everywhere and ``FEWSTEP_MALLOC_MMAP_MB=<MiB>`` (1 to 2047:
glibc takes the threshold as a C ``int`` of bytes) sets the threshold for both. It does nothing where the
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
DEFAULT_MMAP_THRESHOLD_MB = 64  # training
INFERENCE_MMAP_THRESHOLD_MB = 1024  # the CLI's inference commands
MAX_MMAP_THRESHOLD_MB = 2047  # mallopt takes the threshold in bytes as a C int
_applied: dict = {}


def tune_cpu_allocator(mmap_threshold_mb: "int | None" = None, default_mb: int = DEFAULT_MMAP_THRESHOLD_MB) -> bool:
    """Let glibc recycle CPU buffers up to ``mmap_threshold_mb`` MiB (else ``$FEWSTEP_MALLOC_MMAP_MB``, else
    ``default_mb``); True if the setting is in force. Process-wide; idempotent.
    ``FEWSTEP_TUNE_MALLOC=0`` makes it a no-op."""
    if os.environ.get("FEWSTEP_TUNE_MALLOC", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    where = "mmap_threshold_mb"
    if mmap_threshold_mb is None:
        env = os.environ.get("FEWSTEP_MALLOC_MMAP_MB", "").strip()
        if env and not env.isdigit():
            raise ValueError(f"FEWSTEP_MALLOC_MMAP_MB must be a whole number of MiB, got {env!r}")
        mmap_threshold_mb, where = (int(env), "FEWSTEP_MALLOC_MMAP_MB") if env else (default_mb, "default_mb")
    if not 1 <= int(mmap_threshold_mb) <= MAX_MMAP_THRESHOLD_MB:
        raise ValueError(f"{where} must be 1 to {MAX_MMAP_THRESHOLD_MB} MiB (glibc takes the threshold in bytes as "
                         f"a C int), got {mmap_threshold_mb}")
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


def tune_for_device(device, inference: bool = False) -> bool:
    """:func:`tune_cpu_allocator` when ``device`` (a name such as ``"cpu"`` or ``"cuda:0"``, or a
    ``torch.device``) is the CPU; False, and nothing changed, for any other device. ``inference=True`` (the
    CLI's inference commands) recycles buffers up to 1 GiB, training's 64 MiB otherwise."""
    kind = device.type if hasattr(device, "type") else str(device or "cpu").split(":")[0].strip().lower()
    if kind != "cpu":
        return False
    return tune_cpu_allocator(default_mb=INFERENCE_MMAP_THRESHOLD_MB if inference else DEFAULT_MMAP_THRESHOLD_MB)


def _usable_cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _busy_seconds() -> "float | None":
    """CPU seconds all cores have spent busy since boot (user, nice, system, irq, softirq and the hypervisor's
    steal, from ``/proc/stat``), or None where there is no ``/proc/stat``."""
    import os

    try:
        with open("/proc/stat") as f:
            head = f.readline().split()
    except OSError:
        return None
    if not head or head[0] != "cpu":
        return None
    v = [int(x) for x in head[1:9]] + [0] * 8
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class OtherWork:
    """How many cores other processes (and the hypervisor's steal) kept busy while the ``with`` block ran:
    ``cores_busy`` (None where ``/proc/stat`` is missing), out of ``cores``. This process's own CPU time is taken
    out, so a command's own work never counts as contention, whatever ran before it."""

    def __enter__(self):
        import time

        self._t, self._busy, self._own = time.perf_counter(), _busy_seconds(), _own_seconds()
        self.cores, self.cores_busy = _usable_cores(), None
        return self

    def __exit__(self, *exc):
        import time

        wall = time.perf_counter() - self._t
        busy = _busy_seconds()
        if self._busy is not None and busy is not None and wall > 0:
            self.cores_busy = max(0.0, (busy - self._busy) - (_own_seconds() - self._own)) / wall
        return False


def other_work(window_s: float = 0.25) -> OtherWork:
    """:class:`OtherWork` over ``window_s`` seconds of this process idling (before a latency-critical start)."""
    import time

    with OtherWork() as w:
        time.sleep(window_s)
    return w


def _room_for(threads: int, cores_busy: float, cores: int) -> bool:
    """Whether ``threads`` threads find a core each, within half a core, beside ``cores_busy`` cores of other work."""
    return cores - cores_busy >= threads - 0.5


def busy_note(threads: int, cores_busy: "float | None", cores: int) -> "str | None":
    """A warning for timed work (``fewstep cutoff``'s wall clock) when other processes kept the cores busy while
    it ran (:class:`OtherWork`): fewer than ``threads`` cores left free, within half a core. None otherwise."""
    if cores_busy is None or _room_for(threads, cores_busy, cores):
        return None
    return (f"other work kept {cores_busy:.1f} of {cores} cores busy while the timing ran ({threads} torch threads): "
            f"the wall-clock figures are noisy and can be far off; time on a quiet machine")


def streaming_threads(requested: "int | str" = "auto", cores_busy=None, cores=None) -> tuple[int, str]:
    """Set and return the torch threads for batch-1 streaming (``fewstep stream``), with the reason.

    A streaming step of a small network is a few dozen small kernels, each an OpenMP parallel region that waits
    for all its threads. When other processes keep the cores busy, a region waits for its other thread's time
    slice: on the 2-core VM, with a training run on both cores, one step of the N-MNIST ``cnn`` at batch 1 took
    0.39–0.42 ms on two threads in most rounds and 68 ms in others (two of eight), and 0.51–0.55 ms on one thread
    in every round (docs/anytime.md, bench/busy_threads.py). On a quiet machine two threads are 1.2–1.3× faster.
    ``"auto"`` therefore measures for a quarter of a second how many cores other processes keep busy
    (:func:`other_work`), keeps torch's thread count while that many cores stay free (within half a core), and
    otherwise uses as many threads as cores are free, at least one. A whole number (int or digits) sets the count. ``cores_busy`` and
    ``cores`` replace the measurement (tests)."""
    import torch

    if requested != "auto":
        if not str(requested).isdigit() or int(requested) < 1:
            raise ValueError(f"--threads must be a whole number >= 1 or auto, got {requested!r}")
        torch.set_num_threads(int(requested))
        return int(requested), "as asked"
    n = torch.get_num_threads()
    if n <= 1:
        return n, "torch's default"
    if cores_busy is None or cores is None:
        w = other_work()
        if w.cores_busy is None:
            return n, "torch's default (this system does not say how busy its cores are)"
        cores_busy = w.cores_busy if cores_busy is None else cores_busy
        cores = w.cores if cores is None else cores
    if _room_for(n, cores_busy, cores):
        return n, "torch's default"
    m = max(1, min(n, round(cores - cores_busy)))
    torch.set_num_threads(m)
    return m, (f"the machine is busy, other work on {cores_busy:.1f} of {cores} cores: with {n} threads a step can "
               f"wait for a time slice; --threads sets the count")


def allocator_status() -> str:
    """One line for logs and benchmarks."""
    if not _applied:
        return "malloc defaults"
    (mb, ok), = _applied.items()
    return f"malloc mmap threshold {mb} MiB" if ok else "malloc defaults (tuning unavailable)"
