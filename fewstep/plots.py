"""Matplotlib figures (PNG), drawn off-screen."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


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
    ax.set_xlabel("average latency (mean exit step)")
    ax.set_ylabel("accuracy (%)")
    lo = min(100 * p["accuracy"] for pts in policies.values() for p in pts)
    ax.set_ylim(max(0.0, lo - 2), 100.5)
    ax.set_xlim(0.8, T + 0.2)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def exit_histogram(exit_steps, T: int, path, title: str = "Exit steps") -> Path:
    plt = _plt()
    import numpy as np

    counts = np.bincount(np.asarray(exit_steps) - 1, minlength=T)[:T]
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=120)
    ax.bar(range(1, T + 1), counts, color="tab:blue")
    ax.set_xlabel("exit step")
    ax.set_ylabel("samples")
    ax.set_xticks(range(1, T + 1))
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
