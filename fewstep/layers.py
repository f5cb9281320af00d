"""Stateless layers that understand both step modes.

In multi-step mode (``"m"``) a stateless layer sees ``[T, N, ...]``, folds time into the batch,
runs once and unfolds: ``y = f(x.flatten(0, 1)).unflatten(0, (T, N))``. BatchNorm then takes
its statistics over (T, N, H, W) jointly, as TEBN does (METHODS §7, without the per-step scale).
In single-step mode (``"s"``) the layer sees one frame ``[N, ...]`` and runs as usual.

``Conv2d``, ``Linear``, ``BatchNorm1d/2d``, ``AvgPool2d``, ``MaxPool2d``, ``AdaptiveAvgPool2d``,
``Flatten`` and ``Dropout`` are the torch layers with this behaviour (their ``state_dict`` keys
are unchanged); :class:`TimeDistributed` wraps any other stateless module. :class:`TEBN` adds
TEBN's per-step scale to the joint BatchNorm. :class:`Sequential` folds each BatchNorm into the convolution
before it at inference on the CPU.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from .neurons import STEP_MODES, StatefulModule


# Devices on which convolutions run on channels-last (NHWC) activations, from bench/train_step.py:
# on a 2-core CPU oneDNN's NHWC convolutions made the training step ~15 % faster than NCHW, and
# on an H100 cuDNN's made it 13-14 % (float32) and 16-18 % (bfloat16) faster. Element-wise layers,
# pooling, BatchNorm and the fused LIF keep whatever layout they are given, so only the first
# convolution converts (a 3-channel input). Results are the same up to float summation order.
# With NHWC, folding T into the batch also beat looping over T on the CPU.
CHANNELS_LAST_DEVICES = {"cpu", "cuda"}


class StepModeMixin:
    """Adds ``step_mode`` to a stateless torch layer (put it first in the bases)."""

    step_mode = "m"

    def forward_frame(self, x: torch.Tensor) -> torch.Tensor:
        """The layer on one frame ``[N, ...]`` (or on ``[T·N, ...]``)."""
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "s":
            return self.forward_frame(x)
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__}: multi-step input must be [T, N, ...], got {tuple(x.shape)}")
        return self.forward_frame(x.flatten(0, 1)).unflatten(0, x.shape[:2])


class Conv2d(StepModeMixin, nn.Conv2d):
    def forward_frame(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.__dict__.get("_fold_bn")  # set by Sequential for this call only, where a fold applies (see there)
        if bn is None and not (x.dim() == 4 and x.device.type in CHANNELS_LAST_DEVICES):
            return nn.Conv2d.forward(self, x)
        x = x.contiguous(memory_format=torch.channels_last)  # a no-op after the first layer
        if bn is not None:
            w, b = self._folded_weight(bn)
        elif x.device.type == "cpu" and not torch.is_grad_enabled() and self.padding_mode == "zeros":
            w, b = self._channels_last_weight(), self.bias
        else:
            return nn.Conv2d.forward(self, x)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def _cached(self, slot: str, tensors: tuple, make, extra: tuple = ()):
        """``make()``, kept in ``self.__dict__[slot]`` (outside ``state_dict``) until one of ``tensors`` changes
        (its storage, version or dtype) or ``extra`` does."""
        key = extra + tuple(None if t is None else (t.data_ptr(), t._version, t.dtype) for t in tensors)
        cached = self.__dict__.get(slot)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = self.__dict__[slot] = (key, make())
        return cached[1]

    def _channels_last_weight(self) -> torch.Tensor:
        """The weight in channels-last layout, for inference on the CPU: with NCHW weights oneDNN converts
        them on every call (early exit on the N-MNIST ``cnn``: top-k pass 8 % faster, same outputs). Cached
        outside ``state_dict`` and refreshed whenever the weight changes (its storage or version). Not on
        CUDA, where a captured graph must read the parameter itself."""
        w = self.weight
        if w.is_contiguous(memory_format=torch.channels_last) or w.is_inference():  # (no version counter)
            return w
        return self._cached("_cl_weight", (w,), lambda: w.detach().contiguous(memory_format=torch.channels_last))

    def _folded_weight(self, bn) -> tuple[torch.Tensor, torch.Tensor]:
        """``bn`` (in evaluation) folded into this convolution: (channels-last weight, bias), cached outside
        ``state_dict`` and refreshed whenever a parameter or running statistic changes."""
        def make():
            w, b = fold_batchnorm(self.weight, self.bias, bn)
            return w.contiguous(memory_format=torch.channels_last), b

        return self._cached("_bn_fold", (self.weight, self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var),
                            make, (id(bn), bn.eps))


def fold_batchnorm(w: torch.Tensor, b: "torch.Tensor | None", bn) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, b) of ``bn(layer(x))`` in evaluation, for a convolution or linear layer ``(w, b)``: W·γ/σ per output
    channel and (b − μ)·γ/σ + β, with σ = √(running_var + eps). Computed in float64, returned in ``w``'s dtype
    (detached)."""
    f64 = torch.float64
    scale = 1.0 / torch.sqrt(bn.running_var.detach().to(f64) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(f64)
    shift = torch.zeros_like(scale) if bn.bias is None else bn.bias.detach().to(f64)
    b = torch.zeros_like(scale) if b is None else b.detach().to(f64)
    folded_w = w.detach().to(f64) * scale.view(-1, *([1] * (w.dim() - 1)))
    folded_b = (b - bn.running_mean.detach().to(f64)) * scale + shift
    return folded_w.to(w.dtype), folded_b.to(w.dtype)


class Linear(StepModeMixin, nn.Linear):
    pass


class BatchNorm1d(StepModeMixin, nn.BatchNorm1d):
    pass


class BatchNorm2d(StepModeMixin, nn.BatchNorm2d):
    pass


class SyncBatchNorm(StepModeMixin, nn.SyncBatchNorm):
    """BatchNorm with statistics over every process's batch (``train.sync_bn``; fewstep.distributed)."""


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


class Sequential(nn.Sequential):
    """``nn.Sequential`` that folds BatchNorm into the convolution before it at inference on the CPU.

    In evaluation a BatchNorm (or TEBN's BatchNorm) is the fixed per-channel affine map
    ``γ·(x − μ)/σ + β``; a :class:`Conv2d` directly followed by one then runs as a single convolution with
    that map in its weight and bias (:func:`fold_batchnorm`), and the BatchNorm is skipped: one pass over the
    activations fewer per layer (the N-MNIST ``cnn``'s streaming step 3-7 % faster at batch 1-64, its
    early-exit passes 3-8 %, on a 2-core CPU; ``bench/batchnorm_fold.py``). Outputs equal the unfolded layers' up to float
    rounding. It applies only where the result cannot differ in meaning: no autograd, a CPU tensor, the
    BatchNorm in ``eval()`` with running statistics, matching step modes, no hooks on either module (except
    ones marked ``fold_safe``, which read only the convolution's input and the shape of its output, as
    :class:`fewstep.ops.OpCounter` does) and no global hooks. Everything else runs as ``nn.Sequential`` does;
    ``state_dict`` keys are the same. Not on CUDA, where a captured graph must read the parameters themselves.
    ``FEWSTEP_FOLD_BN=0`` turns it off.
    """

    def forward(self, x):
        if torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or x.device.type != "cpu" or not fold_enabled() \
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
            return super().forward(x)
        mods = list(self._modules.values())
        i, last = 0, len(mods) - 1
        while i <= last:
            m = mods[i]
            bn = _fold_target(m, mods[i + 1], x) if i < last and isinstance(m, Conv2d) else None
            if bn is None:
                x = m(x)
                i += 1
                continue
            nxt = mods[i + 1]
            x = _call_with(m, "_fold_bn", bn, x)
            if nxt is not bn:  # TEBN: its per-step scale still applies
                x = _call_with(nxt, "_bn_folded", True, x)
            i += 2
        return x


def fold_enabled() -> bool:
    """Whether :class:`Sequential` folds BatchNorm at inference (``FEWSTEP_FOLD_BN=0`` turns it off)."""
    return os.environ.get("FEWSTEP_FOLD_BN", "1").lower() not in ("0", "false", "off", "no")


def _call_with(module: nn.Module, flag: str, value, x):
    """``module(x)`` with ``module.<flag> = value`` for this call only (outside ``state_dict``)."""
    module.__dict__[flag] = value
    try:
        return module(x)
    finally:
        del module.__dict__[flag]


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_pre_hooks or m._forward_hooks)


def _fold_target(conv: "Conv2d", nxt: nn.Module, x: torch.Tensor):
    """The BatchNorm to fold into ``conv`` when ``nxt`` follows it in a :class:`Sequential` (else ``None``)."""
    if conv.padding_mode != "zeros" or x.dim() != (4 if conv.step_mode == "s" else 5) or conv._forward_pre_hooks \
            or not all(getattr(h, "fold_safe", False) for h in conv._forward_hooks.values()):
        return None
    if isinstance(nxt, TEBN):
        bn = nxt.bn
        if nxt.step_mode != conv.step_mode or _hooked(nxt):
            return None
    else:
        bn = nxt
        if getattr(bn, "step_mode", None) != conv.step_mode:
            return None
    if not isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)) or bn.training or _hooked(bn) \
            or bn.running_mean is None or bn.running_var is None or bn.num_features != conv.out_channels:
        return None
    if any(t is not None and t.is_inference() for t in (conv.weight, conv.bias, bn.weight, bn.bias,
                                                         bn.running_mean, bn.running_var)):
        return None  # (inference tensors have no version counter for the cache)
    return bn


def _capturing(x: torch.Tensor) -> bool:
    """Whether ``x``'s CUDA stream is being captured into a graph (:mod:`fewstep.graphs`)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


class TEBN(StatefulModule):
    """Temporal effective batch norm (Duan et al., NeurIPS 2022; METHODS §7, used by the seed code).

    BatchNorm statistics over (T, N, H, W) jointly, then a learnable scale per timestep::

        y(t) = p[t] · BN(x)(t),        p initialised to 1 (then TEBN equals BatchNorm)

    Multi-step input ``[T', N, C, ...]`` with ``T' ≤ T`` uses ``p[:T']``. In streaming mode each
    sample counts its own steps (state ``step``, out of ``state_dict`` like a membrane), so early exit
    and continuous batching, where samples at different steps share a batch, stay exact. A sample
    past step T is an error: the network was built for T steps.
    """

    _state_names = ("step",)
    is_neuron = False

    def __init__(self, num_features: int, T: int, dims: int = 2, step_mode: str = "m", **bn_options):
        if T is None or int(T) < 1:
            raise ValueError(f"TEBN needs the number of timesteps T >= 1 (its per-step scales), got {T}")
        super().__init__(step_mode)  # reset() sets _bound: an upper bound on any sample's steps (spares a sync)
        bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}.get(dims)
        if bn is None:
            raise ValueError(f"TEBN dims must be 1 or 2, got {dims}")
        self.bn = bn(num_features, **bn_options)
        self.p = nn.Parameter(torch.ones(int(T)))

    @property
    def T(self) -> int:
        return self.p.numel()

    def reset(self) -> None:
        super().reset()
        self._bound = 0

    def _scale(self, p, lead: int, x):
        return p.view(*p.shape, *([1] * (x.dim() - lead)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "s":
            n = x.shape[0]
            if self.step is None:
                self.step = torch.zeros(n, dtype=torch.long, device=x.device)
            elif self.step.shape[0] != n:
                raise ValueError(f"TEBN: streaming state holds {self.step.shape[0]} samples but the frame has {n}; "
                                 "call fewstep.reset(net) before feeding a new batch")
            self._bound += 1
            # (the check syncs with the device, which a CUDA graph capture cannot; replays never pass step T)
            if self._bound > self.T and not _capturing(x) and int(self.step.max()) >= self.T:
                raise ValueError(f"TEBN was built for T = {self.T} steps; a sample is at step {int(self.step.max()) + 1}")
            y = self._times_p(x, self.p[self.step], multi=False)
            self.step = self.step + 1
            return y
        if x.dim() < 3:
            raise ValueError(f"TEBN: multi-step input must be [T, N, C, ...], got {tuple(x.shape)}")
        if x.shape[0] > self.T:
            raise ValueError(f"TEBN was built for T = {self.T} steps but the input has T = {x.shape[0]}")
        return self._times_p(x, self.p[: x.shape[0]], multi=True)

    def _times_p(self, x: torch.Tensor, p: torch.Tensor, multi: bool) -> torch.Tensor:
        """``p · BN(x)`` with ``p`` per leading row: per sample when streaming, per step in multi-step mode (BN
        then over the flattened ``[T·N]``). Without autograd the scale is applied in place, on a tensor this
        layer owns: BN's output or, where :class:`Sequential` folded the BatchNorm into the convolution before
        it (``_bn_folded``), that convolution's fresh output. A multi-step activation is ``T·N·C·H·W`` floats
        (380 MB in the N-MNIST ``cnn``'s first layer at batch 256), and on a CPU a fresh buffer of that size
        costs more in page faults than the multiply itself (docs/performance.md)."""
        y = self._normalised(x, multi)
        scale = self._scale(p, 1, y)
        # (a forward hook on the BatchNorm may hold its output: then that output stays as it was)
        owned = y is x or not (self.bn._forward_hooks or nn.modules.module._global_forward_hooks)
        return y.mul_(scale) if owned and not torch.is_grad_enabled() else y * scale

    def _normalised(self, x: torch.Tensor, multi: bool) -> torch.Tensor:
        """BN(x); ``x`` itself where :class:`Sequential` already folded the BatchNorm into the convolution."""
        if self.__dict__.get("_bn_folded"):
            return x
        if multi:
            return self.bn(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        return self.bn(x)

    def extra_repr(self) -> str:
        return f"T={self.T}, step_mode={self.step_mode!r}"
