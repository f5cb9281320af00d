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
