"""Real early exit: run a network one step at a time and drop finished samples from the batch.

After each step the policy (:mod:`fewstep.cutoff`) looks at the running logits of the samples still
running; those that fire leave the batch, and every carried neuron state is compacted with
:func:`fewstep.compact`, so later steps compute only for the rest. Exit steps and predictions equal
:func:`fewstep.cutoff.simulate` on the same inputs (tested for every registered model).

Operation counts (METHODS §8), per sample and only up to its exit: spikes emitted by all spiking
layers; MACs of the first synaptic layer (it sees the analog/event input); SOPs of every later
synaptic layer = (share of non-zero inputs) × (its dense MACs). Energy = 4.6 pJ·MAC + 0.9 pJ·SOP.
A synaptic layer that a model marks ``analog_input = True`` (real-valued input in a hybrid network,
such as the channel MLPs of ``general12_*``) and every ``nn.LSTM`` count as MACs wherever they sit.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import cutoff as _cutoff
from . import graphs as _graphs
from .metrics import time_first
from .neurons import StatefulModule, compact, refill, reset, set_step_mode

E_MAC_PJ, E_SOP_PJ = 4.6, 0.9


def _mode(model: nn.Module) -> str:
    return next((m.step_mode for m in model.modules() if hasattr(m, "step_mode")), "m")


# Leaf modules that METHODS §8 does not price (normalisation folds into weights, pooling and the
# activations of hybrid networks are negligible next to synaptic operations). Any other module that runs
# and is neither a synaptic layer nor a spiking neuron is reported as uncounted, by name and type.
NOT_PRICED = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.AvgPool2d, nn.MaxPool2d,
              nn.AdaptiveAvgPool2d, nn.Flatten, nn.Dropout, nn.Identity, nn.GELU, nn.ReLU, nn.SiLU, nn.Sigmoid)


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
            self._add(mod, "sops", (x != 0).flatten(1).double().mean(1) * dense)

    def _lstm(self, mod, inputs, out):  # gates: 4·H·(I + H) MACs per token and direction (real-valued)
        x = inputs[0]
        tokens = x.shape[1] if mod.batch_first else x.shape[0]
        dirs = 2 if mod.bidirectional else 1
        h, i = mod.hidden_size, mod.input_size
        per_token = 4 * h * ((i + h) + (mod.num_layers - 1) * (dirs * h + h))  # later layers read dirs·h inputs
        self._add(mod, "macs", float(tokens * dirs * per_token))
        self._seen_first = True

    def _neuron(self, mod, inputs, out):  # events, not their values (a converted IF emits spike·λ)
        self._add(mod, "spikes", (out != 0).flatten(1).double().sum(1))
        if self.per_layer:
            name = self._names[mod]
            self.neurons[name] = self.neurons.get(name, 0) + out[0].numel()  # this step's (reset each step)

    def _other(self, mod, inputs, out):
        self.uncounted.setdefault(self._names[mod], type(mod).__name__)


@dataclass
class ExitResult:
    exit_step: torch.Tensor
    prediction: torch.Tensor
    spikes: torch.Tensor | None = None
    macs: torch.Tensor | None = None
    sops: torch.Tensor | None = None
    latency_s: torch.Tensor | None = None  # per sample: seconds from joining the batch to its decision

    @property
    def decision(self) -> _cutoff.Decision:
        return _cutoff.Decision(self.exit_step, self.prediction)

    @property
    def energy_pj(self) -> torch.Tensor | None:
        if self.macs is None:
            return None
        return E_MAC_PJ * self.macs + E_SOP_PJ * self.sops


def _use_graphs(model: nn.Module, dev: torch.device, graphs: str, count_ops: bool) -> "bool | None":
    """``True``: capture CUDA graphs; ``False``: the emulated static schedule; ``None``: the eager runner."""
    if graphs not in _graphs.MODES:
        raise ValueError(f"graphs must be one of {_graphs.MODES}, got {graphs!r}")
    if graphs == "off":
        return None
    if count_ops:  # the counters are forward hooks, which a replay would skip
        if graphs == "auto":
            return None
        raise ValueError(f"graphs={graphs!r} replays no hooks, so it cannot count operations (count_ops)")
    why = _graphs.unsupported(model)
    if graphs == "emulate":
        return False
    if graphs == "cuda":
        if dev.type != "cuda":
            raise ValueError(f"graphs='cuda' needs the input on a CUDA device, got {dev}")
        if why:
            raise ValueError(f"graphs='cuda' but the network cannot be replayed from a graph: {why}")
        return True
    if dev.type != "cuda":
        return None
    if why:
        _graphs.warn_once(model, why)
        return None
    return True


@torch.no_grad()
def early_exit(model: nn.Module, x: torch.Tensor, policy: _cutoff.Policy, max_batch: int | None = None,
               count_ops: bool = False, latency: bool = False, graphs: str = "auto") -> ExitResult:
    """Run ``model`` on ``x[T, N, ...]`` step by step, stopping each sample when ``policy`` fires.

    With ``max_batch=None`` all N samples start together and the batch shrinks as they exit. With
    ``max_batch=B`` at most B samples run at once and every freed slot is refilled at once with the
    next waiting sample (continuous batching), so the batch stays full and compute follows the
    average latency; samples at different steps then share a batch, each with its own state.
    Decisions are the same either way. The model runs in evaluation mode; its step mode is restored.
    ``latency=True`` also gives each sample's compute latency, from joining the batch to its decision
    (``latency_s``; the inputs are all there, so it is the time the decisions cost, not sensor time).

    ``graphs`` (:mod:`fewstep.graphs`): ``"auto"`` replays the single-step network from CUDA graphs on a CUDA
    input (bucketed batch sizes, padding instead of compaction) and steps eagerly elsewhere, or where the
    network cannot be captured (logged once); ``"cuda"`` insists on graphs; ``"off"`` always steps eagerly;
    ``"emulate"`` runs the graphs' static-shape schedule without capture on any device. Same decisions.
    """
    if x.dim() < 2:
        raise ValueError(f"early_exit expects input [T, N, ...], got {list(x.shape)}")
    T, N = x.shape[:2]
    if policy.T is not None and policy.T != T:
        raise ValueError(f"T mismatch: the policy was calibrated for T = {policy.T} but the input has T = {T}")
    cap = N if max_batch is None else int(max_batch)
    if cap < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    dev = x.device
    capture = _use_graphs(model, dev, graphs, count_ops)
    prev = _mode(model)
    was_training = model.training
    model.eval()
    set_step_mode(model, "s")
    if capture is not None:
        try:
            exit_step, pred, lat = _graphs.run(model, x, policy, cap, latency, capture)
            return ExitResult(exit_step.cpu(), pred.cpu(), latency_s=lat)
        except Exception as e:  # noqa: BLE001  under "auto" any failure of the graph path means: step eagerly
            if graphs != "auto":
                raise
            _graphs.warn_once(model, f"{type(e).__name__}: {e}")  # and step eagerly below (same decisions)
        finally:
            set_step_mode(model, prev)
            model.train(was_training)
        model.eval()
        set_step_mode(model, "s")
    exit_step = torch.full((N,), T, dtype=torch.long, device=dev)
    pred = torch.zeros(N, dtype=torch.long, device=dev)
    totals = {k: torch.zeros(N, dtype=torch.float64, device=dev) for k in ("spikes", "macs", "sops")} if count_ops else None
    counter = OpCounter(model) if count_ops else None
    active = torch.arange(min(cap, N), device=dev)  # sample ids in the batch
    steps = torch.zeros(len(active), dtype=torch.long, device=dev)  # steps done per slot
    waiting = len(active)  # next sample id to admit
    clock = time.perf_counter
    joined = torch.full((N,), clock(), dtype=torch.float64) if latency else None
    decided = torch.zeros(N, dtype=torch.float64) if latency else None
    Y = None
    try:
        if counter:
            counter.__enter__()
        while active.numel():
            if counter:
                counter.start_step(active.numel(), dev)
            if waiting == len(active) and cap >= N:  # the plain case: one batch, all at the same step
                xt = x[int(steps[0])] if active.numel() == N else x[int(steps[0])].index_select(0, active)
            else:
                xt = x[steps, active]
            out = model(xt).float()
            Y = out.clone() if Y is None else Y + out  # Y is refilled in place below
            steps += 1
            if counter:
                for k in totals:
                    totals[k].index_add_(0, active, getattr(counter, k))
            fire = (steps >= T) | policy.fire(Y, steps).to(dev)
            if not bool(fire.any()):
                continue
            done = active[fire]
            if latency:  # the sync in fire.any() above has already waited for the step
                now = clock()
                decided[done.cpu()] = now
                joined[waiting:waiting + min(int(fire.sum()), N - waiting)] = now
            exit_step[done] = steps[fire]
            pred[done] = Y[fire].argmax(-1)
            n_fired = len(done)
            n_new = min(n_fired, N - waiting)
            new = torch.arange(waiting, waiting + n_new, device=dev)
            waiting += n_new
            if n_new == n_fired:  # every freed slot taken at once: fresh state in place, the others stay put
                slots = fire.nonzero().squeeze(1)
                active[slots], steps[slots], Y[slots] = new, 0, 0.0
                refill(model, slots)
                continue
            keep = (~fire).nonzero().squeeze(1)
            active = torch.cat([active[keep], new])
            steps = torch.cat([steps[keep], steps.new_zeros(n_new)])
            Y = torch.cat([Y[keep], Y.new_zeros(n_new, Y.shape[1])])
            if active.numel():
                compact(model, keep, grow=n_new)
    finally:
        if counter:
            counter.__exit__()
        set_step_mode(model, prev)
        model.train(was_training)
    res = ExitResult(exit_step.cpu(), pred.cpu(), latency_s=(decided - joined) if latency else None)
    if count_ops:
        res.spikes, res.macs, res.sops = (totals[k].cpu() for k in ("spikes", "macs", "sops"))
    return res


@torch.no_grad()
def ops_per_step(model: nn.Module, chunks, per_layer: bool = False) -> dict:
    """Per-sample operation counts of every step: ``{"macs", "sops", "spikes", "energy_pj"}`` each ``[T, N]``.

    Runs ``model`` step by step over the prepared ``chunks`` (``[T, n, ...]`` each, from :func:`prepare`)
    with the same counting as :func:`early_exit`. The counts up to any exit step are a prefix sum
    (:func:`ops_at_exit`), so one pass prices every cutoff policy. ``per_layer=True`` adds
    ``layers[name][macs|sops|spikes]`` (``[T, N]`` each), ``neurons[name]`` (neuron outputs per step),
    ``kinds[name]`` (module type) and ``uncounted`` (modules that ran and are not priced, by name).
    """
    prev, was_training = _mode(model), model.training
    model.eval()
    keys = ("macs", "sops", "spikes")
    parts = {k: [] for k in keys}
    layers: dict[str, dict[str, list]] = {}
    try:
        with OpCounter(model, per_layer=per_layer) as counter:
            for xs in chunks:
                set_step_mode(model, "s")
                steps = {k: [] for k in parts}
                lsteps: dict[str, dict[str, list]] = {}
                for xt in xs:
                    counter.start_step(xt.shape[0], xt.device)
                    model(xt)
                    for k in parts:
                        steps[k].append(getattr(counter, k).cpu())
                    for name, d in counter.layers.items():
                        for k in keys:
                            lsteps.setdefault(name, {kk: [] for kk in keys})[k].append(d[k].cpu())
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
    if per_layer:
        out["layers"] = {n: {k: torch.cat(v, 1) for k, v in d.items()} for n, d in layers.items()}
        out["neurons"], out["kinds"], out["uncounted"] = neurons, kinds, uncounted
    return out


def ops_at_exit(per_step: torch.Tensor, exit_step: torch.Tensor) -> torch.Tensor:
    """Per-sample totals up to and including each sample's exit step (1-based), from ``[T, N]`` counts."""
    cum = per_step.cumsum(0)
    return cum.gather(0, (exit_step.long() - 1).view(1, -1))[0]


def check_not_test(dataset: Dataset, purpose: str = "calibration") -> None:
    """Refuse the test split (datasets from :func:`fewstep.data.load` know their split)."""
    if getattr(dataset, "split", None) == "test":
        raise ValueError(f"{purpose} on the test split would leak test data into the thresholds; use the "
                         "validation split (carved from the training data)")


@torch.no_grad()
def calibration_outputs(model, dataset: Dataset, T: int, kind: str, encoding: str = "direct",
                        batch_size: int = 256, device="cpu", mc_dropout: float = 0.0, mc_samples: int = 1):
    """Running logits ``Y[T, N', C]`` and labels on a held-out (never the test) split.

    ``mc_dropout > 0`` perturbs the network as the seed code did: dropout with that rate on the input of
    every synaptic layer (conv/linear), ``mc_samples`` passes stacked as extra samples, so the fitted
    thresholds are more conservative.
    """
    from .metrics import predict

    check_not_test(dataset)
    if not 0.0 <= mc_dropout < 1.0:
        raise ValueError(f"mc_dropout must be in [0, 1), got {mc_dropout}")
    hooks = []
    if mc_dropout > 0:
        drop = lambda mod, inp: (torch.nn.functional.dropout(inp[0], mc_dropout, training=True),)  # noqa: E731
        hooks = [m.register_forward_pre_hook(drop) for m in model.modules()
                 if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))]
    try:
        runs = [predict(model, dataset, T, kind, encoding, batch_size, device)[:2]
                for _ in range(mc_samples if mc_dropout > 0 else 1)]
    finally:
        for h in hooks:
            h.remove()
    O = torch.cat([r[0] for r in runs], 1)
    return _cutoff.running(O), torch.cat([r[1] for r in runs])


@dataclass
class RunStats:
    decision: _cutoff.Decision
    labels: torch.Tensor
    seconds: float
    spikes: torch.Tensor | None = None
    macs: torch.Tensor | None = None
    sops: torch.Tensor | None = None


def prepare(dataset: Dataset, T: int, kind: str, encoding: str = "direct", batch_size: int = 64, device="cpu"):
    """Encode a split once: ``([x[T, n, ...] per loader batch], labels)`` (Poisson draws seeded)."""
    gen = torch.Generator().manual_seed(0)
    chunks, ys = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        chunks.append(time_first(x, kind, T, encoding, gen).to(device))
        ys.append(y)
    return chunks, torch.cat(ys)


def run_chunks(model, chunks, policy, batch_size: int, continuous: bool = True, count_ops: bool = False,
               graphs: str = "auto"):
    """Early exit over prepared chunks; returns ``(ExitResult parts, seconds)``."""
    queue = [torch.cat(chunks, 1)] if continuous and len(chunks) > 1 else chunks  # copied before the clock
    sync = torch.cuda.synchronize if queue[0].is_cuda else (lambda: None)
    # untimed warm-up at the full batch (on CUDA it also captures the graphs, which are then cached)
    early_exit(model, queue[0][:1, :batch_size], _cutoff.Timestep(1, T=1), graphs=graphs if not count_ops else "off")
    sync()
    t0 = time.perf_counter()
    if continuous:
        parts = [early_exit(model, queue[0], policy, batch_size, count_ops, graphs=graphs)]
    else:
        parts = [early_exit(model, xs, policy, None, count_ops, graphs=graphs) for xs in queue]
    sync()
    return parts, time.perf_counter() - t0


def run_dataset(model, dataset: Dataset, policy: _cutoff.Policy, T: int, kind: str, encoding: str = "direct",
                batch_size: int = 64, device="cpu", count_ops: bool = False, continuous: bool = True,
                graphs: str = "auto") -> RunStats:
    """Real early exit over a whole split, timed (loading and encoding are done first, untimed).

    ``continuous=True`` keeps ``batch_size`` samples in flight and refills freed slots (see
    :func:`early_exit`); ``False`` runs the loader's batches one after another.
    """
    chunks, labels = prepare(dataset, T, kind, encoding, batch_size, device)
    parts, secs = run_chunks(model, chunks, policy, batch_size, continuous, count_ops, graphs)
    cat = lambda k: torch.cat([getattr(p, k) for p in parts]) if count_ops else None  # noqa: E731
    d = _cutoff.Decision(torch.cat([p.exit_step for p in parts]), torch.cat([p.prediction for p in parts]))
    return RunStats(d, labels, secs, cat("spikes"), cat("macs"), cat("sops"))


def speedup(model, chunks, policy, T: int, batch_size: int = 64, continuous: bool = True, repeats: int = 5,
            min_seconds: float = 0.5, graphs: str = "auto") -> tuple[float, float]:
    """Median seconds per pass over ``chunks`` for running to T and for early exit with ``policy``.

    Interleaved rounds; each round repeats the pass until it lasts about ``min_seconds`` (short runs on
    a shared machine are dominated by noise).
    """
    full = _cutoff.Timestep(T, T=T)
    run = lambda pol: run_chunks(model, chunks, pol, batch_size, continuous, graphs=graphs)[1]  # noqa: E731
    t_once = run(full)
    inner = max(1, int(min_seconds / max(t_once, 1e-6) + 0.999))
    tf, te = [], []
    for _ in range(repeats):
        tf.append(sum(run(full) for _ in range(inner)) / inner)
        te.append(sum(run(policy) for _ in range(inner * 2)) / (inner * 2))
    return statistics.median(tf), statistics.median(te)


class AnytimeStream:
    """Feed the frames of one stream as they arrive; get a prediction as soon as the policy fires.

        stream = AnytimeStream(model, policy, T=10)
        for frame in frames:                # frame [C, H, W] (or [1, C, H, W])
            answer = stream.push(frame)
            if answer is not None:
                label, step = answer
                break
        stream.reset()                      # before the next stream

    ``graphs`` as in :func:`early_exit`: on a CUDA frame each push replays the network from a CUDA graph of
    batch 1 (captured at the first push, cached on the model), unless it cannot be captured (logged once).
    """

    def __init__(self, model: nn.Module, policy: _cutoff.Policy, T: int, graphs: str = "auto"):
        self.model, self.policy, self.T = model, policy, int(T)
        if policy.T is not None and policy.T != self.T:
            raise ValueError(f"T mismatch: the policy was calibrated for T = {policy.T}, the stream has T = {T}")
        if graphs not in _graphs.MODES:
            raise ValueError(f"graphs must be one of {_graphs.MODES}, got {graphs!r}")
        self.graphs, self._graph = graphs, None
        self.model.eval()
        self.reset()

    def reset(self):
        set_step_mode(self.model, "s")
        if self._graph is not None:  # back to the graph's static state, fresh
            self._graph.bind()
            refill(self.model, torch.zeros(1, dtype=torch.long, device=self._graph.x.device))
        self.t, self.Y, self.answer = 0, None, None

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        if self._graph is None and self.t == 0 and x.shape[0] == 1:
            capture = _use_graphs(self.model, x.device, self.graphs, count_ops=False)
            if capture is not None:
                try:
                    self._graph = _graphs.graphs_for(self.model, 1, x, capture)[1]
                    self.reset()
                except _graphs.CaptureError as e:
                    if self.graphs != "auto":
                        raise
                    _graphs.warn_once(self.model, str(e))
                    set_step_mode(self.model, "s")
        if self._graph is None:
            return self.model(x).float()
        self._graph.x.copy_(x)
        return self._graph.step().clone()

    @torch.no_grad()
    def push(self, frame: torch.Tensor):
        """Returns ``(prediction, step)`` once the policy fires (or at step T), else ``None``."""
        if self.answer is not None:
            return self.answer
        if self.t >= self.T:
            raise RuntimeError(f"the stream already ran its T = {self.T} steps; call reset()")
        x = frame.unsqueeze(0) if frame.dim() == len(self.model.input_shape) else frame
        out = self._step(x)
        self.t += 1
        self.Y = out if self.Y is None else self.Y + out
        if self.t == self.T or bool(self.policy.fire(self.Y, self.t)[0]):
            self.answer = (int(self.Y[0].argmax()), self.t)
        return self.answer
