"""Encodings of static inputs ``[N, ...]`` into time-first sequences ``[T, N, ...]``.

- ``direct``: the same analog frame at every step (the first layer sees pixels; METHODS §0).
- ``poisson``: rate coding, ``s(t) ~ Bernoulli(clamp(x, 0, 1))`` independently per step.
"""

from __future__ import annotations

import torch


def direct(x: torch.Tensor, T: int, generator: "torch.Generator | None" = None) -> torch.Tensor:
    """Direct encoding: the same analog input ``x`` at each of ``T`` steps, ``[T, *x.shape]`` (a view, no copy)."""
    return x.unsqueeze(0).expand(T, *x.shape)


def poisson(x: torch.Tensor, T: int, generator: "torch.Generator | None" = None) -> torch.Tensor:
    """Draws are sample-major, so with a seeded generator each sample gets the same spike train however
    the data is split into batches (evaluation and early-exit runs see identical inputs)."""
    prob = x.clamp(0, 1).unsqueeze(1)  # [N, 1, ...]
    u = torch.rand((x.shape[0], T, *x.shape[1:]), generator=generator, device=x.device)
    return (u < prob).to(x.dtype).transpose(0, 1)


ENCODINGS = {"direct": direct, "poisson": poisson}


def get(name: str):
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; valid names: {', '.join(sorted(ENCODINGS))}")
    return ENCODINGS[name]
