"""Triton kernels for the fused multi-step LIF on CUDA (one launch per direction for all T steps).

Each program owns ``BLOCK`` neurons and runs the whole time loop with the membrane in registers,
so the forward reads ``x`` once and writes ``s`` (and ``u`` when training), and the backward reads
``u`` and ``∂L/∂s`` once and writes ``∂L/∂x`` once: the least memory traffic the recurrence
allows. The equations are those of :mod:`fewstep.fused` (forward ``u_t = τ·v_{t−1} + x_t``,
``s_t = H(u_t − θ)``, hard or soft reset; backward with the surrogate of the neuron). Arithmetic is
float32; every intermediate the reference rounds to the storage dtype is rounded the same way
here, so bfloat16/float16 spikes equal the reference step loop's and only gradients differ by
rounding. Gradients for θ and τ are reduced per program into a buffer and summed by torch
(deterministic, no atomics).

Supported: the built-in surrogates (``zif``/``triangle``, ``sigmoid``, ``atan``, ``rectangle``) and
float32/bfloat16/float16 on a CUDA device; anything else makes :mod:`fewstep.fused` use its
``torch.compile``/eager path, with the reason logged once. With ``TRITON_INTERPRET=1`` the same
kernels run on CPU tensors through Triton's interpreter (slow; used by the tests on CPU machines).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import surrogate as _sur

BLOCK = 1024
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SURROGATE_IDS = {_sur.Triangle: (0, "gamma"), _sur.Sigmoid: (1, "alpha"), _sur.ATan: (2, "alpha"),
                  _sur.Rectangle: (3, "width")}


def unsupported(x: torch.Tensor, surrogate, theta, tau) -> "str | None":
    """Why the Triton kernels cannot run this call on a CUDA (or interpreted) tensor, or None."""
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype}"
    if surrogate is not None and type(surrogate) not in _SURROGATE_IDS:
        return f"surrogate {type(surrogate).__name__} has no Triton kernel"
    for name, p in (("theta", theta), ("tau", tau)):
        if isinstance(p, torch.Tensor) and p.numel() != 1:
            return f"{name} is not a scalar"
    return None


def _surrogate_code(surrogate) -> tuple[int, float]:
    kind, attr = _SURROGATE_IDS[type(surrogate)]
    return kind, float(getattr(surrogate, attr))


@triton.jit
def _round(v, DT: tl.constexpr):
    # Round a float32 value to the storage dtype and back (a no-op for float32).
    return v.to(DT).to(tl.float32)


@triton.jit
def _sg(z, KIND: tl.constexpr, a):
    """Surrogate derivative g(z), z = u − θ (see fewstep.surrogate)."""
    if KIND == 0:  # triangle, a = γ
        g = tl.maximum(a - tl.abs(z), 0.0) / (a * a)
    elif KIND == 1:  # sigmoid, a = α
        sg = tl.sigmoid(a * z)
        g = a * sg * (1.0 - sg)
    elif KIND == 2:  # atan, a = α
        w = 1.5707963267948966 * a * z
        g = (a * 0.5) / (1.0 + w * w)
    else:  # rectangle, a = width
        g = tl.where(tl.abs(z) < a * 0.5, 1.0 / a, 0.0)
    return g


@triton.jit
def _param(ptr, val, FROM_PTR: tl.constexpr):
    if FROM_PTR:
        p = tl.load(ptr).to(tl.float32)
    else:
        p = val
    return p


@triton.jit(do_not_specialize=["M", "T"])
def _lif_fwd(x_ptr, s_ptr, u_ptr, th_ptr, ta_ptr, th_val, ta_val, v0, M, T,
             TH_PTR: tl.constexpr, TA_PTR: tl.constexpr, HARD: tl.constexpr, SAVE_U: tl.constexpr,
             DT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    th = _param(th_ptr, th_val, TH_PTR)
    ta = _param(ta_ptr, ta_val, TA_PTR)
    v = tl.zeros([BLOCK], dtype=tl.float32) + v0
    px, ps, pu = x_ptr + offs, s_ptr + offs, u_ptr + offs  # 64-bit pointers, advanced by M per step
    for _ in range(T):
        x = tl.load(px, mask=mask, other=0.0).to(tl.float32)
        u = _round(_round(ta * v, DT) + x, DT)
        fired = u >= th
        s = fired.to(tl.float32)
        tl.store(ps, s.to(s_ptr.dtype.element_ty), mask=mask)
        if SAVE_U:
            tl.store(pu, u.to(u_ptr.dtype.element_ty), mask=mask)
        if HARD:
            v = tl.where(fired, 0.0, u)
        else:
            v = _round(u - _round(th * s, DT), DT)
        px += M
        ps += M
        pu += M


@triton.jit(do_not_specialize=["M", "T", "last"])
def _lif_bwd(u_ptr, gs_ptr, gue_ptr, gx_ptr, dth_ptr, dta_ptr, th_ptr, ta_ptr, th_val, ta_val, v0, a, M, T, last,
             TH_PTR: tl.constexpr, TA_PTR: tl.constexpr, HARD: tl.constexpr, DETACH: tl.constexpr,
             KIND: tl.constexpr, NEED_TH: tl.constexpr, NEED_TA: tl.constexpr, HAS_GU: tl.constexpr,
             BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    th = _param(th_ptr, th_val, TH_PTR)
    ta = _param(ta_ptr, ta_val, TA_PTR)
    gv = tl.zeros([BLOCK], dtype=tl.float32)
    acc_th = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ta = tl.zeros([BLOCK], dtype=tl.float32)
    # pointers start at step T-1 (``last`` = (T-1)·M, computed on the host in 64 bits) and walk back
    pu, pg, px = u_ptr + last + offs, gs_ptr + last + offs, gx_ptr + last + offs
    pe = gue_ptr + last + offs  # ∂L/∂u from a reader of the recorded membrane (HAS_GU)
    u = tl.load(pu, mask=mask, other=0.0).to(tl.float32)
    for i in range(T):
        first = (tl.zeros([BLOCK], dtype=tl.int32) + i) == T - 1  # step 0, whose v_{-1} is v0
        # u_{t-1}, carried to the next iteration
        u_prev = tl.load(pu - M, mask=mask & (first == 0), other=0.0).to(tl.float32)
        gs = tl.load(pg, mask=mask, other=0.0).to(tl.float32)
        s = (u >= th).to(tl.float32)
        g = _sg(u - th, KIND, a)
        if HARD:
            if DETACH:
                dv_du = 1.0 - s
            else:
                dv_du = (1.0 - s) - u * g
        else:
            if DETACH:
                dv_du = tl.zeros([BLOCK], dtype=tl.float32) + 1.0
            else:
                dv_du = 1.0 - th * g
        gu = gs * g + gv * dv_du
        if HAS_GU:
            gu += tl.load(pe, mask=mask, other=0.0).to(tl.float32)
        tl.store(px, gu.to(gx_ptr.dtype.element_ty), mask=mask)
        if NEED_TH:
            if HARD:
                if DETACH:
                    dv_dth = tl.zeros([BLOCK], dtype=tl.float32)
                else:
                    dv_dth = u * g
            else:
                if DETACH:
                    dv_dth = -s
                else:
                    dv_dth = th * g - s
            acc_th += gv * dv_dth - gs * g
        if NEED_TA:
            sp = (u_prev >= th).to(tl.float32)
            if HARD:
                v_prev = u_prev * (1.0 - sp)
            else:
                v_prev = u_prev - th * sp
            v_prev = tl.where(first, v0, v_prev)
            acc_ta += gu * v_prev
        gv = gu * ta
        u = u_prev
        pu -= M
        pg -= M
        px -= M
        pe -= M
    if NEED_TH:
        tl.store(dth_ptr + pid, tl.sum(tl.where(mask, acc_th, 0.0), axis=0))
    if NEED_TA:
        tl.store(dta_ptr + pid, tl.sum(tl.where(mask, acc_ta, 0.0), axis=0))


_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _scalar(p, x):
    """(pointer tensor, float value, from_pointer) for θ or τ."""
    if isinstance(p, torch.Tensor):
        return p.detach(), 0.0, True
    return x, float(p), False


def forward(xf: torch.Tensor, theta, tau, v0: float, hard: bool, save_u: bool):
    """Spikes ``[T, M]`` (and the pre-reset membrane if ``save_u``) from a fresh state; ``xf`` is a
    contiguous ``[T, M]`` input."""
    T, M = xf.shape[0], xf[0].numel()
    s = torch.empty_like(xf)
    u = torch.empty_like(xf) if save_u else s
    th_p, th_v, th_f = _scalar(theta, xf)
    ta_p, ta_v, ta_f = _scalar(tau, xf)
    grid = (triton.cdiv(M, BLOCK),)
    if M > 0 and T > 0:
        _lif_fwd[grid](xf, s, u, th_p, ta_p, th_v, ta_v, float(v0), M, T, TH_PTR=th_f, TA_PTR=ta_f, HARD=hard,
                       SAVE_U=save_u, DT=_TL[xf.dtype], BLOCK=BLOCK, num_warps=4)
    return s, (u if save_u else None)


def backward(u: torch.Tensor, grad_s: torch.Tensor, theta, tau, v0: float, hard: bool, detach: bool, surrogate,
             need_th: bool, need_ta: bool, grad_u: "torch.Tensor | None" = None):
    """``(∂L/∂x, ∂L/∂θ or None, ∂L/∂τ or None)`` from the saved membrane and ``∂L/∂s`` (both ``[T, M]``);
    ``grad_u`` (``[T, M]``), when given, is ``∂L/∂u`` from a loss on the recorded membrane."""
    gs = grad_s.contiguous()
    gue = gs if grad_u is None else grad_u.contiguous().to(gs.dtype)
    T, M = u.shape[0], u[0].numel()
    gx = torch.empty_like(u)
    nprog = triton.cdiv(M, BLOCK)
    dth = torch.zeros(max(nprog, 1), dtype=torch.float32, device=u.device)
    dta = torch.zeros(max(nprog, 1), dtype=torch.float32, device=u.device)
    th_p, th_v, th_f = _scalar(theta, u)
    ta_p, ta_v, ta_f = _scalar(tau, u)
    kind, a = _surrogate_code(surrogate)
    if M > 0 and T > 0:
        _lif_bwd[(nprog,)](u, gs, gue, gx, dth, dta, th_p, ta_p, th_v, ta_v, float(v0), a, M, T, (T - 1) * M,
                           TH_PTR=th_f, TA_PTR=ta_f, HARD=hard, DETACH=detach, KIND=kind, NEED_TH=need_th,
                           NEED_TA=need_ta, HAS_GU=grad_u is not None, BLOCK=BLOCK, num_warps=4)
    return gx, (dth.sum() if need_th else None), (dta.sum() if need_ta else None)

