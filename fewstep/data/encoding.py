"""Encodings of static inputs ``[N, ...]`` into time-first sequences ``[T, N, ...]``.

- ``direct``: the same analog frame at every step (the first layer sees pixels; METHODS §0).
- ``poisson``: rate coding, ``s(t) ~ Bernoulli(clamp(x, 0, 1))`` independently per step.
"""

from __future__ import annotations

import torch


def direct(x: torch.Tensor, T: int, generator: "torch.Generator | None" = None) -> torch.Tensor:
    return x.unsqueeze(0).expand(T, *x.shape)


def poisson(x: torch.Tensor, T: int, generator: "torch.Generator | None" = None) -> torch.Tensor:
    prob = x.clamp(0, 1).unsqueeze(0).expand(T, *x.shape)
    return (torch.rand(prob.shape, generator=generator, device=x.device) < prob).to(x.dtype)


ENCODINGS = {"direct": direct, "poisson": poisson}


def get(name: str):
    if name not in ENCODINGS:
        raise ValueError(f"unknown encoding {name!r}; valid names: {', '.join(sorted(ENCODINGS))}")
    return ENCODINGS[name]
