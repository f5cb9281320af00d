"""Real early exit: run a network one step at a time and drop finished samples from the batch.

After each step the policy (:mod:`fewstep.cutoff`) looks at the running logits of the samples still
running; those that fire hand their slot to the next waiting sample (:func:`fewstep.refill`) or leave
the batch (:func:`fewstep.shrink`, which moves the last survivors into the freed rows), so later steps
compute only for the samples still running. Exit steps and predictions equal
:func:`fewstep.cutoff.simulate` on the same inputs (tested for every registered model).

``count_ops=True`` counts operations per sample up to its exit (:mod:`fewstep.ops`, METHODS §8).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import cutoff as _cutoff
from . import graphs as _graphs
from .metrics import time_first
from .neurons import refill, set_step_mode, shrink, stateful_modules, step_mode_of
from .ops import E_MAC_PJ, E_SOP_PJ, NOT_PRICED, OpCounter, ops_at_exit, ops_per_step  # noqa: F401  (re-exported)


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
    if graphs == "emulate":
        return False
    if graphs == "cuda" and dev.type != "cuda":
        raise ValueError(f"graphs='cuda' needs the input on a CUDA device, got {dev}")
    if dev.type != "cuda":  # "auto" off CUDA: step eagerly (without walking the modules)
        return None
    why = _graphs.unsupported(model)
    if graphs == "cuda":
        if why:
            raise ValueError(f"graphs='cuda' but the network cannot be replayed from a graph: {why}")
        return True
    if why:
        _graphs.warn_once(model, why)
        return None
    return True


def _static_early_exit(model, x, policy, cap, latency, capture) -> ExitResult:
    """:func:`fewstep.graphs.run` in evaluation and single-step mode, both restored afterwards."""
    prev, was_training = step_mode_of(model), model.training
    model.eval()
    set_step_mode(model, "s")
    try:
        exit_step, pred, lat = _graphs.run(model, x, policy, cap, latency, capture)
    finally:
        set_step_mode(model, prev)
        model.train(was_training)
    return ExitResult(exit_step.cpu(), pred.cpu(), latency_s=lat)


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
    _cutoff.check_horizon(policy, T)
    cap = N if max_batch is None else int(max_batch)
    if cap < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    dev = x.device
    capture = _use_graphs(model, dev, graphs, count_ops)
    if capture is not None:
        try:
            return _static_early_exit(model, x, policy, cap, latency, capture)
        except Exception as e:  # noqa: BLE001  under "auto" any failure of the graph path means: step eagerly
            if graphs != "auto":
                raise
            _graphs.warn_once(model, f"{type(e).__name__}: {e}")  # and step eagerly below (same decisions)
    prev = step_mode_of(model)
    was_training = model.training
    to_eval = any(m.training for m in model.modules())
    if to_eval:
        model.eval()
    set_step_mode(model, "s")
    # Bookkeeping (sample per slot, steps done, exits) lives in Python lists: after a network step the CPU's
    # caches are cold and every small tensor op costs tens of µs (bench/anytime_parts.py), so the loop
    # issues as few as it can: one gather, one running sum, the policy, one transfer of its verdict.
    exit_step, pred = [T] * N, [0] * N
    totals = {k: torch.zeros(N, dtype=torch.float64, device=dev) for k in ("spikes", "macs", "sops")} if count_ops else None
    counter = OpCounter(model) if count_ops else None
    states = stateful_modules(model)  # collected once for the refills and shrinks below
    active = list(range(min(cap, N)))  # sample id per slot
    steps = [0] * len(active)  # steps done per slot
    waiting = len(active)  # next sample id to admit
    same = cap >= N  # one batch from the start: nobody is admitted later, every row is at the same step
    clock = time.perf_counter
    joined = [clock()] * N if latency else None
    decided = [0.0] * N if latency else None
    Y = None
    flat = x.flatten(0, 1) if x.is_contiguous() else None  # a view: frame (t, n) is row t·N + n
    rows_of = lambda idx: torch.tensor(idx, dtype=torch.long, device=dev)  # noqa: E731
    try:
        if counter:
            counter.__enter__()
        while active:
            n = len(active)
            if counter:
                counter.start_step(n, dev)
            if same:  # x[step] is a view; its rows once samples have left
                xt = x[steps[0]] if n == N else x[steps[0]].index_select(0, rows_of(active))
            elif n == 1:  # one sample left: a view of its frame
                xt = x[steps[0], active[0]:active[0] + 1]
            elif flat is not None:  # one row copy per sample (advanced indexing x[steps, active] is ~4x slower)
                xt = flat.index_select(0, rows_of([s * N + a for s, a in zip(steps, active)]))
            else:
                xt = x[rows_of(steps), rows_of(active)]
            out = model(xt).float()
            Y = out.clone() if Y is None else Y + out  # Y is refilled in place below
            steps = [s + 1 for s in steps]
            if counter:
                ids = rows_of(active)
                for k in totals:
                    totals[k].index_add_(0, ids, getattr(counter, k))
            aligned = same or steps.count(steps[0]) == n  # every row at the same step: the policy takes an int
            verdict = policy.stops(Y, steps[0] if aligned else rows_of(steps)).tolist()  # (waits for the step on CUDA)
            slots = [i for i in range(n) if verdict[i] or steps[i] >= T]  # the slots that decided, ascending
            if not slots:
                continue
            top = Y.argmax(-1).tolist()
            for i in slots:
                exit_step[active[i]], pred[active[i]] = steps[i], top[i]
            n_new = min(len(slots), N - waiting)
            if latency:
                now = clock()
                for i in slots:
                    decided[active[i]] = now
                joined[waiting:waiting + n_new] = [now] * n_new
            if n_new:  # the lowest freed slots go to waiting samples: fresh state in place
                ref = slots[:n_new]
                for j, i in enumerate(ref):
                    active[i], steps[i] = waiting + j, 0
                ref_t = rows_of(ref)
                Y.index_fill_(0, ref_t, 0.0)
                refill(states, ref_t)
                waiting += n_new
            if n_new == len(slots):
                continue
            # the other freed slots leave the batch: the survivors above the new size k move into those below it
            holes = slots[n_new:]
            k = n - len(holes)
            gone = set(holes)
            dst = [h for h in holes if h < k]
            src = [i for i in range(k, n) if i not in gone]
            for d, r in zip(dst, src):
                active[d], steps[d] = active[r], steps[r]
            del active[k:], steps[k:]
            if dst:
                Y.index_copy_(0, rows_of(dst), Y.index_select(0, rows_of(src)))
            Y = Y[:k]
            shrink(states, dst, src, k)
    finally:
        if counter:
            counter.__exit__()
        set_step_mode(model, prev)
        if to_eval:
            model.train(was_training)
    lat = torch.tensor(decided, dtype=torch.float64) - torch.tensor(joined, dtype=torch.float64) if latency else None
    res = ExitResult(torch.tensor(exit_step, dtype=torch.long), torch.tensor(pred, dtype=torch.long), latency_s=lat)
    if count_ops:
        res.spikes, res.macs, res.sops = (totals[k].cpu() for k in ("spikes", "macs", "sops"))
    return res


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
        _cutoff.check_horizon(policy, self.T)
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
        if self.t == self.T or bool(self.policy.stops(self.Y, self.t)[0]):
            self.answer = (int(self.Y[0].argmax()), self.t)
        return self.answer


# Timing early exit lives in fewstep.wallclock (which imports this module); its names stay reachable from here,
# looked up on first use.
_WALLCLOCK_NAMES = ("multistep_seconds", "speedup", "speedup_rounds", "spread")


def __getattr__(name: str):
    if name in _WALLCLOCK_NAMES:
        from . import wallclock

        return getattr(wallclock, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
