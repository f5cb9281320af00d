"""RCS regulariser: train an SNN whose per-step activity already looks like its final answer.

Wu et al., *Optimising Event-Driven Spiking Neural Network with Regularisation and Cutoff*,
arXiv 2301.09522 (METHODS §1). For every spiking layer l and sample n, with spikes ``s(t)`` and the
post-reset membrane ``v(t)`` (derived from the recorded pre-reset ``u(t)`` by the neuron's reset rule)::

    r_n(t)   = s_n(t) + ReLU(v_n(t) / θ)                       spike plus positive residual membrane
    r_d,n    = stopgrad( mean of r_n(t) over the last k = max(1, ⌈β·T⌉) steps )
    RCS_n^l  = 1 / ( mean_t cos(r_n(t), r_d,n) + 1e-5 )        cosine over the layer's features
    loss     = α · mean_l  max_n ( m_n · RCS_n^l )             reduction "max" (the paper)
             = α · mean_l  mean_{n: m_n = 1} RCS_n^l            reduction "mean"

``m_n = 1`` for samples whose per-step prediction ``argmax O(t)`` is right at every step of the
same tail window (only correct samples are regularised; ``correct_only=False`` regularises all).
RCS is ≈ 1 when a sample's activity points the same way at every step, and grows as early steps
diverge from the late ones, so the cutoff can stop earlier without changing the answer.

Where fewstep departs from the seed code, on purpose:

- the tail has at least one step (the seed code used ⌊β·T⌋ and silently fell back to all steps
  when that was 0);
- a sample whose tail is silent in a layer (``r_d = 0``: no spike, no positive membrane) has no
  direction to agree with; the seed code's guards turn it into RCS = 1e5 with zero gradient, which
  under ``max`` hides every other sample of the layer. fewstep leaves such samples out of the mask.

α in the seed scripts: 0.001–0.005 (fewstep's default 0.003).
"""

from __future__ import annotations

import math

import torch

REDUCTIONS = ("max", "mean")
EPS = 1e-5  # the paper's: RCS = 1 / (mean cos + 1e-5)


def tail_steps(T: int, beta: float) -> int:
    """Steps in the tail window: ``max(1, ⌈β·T⌉)``, at most T."""
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"rcs beta is the tail fraction of T in (0, 1], got {beta}")
    return min(T, max(1, math.ceil(beta * T - 1e-9)))


def features(x: torch.Tensor) -> torch.Tensor:
    """``[T, N, ...]`` → ``[T, N, F]`` with the features in memory order: a view, never a copy
    (channels-last activations would be copied by a plain ``flatten(2)``). Per-sample sums and norms
    over F do not depend on the order."""
    if x.dim() == 3:
        return x
    lead = [0, 1] if x.stride(0) >= x.stride(1) else [1, 0]
    perm = lead + sorted(range(2, x.dim()), key=lambda d: -x.stride(d))
    xp = x.permute(perm)
    if lead == [1, 0] or not xp.is_contiguous():
        return x.flatten(2)
    return xp.reshape(x.shape[0], x.shape[1], -1)


def sink_for(sink, flat: torch.Tensor, recorded: torch.Tensor):
    """``sink`` where ``flat`` (from :func:`features`) is a view of the recorded tensor, so its feature order is
    the fused node's memory order; None (dense gradients) where :func:`features` had to copy."""
    return sink if sink is not None and flat.data_ptr() == recorded.data_ptr() else None


def _r(s, u, theta, hard: bool, detach: bool):
    """``r = s + ReLU(v/θ)`` with ``v`` the post-reset membrane derived from ``u`` and ``s``."""
    sr = s.detach() if detach else s
    v = u * (1.0 - sr) if hard else u - theta * sr
    return s + torch.relu(v) / theta


def _consistency(s, u, theta, hard: bool, detach: bool, k: int):
    """Per-sample RCS and whether the tail is active, from flat ``[T, N, F]`` spikes and membrane."""
    T = s.shape[0]
    r = _r(s.float(), u.float(), theta, hard, detach)
    target = r[T - k:].mean(0).detach()  # [N, F]
    t_norm = torch.linalg.vector_norm(target, dim=-1)  # [N]
    r_norm = torch.linalg.vector_norm(r, dim=-1)  # [T, N]
    dot = (r * target).sum(-1)
    cos = dot / (r_norm * t_norm).clamp_min(1e-12)
    return 1.0 / (cos.mean(0) + EPS), t_norm > 0


_COMPILED = {}


def _scan(s, u, theta, hard, detach, k):
    """Every sample's RCS without autograd: one compiled kernel on large activations (as the fused LIF's,
    ``FEWSTEP_COMPILE`` applies), eager ops otherwise or when the compiler is unavailable."""
    import os

    from . import fused

    th = float(theta.detach()) if isinstance(theta, torch.Tensor) else float(theta)
    if fused._use_compile(s[0].numel()):
        key = (hard, detach)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(_consistency, dynamic=True)
        try:
            return _COMPILED[key](s, u, th, hard, detach, k)
        except Exception as exc:  # a compiler problem must never stop training
            fused.fallback(f"torch.compile failed for RCS ({type(exc).__name__}); using eager ops", "triton")
            os.environ["FEWSTEP_COMPILE"] = "0"
    return _consistency(s, u, th, hard, detach, k)


def consistency(spikes: torch.Tensor, u: torch.Tensor, theta=1.0, beta: float = 0.3, reset: str = "hard",
                detach_reset: bool = False):
    """Per-sample ``RCS_n`` of one layer and whether its tail is active: ``(rcs [N], active [N])``.

    ``spikes`` and ``u`` (pre-reset membrane) are ``[T, N, ...]``; ``v`` follows from the reset rule.
    Differentiable in ``spikes``, ``u`` and a tensor ``theta``.
    """
    if spikes.shape != u.shape or spikes.dim() < 2:
        raise ValueError(f"rcs: spikes {list(spikes.shape)} and membrane {list(u.shape)} must both be [T, N, ...]")
    return _consistency(features(spikes), features(u), theta, reset == "hard", detach_reset,
                        tail_steps(spikes.shape[0], beta))


def correct_mask(logits: torch.Tensor, y: torch.Tensor, beta: float = 0.3) -> torch.Tensor:
    """``m_n``: the per-step prediction ``argmax O(t)`` is right at every step of the tail window."""
    T = logits.shape[0]
    k = tail_steps(T, beta)
    return (logits[T - k:].detach().argmax(-1) == y.view(1, -1)).all(0)


class _Term(torch.autograd.Function):
    """``reduce(RCS)`` over the samples ``idx`` of one layer (flat ``[T, N, F]`` inputs).

    Backward reruns autograd on those samples only and hands the rows' gradients to the fused LIF's
    :class:`fewstep.fused.GradSink` when there is one, else returns them as dense tensors."""

    @staticmethod
    def forward(ctx, s, u, idx, theta: float, hard: bool, detach: bool, k: int, reduction: str, sink):
        ctx.save_for_backward(s, u, idx)
        ctx.cfg, ctx.sink = (theta, hard, detach, k, reduction), sink
        rcs, _ = _consistency(s.index_select(1, idx), u.index_select(1, idx), theta, hard, detach, k)
        return rcs.max() if reduction == "max" else rcs.mean()

    @staticmethod
    def backward(ctx, g):
        s, u, idx = ctx.saved_tensors
        theta, hard, detach, k, reduction = ctx.cfg
        with torch.enable_grad():
            ss = s.index_select(1, idx).detach().requires_grad_(True)
            uu = u.index_select(1, idx).detach().requires_grad_(True)
            rcs, _ = _consistency(ss, uu, theta, hard, detach, k)
            value = rcs.max() if reduction == "max" else rcs.mean()
            gs_rows, gu_rows = torch.autograd.grad(value, (ss, uu), g)
        none = (None,) * 7
        if ctx.sink is not None:
            ctx.sink.add_rows(idx, gs_rows, gu_rows)
            return (None, None) + none
        gs = torch.zeros_like(s).index_add_(1, idx, gs_rows.to(s.dtype))
        gu = torch.zeros_like(u).index_add_(1, idx, gu_rows.to(u.dtype))
        return (gs, gu) + none


def layer_term(s, u, theta, mask, beta: float = 0.3, reduction: str = "max", reset: str = "hard",
               detach_reset: bool = False, sink=None) -> torch.Tensor:
    """``reduce_n(m_n · RCS_n)`` of one layer, with the gradient of the exact definition.

    Every sample's RCS is first computed without autograd; autograd then reruns only the samples the
    reduction sends gradient to (one under ``max``, the masked ones under ``mean``), which gives the
    same value and gradient as differentiating through the whole batch at a fraction of the cost.
    θ is treated as a constant (a learnable threshold gets no gradient from RCS). ``sink``: the fused
    node's :class:`fewstep.fused.GradSink` of this layer, or None for dense gradients.
    """
    if s.shape != u.shape or s.dim() < 2:
        raise ValueError(f"rcs: spikes {list(s.shape)} and membrane {list(u.shape)} must both be [T, N, ...]")
    hard, k = reset == "hard", tail_steps(s.shape[0], beta)
    th = float(theta.detach()) if isinstance(theta, torch.Tensor) else float(theta)
    sf, uf = features(s), features(u)
    with torch.no_grad():
        rcs_all, active = _scan(sf, uf, th, hard, detach_reset, k)
        m = mask & active
    if not bool(m.any()):
        return torch.zeros((), device=s.device)  # nothing to regularise in this batch
    idx = (m.float() * rcs_all).argmax().view(1) if reduction == "max" else m.nonzero().view(-1)
    sink = sink_for(sink_for(sink, uf, u), sf, s)
    return _Term.apply(sf, uf, idx, th, hard, detach_reset, k, reduction, sink)


def rcs_loss(logits: torch.Tensor, y: torch.Tensor, layers: list, beta: float = 0.3, reduction: str = "max",
             correct_only: bool = True) -> torch.Tensor:
    """``mean_l reduce_n(m_n · RCS_n^l)`` (without α) over ``layers = [(spikes, u, theta, reset, detach[, sink]), ...]``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"rcs reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    if not layers:
        raise ValueError("rcs: no spiking layer to regularise")
    base = correct_mask(logits, y, beta) if correct_only else torch.ones_like(y, dtype=torch.bool)
    terms = [layer_term(s, u, th, base, beta, reduction, reset, det, extra[0] if extra else None)
             for s, u, th, reset, det, *extra in layers]
    return torch.stack(terms).mean()


def reset_rule(module, name: str) -> tuple[str, bool]:
    """``(reset, detach_reset)`` of a recorded neuron, needed to derive ``v`` from ``u``."""
    reset, detach = getattr(module, "reset_mode", None), getattr(module, "detach_reset", None)
    if reset not in ("hard", "soft") or detach is None:
        raise ValueError(f"rcs needs the reset rule of spiking layer {name!r} ({type(module).__name__}): give it the "
                         "attributes reset_mode ('hard' or 'soft') and detach_reset, as fewstep.LIF has")
    return reset, bool(detach)


class RCS:
    """The RCS term as a Trainer regulariser: ``(logits, y, rec) -> α · loss`` (see the module doc)."""

    name = "rcs"
    fields = ("spikes", "u")

    def __init__(self, weight: float = 0.003, beta: float = 0.3, reduction: str = "max", correct_only: bool = True):
        if weight < 0:
            raise ValueError(f"rcs weight must be >= 0, got {weight}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"rcs reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
        tail_steps(1, beta)  # validates beta
        self.weight, self.beta, self.reduction, self.correct_only = float(weight), float(beta), reduction, correct_only

    def __call__(self, logits, y, rec):
        from .regularizers import recorded_layers

        names = recorded_layers(rec, self.name)
        spikes, u = rec.spikes, rec.u
        from .fused import sink_of

        layers = [(spikes[n], u[n], rec.theta(n), *reset_rule(rec.modules[n], n),
                   sink_of(u[n]) if rec.grad_sink else None) for n in names]
        return self.weight * rcs_loss(logits, y, layers, self.beta, self.reduction, self.correct_only)

    def __repr__(self):
        return (f"RCS(weight={self.weight:g}, beta={self.beta:g}, reduction={self.reduction!r}, "
                f"correct_only={self.correct_only})")


# ------------------------------------------------------------------------------------------ RCS-ANN
MAX_SCOPES = ("sample", "batch")


def ann_ratio(x: torch.Tensor, scope: str = "sample") -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample ``max(x⁺) / RMS(x⁺)`` of a quantised layer's input ``x [T, N, ...]`` (time and features
    together), and whether the sample has any positive input (a silent one has no ratio).
    ``scope="batch"``: the numerator is the batch-global max, as the seed code had it."""
    xp = torch.relu(features(x).float()).transpose(0, 1).reshape(x.shape[1], -1)  # [N, T·F]
    rms = xp.pow(2).mean(1).sqrt()
    peak = xp.amax(1) if scope == "sample" else xp.amax().expand(xp.shape[0])
    active = rms > 0
    return peak / rms.clamp_min(torch.finfo(rms.dtype).tiny), active


class RCSANN:
    """RCS for the ANN phase of conversion (METHODS §1, "RCS-ANN"): ``α · mean_l reduce_n(m_n · max(x⁺)/RMS(x⁺))``
    over the inputs ``x`` of every QCFS layer, with the same correct-sample mask and reductions as :class:`RCS`.

    A layer whose inputs have a few large peaks over a low mean needs many IF steps before its rate
    is right; RCS-ANN flattens them, so the converted network settles sooner and the cutoff stops
    earlier. ``max_scope="sample"`` (fewstep, METHODS) takes each sample's own peak; ``"batch"`` the
    batch-global peak of the seed code. Samples with no positive input in a layer are left out.
    """

    name = "rcs_ann"
    fields = ("u",)

    def __init__(self, weight: float = 0.003, reduction: str = "max", correct_only: bool = True,
                 max_scope: str = "sample"):
        if weight < 0:
            raise ValueError(f"rcs_ann weight must be >= 0, got {weight}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"rcs_ann reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
        if max_scope not in MAX_SCOPES:
            raise ValueError(f"rcs_ann max_scope must be one of {list(MAX_SCOPES)}, got {max_scope!r}")
        self.weight, self.reduction, self.correct_only, self.max_scope = float(weight), reduction, correct_only, max_scope

    def __call__(self, logits, y, rec):
        from .qcfs import QCFS
        from .regularizers import recorded_layers

        names = recorded_layers(rec, self.name, ann=True)
        not_q = [f"{n} ({type(rec.modules[n]).__name__})" for n in names if not isinstance(rec.modules[n], QCFS)]
        if not_q:
            raise ValueError(f"the rcs_ann regularizer reads the inputs of QCFS layers (an ANN for conversion), but "
                             f"{', '.join(not_q)} are spiking neurons: use model.neuron: qcfs, or the rcs regularizer")
        base = correct_mask(logits, y, 1.0) if self.correct_only else torch.ones_like(y, dtype=torch.bool)
        u, terms = rec.u, []
        for n in names:
            ratio, active = ann_ratio(u[n], self.max_scope)
            m = base & active
            if not bool(m.any()):
                terms.append(ratio.sum() * 0.0)
            elif self.reduction == "max":
                terms.append(ratio[m].max())
            else:
                terms.append(ratio[m].mean())
        return self.weight * torch.stack(terms).mean()

    def __repr__(self):
        return (f"RCSANN(weight={self.weight:g}, reduction={self.reduction!r}, correct_only={self.correct_only}, "
                f"max_scope={self.max_scope!r})")
