"""Spiking neurons: pure step functions and stateful modules on top of them.

LIF as in the seed code (METHODS §0)::

    u(t) = τ·v(t−1) + I(t)              (multiplicative leak τ, default 0.5; IF is τ = 1)
    s(t) = H(u(t) − θ)                  (surrogate gradient in backward)
    v(t) = u(t)·(1 − s(t))              hard reset
    v(t) = u(t) − θ·s(t)                soft reset (reset by subtraction)
    v(0) = v0                           (default 0)

The functional core follows Norse: ``lif_step(x, state, params) -> (spikes, state)``.
The modules follow SpikingJelly: state lives in plain attributes (never in ``state_dict``),
``step_mode`` is ``"m"`` (multi-step: ``[T, N, ...]`` in, starts from a fresh state on every call)
or ``"s"`` (streaming: one ``[N, ...]`` frame per call, state kept until :func:`reset`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
from torch import nn

from . import surrogate as _surrogate

STEP_MODES = ("m", "s")
RESETS = ("hard", "soft")


class LIFState(NamedTuple):
    """Membrane after reset, ``v(t)``."""

    v: torch.Tensor


@dataclass(frozen=True)
class LIFParameters:
    """Parameters of :func:`lif_step`. ``tau`` and ``theta`` may be tensors (learnable)."""

    tau: "float | torch.Tensor" = 0.5
    theta: "float | torch.Tensor" = 1.0
    v0: float = 0.0
    reset: str = "hard"
    detach_reset: bool = False
    surrogate: _surrogate.Surrogate = field(default_factory=_surrogate.Triangle)

    def __post_init__(self):
        if self.reset not in RESETS:
            raise ValueError(f"reset must be one of {RESETS}, got {self.reset!r}")


def initial_state(x: torch.Tensor, p: LIFParameters) -> LIFState:
    """Fresh state shaped like one frame ``x`` (``v = v0``)."""
    return LIFState(torch.full_like(x, float(p.v0)))


def lif_update(x: torch.Tensor, v: "torch.Tensor | None", p: LIFParameters, need_u: bool = True):
    """One step; returns ``(spikes, u_pre_reset, v_post_reset)``. ``v=None`` is the fresh state ``v0``.

    Without autograd (inference) the step takes the fast path: the same numbers from four vectorised
    element-wise kernels that keep the input's memory layout (channels-last stays channels-last).
    ``need_u=False`` lets it reset ``u`` in place (the returned ``u`` is then ``v_post_reset`` itself).
    """
    u = _charge(x, v, p)
    if not torch.is_grad_enabled():
        return _lif_infer(u, p, need_u)
    s = p.surrogate(u - p.theta)
    sr = s.detach() if p.detach_reset else s
    if p.reset == "hard":
        v_next = u * (1.0 - sr)
    else:
        v_next = u - p.theta * sr
    return s, u, v_next


def _charge(x: torch.Tensor, v: "torch.Tensor | None", p: LIFParameters) -> torch.Tensor:
    """``u = τ·v + x``; ``v=None`` is the fresh state ``v0``.

    Without autograd and with τ a power of two (0.5, 0.25, 1 for IF) it is one fused pass,
    ``torch.add(x, v, alpha=τ)``: τ·v is then exact, so the fused multiply-add rounds as the product and
    the sum do (other τ keep the two passes, whose rounding the fused kernel would change).
    """
    if not torch.is_grad_enabled():
        if v is None and p.v0 == 0:
            return x + 0.0  # τ·0 + x in one pass instead of a fill, a product and a sum
        if v is not None and _exact_scale(p.tau):
            return torch.add(x, v, alpha=p.tau)
    return p.tau * (torch.full_like(x, float(p.v0)) if v is None else v) + x


def _exact_scale(tau) -> bool:
    """Whether ``τ·v`` is exact for every float ``v`` (bar underflow): τ a Python float power of two."""
    return type(tau) is float and tau > 0 and math.frexp(tau)[0] == 0.5


def _lif_infer(u: torch.Tensor, p: LIFParameters, need_u: bool, s_out: "torch.Tensor | None" = None):
    """Threshold and reset without autograd. Spikes come from a comparison written straight into a float
    tensor (``u ≥ θ`` is exact in IEEE arithmetic, so it equals H(u − θ)), and the hard reset is
    ``u − u·s``, exact for s ∈ {0, 1}: on the CPU bool tensors, ``.to(float)`` and ``masked_fill`` run
    unvectorised (about 10× slower per element) and ``masked_fill`` returns a contiguous (NCHW) copy.
    (An infinite membrane that fires resets to NaN here, as it does under ``u·(1 − s)`` in training.)
    """
    s = torch.ge(u, p.theta, out=torch.empty_like(u) if s_out is None else s_out)
    if p.reset == "hard":  # u − u·s
        v_next = torch.addcmul(u, u, s, value=-1.0) if need_u else u.addcmul_(u, s, value=-1.0)
    elif isinstance(p.theta, float):  # u − θ·s (θ·s is exact, so a fused multiply-add gives the same)
        v_next = torch.sub(u, s, alpha=p.theta) if need_u else u.sub_(s, alpha=p.theta)
    else:
        v_next = u - p.theta * s
    return s, u, v_next


def lif_step(x: torch.Tensor, state: "LIFState | None", p: LIFParameters) -> tuple[torch.Tensor, LIFState]:
    """Pure LIF step: ``(x[N, ...], state) -> (spikes[N, ...], new state)``."""
    if state is None:
        state = initial_state(x, p)
    s, _, v = lif_update(x, state.v, p)
    return s, LIFState(v)


def if_step(x: torch.Tensor, state: "LIFState | None", p: LIFParameters) -> tuple[torch.Tensor, LIFState]:
    """IF neuron: :func:`lif_step` with τ = 1."""
    return lif_step(x, state, replace(p, tau=1.0))


def lif_multi_step(x_seq: torch.Tensor, state: "LIFState | None", p: LIFParameters) -> tuple[torch.Tensor, LIFState]:
    """Run :func:`lif_step` over a time-first sequence ``[T, N, ...]``."""
    out = []
    for x in x_seq:
        s, state = lif_step(x, state, p)
        out.append(s)
    return torch.stack(out), state


SHRINK_ROW_COPIES = 16  # up to this many rows, StatefulModule.shrink copies row by row


def _empty_rows(value: torch.Tensor, n: int) -> torch.Tensor:
    """An uninitialised ``[n, ...]`` tensor like ``value``'s rows, in its memory layout: a channels-last
    state must stay channels-last when rows join it (``torch.cat`` of mixed layouts gives NCHW, and
    mixed-layout element-wise kernels are several times slower)."""
    fmt = torch.contiguous_format
    if not value.is_contiguous():
        for f, dim in ((torch.channels_last, 4), (torch.channels_last_3d, 5)):
            if value.dim() == dim and value.is_contiguous(memory_format=f):
                fmt = f
    return torch.empty((n, *value.shape[1:]), dtype=value.dtype, device=value.device, memory_format=fmt)


class StatefulModule(nn.Module):
    """Base for modules that carry state between steps.

    Subclasses list their state attributes in ``_state_names``; the values are plain tensors
    (or ``None`` for "fresh") held outside ``state_dict``.
    """

    _state_names: tuple[str, ...] = ()
    # A spiking layer: fewstep.record attaches to it (so a regulariser notices one that records nothing)
    # and the op counter counts its outputs as spikes. Stateful modules that are not neurons set False.
    is_neuron = True

    def __init__(self, step_mode: str = "m"):
        super().__init__()
        self.step_mode = step_mode
        self._recorder = None
        self._record_name = None
        self.reset()

    @property
    def step_mode(self) -> str:
        return self._step_mode

    @step_mode.setter
    def step_mode(self, mode: str):
        if mode not in STEP_MODES:
            raise ValueError(f"step_mode must be 'm' (multi-step) or 's' (single-step), got {mode!r}")
        self._step_mode = mode

    def reset(self) -> None:
        for name in self._state_names:
            setattr(self, name, None)

    def compact(self, index: torch.Tensor) -> None:
        """Keep only the batch rows ``index`` of every state tensor (for early exit)."""
        for name in self._state_names:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[index])

    def shrink(self, dst: "torch.Tensor | list[int]", src: "torch.Tensor | list[int]", n: int) -> None:
        """Copy batch rows ``src`` over rows ``dst`` (tensors or lists of ints), then keep the first ``n`` rows
        (a view, no copy)."""
        dst = dst.tolist() if isinstance(dst, torch.Tensor) else list(dst)
        src = src.tolist() if isinstance(src, torch.Tensor) else list(src)
        # a few rows: one contiguous copy per row beats the indexed kernels (3-4x on a 2-core CPU)
        pairs = list(zip(dst, src)) if len(dst) <= SHRINK_ROW_COPIES else None
        index = None
        for name in self._state_names:
            value = getattr(self, name)
            if value is not None:
                if pairs:
                    for d, s in pairs:
                        value[d].copy_(value[s])
                elif dst:
                    if index is None:  # (a module's states share a device)
                        index = [torch.tensor(r, dtype=torch.long, device=value.device) for r in (dst, src)]
                    value.index_copy_(0, index[0], value.index_select(0, index[1]))
                setattr(self, name, value[:n])

    def fresh_value(self, name: str) -> float:
        """The value of every element of fresh state ``name`` (override when it is a constant other than 0)."""
        return 0.0

    def fresh(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Fresh state ``name`` shaped like ``like`` (override when it is not one constant)."""
        return torch.full_like(like, self.fresh_value(name))

    def refill(self, rows: torch.Tensor) -> None:
        """Give batch rows ``rows`` fresh state in place (new samples taking over finished samples' slots)."""
        constant = type(self).fresh is StatefulModule.fresh  # then a fill of the rows, no gather
        for name in self._state_names:
            value = getattr(self, name)
            if value is not None:
                if constant:
                    value.index_fill_(0, rows, self.fresh_value(name))
                else:
                    value[rows] = self.fresh(name, value[rows])

    def grow(self, n: int) -> None:
        """Append ``n`` rows of fresh state (new samples joining a running batch)."""
        for name in self._state_names:
            value = getattr(self, name)
            if value is not None and n > 0:
                new = self.fresh(name, _empty_rows(value, n))
                setattr(self, name, torch.cat([value, new]))

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode!r}"


class LIF(StatefulModule):
    """Leaky integrate-and-fire neuron module (see module docstring for the equations).

    Args:
        tau: multiplicative leak (1.0 gives IF). ``learn_tau`` makes it a parameter.
        theta: firing threshold. ``learn_theta`` makes it a parameter.
        v0: initial membrane.
        reset: ``"hard"`` (to zero) or ``"soft"`` (subtract θ).
        detach_reset: stop gradients through the reset path.
        surrogate: a name from :mod:`fewstep.surrogate` or a surrogate module.
        step_mode: ``"m"`` (``[T, N, ...]``) or ``"s"`` (``[N, ...]``, streaming).
        backend: multi-step training path: ``"auto"`` or ``"fused"`` (the fused node of
            :mod:`fewstep.fused`, which also serves :func:`fewstep.record`) or ``"reference"``
            (autograd over the step loop).
    """

    _state_names = ("v",)

    def __init__(
        self,
        tau: float = 0.5,
        theta: float = 1.0,
        v0: float = 0.0,
        reset: str = "hard",
        detach_reset: bool = False,
        surrogate: "str | _surrogate.Surrogate" = "zif",
        learn_theta: bool = False,
        learn_tau: bool = False,
        step_mode: str = "m",
        backend: str = "auto",
    ):
        super().__init__(step_mode)
        if backend not in ("auto", "fused", "reference"):
            raise ValueError(f"backend must be 'auto', 'fused' or 'reference', got {backend!r}")
        self.backend = backend
        if reset not in RESETS:
            raise ValueError(f"reset must be one of {RESETS}, got {reset!r}")
        if not 0.0 < float(tau) <= 1.0:
            raise ValueError(f"tau is a multiplicative leak in (0, 1], got {tau}")
        self.theta = nn.Parameter(torch.tensor(float(theta))) if learn_theta else float(theta)
        self.tau = nn.Parameter(torch.tensor(float(tau))) if learn_tau else float(tau)
        self.v0 = float(v0)
        self.reset_mode = reset
        self.detach_reset = bool(detach_reset)
        self.surrogate = _surrogate.get(surrogate)

    def fresh_value(self, name):
        return self.v0

    @property
    def params(self) -> LIFParameters:
        return LIFParameters(self.tau, self.theta, self.v0, self.reset_mode, self.detach_reset, self.surrogate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        rec = self._recorder
        if self.step_mode == "s":
            if self.v is not None and self.v.shape != x.shape:
                raise ValueError(
                    f"{type(self).__name__} '{self._record_name or ''}': streaming state has shape "
                    f"{tuple(self.v.shape)} but the input frame has shape {tuple(x.shape)}; "
                    "call fewstep.reset(net) before feeding a new batch"
                )
            need_u = rec is not None and rec.wants_membrane  # (a spikes-only recorder keeps the in-place reset)
            s, u, self.v = lif_update(x, self.v, p, need_u=need_u)  # (None: fresh, v0)
            if rec is not None:
                rec.add(self, s.unsqueeze(0), *((u.unsqueeze(0), self.v.unsqueeze(0)) if need_u else ()))
            return s
        if x.dim() < 2:
            raise ValueError(f"multi-step input must be [T, N, ...], got shape {tuple(x.shape)}")
        need_u = rec is not None and rec.wants_membrane
        if self.backend != "reference":
            out = None
            if torch.is_grad_enabled():
                from .fused import lif_multi_step_fused

                out = lif_multi_step_fused(x, self.theta, self.tau, self.v0, self.reset_mode, self.detach_reset,
                                           self.surrogate, return_u=need_u)
            else:
                from .fused import lif_inference_triton

                out = lif_inference_triton(x, self.theta, self.tau, self.v0, self.reset_mode, return_u=need_u)
            if out is not None:  # fused node (training) or one Triton launch for all T steps (CUDA inference)
                self.v = None
                s, u = out if need_u else (out, None)
                if rec is not None:
                    rec.add(self, s, u)
                return s
        if not torch.is_grad_enabled():  # inference: spikes written straight into the stacked output
            out, v = torch.empty_like(x), None
            us, vs = [], []
            for t, xt in enumerate(x):
                _, u, v = _lif_infer(_charge(xt, v, p), p, need_u, out[t])
                if need_u:
                    us.append(u)
                    vs.append(v)
            self.v = None
            if rec is not None:
                rec.add(self, out, torch.stack(us) if need_u else None, torch.stack(vs) if need_u else None)
            return out
        v = torch.full_like(x[0], self.v0)
        spikes, us, vs = [], [], []
        for xt in x:
            s, u, v = lif_update(xt, v, p)
            spikes.append(s)
            if need_u:
                us.append(u)
                vs.append(v)
        self.v = None  # multi-step calls never leak state into the next call
        out = torch.stack(spikes)
        if rec is not None:
            rec.add(self, out, torch.stack(us) if need_u else None, torch.stack(vs) if need_u else None)
        return out

    def post_reset(self, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """``v(t)`` from ``u(t)`` and ``s(t)`` by this neuron's reset rule (differentiable like the step)."""
        sr = s.detach() if self.detach_reset else s
        return u * (1.0 - sr) if self.reset_mode == "hard" else u - self.theta * sr

    def extra_repr(self) -> str:
        return (
            f"tau={float(self.tau):g}, theta={float(self.theta):g}, v0={self.v0:g}, reset={self.reset_mode!r}, "
            f"detach_reset={self.detach_reset}, surrogate={self.surrogate.name}, step_mode={self.step_mode!r}"
        )


class IF(LIF):
    """Integrate-and-fire: :class:`LIF` with τ = 1 (no leak)."""

    def __init__(self, theta: float = 1.0, v0: float = 0.0, reset: str = "hard", **kwargs):
        kwargs.pop("tau", None)
        super().__init__(tau=1.0, theta=theta, v0=v0, reset=reset, **kwargs)


NEURONS: dict[str, type[StatefulModule]] = {"lif": LIF, "if": IF}  # + qcfs, qcfs_if (fewstep.qcfs, below)
QUANTISED = ("qcfs", "qcfs_if")  # the neurons that take ``levels``


def make_neuron(kind: str = "lif", **kwargs) -> StatefulModule:
    """A neuron module by name: ``lif``, ``if``, ``qcfs`` (the ANN activation for conversion) or ``qcfs_if``
    (the IF neuron a QCFS converts to; :mod:`fewstep.qcfs`)."""
    key = str(kind).lower()
    if key not in NEURONS:
        raise ValueError(f"unknown neuron {kind!r}; valid names: {', '.join(sorted(NEURONS))}")
    if key not in QUANTISED and kwargs.get("levels") is not None:
        raise ValueError(f"option 'levels' (QCFS quantisation levels) applies to neurons {list(QUANTISED)}, "
                         f"not {kind!r}")
    if key not in QUANTISED:
        kwargs.pop("levels", None)
    return NEURONS[key](**kwargs)


def stateful_modules(net: "nn.Module | list[StatefulModule]"):
    """The stateful modules of ``net`` (a list of them, as this returns, is passed through: a loop that
    calls :func:`shrink` or :func:`refill` at every step collects them once)."""
    if isinstance(net, list):
        return net
    return [m for m in net.modules() if isinstance(m, StatefulModule)]


def reset(net: nn.Module) -> nn.Module:
    """Reset the state of every stateful module in ``net`` (needed between streams in ``"s"`` mode)."""
    for m in stateful_modules(net):
        m.reset()
    return net


def _has_step_mode(m: nn.Module) -> bool:
    """A class attribute or property, else an instance attribute (no ``nn.Module.__getattr__`` miss)."""
    return hasattr(type(m), "step_mode") or "step_mode" in m.__dict__


def step_mode_of(net: nn.Module) -> str:
    """The step mode of ``net``'s first module that has one (``"m"`` when none has)."""
    return next((m.step_mode for m in net.modules() if _has_step_mode(m)), "m")


def set_step_mode(net: nn.Module, mode: str) -> nn.Module:
    """Switch every module of ``net`` with a ``step_mode`` to ``"m"`` or ``"s"`` and reset its state."""
    if mode not in STEP_MODES:
        raise ValueError(f"step_mode must be 'm' (multi-step) or 's' (single-step), got {mode!r}")
    for m in net.modules():  # one walk (early exit switches at every call); a module already in the mode is left as is
        if isinstance(m, StatefulModule):
            if m.step_mode != mode:
                m.step_mode = mode
            m.reset()
        elif _has_step_mode(m) and m.step_mode != mode:
            m.step_mode = mode
    return net


def compact(net: nn.Module, index: torch.Tensor, grow: int = 0) -> nn.Module:
    """Keep only batch rows ``index`` of every carried state, then append ``grow`` fresh rows.

    Streaming early exit uses it to drop finished samples and admit new ones into the batch.
    """
    for m in stateful_modules(net):
        m.compact(index)
        m.grow(grow)
    return net


def shrink(net: "nn.Module | list[StatefulModule]", dst: "torch.Tensor | list[int]", src: "torch.Tensor | list[int]",
           n: int) -> nn.Module:
    """Drop batch rows from every carried state by moving the survivors past row ``n`` (rows ``src``) into
    the freed rows below it (rows ``dst``) and keeping rows ``[0, n)``: the copy is as large as the rows
    moved, where :func:`compact` copies every surviving row. Row order changes; each sample keeps its state.
    Rows are tensors or lists of ints (lists spare each module a transfer); ``net`` may be the list that
    :func:`stateful_modules` returns."""
    if isinstance(dst, torch.Tensor):
        dst, src = dst.tolist(), src.tolist()
    for m in stateful_modules(net):
        m.shrink(dst, src, n)
    return net


def refill(net: "nn.Module | list[StatefulModule]", rows: torch.Tensor) -> nn.Module:
    """Fresh state in batch rows ``rows`` of every carried state, in place: continuous batching hands a
    finished sample's slot to the next one without moving the other rows. ``net`` may be the list that
    :func:`stateful_modules` returns."""
    for m in stateful_modules(net):
        m.refill(rows)
    return net


from .qcfs import QCFS, ConvertedIF  # noqa: E402  (they build on the classes above)

NEURONS.update(qcfs=QCFS, qcfs_if=ConvertedIF)
