"""Fused multi-step LIF: one autograd node for the whole T loop, with a recomputing backward.

The reference path (:func:`fewstep.neurons.lif_update` per step under autograd) keeps several
tensors per step for backward (``u − θ``, ``u``, ``1 − s``, ...). The fused path keeps only the
pre-reset membrane ``u[T, ...]`` and recomputes the rest in backward:

    s_t = H(u_t − θ),  g_t = surrogate'(u_t − θ),  v_{t−1} from u_{t−1} (reset rule), v_{−1} = v0
    ∂v_t/∂u_t = (1 − s_t) − u_t·g_t  (hard)      or  1 − θ·g_t      (soft)
              = (1 − s_t)             (hard, detached reset)  or  1  (soft, detached reset)
    ∂L/∂u_t = ∂L/∂s_t · g_t + ∂L/∂v_t · ∂v_t/∂u_t,   ∂L/∂x_t = ∂L/∂u_t,   ∂L/∂v_{t−1} = τ · ∂L/∂u_t
    ∂L/∂τ  += Σ ∂L/∂u_t · v_{t−1}
    ∂L/∂θ  += Σ −∂L/∂s_t · g_t + ∂L/∂v_t · ∂v_t/∂θ,  ∂v_t/∂θ = u_t·g_t (hard), −s_t + θ·g_t (soft),
              0 / −s_t with a detached reset.

Per step, the forward and backward bodies run as one ``torch.compile``-generated loop when the
activation is large (``COMPILE_MIN_NUMEL`` elements; ``FEWSTEP_COMPILE=0|1`` forces it off or on),
else as eager ops. Compiled kernels are cached per surrogate and reset rule and take any size
(dynamic shapes on flat tensors); a compiler failure falls back to eager, logged once.
Eager forward values are bit-identical to the reference; compiled ones and all gradients agree to
float rounding. Works for every surrogate (it calls ``surrogate.grad``) on any device.
"""

from __future__ import annotations

import copy
import logging
import os

import torch

log = logging.getLogger("fewstep")
_reported: set[str] = set()


def fallback(reason: str) -> None:
    """Log once per reason why the reference path is used instead of the fused one."""
    if reason not in _reported:
        _reported.add(reason)
        log.warning("fewstep: fused LIF not used (%s); running the reference step loop", reason)


COMPILE_MIN_NUMEL = 1 << 18  # per-step elements from which torch.compile pays off (measured on a 2-core CPU)
_KERNELS: dict = {}


def _value(p):
    return p.detach() if isinstance(p, torch.Tensor) else p


def _use_compile(numel: int) -> bool:
    mode = os.environ.get("FEWSTEP_COMPILE", "auto").lower()
    if mode in ("0", "false", "off", "no"):
        return False
    return mode in ("1", "true", "on", "yes") or numel >= COMPILE_MIN_NUMEL


def kernels(surrogate, hard: bool, detach: bool, need_th: bool, need_ta: bool, compiled: bool):
    """Per-step forward and backward bodies on flat tensors (one fused loop each when compiled)."""
    key = (type(surrogate).__name__, repr(surrogate), hard, detach, need_th, need_ta, compiled)
    if key in _KERNELS:
        return _KERNELS[key]
    sur = copy.deepcopy(surrogate)

    def fwd(x, v, th, ta, u_out, s_out):  # writes u and s into the stacked buffers (fused when compiled)
        u = ta * v + x
        s = ((u - th) >= 0).to(x.dtype)
        u_out.copy_(u)
        s_out.copy_(s)
        return u * (1.0 - s) if hard else u - th * s

    def bwd(u, u_prev, gs, gv, th, ta, v0: float, gx_out):
        s = ((u - th) >= 0).to(u.dtype)
        g = sur.grad(u - th)
        if hard:
            dv_du = (1.0 - s) if detach else (1.0 - s) - u * g
        else:
            dv_du = 1.0 if detach else 1.0 - th * g
        gu = gs * g + gv * dv_du
        gx_out.copy_(gu)
        d_th = d_ta = None
        if need_th:
            if hard:
                dv_dth = 0.0 if detach else u * g
            else:
                dv_dth = -s if detach else -s + th * g
            d_th = (gv * dv_dth - gs * g).sum(dtype=torch.float32)
        if need_ta:
            if u_prev is None:
                v_prev = torch.full_like(u, v0)
            else:
                sp = ((u_prev - th) >= 0).to(u.dtype)
                v_prev = u_prev * (1.0 - sp) if hard else u_prev - th * sp
            d_ta = (gu * v_prev).sum(dtype=torch.float32)
        return gu * ta, d_th, d_ta

    if compiled:
        fwd, bwd = torch.compile(fwd, dynamic=True), torch.compile(bwd, dynamic=True)
    _KERNELS[key] = (fwd, bwd)
    return fwd, bwd


def _run(kind: str, args: tuple, cfg: tuple, compiled: bool):
    """Call the compiled kernel; on a compiler failure, fall back to eager for good (logged once)."""
    try:
        return kernels(*cfg, compiled)[kind](*args)
    except Exception as exc:  # a compiler or toolchain problem must never stop training
        if not compiled:
            raise
        fallback(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
        os.environ["FEWSTEP_COMPILE"] = "0"
        return kernels(*cfg, False)[kind](*args)


class FusedLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, theta, tau, v0: float, hard: bool, detach: bool, surrogate):
        th, ta = _value(theta), _value(tau)
        need_th = isinstance(theta, torch.Tensor) and theta.requires_grad
        need_ta = isinstance(tau, torch.Tensor) and tau.requires_grad
        compiled = _use_compile(x[0].numel())
        cfg = (surrogate, hard, detach, need_th, need_ta)
        xf = x.reshape(x.shape[0], -1)
        u_all = torch.empty_like(xf)
        s_all = torch.empty_like(xf)
        v = torch.full_like(xf[0], v0)
        for t in range(xf.shape[0]):
            v = _run(0, (xf[t], v, th, ta, u_all[t], s_all[t]), cfg, compiled)
        ctx.save_for_backward(u_all, *(p for p in (theta, tau) if isinstance(p, torch.Tensor)))
        ctx.cfg = (theta, tau, v0, cfg, compiled, x.shape)
        return s_all.view(x.shape)

    @staticmethod
    def backward(ctx, grad_s):
        u_all = ctx.saved_tensors[0]
        theta, tau, v0, cfg, compiled, shape = ctx.cfg
        th, ta = _value(theta), _value(tau)
        need_th, need_ta = cfg[3], cfg[4]
        gs_all = grad_s.reshape(u_all.shape)
        grad_x = torch.empty_like(u_all)
        grad_v = torch.zeros_like(u_all[0])
        d_th = torch.zeros((), dtype=torch.float32, device=u_all.device)
        d_ta = torch.zeros((), dtype=torch.float32, device=u_all.device)
        for t in range(u_all.shape[0] - 1, -1, -1):
            u_prev = u_all[t - 1] if t > 0 else None
            grad_v, dth, dta = _run(1, (u_all[t], u_prev, gs_all[t], grad_v, th, ta, v0, grad_x[t]), cfg, compiled)
            if need_th:
                d_th = d_th + dth
            if need_ta:
                d_ta = d_ta + dta
        return (grad_x.view(shape), d_th.to(theta.dtype) if need_th else None,
                d_ta.to(tau.dtype) if need_ta else None, None, None, None, None)
def lif_multi_step_fused(x, theta, tau, v0: float, reset: str, detach_reset: bool, surrogate):
    """Spikes ``[T, ...]`` of a LIF run from a fresh state (fused forward and backward)."""
    return FusedLIF.apply(x, theta, tau, float(v0), reset == "hard", bool(detach_reset), surrogate)
