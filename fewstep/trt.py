"""TRT, temporal reversed training — fewstep's reading of a method whose loss was never published.

arXiv 2408.09108 (v3: "Temporal Reversal Regularization"; METHODS §4). **From the paper** (its
abstract): reverse the input in time for event or sequence data and ask the outputs on the
original and the reversed input to agree; for static input, which is identical at every step,
reverse the *spike features* inside the network instead; hybridise the original and reversed
firing rates with an element-wise "star" product; extra heads exist only during training, so
inference costs what it did. **fewstep's reading** (the loss weights, the divergence, the reversal
layer and the head layout are not published; every choice is an option)::

    f_o = features(x)                                  input of the classifier head, [T, N, D]
    f_r = features(x.flip(0))                          event input (reverse = "input"), or
        = features with the spikes of layer reverse_at flipped in time  (static input, "layer")
    r_o, r_r = f_o.mean(0), f_r.mean(0)                firing rates
    z_o = mean_t logits(x),  z_r = mean_t head_r(f_r)  head_r: the model's head (shared) or a copy
    z_h = head_star(r_o ⊙ r_r)                         head_star: a new Linear, training only
    L = base(logits, y) + w_r · base(head_r(f_r), y) + w_h · CE(z_h, y) + λ · D(z_o, z_r)

``base`` is the run's loss (TET or mean-CE), so the consistency always compares time-averaged
logits. ``D``: ``kl`` = τ²·KL(softmax(z_o/τ) ‖ softmax(z_r/τ)) (gradient to both branches),
``sym_kl`` = the mean of both directions, ``mse`` = mean squared difference of the logits.
Defaults w_r = w_h = λ = 1, τ = 2, reverse_at = the first spiking layer, shared head. Where a model
pools between its last spiking layer and its head (vggsnn, resnets), the features are the pooled
ones (the head is linear, so z_o is unchanged; only the star product is taken after pooling).

TRT plugs into the Trainer's regulariser hook: it reads the model and its input from the recording
(``rec.model``, ``rec.input``), runs the reversed branch itself, and its heads are parameters of the
regulariser, trained and checkpointed beside the model but never part of it: the saved model is
the plain model (same parameters, outputs and speed).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

CONSISTENCY = ("kl", "sym_kl", "mse")
REVERSE = ("auto", "input", "layer")


class TRT(nn.Module):
    """The TRT terms as a Trainer regulariser (see the module doc). Call :meth:`setup` before use."""

    name = "trt"
    runs_model = True  # the reversed branch runs the model a second time (fewstep.distributed averages by hand)
    fields = ()  # reads the model and its input, not the recorded spikes

    def __init__(self, reversed_weight: float = 1.0, star_weight: float = 1.0, lam: float = 1.0, tau: float = 2.0,
                 consistency: str = "kl", reverse: str = "auto", reverse_at: "str | None" = None,
                 share_head: bool = True):
        super().__init__()
        if consistency not in CONSISTENCY:
            raise ValueError(f"trt consistency must be one of {list(CONSISTENCY)}, got {consistency!r}")
        if reverse not in REVERSE:
            raise ValueError(f"trt reverse must be one of {list(REVERSE)}, got {reverse!r}")
        for key, v in (("reversed_weight", reversed_weight), ("star_weight", star_weight), ("lam", lam)):
            if not v >= 0:
                raise ValueError(f"trt {key} must be >= 0, got {v}")
        if not tau > 0:
            raise ValueError(f"trt tau must be > 0, got {tau}")
        self.reversed_weight, self.star_weight, self.lam, self.tau = map(float, (reversed_weight, star_weight, lam, tau))
        self.consistency, self.reverse, self.reverse_at, self.share_head = consistency, reverse, reverse_at, share_head
        self.head_rev: "nn.Module | None" = None
        self.head_star: "nn.Module | None" = None
        self._ready = False

    # ------------------------------------------------------------------------------------------- set-up
    def setup(self, trainer=None, model=None, T: int | None = None, kind: str | None = None, base_loss=None):
        """Attach to a model: check the interface and T, choose the reversal, build the training-only heads.

        Called by the Trainer with itself; or with ``model``, ``T``, ``kind`` ("static"/"frames") and
        ``base_loss`` ``(logits[T, N, C], y) -> scalar`` directly."""
        if trainer is not None:
            model, T, kind, base_loss = trainer.model, trainer.cfg.data.T, trainer.bundle.kind, trainer.loss_fn
        name = getattr(model, "model_name", type(model).__name__)
        if not (hasattr(model, "spiking_layers") and hasattr(model, "classifier_head")):
            raise ValueError(f"TRT needs a model with the stem/trunk/head interface of fewstep.models.SNN "
                             f"(spiking_layers(), classifier_head()); model {name!r} has none")
        if T is None or int(T) < 2:
            raise ValueError(f"TRT reverses spike trains in time, which needs T >= 2; this run has T = {T}: nothing to "
                             "reverse")
        layers = dict(model.spiking_layers())
        if not layers:
            raise ValueError(f"TRT: model {name!r} has no spiking layer")
        at = self.reverse_at or next(iter(layers))
        if at not in layers:
            raise ValueError(f"trt reverse_at {at!r} is not a spiking layer of model {name!r}; valid names: "
                             f"{', '.join(layers)}")
        self.static = (kind == "static") if self.reverse == "auto" else (self.reverse == "layer")
        if self.static and not getattr(model, "spikes_time_first", True):
            raise ValueError(f"TRT: model {name!r} runs every step independently and its spiking layers do not see "
                             "time-first spike trains, so reversing a layer's spikes (static input) does not apply; "
                             "use it with event input (trt.reverse: input)")
        self.reverse_at = at
        object.__setattr__(self, "_flip_module", layers[at])  # a reference, not a submodule
        head = model.classifier_head()
        ref = head.weight
        self.head_star = nn.Linear(head.in_features, head.out_features).to(ref.device, ref.dtype)
        self.head_rev = None if self.share_head else copy.deepcopy(head)
        object.__setattr__(self, "_model", model)  # not a submodule: the model's parameters stay the model's
        object.__setattr__(self, "_head", head)
        self._base = base_loss
        self._feat = None
        self._hook = head.register_forward_pre_hook(self._capture)
        self._ready = True
        return self

    def _capture(self, module, inputs):
        if module.training and torch.is_grad_enabled():
            self._feat = inputs[0]  # [T, N, D] in multi-step mode

    # ------------------------------------------------------------------------------------------- the loss
    def reversed_branch(self, x: torch.Tensor):
        """``(per-step logits, features [T, N, D])`` of the reversed branch."""
        if self.static:
            handle = self._flip_module.register_forward_hook(lambda m, i, out: out.flip(0))
            try:
                out = self._model(x)
            finally:
                handle.remove()
        else:
            out = self._model(x.flip(0))
        return out, self._feat

    def terms(self, logits, y, x) -> dict:
        """The weighted TRT terms ``{"reversed", "star", "consistency"}`` (see the module doc)."""
        if not self._ready:
            raise RuntimeError("TRT.setup(...) must run before the loss (the Trainer does it)")
        f_o = self._feat
        if f_o is None or f_o.dim() != 3 or f_o.shape[:2] != logits.shape[:2]:
            raise RuntimeError("TRT did not see the main forward pass of the model in training mode (features "
                               f"{None if f_o is None else list(f_o.shape)}, logits {list(logits.shape)})")
        zero = logits.new_zeros((), dtype=torch.float32)
        if not (self.reversed_weight or self.star_weight or self.lam):
            return {"reversed": zero, "star": zero, "consistency": zero}
        out_r, f_r = self.reversed_branch(x)
        if self.head_rev is not None:
            out_r = self.head_rev(f_r)
        z_o, z_r = logits.float().mean(0), out_r.float().mean(0)
        t = {"reversed": self.reversed_weight * self._base(out_r, y) if self.reversed_weight else zero}
        if self.star_weight:
            t["star"] = self.star_weight * F.cross_entropy(self.head_star((f_o.mean(0) * f_r.mean(0))).float(), y)
        else:
            t["star"] = zero
        t["consistency"] = self.lam * consistency(z_o, z_r, self.consistency, self.tau) if self.lam else zero
        return t

    def forward(self, logits, y, rec):
        if getattr(rec, "input", None) is None:
            raise RuntimeError("TRT needs the forward pass's input in the recording (rec.input, set by the Trainer)")
        return self.terms(logits, y, rec.input)

    def extra_repr(self) -> str:
        return (f"reverse={self.reverse}, reverse_at={self.reverse_at}, consistency={self.consistency}, lam={self.lam:g}, "
                f"tau={self.tau:g}, reversed_weight={self.reversed_weight:g}, star_weight={self.star_weight:g}, "
                f"share_head={self.share_head}")


def consistency(z_o: torch.Tensor, z_r: torch.Tensor, kind: str = "kl", tau: float = 2.0) -> torch.Tensor:
    """``kl``: τ²·KL(softmax(z_o/τ) ‖ softmax(z_r/τ)); ``sym_kl``: the mean of both directions; ``mse``: of the logits."""
    if kind == "mse":
        return F.mse_loss(z_o, z_r)
    lp, lq = F.log_softmax(z_o / tau, -1), F.log_softmax(z_r / tau, -1)
    kl_pq = (lp.exp() * (lp - lq)).sum(-1).mean()
    if kind == "kl":
        return tau ** 2 * kl_pq
    if kind == "sym_kl":
        kl_qp = (lq.exp() * (lq - lp)).sum(-1).mean()
        return tau ** 2 * (kl_pq + kl_qp) / 2
    raise ValueError(f"trt consistency must be one of {list(CONSISTENCY)}, got {kind!r}")


def from_config(cfg) -> list:
    """``[TRT(...)]`` when the config's ``trt`` section is enabled, else ``[]``."""
    if not cfg.enabled:
        return []
    return [TRT(cfg.reversed_weight, cfg.star_weight, cfg.lam, cfg.tau, cfg.consistency, cfg.reverse, cfg.reverse_at,
                cfg.share_head)]
