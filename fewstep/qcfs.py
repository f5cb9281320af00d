"""ANN→SNN conversion with QCFS (Bu et al., ICLR 2022), the conversion path of the RCS + cutoff seed
(Wu et al., arXiv 2301.09522; METHODS §6).

Train an ANN whose activations are the quantisation clip-floor-shift function of each layer::

    h(x) = λ · clamp( floor(x·L/λ + 0.5) / L, 0, 1 )       λ learnable per layer, L levels

(``model.neuron: qcfs``, ``model.levels: L``, ``model.theta``: λ's initial value, 8.0 in the paper;
``data.T: 1``). ``floor`` passes its gradient straight through. Then convert: every QCFS becomes an
IF neuron with threshold λ, soft reset, initial membrane λ/2, emitting spike·λ (:class:`ConvertedIF`,
``model.neuron: qcfs_if``). Fed a constant input I for T = L steps, its rate × λ is exactly h(I); as T
grows it tends to clamp(I, 0, λ), the L → ∞ limit, whose difference from h is QCFS's quantisation error
(zero on average thanks to the shift of 0.5, Bu et al.). So the converted network's running mean of
logits approaches the ANN's as T grows; the cutoff then stops each sample as soon as it is safe.

Conversion here is bookkeeping only: a QCFS layer's parameter ``theta`` (λ) becomes the IF neuron's
``theta``, under the same name, and every other layer is kept as it is. BatchNorm is not folded: in
evaluation it is the fixed per-channel affine map that folding would put into the weights, applied to
each step's input, which is exactly what the converted network needs (fold it for deployment, not
for correctness). What the converter cannot map (max pooling, other non-linearities, TEBN's per-step
scales, spiking neurons already in the ANN) is refused by name.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .neurons import LIF, StatefulModule

DEFAULT_LEVELS = 8
# Options every neuron of a model receives from the config; QCFS has no membrane dynamics and ignores them.
_DYNAMICS = ("tau", "v0", "reset", "detach_reset", "surrogate", "learn_theta", "learn_tau", "backend")


def floor_ste(z: torch.Tensor) -> torch.Tensor:
    """``floor(z)`` forward, identity backward (straight-through)."""
    return z + (torch.floor(z) - z).detach()


def qcfs(x: torch.Tensor, lam: "torch.Tensor | float", levels: int) -> torch.Tensor:
    """``h(x) = λ · clamp(floor(x·L/λ + 0.5)/L, 0, 1)`` with a straight-through floor (METHODS §6)."""
    return lam * torch.clamp(floor_ste(x * levels / lam + 0.5) / levels, 0.0, 1.0)


class QCFS(StatefulModule):
    """The QCFS activation of an ANN trained for conversion (see the module doc).

    It has no state; it is a :class:`StatefulModule` so that it takes every model's neuron slot, follows
    ``step_mode``, and is recorded like a neuron: ``fewstep.record`` stores its output as ``spikes`` and
    its input as ``u`` (what RCS-ANN reads). λ is the parameter ``theta``: the converted neuron's threshold.
    """

    _state_names = ()

    def __init__(self, theta: float = 8.0, levels: int = DEFAULT_LEVELS, step_mode: str = "m", **dynamics):
        super().__init__(step_mode)
        bad = sorted(set(dynamics) - set(_DYNAMICS))
        if bad:
            raise TypeError(f"QCFS got unexpected option(s) {bad}")
        if int(levels) != levels or int(levels) < 1:
            raise ValueError(f"QCFS levels must be a whole number >= 1, got {levels!r}")
        if not float(theta) > 0:
            raise ValueError(f"QCFS λ (theta) must be > 0, got {theta!r}")
        self.levels = int(levels)
        self.theta = nn.Parameter(torch.tensor(float(theta)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = qcfs(x, self.theta, self.levels)
        rec = self._recorder
        if rec is not None:
            lead = (lambda t: t.unsqueeze(0)) if self.step_mode == "s" else (lambda t: t)
            rec.add(self, lead(out), lead(x), lead(x))
        return out

    def post_reset(self, u, s):  # no membrane, no reset: what a recorder's "v" would derive
        return u

    def extra_repr(self) -> str:
        return f"lambda={float(self.theta.detach()):.4g}, levels={self.levels}, step_mode={self.step_mode!r}"


class ConvertedIF(LIF):
    """The IF neuron a QCFS layer converts to: threshold λ (``theta``, loaded from the ANN), soft reset,
    ``v(0) = λ/2``, output ``s(t)·λ`` (METHODS §6). The recorder and the op counter see the binary spikes
    (the factor λ folds into the next layer's weights on hardware)."""

    def __init__(self, theta: float = 8.0, levels: "int | None" = None, step_mode: str = "m",
                 surrogate="zif", backend: str = "auto", **dynamics):
        bad = sorted(set(dynamics) - set(_DYNAMICS))
        if bad:
            raise TypeError(f"ConvertedIF got unexpected option(s) {bad}")
        super().__init__(tau=1.0, theta=theta, v0=0.5 * float(theta), reset="soft", surrogate=surrogate,
                         learn_theta=True, step_mode=step_mode, backend=backend)
        self.levels = levels  # the ANN's L, kept for the record

    @property
    def v0(self) -> float:  # always λ/2 of the current (loaded) threshold
        return 0.5 * float(self.theta.detach())

    @v0.setter
    def v0(self, value) -> None:  # LIF.__init__ assigns it; the value follows theta instead
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.theta

    def extra_repr(self) -> str:
        return f"lambda={float(self.theta.detach()):.4g}, v0=lambda/2, reset='soft', step_mode={self.step_mode!r}"


# ------------------------------------------------------------------------------------------ conversion
def _unmappable(name: str, m: nn.Module) -> "str | None":
    from .layers import TEBN

    if isinstance(m, QCFS) or isinstance(m, ConvertedIF):
        return None
    if isinstance(m, TEBN):
        return "TEBN keeps one scale per timestep of the ANN's T; use model.norm: bn for a network to convert"
    if isinstance(m, StatefulModule) and m.is_neuron:
        return "a spiking neuron in the ANN; every activation of a network to convert must be QCFS"
    if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                      nn.AdaptiveMaxPool3d)):
        return "max pooling of spike trains is not the max of their rates; use average pooling"
    if type(m).__module__ == "torch.nn.modules.activation":
        return "a non-linearity an IF neuron cannot reproduce; use QCFS"
    return None


def qcfs_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QCFS)]


def check_convertible(model: nn.Module) -> list[str]:
    """Names of the QCFS layers, or a ValueError naming what cannot be converted."""
    names = qcfs_layers(model)
    if not names:
        what = getattr(model, "model_name", type(model).__name__)
        raise ValueError(f"model {what!r} has no QCFS layers, so there is nothing to convert: train the ANN with "
                         "model.neuron: qcfs and data.T: 1 first")
    for n, m in model.named_modules():
        why = _unmappable(n, m)
        if why:
            raise ValueError(f"cannot convert layer {n!r} ({type(m).__name__}): {why}")
    return names


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every QCFS of ``model`` by a :class:`ConvertedIF` with threshold λ; nothing else changes."""
    check_convertible(model)
    net = model if inplace else copy.deepcopy(model)
    for name in qcfs_layers(net):
        parent_name, _, leaf = name.rpartition(".")
        parent = net.get_submodule(parent_name)
        q = getattr(parent, leaf)
        neuron = ConvertedIF(theta=float(q.theta.detach()), levels=q.levels, step_mode=q.step_mode)
        with torch.no_grad():
            neuron.theta.copy_(q.theta.detach())
        setattr(parent, leaf, neuron.to(q.theta.device))  # Sequential children are attributes "0", "1", ...
    return net


def converted_config(cfg, T: int):
    """The config of the converted network: ``model.neuron: qcfs_if`` at ``data.T = T``."""
    from . import config as _config

    if cfg.model.neuron != "qcfs":
        raise ValueError(f"the run's model.neuron is {cfg.model.neuron!r}, not 'qcfs': it is not an ANN to convert "
                         "(train one with model.neuron: qcfs and data.T: 1)")
    if int(T) != T or T < 1:
        raise ValueError(f"--T must be a whole number >= 1, got {T!r}")
    d = cfg.to_dict()
    d["model"]["neuron"] = "qcfs_if"
    d["data"]["T"] = int(T)
    return _config.from_dict(d)


def check_static(cfg) -> None:
    from .data import datasets

    if cfg.data.name in getattr(datasets, "EVENT_DATASETS", ()):
        raise ValueError(f"conversion takes an ANN of static images; {cfg.data.name!r} is event data, which the ANN "
                         "saw as a single frame (train the SNN directly instead)")


def convert_run(run_dir, out_dir, T: int = 64, weights: str = "best", overwrite: bool = False,
                log=print) -> dict:
    """``fewstep convert``: write a normal run folder holding the converted network of the ANN run ``run_dir``.

    ``eval``, ``cutoff``, ``tradeoff`` and the energy report work on it unchanged. Returns its summary."""
    import json
    from pathlib import Path

    from . import train as _train
    from .runfolder import make_room

    run_dir, out = Path(run_dir), Path(out_dir)
    src = run_dir / "checkpoint.pt"
    if not src.is_file():
        raise FileNotFoundError(f"{run_dir} is not a fewstep run folder (no checkpoint.pt)")
    if out.resolve() == run_dir.resolve():
        raise ValueError("--out must differ from the run being converted")
    make_room(out, overwrite)
    ckpt = _train.load_checkpoint(src)
    from . import config as _config

    cfg = _config.from_dict(ckpt["config"])
    if cfg.model.neuron != "qcfs":
        raise ValueError(f"{run_dir} has no QCFS layers (model.neuron: {cfg.model.neuron!r}), so there is nothing "
                         "to convert: train the ANN with model.neuron: qcfs and data.T: 1")
    check_static(cfg)
    new_cfg = converted_config(cfg, T)
    if weights not in ("best", "last"):
        raise ValueError(f"--weights must be 'best' or 'last', got {weights!r}")
    state = ckpt["best_model"] if weights == "best" and ckpt.get("best_model") is not None else ckpt["model"]
    # check the architecture maps, and that the weights load into the converted network unchanged
    bundle = _train.load_data(cfg)
    ann = _train.build_model(cfg, bundle)
    ann.load_state_dict(state)
    snn = convert(ann)
    rebuilt = _train.build_model(new_cfg, bundle)
    rebuilt.load_state_dict(snn.state_dict())
    out.mkdir(parents=True, exist_ok=True)
    new_cfg.dump(out / "config.yaml")
    info = {"converted_from": str(run_dir.resolve()), "weights": weights, "T": int(T), "levels": cfg.model.levels,
            "ann_epoch": ckpt["epoch"], "ann_best_epoch": ckpt["best_epoch"], "ann_best_val": ckpt["best_val"],
            "lambdas": {n: float(m.theta.detach()) for n, m in snn.named_modules() if isinstance(m, ConvertedIF)}}
    _train._atomic_save({"format": _train.CHECKPOINT_FORMAT, "config": new_cfg.to_dict(),
                         "data": _train.data_meta(bundle), "epoch": ckpt["epoch"],
                         "model": rebuilt.state_dict(), "best_model": None, "best_val": ckpt["best_val"],
                         "best_epoch": ckpt["best_epoch"], "history": list(ckpt.get("history", [])),
                         "conversion": {k: v for k, v in info.items() if k != "lambdas"}},
                        out / "checkpoint.pt")
    (out / "conversion.json").write_text(json.dumps(info, indent=2))
    log(f"converted {len(info['lambdas'])} QCFS layers of {run_dir} into IF neurons (T = {T}) -> {out}")
    return info
