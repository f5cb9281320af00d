"""fewstep.wallclock: the paired rounds, their quartiles, and the multi-step reference pass."""

import pytest
import torch

import fewstep
from fewstep import anytime as at
from fewstep import cutoff as cf
from fewstep import wallclock

from .test_anytime import warmed


def test_the_timing_names_stay_reachable_from_anytime():
    for name in ("multistep_seconds", "speedup", "speedup_rounds", "spread"):
        assert getattr(at, name) is getattr(wallclock, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        at.nope


def test_speedup_rounds_interleave_full_and_early_exit_passes(monkeypatch):
    """One untimed probe of the full pass, then per round ``inner`` full passes and twice as many early-exit ones."""
    calls = []

    def fake(model, chunks, policy, batch_size, continuous=True, count_ops=False, graphs="auto"):
        calls.append("full" if isinstance(policy, cf.Timestep) and policy.t == 4 else "exit")
        return [], 0.2 if calls[-1] == "full" else 0.05

    monkeypatch.setattr(wallclock, "run_chunks", fake)
    full, exit_ = wallclock.speedup_rounds(None, [], cf.Timestep(1, T=4), 4, repeats=3, min_seconds=0.5)
    # 0.2 s per full pass -> 3 passes reach 0.5 s; the early-exit pass runs 6 times per round
    assert calls == ["full"] + (["full"] * 3 + ["exit"] * 6) * 3
    assert full == pytest.approx([0.2] * 3) and exit_ == pytest.approx([0.05] * 3)
    assert wallclock.speedup(None, [], cf.Timestep(1, T=4), 4, repeats=3, min_seconds=0.5) == pytest.approx((0.2, 0.05))


def test_spread_pairs_the_rounds_and_gives_their_quartiles():
    # rounds of (full, early exit) seconds -> speed-ups 2, 4, 3, 5, 6; sorted 2 3 4 5 6: quartiles 3, 4, 5
    s = wallclock.spread([2.0, 4.0, 3.0, 5.0, 6.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert s["rounds"] == [2.0, 4.0, 3.0, 5.0, 6.0] and (s["q1"], s["median"], s["q3"]) == (3.0, 4.0, 5.0)
    s = wallclock.spread([1.0, 3.0], [0.5, 1.0])  # speed-ups 2 and 3: the inclusive quartiles interpolate
    assert (s["q1"], s["median"], s["q3"]) == (2.25, 2.5, 2.75)
    assert wallclock.spread([3.0], [2.0])["q1"] == wallclock.spread([3.0], [2.0])["q3"] == 1.5
    with pytest.raises(ValueError, match="at least one round"):
        wallclock.spread([], [])


def test_multistep_seconds_times_a_plain_pass_and_restores_the_network(monkeypatch):
    net = warmed("mlp").train()
    fewstep.set_step_mode(net, "s")
    chunks = [torch.rand(3, 4, *net.input_shape), torch.rand(3, 2, *net.input_shape)]
    calls = []
    net.register_forward_pre_hook(lambda m, i: calls.append(tuple(i[0].shape[:2])))
    t = wallclock.multistep_seconds(net, chunks, repeats=5, min_seconds=0.0)
    assert t > 0 and net.training and net.current_step_mode() == "s"
    assert set(calls) == {(3, 4), (3, 2)}  # one multi-step call per chunk, all T steps at once
    assert len(calls) == 2 * 3  # repeats capped at 3; a pass past min_seconds (any, here) counts from the first
