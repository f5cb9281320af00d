"""Recording of per-layer spikes and membranes, for regularisers (RCS, STR, TRT) and reports.

    with fewstep.record(net) as rec:
        logits = net(x)
    rec.spikes["features.2"]   # [T, N, ...] spikes of that layer
    rec.u[...]                 # membrane before reset, u(t)
    rec.v[...]                 # membrane after reset,  v(t)

Costs nothing when unused: a neuron checks one attribute per call. Recorded tensors keep their
graph (so a regulariser can back-propagate through them) unless ``detach=True``.
Works in both step modes; single-step frames are concatenated along time.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .neurons import StatefulModule


class Recorder:
    def __init__(self, detach: bool = False, fields=("spikes", "u", "v")):
        self.detach = detach
        self.fields = tuple(fields)
        self._data: dict[str, dict[str, list[torch.Tensor]]] = {}

    def add(self, module, spikes, u, v):
        slot = self._data.setdefault(module._record_name, {f: [] for f in self.fields})
        for name, value in (("spikes", spikes), ("u", u), ("v", v)):
            if name in self.fields:
                slot[name].append(value.detach() if self.detach else value)

    def _get(self, field):
        return {name: torch.cat(d[field]) if len(d[field]) > 1 else d[field][0] for name, d in self._data.items()}

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
        return list(self._data)

    def clear(self):
        self._data.clear()


@contextmanager
def record(net: nn.Module, detach: bool = False, fields=("spikes", "u", "v")):
    """Collect per-layer spikes and membranes of every spiking module of ``net`` (see module doc)."""
    rec = Recorder(detach=detach, fields=fields)
    mods = [(n, m) for n, m in net.named_modules() if isinstance(m, StatefulModule)]
    previous = [(m._recorder, m._record_name) for _, m in mods]
    for name, m in mods:
        m._recorder, m._record_name = rec, name or type(m).__name__
    try:
        yield rec
    finally:
        for (_, m), (r, n) in zip(mods, previous):
            m._recorder, m._record_name = r, n
