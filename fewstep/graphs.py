"""Streaming early exit with static shapes: the single-step network replayed from CUDA graphs.

Step-by-step inference on the GPU is launch-bound: a small batch at one step costs one kernel launch per
layer, and early exit makes the batches smaller still. Here the single-step network is captured once per
*bucket* batch size (``torch.cuda.CUDAGraph``) and each step is one ``replay()``:

- Buckets are the powers of two below the batch (and the batch itself): 256, 128, 64, ..., 1.
- Every carried state (membranes, TEBN step counters) lives in static buffers of the bucket's graph; the
  graph writes each new state back into its buffer, so the next replay reads it.
- A finished sample's slot is refilled in place with the next waiting sample (:func:`fewstep.refill`);
  when no sample waits, freed slots become padding (fresh state, input ignored, never decide), and once
  the samples still running fit in a smaller bucket they move there (their state rows copied over).
- The exit decision (the running sum, the step count and the policy) and all its bookkeeping (the decided
  rows' exits and predictions, refills, padding, where each row's next frame lies) are a second graph per
  bucket and policy (:class:`DecisionGraph`), replayed after the network's: a step is one gather, two
  replays, one copy of the decided rows and one wait for the device, to read how many rows still run and
  how many samples were taken. A policy that cannot be captured (a host sync in its ``fire``) decides
  eagerly on the same static buffers, with one logged warning.

Decisions equal the eager runner's (:func:`fewstep.anytime.early_exit` with ``graphs="off"``); every
capture is checked against two eager steps from fresh state before it is used, and a network that cannot be
captured (a host sync inside its step, forward hooks, an active :func:`fewstep.record`) falls back to the
eager runner with one logged warning. ``graphs="emulate"`` runs the same static-shape schedule without
capture on any device (how the CPU tests cover the bucketing and padding).
"""

from __future__ import annotations

import logging
import time
import weakref

import torch
from torch import nn

from .neurons import StatefulModule, refill, reset, stateful_modules

log = logging.getLogger("fewstep")
MODES = ("auto", "off", "cuda", "emulate")
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
_WARNED: set = set()


class CaptureError(RuntimeError):
    """The single-step network could not be captured, or its replay disagreed with eager steps."""


def bucket_sizes(batch: int) -> list[int]:
    """The batch sizes a run of at most ``batch`` samples may use: powers of two below it, and it (ascending)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    sizes, b = {int(batch)}, 1
    while b < batch:
        sizes.add(b)
        b *= 2
    return sorted(sizes)


def _state_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, n) for m in stateful_modules(model) for n in m._state_names if getattr(m, n) is not None]


def unsupported(model: nn.Module) -> "str | None":
    """Why ``model``'s step cannot be replayed from a graph (``None`` when it can): hooks and recorders run
    Python at every step, which a replay skips."""
    for name, m in model.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"module {name or type(model).__name__!r} has forward hooks"
        if getattr(m, "_recorder", None) is not None:
            return "fewstep.record is attached"
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return "global forward hooks are registered"
    return None


class StepGraph:
    """One single step of ``model`` for a batch of ``batch`` frames shaped like ``frame[1:]``, with static
    input ``x``, static state buffers and (captured) static output ``out``. ``capture=False`` runs the same
    body eagerly (the emulated schedule)."""

    def __init__(self, model: nn.Module, batch: int, frame: torch.Tensor, capture: bool):
        # weak references: the cache on the model must not keep the model alive
        self._model, self.batch, self.capture = weakref.ref(model), int(batch), bool(capture)
        self.x = torch.zeros((self.batch, *frame.shape[1:]), dtype=frame.dtype, device=frame.device)
        self.graph, self.out = None, None
        reset(model)
        self.decisions: dict = {}  # policy key -> DecisionGraph (captured graphs only; see decisions_for)
        if not self.capture:
            self.classes = model(self.x).shape[-1]  # (the call allocates the states)
            self._take_states(model)
            return
        try:
            side = torch.cuda.Stream(device=frame.device)
            side.wait_stream(torch.cuda.current_stream(frame.device))
            with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs advises
                for _ in range(2):
                    self.classes = model(self.x).shape[-1]
            torch.cuda.current_stream(frame.device).wait_stream(side)
            self._take_states(model)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._body()
        except Exception as e:  # a host sync, an unsupported op ...
            reset(model)
            raise CaptureError(f"capturing one step of {type(model).__name__} at batch {self.batch} failed: "
                               f"{type(e).__name__}: {e}") from e
        self.bind()
        self._check()

    def _take_states(self, model: nn.Module) -> None:
        slots = _state_slots(model)
        self.buffers = [getattr(m, n).clone() for m, n in slots]
        self._slots = [(weakref.ref(m), n) for m, n in slots]
        self.bind()

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError("the network of this StepGraph no longer exists")
        return model

    @property
    def slots(self) -> list[tuple[nn.Module, str]]:
        return [(ref(), n) for ref, n in self._slots]

    def _body(self) -> torch.Tensor:
        out = self.model(self.x).float()
        for (m, n), buf in zip(self.slots, self.buffers):
            new = getattr(m, n)
            if new is not buf:
                buf.copy_(new)
                setattr(m, n, buf)
        return out

    def bind(self) -> None:
        """Point the network's state attributes at this graph's buffers."""
        for (m, n), buf in zip(self.slots, self.buffers):
            setattr(m, n, buf)

    def step(self) -> torch.Tensor:
        """One step on ``self.x`` from the bound state; the output is overwritten by the next replay."""
        if self.graph is None:
            return self._body()
        self.graph.replay()
        return self.out

    def _check(self) -> None:
        """Two replayed steps from fresh state against two eager steps: a network whose step keeps Python-side
        state, which a replay would freeze, is caught here."""
        g = torch.Generator(device=self.x.device).manual_seed(0)
        frames = [(torch.rand(self.x.shape, generator=g, device=self.x.device) * 2).to(self.x.dtype) for _ in range(2)]
        rows = torch.arange(self.batch, device=self.x.device)
        refill(self.model, rows)
        replayed = []
        for f in frames:
            self.x.copy_(f)
            replayed.append(self.step().clone())
        reset(self.model)
        eager = [self.model(f).float() for f in frames]
        self.bind()
        refill(self.model, rows)
        for a, b in zip(replayed, eager):
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                raise CaptureError(f"a replayed step of {type(self.model).__name__} differs from the eager step by "
                                   f"{float((a - b).abs().max()):.3g}; its step keeps state the graph cannot see")


class DecisionGraph:
    """The exit decision and its bookkeeping after a step of a bucket of ``batch`` rows, all on static buffers,
    so that one replay does what the loop would otherwise launch a dozen small kernels for:

    1. ``Y += out``, ``steps += 1``, ``fire = valid & (steps >= T | policy.stops(Y, steps))`` (padding rows ask
       about step 1 and never decide);
    2. ``done[3, batch]``: per row the sample that decided (``n_total``, a dummy index, where none did), its exit
       step and its prediction ``argmax Y``;
    3. each decided row takes the next waiting sample (``waiting + rank among the decided rows``) or becomes
       padding when none waits; its sum, step count and network state (:meth:`StatefulModule.fresh_value`,
       in the step graph's state buffers) start afresh;
    4. ``counts = [rows still valid, samples taken so far]`` (what the host reads, once per step) and
       ``gather[batch]``: where each row's next frame lies in the run's input seen as ``[T·n_total, ...]``.

    With ``capture`` it is a CUDA graph reading the step graph's static output, replayed after it; otherwise
    (the emulated schedule, or a policy that cannot be captured) the same body runs eagerly on the given
    output. The policy is held, so the tensors its replay reads (its per-step tables) stay alive."""

    def __init__(self, step: StepGraph, policy, T: int, capture: bool):
        dev = step.x.device
        B = self.batch = step.batch
        self.policy, self.T, self.capture = policy, int(T), bool(capture)
        self.Y = torch.zeros(B, step.classes, dtype=torch.float32, device=dev)  # (the step's output .float())
        self.steps = torch.zeros(B, dtype=torch.long, device=dev)
        self.valid = torch.ones(B, dtype=torch.bool, device=dev)
        self.active = torch.arange(B, device=dev)  # the sample in each row (0 in padding rows)
        self.waiting = torch.full((1,), B, dtype=torch.long, device=dev)  # samples taken so far
        self.n_total = torch.full((1,), B, dtype=torch.long, device=dev)  # samples in the run
        self.done = torch.zeros(3, B, dtype=torch.long, device=dev)
        self.counts = torch.zeros(2, dtype=torch.long, device=dev)
        self.gather = torch.zeros(B, dtype=torch.long, device=dev)
        self._one = torch.ones(B, dtype=torch.long, device=dev)
        # the step graph's state buffers and the constant each starts from (a module whose fresh state is not
        # one constant gets its own fresh() of the whole buffer, taken where the rows restart)
        self._states = []
        for (m, n), buf in zip(step.slots, step.buffers):
            constant = type(m).fresh is StatefulModule.fresh
            self._states.append((buf, m.fresh_value(n) if constant else None, None if constant else (weakref.ref(m), n)))
        self.graph, self.fire = None, None
        if not self.capture:
            return
        self._out = step.out
        try:
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up off the capture stream (the policy's tables are made here)
                saved = self._snapshot()
                for _ in range(2):
                    self._body(self._out)
                self._restore(saved)
            torch.cuda.current_stream(dev).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.fire = self._body(self._out)
        except Exception as e:  # a host sync in the policy ...
            raise CaptureError(f"capturing the {getattr(policy, 'name', type(policy).__name__)} decision at batch "
                               f"{self.batch} failed: {type(e).__name__}: {e}") from e
        self._check()

    def _body(self, out: torch.Tensor) -> torch.Tensor:
        self.Y.add_(out)
        self.steps.add_(1)
        t = torch.where(self.valid, self.steps, self._one)
        fire = self.valid & ((self.steps >= self.T) | self.policy.stops(self.Y, t).to(self.Y.device))
        self.done[0].copy_(torch.where(fire, self.active, self.n_total))
        self.done[1].copy_(self.steps)
        self.done[2].copy_(self.Y.argmax(-1))
        new = self.waiting + torch.cumsum(fire, 0) - 1  # the sample each decided row takes next
        joins = fire & (new < self.n_total)
        self.active.copy_(torch.where(joins, new, torch.where(fire, torch.zeros_like(new), self.active)))
        self.valid.logical_and_(joins | ~fire)
        self.steps.masked_fill_(fire, 0)
        self.Y.masked_fill_(fire.unsqueeze(1), 0.0)
        for buf, value, module in self._states:
            rows = fire.view(-1, *([1] * (buf.dim() - 1)))
            if module is None:
                buf.masked_fill_(rows, value)
            else:
                buf.copy_(torch.where(rows, module[0]().fresh(module[1], buf), buf))
        self.waiting.copy_(torch.minimum(self.waiting + fire.sum(), self.n_total))
        self.counts[0].copy_(self.valid.sum())
        self.counts[1].copy_(self.waiting[0])
        self.gather.copy_(self.steps.clamp(max=self.T - 1) * self.n_total + self.active)
        return fire

    def reset(self, n_total: "int | None" = None) -> None:
        """Every row a fresh, valid sample: row i runs sample i of a run of ``n_total`` samples (default: the
        bucket's size), the rows after them wait."""
        B = self.batch
        n = B if n_total is None else int(n_total)
        if n < B:
            raise ValueError(f"a run of {n} samples cannot fill a bucket of {B} rows")
        self.Y.zero_()
        self.steps.zero_()
        self.valid.fill_(True)
        torch.arange(B, out=self.active)
        self.waiting.fill_(B)
        self.n_total.fill_(n)
        self.gather.copy_(self.active)

    def take(self, other: "DecisionGraph", keep: torch.Tensor) -> None:
        """Continue ``other``'s run in this (smaller) bucket: its rows ``keep`` become rows 0..len(keep)-1, the
        rest padding. The network state is moved by the caller."""
        k = len(keep)
        self.Y.zero_()
        self.steps.zero_()
        self.valid.fill_(False)
        self.active.zero_()
        self.Y[:k], self.steps[:k], self.valid[:k], self.active[:k] = other.Y[keep], other.steps[keep], True, other.active[keep]
        self.waiting.copy_(other.waiting)
        self.n_total.copy_(other.n_total)
        self.gather.copy_(self.steps.clamp(max=self.T - 1) * self.n_total + self.active)

    def step(self, out: torch.Tensor) -> torch.Tensor:
        """The decision after the step whose output is ``out``; ``fire[batch]`` is overwritten by the next replay."""
        if self.graph is None:
            return self._body(out)
        self.graph.replay()  # reads the step graph's static output, which is ``out``
        return self.fire

    def _buffers(self) -> list[torch.Tensor]:
        return [self.Y, self.steps, self.valid, self.active, self.waiting, self.n_total, self.done, self.counts,
                self.gather] + [buf for buf, _, _ in self._states]

    def _snapshot(self) -> list[torch.Tensor]:
        return [b.clone() for b in self._buffers()]

    def _restore(self, saved: list[torch.Tensor]) -> None:
        for b, v in zip(self._buffers(), saved):
            b.copy_(v)

    def _check(self) -> None:
        """A replay from random buffers against the eager body from the same buffers: every buffer the same
        afterwards (sums, steps, decisions, bookkeeping, refilled state)."""
        g = torch.Generator(device=self.Y.device).manual_seed(0)
        dev, B = self.Y.device, self.batch
        states = [buf.clone() for buf, _, _ in self._states]
        n = 2 * B + 1
        self.Y.copy_(torch.randn(self.Y.shape, generator=g, device=dev) * 3)
        self.steps.copy_(torch.randint(0, self.T, (B,), generator=g, device=dev))
        self.valid.copy_(torch.rand(B, generator=g, device=dev) < 0.75)
        self.active.copy_(torch.randperm(n, generator=g, device=dev)[:B])
        self.waiting.fill_(B + 1)
        self.n_total.fill_(n)
        for buf, _, _ in self._states:
            buf.copy_(torch.randn(buf.shape, generator=g, device=dev).to(buf.dtype))
        self._out.copy_(torch.randn(self.Y.shape, generator=g, device=dev))  # (the step graph's next replay overwrites it)
        start = self._snapshot()
        fire_eager = self._body(self._out).clone()
        want = self._snapshot()
        self._restore(start)
        got = self.step(self._out)
        same = torch.equal(got, fire_eager) and all(torch.equal(a, b) for a, b in zip(self._buffers(), want))
        for (buf, _, _), v in zip(self._states, states):
            buf.copy_(v)
        self.reset()
        if not same:
            raise CaptureError(f"a replayed {getattr(self.policy, 'name', type(self.policy).__name__)} decision "
                               "differs from the eager one; its fire() keeps state the graph cannot see")


def _policy_key(policy, T: int) -> tuple:
    """What a captured decision depends on: the policy's class and every parameter it reports, and T."""
    return (type(policy).__module__, type(policy).__qualname__, repr(sorted(policy.to_dict().items())), int(T))


def decisions_for(graphs: dict[int, StepGraph], policy, T: int, capture: bool, model: nn.Module) -> dict:
    """A :class:`DecisionGraph` per bucket. Captured ones are cached on their step graph by :func:`_policy_key`;
    a policy whose decision cannot be captured decides eagerly on static buffers (logged once)."""
    if not capture:
        return {b: DecisionGraph(g, policy, T, capture=False) for b, g in graphs.items()}
    key = _policy_key(policy, T)
    out, failed = {}, False
    for b, g in graphs.items():
        d = g.decisions.get(key)
        if d is None:
            if not failed:
                try:
                    d = DecisionGraph(g, policy, T, capture=True)
                except CaptureError as e:  # then no bucket tries again: one warning
                    warn_once(model, f"{e}; the decision runs eagerly", what="decision graphs")
                    failed = True
            if d is None:
                d = DecisionGraph(g, policy, T, capture=False)
            g.decisions[key] = d
        out[b] = d
    return out


def _signature(model: nn.Module, frame: torch.Tensor) -> tuple:
    tensors = list(model.parameters()) + list(model.buffers())
    return (tuple(t.data_ptr() for t in tensors), tuple(frame.shape[1:]), frame.dtype, str(frame.device))


def graphs_for(model: nn.Module, batch: int, frame: torch.Tensor, capture: bool) -> dict[int, StepGraph]:
    """A :class:`StepGraph` per bucket size up to ``batch``. Captured graphs are cached on the model (keyed by
    where its parameters live and the frame shape), so repeated runs capture once."""
    sizes = bucket_sizes(batch)
    if not capture:
        return {b: StepGraph(model, b, frame, capture=False) for b in sizes}
    sig = _signature(model, frame)
    cache = _CACHE.get(model)
    if cache is None or cache["sig"] != sig:
        cache = _CACHE[model] = {"sig": sig, "graphs": {}}
    for b in sizes:
        if b not in cache["graphs"]:
            cache["graphs"][b] = StepGraph(model, b, frame, capture=True)
    return {b: cache["graphs"][b] for b in sizes}


def warn_once(model: nn.Module, reason: str, what: str = "") -> None:
    key = (type(model).__name__, reason)
    if key not in _WARNED:
        _WARNED.add(key)
        if what:
            log.warning("CUDA %s off for %s: %s", what, type(model).__name__, reason)
        else:
            log.warning("CUDA graphs off for %s: %s; stepping eagerly", type(model).__name__, reason)


def run(model: nn.Module, x: torch.Tensor, policy, cap: int, latency: bool, capture: bool):
    """The static-shape early-exit loop (see the module docstring). ``model`` is in eval and single-step mode.
    Returns ``(exit_step, prediction, latency_s or None)`` for the N samples of ``x[T, N, ...]``."""
    T, N = x.shape[:2]
    dev = x.device
    graphs = graphs_for(model, min(cap, N), x[0], capture)
    decisions = decisions_for(graphs, policy, T, capture, model)
    sizes = sorted(graphs)
    g, d = graphs[sizes[-1]], decisions[sizes[-1]]
    g.bind()
    refill(model, torch.arange(g.batch, device=dev))
    d.reset(N)
    frames = x.reshape(T * N, *x.shape[2:])  # frame of sample i at step t: row t·N + i (d.gather)
    decided_rows = []  # d.done after each step: (sample or N, exit step, prediction) per row
    n_valid = waiting = g.batch
    clock = time.perf_counter
    joined = torch.full((N,), clock(), dtype=torch.float64) if latency else None
    decided = torch.zeros(N, dtype=torch.float64) if latency else None
    while n_valid:
        torch.index_select(frames, 0, d.gather, out=g.x)
        d.step(g.step())  # sums, steps, decisions, refills and padding advance on d's static buffers
        decided_rows.append(d.done.clone())
        took = waiting
        n_valid, waiting = d.counts.tolist()  # the one wait for the device per step
        if latency:
            now = clock()
            ids = decided_rows[-1][0]
            decided[ids[ids < N].cpu()] = now
            joined[took:waiting] = now
        smaller = [b for b in sizes if n_valid <= b < g.batch]
        if n_valid and waiting == N and smaller:  # move the survivors to the smallest bucket that holds them
            keep = d.valid.nonzero().squeeze(1)
            g2, d2 = graphs[smaller[0]], decisions[smaller[0]]
            g2.bind()
            for old, buf in zip(g.buffers, g2.buffers):
                buf[:n_valid] = old[keep]
            refill(model, torch.arange(n_valid, g2.batch, device=dev))
            d2.take(d, keep)
            g, d = g2, d2
    rows = torch.cat(decided_rows, 1)
    exit_step = torch.full((N + 1,), T, dtype=torch.long, device=dev)  # (row N: the rows that did not decide)
    pred = torch.zeros(N + 1, dtype=torch.long, device=dev)
    exit_step[rows[0]] = rows[1]
    pred[rows[0]] = rows[2]
    return exit_step[:N], pred[:N], (decided - joined) if latency else None
