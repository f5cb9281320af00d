"""Fused multi-step LIF: one autograd node for the whole T loop, with a recomputing backward.

The reference path (:func:`fewstep.neurons.lif_update` per step under autograd) keeps several
tensors per step for backward (``u − θ``, ``u``, ``1 − s``, ...). The fused path keeps only the
pre-reset membrane ``u_t`` of each step (one-step buffers, which the CPU allocator recycles, where
a ``[T, ...]`` buffer would be fresh pages on every call) and recomputes the rest in backward:

    s_t = H(u_t − θ),  g_t = surrogate'(u_t − θ),  v_{t−1} from u_{t−1} (reset rule), v_{−1} = v0
    ∂v_t/∂u_t = (1 − s_t) − u_t·g_t  (hard)      or  1 − θ·g_t      (soft)
              = (1 − s_t)             (hard, detached reset)  or  1  (soft, detached reset)
    ∂L/∂u_t = ∂L/∂s_t · g_t + ∂L/∂v_t · ∂v_t/∂u_t,   ∂L/∂x_t = ∂L/∂u_t,   ∂L/∂v_{t−1} = τ · ∂L/∂u_t
    ∂L/∂τ  += Σ ∂L/∂u_t · v_{t−1}
    ∂L/∂θ  += Σ −∂L/∂s_t · g_t + ∂L/∂v_t · ∂v_t/∂θ,  ∂v_t/∂θ = u_t·g_t (hard), −s_t + θ·g_t (soft),
              0 / −s_t with a detached reset.

On CUDA, with Triton importable and a built-in surrogate, forward and backward are one Triton
launch each for all T steps (:mod:`fewstep.triton_lif`; ``FEWSTEP_TRITON=0`` turns it off); the
no-grad multi-step forward uses the same kernel without saving ``u``. Otherwise, per step, the
forward and backward bodies run as one ``torch.compile``-generated loop when the
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


def fallback(reason: str, what: str = "fused") -> None:
    """Log once per reason why a faster path is not taken (``what``: "fused" or "triton")."""
    if reason not in _reported:
        _reported.add(reason)
        if what == "triton":
            log.warning("fewstep: %s", reason)
        else:
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
    """Per-step forward and backward bodies on flat tensors (one fused loop each when compiled).

    ``fwd`` writes ``s`` (and ``u`` when given an output buffer); ``bwd`` adds ``gu_ext`` (∂L/∂u from
    a regulariser that reads the recorded membrane) to the membrane gradient when it is not None."""
    key = (type(surrogate).__name__, repr(surrogate), hard, detach, need_th, need_ta, compiled)
    if key in _KERNELS:
        return _KERNELS[key]
    sur = copy.deepcopy(surrogate)

    def fwd(x, v, th, ta, s_out, u_out):  # writes s (and u) into the stacked outputs; returns (u, v_next)
        u = ta * v + x
        s = ((u - th) >= 0).to(x.dtype)
        s_out.copy_(s)
        if u_out is not None:
            u_out.copy_(u)
        return u, (u * (1.0 - s) if hard else u - th * s)

    def bwd(u, u_prev, gs, gv, th, ta, v0: float, gx_out, gu_ext):
        s = ((u - th) >= 0).to(u.dtype)
        g = sur.grad(u - th)
        if hard:
            dv_du = (1.0 - s) if detach else (1.0 - s) - u * g
        else:
            dv_du = 1.0 if detach else 1.0 - th * g
        gu = gs * g + gv * dv_du
        if gu_ext is not None:
            gu = gu + gu_ext
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
                v_prev = v0
            else:
                sp = ((u_prev - th) >= 0).to(u.dtype)
                v_prev = u_prev * (1.0 - sp) if hard else u_prev - th * sp
            d_ta = (gu * v_prev).sum(dtype=torch.float32)
        return gu * ta, d_th, d_ta

    if compiled:
        # Each layer shape and the first/last step (scalar v or ∂L/∂v, no u_{t−1}) compile a variant; a
        # process that trains several architectures would pass Dynamo's default limit of 8 and silently
        # drop to eager, so allow more (the kernels are small).
        from torch._dynamo import config as dynamo_config  # (an `import torch.x` here would shadow torch)

        if hasattr(dynamo_config, "recompile_limit"):
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
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


_TRITON = None  # the fewstep.triton_lif module once imported, False if Triton cannot be imported
_TRITON_ERROR = ""


def _triton_module():
    global _TRITON, _TRITON_ERROR
    if _TRITON is None:
        try:
            from . import triton_lif

            _TRITON = triton_lif
        except Exception as exc:  # no Triton in this install (CPU wheels) or a broken toolchain
            _TRITON = False
            _TRITON_ERROR = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
    return _TRITON


def use_triton(x: torch.Tensor, surrogate, theta, tau, inference: bool = False) -> bool:
    """True when this call can run on the Triton kernels (CUDA, Triton importable, built-in surrogate).

    ``FEWSTEP_TRITON=0`` turns them off. On CPU tensors this is False unless ``TRITON_INTERPRET=1``.
    A CUDA call that cannot use them logs the reason once and takes the compiled/eager path.
    """
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):  # the common CPU case, first and cheap
        return False
    if os.environ.get("FEWSTEP_TRITON", "auto").lower() in ("0", "false", "off", "no"):
        return False
    mod = _triton_module()
    if not mod:
        fallback(f"Triton kernels unavailable ({_TRITON_ERROR}); using torch ops per step", "triton")
        return False
    why = mod.unsupported(x, None if inference else surrogate, theta, tau)
    if why is not None:
        fallback(f"Triton kernels not used: {why}; using torch ops per step", "triton")
        return False
    return True


def flat_time(x: torch.Tensor):
    """``(x2d, perm, unflatten)``: ``x2d [T, M]`` is ``x`` permuted by ``perm`` into memory order and
    flattened, without a copy when ``x`` is dense with time outermost (e.g. a stack of channels-last
    frames); ``unflatten(y2d)`` gives a tensor shaped and strided like ``x``."""
    perm = [0] + sorted(range(1, x.dim()), key=lambda d: -x.stride(d))
    xp = x.permute(perm)
    if not xp.is_contiguous():
        perm = list(range(x.dim()))
        xp = x.contiguous()
    inv = [perm.index(d) for d in range(x.dim())]
    shape = xp.shape

    def unflatten(y):
        return y.view(shape).permute(inv)

    return xp.reshape(x.shape[0], -1), perm, unflatten


class GradSink:
    """Per-step gradient contributions to one fused LIF node, from readers of its recorded membrane.

    A regulariser's gradient w.r.t. the recorded ``s`` and ``u`` is often structured (one sample per
    layer for RCS, one coefficient per step and sample for STR); handing autograd full-size ``[T, ...]``
    gradient tensors would cost more than the arithmetic (fresh activation-sized buffers). Instead,
    during backward, such a reader registers its contribution here and the node applies it inside
    its own backward, step by step, in one-step buffers:

    - :meth:`add_rows` ``(idx, gs_rows, gu_rows)``: ``∂L/∂s`` and ``∂L/∂u`` of samples ``idx`` only
      (``[T, k, F]`` each, or None), applied after each step's kernel as an exact correction of those
      rows (the step backward is linear in its incoming gradients);
    - :meth:`add_dense` ``fn(t, u_t) -> (gs_add, gu_add)``: terms broadcastable to ``[N, F]`` (or None)
      added to step t's incoming gradients.

    ``F`` is the flattened features of a sample in memory order (as :func:`fewstep.rcs.features`).
    Contributions must be registered before the node's own backward runs, which autograd guarantees
    for any consumer of ``s``/``u`` called from ``loss.backward()``. Readers only use a sink where the
    recorder allows it (``record(..., grad_sink=True)``, as the Trainer does): a sunk gradient is not
    visible to ``torch.autograd.grad(loss, u)``.
    """

    def __init__(self, n: int, usable: bool):
        self.n, self.usable = int(n), bool(usable)
        self.rows, self.dense = [], []

    def add_rows(self, idx: torch.Tensor, gs_rows, gu_rows) -> None:
        self.rows.append((idx, gs_rows, gu_rows))

    def add_dense(self, fn) -> None:
        self.dense.append(fn)

    def take(self):
        out = (self.rows, self.dense)
        self.rows, self.dense = [], []
        return out


def sink_of(u) -> "GradSink | None":
    """The :class:`GradSink` of a membrane recorded from the fused node (sample-major layout), else None."""
    sink = getattr(u, "_fewstep_sink", None)
    return sink if sink is not None and sink.usable else None


def _dense_extras(t, u_t, gs_t, gu_t, rows, dense, n):
    """Step t's ``(∂L/∂s_t, ∂L/∂u_t)`` with the sink's contributions added (one-step buffers)."""
    u2 = u_t.view(n, -1)
    gs2, gu2 = gs_t.view(n, -1), (None if gu_t is None else gu_t.view(n, -1))
    for fn in dense:
        a, b = fn(t, u2)
        if a is not None:
            gs2 = gs2 + a
        if b is not None:
            gu2 = b.expand_as(u2).contiguous() if gu2 is None else gu2 + b
    if rows:
        gs2 = gs2.clone() if gs2.data_ptr() == gs_t.data_ptr() else gs2
        gu2 = torch.zeros_like(u2) if gu2 is None else (gu2.clone() if gu_t is not None and gu2.data_ptr() ==
                                                        gu_t.data_ptr() else gu2)
        for idx, gs_r, gu_r in rows:
            if gs_r is not None:
                gs2.index_add_(0, idx, gs_r[t].to(gs2.dtype))
            if gu_r is not None:
                gu2.index_add_(0, idx, gu_r[t].to(gu2.dtype))
    return gs2.reshape(-1), (None if gu2 is None else gu2.reshape(-1))


def _row_corrections(t, u_t, rows, gx_t, grad_v, th, ta, surrogate, n):
    """Add the rows' contributions after step t's kernel: δ = gs_e·g(u − θ) + gu_e on ∂L/∂x_t, τ·δ on ∂L/∂v_{t−1}."""
    for idx, gs_r, gu_r in rows:
        delta = 0.0
        if gs_r is not None:
            delta = gs_r[t].to(u_t.dtype) * surrogate.grad(u_t.view(n, -1).index_select(0, idx) - th)
        if gu_r is not None:
            delta = delta + gu_r[t].to(u_t.dtype)
        gx_t.view(n, -1).index_add_(0, idx, delta)
        if isinstance(grad_v, torch.Tensor):
            grad_v.view(n, -1).index_add_(0, idx, delta * ta)


def _forward_loop(x_at, T: int, like, th, ta, v0: float, cfg, compiled, s_out, u_out=None) -> list:
    """Run the LIF over ``T`` steps; ``x_at(t)`` gives step t's flat input. Writes ``s_out[t]`` and
    returns the per-step membranes ``u_t`` as separate tensors: one-step buffers are small enough
    for the CPU allocator to recycle, where a ``[T, M]`` buffer would be fresh pages every call.
    With ``u_out`` (``[T, M]``, the recorded membrane) the membranes are written there and the
    returned ``u_t`` are its rows, so recording costs no second copy for backward."""
    v = v0 if v0 == 0.0 else torch.full_like(like, v0)  # a scalar start spares a full-size fill
    us = []
    for t in range(T):
        u, v = _run(0, (x_at(t), v, th, ta, s_out[t], None if u_out is None else u_out[t]), cfg, compiled)
        us.append(u if u_out is None else u_out[t])
    return us


def _backward_loop(u_all, gs_all, th, ta, v0: float, cfg, compiled, gu_all=None, extras=None, n=1):
    """``(∂L/∂x [T, M], ∂L/∂θ, ∂L/∂τ)`` from the per-step membranes and ``∂L/∂s`` (plus ``∂L/∂u``
    from a reader of the recorded membrane, when given, and a :class:`GradSink`'s ``extras =
    (rows, dense)``, applied step by step), back in time."""
    need_th, need_ta = cfg[3], cfg[4]
    rows, dense = extras or ([], [])
    if rows and (need_th or need_ta):  # the after-kernel correction does not cover θ/τ: apply rows before
        dense_rows, rows = rows, []
    else:
        dense_rows = []
    grad_x = gs_all.new_empty(gs_all.shape)
    grad_v = 0.0  # ∂L/∂v after the last step; a scalar spares a full-size fill
    d_th = torch.zeros((), dtype=torch.float32, device=gs_all.device)
    d_ta = torch.zeros((), dtype=torch.float32, device=gs_all.device)
    for t in range(len(u_all) - 1, -1, -1):
        u_prev = u_all[t - 1] if t > 0 else None
        gs_t, gu_ext = gs_all[t], (None if gu_all is None else gu_all[t])
        if dense or dense_rows:
            gs_t, gu_ext = _dense_extras(t, u_all[t], gs_t, gu_ext, dense_rows, dense, n)
        grad_v, dth, dta = _run(1, (u_all[t], u_prev, gs_t, grad_v, th, ta, v0, grad_x[t], gu_ext), cfg, compiled)
        if rows:
            _row_corrections(t, u_all[t], rows, grad_x[t], grad_v, th, ta, cfg[0], n)
        if need_th:
            d_th = d_th + dth
        if need_ta:
            d_ta = d_ta + dta
    return grad_x, d_th, d_ta


def _param_grads(theta, tau, cfg, d_th, d_ta):
    return (d_th.to(theta.dtype) if cfg[3] else None), (d_ta.to(tau.dtype) if cfg[4] else None)


class FusedLIF(torch.autograd.Function):
    """Spikes (and, with ``return_u``, the pre-reset membrane) of a multi-step LIF; see the module doc.

    The membrane output costs nothing extra: it is the tensor backward keeps anyway. A loss that
    reads it (a regulariser) sends ``∂L/∂u`` back, which backward adds to the membrane gradient."""

    @staticmethod
    def forward(ctx, x, theta, tau, v0: float, hard: bool, detach: bool, surrogate, return_u: bool = False):
        ctx.set_materialize_grads(False)
        need_th = isinstance(theta, torch.Tensor) and theta.requires_grad
        need_ta = isinstance(tau, torch.Tensor) and tau.requires_grad
        params = tuple(p for p in (theta, tau) if isinstance(p, torch.Tensor))
        ctx.n_params = len(params)
        cfg = (surrogate, hard, detach, need_th, need_ta)
        xf, perm, unflatten = flat_time(x)
        ctx.layout = (perm, unflatten)
        ctx.shape = xf.shape
        ctx.sink = GradSink(x.shape[1], usable=x.dim() >= 2 and perm[1] == 1) if return_u else None
        if use_triton(x, surrogate, theta, tau):
            s_all, u_all = _TRITON.forward(xf, theta, tau, v0, hard, save_u=True)
            ctx.save_for_backward(u_all, *params)
            ctx.cfg = (theta, tau, v0, cfg, "triton")
            return FusedLIF._outputs(ctx, unflatten, s_all, u_all if return_u else None)
        compiled = _use_compile(xf[0].numel())
        s_all = torch.empty_like(xf)
        u_all = torch.empty_like(xf) if return_u else None
        us = _forward_loop(xf.__getitem__, xf.shape[0], xf[0], _value(theta), _value(tau), v0, cfg, compiled, s_all,
                           u_all)
        if return_u:
            ctx.save_for_backward(u_all, *params)
        else:
            ctx.save_for_backward(*us, *params)
        ctx.stacked = return_u
        ctx.cfg = (theta, tau, v0, cfg, compiled)
        return FusedLIF._outputs(ctx, unflatten, s_all, u_all)

    @staticmethod
    def _outputs(ctx, unflatten, s_all, u_all):
        if u_all is None:
            return unflatten(s_all)
        u = unflatten(u_all)
        u._fewstep_sink = ctx.sink  # found by fused.sink_of(u)
        return unflatten(s_all), u

    @staticmethod
    def backward(ctx, grad_s, grad_u=None):
        theta, tau, v0, cfg, compiled = ctx.cfg
        perm, unflatten = ctx.layout
        saved = ctx.saved_tensors
        flat = lambda g: g.permute(perm).reshape(ctx.shape)  # noqa: E731  (a copy only if g's layout differs from x's)
        if grad_s is None:  # only the membrane output was used
            gs_all = torch.zeros(ctx.shape, dtype=saved[0].dtype, device=saved[0].device)
        else:
            gs_all = flat(grad_s)
        gu_all = None if grad_u is None else flat(grad_u)
        extras = ctx.sink.take() if ctx.sink is not None else ([], [])
        n = ctx.sink.n if ctx.sink is not None else 1
        if (extras[0] or extras[1]) and compiled == "triton":  # one launch for all steps: apply them densely first
            u_all, gs_parts, gu_parts = saved[0], [], []
            for t in range(u_all.shape[0]):
                a, b = _dense_extras(t, u_all[t], gs_all[t], None if gu_all is None else gu_all[t], *extras, n)
                gs_parts.append(a)
                gu_parts.append(torch.zeros_like(a) if b is None else b)
            gs_all, gu_all, extras = torch.stack(gs_parts), torch.stack(gu_parts), None
        if compiled == "triton":
            gx, d_th, d_ta = _TRITON.backward(saved[0], gs_all, theta, tau, v0, cfg[1], cfg[2], cfg[0], cfg[3], cfg[4],
                                              grad_u=gu_all)
        else:
            u_all = saved[0] if ctx.stacked else saved[:len(saved) - ctx.n_params]
            gx, d_th, d_ta = _backward_loop(u_all, gs_all, _value(theta), _value(tau), v0, cfg, compiled, gu_all,
                                            extras, n)
        return (unflatten(gx), *_param_grads(theta, tau, cfg, d_th, d_ta), None, None, None, None, None)


def lif_inference_triton(x, theta, tau, v0: float, reset: str, return_u: bool = False):
    """No-grad multi-step spikes through the Triton forward kernel, or None where it cannot run.

    ``return_u`` also returns the pre-reset membrane (for recording): ``(s, u)``."""
    if not use_triton(x, None, theta, tau, inference=True):
        return None
    xf, _, unflatten = flat_time(x)
    s, u = _TRITON.forward(xf, theta, tau, v0, reset == "hard", save_u=return_u)
    return (unflatten(s), unflatten(u)) if return_u else unflatten(s)


def lif_multi_step_fused(x, theta, tau, v0: float, reset: str, detach_reset: bool, surrogate, return_u: bool = False):
    """Spikes ``[T, ...]`` of a LIF run from a fresh state (fused forward and backward).

    ``return_u=True`` returns ``(spikes, u)`` with the pre-reset membrane ``u [T, ...]``; gradients
    flow through both outputs."""
    return FusedLIF.apply(x, theta, tau, float(v0), reset == "hard", bool(detach_reset), surrogate, bool(return_u))
