"""Draw ``fmnist_general12_budget.png``: does the T = 1 general SNN catch the T = 1 LIF network with more epochs?

Left: validation accuracy after every epoch of the 20-epoch Fashion-MNIST ablation (mean and the band of ± one
standard deviation over seeds). Right: the paired test-accuracy gap (general network − LIF, same seed) with its 95 %
interval over seeds at each training budget measured: 4 and 10 epochs from the sections of ``docs/results.md`` that
report them (their run folders are not kept), 20 epochs from the ablation folder given. Run::

    python docs/results/general12_budget.py runs/abl-fmnist-t1-20ep
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# Budgets measured earlier (docs/results.md, "Fashion-MNIST, T = 1" and "The config's full 10 epochs"):
# epochs: (mean, lo, hi, seeds) of the paired test gap g12 − lif-t1 in points.
EARLIER = {4: (-3.27, -3.55, -3.00, 3), 10: (-1.54, -2.00, -1.09, 5)}


def main(folder: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(folder)
    summary = json.loads((root / "summary.json").read_text())  # written by `fewstep ablate`, paired with lif-t1
    variants = summary["variants"]
    seeds = variants["g12"]["seeds"]
    curves = {v: 100 * np.array([e["values"] for e in variants[v]["val_per_epoch"]]).T for v in ("lif-t1", "g12")}
    gap = variants["g12"]["paired_diff"]["final_accuracy"]  # g12 − lif-t1, same seed, with its 95 % interval
    mean, (lo, hi) = 100 * gap["mean"], (100 * x for x in gap["ci95"])
    budgets = {**EARLIER, curves["g12"].shape[1]: (mean, lo, hi, len(seeds))}

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    epochs = np.arange(1, curves["g12"].shape[1] + 1)
    for v, label, colour in (("lif-t1", "T = 1 LIF cnn", "tab:blue"),
                             ("g12", "T = 1 general SNN (g12)", "tab:orange")):
        m, s = curves[v].mean(0), curves[v].std(0, ddof=1)
        ax1.plot(epochs, m, color=colour, label=label)
        ax1.fill_between(epochs, m - s, m + s, color=colour, alpha=0.2)
    ax1.set_xlabel("epoch (cosine schedule over 20)")
    ax1.set_ylabel("validation accuracy (%)")
    ax1.set_title(f"Fashion-MNIST, 20 epochs, {len(seeds)} paired seeds")
    ax1.set_xticks(epochs[::2])
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right")

    xs = sorted(budgets)
    for x in xs:
        m, l, h, n = budgets[x]
        ax2.errorbar([x], [m], yerr=[[m - l], [h - m]], fmt="o", color="tab:orange", capsize=4)
        ax2.annotate(f"{m:+.2f} pt\n[{l:+.2f}, {h:+.2f}]\n{n} seeds", (x, m), textcoords="offset points",
                     xytext=(10, -8), fontsize=8)
    ax2.axhline(0, color="grey", lw=0.8)
    ax2.axhline(2, color="tab:green", lw=0.8, ls="--")
    ax2.text(xs[0], 2.1, "issue 11's target: ≥ 2 pt above LIF", fontsize=8, color="tab:green", va="bottom")
    ax2.set_xticks(xs)
    ax2.set_xlim(0, xs[-1] + 6)
    ax2.set_ylim(-4.5, 3)
    ax2.set_xlabel("training budget (epochs; each its own cosine schedule)")
    ax2.set_ylabel("test accuracy, g12 − LIF (pt, paired)")
    ax2.set_title("the gap at each budget, 95 % interval over seeds")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    out = HERE / "fmnist_general12_budget.png"
    fig.savefig(out, dpi=110)
    print(f"{out}: seeds {seeds}, gap at {xs[-1]} epochs {mean:+.2f} [{lo:+.2f}, {hi:+.2f}]")
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/abl-fmnist-t1-20ep")
