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


# ------------------------------------------------------------------------ calibrate to a target
def harm_upper_bound(harmed: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound on a binomial rate (``harmed`` of ``n``)."""
    from scipy.stats import beta

    if n <= 0:
        return 1.0
    if harmed >= n:
        return 1.0
    return float(beta.ppf(confidence, harmed + 1, n - harmed))


DEFAULT_EPSILONS = [0.0, 1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2,
                    0.3, 0.4, 0.5, 0.7, 0.9]
# softmax only: networks whose running logits separate by tens (converted QCFS nets) need 1 − p_max this small
SOFTMAX_TINY_EPSILONS = [1e-30, 1e-24, 1e-20, 1e-16, 1e-13, 1e-10, 1e-8]


def candidates(name: str, T: int, epsilons=None) -> list[Policy]:
    """A policy family ordered from conservative (latest exits) to aggressive."""
    if name == "timestep":
        return [Timestep(t, T=T) for t in range(T, 0, -1)]
    eps = sorted(epsilons or (DEFAULT_EPSILONS + SOFTMAX_TINY_EPSILONS if name == "softmax" else DEFAULT_EPSILONS))
    return [make(name, epsilon=e) for e in eps]


@dataclass
class TargetResult:
    policy: Policy
    bound: float          # upper confidence bound on the accuracy drop of the chosen policy
    observed_drop: float  # drop measured on the held-out half used for the test
    mean_exit_step: float
    n_fit: int
    n_test: int
    tested: list          # (params, harmed, bound, accepted) for every candidate tried

    def summary(self) -> dict:
        return {"bound": self.bound, "observed_drop": self.observed_drop, "mean_exit_step": self.mean_exit_step,
                "n_fit": self.n_fit, "n_test": self.n_test}


def calibrate_to_target(name: str, Y: torch.Tensor, y: torch.Tensor, max_drop: float,
                        confidence: float | None = 0.95, epsilons=None, seed: int = 0,
                        max_step: int | None = None) -> TargetResult:
    """Pick the most aggressive policy whose upper confidence bound on the accuracy drop is ≤ ``max_drop``.

    Validation data only. The drop of a cutoff against running to T is at most the share of samples it
    *harms* (right at T, wrong at exit); that share is bounded by a one-sided Clopper-Pearson interval
    at ``confidence``. Candidates are tested in a fixed sequence from conservative to aggressive and the
    search stops at the first failure (fixed-sequence testing keeps the guarantee without a multiplicity
    correction). Policies with learned thresholds (``topk``, ``spikecp``) are fitted on one half of the
    data and tested on the other half; the other policies are tested on all of it. If no candidate
    passes, the result exits everyone at T (drop 0). ``confidence=None`` uses the observed harm rate
    instead of a bound (a plain validation choice, with no guarantee). ``max_step`` caps every candidate
    (:attr:`Policy.max_step`), so the bound covers the capped policy.
    """
    check_Y(Y)
    if not 0.0 <= max_drop < 1.0:
        raise ValueError(f"max_drop is a fraction of accuracy in [0, 1), got {max_drop} (0.005 = 0.5 pt)")
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    T, N = Y.shape[:2]
    y = y.to(Y.device)
    if name in POLICIES and POLICIES[name].needs_calibration:
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed)).to(Y.device)
        fit, test = perm[: N // 2], perm[N // 2:]
    else:
        fit, test = None, torch.arange(N, device=Y.device)
    Yt, yt = Y[:, test], y[test]
    right_at_T = Yt[-1].argmax(-1) == yt
    chosen = Timestep(T, T=T)
    chosen_bound, chosen_drop = 0.0, 0.0
    tested = []
    for pol in candidates(name, T, epsilons):
        if fit is not None:
            pol.calibrate(Y[:, fit], y[fit])
        pol.T = T
        if name != "timestep":
            pol.with_max_step(max_step)
        d = simulate(pol, Yt)
        right = d.prediction.to(yt.device) == yt
        harmed = int((right_at_T & ~right).sum())
        bound = harmed / len(yt) if confidence is None else harm_upper_bound(harmed, len(yt), confidence)
        ok = bound <= max_drop
        tested.append({"params": {k: v for k, v in pol.params().items() if k in ("epsilon", "t")}, "harmed": harmed,
                       "bound": bound, "mean_exit_step": d.mean_exit_step(), "accepted": ok})
        if not ok:
            break
        chosen, chosen_bound = pol, bound
        chosen_drop = (right_at_T.float().mean() - right.float().mean()).item()
    mean_exit = simulate(chosen, Yt).mean_exit_step()
    return TargetResult(chosen, chosen_bound, chosen_drop, mean_exit, 0 if fit is None else len(fit), len(test), tested)


def sweep(name: str, Y_cal: torch.Tensor, y_cal: torch.Tensor, Y: torch.Tensor, y: torch.Tensor,
          epsilons=None) -> list[dict]:
    """Accuracy vs mean exit step on (``Y``, ``y``) over a policy's thresholds (fitted on ``Y_cal``).

    Each point also holds ``val_accuracy`` and ``val_mean_exit_step``, the same setting on the calibration
    data, so that a setting can be chosen there (:func:`fastest_point`) and read on (``Y``, ``y``)."""
    T = Y.shape[0]
    points = []
    for pol in candidates(name, T, epsilons):
        if pol.needs_calibration:
            pol.calibrate(Y_cal, y_cal)
        pol.T = T
        d, dv = simulate(pol, Y), simulate(pol, Y_cal)
        points.append({**{k: v for k, v in pol.params().items() if k in ("epsilon", "t")},
                       "accuracy": d.accuracy(y), "mean_exit_step": d.mean_exit_step(),
                       "val_accuracy": dv.accuracy(y_cal), "val_mean_exit_step": dv.mean_exit_step()})
    return points


def fastest_point(points: list[dict], full_accuracy: float, max_drop: float, on: str = "val") -> dict | None:
    """The point of a :func:`sweep` with the lowest mean exit step on split ``on`` (``"val"``: the
    calibration data; ``"test"``: the evaluated split, the papers' reading, for comparison only) whose
    accuracy there is within ``max_drop`` of ``full_accuracy`` (that split's full-T accuracy); ``None`` if
    no point is. The same choice as :func:`fastest_within` on the calibration data."""
    if on not in ("val", "test"):
        raise ValueError(f"on must be 'val' or 'test', got {on!r}")
    acc, ex = ("val_accuracy", "val_mean_exit_step") if on == "val" else ("accuracy", "mean_exit_step")
    ok = [p for p in points if p[acc] >= full_accuracy - max_drop - 1e-9]
    return min(ok, key=lambda p: p[ex]) if ok else None


def fastest_within(name: str, Y: torch.Tensor, y: torch.Tensor, max_drop: float = 0.01,
                   cap: bool = False) -> tuple[Policy, dict]:
    """The setting of policy ``name`` with the lowest mean exit step whose accuracy on (``Y``, ``y``) is within
    ``max_drop`` of full T, fitted on the same data. A plain validation choice, with no guarantee (see
    :func:`calibrate_to_target` for one). Returns the policy and its validation ``{accuracy, mean_exit_step}``.

    ``cap=True`` searches the step cap :attr:`Policy.max_step` (every step below T) jointly with the threshold;
    a choice among T times more settings, so expect its realised drop on other data to overshoot a little more."""
    check_Y(Y)
    T = Y.shape[0]
    full = (Y[-1].argmax(-1) == y).float().mean().item()
    best = None
    caps = range(1, T) if cap and name != "timestep" else []
    for pol in candidates(name, T):
        if pol.needs_calibration:
            pol.calibrate(Y, y)
        pol.T = T
        d = simulate(pol, Y)
        for k, dk in [(None, d)] + [(k, capped(d, Y, k)) for k in caps if k < int(d.exit_step.max())]:
            acc, ex = dk.accuracy(y), dk.mean_exit_step()
            if acc >= full - max_drop - 1e-9 and (best is None or ex < best[1]["mean_exit_step"]):
                best = (pol, {"accuracy": acc, "mean_exit_step": ex}, k)
    if best is None:
        return Timestep(T, T=T), {"accuracy": full, "mean_exit_step": float(T)}
    return best[0].with_max_step(best[2]), best[1]
