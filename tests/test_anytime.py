import json
import re

import pytest
import torch

import fewstep
from fewstep import anytime as at
from fewstep import cutoff as cf
from fewstep import models, wallclock
from fewstep.cli import main as cli

from .test_models import SMALL


def spread_policy(Y):
    """Top-K thresholds halfway between neighbouring sorted gaps near each step's median: about
    half the samples fire at every step, and no gap sits on a threshold."""
    betas = []
    for t in range(Y.shape[0]):
        g = cf.top2_gap(Y[t]).sort().values
        k = len(g) // 2
        betas.append(float((g[k - 1] + g[k]) / 2))
    return cf.TopK(betas=betas, T=Y.shape[0])


def warmed(name, seed=0):
    torch.manual_seed(seed)
    net = models.create(name, num_classes=5, theta=0.2, **SMALL[name])
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for _ in range(3):
            net(torch.rand(2, 6, *net.input_shape) * 2)
    return net.eval()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_real_early_exit_equals_simulation_for_every_model(name):
    net = warmed(name)
    x = torch.rand(4, 9, *net.input_shape) * 2
    with torch.no_grad():
        Y = cf.running(net(x))
    pol = spread_policy(Y)
    sim = cf.simulate(pol, Y)
    assert 1 < len(set(sim.exit_step.tolist()))  # the policy really splits the batch
    real = at.early_exit(net, x, pol)
    assert real.exit_step.tolist() == sim.exit_step.tolist()
    assert real.prediction.tolist() == sim.prediction.tolist()
    # continuous batching: at most 3 in flight, freed slots refilled; same decisions
    cont = at.early_exit(net, x, pol, max_batch=3)
    assert cont.exit_step.tolist() == sim.exit_step.tolist()
    assert cont.prediction.tolist() == sim.prediction.tolist()
    assert net.current_step_mode() == "m"  # the runner restores the step mode
    capped = spread_policy(Y).with_max_step(2)  # samples still running at step 2 stop there
    sim3 = cf.simulate(capped, Y)
    assert sim3.exit_step.max() == 2 and (sim.exit_step > 2).any()
    for mb in (None, 3):
        real3 = at.early_exit(net, x, capped, max_batch=mb)
        assert real3.exit_step.tolist() == sim3.exit_step.tolist()
        assert real3.prediction.tolist() == sim3.prediction.tolist()


def test_leaving_samples_hand_their_rows_to_the_last_ones_and_decisions_stay(monkeypatch):
    # the batch shrinks by moving the last survivors into freed rows (fewstep.shrink): no full compaction
    net = warmed("cnn")
    x = torch.rand(5, 16, *net.input_shape) * 2
    with torch.no_grad():
        Y = cf.running(net(x))
    pol = spread_policy(Y)
    sim = cf.simulate(pol, Y)
    moved, real_shrink = [], at.shrink
    monkeypatch.setattr(at, "shrink", lambda m, dst, src, k: (moved.append((list(dst), list(src), k)),
                                                               real_shrink(m, dst, src, k))[1])
    for cap in (None, 5):
        moved.clear()
        real = at.early_exit(net, x, pol, max_batch=cap)
        assert real.exit_step.tolist() == sim.exit_step.tolist()
        assert real.prediction.tolist() == sim.prediction.tolist()
        assert any(dst for dst, _, _ in moved)  # rows really moved
        for dst, src, k in moved:
            assert len(dst) == len(src) and all(d < k <= s for d, s in zip(dst, src))


def test_ops_counted_up_to_exit_hand_checked():
    torch.manual_seed(0)
    net = models.create("mlp", input_shape=(1, 8, 8), num_classes=10, hidden=(16,)).eval()
    x = torch.rand(3, 5, 1, 8, 8) * 3
    full = at.early_exit(net, x, cf.Timestep(3, T=3), count_ops=True)
    with torch.no_grad(), fewstep.record(net) as rec:
        net(x)
    s = rec.spikes[rec.layers[0]]  # [T, N, 16] spikes of the only LIF layer
    assert torch.equal(full.spikes, s.sum((0, 2)).double())
    assert torch.equal(full.macs, torch.full((5,), 3.0 * 64 * 16, dtype=torch.float64))
    sops = (s != 0).double().mean(2).sum(0) * 16 * 10  # non-zero share × dense MACs of Linear(16, 10)
    torch.testing.assert_close(full.sops, sops)
    early = at.early_exit(net, x, cf.Timestep(1, T=3), count_ops=True)
    assert torch.equal(early.macs, torch.full((5,), 64.0 * 16, dtype=torch.float64))
    assert torch.equal(early.spikes, s[0].sum(1).double())
    assert (early.energy_pj < full.energy_pj).all()


def test_anytime_stream_matches_batch_runner():
    net = warmed("cnn")
    x = torch.rand(4, 6, *net.input_shape) * 2
    with torch.no_grad():
        Y = cf.running(net(x))
    pol = spread_policy(Y)
    ref = at.early_exit(net, x, pol)
    stream = at.AnytimeStream(net, pol, T=4)
    for i in range(6):
        stream.reset()
        answer = None
        for t in range(4):
            answer = stream.push(x[t, i])
            if answer is not None:
                break
        assert answer == (int(ref.prediction[i]), int(ref.exit_step[i]))
    ref2 = at.early_exit(net, x, spread_policy(Y).with_max_step(2))
    stream = at.AnytimeStream(net, spread_policy(Y).with_max_step(2), T=4)
    for i in range(6):  # the cap holds in the per-stream API too
        stream.reset()
        answer = None
        for t in range(4):
            if (answer := stream.push(x[t, i])) is not None:
                break
        assert answer == (int(ref2.prediction[i]), int(ref2.exit_step[i])) and answer[1] <= 2
    with pytest.raises(ValueError, match="T mismatch"):
        at.AnytimeStream(net, pol, T=5)
    with pytest.raises(ValueError, match="T mismatch"):
        at.early_exit(net, torch.rand(3, 2, *net.input_shape), pol)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from fewstep import config as C
    from fewstep.train import Trainer

    out = tmp_path_factory.mktemp("run") / "digits"
    cfg = C.load("configs/digits.yaml", ["train.epochs=3", "train.progress=false", "data.T=4"])
    Trainer(cfg, out, log=lambda s: None).fit()
    return out


def test_calibration_refuses_the_test_split_and_mc_dropout(digits_run):
    from fewstep.train import load_run

    model, cfg, bundle = load_run(digits_run)
    with pytest.raises(ValueError, match="test split would leak"):
        at.calibration_outputs(model, bundle.test, 4, bundle.kind)
    Y, y = at.calibration_outputs(model, bundle.val, 4, bundle.kind)
    Yd, yd = at.calibration_outputs(model, bundle.val, 4, bundle.kind, mc_dropout=0.3, mc_samples=2)
    assert Yd.shape == (4, 2 * len(bundle.val), 10) and torch.equal(yd, torch.cat([y, y]))
    assert not torch.allclose(Yd[:, : len(y)], Y)
    Y2, _ = at.calibration_outputs(model, bundle.val, 4, bundle.kind)
    assert torch.equal(Y, Y2)  # the dropout hooks are gone afterwards


def test_cli_cutoff_and_tradeoff_write_documented_keys(digits_run, capsys):
    assert cli(["cutoff", str(digits_run), "--policy", "topk", "--epsilon", "0.05", "--repeats", "1"]) == 0
    r = json.loads((digits_run / "cutoff_topk.json").read_text())
    for k in ("full_accuracy", "accuracy", "mean_exit_step", "timestep_speedup", "wallclock_speedup", "epsilon"):
        assert k in r, k
    assert r["matches_simulation"] and r["epsilon"] == 0.05 and r["T"] == 4
    assert r["timestep_speedup"] == pytest.approx(4 / r["mean_exit_step"])
    assert len(r["wallclock_speedup_rounds"]) == 1  # --repeats 1: one round, whose ratio is the quartiles too
    assert r["wallclock_speedup_iqr"] == [r["wallclock_speedup_rounds"][0]] * 2
    assert r["wallclock_speedup"] == pytest.approx(r["wallclock_speedup_rounds"][0])
    assert sum(r["exit_histogram"]) == r["n"]
    assert r["differ_from_simulation"] == 0 and r["seconds_full_multistep"] > 0
    assert r["timing_samples"] == r["n"]  # a split under --timing-samples' 2048 is timed whole
    assert r["wallclock_speedup_vs_multistep"] == pytest.approx(r["seconds_full_multistep"] / r["seconds_early_exit"])
    out = capsys.readouterr().out
    assert "vs multi-step" in out and "by class:" in out
    # the exits per sample: the CSV agrees with the JSON's histogram, accuracy and per-class rows
    import csv

    rows = list(csv.DictReader((digits_run / "cutoff_topk_exits.csv").open()))
    assert len(rows) == r["n"] and [int(w["sample"]) for w in rows] == list(range(r["n"]))
    steps = [int(w["exit_step"]) for w in rows]
    assert [steps.count(t) for t in range(1, 5)] == r["exit_histogram"]
    assert sum(int(w["correct"]) for w in rows) == round(r["accuracy"] * r["n"])
    assert sum(int(w["correct_full_T"]) for w in rows) == round(r["full_accuracy"] * r["n"])
    for w in rows:
        assert w["change"] == ("harmed" if w["correct_full_T"] == "1" != w["correct"] else
                               "helped" if w["correct"] == "1" != w["correct_full_T"] else "")
    assert sum(c["n"] for c in r["per_class"]) == r["n"] and len(r["per_class"]) == 10
    for c in r["per_class"]:
        mine = [w for w in rows if w["label"] == str(c["index"])]
        assert c["n"] == len(mine) and c["class"] == mine[0]["label_name"]
        assert c["mean_exit_step"] == pytest.approx(sum(int(w["exit_step"]) for w in mine) / len(mine))
    for t, a in enumerate(r["accuracy_by_exit_step"], 1):
        at_t = [int(w["correct"]) for w in rows if int(w["exit_step"]) == t]
        assert a == (pytest.approx(sum(at_t) / len(at_t)) if at_t else None)
    # a subset times the wall clock; exits, accuracy and counts stay on the whole split
    assert cli(["cutoff", str(digits_run), "--policy", "topk", "--epsilon", "0.05", "--repeats", "1",
                "--timing-samples", "40"]) == 0
    r2 = json.loads((digits_run / "cutoff_topk.json").read_text())
    assert r2["timing_samples"] == 40 and sum(r2["exit_histogram"]) == r2["n"] == r["n"] > 40
    assert r2["mean_exit_step"] == r["mean_exit_step"] and r2["accuracy"] == r["accuracy"]
    out, err = capsys.readouterr()
    assert f"per pass on 40 of the {r['n']} samples" in out
    assert "  calibrating topk on the validation split (T = 4) ... " in err  # each stage on stderr, with its time
    assert re.search(r"timing full T against early exit on 40 samples \(1 rounds\) and multi-step passes \.\.\. "
                     r"\d+\.\d s\n", err)
    assert r["spikes_per_sample"] <= r["spikes_per_sample_full"] + 1e-9
    cal = json.loads((digits_run / "calibration_topk.json").read_text())
    assert cal["meta"]["calibration_split"] == "val" and len(cal["betas"]) == 4
    # reuse the saved calibration; a calibration for another T is refused
    assert cli(["cutoff", str(digits_run), "--policy", "topk", "--calibration", str(digits_run / "calibration_topk.json"), "--repeats", "1"]) == 0
    # the static-shape runner of fewstep.graphs (emulated on the CPU) gives the same decisions
    assert cli(["cutoff", str(digits_run), "--policy", "topk", "--calibration", str(digits_run / "calibration_topk.json"),
                "--repeats", "1", "--graphs", "emulate"]) == 0
    assert json.loads((digits_run / "cutoff_topk.json").read_text())["matches_simulation"]
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert cli(["cutoff", str(digits_run), "--policy", "topk", "--device", "cuda", "--repeats", "1"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
    cal["meta"]["T"] = 8
    (digits_run / "other.json").write_text(json.dumps(cal))
    capsys.readouterr()
    assert cli(["cutoff", str(digits_run), "--policy", "topk", "--calibration", str(digits_run / "other.json")]) == 2
    assert "calibrated for T = 8, not 4" in capsys.readouterr().err
    assert cli(["cutoff", str(digits_run), "--policy", "softmax", "--max-drop", "0.05", "--confidence", "0.9", "--repeats", "1"]) == 0
    r = json.loads((digits_run / "cutoff_softmax.json").read_text())
    assert r["target"]["bound"] <= 0.05 and r["target"]["confidence"] == 0.9
    assert cli(["cutoff", str(digits_run), "--policy", "timestep", "--step", "2", "--repeats", "1"]) == 0
    assert json.loads((digits_run / "cutoff_timestep.json").read_text())["mean_exit_step"] == 2
    # a step cap: no sample runs past it, in the real runner and in the saved calibration
    assert cli(["cutoff", str(digits_run), "--policy", "softmax", "--epsilon", "0.000001", "--max-step", "2",
                "--repeats", "1"]) == 0
    r = json.loads((digits_run / "cutoff_softmax.json").read_text())
    assert r["max_step"] == 2 and r["exit_histogram"][2:] == [0, 0] and r["matches_simulation"]
    assert "max_step=2" in capsys.readouterr().out
    assert json.loads((digits_run / "calibration_softmax.json").read_text())["max_step"] == 2
    assert cli(["cutoff", str(digits_run), "--policy", "timestep", "--max-step", "2"]) == 2
    assert "--max-step caps a threshold policy" in capsys.readouterr().err
    assert cli(["cutoff", str(digits_run), "--policy", "topk", "--max-step", "5"]) == 2
    assert "--max-step 5 is outside 1..T = 1..4" in capsys.readouterr().err
    # --max-step auto: the cap is chosen with the threshold, on one half of validation, the bound on the other
    assert cli(["cutoff", str(digits_run), "--policy", "topk", "--max-drop", "0.05", "--confidence", "0.9",
                "--max-step", "auto", "--repeats", "1"]) == 0
    r, out = json.loads((digits_run / "cutoff_topk.json").read_text()), capsys.readouterr().out
    t, n_val = r["target"], json.loads((digits_run / "calibration_topk.json").read_text())["meta"]["n_val"]
    assert t["max_step_auto"] and t["passed"] and t["bound"] <= 0.05 and t["n_fit"] + t["n_test"] == n_val
    assert r["max_step"] == t["max_step"] and f"chosen on the other {t['n_fit']} validation samples" in out
    assert cli(["tradeoff", str(digits_run)]) == 0
    t = json.loads((digits_run / "tradeoff.json").read_text())
    assert set(t["policies"]) == {"timestep", "softmax", "topk", "spikecp"}
    assert t["oct"]["mean_exit_step"] <= min(p["mean_exit_step"] for p in t["policies"]["timestep"]
                                             if p["accuracy"] >= t["full_accuracy"])
    assert (digits_run / "tradeoff.png").stat().st_size > 1000
    assert (digits_run / "accuracy_per_step.png").stat().st_size > 1000
    assert len(t["accuracy_per_step"]) == 4 and t["accuracy_per_step"][-1] == t["full_accuracy"]
    assert (digits_run / "cutoff_topk_exits.png").stat().st_size > 1000


def test_report_stages_end_their_line_when_stopped(capsys):
    from fewstep.reports import _stage

    with _stage(True, "counting"):
        pass
    with pytest.raises(RuntimeError), _stage(True, "timing"):
        raise RuntimeError("interrupted")
    with _stage(False, "quiet"):
        pass
    assert re.fullmatch(r"  counting \.\.\. \d+\.\d s\n  timing \.\.\. stopped\n", capsys.readouterr().err)


def test_cutoff_says_when_a_multi_step_pass_is_faster(digits_run, capsys, monkeypatch):
    """On a GPU one multi-step pass can beat early exit (bench/README.md); the report then says what to do."""
    monkeypatch.setattr(wallclock, "multistep_seconds", lambda *a, **k: 1e-9)
    capsys.readouterr()
    assert cli(["cutoff", str(digits_run), "--policy", "softmax", "--epsilon", "0.05", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "early exit is 0.00x slower" in out and "one multi-step pass to T is faster" in out and "--max-step" in out


def test_a_target_no_setting_can_meet_says_why(digits_run, capsys):
    from fewstep import calibration as cal
    from fewstep.cli_run import _target_missed

    capsys.readouterr()
    assert cli(["cutoff", str(digits_run), "--policy", "topk", "--max-drop", "0.005", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    t = json.loads((digits_run / "cutoff_topk.json").read_text())["target"]
    # the drop bound (the default) of a setting that changes no answer: the harm bound's 1 - 0.05 ** (1 / n), plus
    # a hair for the part of alpha its test spends on the share of changed answers
    assert not t["passed"] and t["bound_on"] == "drop"
    assert t["smallest_bound"] == pytest.approx(cal.drop_upper_bound(0, 0, t["n_test"], 0.95))
    assert 1 - 0.05 ** (1 / t["n_test"]) <= t["smallest_bound"] < 1.01 * (1 - 0.05 ** (1 / t["n_test"]))
    assert f"even a setting that changes no answer is bounded at {100 * t['smallest_bound']:.2f} pt" in out
    assert "every sample runs to T" in out and "--max-drop" in out
    assert out.startswith("policy topk -> no setting met the target: timestep t = 4 on test")
    made = {"n_test": 1000, "max_drop": 0.01, "confidence": 0.95, "smallest_bound": 0.003,
            "tested": [{"params": {"epsilon": 0.0}, "harmed": 12, "bound": 0.019, "accepted": False}]}
    assert "most conservative setting (epsilon=0) already harms 12 of 1000 validation samples (bound 1.90 pt" \
        in _target_missed("softmax", {**made, "bound_on": "harm"})
    made["tested"][0]["helped"] = 3
    assert "(epsilon=0) already harms 12 and helps 3 of 1000" in _target_missed("softmax", made)
    assert cli(["cutoff", str(digits_run), "--policy", "softmax", "--max-drop", "0.2", "--repeats", "1"]) == 0
    assert json.loads((digits_run / "cutoff_softmax.json").read_text())["target"]["passed"]
    out = capsys.readouterr().out  # (a timing note may follow on a busy machine: that one is about wall-clock)
    assert "met the target" not in out and "every sample runs to T" not in out
    assert "upper bound" in out and "pt on the drop, from" in out


def test_cutoff_bound_harm_bounds_the_harmed_share(digits_run, capsys):
    """``--bound harm``: each tested setting's bound is the Clopper-Pearson bound on its harmed count alone; the
    default ``drop`` bound of the same setting, from both counts, lies above the observed drop and at most a hair
    (its test's γ = 0.1 %) above it."""
    from fewstep import calibration as cal

    capsys.readouterr()
    assert cli(["cutoff", str(digits_run), "--policy", "softmax", "--max-drop", "0.2", "--bound", "harm",
                "--repeats", "1"]) == 0
    assert "pt on the share of samples harmed, from" in capsys.readouterr().out
    t = json.loads((digits_run / "cutoff_softmax.json").read_text())["target"]
    assert t["bound_on"] == "harm" and t["passed"]
    for r in t["tested"]:
        assert r["bound"] == pytest.approx(cal.harm_upper_bound(r["harmed"], t["n_test"], 0.95))
        drop = cal.drop_upper_bound(r["harmed"], r["helped"], t["n_test"], 0.95)
        assert (r["harmed"] - r["helped"]) / t["n_test"] < drop <= cal.harm_upper_bound(r["harmed"], t["n_test"], 0.952)
    assert cli(["cutoff", str(digits_run), "--policy", "softmax", "--epsilon", "0.1", "--bound", "harm"]) == 2
    assert "--bound says what --max-drop bounds" in capsys.readouterr().err

def test_tradeoff_table_chooses_each_setting_on_validation(digits_run, capsys):
    """The table `fewstep tradeoff` and the demo print picks each policy's setting on validation (the choice
    fastest_within makes), never off the test curve it reports."""
    from fewstep.cli_run import _tradeoff_table
    from fewstep.reports import tradeoff_report
    from fewstep.train import load_run

    model, cfg, bundle = load_run(digits_run)
    r = tradeoff_report(digits_run, "test")
    Yv, yv = at.calibration_outputs(model, bundle.val, 4, bundle.kind, cfg.data.encoding)
    assert r["val_full_accuracy"] == pytest.approx((Yv[-1].argmax(-1) == yv).float().mean().item())
    rows = {line.split()[0]: line.split() for line in _tradeoff_table(r, 0.02).splitlines()[1:]}
    for name in ("softmax", "topk", "spikecp", "timestep"):
        pol, val = cf.fastest_within(name, Yv, yv, 0.02)
        p = cf.fastest_point(r["policies"][name], r["val_full_accuracy"], 0.02)
        assert {k: p[k] for k in ("epsilon", "t") if k in p} == \
            {k: v for k, v in pol.params().items() if k in ("epsilon", "t")}
        assert p["val_mean_exit_step"] == pytest.approx(val["mean_exit_step"])
        setting = f"t={pol.t}" if name == "timestep" else f"eps={pol.epsilon:g}"
        assert rows[name][1] == setting
        assert float(rows[name][3].rstrip("%")) == pytest.approx(100 * p["accuracy"], abs=0.006)
    # a hand-made sweep where validation and test disagree: the choice follows validation
    pts = [{"epsilon": 0.1, "accuracy": 0.90, "mean_exit_step": 1.0, "val_accuracy": 0.80, "val_mean_exit_step": 1.2},
           {"epsilon": 0.01, "accuracy": 0.95, "mean_exit_step": 2.0, "val_accuracy": 0.95, "val_mean_exit_step": 2.1}]
    assert cf.fastest_point(pts, 0.96, 0.01)["epsilon"] == 0.01
    assert cf.fastest_point(pts, 0.91, 0.01, on="test")["epsilon"] == 0.1
    assert cf.fastest_point(pts, 0.99, 0.01) is None
    made = {"split": "test", "T": 4, "full_accuracy": 0.91, "val_full_accuracy": 0.96,
            "oct": {"accuracy": 0.91, "mean_exit_step": 1.0}, "policies": {"softmax": pts}}
    assert _tradeoff_table(made).splitlines()[-1].split()[:4] == ["softmax", "eps=0.01", "95.00%", "95.00%"]
    with pytest.raises(ValueError, match="on must be"):
        cf.fastest_point(pts, 0.9, 0.01, on="train")
    assert cli(["tradeoff", str(digits_run), "--max-drop", "0.02"]) == 0
    assert "within 2 pt of full-T accuracy on validation, read on test" in capsys.readouterr().out


def test_latency_runs_from_joining_the_batch_to_the_decision():
    """Each step sleeps 20 ms: a sample decided at step 2 waited ~40 ms since it joined, whenever it joined."""
    import time

    net = models.create("mlp", input_shape=(1, 4, 4), num_classes=3, hidden=(8,)).eval()
    net.register_forward_hook(lambda m, i, o: time.sleep(0.02))
    x = torch.rand(4, 3, 1, 4, 4)
    pol = cf.Timestep(2, T=4)
    one_by_one = at.early_exit(net, x, pol, max_batch=1, latency=True)
    assert one_by_one.exit_step.tolist() == [2, 2, 2]
    lat = one_by_one.latency_s
    assert lat.shape == (3,) and bool((lat >= 0.04).all())
    assert float(lat[2]) < 0.1  # not ~0.12 s: the third sample's clock starts when it joins
    together = at.early_exit(net, x, pol, latency=True)
    assert bool((together.latency_s >= 0.04).all()) and float(together.latency_s.max() - together.latency_s.min()) == 0
    assert at.early_exit(net, x, pol).latency_s is None
