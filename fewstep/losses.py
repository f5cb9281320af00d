"""Losses on per-step logits ``O[T, N, C]`` (METHODS §0).

- ``ce``:  ``CE(mean_t O(t), y)``.
- ``tet``: ``(1 − λ)·(1/T)·Σ_t CE(O(t), y) + λ·MSE(O, φ)`` (Deng et al., ICLR 2022), λ = 1e-3, φ = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(out: torch.Tensor, y: torch.Tensor):
    if out.dim() != 3:
        raise ValueError(f"losses expect per-step logits [T, N, C], got shape {list(out.shape)}")
    if y.shape != out.shape[1:2]:
        raise ValueError(f"labels of shape {list(y.shape)} do not match logits {list(out.shape)} (N = {out.shape[1]})")


def mean_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``CE(mean_t O(t), y)``: cross-entropy of the time-averaged logits ``out [T, N, C]`` against labels ``y [N]``."""
    _check(out, y)
    return F.cross_entropy(out.float().mean(0), y)


def tet(out: torch.Tensor, y: torch.Tensor, lam: float = 1e-3, phi: float = 1.0) -> torch.Tensor:
    """TET (Deng et al., ICLR 2022): ``(1 − λ)·(1/T)·Σ_t CE(O(t), y) + λ·MSE(O, φ)`` on ``out [T, N, C]``, so that
    every step's logits answer on their own."""
    _check(out, y)
    out = out.float()
    T = out.shape[0]
    ce = F.cross_entropy(out.flatten(0, 1), y.repeat(T))  # mean over t and n
    mse = F.mse_loss(out, torch.full_like(out, phi)) if lam else out.new_zeros(())
    return (1 - lam) * ce + lam * mse


LOSSES = {"ce": mean_ce, "tet": tet}


def make(name: str, tet_lambda: float = 1e-3, tet_phi: float = 1.0):
    """The loss ``(out[T, N, C], y[N]) -> scalar`` by name."""
    if name == "tet":
        return lambda out, y: tet(out, y, tet_lambda, tet_phi)
    if name == "ce":
        return mean_ce
    raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
