"""Evaluation: accuracy at every timestep of the running-mean logits, and firing rates.

At step t the prediction is ``argmax Y(t)`` with ``Y(t) = Σ_{k≤t} O(k)`` (same argmax as the
running mean). Firing rate of a spiking layer = mean spike count per neuron per step.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader

from .data import encoding as _encoding
from .neurons import STEP_MODES, reset, set_step_mode, step_mode_of
from .record import SpikeRates, record


def time_first(x: torch.Tensor, kind: str, T: int, encoding: str = "direct", generator=None) -> torch.Tensor:
    """Batch from a loader → ``[T, N, ...]``: encode static images, transpose event frames.

    Raises when event frames carry a different number of steps than ``T``.
    """
    if kind == "static":
        return _encoding.get(encoding)(x, T, generator)
    if x.dim() < 3:
        raise ValueError(f"event frames must be [N, T, ...], got {list(x.shape)}")
    if x.shape[1] != T:
        raise ValueError(f"T mismatch: the data has {x.shape[1]} frames per sample ({list(x.shape)}) but T = {T}")
    return x.transpose(0, 1).contiguous()


def accuracy_per_step(logits: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Accuracy of ``argmax Y(t)`` for t = 1..T from per-step logits ``[T, N, C]``."""
    if logits.dim() != 3:
        raise ValueError(f"expected logits [T, N, C], got {list(logits.shape)}")
    pred = logits.float().cumsum(0).argmax(-1)
    return (pred == y.to(pred.device)).float().mean(1).tolist()


MAX_SAMPLE_STEPS = 4096  # samples × timesteps per forward pass in predict(): T = 4 runs 1024 samples at once


def inference_step_mode(model, device) -> str:
    """How :func:`predict` runs ``model`` on ``device``: ``"s"`` (step through time, the state carried) for a
    fewstep network on the CPU, ``"m"`` (all T steps in one call) otherwise. On the CPU the single-step
    pass gives the same numbers as the multi-step one (every registered model, ``tests/test_models.py``)
    and is 1.0–3.4× faster: a multi-step layer's activations are ``[T·n, ...]``, which leave the caches
    (2026-12-04, 2 cores: converted ``cnn`` at T = 64 3.4×, N-MNIST ``cnn`` 1.7–2.0×, ``resnet20`` 1.8×,
    ``vggsnn`` 1.1×). On a GPU one multi-step call is faster (bench/README.md)."""
    from .models.registry import SNN

    return "s" if torch.device(device).type == "cpu" and isinstance(model, SNN) else "m"


def _forward(model, x: torch.Tensor, mode: str, tally=None) -> torch.Tensor:
    """``model`` over ``x[T, n, ...]`` in ``mode``; ``tally()`` after every call (each step, single-step), so a
    recorder's spikes are counted and dropped step by step instead of kept for all T."""
    if mode == "m":
        out = model(x)
        if tally is not None:
            tally()
        return out
    reset(model)  # (a single-step network carries its state from one frame to the next)
    outs = []
    for xt in x:
        outs.append(model(xt))
        if tally is not None:
            tally()
    reset(model)
    return torch.stack(outs)


@torch.no_grad()
def predict(model, dataset, T: int, kind: str, encoding: str = "direct", batch_size: int = 256,
            device="cpu", firing_rates: bool = False, progress: bool = False, step_mode: "str | None" = None):
    """Run ``model`` over ``dataset``; return ``(logits[T, N, C], labels[N], rates)`` on the CPU.

    ``rates`` maps each spiking layer to its mean firing rate (or is empty). A batch runs in slices of at most
    ``MAX_SAMPLE_STEPS`` samples × steps, so long runs (a converted network at T = 64) keep the memory of a
    short one: every layer's multi-step activations are ``[T·n, ...]``. ``step_mode`` ``"s"`` steps through
    time, ``"m"`` runs the T steps in one call; ``None`` chooses by :func:`inference_step_mode` (same numbers).
    The network's step mode is restored afterwards.
    """
    from tqdm.auto import tqdm

    mode = inference_step_mode(model, device) if step_mode is None else step_mode
    if mode not in STEP_MODES:
        raise ValueError(f"step_mode must be 'm' (multi-step) or 's' (single-step), got {mode!r}")
    prev = step_mode_of(model)
    set_step_mode(model, mode)
    try:
        return _predict(model, dataset, T, kind, encoding, batch_size, device, firing_rates, progress, mode, tqdm)
    finally:
        set_step_mode(model, prev)


def _predict(model, dataset, T, kind, encoding, batch_size, device, firing_rates, progress, mode, tqdm):
    model.eval()
    outs, ys = [], []
    rates = SpikeRates()
    gen = torch.Generator().manual_seed(0)  # Poisson encoding in evaluation is reproducible
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with (record(model, detach=True, fields=("spikes",)) if firing_rates else contextlib.nullcontext()) as rec:
        tally = (lambda: rates.add(rec)) if firing_rates else None  # each call's (each step's) spikes, then dropped
        for x, y in tqdm(loader, desc="eval", leave=False, disable=None if progress else True):
            xs = time_first(x, kind, T, encoding, gen).to(device)
            for part in xs.split(max(1, MAX_SAMPLE_STEPS // xs.shape[0]), dim=1):
                out = _forward(model, part, mode, tally)
                outs.append(out.float().cpu())
            ys.append(y)
    return torch.cat(outs, 1), torch.cat(ys), rates.rates()


def evaluate(model, dataset, T: int, kind: str, encoding: str = "direct", batch_size: int = 256, device="cpu",
             progress: bool = False) -> dict:
    """Accuracy at T and at every step, and firing rates per layer, of ``model`` on ``dataset`` (``fewstep eval``)."""
    logits, y, rates = predict(model, dataset, T, kind, encoding, batch_size, device, True, progress)
    acc = accuracy_per_step(logits, y)
    return {"n": int(len(y)), "accuracy": acc[-1], "accuracy_per_step": acc, "firing_rates": rates,
            "mean_firing_rate": (sum(rates.values()) / len(rates)) if rates else 0.0}
