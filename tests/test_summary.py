"""docs/results/summary.csv, the figures behind the at-a-glance plot of docs/results.md: each must be in the section
of docs/results.md that its row names, so the plot cannot drift from the evidence it summarises."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"


def _summary():
    spec = importlib.util.spec_from_file_location("summary", ROOT / "docs" / "results" / "summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sections() -> dict[str, str]:
    """Heading text -> the text under it, up to the next heading (bold markers removed)."""
    out, head, body = {}, None, []
    for line in RESULTS.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            if head is not None:
                out[head] = "\n".join(body)
            head, body = line.lstrip("#").strip(), []
        else:
            body.append(line.replace("**", ""))
    out[head] = "\n".join(body)
    return out


def _section(sections: dict, name: str) -> str:
    exact = [h for h in sections if h == name]
    found = exact or [h for h in sections if h.startswith(name)]
    assert len(found) == 1, f"summary.csv names section {name!r}, which matches {len(found)} headings: {found}"
    return sections[found[0]]


def test_every_figure_is_in_the_section_it_names():
    mod, sections = _summary(), _sections()
    rows = mod.load()
    assert len(rows) >= 60
    for row in rows:
        text = _section(sections, row["section"])
        if row["std"]:
            pattern = re.escape(row["value"]) + r"(?: pt)? ± " + re.escape(row["std"])
        else:
            pattern = (re.escape(row["value"]) + r"(?: pt| steps)?,? \[" + re.escape(row["lo"]) + ", "
                       + re.escape(row["hi"]) + r"\]")
        assert re.search(pattern, text), (f"{row['method']} vs {row['baseline']} on {row['dataset']} "
                                          f"({row['metric']}): {pattern!r} not in section {row['section']!r}")


def test_intervals_from_a_standard_deviation_match_the_published_ones():
    mod = _summary()
    # results.md's Fashion-MNIST T = 1 table gives g12 − lif-t1 as −3.27 ± 0.11 over 3 seeds, interval [−3.55, −3.00]
    row = next(r for r in mod.load() if r["method"].startswith("T = 1") and r["dataset"] == "Fashion-MNIST")
    assert row["mean"] == pytest.approx(-3.27)
    assert row["low"] == pytest.approx(-3.55, abs=0.015) and row["high"] == pytest.approx(-3.00, abs=0.015)
    from fewstep.ablation_report import t95

    assert t95(2) == pytest.approx(4.303, abs=1e-3)
    # sign = -1 turns "lif-t1 is 13.25 pt ahead, [+12.38, +14.12]" into the method's −13.25, [−14.12, −12.38]
    cifar = next(r for r in mod.load() if r["method"].startswith("T = 1") and r["dataset"] == "CIFAR-10")
    assert cifar["mean"] == pytest.approx(-13.25)
    assert cifar["low"] == pytest.approx(-14.12) and cifar["high"] == pytest.approx(-12.38)
    # the digits' RCS-ANN final accuracy is given as +0.35 ± 0.95 over 8 seeds: ± 0.95 · t(7) / √8 = ± 0.79
    digits = next(r for r in mod.load() if r["method"] == "RCS-ANN" and r["dataset"].startswith("8×8")
                  and r["metric"] == "final")
    assert digits["low"] == pytest.approx(0.35 - 0.794, abs=2e-3)
    assert digits["high"] == pytest.approx(0.35 + 0.794, abs=2e-3)


def test_pooling_a_published_summary_with_fresh_seeds_equals_pooling_the_seeds():
    """The six-seed figures of docs/results.md pool a published three-seed mean and interval with fresh seeds:
    the same mean and interval as computing over all six seeds' values."""
    import statistics

    from fewstep.ablation_report import ci95

    mod = _summary()
    old, new = [-0.6, -0.2, -0.43], [-0.6, 0.07, 0.03]
    m, s = statistics.mean(old), statistics.stdev(old)
    got = mod.pooled((m, *ci95(m, s, 3)), 3, new)
    every = old + new
    want = [statistics.mean(every), *ci95(statistics.mean(every), statistics.stdev(every), 6)]
    assert got == pytest.approx(want, abs=1e-9)


def test_a_row_whose_mean_lies_outside_its_interval_is_refused(tmp_path):
    mod = _summary()
    bad = tmp_path / "summary.csv"
    bad.write_text("method,baseline,dataset,T,epochs,seeds,metric,value,std,lo,hi,sign,section\n"
                   "RCS,TET,CIFAR-10,4,3,5,t1,+0.70,,−0.59,+0.26,1,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="outside"):
        mod.load(bad)


def test_a_bound_printed_as_minus_zero_counts_as_below_zero(tmp_path):
    """An interval [−0.46, −0.00] excludes 0 (its upper end was a value in (−0.005, 0) before rounding): drawn red,
    as its section bolds it; [−0.46, +0.00] may touch 0 and stays grey."""
    mod = _summary()
    assert mod.below_zero(-0.0) and mod.below_zero(-0.3) and not mod.below_zero(0.0) and not mod.below_zero(0.2)
    f = tmp_path / "summary.csv"
    f.write_text("method,baseline,dataset,T,epochs,seeds,metric,value,std,lo,hi,sign,section\n"
                 "TRT,TET,Fashion-MNIST,4,4,9,t1,−0.23,,−0.46,−0.00,1,x\n"
                 "RCS,TET,Fashion-MNIST,4,4,9,t1,−0.23,,−0.46,+0.00,1,x\n", encoding="utf-8")
    minus, plus = mod.load(f)
    assert mod.below_zero(minus["high"]) and not mod.below_zero(plus["high"])


def test_the_plot_draws(tmp_path):
    mod = _summary()
    out = mod.draw(mod.load(), tmp_path / "summary.png")
    assert out.stat().st_size > 20_000


def test_one_figure_per_cell_and_a_thinner_figure_names_its_seeds(tmp_path, monkeypatch):
    """A line of the plot is a method, baseline, dataset, T and epochs; two rows for one of its cells are refused,
    and a figure over fewer seeds than the line's label is drawn with its own count beside it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.axes

    mod = _summary()
    head = "method,baseline,dataset,T,epochs,seeds,metric,value,std,lo,hi,sign,section\n"
    rows = ("TRT,TET,Fashion-MNIST,4,4,6,t1,−0.29,,−0.60,+0.03,1,x\n"
            "TRT,TET,Fashion-MNIST,4,4,3,steps,−0.01,,−0.02,+0.00,1,x\n")
    path = tmp_path / "summary.csv"
    path.write_text(head + rows, encoding="utf-8")
    notes, real = [], matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", lambda self, text, *a, **k: notes.append(text)
                        or real(self, text, *a, **k))
    mod.draw(mod.load(path), tmp_path / "a.png")
    assert notes == ["3 seeds"]
    path.write_text(head + rows + "TRT,TET,Fashion-MNIST,4,4,3,t1,−0.17,,−1.10,+0.77,1,x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="two rows for TRT / TET / Fashion-MNIST / 4 / 4 \\(t1\\)"):
        mod.draw(mod.load(path), tmp_path / "b.png")


def test_pooling_reads_a_paired_key_or_a_ratio_against_the_fixed_T_from_an_ablation_summary(tmp_path):
    """``summary.py --pool DIR --key KEY``: the seed-by-seed values of a paired difference (accuracies in pt) or of an
    exit against the variant's own fixed T, not the first variant's zeros paired with itself."""
    mod = _summary()
    per_seed = {"values": [1.5, 1.25]}
    summary = {"variants": {
        "qcfs": {"paired_diff": {"acc_t1": {"values": [0.0, 0.0]}, "softmax@0.006:vs_fixed": {"values": [0.0, 0.0]}},
                 "vs_fixed": {"softmax@0.006:vs_fixed": per_seed}},
        "qcfs+rcs_ann": {"paired_diff": {"acc_t1": {"values": [0.02, -0.01]},
                                         "softmax@0.006:matched_steps_saved": {"values": [3.0, -1.0]}}}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert mod.fresh_values(tmp_path, "qcfs", "softmax@0.006:vs_fixed") == [1.5, 1.25]
    assert mod.fresh_values(tmp_path, "qcfs+rcs_ann", "acc_t1") == pytest.approx([2.0, -1.0])
    assert mod.fresh_values(tmp_path, "qcfs+rcs_ann", "softmax@0.006:matched_steps_saved") == [3.0, -1.0]
    with pytest.raises(KeyError, match="no 'final_accuracy' for 'qcfs\\+rcs_ann'"):
        mod.fresh_values(tmp_path, "qcfs+rcs_ann", "final_accuracy")


def _ablation(folder: Path, seeds: list[int], t1: list[float], *, dataset="fashion_mnist", baseline="ce") -> Path:
    """A minimal ablation folder: its ``summary.json`` as ``fewstep ablate`` writes it (the keys pooling reads)."""
    folder.mkdir(parents=True)
    base = {"data": {"name": dataset, "T": 4}, "model": {"name": "cnn"}, "train": {"epochs": 4}}
    summary = {"spec": {"command": f"fewstep ablate ... --seeds {seeds}", "base": base}, "baseline": baseline,
               "variants": {
                   baseline: {"seeds": seeds, "T": 4, "paired_diff": {"acc_t1": {"values": [0.0] * len(seeds)}},
                              "vs_fixed": {"softmax@0.006:vs_fixed": {"values": [1.5] * len(seeds)}}},
                   "tet": {"seeds": seeds, "T": 4, "paired_diff": {
                       "acc_t1": {"values": t1},
                       "images_per_s": {"values": [123.0] * len(seeds)},  # machine noise: not kept
                       "softmax@0.006:matched_steps_saved": {"values": [0.25] * len(seeds)}}}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_kept_seed_values_pool_exactly_with_fresh_seeds(tmp_path):
    """``summary.py --keep DIR`` saves an ablation's seed-by-seed paired values (the run folders stay out of the
    repository); ``--pool DIR --with FILE`` then pools later seeds with them exactly: the mean, the interval and the
    seeds ahead / level / behind are those of all the seeds' values together."""
    from fewstep.ablation_report import ci95

    mod = _summary()
    old = _ablation(tmp_path / "abl-old", [0, 1, 2], [0.01, -0.005, 0.0])
    kept = mod.keep(old, tmp_path / "seeds")
    assert kept == tmp_path / "seeds" / "abl-old.json"
    data = json.loads(kept.read_text())
    assert data["dataset"] == "fashion_mnist" and data["baseline"] == "ce" and data["epochs"] == 4
    assert set(data["variants"]["tet"]["paired_diff"]) == {"acc_t1", "softmax@0.006:matched_steps_saved"}
    assert "paired_diff" not in data["variants"]["ce"]  # the baseline against itself: zeros, not kept
    assert mod.fresh_values(kept, "tet", "acc_t1") == pytest.approx(mod.fresh_values(old, "tet", "acc_t1"))
    assert mod.fresh_values(kept, "ce", "softmax@0.006:vs_fixed") == [1.5, 1.5, 1.5]

    new = _ablation(tmp_path / "abl-new", [3, 4], [0.02, 0.015])
    r = mod.pooled_exactly([kept, new], "tet", "acc_t1")
    values = [1.0, -0.5, 0.0, 2.0, 1.5]
    mean = sum(values) / 5
    std = (sum((v - mean) ** 2 for v in values) / 4) ** 0.5
    assert r["n"] == 5 and r["seeds"] == [0, 1, 2, 3, 4]
    assert r["mean"] == pytest.approx(mean)
    assert (r["lo"], r["hi"]) == pytest.approx(ci95(mean, std, 5))
    assert (r["ahead"], r["level"], r["behind"]) == (3, 1, 1)
    # the recovered-from-an-interval pooling of --published agrees with the exact one when the interval is exact
    lo3, hi3 = ci95(sum(values[:3]) / 3, (sum((v - sum(values[:3]) / 3) ** 2 for v in values[:3]) / 2) ** 0.5, 3)
    assert mod.pooled((sum(values[:3]) / 3, lo3, hi3), 3, values[3:]) == pytest.approx([r["mean"], r["lo"], r["hi"]])


def test_pooling_refuses_a_seed_twice_another_setting_or_the_baseline_against_itself(tmp_path):
    mod = _summary()
    kept = mod.keep(_ablation(tmp_path / "abl-a", [0, 1], [0.01, 0.02]), tmp_path / "seeds")
    with pytest.raises(ValueError, match="seed 1 of 'tet' is in both"):
        mod.pooled_exactly([kept, _ablation(tmp_path / "abl-b", [1, 2], [0.0, 0.01])], "tet", "acc_t1")
    with pytest.raises(ValueError, match="'dataset': 'cifar10'.*same setting only"):
        mod.pooled_exactly([kept, _ablation(tmp_path / "abl-c", [5], [0.01], dataset="cifar10")], "tet", "acc_t1")
    with pytest.raises(ValueError, match="'baseline': 'tebn'.*same setting only"):
        other = _ablation(tmp_path / "abl-d", [6], [0.01], baseline="tebn")
        mod.pooled_exactly([kept, other], "tet", "acc_t1")
    with pytest.raises(KeyError, match="'ce' is that ablation's baseline, paired with itself"):
        mod.fresh_values(kept, "ce", "acc_t1")
    with pytest.raises(KeyError, match="has no variant 'tet\\+rcs'"):
        mod.fresh_values(kept, "tet+rcs", "acc_t1")


def test_the_kept_seed_files_of_docs_results_name_their_ablation_and_seeds():
    """Each ``docs/results/seeds/*.json`` is what ``--keep`` wrote for an ablation docs/results.md reports: it names
    the command that trained it, the setting, and for every variant its seeds, with one value per seed."""
    files = sorted((ROOT / "docs" / "results" / "seeds").glob("*.json"))
    assert files, "no kept seed files"
    text = RESULTS.read_text(encoding="utf-8")
    for f in files:
        data = json.loads(f.read_text())
        assert data["ablation"] == f.stem and f"runs/{f.stem}" in text, f.name
        assert data["command"].startswith("fewstep ablate") and data["dataset"] and data["baseline"], f.name
        for name, v in data["variants"].items():
            for table in ("paired_diff", "vs_fixed"):
                for key, s in v.get(table, {}).items():
                    assert len(s["values"]) == len(v["seeds"]), (f.name, name, key)


def test_exact_pooling_counts_a_ratio_against_the_fixed_T_from_1(tmp_path):
    """A ``vs_fixed`` ratio is ahead above 1, not above 0: 0.8× the fixed T's steps saving is behind."""
    mod = _summary()
    folder = _ablation(tmp_path / "abl-r", [0, 1], [0.01, 0.02])
    summary = json.loads((folder / "summary.json").read_text())
    summary["variants"]["ce"]["vs_fixed"]["softmax@0.006:vs_fixed"]["values"] = [1.25, 0.8]
    (folder / "summary.json").write_text(json.dumps(summary))
    r = mod.pooled_exactly([folder], "ce", "softmax@0.006:vs_fixed")
    assert (r["ahead"], r["level"], r["behind"]) == (1, 0, 1)
