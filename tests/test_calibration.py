"""fewstep.calibration: choosing a cutoff setting on held-out data (a bound that holds, the fastest setting)."""
import math

import numpy as np
import pytest
import torch

from fewstep import bounds
from fewstep import calibration as cal
from fewstep import cutoff as cf


def test_the_calibration_names_are_reachable_from_cutoff():
    for name in ("fastest_within", "fastest_point", "sweep", "calibrate_to_target", "candidates", "harm_upper_bound",
                 "drop_upper_bound"):
        assert getattr(cf, name) is getattr(cal, name)


def test_softmax_candidates_reach_tiny_epsilons_and_topk_does_not():
    eps = [p.epsilon for p in cal.candidates("softmax", 2)]
    assert min(e for e in eps if e > 0) <= 1e-30 and 1e-30 not in [p.epsilon for p in cal.candidates("topk", 2)]
    assert [p.t for p in cal.candidates("timestep", 4)] == [4, 3, 2, 1]  # conservative first


def test_harm_upper_bound_matches_clopper_pearson_by_hand():
    # 0 harmed of n: the one-sided bound solves (1 - p)^n = 1 - c, p = 1 - (1 - c)^(1/n)
    assert cal.harm_upper_bound(0, 100, 0.95) == pytest.approx(1 - 0.05 ** (1 / 100))
    assert cal.harm_upper_bound(3, 3, 0.95) == 1.0 and cal.harm_upper_bound(0, 0, 0.95) == 1.0
    assert cal.harm_upper_bound(5, 100, 0.95) > 0.05  # above the observed rate


def test_tango_score_by_hand():
    # 10 harmed, 4 helped of 100, d = 0.02: A = 200, B = -14 + 194 * 0.02 = -10.12, C = -4 * 0.02 * 0.98 = -0.0784;
    # p = (10.12 + sqrt(10.12 ** 2 + 4 * 200 * 0.0784)) / 400 = 0.057426; Z = 4 / sqrt(100 (2 p + 0.0196)) = 1.0909
    assert float(bounds._score(10, 4, 100, 0.02)) == pytest.approx(1.0909, abs=1e-4)
    # p is the maximum-likelihood p_help with p_harm = p_help + d (a grid search finds the same)
    grid = np.linspace(1e-4, 0.3, 300001)
    loglik = 10 * np.log(grid + 0.02) + 4 * np.log(grid) + 86 * np.log(1 - 2 * grid - 0.02)
    p = (10.12 + math.sqrt(10.12 ** 2 + 4 * 200 * 0.0784)) / 400
    assert grid[loglik.argmax()] == pytest.approx(p, abs=2e-6)
    assert float(bounds._score(0, 0, 50, 0.0)) == 0.0 and float(bounds._score(3, 0, 50, 0.0)) == pytest.approx(
        3 / math.sqrt(50 * 2 * 3 / 100))  # d = 0: p = (h + g) / 2n, Z = (h - g) / sqrt(h + g)


def brute_pvalue(h, g, n, d, gamma=bounds.GAMMA, points=4001):
    """The drop test's p-value the long way: every trinomial outcome, its score made nondecreasing in h at each
    changed count, and the largest probability of an outcome as extreme over a fine grid of the changed share q in
    its Berger-Boos interval (p_harm = (q + d) / 2, p_help = (q - d) / 2, floored at 0)."""
    from scipy.stats import beta

    def z(a, b):
        A, B, C = 2 * n, -a - b + (2 * n - a + b) * d, -b * d * (1 - d)
        p = (-B + math.sqrt(max(B * B - 4 * A * C, 0.0))) / (2 * A)
        var, num = n * (2 * p + d * (1 - d)), a - b - n * d
        return num / math.sqrt(var) if var > 0 else (math.inf if num > 0 else -math.inf if num < 0 else 0.0)

    stat = {}
    for D in range(n + 1):
        run = -math.inf
        for a in range(D + 1):
            run = max(run, z(a, D - a))
            stat[a, D - a] = run
    extreme = [k for k, v in stat.items() if v <= stat[h, g]]
    D = h + g
    lo = max(beta.ppf(gamma / 2, D, n - D + 1) if D > 0 else 0.0, d, 1e-12)
    hi = beta.ppf(1 - gamma / 2, D + 1, n - D) if D < n else 1.0
    a, b = np.array([k[0] for k in extreme])[None], np.array([k[1] for k in extreme])[None]
    coef = np.array([math.comb(n, i) * math.comb(n - i, j) for i, j in extreme], float)[None]
    q = np.linspace(lo, hi, points)[:, None]
    ph = np.clip((q + d) / 2, 0.0, q)
    pmf = coef * ph ** a * (q - ph) ** b * (1 - q) ** (n - a - b)  # P(harmed = a, helped = b)
    return min(1.0, float(pmf.sum(1).max()) + gamma)


def test_drop_pvalue_matches_every_outcome_counted():
    for h, g, n, d in [(1, 0, 15, 0.1), (3, 1, 15, 0.05), (2, 4, 15, 0.0), (0, 0, 15, 0.15), (5, 2, 15, 0.3),
                       (1, 5, 15, -0.1)]:
        assert bounds.drop_pvalue(h, g, n, d) == pytest.approx(brute_pvalue(h, g, n, d), abs=2e-3), (h, g, n, d)


def test_drop_upper_bound_against_the_bonferroni_pair_and_the_harm_bound():
    bonferroni = lambda h, g, n: cal._cp_upper(h, n, 0.975) - cal._cp_lower(g, n, 0.975)  # noqa: E731
    for h, g, n in [(10, 10, 100), (5, 20, 400), (30, 25, 1000), (72, 100, 5000), (100, 72, 5000), (3, 1, 300)]:
        b = cal.drop_upper_bound(h, g, n, 0.95)
        assert (h - g) / n < b < bonferroni(h, g, n)  # above the estimate; all of alpha on the difference
        assert not cal.within("drop", h, g, n, b - 1e-4, 0.95) and cal.within("drop", h, g, n, b + 1e-4, 0.95)
    # the figures in its docstring: answers that change both ways no longer cost the bound half of alpha
    assert 100 * cal.drop_upper_bound(72, 100, 5000, 0.95) == pytest.approx(-0.126, abs=0.001)
    assert 100 * cal.drop_upper_bound(100, 72, 5000, 0.95) == pytest.approx(1.000, abs=0.001)
    assert 100 * bonferroni(72, 100, 5000) == pytest.approx(0.180, abs=0.001)
    for n in (20, 100, 400, 1000):  # none helped: the harm bound, plus a hair for gamma
        for h in (0, 2, 5):
            assert cal.harm_upper_bound(h, n, 0.95) <= cal.drop_upper_bound(h, 0, n, 0.95) <= \
                cal.harm_upper_bound(h, n, 0.95 + 2 * bounds.GAMMA)
    assert cal.drop_upper_bound(0, 50, 50, 0.95) < -0.8 and cal.drop_upper_bound(3, 0, 3, 0.95) == 1.0
    assert cal.upper_bound("harm", 30, 25, 1000, None) == 0.03 and cal.upper_bound("drop", 30, 25, 1000, None) == 0.005
    assert cal.smallest_n(0.006, 0.95, "harm") == 498 and cal.smallest_n(0.01, 0.95, "harm") == 299
    assert cal.smallest_n(0.006, 0.95, "drop") == 502 and cal.smallest_n(0.01, 0.95, "drop") == 301
    for d in (0.006, 0.01):
        n = cal.smallest_n(d, 0.95)
        assert cal.drop_upper_bound(0, 0, n, 0.95) <= d < cal.drop_upper_bound(0, 0, n - 1, 0.95)
    with pytest.raises(ValueError, match="bound must be one of drop, harm"):
        cal.upper_bound("churn", 1, 1, 10, 0.95)


def test_the_drop_test_holds_its_level_exactly():
    """Its size, summed over every outcome (no simulation): with 100 samples and d = 5 pt, wherever the true drop is
    d (the hypothesis's edge; whatever the share of answers that change) or beyond it, the probability that the
    test certifies d is at most 5 %."""
    from scipy.stats import binom

    n, d, box_h, box_g = 100, 0.05, 50, 45
    rejects = np.array([[h + g <= n and cal.within("drop", h, g, n, d, 0.95) for g in range(box_g)]
                        for h in range(box_h)])
    h, g = np.arange(box_h)[:, None], np.arange(box_g)[None, :]
    sizes = []
    for p_help in np.linspace(0.0, 0.2, 21):
        for drop in (d, d + 0.02):
            p_harm = p_help + drop
            pmf = binom.pmf(h, n, p_harm) * binom.pmf(g, n - h, p_help / (1 - p_harm))  # P(harmed, helped)
            sizes.append(float((pmf * rejects).sum()) + max(0.0, 1.0 - float(pmf.sum())))  # outside the box: all
    assert max(sizes) <= 0.05 and max(sizes) > 0.04  # at the level, and not far below it (0.048 at p_help 0.075)
    assert rejects[0, 0] and not rejects[5, 0]  # nothing changed: certified; 5 of 100 harmed: not below 5 pt


def churning(n, p_harm, p_help, gen):
    """T = 2, label 0; each sample right at T with probability 0.8; at t = 1 a sample right at T is wrong with
    probability ``p_harm`` / 0.8 and a sample wrong at T right with probability ``p_help`` / 0.2, so exiting
    everyone at t = 1 drops accuracy by p_harm − p_help while changing p_harm + p_help of the answers."""
    u, v = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    right_T = u < 0.8
    right_1 = torch.where(right_T, v >= p_harm / 0.8, v < p_help / 0.2)
    Y = torch.stack([torch.stack([r.float(), 1 - r.float()], -1) for r in (right_1, right_T)])
    return Y, torch.zeros(n, dtype=torch.long)


def test_the_drop_bound_holds_and_certifies_what_the_harm_bound_cannot():
    """Exiting at t = 1 changes 10 % of the answers but does not change the accuracy: the drop bound accepts it for a
    3 pt target, the harm bound (5 % harmed) never can. Where it truly drops 3.2 pt, the drop bound accepts it in
    at most 5 % of draws (the guarantee); the point estimate alone far more often."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        Y, y = churning(2000, 0.05, 0.05, gen)
        assert cal.calibrate_to_target("timestep", Y, y, 0.03).policy.t == 1
        assert cal.calibrate_to_target("timestep", Y, y, 0.03, bound="harm").policy.t == 2
    trials, bad, naive_bad = 120, 0, 0
    for _ in range(trials):
        Y, y = churning(2000, 0.067, 0.035, gen)
        bad += cal.calibrate_to_target("timestep", Y, y, 0.03).policy.t == 1
        naive_bad += cal.calibrate_to_target("timestep", Y, y, 0.03, confidence=None).policy.t == 1
    assert bad / trials <= 0.05 + 0.03
    assert naive_bad / trials > 0.2


def synthetic_geometric(n, T=10, gen=None):
    """Label 0 always right at T; each sample right from step c on, P(c > t) = 0.5**t (c capped at T)."""
    u = torch.rand(n, generator=gen)
    c = torch.clamp(torch.floor(torch.log(u) / math.log(0.5)).long() + 1, 1, T)
    t = torch.arange(1, T + 1).view(T, 1)
    right = (t >= c.view(1, n)).float()
    Y = torch.stack([right, 1 - right], -1)  # [T, N, 2]
    return Y, torch.zeros(n, dtype=torch.long)


def test_calibrate_to_target_bound_holds_where_truth_is_known():
    """True drop of exiting at t is 0.5**t; with max_drop 0.06 exiting at t <= 4 (0.0625) is a violation."""
    gen = torch.Generator().manual_seed(0)
    trials, bounded_bad, naive_bad = 150, 0, 0
    for _ in range(trials):
        Y, y = synthetic_geometric(400, gen=gen)
        r = cal.calibrate_to_target("timestep", Y, y, max_drop=0.06, confidence=0.95)
        assert r.bound <= 0.06
        bounded_bad += 0.5 ** r.policy.t > 0.06
        naive = cal.calibrate_to_target("timestep", Y, y, max_drop=0.06, confidence=None)
        naive_bad += 0.5 ** naive.policy.t > 0.06
    assert bounded_bad / trials <= 0.05 + 0.03  # the guarantee: at most 5 % of draws violate
    assert naive_bad / trials > 0.2  # the point estimate alone fails often: the test has teeth


def test_calibrate_to_target_learned_thresholds_and_fallback():
    gen = torch.Generator().manual_seed(1)
    Y, y = synthetic_geometric(600, gen=gen)
    r = cal.calibrate_to_target("topk", Y, y, max_drop=0.05, confidence=0.9)
    assert r.n_fit == 300 and r.n_test == 300 and r.bound <= 0.05
    assert r.mean_exit_step < 10
    # a target no candidate can certify (0 drop, 95 %) falls back to exiting everyone at T, drop 0
    r0 = cal.calibrate_to_target("softmax", Y, y, max_drop=0.0, confidence=0.95)
    assert isinstance(r0.policy, cf.Timestep) and r0.policy.t == 10 and r0.bound == 0.0
    with pytest.raises(ValueError, match="max_drop"):
        cal.calibrate_to_target("softmax", Y, y, max_drop=1.5)


def test_fastest_within_chooses_a_cap_where_hard_samples_never_fire():
    # 70 easy samples, right from t = 1 (gap 5 per step); 10 medium ones, confidently wrong at t = 1, 2 and right
    # from t = 3; 20 hard ones, wrong at every step with a small gap. Any ε loose enough to let the hard ones
    # exit (precision ≤ 0.8 once they pass) also lets the medium ones exit wrong at t = 1 (0.875), so with no
    # accuracy to spare Top-K runs the hard ones to T = 8: mean exit (70 + 10·3 + 20·8) / 100 = 2.6. They are
    # wrong anyway: a cap at 3 stops them there at no cost, (70 + 30·3) / 100 = 1.6; a cap at 2 would stop
    # the medium ones while wrong.
    T, y = 8, torch.zeros(100, dtype=torch.long)
    O = torch.zeros(T, 100, 3)
    O[:, :70, 0] = 5.0
    O[:2, 70:80, 1] = 1.0
    O[2:, 70:80, 0] = 3.0
    O[:, 80:, 1] = 0.1
    Y = cf.running(O)
    plain, val = cal.fastest_within("topk", Y, y, 0.0)
    assert plain.max_step is None and val == {"accuracy": pytest.approx(0.8), "mean_exit_step": pytest.approx(2.6)}
    pol, val = cal.fastest_within("topk", Y, y, 0.0, cap=True)
    assert pol.max_step == 3 and val == {"accuracy": pytest.approx(0.8), "mean_exit_step": pytest.approx(1.6)}
    d = cf.simulate(pol, Y)
    assert d.exit_step[:70].eq(1).all() and d.exit_step[70:].eq(3).all() and d.accuracy(y) == pytest.approx(0.8)
    t, _ = cal.fastest_within("timestep", Y, y, 0.0, cap=True)  # a fixed T takes no cap
    assert t.t == 3 and t.max_step is None


def cap_pattern(copies: int, T: int = 8):
    """The pattern of the test above, ``copies`` times over: 70 % easy, 10 % medium, 20 % hard (wrong throughout)."""
    n = 100 * copies
    O = torch.zeros(T, n, 3)
    easy, medium = slice(0, 70 * copies), slice(70 * copies, 80 * copies)
    O[:, easy, 0] = 5.0
    O[:2, medium, 1] = 1.0
    O[2:, medium, 0] = 3.0
    O[:, 80 * copies:, 1] = 0.1
    return cf.running(O), torch.zeros(n, dtype=torch.long)


def test_calibrate_to_target_chooses_the_cap_on_one_half_and_bounds_it_on_the_other():
    Y, y = cap_pattern(10)  # 1000 samples; the seeded split puts ~500 of each kind's share in each half
    plain = cal.calibrate_to_target("topk", Y, y, max_drop=0.02, confidence=0.9)
    auto = cal.calibrate_to_target("topk", Y, y, max_drop=0.02, confidence=0.9, max_step="auto")
    # a cap at 3 harms nobody (the hard samples are wrong at every step); at 2 it stops the medium ones while
    # wrong (10 % > 2 pt): the auto cap is 3, and the hard samples stop there instead of at T = 8
    assert auto.cap == 3 and auto.policy.max_step == 3 and auto.cap_auto and auto.bound <= 0.02
    assert auto.n_fit == auto.n_test == 500 and auto.observed_drop == 0.0
    assert plain.cap is None and plain.policy.max_step is None
    assert auto.mean_exit_step < plain.mean_exit_step - 0.8  # ~1.6 against ~2.6 steps (hand count above)
    # the same split with the cap given by hand: the same bound and exits
    fixed = cal.calibrate_to_target("topk", Y, y, max_drop=0.02, confidence=0.9, max_step=3)
    assert (fixed.bound, fixed.mean_exit_step) == (auto.bound, auto.mean_exit_step)
    assert auto.summary()["max_step"] == 3 and auto.summary()["max_step_auto"] is True
    assert all(t["accepted"] for t in auto.tested[:-1]) and auto.tested[0]["max_step"] == 3
    # the bound is tested on the other half alone: wreck that half (every sample wrong at steps 1..3) and the
    # first setting of the path (cap 3) fails there, so everyone runs to T
    test = torch.randperm(1000, generator=torch.Generator().manual_seed(0))[500:]
    Yw = Y.clone()
    Yw[:3, test, 1] += 100.0
    wrecked = cal.calibrate_to_target("topk", Yw, y, max_drop=0.02, confidence=0.9, max_step="auto")
    assert [(t["max_step"], t["accepted"]) for t in wrecked.tested] == [(3, False)]
    assert isinstance(wrecked.policy, cf.Timestep) and wrecked.policy.t == 8 and wrecked.cap is None
    # softmax: no threshold to fit, but the auto cap still splits the data, so its bound rests on one half
    s = cal.calibrate_to_target("softmax", Y, y, max_drop=0.02, confidence=0.9, max_step="auto")
    assert s.n_fit == s.n_test == 500 and s.cap == 3
    assert cal.calibrate_to_target("softmax", Y, y, max_drop=0.02, confidence=0.9).n_fit == 0
    assert cal.calibrate_to_target("timestep", Y, y, max_drop=0.02, max_step="auto").cap is None
    with pytest.raises(ValueError, match="'auto'"):
        cal.calibrate_to_target("topk", Y, y, max_drop=0.02, max_step="sometimes")


def test_the_auto_cap_keeps_the_safe_cap_when_a_faster_one_fails_on_the_held_out_half():
    """Softmax (ε ≤ 0.1 lets easy samples go at t = 1, never a medium one while wrong). Medium samples are right
    from t = 3 only: a cap below 3 harms them. The fit half holds 2 of them, the held-out half 30 (6 %). On the
    fit half the path is [cap 3: harms 0, cap 1: harms 2 but everyone exits at once]; cap 1 would pass a bound
    there, fails on the held-out half, and the fixed sequence keeps cap 3 instead of running everyone to T."""
    T, n = 8, 1000
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    fit, held = perm[:500], perm[500:]
    medium = torch.cat([fit[:2], held[:30]])
    hard = torch.cat([fit[2:102], held[30:130]])
    O = torch.zeros(T, n, 3)
    O[:, :, 0] = 5.0                        # easy: right from t = 1, p_max 0.987
    O[:, hard] = torch.tensor([0.0, 0.1, 0.0])   # wrong throughout
    O[:2, medium] = torch.tensor([0.0, 1.0, 0.0])
    O[2:, medium] = torch.tensor([3.0, 0.0, 0.0])
    Y, y = cf.running(O), torch.zeros(n, dtype=torch.long)
    r = cal.calibrate_to_target("softmax", Y, y, max_drop=0.02, confidence=0.9, max_step="auto")
    assert [(t["max_step"], t["harmed"], t["accepted"]) for t in r.tested] == [(3, 0, True), (1, 30, False)]
    assert r.cap == 3 and r.bound <= 0.02 and r.observed_drop == 0.0
    assert r.mean_exit_step == pytest.approx((370 * 1 + 130 * 3) / 500)  # easy at 1; medium and hard at the cap
