"""Operation counts of a spiking network, step by step (METHODS §8).

Per sample and step: spikes emitted by all spiking layers; MACs of the first synaptic layer (it sees the
analog/event input); SOPs of every later synaptic layer = (share of non-zero inputs) × (its dense MACs).
Energy = 4.6 pJ·MAC + 0.9 pJ·SOP (45 nm). A synaptic layer that a model marks ``analog_input = True``
(real-valued input in a hybrid network, such as the channel MLPs of ``general12_*``) and every ``nn.LSTM``
count as MACs wherever they sit. :func:`fewstep.anytime.early_exit` sums them up to each sample's exit;
:mod:`fewstep.energy` reports them per layer.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .neurons import StatefulModule, set_step_mode, step_mode_of
from .record import SpikeRates, record

E_MAC_PJ, E_SOP_PJ = 4.6, 0.9


# Leaf modules that METHODS §8 does not price (normalisation folds into weights, pooling and the
# activations of hybrid networks are negligible next to synaptic operations). Any other module that runs
# and is neither a synaptic layer nor a spiking neuron is reported as uncounted, by name and type.
NOT_PRICED = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.AvgPool2d, nn.MaxPool2d,
              nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity, nn.GELU, nn.ReLU, nn.SiLU, nn.Sigmoid)


_EXACT_F32 = 2 ** 24  # a float32 sum of 0/1 values is exact while it stays below this


def nonzero_per_sample(x: torch.Tensor) -> torch.Tensor:
    """Non-zero elements of each sample ``x[n]`` (float64 ``[N]``). ``x != 0`` written straight into a float
    tensor and summed in float32 (exact below 2^24 per sample, else summed in float64): on the CPU bool tensors
    and their ``.double()`` run unvectorised, ~2.2x slower (docs/performance.md)."""
    if x.dim() == 1:
        x = x.unsqueeze(1)
    flags = torch.ne(x, 0, out=torch.empty_like(x, dtype=torch.float32))
    dims = tuple(range(1, x.dim()))
    if x[0].numel() < _EXACT_F32:
        return flags.sum(dims).double()
    return flags.sum(dims, dtype=torch.float64)


class OpCounter:
    """Forward hooks counting, per sample of the current step, MACs, SOPs and spikes.

    With ``per_layer=True`` it also keeps each layer's counts of the step (``layers[name] = {"macs", "sops",
    "spikes"}``, per sample) and each spiking layer's number of neuron outputs in the step (``neurons[name]``), and
    ``uncounted`` names every other module that ran and is not in :data:`NOT_PRICED`."""

    def __init__(self, model: nn.Module, per_layer: bool = False):
        self.model = model
        self.per_layer = per_layer
        self.handles = []
        self.first = None
        self.neurons: dict[str, int] = {}
        self.uncounted: dict[str, str] = {}
        self.kinds: dict[str, str] = {}

    def __enter__(self):
        self._names = {}
        inside_neurons = {sub for m in self.model.modules() if isinstance(m, StatefulModule)
                          for sub in m.modules() if sub is not m}  # a neuron's surrogate etc.: part of the neuron
        for name, m in self.model.named_modules():
            self._names[m] = name or type(m).__name__
            if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear)):
                self.handles.append(m.register_forward_hook(self._synapse))
            elif isinstance(m, nn.LSTM):
                self.handles.append(m.register_forward_hook(self._lstm))
            elif isinstance(m, StatefulModule) and m.is_neuron:
                self.handles.append(m.register_forward_hook(self._neuron))
            elif (self.per_layer and not list(m.children()) and m not in inside_neurons
                  and not isinstance(m, NOT_PRICED + (StatefulModule,))):
                self.handles.append(m.register_forward_hook(self._other))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def start_step(self, n: int, device):
        self.macs = torch.zeros(n, device=device, dtype=torch.float64)
        self.sops = torch.zeros(n, device=device, dtype=torch.float64)
        self.spikes = torch.zeros(n, device=device, dtype=torch.float64)
        self.layers: dict[str, dict[str, torch.Tensor]] = {}
        self.neurons = {}
        self._n, self._device = n, device
        self._seen_first = False

    def _add(self, mod, kind: str, value):
        if kind == "macs":
            self.macs += value
        elif kind == "sops":
            self.sops += value
        else:
            self.spikes += value
        if self.per_layer:
            name = self._names[mod]
            slot = self.layers.setdefault(name, {k: torch.zeros(self._n, device=self._device, dtype=torch.float64)
                                                 for k in ("macs", "sops", "spikes")})
            slot[kind] += value
            self.kinds[name] = type(mod).__name__

    def _synapse(self, mod, inputs, out):
        x = inputs[0]
        if isinstance(mod, nn.Linear):
            fan_in = mod.in_features
        else:
            fan_in = (mod.in_channels // mod.groups) * int(torch.tensor(mod.kernel_size).prod())
        dense = out[0].numel() * fan_in
        if not self._seen_first or getattr(mod, "analog_input", False):
            self._seen_first = True
            self._add(mod, "macs", float(dense))
        else:
            self._add(mod, "sops", nonzero_per_sample(x) / x[0].numel() * dense)

    _synapse.fold_safe = True  # reads the input and the output's shape only: a folded BatchNorm leaves both

    def _lstm(self, mod, inputs, out):  # gates: 4·H·(I + H) MACs per token and direction (real-valued)
        x = inputs[0]
        tokens = x.shape[1] if mod.batch_first else x.shape[0]
        dirs = 2 if mod.bidirectional else 1
        h, i = mod.hidden_size, mod.input_size
        per_token = 4 * h * ((i + h) + (mod.num_layers - 1) * (dirs * h + h))  # later layers read dirs·h inputs
        self._add(mod, "macs", float(tokens * dirs * per_token))
        self._seen_first = True

    def _neuron(self, mod, inputs, out):  # events, not their values (a converted IF emits spike·λ)
        self._add(mod, "spikes", nonzero_per_sample(out))
        if self.per_layer:
            name = self._names[mod]
            self.neurons[name] = self.neurons.get(name, 0) + out[0].numel()  # this step's (reset each step)

    def _other(self, mod, inputs, out):
        self.uncounted.setdefault(self._names[mod], type(mod).__name__)



@torch.no_grad()
def ops_per_step(model: nn.Module, chunks, per_layer: bool = False, outputs: bool = False,
                 firing_rates: bool = False) -> dict:
    """Per-sample operation counts of every step: ``{"macs", "sops", "spikes", "energy_pj"}`` each ``[T, N]``.

    Runs ``model`` step by step over the prepared ``chunks`` (``[T, n, ...]`` each, from
    :func:`fewstep.anytime.prepare`) with the same counting as :func:`fewstep.anytime.early_exit`. The counts up to any exit step are a prefix sum
    (:func:`ops_at_exit`), so one pass prices every cutoff policy. ``per_layer=True`` adds
    ``layers[name][macs|sops|spikes]`` (``[T, N]`` each), ``neurons[name]`` (neuron outputs per step),
    ``kinds[name]`` (module type) and ``uncounted`` (modules that ran and are not priced, by name).
    The same pass can give what :func:`fewstep.metrics.predict` gives, so a caller needs no second pass over
    the data: ``outputs=True`` adds ``logits`` (``[T, N, C]``, float32 on the CPU) and ``firing_rates=True``
    adds ``firing_rates`` (per spiking layer, as :func:`fewstep.metrics.predict` computes them).
    """
    prev, was_training = step_mode_of(model), model.training
    model.eval()
    keys = ("macs", "sops", "spikes")
    parts = {k: [] for k in keys}
    layers: dict[str, dict[str, list]] = {}
    logits: list[torch.Tensor] = []
    rates = SpikeRates()
    rec_ctx = record(model, detach=True, fields=("spikes",)) if firing_rates else contextlib.nullcontext()
    try:
        with OpCounter(model, per_layer=per_layer) as counter, rec_ctx as rec:
            for xs in chunks:
                set_step_mode(model, "s")
                steps = {k: [] for k in parts}
                lsteps: dict[str, dict[str, list]] = {}
                outs = []
                for xt in xs:
                    counter.start_step(xt.shape[0], xt.device)
                    o = model(xt)
                    if outputs:
                        outs.append(o.float().cpu())
                    if firing_rates:
                        rates.add(rec)  # this step's spikes per layer, counted and dropped
                    for k in parts:
                        steps[k].append(getattr(counter, k).cpu())
                    for name, d in counter.layers.items():
                        for k in keys:
                            lsteps.setdefault(name, {kk: [] for kk in keys})[k].append(d[k].cpu())
                if outputs:
                    logits.append(torch.stack(outs))
                for k in parts:
                    parts[k].append(torch.stack(steps[k]))
                for name, d in lsteps.items():
                    for k in keys:
                        layers.setdefault(name, {kk: [] for kk in keys})[k].append(torch.stack(d[k]))
            neurons, kinds, uncounted = dict(counter.neurons), dict(counter.kinds), dict(counter.uncounted)
    finally:
        set_step_mode(model, prev)
        model.train(was_training)
    out = {k: torch.cat(v, 1) for k, v in parts.items()}
    out["energy_pj"] = E_MAC_PJ * out["macs"] + E_SOP_PJ * out["sops"]
    if outputs:
        out["logits"] = torch.cat(logits, 1)
    if firing_rates:
        out["firing_rates"] = rates.rates()
    if per_layer:
        out["layers"] = {n: {k: torch.cat(v, 1) for k, v in d.items()} for n, d in layers.items()}
        out["neurons"], out["kinds"], out["uncounted"] = neurons, kinds, uncounted
    return out


def ops_at_exit(per_step: torch.Tensor, exit_step: torch.Tensor) -> torch.Tensor:
    """Per-sample totals up to and including each sample's exit step (1-based), from ``[T, N]`` counts."""
    cum = per_step.cumsum(0)
    return cum.gather(0, (exit_step.long() - 1).view(1, -1))[0]
