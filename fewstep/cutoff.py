"""Cutoff policies: when to stop a sample (METHODS §2).

Every policy reads the running logits ``Y(t) = Σ_{k≤t} O(k)`` (``Y[T, N, C]``) and decides, step by
step, whether a sample may stop. The prediction at exit is ``argmax Y(t)``; a sample that never
triggers exits at T. Steps are counted from 1.

- ``timestep``: everyone exits at a fixed step ``t``.
- ``softmax`` (arXiv 2405.00699): exit at the first t with ``max softmax(Y(t)) > 1 − ε``, evaluated as
  ``S < ε / (1 − ε)`` in float64, with ``S`` the sum of ``exp(Y − max Y)`` over the other classes, so
  ``1 − max softmax = S / (1 + S)`` never rounds to 0 (a float32 softmax rounds to 1.0 once the top-2 gap
  passes ~17, as it does in converted networks, so every small ε would fire at once); its sweep adds
  ε down to 1e-30 for such networks.
- ``topk`` (arXiv 2301.09522): gap ``g(t) = top1(Y(t)) − top2(Y(t))``; exit at the first t with
  ``g(t) > β_t``. β_t is calibrated on held-out data for precision ``1 − ε``: with
  ``p(t) = Π_{k≥t} 1[argmax Y(k) = y]`` ("correct from t on") and a grid of 100 β in
  ``[0, max g(t)]``, ``C(β, t) = Σ 1[g(t) > β]·p(t) / Σ 1[g(t) > β]`` and β_t is the smallest β
  with ``C ≥ 1 − ε`` (+∞ when none).
- ``spikecp`` (Chen et al., arXiv 2305.11322): nonconformity ``−log softmax(Y(t))[y]``; per-step
  conformal quantile q_t at level 1 − ε; exit when the set ``{c : −log softmax(Y(t))[c] ≤ q_t}``
  holds exactly one class.
- ``oct`` (oracle, needs labels): each sample exits at the first t from which its prediction stays
  correct through T (wrong at T → T). The lower bound on mean latency at zero accuracy loss.

A policy is one class: implement ``fire(Y_t, t)`` (a bool per sample at step t) and, when it
learns thresholds, ``calibrate(Y, y)``. Every policy also takes a step cap, ``max_step`` (fewstep's
addition: a sample stops there if it has not fired; :meth:`Policy.stops` is ``fire`` or the cap).
:func:`simulate` applies any policy to full-length outputs; :mod:`fewstep.anytime` applies the same
``stops`` while really running step by step.

Choosing a setting on validation data (:func:`fastest_within`, :func:`calibrate_to_target`, :func:`sweep`) is
in :mod:`fewstep.calibration`; those names are also importable from here.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

POLICIES: dict[str, type["Policy"]] = {}


def register(cls):
    """Class decorator: make a :class:`Policy` subclass available by its ``name`` (:func:`make`, the CLI)."""
    POLICIES[cls.name] = cls
    return cls


def running(O: torch.Tensor) -> torch.Tensor:
    """Per-step logits ``O[T, N, C]`` → running sums ``Y[T, N, C]``."""
    check_Y(O)
    return O.float().cumsum(0)


def check_Y(Y: torch.Tensor) -> torch.Tensor:
    if not isinstance(Y, torch.Tensor) or Y.dim() != 3:
        shape = list(Y.shape) if isinstance(Y, torch.Tensor) else type(Y).__name__
        raise ValueError(f"expected running logits Y[T, N, C] (rank 3), got {shape}")
    if Y.shape[2] < 2:
        raise ValueError(f"need at least 2 classes in Y[T, N, C], got C = {Y.shape[2]}")
    return Y


def check_epsilon(eps: float) -> float:
    eps = float(eps)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {eps}")
    return eps


@dataclass
class Decision:
    """Exit step (1..T) and prediction per sample."""

    exit_step: torch.Tensor  # long [N]
    prediction: torch.Tensor  # long [N]

    def accuracy(self, y: torch.Tensor) -> float:
        return (self.prediction == y).float().mean().item()

    def mean_exit_step(self) -> float:
        return self.exit_step.float().mean().item()

    def differs(self, other: "Decision") -> int:
        """How many samples exit at another step or predict another class than in ``other``."""
        return int(((self.exit_step != other.exit_step) | (self.prediction != other.prediction)).sum())


@functools.lru_cache(maxsize=None)
def _table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[nan, values...]``: entry t is step t's value (early exit asks at every step: made once). Never evicted:
    a captured decision (:class:`fewstep.graphs.DecisionGraph`) reads the table's memory at every replay."""
    return torch.tensor((math.nan, *values), dtype=dtype, device=device)


def per_step(values: list[float], t, like: torch.Tensor, name: str = "the policy"):
    """``values[t - 1]`` for an int step or a tensor of per-sample steps (t >= 1).

    A step past the table is an error naming both. For a tensor of steps it is caught by the lookup itself,
    not by reading the largest step back (on CUDA that read would wait for the device at every step): on
    the CPU the lookup raises; on CUDA an out-of-range index would stop the device, so the early-exit runners
    check :meth:`Policy.horizon` against their T before the first step.
    """
    if isinstance(t, torch.Tensor):
        table, t = _table(tuple(values), like.dtype, like.device), t.to(like.device)
        try:
            return table[t]
        except IndexError:  # (the CPU's lookup checks its bounds)
            raise ValueError(f"{name} was calibrated for T = {len(values)} but asked about step {int(t.max())}") from None
    if t > len(values):
        raise ValueError(f"{name} was calibrated for T = {len(values)} but asked about step {t}")
    return values[t - 1]


def check_horizon(policy: "Policy", T: int) -> None:
    """Refuse to run ``policy`` for ``T`` steps when its per-step calibration covers fewer."""
    h = policy.horizon()
    if h is not None and h < T:
        raise ValueError(f"T mismatch: {policy.name} was calibrated for T = {h} steps but the input has T = {T}")


def top2_gap(Yt: torch.Tensor) -> torch.Tensor:
    """``top1(Y) − top2(Y)`` over the last (class) dimension: what the Top-K cutoff thresholds."""
    top = Yt.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


class Policy:
    """Base class. ``fire(Y_t, t)`` → bool ``[n]``; ``t`` is the step (1-based) as an int, or a tensor
    with one step per sample (samples at different steps share a batch under continuous batching).
    ``T`` is set by calibration or by the caller.

    ``max_step`` (None: off) caps every policy: a sample that has not fired by that step stops there, with
    its prediction at that step. Runners ask :meth:`stops`, which is ``fire`` or the cap. A cap is fewstep's
    addition to the published rules: where many samples never pass the threshold (a converted network at
    T = 64 whose accuracy is far below 1 − ε), they run to T and cost more steps than a shorter fixed T would;
    :func:`fastest_within` with ``cap=True`` chooses the cap with the threshold, on validation.
    """

    name = "policy"
    needs_calibration = False

    def __init__(self, T: int | None = None):
        self.T = T
        self.max_step: int | None = None

    def fire(self, Yt: torch.Tensor, t: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def stops(self, Yt: torch.Tensor, t) -> torch.Tensor:
        """Bool ``[n]``: the samples that stop at step ``t`` (an int, or a tensor of per-sample steps): the
        policy fires, or ``t`` reached ``max_step``."""
        f = self.fire(Yt, t)
        if self.max_step is None:
            return f
        return f | ((t.to(f.device) if isinstance(t, torch.Tensor) else t) >= self.max_step)

    def with_max_step(self, k: "int | None") -> "Policy":
        """Set the step cap (``None``: off); returns the policy."""
        if k is not None and int(k) < 1:
            raise ValueError(f"max_step must be a step >= 1 (or None for no cap), got {k}")
        self.max_step = None if k is None else int(k)
        return self

    def horizon(self) -> "int | None":
        """The last step the calibration covers (``None``: any step)."""
        return None

    def calibrate(self, Y: torch.Tensor, y: torch.Tensor) -> "Policy":
        check_Y(Y)
        self.T = Y.shape[0]
        return self

    def params(self) -> dict:
        return {}

    def to_dict(self) -> dict:
        cap = {} if self.max_step is None else {"max_step": self.max_step}
        return {"policy": self.name, "T": self.T, **self.params(), **cap}

    def __repr__(self):
        cap = [] if self.max_step is None else [f"max_step={self.max_step}"]
        return f"{type(self).__name__}({', '.join([f'{k}={v}' for k, v in self.params().items()] + cap)})"


@register
class Timestep(Policy):
    """Every sample exits at the fixed step ``t``: what a user without a cutoff runs (a shorter T)."""
    name = "timestep"

    def __init__(self, t: int = 1, T: int | None = None):
        super().__init__(T)
        if int(t) < 1:
            raise ValueError(f"timestep policy needs t >= 1, got {t}")
        self.t = int(t)

    def fire(self, Yt, t):
        if isinstance(t, torch.Tensor):
            return (t >= self.t).to(Yt.device)
        return torch.full(Yt.shape[:1], t >= self.t, dtype=torch.bool, device=Yt.device)

    def params(self):
        return {"t": self.t}


@register
class Softmax(Policy):
    """Exit at the first t with ``max softmax(Y(t)) > 1 − ε`` (arXiv 2405.00699), tested without rounding to 1
    (module doc); nothing to calibrate but ε."""
    name = "softmax"

    def __init__(self, epsilon: float = 0.01, T: int | None = None):
        super().__init__(T)
        self.epsilon = check_epsilon(epsilon)

    def score(self, Yt):
        return Yt.float().softmax(-1).max(-1).values

    def fire(self, Yt, t):
        if self.epsilon <= 0.0:
            return torch.zeros(Yt.shape[:-1], dtype=torch.bool, device=Yt.device)
        # With S = Σ over the other classes of exp(Y − max Y), 1 − p_max = S / (1 + S) (no rounding to 1: S is
        # summed without the top class's 1), so p_max > 1 − ε ⟺ S < ε / (1 − ε). Float64, a handful of
        # simple kernels: early exit calls this after every step, when the CPU's caches are cold.
        z = Yt.double()
        top = z.max(-1, keepdim=True)
        others = (z - top.values).exp_().scatter_(-1, top.indices, 0.0)
        return others.sum(-1) < self.epsilon / (1.0 - self.epsilon)

    def params(self):
        return {"epsilon": self.epsilon}


@register
class TopK(Policy):
    """Exit at the first t with ``top1(Y(t)) − top2(Y(t)) > β_t`` (arXiv 2301.09522); ``calibrate(Y_val, y_val)``
    sets each β_t for precision ``1 − ε`` on held-out data (module doc)."""
    name = "topk"
    needs_calibration = True

    def __init__(self, epsilon: float = 0.01, betas=None, grid: int = 100, T: int | None = None):
        super().__init__(T)
        self.epsilon = check_epsilon(epsilon)
        self.grid = int(grid)
        self.betas = None if betas is None else [float(b) for b in betas]

    def calibrate(self, Y, y):
        super().calibrate(Y, y)
        T = Y.shape[0]
        correct = Y.argmax(-1) == y.to(Y.device)  # [T, N]
        # p(t) = correct at every k >= t
        p = correct.flip(0).cumprod(0).flip(0).float()
        betas = []
        for t in range(T):
            g = top2_gap(Y[t])
            grid = torch.linspace(0, float(g.max()), self.grid, device=Y.device)
            passed = g.unsqueeze(0) > grid.unsqueeze(1)  # [grid, N]
            n = passed.sum(1)
            prec = (passed.float() * p[t]).sum(1) / n.clamp(min=1)
            ok = (n > 0) & (prec >= 1 - self.epsilon)
            betas.append(float(grid[ok.nonzero()[0, 0]]) if ok.any() else math.inf)
        self.betas = betas
        return self

    def fire(self, Yt, t):
        if self.betas is None:
            raise RuntimeError("topk policy is not calibrated: call calibrate(Y_val, y_val) on validation data")
        g = top2_gap(Yt.float())
        return g > per_step(self.betas, t, g, "topk")

    def horizon(self):
        return None if self.betas is None else len(self.betas)

    def params(self):
        return {"epsilon": self.epsilon, "betas": self.betas}


@register
class SpikeCP(Policy):
    """Exit when the conformal prediction set at level ``1 − ε`` holds one class (arXiv 2305.11322);
    ``calibrate(Y_val, y_val)`` sets the per-step quantiles of ``−log softmax(Y(t))[y]`` on held-out data."""
    name = "spikecp"
    needs_calibration = True

    def __init__(self, epsilon: float = 0.05, quantiles=None, T: int | None = None):
        super().__init__(T)
        self.epsilon = check_epsilon(epsilon)
        self.quantiles = None if quantiles is None else [float(q) for q in quantiles]

    def calibrate(self, Y, y):
        super().calibrate(Y, y)
        n = Y.shape[1]
        scores = -Y.float().log_softmax(-1).gather(-1, y.to(Y.device).view(1, -1, 1).expand(Y.shape[0], -1, 1))[..., 0]
        k = math.ceil((n + 1) * (1 - self.epsilon))  # conformal rank
        qs = []
        for t in range(Y.shape[0]):
            s = scores[t].sort().values
            qs.append(float(s[k - 1]) if k <= n else math.inf)
        self.quantiles = qs
        return self

    def set_size(self, Yt, t):
        nll = -Yt.float().log_softmax(-1)
        q = per_step(self.quantiles, t, nll, "spikecp")
        return (nll <= (q.unsqueeze(-1) if isinstance(q, torch.Tensor) else q)).sum(-1)

    def fire(self, Yt, t):
        if self.quantiles is None:
            raise RuntimeError("spikecp policy is not calibrated: call calibrate(Y_val, y_val) on validation data")
        return self.set_size(Yt, t) == 1

    def horizon(self):
        return None if self.quantiles is None else len(self.quantiles)

    def params(self):
        return {"epsilon": self.epsilon, "quantiles": self.quantiles}


def simulate(policy: Policy, Y: torch.Tensor) -> Decision:
    """Apply ``policy`` to full-length running logits ``Y[T, N, C]`` (no compute saved)."""
    check_Y(Y)
    T, N = Y.shape[:2]
    exit_step = torch.full((N,), T, dtype=torch.long)
    done = torch.zeros(N, dtype=torch.bool)
    for t in range(1, T + 1):
        f = policy.stops(Y[t - 1], t).cpu() & ~done
        exit_step[f] = t
        done |= f
        if bool(done.all()):
            break
    pred = Y.argmax(-1).gather(0, (exit_step - 1).to(Y.device).view(1, -1))[0].cpu()
    return Decision(exit_step, pred)


def capped(d: Decision, Y: torch.Tensor, k: int) -> Decision:
    """The decision ``d`` (made on ``Y[T, N, C]``) with the step cap ``k``: a sample that exits after ``k``
    stops at ``k`` with ``argmax Y(k)``. The same as :func:`simulate` of the policy with ``max_step = k``."""
    late = d.exit_step > k
    pred = torch.where(late, Y[k - 1].argmax(-1).cpu(), d.prediction)
    return Decision(d.exit_step.clamp(max=k), pred)


def oracle(Y: torch.Tensor, y: torch.Tensor) -> Decision:
    """OCT: first t from which argmax Y stays correct through T; wrong at T → T."""
    check_Y(Y)
    T = Y.shape[0]
    correct = (Y.argmax(-1) == y.to(Y.device)).cpu()
    stays = correct.flip(0).cumprod(0).flip(0).bool()  # correct from t on
    first = torch.where(stays.any(0), stays.float().argmax(0) + 1, torch.full_like(y, T).cpu())
    pred = Y.argmax(-1).gather(0, (first - 1).to(Y.device).view(1, -1))[0].cpu()
    return Decision(first.long(), pred)


def make(name: str, **kwargs) -> Policy:
    """A cutoff policy by name (``timestep``, ``softmax``, ``topk``, ``spikecp``) with its setting, e.g.
    ``make("topk", epsilon=0.01)``; ``topk`` and ``spikecp`` then need ``calibrate(Y_val, y_val)`` on held-out data
    for their per-step thresholds."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; valid names: {', '.join(sorted(POLICIES))} (and 'oct', the oracle)")
    return POLICIES[name](**kwargs)


# ------------------------------------------------------------------------ saving and loading
def save(policy: Policy, path, meta: dict) -> Path:
    """Write thresholds and the model/T they belong to as JSON."""
    path = Path(path)
    d = {"format": "fewstep-cutoff-v1", **policy.to_dict(), "meta": meta}
    for key in ("betas", "quantiles"):  # strict JSON: +inf ("never exit at this step") as the string "inf"
        if d.get(key) is not None:
            d[key] = ["inf" if math.isinf(v) else v for v in d[key]]
    path.write_text(json.dumps(d, indent=2))
    return path


def load(path, expect: dict | None = None) -> Policy:
    """Read a calibration file; ``expect`` (e.g. ``{"model": ..., "T": ...}``) must match its meta."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no calibration file at {path}")
    d = json.loads(path.read_text())
    if d.get("format") != "fewstep-cutoff-v1":
        raise ValueError(f"{path} is not a fewstep calibration file")
    meta = d.pop("meta", {})
    for k, v in (expect or {}).items():
        if meta.get(k) != v:
            raise ValueError(f"{path} was calibrated for {k} = {meta.get(k)!r}, not {v!r}; calibrate again")
    d.pop("format")
    name = d.pop("policy")
    if name not in POLICIES:
        raise ValueError(f"{path}: unknown policy {name!r}; valid names: {', '.join(sorted(POLICIES))}")
    for key in ("betas", "quantiles"):
        if d.get(key) is not None:
            d[key] = [math.inf if v in (None, "inf") else float(v) for v in d[key]]
    max_step = d.pop("max_step", None)
    return make(name, **d).with_max_step(max_step)


# Choosing a setting on validation data lives in fewstep.calibration (which imports this module); its names
# stay reachable from here, looked up on first use.
_CALIBRATION_NAMES = ("DEFAULT_EPSILONS", "SOFTMAX_TINY_EPSILONS", "TargetResult", "calibrate_to_target", "candidates",
                      "drop_upper_bound", "fastest_point", "fastest_within", "harm_upper_bound", "sweep")


def __getattr__(name: str):
    if name in _CALIBRATION_NAMES:
        from . import calibration

        return getattr(calibration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
