"""Choosing a cutoff setting on held-out data: sweeps, the fastest setting within a drop, and a bound.

The policies themselves are in :mod:`fewstep.cutoff`; this module picks their thresholds (``epsilon``,
or ``t`` for ``timestep``) from running logits ``Y[T, N, C]`` of the **validation** split:

- :func:`fastest_within`: the setting with the lowest mean exit step whose accuracy is within
  ``max_drop`` of full T (what `fewstep ablate`, `fewstep train`'s summary and `bench/` use);
- :func:`calibrate_to_target`: the same question with a guarantee (`fewstep cutoff --max-drop D --confidence C`):
  an upper confidence bound on the accuracy drop itself (:func:`drop_upper_bound`, the default) or on the share of
  samples the cutoff harms (:func:`harm_upper_bound`, ``bound="harm"``, stricter); the bounds themselves are in
  :mod:`fewstep.bounds`;
- :func:`sweep` / :func:`fastest_point`: the accuracy-latency curve of every setting, on the calibration
  data and on another split, and the fastest point of such a curve on either.

Every name here is also reachable as ``fewstep.cutoff.<name>``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .bounds import (BOUNDS, DROP_BOUND, _cp_lower, _cp_upper, drop_pvalue, drop_upper_bound,  # noqa: F401
                     harm_upper_bound, smallest_n, upper_bound, within)
from .cutoff import POLICIES, Policy, Timestep, capped, check_Y, make, simulate


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
    bound: float          # upper confidence bound on the chosen policy's accuracy drop (or harmed share)
    observed_drop: float  # drop measured on the held-out half used for the test
    mean_exit_step: float
    n_fit: int
    n_test: int
    tested: list          # (params, harmed, helped, bound, accepted, ...) for every candidate tried
    cap: "int | None" = None  # the chosen policy's step cap
    cap_auto: bool = False    # ... chosen on the fit half (``max_step="auto"``)
    bound_on: str = "drop"    # what ``bound`` bounds (:data:`BOUNDS`)

    def summary(self) -> dict:
        return {"bound": self.bound, "bound_on": self.bound_on, "observed_drop": self.observed_drop,
                "mean_exit_step": self.mean_exit_step, "n_fit": self.n_fit, "n_test": self.n_test,
                "max_step": self.cap, "max_step_auto": self.cap_auto}


def _chain(pols: list[Policy], Y: torch.Tensor, y: torch.Tensor, max_drop: float, confidence: float | None,
           cap: "int | None", bound: str) -> dict:
    """Fixed-sequence testing of the fitted candidates ``pols`` (conservative first), each with the step cap
    ``cap`` (``None``: uncapped), on (``Y``, ``y``), stopping at the first failure. Returns ``{"last": index of
    the last accepted candidate (-1: none), "bound", "drop", "tested"}``."""
    out = {"last": -1, "bound": 0.0, "drop": 0.0, "tested": []}
    for i, pol in enumerate(pols):
        r = _judge(pol, simulate(pol.with_max_step(cap), Y), Y, y, max_drop, confidence, bound)
        out["tested"].append(r)
        if not r["accepted"]:
            break
        out.update(last=i, bound=r["bound"], drop=r["drop"])
    return out


def changed(d, Y: torch.Tensor, y: torch.Tensor) -> tuple[int, int]:
    """``(harmed, helped)``: how many samples the decision ``d`` harms (right at T, ``Y[-1]``, wrong at their exit)
    and helps (wrong at T, right at their exit). Their difference over the sample count is the accuracy drop."""
    right_at_T, right = Y[-1].argmax(-1) == y, d.prediction.to(y.device) == y
    return int((right_at_T & ~right).sum()), int((~right_at_T & right).sum())


def harmed(d, Y: torch.Tensor, y: torch.Tensor) -> int:
    """How many samples the decision ``d`` harms: right at T (``Y[-1]``), wrong at their exit."""
    return changed(d, Y, y)[0]


def _judge(pol: Policy, d, Y: torch.Tensor, y: torch.Tensor, max_drop: float, confidence: float | None,
           bound: str) -> dict:
    """One setting's decision ``d`` on (``Y``, ``y``): the samples it harms (right at T, wrong at exit) and helps
    (wrong at T, right at exit), the ``bound`` on its drop, whether that is within ``max_drop``, and the accuracy
    drop observed."""
    n_harmed, n_helped = changed(d, Y, y)
    b = upper_bound(bound, n_harmed, n_helped, len(y), confidence)
    ok = within(bound, n_harmed, n_helped, len(y), max_drop, confidence)
    return {"params": {k: v for k, v in pol.params().items() if k in ("epsilon", "t")}, "harmed": n_harmed,
            "helped": n_helped, "bound": b, "mean_exit_step": d.mean_exit_step(), "accepted": ok,
            "drop": (n_harmed - n_helped) / len(y)}


def _cap_path(pols: list[Policy], Y: torch.Tensor, y: torch.Tensor) -> list[tuple[int, "int | None"]]:
    """Every (candidate index, cap) on (``Y``, ``y``), reduced to those no other setting beats on both samples
    harmed and mean exit step, ordered from least harmful (slowest) to most (fastest). The order is by harm for
    either bound: ordered by harmed minus helped, settings that change many answers both ways came first and the
    fixed sequence stopped at them on the other half (CIFAR-10, T = 4: softmax's 0.6 pt chain failed at its first
    setting, 4.00 steps against 2.16 ordered by harm)."""
    T = Y.shape[0]
    scored = []
    for i, pol in enumerate(pols):
        d = simulate(pol.with_max_step(None), Y)
        for k in [None] + list(range(1, int(d.exit_step.max()))):
            dk = d if k is None else capped(d, Y, k)
            scored.append((harmed(dk, Y, y), dk.mean_exit_step(), i, k or T))
    path, fastest = [], float("inf")
    for _, ex, i, k in sorted(scored):
        if ex < fastest - 1e-9:
            path.append((i, None if k == T else k))
            fastest = ex
    return path


def _auto_cap(pols, Yf, yf, Yt, yt, max_drop, confidence, bound) -> TargetResult:
    """:func:`calibrate_to_target` with ``max_step="auto"``: the path on the fit half, the test on the other."""
    T = Yt.shape[0]
    sims, tested = {}, []
    chosen, b, drop, best = Timestep(T, T=T), 0.0, 0.0, float(T)
    for i, k in _cap_path(pols, Yf, yf):
        if i not in sims:
            sims[i] = simulate(pols[i].with_max_step(None), Yt)
        r = _judge(pols[i], sims[i] if k is None else capped(sims[i], Yt, k), Yt, yt, max_drop, confidence, bound)
        tested.append({**r, "max_step": k})
        if not r["accepted"]:
            break
        if r["mean_exit_step"] < best:
            chosen, best = copy.deepcopy(pols[i]).with_max_step(k), r["mean_exit_step"]
            b, drop = r["bound"], r["drop"]
    return TargetResult(chosen, b, drop, best, yf.shape[0], len(yt), tested, cap=chosen.max_step, cap_auto=True,
                        bound_on=bound)


def calibrate_to_target(name: str, Y: torch.Tensor, y: torch.Tensor, max_drop: float,
                        confidence: float | None = 0.95, epsilons=None, seed: int = 0,
                        max_step: "int | str | None" = None, bound: str = "drop") -> TargetResult:
    """Pick the most aggressive policy whose upper confidence bound on the accuracy drop is ≤ ``max_drop``.

    Validation data only. A cutoff's drop against running to T is the share of samples it *harms* (right at T,
    wrong at the exit) minus the share it *helps* (wrong at T, right at the exit). ``bound="drop"`` (the default)
    bounds that difference at ``confidence`` (:func:`fewstep.bounds.drop_upper_bound`, an exact test from both
    counts; a setting passes when that test rejects a drop of ``max_drop`` or more, :func:`fewstep.bounds.within`);
    ``bound="harm"`` bounds the harmed share
    alone (:func:`harm_upper_bound`, a one-sided Clopper-Pearson interval): stricter, it also keeps the exits'
    answers those of full T, and it certifies nothing where answers change between steps in both directions.
    Candidates are tested in a fixed sequence from conservative to aggressive and the search stops at the first
    failure (fixed-sequence testing keeps the guarantee without a multiplicity correction). Policies with learned
    thresholds (``topk``, ``spikecp``) are fitted on one half of the data and tested on the other half; the other
    policies are tested on all of it. If no candidate passes, the result exits everyone at T (drop 0).
    ``confidence=None`` uses the observed share instead of a bound (a plain validation choice, with no guarantee).
    ``max_step`` caps every candidate (:attr:`Policy.max_step`), so the bound covers the capped policy.

    ``max_step="auto"`` chooses the cap too (fewstep's addition; docs/anytime.md). The data are halved (every
    policy; ``softmax``'s bound then rests on half the samples). On the first half, every candidate with every cap
    (1..T-1, and none) is scored by the samples it harms and its mean exit step, and the settings that no other
    beats on both form a path from least harm (slowest) to most (fastest) (by harm for either bound:
    :func:`_cap_path`). The fixed sequence then runs along that path on the second half, which no choice has seen, and the
    fastest setting accepted before the first failure wins: the order is fixed before the test, so the guarantee
    holds as above. ``timestep`` takes no cap.
    """
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)}, got {bound!r}")
    check_Y(Y)
    if not 0.0 <= max_drop < 1.0:
        raise ValueError(f"max_drop is a fraction of accuracy in [0, 1), got {max_drop} (0.005 = 0.5 pt)")
    if confidence is not None and not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    auto = max_step == "auto" and name != "timestep"
    if isinstance(max_step, str) and max_step != "auto":
        raise ValueError(f"max_step is a step >= 1, None or 'auto', got {max_step!r}")
    if name == "timestep":
        max_step = None
    T, N = Y.shape[:2]
    y = y.to(Y.device)
    if auto or (name in POLICIES and POLICIES[name].needs_calibration):
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed)).to(Y.device)
        fit, test = perm[: N // 2], perm[N // 2:]
    else:
        fit, test = None, torch.arange(N, device=Y.device)
    pols = candidates(name, T, epsilons)
    for pol in pols:
        if fit is not None and pol.needs_calibration:
            pol.calibrate(Y[:, fit], y[fit])
        pol.T = T
    Yt, yt = Y[:, test], y[test]
    if auto:
        return _auto_cap(pols, Y[:, fit], y[fit], Yt, yt, max_drop, confidence, bound)
    c = _chain(pols, Yt, yt, max_drop, confidence, max_step, bound)
    chosen = Timestep(T, T=T) if c["last"] < 0 else pols[c["last"]].with_max_step(max_step)
    return TargetResult(chosen, c["bound"], c["drop"], simulate(chosen, Yt).mean_exit_step(),
                        0 if fit is None else len(fit), len(test), c["tested"], cap=chosen.max_step, bound_on=bound)


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
