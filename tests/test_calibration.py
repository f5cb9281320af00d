"""fewstep.calibration: choosing a cutoff setting on held-out data (a bound that holds, the fastest setting)."""
import math

import pytest
import torch

from fewstep import calibration as cal
from fewstep import cutoff as cf


def test_the_calibration_names_are_reachable_from_cutoff():
    for name in ("fastest_within", "fastest_point", "sweep", "calibrate_to_target", "candidates", "harm_upper_bound"):
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
