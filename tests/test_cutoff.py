import math

import pytest
import torch

from fewstep import cutoff as cf


def Y_from(rows):
    """rows: per sample, a list over t of [C] running logits → Y[T, N, C]."""
    return torch.tensor(rows, dtype=torch.float32).transpose(0, 1).contiguous()


def test_timestep_and_softmax_hand_built():
    ln99 = math.log(99)
    Y = Y_from([
        [[0, 0], [ln99, 0], [ln99, 0]],      # softmax 0.5 then 0.99
        [[1, 1], [1, 1], [1, 1]],            # tie throughout: never confident, argmax picks class 0
        [[0, 5], [0, 6], [0, 7]],            # confident from t = 1
    ])
    d = cf.simulate(cf.Timestep(2), Y)
    assert d.exit_step.tolist() == [2, 2, 2] and d.prediction.tolist() == [0, 0, 1]
    d = cf.simulate(cf.Softmax(0.02), Y)
    assert d.exit_step.tolist() == [2, 3, 1]
    assert d.prediction.tolist() == [0, 0, 1]
    d = cf.simulate(cf.Softmax(0.0), Y)  # epsilon 0: max softmax > 1 never holds
    assert d.exit_step.tolist() == [3, 3, 3]


def test_softmax_does_not_saturate_on_large_logit_gaps():
    # gaps of 60 and 80: a float32 softmax is exactly 1.0 for both, yet 1 - p_max = e^-60 vs e^-80
    Y = Y_from([[[60, 0], [60, 0]], [[80, 0], [80, 0]]])
    assert (Y[0].softmax(-1).max(-1).values == 1.0).all()  # why a plain comparison cannot tell them apart
    d = cf.simulate(cf.Softmax(1e-30), Y)  # e^-60 ≈ 8.8e-27 > 1e-30 > e^-80 ≈ 1.8e-35
    assert d.exit_step.tolist() == [2, 1]
    assert cf.simulate(cf.Softmax(1e-40), Y).exit_step.tolist() == [2, 2]


def test_softmax_fires_just_past_one_minus_epsilon():
    # logits (ln 8, 0, 0): p_max = 0.8, so 1 - p_max = 0.2 exactly; (ln 3, ln 3, 0): a tie, p_max = 3/7
    # (so 1 - p_max = 4/7), and three equal logits: 1 - p_max = 2/3
    Y = torch.tensor([[math.log(8.0), 0.0, 0.0], [math.log(3.0), math.log(3.0), 0.0], [0.0, 0.0, 0.0]],
                     dtype=torch.float64)
    for eps, want in ((0.2 + 1e-9, [True, False, False]), (0.2 - 1e-9, [False, False, False]),
                      (4 / 7 + 1e-9, [True, True, False]), (4 / 7 - 1e-9, [True, False, False]),
                      (2 / 3 + 1e-9, [True, True, True]), (2 / 3 - 1e-9, [True, True, False])):
        assert cf.Softmax(eps).fire(Y, 1).tolist() == want, eps


def test_topk_fire_strict_and_never_triggered():
    Y = Y_from([
        [[1, 0], [1.6, 1.0], [3, 0]],        # gap 1.0 (not > 1.0), then 0.6 > 0.5
        [[0, 0], [0, 0], [0, 0]],            # gap 0 forever: exits at T
    ])
    d = cf.simulate(cf.TopK(betas=[1.0, 0.5, 0.5]), Y)
    assert d.exit_step.tolist() == [2, 3] and d.prediction.tolist() == [0, 0]
    # per-sample steps (continuous batching) give the same answers as the scalar step
    pol = cf.TopK(betas=[1.0, 0.5, 0.5])
    assert pol.fire(Y[1], torch.tensor([2, 2])).tolist() == pol.fire(Y[1], 2).tolist()


def test_topk_calibration_hand_worked():
    # label 0 for all; gaps at t=1: [2, 1, .5, .2] (correct, wrong, correct, wrong)
    #                  at t=2: [4, 2, .4, .8] (correct, wrong, wrong, correct)
    Y = Y_from([
        [[2, 0], [4, 0]],
        [[0, 1], [0, 2]],
        [[0.5, 0], [0.5, 0.9]],
        [[0, 0.2], [1.0, 0.2]],
    ])
    y = torch.zeros(4, dtype=torch.long)
    # p(1) = [1, 0, 0, 0], p(2) = [1, 0, 0, 1]; grids linspace(0, 2, 5) and linspace(0, 4, 5)
    strict = cf.TopK(epsilon=0.0, grid=5).calibrate(Y, y)
    assert strict.betas == pytest.approx([1.0, 2.0])
    loose = cf.TopK(epsilon=0.5, grid=5).calibrate(Y, y)
    assert loose.betas == pytest.approx([0.5, 0.0])
    # nobody is correct from t on → no beta reaches precision 1 → +inf (never exit at that step)
    allwrong = cf.TopK(epsilon=0.0, grid=5).calibrate(Y[:, [0]], torch.tensor([1]))
    assert allwrong.betas == [math.inf, math.inf]
    assert cf.simulate(allwrong, Y).exit_step.tolist() == [2, 2, 2, 2]


def test_spikecp_conformal_quantile_and_sets():
    # 2 classes, T = 1; nonconformity -log softmax(Y)[y]
    Y = Y_from([[[3, 0]], [[2, 0]], [[1, 0]], [[0, 0]]])
    y = torch.zeros(4, dtype=torch.long)
    scores = sorted((-torch.log_softmax(Y[0], -1)[:, 0]).tolist())
    p = cf.SpikeCP(epsilon=0.5).calibrate(Y, y)  # k = ceil(5 * 0.5) = 3 → third smallest
    assert p.quantiles[0] == pytest.approx(scores[2])
    p2 = cf.SpikeCP(epsilon=0.2).calibrate(Y, y)  # k = ceil(5 * 0.8) = 4 → the largest
    assert p2.quantiles[0] == pytest.approx(scores[3])
    p3 = cf.SpikeCP(epsilon=0.1).calibrate(Y, y)  # k = ceil(4.5) = 5 > n → +inf → full set, never fires
    assert math.isinf(p3.quantiles[0]) and not p3.fire(Y[0], 1).any()
    # q = score of sample [1, 0] (0.313): its own class is in (equal counts), class 1 (1.313) is not;
    # [0, 0] has both scores at 0.693 > q: an empty set, which does not fire
    assert p.set_size(Y[0], 1).tolist() == [1, 1, 1, 0]
    assert p.fire(Y[0], 1).tolist() == [True, True, True, False]
    assert p.fire(Y[0], torch.ones(4, dtype=torch.long)).tolist() == [True, True, True, False]


def test_oracle():
    # correctness over t for label 0: [1,0,1,1] → 3; [0,0,0,0] → 4; [1,1,1,1] → 1
    good, bad = [1, 0], [0, 1]
    Y = Y_from([[good, bad, good, good], [bad, bad, bad, bad], [good, good, good, good]])
    d = cf.oracle(Y, torch.zeros(3, dtype=torch.long))
    assert d.exit_step.tolist() == [3, 4, 1]
    assert d.prediction.tolist() == [0, 1, 0]


def test_bad_input_errors(tmp_path):
    with pytest.raises(ValueError, match=r"rank 3"):
        cf.simulate(cf.Softmax(0.1), torch.zeros(4, 10))
    for eps in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"epsilon must be in \[0, 1\)"):
            cf.Softmax(eps)
    with pytest.raises(ValueError, match="valid names: softmax, spikecp, timestep, topk"):
        cf.make("entropy")
    with pytest.raises(RuntimeError, match="not calibrated"):
        cf.TopK(0.1).fire(torch.zeros(2, 3), 1)
    pol = cf.TopK(betas=[1.0, math.inf], T=2)
    path = cf.save(pol, tmp_path / "c.json", {"model": "cnn", "T": 2, "dataset": "digits"})
    assert '"inf"' in path.read_text()
    back = cf.load(path, expect={"model": "cnn", "T": 2})
    assert back.betas == [1.0, math.inf]
    with pytest.raises(ValueError, match="calibrated for T = 2, not 4"):
        cf.load(path, expect={"model": "cnn", "T": 4})
    with pytest.raises(ValueError, match="calibrated for model = 'cnn', not 'mlp'"):
        cf.load(path, expect={"model": "mlp"})


def test_a_step_past_the_calibration_is_an_error_naming_both():
    from fewstep.anytime import AnytimeStream, early_exit
    from fewstep.models import create

    Y = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.2, 0.0]])
    for pol in (cf.TopK(betas=[1.0, 2.0]), cf.SpikeCP(quantiles=[0.5, 0.5])):
        assert pol.horizon() == 2 and pol.fire(Y, 2).shape == (2,)
        with pytest.raises(ValueError, match=f"{pol.name} was calibrated for T = 2 but asked about step 3"):
            pol.fire(Y, 3)
        with pytest.raises(ValueError, match=f"{pol.name} was calibrated for T = 2 but asked about step 3"):
            pol.fire(Y, torch.tensor([1, 3]))  # per-sample steps (continuous batching)
        net = create("mlp", input_shape=(1, 4, 4), num_classes=3, hidden=(8,))
        with pytest.raises(ValueError, match=f"T mismatch: {pol.name} was calibrated for T = 2 steps but the input has T = 3"):
            early_exit(net, torch.rand(3, 5, 1, 4, 4), pol, max_batch=2)  # refused before the first step
        with pytest.raises(ValueError, match="calibrated for T = 2 steps but the input has T = 4"):
            AnytimeStream(net, pol, T=4)
    assert cf.Softmax(0.1).horizon() is None and cf.TopK(0.1).horizon() is None  # any step / not calibrated


def test_step_cap_hand_built_and_equal_to_capping_a_decision(tmp_path):
    Y = Y_from([
        [[0, 5], [0, 10], [0, 15], [0, 20]],  # confident from t = 1
        [[1, 0], [1, 2], [1, 3], [1, 3]],     # never confident; class 0 at t = 1, class 1 from t = 2
    ])
    pol = cf.Softmax(0.01)
    assert cf.simulate(pol, Y).exit_step.tolist() == [1, 4]
    d = cf.simulate(pol.with_max_step(2), Y)
    assert d.exit_step.tolist() == [1, 2] and d.prediction.tolist() == [1, 1]  # stops at 2 with argmax Y(2)
    d1 = cf.simulate(pol.with_max_step(1), Y)
    assert d1.exit_step.tolist() == [1, 1] and d1.prediction.tolist() == [1, 0]
    assert repr(pol) == "Softmax(epsilon=0.01, max_step=1)"
    with pytest.raises(ValueError, match="max_step must be a step >= 1"):
        pol.with_max_step(0)
    g = torch.Generator().manual_seed(1)
    Yr = cf.running(torch.randn(10, 200, 4, generator=g))
    yr = torch.randint(0, 4, (200,), generator=g)
    for p in (cf.TopK(0.2).calibrate(Yr, yr), cf.Softmax(0.3), cf.SpikeCP(0.2).calibrate(Yr, yr)):
        full = cf.simulate(p.with_max_step(None), Yr)
        for k in (1, 3, 7, 10):
            a, b = cf.capped(full, Yr, k), cf.simulate(p.with_max_step(k), Yr)
            assert torch.equal(a.exit_step, b.exit_step) and torch.equal(a.prediction, b.prediction)
        path = cf.save(p.with_max_step(3), tmp_path / "c.json", {"T": 10})
        back = cf.load(path)
        assert back.max_step == 3 and torch.equal(cf.simulate(back, Yr).exit_step, cf.simulate(p, Yr).exit_step)
        assert cf.load(cf.save(p.with_max_step(None), tmp_path / "d.json", {"T": 10})).max_step is None


def test_exit_breakdown_by_step_and_class_by_hand():
    from fewstep.cutoff import Decision
    from fewstep.reports import exit_breakdown

    d = Decision(torch.tensor([1, 1, 2, 4, 4, 1]), torch.tensor([0, 1, 1, 2, 0, 2]))
    y = torch.tensor([0, 1, 0, 2, 2, 2])
    full = torch.tensor([0, 1, 1, 2, 2, 0])
    b = exit_breakdown(d, y, full, 4, classes=["cat", "dog", "emu"])
    # step 1: samples 0, 1, 5 all right; step 2: sample 2 wrong; step 3: none; step 4: samples 3 right, 4 wrong
    assert b["accuracy_by_exit_step"] == [1.0, 0.0, None, 0.5]
    assert b["per_class"] == [
        {"class": "cat", "index": 0, "n": 2, "full_accuracy": 0.5, "accuracy": 0.5, "mean_exit_step": 1.5},
        {"class": "dog", "index": 1, "n": 1, "full_accuracy": 1.0, "accuracy": 1.0, "mean_exit_step": 1.0},
        {"class": "emu", "index": 2, "n": 3, "full_accuracy": pytest.approx(2 / 3), "accuracy": pytest.approx(2 / 3),
         "mean_exit_step": 3.0}]


def test_exits_csv_marks_harmed_and_helped(tmp_path):
    import csv

    from fewstep.cutoff import Decision
    from fewstep.reports import write_exits_csv

    d = Decision(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 2]))
    y, full = torch.tensor([0, 0, 2]), torch.tensor([0, 1, 2])  # harmed, helped, unchanged
    rows = list(csv.DictReader(write_exits_csv(tmp_path / "e.csv", d, y, full, ["a", "b", "c"]).open()))
    assert [w["change"] for w in rows] == ["harmed", "helped", ""]
    assert [w["label_name"] for w in rows] == ["a", "a", "c"] and [w["exit_step"] for w in rows] == ["1", "2", "3"]


def test_cutoff_breakdown_lines_group_long_runs_and_many_classes():
    from fewstep.cli_run import _breakdown_lines

    T = 64
    hist = [0] * T
    hist[0], hist[5], hist[63] = 30, 10, 20  # steps 1, 6 and 64
    acc = [None] * T
    acc[0], acc[5], acc[63] = 1.0, 0.9, 0.5
    per_class = [{"class": f"c{i}", "index": i, "n": 2, "full_accuracy": 1.0, "accuracy": 1.0,
                  "mean_exit_step": float(i)} for i in range(30)]
    lines = _breakdown_lines({"T": T, "exit_histogram": hist, "accuracy_by_exit_step": acc, "per_class": per_class})
    assert lines[0].split()[2:] == ["1-8", "57-64"]      # eight ranges of 8 steps; the empty ones left out
    assert lines[1].split()[1:] == ["40", "20"]
    assert lines[2].split()[1:] == ["98%", "50%"]        # (30·1.0 + 10·0.9) / 40 = 97.5 %
    assert "the 5 slowest of 30 classes" in lines[3]
    assert [ln.split()[0] for ln in lines[4:]] == ["c29", "c28", "c27", "c26", "c25"]
