"""Recording of per-layer spikes and membranes, for regularisers (RCS, STR, TRT) and reports.

    with fewstep.record(net) as rec:
        logits = net(x)
    rec.spikes["features.2"]   # [T, N, ...] spikes of that layer
    rec.u[...]                 # membrane before reset, u(t)
    rec.v[...]                 # membrane after reset,  v(t)

Costs nothing when unused: a neuron checks one attribute per call. Recorded tensors keep their
graph (so a regulariser can back-propagate through them) unless ``detach=True``. Recording keeps
the fast paths: the fused multi-step LIF returns the membrane ``u`` it already keeps for backward,
and ``v`` is derived from ``u`` and the spikes by the neuron's reset rule only when it is read.
Ask only for the fields you need (``fields=("spikes",)`` records no membrane at all).
Works in both step modes; single-step frames are concatenated along time.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .neurons import StatefulModule

FIELDS = ("spikes", "u", "v")


class Recorder:
    """What :func:`record` yields: per spiking layer (by module name, in call order) the recorded ``[T, N, ...]``
    tensors as dicts ``spikes``, ``u`` (membrane before reset) and ``v`` (after reset), the layers' ``theta(name)``,
    ``modules``, the recorded ``model`` and its ``input``; ``clear()`` empties it between forward passes."""

    def __init__(self, detach: bool = False, fields=FIELDS, grad_sink: bool = False):
        bad = sorted(set(fields) - set(FIELDS))
        if bad:
            raise ValueError(f"unknown record field(s) {bad}; valid fields: {list(FIELDS)}")
        self.detach = detach
        self.fields = tuple(fields)
        self.wants_membrane = "u" in self.fields or "v" in self.fields
        # Regularisers may send their gradients through the fused node's GradSink (see fewstep.fused):
        # fastest, but then not visible to torch.autograd.grad(loss, recorded tensor). Off by default.
        self.grad_sink = bool(grad_sink)
        self.modules: dict[str, nn.Module] = {}  # every spiking layer the recorder is attached to, by name
        self.model: "nn.Module | None" = None  # the recorded network (set by record())
        self.input: "torch.Tensor | None" = None  # its input, where the caller sets it (the Trainer does)
        self._data: dict[str, dict[str, list]] = {}

    def add(self, module, spikes, u=None, v=None):
        """Append one call's ``[t, N, ...]`` tensors of ``module``; ``v`` may be left to the neuron's reset rule."""
        slot = self._data.setdefault(module._record_name, {f: [] for f in self.fields})
        if self.wants_membrane and u is None:
            raise RuntimeError(f"spiking layer {module._record_name!r} ({type(module).__name__}) recorded no membrane "
                               f"although {list(self.fields)} were asked for")
        for name in self.fields:
            if name == "spikes":
                value = spikes
            elif name == "u":
                value = u
            else:
                value = v if v is not None else (module, spikes, u)  # derived when read
            if self.detach:
                value = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in value) \
                    if isinstance(value, tuple) else value.detach()
            slot[name].append(value)

    @staticmethod
    def _materialise(value):
        if isinstance(value, tuple):
            module, s, u = value
            return module.post_reset(u, s)
        return value

    def _get(self, field):
        if field not in self.fields:
            raise KeyError(f"field {field!r} was not recorded; record(..., fields={list(self.fields) + [field]})")
        out = {}
        for name, d in self._data.items():
            parts = [self._materialise(p) for p in d[field]]
            out[name] = torch.cat(parts) if len(parts) > 1 else parts[0]
        return out

    @property
    def spikes(self) -> dict[str, torch.Tensor]:
        return self._get("spikes")

    @property
    def u(self) -> dict[str, torch.Tensor]:
        return self._get("u")

    @property
    def v(self) -> dict[str, torch.Tensor]:
        return self._get("v")

    @property
    def layers(self) -> list[str]:
        """Names of the layers that recorded something, in call order."""
        return list(self._data)

    def theta(self, name: str):
        """Firing threshold of the recorded layer ``name`` (a float, or a tensor when learnable)."""
        return self.modules[name].theta

    def silent(self) -> list[str]:
        """Spiking layers the recorder was attached to that recorded nothing (named with their type)."""
        return [f"{n} ({type(m).__name__})" for n, m in self.modules.items() if n not in self._data]

    def clear(self):
        self._data.clear()


class SpikeRates:
    """Mean firing rate per spiking layer (spike values summed over neurons, steps and samples, over their
    count), tallied call by call from a ``fields=("spikes",)`` recorder: :meth:`add` counts what the recorder
    holds and clears it, so a single-step pass never keeps ``[T, ...]`` spikes."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def add(self, rec: Recorder) -> None:
        for name, s in rec.spikes.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(s.float().sum())
            self.count[name] = self.count.get(name, 0) + s.numel()
        rec.clear()

    def rates(self) -> dict[str, float]:
        return {k: self.sums[k] / self.count[k] for k in self.sums}


@contextmanager
def record(net: nn.Module, detach: bool = False, fields=FIELDS, grad_sink: bool = False):
    """Collect per-layer spikes and membranes of every spiking layer of ``net`` (see module doc).

    ``grad_sink=True`` lets regularisers (RCS, STR) pass their gradients to the fused LIF step by step
    instead of as full-size tensors (:class:`fewstep.fused.GradSink`); use it when the loss is
    back-propagated with ``loss.backward()``, as the Trainer does."""
    rec = Recorder(detach=detach, fields=fields, grad_sink=grad_sink)
    rec.model = net
    mods = [(n, m) for n, m in net.named_modules() if isinstance(m, StatefulModule) and m.is_neuron]
    previous = [(m._recorder, m._record_name) for _, m in mods]
    for name, m in mods:
        m._recorder, m._record_name = rec, name or type(m).__name__
        rec.modules[m._record_name] = m
    try:
        yield rec
    finally:
        for (_, m), (r, n) in zip(mods, previous):
            m._recorder, m._record_name = r, n
