"""Calibrating to a target with a guarantee: does the bound hold on test, and what does a step cap chosen for it save?

`fewstep cutoff --max-drop D --confidence C` picks the fastest setting whose upper confidence bound on the accuracy
drop (or, with `--bound harm`, on the share of samples harmed) is within D, on validation data only
(`fewstep.calibration.calibrate_to_target`); `--max-step auto` chooses a
step cap as well, on one half of validation, and tests the bound on the other. For each run folder (an SNN, or a
QCFS ANN converted on the fly to `--convert-T` steps) this computes the running logits of the validation and test
splits once, then for every policy and drop: the bounded setting with no cap, with `max_step="auto"`, and the
bounded fixed T (the `timestep` policy under the same bound: what a user without a cutoff would run), each read on
test (mean exit step, the drop from full-T accuracy, whether it stays within D). The same calibrations as `fewstep
ablate`'s "bounded" exits (`fewstep.ablation_analysis.bounded_exits`), for any run folder, with a per-run plot.
Exits are `cutoff.simulate`'s on the full-length outputs, which the real early-exit runner matches sample for sample
(tests/test_anytime.py); the wall-clock of the real runner is `fewstep cutoff`'s job.

    python bench/target_calibration.py --runs runs/abl-cifar-qcfs4/qcfs/seed{0,1,2,3} --convert-T 64 \\
        --out runs/target-calibration-cifar.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fewstep import anytime as at  # noqa: E402
from fewstep import cutoff as cf  # noqa: E402
from fewstep.ablation_analysis import bounded_exits  # noqa: E402
from fewstep.metrics import predict  # noqa: E402
from fewstep.qcfs import convert_run  # noqa: E402
from fewstep.runfolder import load_run  # noqa: E402


def outputs(run: Path, convert_T: int | None):
    """Running logits and labels of the validation and test splits of ``run`` (converted first if asked)."""
    with tempfile.TemporaryDirectory() as tmp:
        if convert_T:
            convert_run(run, Path(tmp) / "snn", T=convert_T, log=lambda *_: None)
            run = Path(tmp) / "snn"
        model, cfg, bundle = load_run(run)
        T, bs = cfg.data.T, cfg.train.eval_batch_size
        Yv, yv = at.calibration_outputs(model, bundle.val, T, bundle.kind, cfg.data.encoding, bs)
        O, y, _ = predict(model, bundle.test, T, bundle.kind, cfg.data.encoding, bs)
    return Yv, yv, cf.running(O), y


def measure(Yv, yv, Y, y, policies: list[str], drops: list[float], confidence: float,
            bound: str = "drop") -> list[dict]:
    """One row per (drop, rule): the bounded fixed T, and each policy bounded without and with the auto cap
    (:func:`fewstep.ablation_analysis.bounded_exits`, which `fewstep ablate` reports too), read on test."""
    rows = []
    b = bounded_exits(Yv, yv, Y, y, confidence, drops, policies, bound=bound)
    for drop in drops:
        for rule in ["timestep"] + [p + c for p in policies for c in ("", "+cap")]:
            r = b[rule][str(drop)]
            rows.append({"policy": rule.removesuffix("+cap"), "max_drop": drop,
                         "cap": "auto" if rule.endswith("+cap") else None, "setting": r["setting"],
                         "max_step": r["max_step"], "bound": r["bound"], "val_mean_exit_step": r["val_mean_exit_step"],
                         "n_test_val": r["n_tested"], "mean_exit_step": r["mean_exit_step"],
                         "accuracy": r["test_accuracy"], "drop": r["test_drop"], "within": r["test_drop"] <= drop,
                         "ran_to_T": r["ran_to_T"]})
    return rows


def plot(rows, drops, policies, confidence, path) -> None:
    """Mean exit step of every bounded setting, one dot per run and a bar for the mean, per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("timestep", None)] + [(p, c) for p in policies for c in (None, "auto")]
    label = {None: "", "auto": "\n+ auto cap"}
    fig, axes = plt.subplots(1, len(drops), figsize=(4.2 * len(drops), 3.6), sharey=True, squeeze=False)
    for ax, drop in zip(axes[0], drops):
        for j, key in enumerate(keys):
            v = [r["mean_exit_step"] for r in rows if (r["policy"], r["cap"]) == key and r["max_drop"] == drop]
            ax.bar(j, statistics.mean(v), color="0.75" if key[0] == "timestep" else f"C{policies.index(key[0])}",
                   alpha=0.55 if key[1] is None else 0.9)
            ax.plot([j] * len(v), v, "k.", ms=5)
        ax.set_xticks(range(len(keys)), ["fixed T"] + [f"{p}{label[c]}" for p, c in keys[1:]], fontsize=8)
        ax.set_title(f"target: drop ≤ {100 * drop:g} pt at {100 * confidence:.0f} % confidence", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("mean exit step on test")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", default=[], help="run folders (one per seed)")
    ap.add_argument("--convert-T", type=int, default=None, help="convert each QCFS ANN run to this many steps first")
    ap.add_argument("--drops", default="0.006,0.01", help="targets, as fractions (default 0.6 and 1 pt)")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--bound", choices=["drop", "harm"], default="drop",
                    help="what is bounded (fewstep cutoff --bound; the figures of 2026-12-05 and before: harm)")
    ap.add_argument("--policies", default="softmax,topk")
    ap.add_argument("--out", default="runs/target_calibration.json")
    ap.add_argument("--plot", help="also draw each setting's mean exit step per run (PNG)")
    ap.add_argument("--from-json", action="store_true", help="report (and plot) the rows of an earlier --out")
    a = ap.parse_args(argv)
    drops = [float(x) for x in a.drops.split(",")]
    if a.from_json:
        saved = json.loads(Path(a.out).read_text())
        rows, a.bound = saved["rows"], saved.get("bound", "harm")  # (files without the key were made with harm)
    elif not a.runs:
        ap.error("give --runs (or --from-json to report an earlier --out)")
    else:
        rows = []
        for run in map(Path, a.runs):
            t0 = time.perf_counter()
            Yv, yv, Y, y = outputs(run, a.convert_T)
            rows += [{"run": str(run), **r}
                     for r in measure(Yv, yv, Y, y, a.policies.split(","), drops, a.confidence, a.bound)]
            print(f"{run}: outputs and calibrations in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"confidence": a.confidence, "bound": a.bound, "rows": rows}, indent=2))
    if a.plot:
        plot(rows, drops, a.policies.split(","), a.confidence, a.plot)
    on = "the share of samples harmed" if a.bound == "harm" else "the drop"
    print(f"bounded ({on}) at {100 * a.confidence:.0f} % confidence on validation; read on test; mean ± std over "
          f"{len({r['run'] for r in rows})} runs (per run in {a.out})\n")
    print("| d | policy | cap | mean exit | fixed T's steps / exit's | test drop (pt) | within d | ran to T |")
    print("|---|---|---|---|---|---|---|---|")
    ms = lambda v: f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"  # noqa
    for drop in drops:
        fixed = {r["run"]: r["mean_exit_step"] for r in rows if r["policy"] == "timestep" and r["max_drop"] == drop}
        for key in [("timestep", None)] + [(p, c) for p in a.policies.split(",") for c in (None, "auto")]:
            sel = [r for r in rows if (r["policy"], r["cap"]) == key and r["max_drop"] == drop]
            caps = [r["max_step"] for r in sel]
            cap = "–" if key[1] is None else ", ".join("none" if k is None else str(k) for k in caps)
            print(f"| {100 * drop:g} pt | {'fixed T' if key[0] == 'timestep' else key[0]} | {cap} | "
                  f"{ms([r['mean_exit_step'] for r in sel])} | "
                  f"{ms([fixed[r['run']] / r['mean_exit_step'] for r in sel])}× | "
                  f"{ms([100 * r['drop'] for r in sel])} | {sum(r['within'] for r in sel)}/{len(sel)} | "
                  f"{ms([100 * r['ran_to_T'] for r in sel])} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
