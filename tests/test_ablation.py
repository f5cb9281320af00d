"""``fewstep ablate``: variants, paired seeds, resume after an interruption, the report."""

import csv
import json
import re

import pytest
import yaml

from fewstep import ablation as A
from fewstep.cli import main as cli
from fewstep.train import Trainer

from .test_train import quick


def test_variant_tokens_seeds_and_variant_sets():
    base = quick(None).to_dict()
    d = A.variant_dict(base, "tet+rcs+str+tebn", 5, ["regularizer.rcs_weight=0.01"])
    assert d["train"]["loss"] == "tet" and d["regularizer"]["name"] == "rcs+str" and d["model"]["norm"] == "tebn"
    assert d["train"]["seed"] == 5 and d["regularizer"]["rcs_weight"] == 0.01
    assert A.variant_dict(base, "ce", 0)["train"]["loss"] == "ce"
    labelled = A.variant_dict(base, "str-tail=tet+str", 0, ["regularizer.str_form=tail"])  # LABEL=TOKENS
    assert labelled["regularizer"]["name"] == "str" and labelled["regularizer"]["str_form"] == "tail"
    with pytest.raises(ValueError, match="names a folder"):
        A.tokens("../x=tet")
    assert base["train"]["seed"] == 0 and "regularizer" in base  # the base is not modified
    with pytest.raises(ValueError, match=r"unknown ablation token\(s\) \['l1'\].*valid tokens: ce .*rcs"):
        A.tokens("tet+l1")
    assert A.parse_seeds(3) == [0, 1, 2] and A.parse_seeds("0,5,7") == [0, 5, 7] and A.parse_seeds("4,") == [4]
    with pytest.raises(ValueError, match="one seed: 0,"):
        A.parse_seeds("0")
    for bad in ("0", "1,1", "-1,2", "x"):
        with pytest.raises(ValueError, match="--seeds"):
            A.parse_seeds(bad)
    for seeds in ([8], [0], [6, 7], [0, 1, 2], [5, 3]):  # the reproduce command names exactly these seeds
        assert A.parse_seeds(A.seeds_arg(seeds)) == seeds
    assert A.seeds_arg([8]) == "8,"
    # announced before training: a lone number read as a count says how to name that seed alone
    assert A.describe_seeds("8") == "seeds 0–7 (--seeds 8 is a count; seed 8 alone: --seeds 8,)"
    assert A.describe_seeds("3") == "seeds 0, 1, 2 (--seeds 3 is a count; seed 3 alone: --seeds 3,)"
    assert A.describe_seeds(3) == "seeds 0, 1, 2"  # the default count, not typed
    assert A.describe_seeds("8,") == "seed 8" and A.describe_seeds("1") == "seed 0"
    assert A.describe_seeds("0,5,7") == "seeds 0, 5, 7" and A.describe_seeds("3,4,5,6,7,") == "seeds 3–7"
    with pytest.raises(ValueError, match="not among --variants"):
        A.parse_variant_sets(["tet+str:regularizer.str_weight=1"], ["tet", "tet+rcs"])
    with pytest.raises(ValueError, match="VARIANT:KEY=VALUE"):
        A.parse_variant_sets(["tet+rcs"], ["tet", "tet+rcs"])
    assert A.flatten({"train": {"lr": 0.1, "betas": [1, 2]}, "model": {"options": {}}}) == {
        "train.lr": 0.1, "train.betas": [1, 2], "model.options": {}}


def write_config(tmp_path):
    cfg = tmp_path / "digits.yaml"
    d = quick(tmp_path, epochs=3).to_dict()
    d["data"]["T"] = 4
    cfg.write_text(yaml.safe_dump(d))
    return cfg


def test_paired_differences_carry_a_t_interval_and_the_seeds_ahead():
    from fewstep.ablation_markdown import _fmt_ci
    from fewstep.ablation_report import _paired

    # mean 0.02, std 0.01 over 3 seeds; t(0.975, 2 dof) = 4.302653 -> half-width 4.302653 * 0.01 / sqrt(3)
    p = _paired([0.01, 0.03, 0.02])
    assert p["mean"] == pytest.approx(0.02) and p["std"] == pytest.approx(0.01)
    assert p["ci95"] == pytest.approx([0.02 - 0.0248414, 0.02 + 0.0248414], abs=1e-6)
    assert (p["ahead"], p["level"], p["behind"]) == (3, 0, 0)
    assert _fmt_ci(p, 100) == "[-0.48, +4.48] 3/0/0"  # every seed ahead, yet the interval holds 0
    q = _paired([1.0, 1.1, 0.9, 0.0])
    assert (q["ahead"], q["level"], q["behind"]) == (3, 1, 0)
    r = _paired([-1.0, -1.1, -0.9])
    assert r["ci95"][1] == pytest.approx(-1 + 0.248414, abs=1e-5) and _fmt_ci(r).endswith("0/0/3 **beyond noise**")
    assert _paired([0.5])["ci95"] is None and _fmt_ci(_paired([0.5])) == "1/0/0"
    assert _fmt_ci(_paired([])) == "–"
    # a ratio is judged against 1, and its bounds are unsigned: 1.2 and 1.5 -> mean 1.35, std 0.212132,
    # t(0.975, 1 dof) = 12.706205 -> half-width 1.905931
    ratio = _paired([1.2, 1.5], ref=1.0)
    assert (ratio["ahead"], ratio["level"], ratio["behind"]) == (2, 0, 0)
    assert _fmt_ci(ratio) == "[-0.56, 3.26] 2/0/0"
    assert _fmt_ci(_paired([1.0, 0.9, 1.2], ref=1.0)).endswith(" 1/1/1")
    assert _fmt_ci(_paired([1.50, 1.52], ref=1.0)) == "[1.38, 1.64] 2/0/0 **beyond noise**"


def test_fixed_T_baseline_is_the_timestep_policy_chosen_on_validation():
    import torch

    from fewstep import cutoff
    from fewstep.ablation_markdown import markdown
    from fewstep.ablation_report import _scalars, fixed_step

    # hand-computed: full 0.90; within 0.6 pt from t = 3 (0.895), within 1 pt from t = 2 (0.89 >= 0.89)
    val = [0.70, 0.89, 0.895, 0.89, 0.90]
    assert fixed_step(val, 0.006) == 3 and fixed_step(val, 0.01) == 2 and fixed_step(val, 0.0) == 5
    assert fixed_step([0.5, 0.9, 0.8], 0.0) == 2  # a step above the final accuracy qualifies too
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # the same choice as the timestep policy's calibration on the full outputs
        Y = cutoff.running(torch.randn(8, 300, 5, generator=g) + 0.3 * torch.eye(5)[torch.arange(300) % 5])
        y = torch.arange(300) % 5
        per_step = (Y.argmax(-1) == y).float().mean(1).tolist()
        for drop in (0.006, 0.01, 0.03):
            pol, _ = cutoff.fastest_within("timestep", Y, y, drop)
            assert fixed_step(per_step, drop) == pol.t
    calibrated = {n: {str(d): {"speedup": 5 / 2.5, "mean_exit_step": 2.5, "test_drop": 0.004, "energy_uj": 1.0,
                               "setting": {"epsilon": 0.1}}
                      for d in (0.006, 0.01)} for n in ("softmax", "topk")}
    a = {"T": 5, "val_accuracy_per_step": val, "test_accuracy_per_step": [0.6, 0.85, 0.88, 0.89, 0.91],
         "firing_rate": 0.1, "energy_uj_full": 2.0, "spikes_per_sample": 10.0,
         "calibrated": calibrated, "test_curve": {n: {str(d): {"speedup": 2.0} for d in (0.006, 0.01)}
                                                  for n in ("softmax", "topk")},
         "n_test": 100, "n_val": 200, "oct": {"accuracy": 0.91, "mean_exit_step": 1.5},
         "curves": {n: [{"epsilon": 0.1, "accuracy": 0.9, "mean_exit_step": 2.5}] for n in ("softmax", "topk")}}
    s = _scalars(a)
    assert s["timestep@0.006:mean_exit_step"] == 3 and s["timestep@0.006:speedup"] == pytest.approx(5 / 3)
    assert s["timestep@0.006:test_drop"] == pytest.approx(0.91 - 0.88)
    assert s["timestep@0.01:mean_exit_step"] == 2 and s["timestep@0.01:test_drop"] == pytest.approx(0.06)
    assert s["softmax@0.006:vs_fixed"] == pytest.approx(3 / 2.5) and s["topk@0.01:vs_fixed"] == pytest.approx(2 / 2.5)
    from fewstep.ablation_report import aggregate

    spec = {"command": "x", "seeds": [0], "base": quick(None).to_dict()}
    md = markdown(aggregate({"tet": {0: a}}, ["tet"], spec["base"], spec))
    # the accuracy at each exit: the fixed T's step accuracy, or final − drop (0.91 − 0.004)
    assert s["timestep@0.006:exit_accuracy"] == pytest.approx(0.88)
    assert s["softmax@0.006:exit_accuracy"] == pytest.approx(0.906)
    assert "| tet | fixed T | 0.6 pt | 1.67× | 3.00 | 3.00 | 88.00 | 1 | – |" in md
    assert "| tet | softmax | 0.6 pt | 2.00× | 2.50 | 0.40 | 90.60 | 1.20× | 1.000 |" in md
    assert "| tet | topk | 1 pt | 2.00× | 2.50 | 0.40 | 90.60 | 0.80× | 1.000 |" in md
    # a variant that ends 2 pt lower exits sooner within its own drop, yet answers less accurately at its exit:
    # the paired exit accuracy shows it where the speed-up does not
    b = json.loads(json.dumps(a))
    b["test_accuracy_per_step"] = [0.6, 0.85, 0.87, 0.88, 0.89]
    for n in ("softmax", "topk"):
        b["calibrated"][n]["0.006"].update(speedup=5 / 2.0, mean_exit_step=2.0, test_drop=0.005, test_accuracy=0.885)
    summ = aggregate({"tet": {0: a, 1: a}, "other": {0: b, 1: b}}, ["tet", "other"], spec["base"], spec)
    pd = summ["variants"]["other"]["paired_diff"]
    assert pd["softmax@0.006:speedup"]["mean"] == pytest.approx(0.5)
    assert pd["softmax@0.006:exit_accuracy"]["mean"] == pytest.approx(0.885 - 0.906)
    md = markdown(summ)
    assert "| -2.10 ± 0.00 | -2.10 ± 0.00 | +0.0000 ± 0.0000 |" in md
    # each exit against its own network's fixed T (3 steps at 0.6 pt, 88 % on test), seed by seed: a second
    # seed whose softmax exit comes at 2.0 steps and 90 % -> ratios 1.2, 1.5; accuracy +2.6, +2.0 pt
    assert s["softmax@0.006:vs_fixed_accuracy"] == pytest.approx(0.906 - 0.88)
    a2 = json.loads(json.dumps(a))
    a2["calibrated"]["softmax"]["0.006"].update(mean_exit_step=2.0, test_accuracy=0.90)
    vf = aggregate({"tet": {0: a, 1: a2}}, ["tet"], spec["base"], spec)["variants"]["tet"]["vs_fixed"]
    assert vf["softmax@0.006:vs_fixed"]["values"] == pytest.approx([1.2, 1.5])
    assert vf["softmax@0.006:vs_fixed_accuracy"]["values"] == pytest.approx([0.026, 0.02])
    md = markdown(aggregate({"tet": {0: a, 1: a2}}, ["tet"], spec["base"], spec))
    # mean 2.3 pt, std 0.424264 -> half-width 12.706205 * 0.424264 / sqrt(2) = 3.811862
    assert ("| tet | softmax | 0.6 pt | 1.35 ± 0.21× | [-0.56, 3.26] 2/0/0 | +2.30 ± 0.42 | [-1.51, +6.11] 2/0/0 |"
            in md)
    assert "| tet | topk | 1 pt | 0.80 ± 0.00× | [0.80, 0.80] 0/0/2 **beyond noise** |" in md


def test_speedup_bars_are_labelled_with_the_accuracy_at_their_exits(tmp_path):
    # A variant that ends lower may exit sooner at the same d without answering better: each bar says at what
    # accuracy it exits, or nothing where the analysis did not record it.
    from fewstep import plots

    stats = {"softmax@0.006:exit_accuracy": {"mean": 0.90149}, "topk@0.006:exit_accuracy": {"mean": None}}
    groups = [("softmax", 0.006), ("topk", 0.006), ("softmax+cap", 0.006)]
    assert plots.exit_accuracy_labels(stats, groups) == ["90.1", "", ""]
    full = {f"{p}@{d}:speedup": {"mean": 2.0, "std": 0.5} for p, d in groups}
    out = plots.ablation_speedup({"a": dict(full, **stats), "b": full}, ["softmax", "topk", "softmax+cap"], [0.006],
                                 tmp_path / "speedup.png")
    assert out.is_file() and out.stat().st_size > 0


def test_time_left_from_the_runs_timed_so_far():
    # tet: 30 s over 3 epochs, then 50 s over 5: 10 s an epoch; tet+trt: 60 s over 3 epochs, 20 s an epoch
    took = {"tet": [(30.0, 3), (50.0, 5)], "tet+trt": [(60.0, 3)], "tet-7ep": []}
    assert A.time_left(took, [("tet", 4), ("tet+trt", 4)]) == pytest.approx(40 + 80)
    # a variant not yet timed: the mean over every timed run, 140 s / 11 epochs
    assert A.time_left(took, [("tet-7ep", 7)]) == pytest.approx(7 * 140 / 11)
    assert A.time_left({"tet": []}, [("tet", 3)]) is None
    assert [A.duration(s) for s in (42, 420, 3900)] == ["42 s", "7 min", "1 h 05 min"]


def test_two_variant_ablation_runs_end_to_end_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    cfg, out = write_config(tmp_path), tmp_path / "abl"
    logs = []
    calls = {"n": 0}
    real_fit = Trainer.fit

    def interrupted(self, stop_after=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second run is cut off after one of its three epochs
            real_fit(self, stop_after=1)
            raise KeyboardInterrupt
        return real_fit(self, stop_after)

    monkeypatch.setattr(Trainer, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        A.Ablation(cfg, ["tet", "tet+rcs"], 2, out, ["train.lr=0.005"], ["tet+rcs:regularizer.rcs_weight=0.01"],
                   log=logs.append).run()
    monkeypatch.undo()
    assert any(m.startswith("[1/4] tet seed 0: trained and analysed in") and "left for the 3 runs to train" in m
               for m in logs)
    first = out / "tet" / "seed0"
    assert (first / "metrics.json").is_file() and (first / "analysis.json").is_file()
    assert (out / "tet+rcs" / "seed0" / "checkpoint.pt").is_file()
    assert not (out / "tet+rcs" / "seed0" / "metrics.json").exists()
    stamp = (first / "checkpoint.pt").stat().st_mtime_ns

    logs.clear()
    summary = A.Ablation(cfg, ["tet", "tet+rcs"], 2, out, ["train.lr=0.005"],
                         ["tet+rcs:regularizer.rcs_weight=0.01"], log=logs.append).run()
    assert (first / "checkpoint.pt").stat().st_mtime_ns == stamp  # the finished run was not retrained
    assert any("tet+rcs seed 0" in m and "resuming" in m and "after epoch 1" in m for m in logs)
    assert not any(m.startswith("[1/4]") and "training" in m for m in logs)
    assert any(m.startswith("[1/4]") and "finished earlier (3 epochs), kept" in m for m in logs)
    for v in ("tet", "tet+rcs"):
        for k in (0, 1):
            run = out / v / f"seed{k}"
            saved = yaml.safe_load((run / "config.yaml").read_text())
            assert saved["train"]["seed"] == k and saved["train"]["lr"] == 0.005 and saved["train"]["epochs"] == 3
            assert saved["regularizer"]["name"] == ("rcs" if v == "tet+rcs" else "none")
            a = json.loads((run / "analysis.json").read_text())
            assert len(a["test_accuracy_per_step"]) == 4
            for pol in ("softmax", "topk"):
                for drop, c in a["calibrated"][pol].items():
                    assert c["val_drop"] <= float(drop) + 1e-9  # chosen on validation, within the drop there
                    assert c["speedup"] == pytest.approx(4 / c["mean_exit_step"])
    assert yaml.safe_load((out / "tet+rcs" / "seed1" / "config.yaml").read_text())["regularizer"]["rcs_weight"] == 0.01
    assert summary["variants"]["tet+rcs"]["seeds"] == [0, 1]
    assert summary["variants"]["tet+rcs"]["paired_diff"]["final_accuracy"]["n"] == 2
    md = (out / "results.md").read_text()
    assert "| tet+rcs |" in md and "Paired differences from tet" in md and "--variant-set" in md
    assert "Beyond seed noise?" in md
    # beside each calibrated exit: the fixed T chosen on validation, and the exit with a step cap chosen with it
    a = json.loads((out / "tet" / "seed0" / "analysis.json").read_text())
    va = a["val_accuracy_per_step"]
    fixed = next(t for t, acc in enumerate(va, 1) if acc >= va[-1] - 0.006 - 1e-9)
    assert "| tet | fixed T | 0.6 pt |" in md
    assert summary["variants"]["tet"]["stats"]["timestep@0.006:mean_exit_step"]["values"][0] == fixed
    for name in ("softmax", "topk"):
        c, k = a["capped"][name]["0.006"], a["capped"][name]["0.006"]["setting"]["max_step"]
        assert k is None or 1 <= k < 4
        assert c["val_mean_exit_step"] <= a["calibrated"][name]["0.006"]["val_mean_exit_step"] + 1e-9  # never slower on val
        assert f"| tet | {name} + cap " in md
    # the exits calibrated with a bound on the drop, as `fewstep cutoff --max-drop` makes them; an analysis made
    # before them gets them added from the network's outputs, the same as a fresh one
    for key in ("bounded", "bounded_drop"):  # the bound on the share harmed, and on the drop
        assert set(a[key]) == {"timestep", "softmax", "topk", "softmax+cap", "topk+cap"}
        assert all(c["bound"] <= float(d) for r in a[key].values() for d, c in r.items())
    assert "## Calibrated with a 95 % bound on the drop (test)" in md
    assert "## Calibrated with a 95 % bound on the share of samples harmed (test)" in md
    fresh = {k: a.pop(k) for k in ("bounded", "bounded_drop")}
    (first / "analysis.json").write_text(json.dumps(a))
    logs.clear()
    A.Ablation.from_folder(out, log=logs.append).run(analyse_only=True)
    assert any(m.startswith("[1/4] tet seed 0: adding the harm-bounded and the drop-bounded exits") for m in logs)
    again = json.loads((first / "analysis.json").read_text())
    assert {k: again[k] for k in fresh} == fresh and again["drop_bound"] == a["drop_bound"] == "exact-score"
    # drop-bounded exits made by the earlier construction of the drop bound (a Bonferroni pair; no "drop_bound"
    # key) are redone, the harm-bounded ones kept
    again.pop("drop_bound")
    again["bounded_drop"] = {"stale": {}}
    (first / "analysis.json").write_text(json.dumps(again))
    logs.clear()
    A.Ablation.from_folder(out, log=logs.append).run(analyse_only=True)
    assert "[1/4] tet seed 0: redoing the drop-bounded exits of its analysis (the drop bound is now exact-score, " \
           "fewstep.bounds)" in logs
    redone = json.loads((first / "analysis.json").read_text())
    assert {k: redone[k] for k in fresh} == fresh and redone["drop_bound"] == "exact-score"
    assert not any("seed 1: redoing" in m or "adding" in m for m in logs)  # the other runs are current
    assert logs[-1].endswith("speedup.png, paired.png")  # no bounded.png: too few validation images to bound 1 pt
    assert a["n_val"] < 299 and not (out / "bounded.png").exists() and not (out / "bounded_harm.png").exists()
    # what each variant changed is listed, so the report never calls a budget shared that is not
    assert summary["spec"]["differences"] == {"tet": {}, "tet+rcs": {"regularizer.name": "rcs",
                                                                      "regularizer.rcs_weight": 0.01}}
    assert "except where listed below" in md
    assert '  - tet+rcs: `regularizer.name="rcs"`, `regularizer.rcs_weight=0.01`' in md
    for png in ("accuracy_per_step.png", "learning_curves.png", "tradeoff.png", "speedup.png", "paired.png"):
        assert (out / png).stat().st_size > 5000
    # learning curves: the mean over seeds of the validation accuracy each run logged after each epoch
    for v in ("tet", "tet+rcs"):
        logged = [[float(r["val_acc"]) for r in csv.DictReader((out / v / f"seed{k}" / "log.csv").open())]
                  for k in (0, 1)]
        curve = summary["variants"][v]["val_per_epoch"]
        assert len(curve) == 3  # the interrupted run's log kept its first epoch across the resume
        assert [c["values"] for c in curve] == [list(per_epoch) for per_epoch in zip(*logged)]
    section = md.split("## Validation accuracy per epoch (%)")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| tet+rcs |"))
    assert row.count("±") == 3 and f"{100 * summary['variants']['tet+rcs']['val_per_epoch'][2]['mean']:.2f}" in row


def test_cli_reports_finished_runs_and_refuses_another_base_config(tmp_path, capsys, monkeypatch):
    cfg, out = write_config(tmp_path), tmp_path / "abl"
    assert cli(["ablate", str(cfg), "--variants", "tet,tet+str", "--seeds", "1", "--out", str(out),
                "--set", "train.epochs=2", "--analyse-only"]) == 0
    assert "not finished yet: tet, tet+str" in capsys.readouterr().out  # nothing trained with --analyse-only
    assert cli(["ablate", str(cfg), "--variants", "tet,tet+str", "--seeds", "1", "--out", str(out),
                "--set", "train.epochs=2"]) == 0
    text = capsys.readouterr().out
    assert "## Accuracy per timestep (test, %)" in text and "| tet+str |" in text
    assert "ablation " + str(out) + ": 2 variants (tet, tet+str) × seed 0 = 2 runs" in text  # announced first
    assert "--seeds 0, --out" in (out / "results.md").read_text()  # its command reproduces seed 0 alone
    # a folder written before a config section existed (its defaults) is the same base, not another
    spec = json.loads((out / "ablation.json").read_text())
    del spec["base"]["trt"]
    (out / "ablation.json").write_text(json.dumps(spec))
    assert cli(["ablate", str(cfg), "--variants", "tet,tet+str", "--seeds", "1", "--out", str(out),
                "--set", "train.epochs=2", "--analyse-only"]) == 0
    assert "finished earlier" in capsys.readouterr().out
    # the folder alone: its ablation.json gives the config, variants and seeds, even once the config file is gone
    moved = tmp_path / "moved.yaml"
    cfg.rename(moved)
    import fewstep.train

    with monkeypatch.context() as m:  # analysed runs are reported from their files: the data is not read
        m.setattr(fewstep.train, "load_data", lambda cfg: (_ for _ in ()).throw(AssertionError("data read")))
        assert cli(["ablate", "--out", str(out), "--analyse-only"]) == 0
    text = capsys.readouterr().out
    assert "[1/2] tet seed 0: finished earlier" in text and "| tet+str |" in text
    assert cli(["ablate", "--out", str(out), "--seeds", "2", "--analyse-only"]) == 0  # extended: seed 1 is missing
    assert "[4/4] tet+str seed 1" in capsys.readouterr().out
    assert cli(["ablate", "--out", str(out), "--set", "train.epochs=3"]) == 2
    assert "give the config and --variants too" in capsys.readouterr().err
    assert cli(["ablate", str(moved), "--out", str(out)]) == 2
    assert "give both the config and --variants" in capsys.readouterr().err
    assert cli(["ablate", "--out", str(tmp_path / "none")]) == 2
    assert "is not an ablation folder" in capsys.readouterr().err
    moved.rename(cfg)
    assert cli(["ablate", str(cfg), "--variants", "tet", "--seeds", "1", "--out", str(out),
                "--set", "train.epochs=3"]) == 2
    assert "different base config" in capsys.readouterr().err
    assert cli(["ablate", str(cfg), "--variants", "tet+dropout", "--out", str(tmp_path / "x")]) == 2
    assert "valid tokens" in capsys.readouterr().err
    # the same tokens under two labels, one tuned: two folders, two configs
    assert cli(["ablate", str(cfg), "--variants", "tet+str,strong=tet+str", "--seeds", "1", "--out",
                str(tmp_path / "lab"), "--set", "train.epochs=1", "--variant-set", "strong:regularizer.str_weight=5"]) == 0
    weights = [yaml.safe_load((tmp_path / "lab" / v / "seed0" / "config.yaml").read_text())["regularizer"]["str_weight"]
               for v in ("tet+str", "strong")]
    assert weights == [0.1, 5.0]
    assert "| strong |" in capsys.readouterr().out
    # a folder from before ablation.json kept each label's tokens: they are read back from its command
    spec = json.loads((tmp_path / "lab" / "ablation.json").read_text())
    assert spec["variant_specs"] == ["tet+str", "strong=tet+str"]
    del spec["variant_specs"]
    (tmp_path / "lab" / "ablation.json").write_text(json.dumps(spec))
    assert cli(["ablate", "--out", str(tmp_path / "lab"), "--analyse-only"]) == 0
    text = capsys.readouterr().out
    assert "strong seed 0: finished earlier" in text and "`regularizer.str_weight=5.0`" in text


def test_reuse_copies_a_finished_run_with_the_same_config_and_nothing_else(tmp_path, capsys, monkeypatch):
    cfg, first, second = write_config(tmp_path), tmp_path / "first", tmp_path / "second"
    assert cli(["ablate", str(cfg), "--variants", "tet", "--seeds", "1", "--out", str(first),
                "--set", "train.epochs=1"]) == 0
    capsys.readouterr()
    fits = []
    real_fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self: fits.append(self.out) or real_fit(self))
    # the baseline under another label: the same config, so copied; tet+str differs, so trained
    assert cli(["ablate", str(cfg), "--variants", "base=tet,tet+str", "--seeds", "1", "--out", str(second),
                "--set", "train.epochs=1", "--reuse", str(first)]) == 0
    text = capsys.readouterr().out
    assert f"[1/2] base seed 0: copied from {first / 'tet' / 'seed0'}" in text
    assert "finished earlier (1 epochs), kept" in text and "analysing" not in text.split("[2/2]")[0]
    assert fits == [second / "tet+str" / "seed0"]
    # the nearest run not taken is named with what differs, so a user can align the configs
    assert f"[2/2] tet+str seed 0: not copied from {first / 'tet' / 'seed0'}, which differs in regularizer.name" in text
    a = json.loads((first / "tet" / "seed0" / "analysis.json").read_text())
    b = json.loads((second / "base" / "seed0" / "analysis.json").read_text())
    assert a == b
    # another budget (2 epochs) is not the same run: trained, not copied
    fits.clear()
    assert cli(["ablate", str(cfg), "--variants", "tet", "--seeds", "1", "--out", str(tmp_path / "third"),
                "--set", "train.epochs=2", "--reuse", str(first)]) == 0
    text = capsys.readouterr().out
    assert "copied from" not in text.replace("not copied from", "") and fits == [tmp_path / "third" / "tet" / "seed0"]
    assert f"not copied from {first / 'tet' / 'seed0'}, which differs in train.epochs" in text
    # a run still to be copied is not counted among those left to train (nor in their time)
    assert cli(["ablate", str(cfg), "--variants", "tet+str,base=tet", "--seeds", "1", "--out", str(tmp_path / "fourth"),
                "--set", "train.epochs=1", "--reuse", str(first)]) == 0
    text = capsys.readouterr().out
    assert "[1/2] tet+str seed 0: training" in text and "[2/2] base seed 0: copied from" in text
    assert "left for the" not in text
    assert cli(["ablate", str(cfg), "--variants", "tet", "--out", str(tmp_path / "x"), "--reuse",
                str(tmp_path / "nowhere")]) == 2
    assert f"--reuse {tmp_path / 'nowhere'}: no such folder" in capsys.readouterr().err


def test_exits_at_the_same_validation_bar():
    import torch

    from fewstep import cutoff
    from fewstep.ablation import calibrated_exits
    from fewstep.ablation_markdown import markdown
    from fewstep.ablation_report import aggregate, matched_exit

    # hand-computed: T = 4; three thresholds on the curve (validation accuracy, validation exit, test figures)
    curve = [{"epsilon": 0.0, "val_accuracy": 0.90, "val_mean_exit_step": 3.0, "accuracy": 0.89, "mean_exit_step": 3.2},
             {"epsilon": 0.1, "val_accuracy": 0.89, "val_mean_exit_step": 2.0, "accuracy": 0.88, "mean_exit_step": 2.5},
             {"epsilon": 0.2, "val_accuracy": 0.85, "val_mean_exit_step": 1.0, "accuracy": 0.84, "mean_exit_step": 1.1}]
    a = {"T": 4, "val_accuracy_per_step": [0.8, 0.85, 0.88, 0.90], "test_accuracy_per_step": [0.8, 0.85, 0.88, 0.90],
         "curves": {"softmax": curve, "topk": curve}}
    assert matched_exit(a, "softmax", 0.885) == {"mean_exit_step": 2.5, "speedup": 4 / 2.5, "exit_accuracy": 0.88}
    assert matched_exit(a, "softmax", 0.80)["mean_exit_step"] == 1.1
    assert matched_exit(a, "softmax", 0.95) == {"mean_exit_step": 4.0, "speedup": 1.0, "exit_accuracy": 0.90}  # to T
    # with the bar at the run's own full-T validation accuracy − d it is the calibrated exit
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        n = 400
        y = torch.arange(n) % 5
        O = torch.randn(6, n, 5, generator=g) + 0.5 * torch.eye(5)[y]
        Yv, Yt = cutoff.running(O[:, : n // 2]), cutoff.running(O[:, n // 2:])
        yv, yt = y[: n // 2], y[n // 2:]
        full_val = (Yv[-1].argmax(-1) == yv).float().mean().item()
        run = {"T": 6, "val_accuracy_per_step": [full_val], "test_accuracy_per_step": [0.0],
               "curves": {p: cutoff.sweep(p, Yv, yv, Yt, yt) for p in ("softmax", "topk")}}
        cal = calibrated_exits(Yv, yv, Yt, yt)
        for p in ("softmax", "topk"):
            for d in (0.006, 0.01, 0.05):
                m = matched_exit(run, p, full_val - d)
                ref = cal[p][str(d)] if str(d) in cal[p] else None
                if ref is None:
                    pol, _ = cutoff.fastest_within(p, Yv, yv, d)
                    dd = cutoff.simulate(pol, Yt)
                    ref = {"mean_exit_step": dd.mean_exit_step(), "test_accuracy": dd.accuracy(yt)}
                assert m["mean_exit_step"] == pytest.approx(ref["mean_exit_step"])
                assert m["exit_accuracy"] == pytest.approx(ref["test_accuracy"])
    # paired: a variant that ends 2 pt lower on validation; the bar is its full T − d for both runs of the seed
    b = json.loads(json.dumps(a))
    b["val_accuracy_per_step"][-1] = 0.88
    b["curves"] = {p: [{**q, "val_accuracy": q["val_accuracy"] - 0.02} for q in curve] for p in ("softmax", "topk")}
    calibrated = {p: {str(d): {"speedup": 2.0, "mean_exit_step": 2.0, "test_drop": 0.0, "energy_uj": None,
                               "setting": {"epsilon": 0.1}} for d in (0.006, 0.01)} for p in ("softmax", "topk")}
    common = {"firing_rate": 0.1, "energy_uj_full": 1.0, "spikes_per_sample": 1.0, "n_test": 10, "n_val": 10,
              "oct": {"accuracy": 0.9, "mean_exit_step": 1.0}, "calibrated": calibrated,
              "test_curve": {p: {str(d): {"speedup": 2.0} for d in (0.006, 0.01)} for p in ("softmax", "topk")}}
    a.update(common)
    b.update(json.loads(json.dumps(common)))
    spec = {"command": "x", "seeds": [0, 1], "base": quick(None).to_dict()}
    summ = aggregate({"tet": {0: a, 1: a}, "low": {0: b, 1: b}}, ["tet", "low"], spec["base"], spec)
    pd = summ["variants"]["low"]["paired_diff"]
    # bar 0.88 − 0.006: tet exits at 2.5 steps (val 0.89), low only at 3.2 (its 0.89 − 0.02 = 0.87 misses the bar)
    assert pd["softmax@0.006:matched_steps_saved"]["mean"] == pytest.approx(2.5 - 3.2)
    assert pd["softmax@0.006:matched_speedup"]["mean"] == pytest.approx(4 / 3.2 - 4 / 2.5)
    assert pd["topk@0.006:matched_exit_accuracy"]["mean"] == pytest.approx(0.89 - 0.88)
    md = markdown(summ)
    assert "## Paired at the same validation bar (from tet)" in md
    assert "| low | 0.6 pt | -0.70 ± 0.00, [-0.70, -0.70] 0/0/2 **beyond noise** |" in md


def test_bounded_exits_keep_the_guarantee_by_hand_and_report_it(tmp_path):
    import torch

    from fewstep import calibration as cal
    from fewstep.ablation_analysis import bounded_exits
    from fewstep.ablation_markdown import markdown
    from fewstep.ablation_report import _scalars, aggregate

    def outputs(n: int, wrong: dict) -> tuple:
        """Running logits [3, n, 2]: every sample right at T = 3; ``wrong[t]`` samples wrong at step t."""
        y = torch.zeros(n, dtype=torch.long)
        logits = torch.zeros(3, n, 2)
        logits[..., 0] = 1.0
        for t, k in wrong.items():
            logits[t - 1, :k] = torch.tensor([0.0, 1.0])
        return logits, y

    # validation: 400 samples, 10 wrong at step 1, none at step 2. With none harmed the 95 % bound on the harmed
    # share is 1 - 0.05 ** (1 / 400) = 0.746 %: the fixed T may stop at t = 2 within 1 pt, not within 0.6 pt (needs
    # n >= 498). The drop bound of a setting that changes no answer is a hair above it (0.751 %; its test spends
    # 0.1 % of alpha on the share of changed answers): the same choices here (0.6 pt would need n >= 502)
    assert cal.harm_upper_bound(0, 400, 0.95) == pytest.approx(1 - 0.05 ** (1 / 400))
    Yv, yv = outputs(400, {1: 10})
    Yt, yt = outputs(200, {1: 30, 2: 2})  # test: stopping at t = 2 harms 2 of 200 (1 pt)
    b, bd = bounded_exits(Yv, yv, Yt, yt, bound="harm"), bounded_exits(Yv, yv, Yt, yt)
    assert 1 - 0.05 ** (1 / 400) < cal.drop_upper_bound(0, 0, 400, 0.95) < 0.0076
    for got, at_2 in ((b, 1 - 0.05 ** (1 / 400)), (bd, cal.drop_upper_bound(0, 0, 400, 0.95))):
        one, tight = got["timestep"]["0.01"], got["timestep"]["0.006"]
        assert one["setting"] == {"t": 2} and one["bound"] == pytest.approx(at_2)
        assert one["mean_exit_step"] == 2.0 and one["test_harmed"] == 2 and one["test_drop"] == pytest.approx(0.01)
        assert one["ran_to_T"] == 0.0 and one["speedup"] == pytest.approx(1.5)
        assert tight["setting"] == {"t": 3} and tight["mean_exit_step"] == 3.0 and tight["ran_to_T"] == 1.0
    for rule in ("softmax", "topk", "softmax+cap", "topk+cap"):  # each as `fewstep cutoff --max-drop` calibrates it
        name, auto = rule.removesuffix("+cap"), rule.endswith("+cap")
        for d in (0.006, 0.01):
            for bound, got in (("harm", b), ("drop", bd)):
                r = cal.calibrate_to_target(name, Yv, yv, d, 0.95, max_step="auto" if auto else None, bound=bound)
                c = got[rule][str(d)]
                assert c["bound"] == r.bound <= d and c["max_step"] == r.cap
                assert c["mean_exit_step"] == pytest.approx(cal.simulate(r.policy, Yt).mean_exit_step())
    # in the report: within d on test (1 pt exactly: within), the fixed T under the bound, and the n it needs
    a = {"T": 3, "val_accuracy_per_step": [0.975, 1.0, 1.0], "test_accuracy_per_step": [0.85, 0.99, 1.0],
         "firing_rate": 0.1, "energy_uj_full": 1.0, "spikes_per_sample": 1.0, "n_val": 400, "n_test": 200,
         "oct": {"accuracy": 1.0, "mean_exit_step": 1.0}, "bounded": b, "bounded_drop": bd,
         "calibrated": {n: {d: {"speedup": 1.0, "mean_exit_step": 3.0, "test_drop": 0.0, "energy_uj": None,
                                "setting": {}}
                            for d in ("0.006", "0.01")} for n in ("softmax", "topk")},
         "test_curve": {n: {d: {"speedup": 1.0} for d in ("0.006", "0.01")} for n in ("softmax", "topk")},
         "curves": {n: [{"epsilon": 0.1, "accuracy": 1.0, "mean_exit_step": 3.0}] for n in ("softmax", "topk")}}
    s = _scalars(a)
    for kind in ("bound", "harm"):  # the drop bound's scalars, and the harm bound's
        assert s[f"{kind}:timestep@0.01:within"] == 1.0
        assert s[f"{kind}:timestep@0.01:exit_accuracy"] == pytest.approx(0.99)
    spec = {"command": "x", "seeds": [0], "base": quick(None).to_dict()}
    md = markdown(aggregate({"tet": {0: a}}, ["tet"], spec["base"], spec))
    drop_part, harm_part = md.split("## Calibrated with a 95 % bound on the drop (test)")[1].split(
        "## Calibrated with a 95 % bound on the share of samples harmed (test)")
    assert "from n = 502 validation samples at 0.6 pt and 301 at 1 pt" in drop_part
    assert "from n = 498 validation samples at 0.6 pt and 299 at 1 pt" in harm_part
    assert "`fewstep cutoff --max-drop d --confidence 0.95 --bound harm`" in harm_part
    for part in (drop_part, harm_part):
        assert "This ablation has 400: at 0.6 pt every bounded rule runs every sample to T (not tabled)." in part
        assert "| tet | fixed T | 1 pt | 2.00 | 1.50× | 1.00 | 99.00 | 1/1 | 0.0 | 1 |" in part
        assert "| tet | fixed T | 0.6 pt |" not in part
    # a second variant exits one step sooner under the same bound: 1 step saved, paired; with 100 validation
    # samples no bound reaches either d, and the table says so instead of listing runs to T
    fast = json.loads(json.dumps(a))
    fast["bounded"]["softmax"]["0.01"].update(mean_exit_step=b["softmax"]["0.01"]["mean_exit_step"] - 1)
    md = markdown(aggregate({"tet": {0: a, 1: a}, "fast": {0: fast, 1: fast}}, ["tet", "fast"], spec["base"], spec))
    assert "| fast | softmax | 1 pt | +1.00 ± 0.00, [+1.00, +1.00] 2/0/0 **beyond noise** | +0.00 ± 0.00," in md
    from fewstep.ablation_report import plot_summary

    summ = aggregate({"tet": {0: a, 1: a}, "fast": {0: fast, 1: fast}}, ["tet", "fast"], spec["base"], spec)
    for png in ("bounded.png", "bounded_harm.png"):
        assert png in plot_summary(summ, tmp_path) and (tmp_path / png).stat().st_size > 5000
    small = dict(a, n_val=100)
    md = markdown(aggregate({"tet": {0: small}}, ["tet"], spec["base"], spec))
    assert "This ablation has 100: at 0.6 pt and 1 pt every bounded rule runs every sample to T (not tabled)." in md
    assert "| tet | fixed T | 1 pt | 2.00 |" not in md
    # analyses made before the bounded exits existed are reported without them
    old = {k: v for k, v in a.items() if k not in ("bounded", "bounded_drop")}
    assert "% bound on" not in markdown(aggregate({"tet": {0: old}}, ["tet"], spec["base"], spec))


def test_jobs_train_runs_side_by_side_as_each_trains_alone_and_a_failed_run_is_named(tmp_path, capfd):
    import torch

    cfg = write_config(tmp_path)
    args = ["ablate", str(cfg), "--variants", "tet,tet+rcs", "--seeds", "0,1", "--set", "train.epochs=1"]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as each of the two worker processes below trains
        assert cli(args + ["--out", str(tmp_path / "alone")]) == 0
        torch.set_num_threads(2)
        capfd.readouterr()
        assert cli(args + ["--out", str(tmp_path / "together"), "--jobs", "2"]) == 0
    finally:
        torch.set_num_threads(before)
    text = capfd.readouterr().out
    assert "training 4 runs 2 at a time, 1 torch thread each (--jobs 2)" in text
    assert "[1/4] tet seed 0: training ->" in text and "[4/4] tet+rcs seed 1: done (" in text
    # the time left, from the runs the workers have reported so far; none after the last
    assert re.search(r"\] \S+ seed \d: done \(1 of 4\); about \d+ s left", text) and "done (4 of 4)\n" in text
    assert "[1/4] tet seed 0: trained above, collected" in text  # the report reads what the workers left
    assert "finished earlier" not in text  # (they were trained by this call)
    for v in ("tet", "tet+rcs"):
        for k in (0, 1):
            a, b = (json.loads((tmp_path / f / v / f"seed{k}" / "analysis.json").read_text())
                    for f in ("alone", "together"))
            assert b["test_accuracy_per_step"] == a["test_accuracy_per_step"]  # the same run, trained in a worker
            assert b["calibrated"] == a["calibrated"] and b["train_threads"] == 1
    one, two = (json.loads((tmp_path / f / "summary.json").read_text())["variants"]["tet+rcs"]["paired_diff"]
                for f in ("alone", "together"))
    assert two["final_accuracy"] == one["final_accuracy"]
    # runs --reuse copies are not counted as trained
    assert cli(["ablate", str(cfg), "--variants", "tet", "--seeds", "0,1,2", "--set", "train.epochs=1", "--out",
                str(tmp_path / "more"), "--reuse", str(tmp_path / "together"), "--jobs", "2"]) == 0
    text = capfd.readouterr().out
    assert "training 1 run (2 more to copy or analyse) 2 at a time" in text
    assert "[1/3] tet seed 0: copied from" in text and "[3/3] tet seed 2: training ->" in text
    assert "[1/3] tet seed 0: finished earlier" in text and "[3/3] tet seed 2: trained above, collected" in text
    # a run that fails in its worker stops the ablation with its name and traceback; the others are kept
    bad = tmp_path / "together" / "tet+rcs" / "seed1"
    (bad / "metrics.json").unlink()
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert cli(["ablate", "--out", str(tmp_path / "together"), "--jobs", "2"]) == 2
    captured = capfd.readouterr()
    assert "training 1 run 1 at a time" in captured.out
    assert "[4/4] tet+rcs seed 1 failed in its worker process" in captured.err and "Traceback" in captured.err
