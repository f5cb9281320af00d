"""Stateless layers that understand both step modes.

In multi-step mode (``"m"``) a stateless layer sees ``[T, N, ...]``, folds time into the batch,
runs once and unfolds: ``y = f(x.flatten(0, 1)).unflatten(0, (T, N))``. BatchNorm then takes
its statistics over (T, N, H, W) jointly, as TEBN does (METHODS §7, without the per-step scale).
In single-step mode (``"s"``) the layer sees one frame ``[N, ...]`` and runs as usual.

``Conv2d``, ``Linear``, ``BatchNorm1d/2d``, ``AvgPool2d``, ``MaxPool2d``, ``AdaptiveAvgPool2d``,
``Flatten`` and ``Dropout`` are the torch layers with this behaviour (their ``state_dict`` keys
are unchanged); :class:`TimeDistributed` wraps any other stateless module.
"""

from __future__ import annotations

import torch
from torch import nn

from .neurons import STEP_MODES


# Where multi-step synaptic layers loop over T instead of folding T into the batch. Measured on a
# 2-core CPU (bench/train_step.py): folding a conv over T x N was ~10 % slower than T convs of N
# (cache), so the CPU loops; GPUs prefer one large batch. BatchNorm always folds (it needs joint
# statistics over T and N).
TIME_LOOP_DEVICES = {"cpu"}


class StepModeMixin:
    """Adds ``step_mode`` to a stateless torch layer (put it first in the bases)."""

    step_mode = "m"
    time_loop = False  # True: loop over T on TIME_LOOP_DEVICES (same numbers, different speed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "s":
            return super().forward(x)
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__}: multi-step input must be [T, N, ...], got {tuple(x.shape)}")
        if self.time_loop and x.device.type in TIME_LOOP_DEVICES:
            return torch.stack([super(StepModeMixin, self).forward(xt) for xt in x])
        y = super().forward(x.flatten(0, 1))
        return y.unflatten(0, x.shape[:2])


class Conv2d(StepModeMixin, nn.Conv2d):
    time_loop = True


class Linear(StepModeMixin, nn.Linear):
    time_loop = True


class BatchNorm1d(StepModeMixin, nn.BatchNorm1d):
    pass


class BatchNorm2d(StepModeMixin, nn.BatchNorm2d):
    pass


class AvgPool2d(StepModeMixin, nn.AvgPool2d):
    pass


class MaxPool2d(StepModeMixin, nn.MaxPool2d):
    pass


class AdaptiveAvgPool2d(StepModeMixin, nn.AdaptiveAvgPool2d):
    pass


class Flatten(StepModeMixin, nn.Flatten):
    pass


class Dropout(StepModeMixin, nn.Dropout):
    pass


class TimeDistributed(nn.Module):
    """Apply a stateless ``module`` to every step of ``[T, N, ...]`` (or to one frame in ``"s"`` mode)."""

    def __init__(self, module: nn.Module, step_mode: str = "m"):
        super().__init__()
        if step_mode not in STEP_MODES:
            raise ValueError(f"step_mode must be 'm' or 's', got {step_mode!r}")
        self.module = module
        self.step_mode = step_mode

    def forward(self, x):
        if self.step_mode == "s":
            return self.module(x)
        return self.module(x.flatten(0, 1)).unflatten(0, x.shape[:2])
