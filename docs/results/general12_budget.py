"""Draw ``fmnist_general12_budget.png``: does the T = 1 general SNN catch the T = 1 LIF network with more epochs?

Left: validation accuracy after every epoch of the 20-epoch Fashion-MNIST ablation (mean and the band of ± one
standard deviation over seeds). Right: the paired test-accuracy gap (general network − LIF, same seed) with its 95 %
interval over seeds at each training budget measured: the ablation folder's own budget from its ``summary.json``,
the others (4 and 10 epochs, whose run folders are not kept) from ``summary.csv`` beside this file. Given a second ablation
folder, one that pairs with the T = 4 TET network (``tet`` its baseline), its validation curve joins the left panel
and the gap to it (general network − T = 4 at T, issue 11's second target) the right. Run::

    python docs/results/general12_budget.py runs/abl-fmnist-t1-20ep runs/abl-fmnist-t1-20ep-t4
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import summary as _at_a_glance  # noqa: E402  (summary.csv: the figures of docs/results.md, checked against its text)


def _summary(folder: str, baseline: str) -> dict:
    """An ablation's ``summary.json`` (written by ``fewstep ablate``), which must pair its variants with ``baseline``."""
    out = json.loads((Path(folder) / "summary.json").read_text())
    if out["baseline"] != baseline:
        raise ValueError(f"{folder}: its ablation pairs with {out['baseline']!r}; this figure needs one that pairs "
                         f"with {baseline!r}")
    return out


def _budgets(baseline: str) -> dict:
    """Every budget summary.csv holds for g12 against ``baseline`` on Fashion-MNIST: epochs -> (mean, lo, hi, seeds)
    of the paired final test-accuracy gap, in points."""
    return {int(r["epochs"]): (r["mean"], r["low"], r["high"], int(r["seeds"])) for r in _at_a_glance.load()
            if r["method"] == "T = 1 general SNN" and r["baseline"] == baseline and r["dataset"] == "Fashion-MNIST"
            and r["metric"] == "final"}


def _gap(variant: dict) -> tuple:
    """(mean, lo, hi, seeds) of a variant's paired final-accuracy difference to its ablation's baseline, in points."""
    gap = variant["paired_diff"]["final_accuracy"]
    lo, hi = (100 * x for x in gap["ci95"])
    return 100 * gap["mean"], lo, hi, len(variant["seeds"])


def _val_curves(variant: dict) -> np.ndarray:
    """Validation accuracy (%), [seeds, epochs]."""
    return 100 * np.array([e["values"] for e in variant["val_per_epoch"]]).T


def main(folder: str, t4_folder: "str | None" = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = _summary(folder, "lif-t1")["variants"]
    seeds = variants["g12"]["seeds"]
    curves = {v: _val_curves(variants[v]) for v in ("lif-t1", "g12")}
    n_epochs = curves["g12"].shape[1]
    budgets = {**_budgets("T = 1 LIF"), n_epochs: _gap(variants["g12"])}  # g12 − lif-t1, same seed
    budgets_t4 = {}
    if t4_folder:
        t4 = _summary(t4_folder, "tet")["variants"]
        curves["tet"] = _val_curves(t4["tet"])
        budgets_t4 = {**_budgets("T = 4 TET"), n_epochs: _gap(t4["g12"])}

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    epochs = np.arange(1, n_epochs + 1)
    for v, label, colour, ls in (("tet", "T = 4 TET cnn (at T)", "tab:grey", "--"),
                                 ("lif-t1", "T = 1 LIF cnn", "tab:blue", "-"),
                                 ("g12", "T = 1 general SNN (g12)", "tab:orange", "-")):
        if v not in curves:
            continue
        m, s = curves[v].mean(0), curves[v].std(0, ddof=1)
        ax1.plot(epochs, m, color=colour, ls=ls, label=label)
        ax1.fill_between(epochs, m - s, m + s, color=colour, alpha=0.2)
    ax1.set_xlabel("epoch (cosine schedule over 20)")
    ax1.set_ylabel("validation accuracy (%)")
    ax1.set_title(f"Fashion-MNIST, 20 epochs, {len(seeds)} paired seeds")
    ax1.set_xticks(epochs[::2])
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right")

    xs = sorted(budgets)
    for series, colour, marker, label, dx in ((budgets, "tab:orange", "o", "g12 − T = 1 LIF", 10),
                                              (budgets_t4, "tab:grey", "s", "g12 − T = 4 TET (at T)", -64)):
        for i, x in enumerate(sorted(series)):
            m, l, h, n = series[x]
            ax2.errorbar([x], [m], yerr=[[m - l], [h - m]], fmt=marker, color=colour, capsize=4,
                         label=label if i == 0 else None)
            ax2.annotate(f"{m:+.2f} pt\n[{l:+.2f}, {h:+.2f}]\n{n} seeds", (x, m), textcoords="offset points",
                         xytext=(dx, -8), fontsize=8, color="black" if colour == "tab:orange" else "dimgrey")
    ax2.axhline(0, color="grey", lw=0.8)
    ax2.axhline(2, color="tab:green", lw=0.8, ls="--")
    ax2.text(xs[0], 2.1, "issue 11's target: ≥ 2 pt above LIF", fontsize=8, color="tab:green", va="bottom")
    if budgets_t4:
        ax2.axhline(-1, color="tab:green", lw=0.8, ls=":")
        ax2.text(xs[0], -0.9, "and within 1 pt of T = 4", fontsize=8, color="tab:green", va="bottom")
        ax2.legend(loc="lower right", fontsize=8)
    ax2.set_xticks(xs)
    ax2.set_xlim(0, xs[-1] + 6)
    ax2.set_ylim(-4.5, 3)
    ax2.set_xlabel("training budget (epochs; each its own cosine schedule)")
    ax2.set_ylabel("test accuracy, g12 − " + ("reference" if budgets_t4 else "LIF") + " (pt, paired)")
    ax2.set_title("the gap at each budget, 95 % interval over seeds")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = HERE / "fmnist_general12_budget.png"
    fig.savefig(out, dpi=110)
    mean, lo, hi, _ = budgets[n_epochs]
    print(f"{out}: seeds {seeds}, gap at {n_epochs} epochs {mean:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    return out


if __name__ == "__main__":
    main(*(sys.argv[1:3] or ["runs/abl-fmnist-t1-20ep"]))
