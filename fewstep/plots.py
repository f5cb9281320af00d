"""Matplotlib figures (PNG), drawn off-screen."""

from __future__ import annotations

import math
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _plt().close(fig)
    return Path(path)


def _style(ax, xlabel: str, ylabel: str, title: str, legend_loc: str = "best", title_size=None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=title_size)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc=legend_loc)


def accuracy_per_step(curves: dict[str, list[float]], path, title: str = "Accuracy per timestep") -> Path:
    """One line per curve (e.g. ``{"test": [...], "val": [...]}``), t = 1..T on the x axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for name, acc in curves.items():
        t = list(range(1, len(acc) + 1))
        ax.plot(t, [100 * a for a in acc], marker="o", label=name)
    lo = min(min(a) for a in curves.values()) * 100
    ax.set_ylim(max(0.0, min(lo - 2.0, 90.0)), 100.5)  # never magnify sub-point noise into a cliff
    ax.set_xlabel("timestep t (prediction = argmax of running mean)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def tradeoff(policies: dict[str, list[dict]], oct_point: dict, full_accuracy: float, T: int, path,
             title: str = "Accuracy vs average latency") -> Path:
    """Accuracy vs mean exit step for each policy's threshold sweep, the OCT oracle and full T."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.2, 4.0), dpi=120)
    styles = {"timestep": dict(marker="s", ls="--", color="gray", label="fixed T (timestep)")}
    for name, pts in policies.items():
        pts = sorted(pts, key=lambda p: p["mean_exit_step"])
        kw = styles.get(name, dict(marker="o", ls="-", label=name))
        ax.plot([p["mean_exit_step"] for p in pts], [100 * p["accuracy"] for p in pts], ms=4, **kw)
    ax.axhline(100 * full_accuracy, color="black", lw=0.8, ls=":", label=f"full T = {T}")
    ax.plot([oct_point["mean_exit_step"]], [100 * oct_point["accuracy"]], marker="*", ms=14, color="crimson",
            ls="none", label="OCT oracle")
    lo = min(100 * p["accuracy"] for pts in policies.values() for p in pts)
    ax.set_ylim(max(0.0, lo - 2), 100.5)
    ax.set_xlim(0.8, T + 0.2)
    _style(ax, "average latency (mean exit step)", "accuracy (%)", title, "lower right")
    return _save(fig, path)


def exit_histogram(exit_steps, T: int, path, title: str = "Exit steps", correct=None) -> Path:
    """Samples per exit step; with ``correct`` (per sample), each bar split into right and wrong answers."""
    plt = _plt()
    import numpy as np

    steps = np.asarray(exit_steps) - 1
    counts = np.bincount(steps, minlength=T)[:T]
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=120)
    if correct is None:
        ax.bar(range(1, T + 1), counts, color="tab:blue")
    else:
        ok = np.bincount(steps[np.asarray(correct, bool)], minlength=T)[:T]
        ax.bar(range(1, T + 1), ok, color="tab:blue", label="right")
        ax.bar(range(1, T + 1), counts - ok, bottom=ok, color="tab:red", label="wrong")
        ax.legend(frameon=False)
    ax.set_xlabel("exit step")
    ax.set_ylabel("samples")
    ax.set_xticks(range(1, T + 1) if T <= 16 else np.unique(np.linspace(1, T, 9).round().astype(int)))
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _colors(n: int):
    plt = _plt()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(n)]


def ablation_accuracy(curves: dict[str, list[dict]], path, title: str,
                      xlabel: str = "timestep t (prediction = argmax of running mean)",
                      ylabel: str = "test accuracy (%)", log_x: bool = True) -> Path:
    """Mean accuracy per timestep (or per epoch) with a ±std band, one line per variant (``{"mean", "std"}``
    per point; a point without a mean is left out). Beyond 16 points the x axis is logarithmic with ``log_x``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.0, 3.8), dpi=120)
    lo = 100.0
    for (name, pts), color in zip(curves.items(), _colors(len(curves))):
        t = [i for i, p in enumerate(pts, 1) if p.get("mean") is not None]
        if not t:
            continue
        m = [100 * pts[i - 1]["mean"] for i in t]
        s = [100 * (pts[i - 1]["std"] or 0.0) for i in t]
        ax.plot(t, m, marker="o" if len(pts) <= 16 else None, color=color, label=name)
        ax.fill_between(t, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=color, alpha=0.18)
        lo = min(lo, min(a - b for a, b in zip(m, s)))
    ax.set_ylim(max(0.0, lo - 2.0), min(100.5, max(ax.get_ylim()[1], lo + 5)))
    T = max(len(p) for p in curves.values())
    if T <= 16:
        ax.set_xticks(range(1, T + 1))
    elif log_x:  # long runs (converted networks): log scale, ticks at powers of two
        ax.set_xscale("log", base=2)
        ticks = [2 ** i for i in range(T.bit_length()) if 2 ** i <= T]
        ax.set_xticks(ticks, [str(k) for k in ticks])
    _style(ax, xlabel, ylabel, title, title_size=10)
    return _save(fig, path)


def ablation_tradeoff(curves: dict[str, dict[str, list[dict]]], oct_points: dict[str, dict], path) -> Path:
    """Accuracy vs mean exit step for each variant (mean over seeds), one panel per policy, OCT as stars."""
    plt = _plt()
    policies = list(next(iter(curves.values())))
    fig, axes = plt.subplots(1, len(policies), figsize=(5.2 * len(policies), 3.9), dpi=120, squeeze=False)
    colors = dict(zip(curves, _colors(len(curves))))
    for ax, pol in zip(axes[0], policies):
        lo = 100.0
        for v, c in curves.items():
            pts = sorted(c[pol], key=lambda p: p["mean_exit_step"])
            ax.plot([p["mean_exit_step"] for p in pts], [100 * p["accuracy"] for p in pts], marker="o", ms=3,
                    color=colors[v], label=v)
            o = oct_points[v]
            ax.plot([o["mean_exit_step"]], [100 * o["accuracy"]], marker="*", ms=12, color=colors[v], ls="none")
            lo = min(lo, min(100 * p["accuracy"] for p in pts))
        ax.set_ylim(max(0.0, lo - 1.0), None)
        _style(ax, "average latency (mean exit step)", "test accuracy (%)", f"{pol} cutoff (stars: OCT oracle)",
               "lower right", 10)
    return _save(fig, path)


def ablation_speedup(stats: dict[str, dict], policies, drops, path,
                     title: str = "Calibrated early exit (thresholds from validation; test)") -> Path:
    """Calibrated timestep speed-up per variant, policy and tolerated drop (bars: mean, whiskers: std), each bar
    labelled with the mean test accuracy at its exits (`exit_accuracy_labels`): a drop is measured from each
    variant's own full-T accuracy, so a variant that ends lower may exit sooner without answering better. Policy
    ``timestep`` is drawn as "fixed T", the fewest steps chosen on validation that every sample runs; ``NAME+cap``
    is policy NAME with its step cap; a ``bound:`` or ``harm:`` prefix (the exits calibrated with a bound) is left
    out of the labels."""
    plt = _plt()
    groups = [(p, d) for d in drops for p in policies]
    variants = list(stats)
    width = 0.8 / max(1, len(variants))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.0 * len(groups)), 3.8), dpi=120)
    labelled = False
    for i, (v, color) in enumerate(zip(variants, _colors(len(variants)))):
        means = [stats[v][f"{p}@{d}:speedup"]["mean"] or 0.0 for p, d in groups]
        stds = [stats[v][f"{p}@{d}:speedup"]["std"] or 0.0 for p, d in groups]
        xs = [g + (i - (len(variants) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, color=color, label=v)
        for x, top, text in zip(xs, [m + s for m, s in zip(means, stds)], exit_accuracy_labels(stats[v], groups)):
            if text:
                ax.annotate(text, (x, top), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                            rotation=90, fontsize=6.5, color="#333333")
                labelled = True
    if labelled:
        ax.set_ylim(top=ax.get_ylim()[1] * 1.15)
        title += "; labels: test accuracy at the exit (%)"
    ax.set_xticks(range(len(groups)))
    names = [p.split(":", 1)[-1] for p, _ in groups]
    ax.set_xticklabels([f"{'fixed T' if p == 'timestep' else p.replace('+cap', chr(10) + '+ cap')}\n≤{100 * d:g} pt"
                        for p, (_, d) in zip(names, groups)])
    ax.axhline(1.0, color="black", lw=0.8, ls=":")
    _style(ax, "", "timestep speed-up (T / mean exit)", title, title_size=10)
    return _save(fig, path)


def exit_accuracy_labels(stats: dict, groups) -> list[str]:
    """One label per ``(policy, drop)`` of ``groups``: the mean test accuracy at the exit in % to one decimal
    (``stats["<policy>@<drop>:exit_accuracy"]``, a fraction), or "" where the analysis did not record it."""
    out = []
    for p, d in groups:
        mean = (stats.get(f"{p}@{d}:exit_accuracy") or {}).get("mean")
        out.append("" if mean is None else f"{100 * mean:.1f}")
    return out


def ablation_paired(diffs: dict[str, dict[str, dict]], metrics: list[tuple[str, str, float]], baseline: str,
                    path) -> Path:
    """Paired differences from the baseline, one panel per metric: each seed's difference as a dot, the mean
    as a bar and its 95 % interval over seeds as a whisker (``diffs[variant][key]`` from the ablation report,
    with ``values`` and ``ci95``); ``metrics`` is ``(key, label, scale)``. Where a whisker clears the zero line
    the difference is beyond seed noise."""
    plt = _plt()
    variants = list(diffs)
    ncols = len(metrics) if len(metrics) <= 4 else math.ceil(len(metrics) / 2)  # more than four panels: two rows
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.1 * ncols, nrows * (0.55 * len(variants) + 1.2) + 0.4), dpi=120,
                             squeeze=False, sharey=True)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    colors = _colors(len(variants) + 1)[1:]  # the baseline (the ablation's first variant) keeps colour 0 elsewhere
    for ax, (key, label, scale) in zip(axes.flat, metrics):
        for i, v in enumerate(variants):
            st = diffs[v].get(key) or {}
            if st.get("mean") is None:
                continue
            y = len(variants) - 1 - i
            ax.plot([x * scale for x in st["values"]], [y] * len(st["values"]), "o", ms=3.5, alpha=0.5,
                    color=colors[i])
            ci = st.get("ci95")
            if ci:
                ax.plot([ci[0] * scale, ci[1] * scale], [y, y], color=colors[i], lw=2)
            ax.plot([st["mean"] * scale], [y], "|", ms=14, mew=2.5, color=colors[i])
        ax.axvline(0.0, color="black", lw=0.8, ls=":")
        ax.set_yticks(range(len(variants)), list(reversed(variants)))
        ax.set_ylim(-0.7, len(variants) - 0.3)
        ax.set_xlabel(label, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"Paired difference from {baseline} (dots: seeds; bar: mean; line: 95 % interval)", fontsize=10)
    return _save(fig, path)


def stream_trace(counts, probs, exit_step: int, prediction: int, frame_ms: float, statistic, path, title: str,
                 classes=None, count_label: str = "events per frame", top: int = 3) -> Path:
    """One recording stepped to T (``fewstep stream --plot``): ``counts`` per frame (bars), the running class
    probabilities ``probs[T, C]`` of the ``top`` classes at T and the predicted one, and ``statistic``
    (:func:`fewstep.stream.policy_statistic`, or ``None``) against its threshold; the decision's step is
    marked and the frames after it are shaded (not needed for the answer). The x axis is sensor time at
    the end of each frame when frames have a duration (``frame_ms``), else the step."""
    import numpy as np

    plt = _plt()
    T = len(counts)
    timed = frame_ms == frame_ms  # NaN: frames of equal event counts have no duration
    x = np.arange(1, T + 1) * (frame_ms if timed else 1.0)
    width = (frame_ms if timed else 1.0) * 0.85
    x_exit = exit_step * (frame_ms if timed else 1.0)
    rows = 3 if statistic is not None else 2
    fig, axes = plt.subplots(rows, 1, figsize=(6.4, 2.0 + 1.6 * rows), dpi=120, sharex=True)
    ax = axes[0]
    ax.bar(x - width / 2, counts, width, color=["tab:blue" if t < exit_step else "lightgray" for t in range(T)])
    ax.set_ylabel(count_label, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax = axes[1]
    probs = np.asarray(probs)
    keep = list(dict.fromkeys([prediction, *np.argsort(-probs[-1])[:top].tolist()]))
    for c, color in zip(keep, _colors(len(keep))):
        name = classes[c] if classes else str(c)
        ax.plot(x, probs[:, c], marker="o", ms=3, color=color, label=f"{c}: {name}" if name != str(c) else f"class {c}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("softmax of Y(t)", fontsize=8)
    ax.legend(fontsize=7, loc="best")
    if statistic is not None:
        label, values, thresholds, when, log_scale = statistic
        ax = axes[2]
        ax.plot(x, values, marker="o", ms=3, color="black", label=label)
        ax.plot(x, thresholds, color="crimson", ls="--", marker="_", ms=12, label=f"threshold (fires {when})")
        if log_scale:
            ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=8)
        ax.legend(fontsize=7, loc="best")
    for ax in axes:
        ax.axvline(x_exit, color="crimson", lw=1.0)
        if exit_step < T:  # the frames the answer did not need
            ax.axvspan(x_exit, x[-1], color="gray", alpha=0.08)
        ax.grid(alpha=0.3)
    axes[-1].set_xlim(0, x[-1] + 0.02 * x[-1])
    axes[-1].set_xlabel("sensor time at the end of the frame (ms)" if timed else "step (frames of equal event counts)")
    axes[0].annotate(f"safe after {x_exit:.1f} ms" if timed else f"safe after step {exit_step}", (x_exit, 1.0),
                     xycoords=("data", "axes fraction"), xytext=(4, -12), textcoords="offset points", fontsize=8,
                     color="crimson")
    return _save(fig, path)
