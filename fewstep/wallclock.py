"""Wall-clock measurement of early exit: paired, interleaved rounds against running to T, and their spread.

Short passes on a shared machine are dominated by noise, so every figure repeats a pass until it lasts about
``min_seconds`` and interleaves the full-T and early-exit passes round by round; ``full[i] / early_exit[i]`` is
one paired sample of the speed-up, reported as the median with its quartiles (bench/README.md, docs/anytime.md).
The passes themselves are :func:`fewstep.anytime.run_chunks`.
"""

from __future__ import annotations

import statistics
import time

import torch

from . import cutoff as _cutoff
from .anytime import run_chunks
from .neurons import set_step_mode, step_mode_of


def _passes_for(seconds: float, min_seconds: float) -> int:
    """How many passes of ``seconds`` each make about ``min_seconds`` (at least one)."""
    return max(1, int(min_seconds / max(seconds, 1e-6) + 0.999))


def speedup_rounds(model, chunks, policy, T: int, batch_size: int = 64, continuous: bool = True, repeats: int = 5,
                   min_seconds: float = 0.5, graphs: str = "auto") -> tuple[list[float], list[float]]:
    """Seconds per pass over ``chunks`` in each of ``repeats`` interleaved rounds, running to T and with
    early exit by ``policy``: ``(full, early_exit)``, one entry per round.

    Each round repeats the full-T pass until it lasts about ``min_seconds`` (short runs on a shared machine
    are dominated by noise), then the early-exit pass twice as often; round ``i``'s two figures are
    measured back to back, so ``full[i] / early_exit[i]`` is one paired sample of the wall-clock speed-up.
    """
    full = _cutoff.Timestep(T, T=T)
    run = lambda pol: run_chunks(model, chunks, pol, batch_size, continuous, graphs=graphs)[1]  # noqa: E731
    t_once = run(full)
    inner = _passes_for(t_once, min_seconds)
    tf, te = [], []
    for _ in range(repeats):
        tf.append(sum(run(full) for _ in range(inner)) / inner)
        te.append(sum(run(policy) for _ in range(inner * 2)) / (inner * 2))
    return tf, te


def speedup(model, chunks, policy, T: int, batch_size: int = 64, continuous: bool = True, repeats: int = 5,
            min_seconds: float = 0.5, graphs: str = "auto") -> tuple[float, float]:
    """Median seconds per pass over ``chunks`` for running to T and for early exit with ``policy``
    (the medians of :func:`speedup_rounds`)."""
    tf, te = speedup_rounds(model, chunks, policy, T, batch_size, continuous, repeats, min_seconds, graphs)
    return statistics.median(tf), statistics.median(te)


@torch.no_grad()
def multistep_seconds(model, chunks, repeats: int = 5, min_seconds: float = 0.5) -> float:
    """Median seconds per pass over ``chunks`` running all T steps in one multi-step call per chunk, no exit:
    the plain way to run the network to T, the reference a user compares early exit with. On a GPU it beats
    stepping (one launch per layer for all T steps); on the CPU stepping is faster (docs/performance.md).
    The median of ``min(repeats, 3)`` timings, each repeating the pass to about ``min_seconds``."""
    sync = torch.cuda.synchronize if chunks[0].is_cuda else (lambda: None)
    prev, was_training = step_mode_of(model), model.training
    model.eval()
    set_step_mode(model, "m")
    try:
        def once() -> float:
            sync()
            t0 = time.perf_counter()
            for xs in chunks:
                model(xs)
            sync()
            return time.perf_counter() - t0

        first = once()
        n = max(1, min(repeats, 3))  # a reference, not the figure under test: at most 3 timed passes
        if first >= min_seconds:  # a long pass (a big split, a long T): the first counts, no warm-up of its own
            return statistics.median([first] + [once() for _ in range(n - 1)])
        inner = _passes_for(first, min_seconds)
        return statistics.median(sum(once() for _ in range(inner)) / inner for _ in range(n))
    finally:
        set_step_mode(model, prev)
        model.train(was_training)


def spread(full: list[float], early_exit: list[float]) -> dict:
    """The per-round wall-clock speed-ups ``full[i] / early_exit[i]`` of :func:`speedup_rounds` and their
    quartiles: ``{"rounds", "q1", "median", "q3"}`` (with fewer than two rounds all three are the one value)."""
    r = [a / b for a, b in zip(full, early_exit)]
    if not r:
        raise ValueError("spread needs at least one round")
    q = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else [r[0]] * 3
    return {"rounds": r, "q1": q[0], "median": statistics.median(r), "q3": q[2]}
