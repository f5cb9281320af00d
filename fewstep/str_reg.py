"""STR regulariser ("spatial-temporal regulariser") for anytime-optimal SNNs — a reconstruction.

*Towards Anytime Optimal Inference in SNNs*, arXiv 2405.00699 (METHODS §3). The paper says only
that STR "regulates the ratio between the strength of spikes and membrane potential at each
timestep", is used with TET and the softmax cutoff, with coefficients 0.05–0.1 on frame data and
0.5 on event data. **No equation or code was published.** fewstep implements the reading given in
METHODS §3, and keeps its form in one place (:data:`FORMS`) so that it is easy to change.

For each spiking layer l, sample n and step t, with spikes ``s(t)`` and the pre-reset membrane
``u(t)``, the spatial-temporal factor is the share of the layer's drive released as spikes::

    STF_n^l(t) = ‖s_n(t)‖₁ / ( ‖s_n(t)‖₁ + ‖ReLU(u_n(t)) / θ‖₁ + ε )

and the regulariser asks every step to carry the same balance (form ``"share"``, the default)::

    STR = mean_{l,n} (1/T) Σ_t ( STF_n^l(t) − stopgrad(mean_k STF_n^l(k)) )²
    loss = λ_STR · STR                                     (added to the TET loss)

Other forms, for ablation (choose with ``form``):

- ``"tail"``: the target is the mean STF over the last ⌈T/2⌉ steps (the early steps are pulled
  towards the late balance, not the other way round);
- ``"log"``: the same variance on ``log(STF + 0.01)`` (relative deviations, so layers and samples
  that fire little are not ignored).

A sample or layer with no drive at all (STF = 0 at every step) contributes 0.
"""

from __future__ import annotations

import math

import torch

FORMS = ("share", "tail", "log")
EPS = 1e-6


class _Norms(torch.autograd.Function):
    """``(‖s‖₁, ‖ReLU(u)‖₁)`` per step and sample from flat ``[T, N, F]`` tensors (spikes are ≥ 0).

    The same numbers autograd would give, without full-size temporaries (a fresh activation-sized
    tensor costs more than the arithmetic on a CPU): ``Σ ReLU(u) = (Σu + Σ|u|) / 2`` as two read-only
    reductions (torch sums float32 in cascades, so the cancellation costs ~1e-7 of Σ|u|). Backward:
    ``∂/∂s`` is the coefficient broadcast over the features and ``∂/∂u`` the coefficient where u > 0,
    handed step by step to the fused LIF's :class:`fewstep.fused.GradSink` when there is one."""

    @staticmethod
    def forward(ctx, s, u, sink):
        ctx.save_for_backward(u)
        ctx.sink = sink
        s1 = s.sum(-1, dtype=torch.float32)
        m1 = (u.sum(-1, dtype=torch.float32) + torch.linalg.vector_norm(u.float(), 1, dim=-1)) / 2
        return s1, m1.clamp(min=0)

    @staticmethod
    def backward(ctx, g_s, g_u):
        (u,) = ctx.saved_tensors
        if ctx.sink is not None:
            def add(t, u_t):
                a = None if g_s is None else g_s[t].to(u_t.dtype).unsqueeze(-1)
                b = None if g_u is None else u_t.clamp(min=0).sign_().mul_(g_u[t].to(u_t.dtype).unsqueeze(-1))
                return a, b

            ctx.sink.add_dense(add)
            return None, None, None
        gs = None if g_s is None else g_s.to(u.dtype).unsqueeze(-1).expand(u.shape)
        gu = None if g_u is None else u.clamp(min=0).sign_().mul_(g_u.to(u.dtype).unsqueeze(-1))
        return gs, gu, None


def stf(spikes: torch.Tensor, u: torch.Tensor, theta=1.0, sink=None) -> torch.Tensor:
    """``STF [T, N]`` of one layer from spikes and pre-reset membrane ``[T, N, ...]``.

    ``sink``: the fused node's :class:`fewstep.fused.GradSink` of this layer, or None (dense gradients)."""
    from .rcs import features, sink_for

    if spikes.shape != u.shape or spikes.dim() < 2:
        raise ValueError(f"str: spikes {list(spikes.shape)} and membrane {list(u.shape)} must both be [T, N, ...]")
    sf, uf = features(spikes), features(u)
    s1, m1 = _Norms.apply(sf, uf, sink_for(sink_for(sink, uf, u), sf, spikes))
    m1 = m1 / theta
    return s1 / (s1 + m1 + EPS)


def str_term(share: torch.Tensor, form: str = "share") -> torch.Tensor:
    """``(1/T) Σ_t (f(t) − stopgrad(target))²`` averaged over samples, from ``STF [T, N]``."""
    if form not in FORMS:
        raise ValueError(f"str form must be one of {list(FORMS)}, got {form!r}")
    T = share.shape[0]
    f = torch.log(share + 0.01) if form == "log" else share
    if form == "tail":
        k = max(1, math.ceil(T / 2))
        target = f[T - k:].mean(0).detach()
    else:
        target = f.mean(0).detach()
    return (f - target).pow(2).mean()


def str_loss(layers: list, form: str = "share") -> torch.Tensor:
    """``mean_l STR^l`` (without λ) over ``layers = [(spikes, u, theta[, sink]), ...]``."""
    if not layers:
        raise ValueError("str: no spiking layer to regularise")
    return torch.stack([str_term(stf(s, u, th, extra[0] if extra else None), form)
                        for s, u, th, *extra in layers]).mean()


class STR:
    """The STR term as a Trainer regulariser: ``(logits, y, rec) -> λ · STR`` (see the module doc)."""

    name = "str"
    fields = ("spikes", "u")

    def __init__(self, weight: float = 0.1, form: str = "share"):
        if weight < 0:
            raise ValueError(f"str weight must be >= 0, got {weight}")
        if form not in FORMS:
            raise ValueError(f"str form must be one of {list(FORMS)}, got {form!r}")
        self.weight, self.form = float(weight), form

    def __call__(self, logits, y, rec):
        from .regularizers import recorded_layers

        from .fused import sink_of

        names = recorded_layers(rec, self.name)
        spikes, u = rec.spikes, rec.u
        layers = [(spikes[n], u[n], rec.theta(n), sink_of(u[n]) if rec.grad_sink else None) for n in names]
        return self.weight * str_loss(layers, self.form)

    def __repr__(self):
        return f"STR(weight={self.weight:g}, form={self.form!r})"
