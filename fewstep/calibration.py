"""Choosing a cutoff setting on held-out data: sweeps, the fastest setting within a drop, and a bound.

The policies themselves are in :mod:`fewstep.cutoff`; this module picks their thresholds (``epsilon``,
or ``t`` for ``timestep``) from running logits ``Y[T, N, C]`` of the **validation** split:

- :func:`fastest_within`: the setting with the lowest mean exit step whose accuracy is within
  ``max_drop`` of full T (what `fewstep ablate`, `fewstep train`'s summary and `bench/` use);
- :func:`calibrate_to_target`: the same question with a guarantee, a one-sided Clopper-Pearson bound
  on the share of samples the cutoff harms (`fewstep cutoff --max-drop D --confidence C`);
- :func:`sweep` / :func:`fastest_point`: the accuracy-latency curve of every setting, on the calibration
  data and on another split, and the fastest point of such a curve on either.

Every name here is also reachable as ``fewstep.cutoff.<name>``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cutoff import POLICIES, Policy, Timestep, capped, check_Y, make, simulate


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
