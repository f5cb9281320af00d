"""Draw ``summary.png``: every seed method against its baseline at a glance (a forest plot of paired differences).

The figures come from ``summary.csv`` beside this file, each copied from the ``docs/results.md`` section its row
names (``tests/test_summary.py`` checks that every one is there). Run ``python docs/results/summary.py`` after
adding a row.

Pooling fresh seeds with earlier ones: ``--pool DIR --variant V --key KEY`` with ``--published=M,LO,HI`` recovers
the earlier seeds' spread from a published interval; ``--with FILE`` pools them exactly, from the seed-by-seed
values that ``--keep DIR`` saved (``seeds/<ablation>.json``, a few kB: accuracies per step, final accuracy, firing
rate, steps saved and exit accuracy at the same validation bar, exits against the fixed T), and counts the seeds
ahead / level / behind over all of them. The run folders (checkpoints) stay out of the repository; these files are
what later sessions pool with.
"""
from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
METRICS = {  # column of the figure: (title, x-axis label, half-width of the axis)
    "t1": ("accuracy at the first step", "pt, method − baseline", 5.0),
    "final": ("accuracy at T", "pt, method − baseline", 5.0),
    "steps": ("steps saved at equal accuracy", "softmax steps sooner (same validation bar, d = 0.6 pt)", 1.2),
}


def number(text: str) -> float:
    return float(text.replace("−", "-"))


def pooled(published: tuple[float, float, float], n_published: int, values: list[float]) -> list[float]:
    """Mean and 95 % interval ``[mean, lo, hi]`` over the seeds of a published paired summary (its mean and 95 %
    interval over ``n_published`` seeds; the standard deviation recovered from the interval's width) and fresh
    seeds' paired differences ``values``: the pooled sample variance from both groups' sums of squares."""
    from fewstep.ablation_report import ci95, t95

    m1, lo, hi = published
    s1 = (hi - lo) / 2 * math.sqrt(n_published) / t95(n_published - 1)
    n2 = len(values)
    m2 = sum(values) / n2
    n = n_published + n2
    mean = (n_published * m1 + n2 * m2) / n
    ss = ((n_published - 1) * s1 ** 2 + sum((v - m2) ** 2 for v in values)
          + n_published * (m1 - mean) ** 2 + n2 * (m2 - mean) ** 2)
    return [mean, *ci95(mean, math.sqrt(ss / (n - 1)), n)]


def below_zero(x: float) -> bool:
    """Whether an interval's bound lies below 0, counting a bound printed as −0.00 (a value in (−0.005, 0), rounded)."""
    return x < 0 or (x == 0 and math.copysign(1.0, x) < 0)


def key(r: dict) -> tuple:
    """The line of the plot a row belongs to (its seeds aside: a cell may rest on fewer seeds than its line)."""
    return r["method"], r["baseline"], r["dataset"], r["T"], r["epochs"]


def load(path: Path = HERE / "summary.csv") -> list[dict]:
    """The rows of ``summary.csv`` as written, each with ``mean``, ``low`` and ``high`` added: floats, signed method −
    baseline (the interval computed from ``std`` where the section gives mean ± std)."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    from fewstep.ablation_report import ci95

    rows = []
    for row in csv.DictReader(lines):
        if row["metric"] not in METRICS:
            raise ValueError(f"{path.name}: unknown metric {row['metric']!r} (one of {sorted(METRICS)})")
        sign, n = int(row["sign"]), int(row["seeds"])
        mean = number(row["value"])
        if row["std"]:
            lo, hi = ci95(mean, float(row["std"]), n)
        else:
            lo, hi = number(row["lo"]), number(row["hi"])
        if not lo <= mean <= hi:
            raise ValueError(f"{path.name}: {row['method']} on {row['dataset']} ({row['metric']}): {mean} lies outside "
                             f"[{lo}, {hi}]")
        if sign < 0:
            mean, lo, hi = -mean, -hi, -lo
        if any(key(r) == key(row) and r["metric"] == row["metric"] for r in rows):
            raise ValueError(f"{path.name}: two rows for {' / '.join(key(row))} ({row['metric']}): one figure per cell")
        rows.append({**row, "mean": mean, "low": lo, "high": hi})
    return rows


def draw(rows: list[dict], out: Path = HERE / "summary.png") -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(key(r) for r in rows))
    # a line's seeds: the most of its figures'; a figure over fewer seeds says so beside its point
    seeds = {k: max((r for r in rows if key(r) == k), key=lambda r: int(r["seeds"]))["seeds"] for k in keys}
    labels = [f"{m} vs {b}  ·  {d}, T = {t}, {e} ep, {seeds[(m, b, d, t, e)]} seeds" for m, b, d, t, e in keys]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(15, 0.32 * len(keys) + 1.6), sharey=True)
    for ax, (metric, (title, xlabel, half)) in zip(axes, METRICS.items()):
        ax.axvline(0, color="black", lw=0.8)
        for y, k in enumerate(keys):
            got = [r for r in rows if r["metric"] == metric and key(r) == k]
            if not got:
                gap = "not reported"
                if k[3] == "1":  # a network of one step: its first step is its last, and it has no exit to make
                    gap = "T = 1: see accuracy at T" if metric == "t1" else "T = 1: no exit to make"
                ax.text(0, y, gap, ha="center", va="center", fontsize=7, color="0.6")
                continue
            r = got[0]
            color = "tab:green" if r["low"] > 0 else "tab:red" if below_zero(r["high"]) else "0.45"
            lo, hi, mean = (max(-half, min(half, v)) for v in (r["low"], r["high"], r["mean"]))
            ax.plot([lo, hi], [y, y], color=color, lw=2)
            ax.plot([mean], [y], "o", color=color, ms=5)
            if max(abs(r["mean"]), abs(r["low"]), abs(r["high"])) > half:  # off the axis: say by how much
                text = f"{r['mean']:+.2f} [{r['low']:+.2f}, {r['high']:+.2f}]".replace("-", "−")
                ax.annotate(text, (mean, y), xytext=(0, 5), textcoords="offset points", fontsize=7, color=color,
                            ha="left" if mean < 0 else "right")
            elif r["seeds"] != seeds[k]:
                ax.annotate(f"{r['seeds']} seeds", (hi, y), xytext=(4, 0), textcoords="offset points", fontsize=7,
                            color="0.4", va="center")
        ax.set_xlim(-half * 1.05, half * 1.05)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(keys)), labels, fontsize=8)
    axes[0].invert_yaxis()
    for y, k in enumerate(keys[1:], 1):  # a rule between methods
        if k[:2] != keys[y - 1][:2]:
            for ax in axes:
                ax.axhline(y - 0.5, color="0.8", lw=0.6)
    fig.suptitle("Each method against its baseline, paired over seeds: mean and 95 % interval (green: above 0 beyond "
                 "seed noise, red: below, grey: within noise). 2-core CPU budgets; docs/results.md has each figure",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def fresh_differences(folder: Path, variant: str, baseline: str, step: int) -> list[float]:
    """Paired test-accuracy differences (pt) at ``step`` (0: the first, -1: T) of ``variant`` minus ``baseline``,
    seed by seed, from an ablation folder's per-run ``analysis.json``."""
    import json

    def acc(v: str, seed: Path) -> float:
        analysis = json.loads((folder / v / seed.name / "analysis.json").read_text())
        return 100 * analysis["test_accuracy_per_step"][step]

    seeds = sorted(p for p in (folder / baseline).glob("seed*")
                   if (folder / variant / p.name / "analysis.json").is_file())
    return [acc(variant, s) - acc(baseline, s) for s in seeds]


def _summary_file(source: Path) -> Path:
    """An ablation folder's ``summary.json``, or a file ``--keep`` wrote (the same layout, fewer keys)."""
    return source / "summary.json" if source.is_dir() else source


def fresh_values(folder: Path, variant: str, key: str) -> list[float]:
    """Seed-by-seed values of ``key`` for ``variant`` from an ablation folder's ``summary.json`` (or a file ``--keep``
    wrote): a paired difference from its first variant (``paired_diff``, e.g. ``softmax@0.006:matched_steps_saved``)
    or an exit against the variant's own fixed T (``vs_fixed``, e.g. ``softmax@0.006:vs_fixed``); a key naming an
    accuracy in pt."""
    return _lookup(folder, variant, key)[0]


def _lookup(folder: Path, variant: str, key: str) -> tuple[list[float], str]:
    """:func:`fresh_values` and the table they came from (``vs_fixed``: ratios, level at 1; else differences)."""
    path = _summary_file(folder)
    summary = json.loads(path.read_text())
    variants = summary["variants"]
    if variant not in variants:
        raise KeyError(f"{path} has no variant {variant!r} (it has {', '.join(variants)})")
    v = variants[variant]
    for table in ("vs_fixed", "paired_diff"):  # (the first variant pairs with itself: zeros in paired_diff)
        if key in v.get(table, {}):
            scale = 100 if "acc" in key else 1
            return [scale * x for x in v[table][key]["values"]], table
    if variant == summary.get("baseline"):
        raise KeyError(f"{path}: {variant!r} is that ablation's baseline, paired with itself; pool a variant paired "
                       f"with it")
    raise KeyError(f"{path} has no {key!r} for {variant!r} (in paired_diff or vs_fixed)")


def seeds_of(source: Path, variant: str) -> list[int]:
    return list(json.loads(_summary_file(source).read_text())["variants"][variant]["seeds"])


def setting(summary: dict) -> dict:
    """What an ablation trained on, from its ``summary.json`` (or as a kept file stores it): dataset, model, epochs."""
    if "dataset" in summary:
        return {k: summary.get(k) for k in ("dataset", "model", "epochs")}
    base = summary.get("spec", {}).get("base", {})
    return {"dataset": base.get("data", {}).get("name"), "model": base.get("model", {}).get("name"),
            "epochs": base.get("train", {}).get("epochs")}


def _setting_of(source: Path, variant: str) -> dict:
    summary = json.loads(_summary_file(source).read_text())
    return {**setting(summary), "T": summary["variants"][variant].get("T"), "baseline": summary.get("baseline")}


KEEP = re.compile(r"^(acc_t\d+|final_accuracy|val_accuracy|firing_rate|spikes_per_sample|train_time_s"
                  r"|(softmax|topk)@[\d.]+:(matched_steps_saved|matched_exit_accuracy)"
                  r"|(timestep|softmax|topk)(\+cap)?@[\d.]+:vs_fixed)$")


def keep(folder: Path, out_dir: Path = HERE / "seeds") -> Path:
    """Save an ablation's seed-by-seed paired values (the ``KEEP`` keys of ``summary.json``, each variant against
    the first) as ``out_dir/<folder name>.json``, for exact pooling with later seeds (``--with``)."""
    if not (folder / "summary.json").is_file():
        raise FileNotFoundError(f"{folder}: no summary.json (not a finished `fewstep ablate` folder)")
    summary = json.loads((folder / "summary.json").read_text())
    spec = summary.get("spec", {})
    kept = {"ablation": folder.name, "command": spec.get("command"), "baseline": summary.get("baseline"),
            **setting(summary), "variants": {}}
    for name, v in summary["variants"].items():
        entry = {"seeds": v["seeds"], "T": v.get("T")}
        for table in ("paired_diff", "vs_fixed"):
            values = {k: {"values": [round(x, 6) for x in s["values"]]} for k, s in v.get(table, {}).items()
                      if KEEP.match(k) and s.get("values") is not None}
            if values and not (table == "paired_diff" and name == summary.get("baseline")):
                entry[table] = values
        kept["variants"][name] = entry
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{folder.name}.json"
    out.write_text(json.dumps(kept, indent=None, separators=(",", ":")) + "\n", encoding="utf-8")
    return out


def pooled_exactly(sources: list[Path], variant: str, key: str) -> dict:
    """Mean, 95 % interval and seeds ahead / level / behind (against 0, or 1 for a ratio against the fixed T) of
    ``key`` for ``variant`` over the seeds of several ablations (folders or kept files), each seed counted once: a
    seed in two of them is an error, not a double count. The statistics are ``fewstep ablate``'s own."""
    from fewstep.ablation_report import _paired

    values, seen, first, ref = [], {}, None, 0.0
    for source in sources:
        here = _setting_of(source, variant)
        if first is None:
            first = (source, here)
        elif here != first[1]:
            raise ValueError(f"{source} trained {here}, {first[0]} {first[1]}: pool seeds of the same setting only")
        found, table = _lookup(source, variant, key)
        ref = 1.0 if table == "vs_fixed" else 0.0
        for seed, x in zip(seeds_of(source, variant), found):
            if seed in seen:
                raise ValueError(f"seed {seed} of {variant!r} is in both {seen[seed]} and {source}: "
                                 f"pool each seed once")
            seen[seed] = source
            values.append(x)
    st = _paired(values, ref)
    lo, hi = st["ci95"] or (float("nan"), float("nan"))
    return {"n": st["n"], "mean": st["mean"], "lo": lo, "hi": hi, "ahead": st["ahead"], "level": st["level"],
            "behind": st["behind"], "seeds": sorted(seen)}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="redraw summary.png; or, with --pool, pool a published paired summary "
                                             "with an ablation folder's fresh seeds")
    ap.add_argument("--pool", metavar="DIR", help="ablation folder holding the fresh seeds")
    ap.add_argument("--variant")
    ap.add_argument("--baseline")
    ap.add_argument("--step", type=int, default=0, help="0: the first step, -1: T")
    ap.add_argument("--key", help="pool this summary.json key of --variant instead of an accuracy at --step (a "
                    "paired difference from the first variant, or a vs_fixed ratio; no --baseline)")
    ap.add_argument("--published", help="MEAN,LO,HI of the published paired difference (pt)")
    ap.add_argument("--published-seeds", type=int, default=3)
    ap.add_argument("--with", dest="with_", metavar="FILE", action="append", default=[],
                    help="pool exactly with the seed-by-seed values a --keep file holds (repeatable; needs --key)")
    ap.add_argument("--keep", metavar="DIR", help="save ablation DIR's seed-by-seed paired values as "
                    "docs/results/seeds/<DIR name>.json")
    a = ap.parse_args()
    if a.keep:
        print(f"wrote {keep(Path(a.keep))}")
    elif a.pool and a.with_:
        if not a.key:
            ap.error("--with pools a --key (e.g. acc_t1, final_accuracy, softmax@0.006:matched_steps_saved)")
        r = pooled_exactly([Path(p) for p in a.with_] + [Path(a.pool)], a.variant, a.key)
        print(f"{a.variant}, {a.key}: pooled over {r['n']} seeds {r['seeds']} {r['mean']:+.2f}, "
              f"[{r['lo']:+.2f}, {r['hi']:+.2f}], {r['ahead']}/{r['level']}/{r['behind']}")
    elif a.pool:
        if a.key:
            fresh, what = fresh_values(Path(a.pool), a.variant, a.key), f"{a.variant}, {a.key}"
        else:
            fresh, what = fresh_differences(Path(a.pool), a.variant, a.baseline, a.step), \
                f"{a.variant} − {a.baseline}, step {a.step}"
        m, lo, hi = pooled(tuple(number(v) for v in a.published.split(",")), a.published_seeds, fresh)
        print(f"{what}: fresh {[round(v, 2) for v in fresh]}; pooled over "
              f"{a.published_seeds + len(fresh)} seeds {m:+.2f}, [{lo:+.2f}, {hi:+.2f}]")
    else:
        print(f"wrote {draw(load())}")
