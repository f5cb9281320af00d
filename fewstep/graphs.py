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
- The exit decision (the running sum, the step count and the policy) is a second graph per bucket and
  policy (:class:`DecisionGraph`), replayed after the network's; the runner then waits for the device
  once per step, to read which samples decided. A policy that cannot be captured (a host sync in its
  ``fire``) decides eagerly on the same static buffers, with one logged warning.

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

from .neurons import refill, reset, stateful_modules

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
    """The exit decision after a step of a bucket of ``batch`` rows, on static buffers: ``Y += out``,
    ``steps += 1``, then ``fire = valid & (steps >= T | policy.stops(Y, steps))`` (padding rows ask about step
    1 and never decide). With ``capture`` it is a CUDA graph reading the step graph's static output, replayed
    after it; otherwise (the emulated schedule, or a policy that cannot be captured) the same body runs eagerly
    on the given output. The policy is held, so the tensors its replay reads (its per-step tables) stay alive."""

    def __init__(self, step: StepGraph, policy, T: int, capture: bool):
        dev = step.x.device
        self.batch, self.policy, self.T, self.capture = step.batch, policy, int(T), bool(capture)
        self.Y = torch.zeros(self.batch, step.classes, dtype=torch.float32, device=dev)  # (the step's output .float())
        self.steps = torch.zeros(self.batch, dtype=torch.long, device=dev)
        self.valid = torch.ones(self.batch, dtype=torch.bool, device=dev)
        self._one = torch.ones(self.batch, dtype=torch.long, device=dev)
        self.graph, self.fire = None, None
        if not self.capture:
            return
        self._out = step.out
        try:
            side = torch.cuda.Stream(device=dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):  # warm-up off the capture stream (the policy's tables are made here)
                for _ in range(2):
                    self._body(self._out)
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
        return self.valid & ((self.steps >= self.T) | self.policy.stops(self.Y, t).to(self.Y.device))

    def reset(self) -> None:
        """Every row a fresh, valid sample."""
        self.Y.zero_()
        self.steps.zero_()
        self.valid.fill_(True)

    def step(self, out: torch.Tensor) -> torch.Tensor:
        """The decision after the step whose output is ``out``; ``fire[batch]`` is overwritten by the next replay."""
        if self.graph is None:
            return self._body(out)
        self.graph.replay()  # reads the step graph's static output, which is ``out``
        return self.fire

    def _check(self) -> None:
        """A replay from random buffers against the eager body on copies of them: same sums, steps, decisions."""
        g = torch.Generator(device=self.Y.device).manual_seed(0)
        dev, B = self.Y.device, self.batch
        Y0 = torch.randn(self.Y.shape, generator=g, device=dev) * 3
        s0 = torch.randint(0, self.T, (B,), generator=g, device=dev)
        v0 = torch.rand(B, generator=g, device=dev) < 0.75
        out = torch.randn(self.Y.shape, generator=g, device=dev)
        Y1, s1 = Y0 + out, s0 + 1
        want = v0 & ((s1 >= self.T) | self.policy.stops(Y1, torch.where(v0, s1, self._one)).to(dev))
        self._out.copy_(out)  # (the step graph's next replay overwrites it)
        self.Y.copy_(Y0)
        self.steps.copy_(s0)
        self.valid.copy_(v0)
        got = self.step(self._out)
        if not (torch.equal(got, want) and torch.equal(self.Y, Y1) and torch.equal(self.steps, s1)):
            raise CaptureError(f"a replayed {getattr(self.policy, 'name', type(self.policy).__name__)} decision "
                               "differs from the eager one; its fire() keeps state the graph cannot see")
        self.reset()


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
    B = g.batch
    g.bind()
    refill(model, torch.arange(B, device=dev))
    d.reset()
    exit_step = torch.full((N,), T, dtype=torch.long, device=dev)
    pred = torch.zeros(N, dtype=torch.long, device=dev)
    active = torch.arange(B, device=dev)  # sample id per slot (0 in padding slots)
    n_valid, waiting = B, B
    clock = time.perf_counter
    joined = torch.full((N,), clock(), dtype=torch.float64) if latency else None
    decided = torch.zeros(N, dtype=torch.float64) if latency else None
    while n_valid:
        g.x.copy_(x[d.steps.clamp(max=T - 1), active])
        fire = d.step(g.step())  # steps, running sums and decisions advance on d's static buffers
        slots = fire.nonzero().squeeze(1)  # the one wait for the device per step
        if not len(slots):
            continue
        done = active[slots]
        if latency:
            now = clock()
            decided[done.cpu()] = now
        exit_step[done] = d.steps[slots]
        pred[done] = d.Y[slots].argmax(-1)
        n_new = min(len(slots), N - waiting)
        if latency:
            joined[waiting:waiting + n_new] = now
        new, pad = slots[:n_new], slots[n_new:]
        active[new] = torch.arange(waiting, waiting + n_new, device=dev)
        active[pad], d.valid[pad] = 0, False
        d.steps[slots], d.Y[slots] = 0, 0.0
        refill(model, slots)  # newcomers and padding start from fresh state
        waiting += n_new
        n_valid -= len(pad)
        smaller = [b for b in sizes if n_valid <= b < g.batch]
        if n_valid and waiting == N and smaller:  # move the survivors to the smallest bucket that holds them
            keep = d.valid.nonzero().squeeze(1)
            g2, d2 = graphs[smaller[0]], decisions[smaller[0]]
            g2.bind()
            for old, buf in zip(g.buffers, g2.buffers):
                buf[:n_valid] = old[keep]
            refill(model, torch.arange(n_valid, g2.batch, device=dev))
            d2.reset()
            d2.Y[:n_valid], d2.steps[:n_valid] = d.Y[keep], d.steps[keep]
            d2.valid[n_valid:] = False
            active = torch.cat([active[keep], active.new_zeros(g2.batch - n_valid)])
            g, d = g2, d2
    return exit_step, pred, (decided - joined) if latency else None
