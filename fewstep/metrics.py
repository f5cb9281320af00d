"""Evaluation: accuracy at every timestep of the running-mean logits, and firing rates.

At step t the prediction is ``argmax Y(t)`` with ``Y(t) = Σ_{k≤t} O(k)`` (same argmax as the
running mean). Firing rate of a spiking layer = mean spike count per neuron per step.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from .data import encoding as _encoding
from .record import record


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


@torch.no_grad()
def predict(model, dataset, T: int, kind: str, encoding: str = "direct", batch_size: int = 256,
            device="cpu", firing_rates: bool = False, progress: bool = False):
    """Run ``model`` over ``dataset``; return ``(logits[T, N, C], labels[N], rates)`` on the CPU.

    ``rates`` maps each spiking layer to its mean firing rate (or is empty). A batch runs in slices of at most
    ``MAX_SAMPLE_STEPS`` samples × steps, so long runs (a converted network at T = 64) keep the memory of a
    short one: every layer's multi-step activations are ``[T·n, ...]``.
    """
    from tqdm.auto import tqdm

    model.eval()
    outs, ys = [], []
    sums: dict[str, float] = {}
    count: dict[str, int] = {}
    gen = torch.Generator().manual_seed(0)  # Poisson encoding in evaluation is reproducible
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for x, y in tqdm(loader, desc="eval", leave=False, disable=None if progress else True):
        xs = time_first(x, kind, T, encoding, gen).to(device)
        for part in xs.split(max(1, MAX_SAMPLE_STEPS // xs.shape[0]), dim=1):
            if firing_rates:
                with record(model, detach=True, fields=("spikes",)) as rec:
                    out = model(part)
                for name, s in rec.spikes.items():
                    sums[name] = sums.get(name, 0.0) + float(s.float().sum())
                    count[name] = count.get(name, 0) + s.numel()
            else:
                out = model(part)
            outs.append(out.float().cpu())
        ys.append(y)
    rates = {k: sums[k] / count[k] for k in sums}
    return torch.cat(outs, 1), torch.cat(ys), rates


def evaluate(model, dataset, T: int, kind: str, encoding: str = "direct", batch_size: int = 256, device="cpu",
             progress: bool = False) -> dict:
    logits, y, rates = predict(model, dataset, T, kind, encoding, batch_size, device, True, progress)
    acc = accuracy_per_step(logits, y)
    return {"n": int(len(y)), "accuracy": acc[-1], "accuracy_per_step": acc, "firing_rates": rates,
            "mean_firing_rate": (sum(rates.values()) / len(rates)) if rates else 0.0}
