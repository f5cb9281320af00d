"""Surrogate gradients for the Heaviside spike function.

Forward is always ``s = H(x)`` with ``x = u - theta`` (a spike when the membrane reaches the
threshold). Backward replaces ``dH/dx`` by a smooth pseudo-derivative ``g(x)``:

- ``zif`` / ``triangle`` (seed code, METHODS §0): ``g(x) = (1/γ)² · max(0, γ − |x|)``, γ = 1.
- ``sigmoid``: ``g(x) = α·σ(αx)·(1 − σ(αx))``, α = 4.
- ``atan``: ``g(x) = (α/2) / (1 + (π/2·α·x)²)``, α = 2.
- ``rectangle``: ``g(x) = (1/w)·1[|x| < w/2]``, w = 1.

Surrogates are small picklable ``nn.Module`` objects without parameters, chosen by name with
:func:`get`. A new one is a subclass that implements :meth:`Surrogate.grad`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _SpikeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, surrogate: "Surrogate") -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        return grad_out * ctx.surrogate.grad(x), None


class Surrogate(nn.Module):
    """Heaviside forward, ``grad(x)`` backward. Subclasses implement :meth:`grad`."""

    name = "surrogate"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SpikeFn.apply(x, self)

    def grad(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.__dict__.items() if not k.startswith("_") and k != "training")


class Triangle(Surrogate):
    """ZIF / triangle: ``(1/γ)² · max(0, γ − |x|)`` (seed code default, γ = 1)."""

    name = "zif"

    def __init__(self, gamma: float = 1.0):
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"triangle surrogate needs gamma > 0, got {gamma}")
        self.gamma = float(gamma)

    def grad(self, x):
        return (1.0 / self.gamma) ** 2 * (self.gamma - x.abs()).clamp(min=0)


class Sigmoid(Surrogate):
    """Derivative of ``σ(αx)``: ``α·σ(αx)·(1 − σ(αx))``."""

    name = "sigmoid"

    def __init__(self, alpha: float = 4.0):
        super().__init__()
        self.alpha = float(alpha)

    def grad(self, x):
        sg = torch.sigmoid(self.alpha * x)
        return self.alpha * sg * (1 - sg)


class ATan(Surrogate):
    """Derivative of ``(1/π)·atan(π/2·αx) + 1/2``: ``(α/2) / (1 + (π/2·αx)²)``."""

    name = "atan"

    def __init__(self, alpha: float = 2.0):
        super().__init__()
        self.alpha = float(alpha)

    def grad(self, x):
        return (self.alpha / 2) / (1 + (math.pi / 2 * self.alpha * x) ** 2)


class Rectangle(Surrogate):
    """Boxcar: ``(1/w) · 1[|x| < w/2]``."""

    name = "rectangle"

    def __init__(self, width: float = 1.0):
        super().__init__()
        if width <= 0:
            raise ValueError(f"rectangle surrogate needs width > 0, got {width}")
        self.width = float(width)

    def grad(self, x):
        return (x.abs() < self.width / 2).to(x.dtype) / self.width


SURROGATES: dict[str, type[Surrogate]] = {
    "zif": Triangle,
    "triangle": Triangle,
    "sigmoid": Sigmoid,
    "atan": ATan,
    "rectangle": Rectangle,
}


def get(spec: "str | Surrogate | None" = "zif", **kwargs) -> Surrogate:
    """A surrogate by name (``zif``, ``triangle``, ``sigmoid``, ``atan``, ``rectangle``) or as given."""
    if spec is None:
        spec = "zif"
    if isinstance(spec, Surrogate):
        if kwargs:
            raise ValueError("surrogate options can only be given with a surrogate name")
        return spec
    if isinstance(spec, dict):
        spec = dict(spec)
        name = spec.pop("name")
        return get(name, **spec, **kwargs)
    key = str(spec).lower()
    if key not in SURROGATES:
        raise ValueError(f"unknown surrogate {spec!r}; valid names: {', '.join(sorted(SURROGATES))}")
    return SURROGATES[key](**kwargs)
