"""Confidence bounds on what an early exit costs: the share of samples it harms, and the accuracy drop itself.

On ``n`` validation samples a cutoff's decision *harms* ``h`` of them (right at T, wrong at the exit) and *helps*
``g`` (wrong at T, right at the exit). Its accuracy drop against running to T is ``(h − g) / n``, an estimate of
Δ = p_harm − p_help. :func:`fewstep.calibration.calibrate_to_target` accepts a setting when an upper confidence
bound on Δ (``bound="drop"``, the default) or on p_harm (``bound="harm"``) is within the target. The papers give
none; both are fewstep's choice:

- :func:`harm_upper_bound`: the one-sided Clopper-Pearson bound on p_harm, which is ≥ Δ. Exact and simple; blind
  to the samples an exit helps, so it certifies nothing where answers change between steps in both directions.
- :func:`drop_upper_bound`: an exact bound on Δ itself, from the two counts jointly (an exact unconditional test of
  the matched-pairs difference; see its docstring).
"""
from __future__ import annotations

import functools
import math

import numpy as np

BOUNDS = ("drop", "harm")  # what calibrate_to_target bounds (``fewstep cutoff --bound``)
DROP_BOUND = "exact-score"  # which construction :func:`drop_upper_bound` is (stored beside the bounded exits)
GAMMA = 1e-3  # the drop bound's Berger-Boos restriction of the nuisance (part of its α)
_GRID = 16    # points per half of the nuisance grid (linear and geometric), refined around the maximum


def _cp_upper(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound on a binomial rate (``k`` of ``n``)."""
    from scipy.stats import beta

    if n <= 0 or k >= n:
        return 1.0
    return float(beta.ppf(confidence, k + 1, n - k))


def _cp_lower(k: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower bound on a binomial rate (``k`` of ``n``)."""
    from scipy.stats import beta

    if n <= 0 or k <= 0:
        return 0.0
    return float(beta.ppf(1.0 - confidence, k, n - k + 1))


def harm_upper_bound(harmed: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson upper bound on the share of samples a cutoff harms (right at T, wrong at the exit),
    ``harmed`` of ``n``. It bounds the accuracy drop too (drop = harmed − helped share), loosely where the exits
    also put right samples that T gets wrong."""
    return _cp_upper(harmed, n, confidence)


def bonferroni_drop_bound(harmed: int, helped: int, n: int, confidence: float) -> float:
    """The drop bound fewstep used until the sixteenth session, kept as :func:`drop_upper_bound`'s starting bracket
    and for comparison (``bench/drop_bound.py``): the harmed share's Clopper-Pearson upper bound minus the helped
    share's lower bound, each at 1 − α/2 (Bonferroni; valid, but it spends about a fifth of α)."""
    a = (1.0 - confidence) / 2
    return _cp_upper(harmed, n, 1 - a) - _cp_lower(helped, n, 1 - a)


def _score(h, g, n: int, d: float):
    """Tango's score statistic for the matched-pairs difference p_harm − p_help = ``d`` (Tango 1998, Stat Med 17:891):
    (h − g − n d) / sqrt(n (2 p̂ + d (1 − d))), p̂ the maximum-likelihood p_help under the hypothesis."""
    h, g = np.asarray(h, float), np.asarray(g, float)
    a = 2.0 * n
    b = -h - g + (2.0 * n - h + g) * d
    c = -g * d * (1.0 - d)
    p = (-b + np.sqrt(np.maximum(b * b - 4 * a * c, 0.0))) / (2 * a)
    var = n * (2 * p + d * (1 - d))
    num = h - g - n * d
    with np.errstate(divide="ignore", invalid="ignore"):
        z = num / np.sqrt(np.where(var > 0, var, 1.0))
    return np.where(var > 0, z, np.where(num > 0, np.inf, np.where(num < 0, -np.inf, 0.0)))


def drop_pvalue(harmed: int, helped: int, n: int, d: float, gamma: float = GAMMA) -> float:
    """Exact p-value of the hypothesis that the drop is at least ``d`` (Δ = p_harm − p_help ≥ d), given ``harmed``
    and ``helped`` of ``n`` samples; small values say the drop is below ``d``. See :func:`drop_upper_bound`."""
    from scipy.stats import binom

    changed = harmed + helped
    q_lo = max(_cp_lower(changed, n, 1 - gamma / 2), d, 1e-12)  # Δ ≤ q, so Δ ≥ d > 0 needs q ≥ d
    q_hi = _cp_upper(changed, n, 1 - gamma / 2)
    if q_lo > q_hi:  # no share of changed answers both in the interval and compatible with Δ ≥ d
        return gamma
    # changed counts outside [bot, top] have negligible probability for every q of the interval; their mass is
    # added in full (as if every such outcome were as extreme), so the cut can only make the p-value larger
    top = int(min(n, math.ceil(n * q_hi + 7 * math.sqrt(n * q_hi) + 10)))
    bot = int(min(changed, max(0, math.floor(n * q_lo - 7 * math.sqrt(n * q_lo) - 10))))
    D = np.arange(bot, top + 1)
    h = np.arange(top + 1)[None, :]
    z = np.where(h <= D[:, None], _score(h, D[:, None] - h, n, d), np.inf)  # [changed, harmed]
    t = np.maximum.accumulate(z, axis=1)  # nondecreasing in harmed at each changed count (see drop_upper_bound)
    region = (t <= t[changed - bot, harmed]).sum(1)  # outcomes at least as extreme: harmed < region[changed]

    def tail(qs):
        qs = np.asarray(qs, float)[:, None]
        theta = np.clip((qs + d) / (2 * qs), 0.0, 1.0)  # below 0: the smallest Δ the share q allows, −q
        inside = np.where(region > 0, binom.cdf(region - 1, D, theta), 0.0)
        outside = binom.sf(top, n, qs[:, 0]) + (binom.cdf(bot - 1, n, qs[:, 0]) if bot > 0 else 0.0)
        return (binom.pmf(D, n, qs) * inside).sum(1) + outside

    qs = np.unique(np.concatenate([np.linspace(q_lo, q_hi, _GRID), np.geomspace(q_lo, q_hi, _GRID)]))
    p = tail(qs)
    i = int(p.argmax())
    best = max(float(p[i]), float(tail(np.linspace(qs[max(i - 1, 0)], qs[min(i + 1, len(qs) - 1)], 9)).max()))
    return min(1.0, best + gamma)


@functools.lru_cache(maxsize=1 << 16)
def _drop_bound(harmed: int, helped: int, n: int, confidence: float, tol: float) -> float:
    """:func:`drop_upper_bound`'s search: a bracket [lo, hi] with the test rejecting Δ ≥ hi and not Δ ≥ lo, from
    the observed drop and the Bonferroni pair of bounds, narrowed by false position on log p (Illinois), with a
    bisection every third step so that the bracket shrinks where p jumps."""
    alpha = 1.0 - confidence

    def logp(d):
        return math.log(drop_pvalue(harmed, helped, n, d)) - math.log(alpha)  # <= 0: rejects

    lo = (harmed - helped) / n
    hi = min(1.0, max(lo + tol, bonferroni_drop_bound(harmed, helped, n, confidence)))
    flo, fhi, step = logp(lo), logp(hi), 1e-3
    while flo <= 0 and lo > -1.0:
        hi, fhi = lo, flo
        lo, step = max(-1.0, lo - step), 2 * step
        flo = logp(lo)
    if flo <= 0:
        return -1.0
    step = 1e-3
    while fhi > 0:
        if hi >= 1.0:
            return 1.0
        lo, flo = hi, fhi
        hi, step = min(1.0, hi + step), 2 * step
        fhi = logp(hi)
    side, k = 0, 0
    while hi - lo > tol:
        k += 1
        m = (lo + hi) / 2 if k % 3 == 0 else hi - fhi * (hi - lo) / (fhi - flo)
        m = min(max(m, lo + tol / 4), hi - tol / 4)
        fm = logp(m)
        if fm <= 0:
            hi, fhi = m, fm
            flo = flo / 2 if side == -1 else flo  # Illinois: halve the end that stayed twice
            side = -1
        else:
            lo, flo = m, fm
            fhi = fhi / 2 if side == 1 else fhi
            side = 1
    return hi


def drop_upper_bound(harmed: int, helped: int, n: int, confidence: float, tol: float = 1e-5) -> float:
    """Upper confidence bound at ``confidence`` on the accuracy drop Δ = p_harm − p_help of a cutoff that harms
    ``harmed`` of ``n`` samples (right at T, wrong at the exit) and helps ``helped`` (wrong at T, right at the
    exit): the smallest d (to ``tol``) at which :func:`drop_pvalue` rejects Δ ≥ d at α = 1 − ``confidence``.

    fewstep's choice (the papers give none): an exact unconditional test of the matched-pairs difference. In terms
    of the share of changed answers q = p_harm + p_help and θ = p_harm / q, the changed count D = h + g is Bin(n, q)
    and h given D is Bin(D, θ), with Δ = q (2θ − 1). Outcomes are ordered by Tango's score statistic
    (:func:`_score`), made nondecreasing in h at each D by a running maximum; then for any q a larger Δ (a larger θ)
    can only make an outcome as extreme as the observed one less likely, so the hypothesis Δ ≥ d is worst at Δ = d.
    The p-value is the largest probability of such an outcome over every q in the two-sided 1 − γ Clopper-Pearson
    interval of D, plus γ (Berger & Boos 1994, J Am Stat Assoc 89:1012; γ = :data:`GAMMA`); the largest is taken on
    a 32-point grid refined around its maximum. Unlike the Bonferroni pair (:func:`bonferroni_drop_bound`: fewstep's
    drop bound until 2026-12-05), it spends all of α on the difference: on 5 000 samples, 72 harmed and 100 helped
    give −0.13 pt instead of +0.18 pt, 100 and 72 give 1.00 pt instead of 1.30, and a setting that changes no answer
    0.06 pt (the harmed share's bound alone, 0.06 pt: γ costs a hair). It is cached by its arguments (a calibration
    tests the same counts often)."""
    if n <= 0:
        return 1.0
    return _drop_bound(int(harmed), int(helped), int(n), float(confidence), float(tol))


def upper_bound(bound: str, harmed: int, helped: int, n: int, confidence: "float | None") -> float:
    """The ``bound`` (:data:`BOUNDS`) of a decision that harms ``harmed`` and helps ``helped`` of ``n`` samples;
    ``confidence=None``: the observed share instead (no guarantee)."""
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)}, got {bound!r}")
    if confidence is None:
        return (harmed - (helped if bound == "drop" else 0)) / max(n, 1)
    if bound == "harm":
        return harm_upper_bound(harmed, n, confidence)
    return drop_upper_bound(harmed, helped, n, confidence)


def within(bound: str, harmed: int, helped: int, n: int, max_drop: float, confidence: "float | None") -> bool:
    """Whether a decision that harms ``harmed`` and helps ``helped`` of ``n`` samples passes the target
    ``max_drop`` at ``confidence`` (``None``: its observed share is within it). For ``drop`` this is the test of
    Δ ≥ ``max_drop`` itself (:func:`drop_pvalue` ≤ 1 − ``confidence``), which holds its level whatever the shape
    of the p-value in d; its bound (:func:`drop_upper_bound`) agrees except within the bound's tolerance."""
    if bound == "drop" and confidence is not None:
        return n > 0 and drop_pvalue(harmed, helped, n, max_drop) <= 1.0 - confidence
    return upper_bound(bound, harmed, helped, n, confidence) <= max_drop


def smallest_n(max_drop: float, confidence: float, bound: str = "drop") -> int:
    """The fewest samples with which a setting that changes no answer (none harmed, none helped) has its bound
    within ``max_drop``: for ``harm`` 1 − (1 − c) ** (1 / n) ≤ d (c = ``confidence``), for ``drop`` found by
    search (a hair more). With fewer, every setting that helps no sample fails and runs every sample to T."""
    if not 0.0 < max_drop < 1.0:
        raise ValueError(f"max_drop must be in (0, 1), got {max_drop}")
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {', '.join(BOUNDS)}, got {bound!r}")
    n = math.ceil(math.log(1.0 - confidence) / math.log(1.0 - max_drop))
    if bound == "harm":
        return n
    lo, hi = n - 1, n  # the drop bound at 0 changed is never below the harm bound's (it pays γ)
    while drop_upper_bound(0, 0, hi, confidence) > max_drop:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        m = (lo + hi) // 2
        lo, hi = (lo, m) if drop_upper_bound(0, 0, m, confidence) <= max_drop else (m, hi)
    return hi
