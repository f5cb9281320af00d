"""The report of ``fewstep ablate``: per-run analyses aggregated over seeds, and its plots.

:func:`aggregate` turns ``{variant: {seed: analysis}}`` (:mod:`fewstep.ablation` writes one
``analysis.json`` per run, plus the validation accuracy of every training epoch) into mean ± sample
standard deviation per variant and the paired difference of each variant from the first (same
seed), including the paired exits at the same validation bar (:func:`matched_paired`), which take away
the advantage a lower-ending variant gets from measuring its drop from its own accuracy, and each exit against its
own network run for the fixed T, seed by seed (:func:`vs_fixed`). :func:`fewstep.ablation_markdown.markdown`
writes the tables of ``results.md``; :func:`plot_summary` the plots
``accuracy_per_step.png``, ``learning_curves.png``, ``tradeoff.png``, ``speedup.png``, ``bounded.png`` (the exits
with their drop bounded), ``bounded_harm.png`` (with the share of samples they harm bounded) and, beside a baseline,
``paired.png``.
"""

from __future__ import annotations

import math
import platform
import statistics
from pathlib import Path

import torch

DROPS = (0.006, 0.01)  # accuracy drops (fractions) at which the calibrated exit is reported
POLICIES = ("softmax", "topk")
BOUND_CONFIDENCE = 0.95  # the bounded exits' confidence (``fewstep cutoff --confidence``'s default)
BOUNDED_RULES = ("timestep",) + POLICIES + tuple(f"{n}+cap" for n in POLICIES)  # calibrated with a bound on the drop
# the bounded exits, by the prefix of their scalars: (analysis key, ``fewstep cutoff --bound``, what is bounded)
BOUND_KINDS = {"bound": ("bounded_drop", "drop", "the drop"),
               "harm": ("bounded", "harm", "the share of samples harmed")}
BOUNDED_KEYS = {key: bound for key, bound, _ in BOUND_KINDS.values()}  # analysis key -> ``fewstep cutoff --bound``
PAIRED_PLOT = [("acc_t1", "accuracy at t = 1 (pt)", 100.0), ("final_accuracy", "accuracy at T (pt)", 100.0),
               ("softmax@0.006:speedup", "softmax speed-up @0.6 pt (×)", 1.0),
               ("topk@0.006:speedup", "top-k speed-up @0.6 pt (×)", 1.0),
               ("softmax@0.006:exit_accuracy", "accuracy at the softmax exit @0.6 pt (pt)", 100.0),
               ("topk@0.006:exit_accuracy", "accuracy at the top-k exit @0.6 pt (pt)", 100.0),
               ("softmax@0.006:matched_steps_saved", "softmax steps saved, same val bar @0.6 pt", 1.0),
               ("topk@0.006:matched_steps_saved", "top-k steps saved, same val bar @0.6 pt", 1.0)]


def _ms(values: list[float]) -> dict:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals), "values": vals}


def _paired(diffs: list[float], ref: float = 0.0) -> dict:
    """:func:`_ms` of paired differences plus what says whether they are beyond seed noise: the 95 %
    confidence interval of their mean (Student's t over seeds, ``ci95``; needs two seeds) and the
    seeds on which the variant is ahead, level or behind (``ahead``, ``level``, ``behind``): above, at or below
    ``ref`` (0 for a difference; 1 for a ratio such as a step saving over the fixed T).

    The interval is over seeds (initial weights, validation split, data order) on a fixed test split:
    it says whether another seed would likely reproduce the sign, not how the method fares on other data.
    """
    st = _ms(diffs)
    vals = st["values"]
    st["ahead"] = sum(v - ref > 1e-12 for v in vals)
    st["behind"] = sum(v - ref < -1e-12 for v in vals)
    st["ref"] = ref
    st["level"] = len(vals) - st["ahead"] - st["behind"]
    st["ci95"] = ci95(st["mean"], st["std"], len(vals)) if len(vals) > 1 else None
    return st


def t95(df: int) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom (4.30 at 2)."""
    from scipy.stats import t as student_t

    return float(student_t.ppf(0.975, df))


def ci95(mean: float, std: float, n: int) -> list[float]:
    """The 95 % confidence interval of a mean over ``n`` seeds with sample standard deviation ``std``."""
    half = t95(n - 1) * std / math.sqrt(n)
    return [mean - half, mean + half]


def fixed_step(val_accuracy_per_step: list[float], max_drop: float) -> int:
    """The fixed T a user without a cutoff would run: the fewest steps whose *validation* accuracy is within
    ``max_drop`` of running to T (the ``timestep`` policy of :func:`fewstep.calibration.fastest_within`, read off the
    per-step accuracies). The baseline a calibrated exit must beat to save anything, the comparison the RCS paper
    makes (arXiv 2301.09522: "fewer timesteps" than the T that reaches the same accuracy)."""
    full = val_accuracy_per_step[-1]
    return next(t for t, acc in enumerate(val_accuracy_per_step, 1) if acc >= full - max_drop - 1e-9)


def _scalars(a: dict) -> dict:
    """The per-run numbers that are compared across variants (accuracies as fractions)."""
    s = {"final_accuracy": a["test_accuracy_per_step"][-1], "val_accuracy": a["val_accuracy_per_step"][-1],
         "firing_rate": a["firing_rate"], "energy_uj_full": a["energy_uj_full"],
         "spikes_per_sample": a["spikes_per_sample"], "oct_mean_exit": a["oct"]["mean_exit_step"],
         "train_time_s": a.get("train_time_s"), "ann_accuracy": a.get("ann_test_accuracy"),
         "images_per_s": a.get("images_per_s"), "n_params": a.get("n_params")}
    for t, acc in enumerate(a["test_accuracy_per_step"], 1):
        s[f"acc_t{t}"] = acc
    test, T = a["test_accuracy_per_step"], a["T"]
    for drop in DROPS:
        t = fixed_step(a["val_accuracy_per_step"], drop)
        s[f"timestep@{drop}:mean_exit_step"], s[f"timestep@{drop}:speedup"] = float(t), T / t
        s[f"timestep@{drop}:test_drop"] = test[-1] - test[t - 1]
        s[f"timestep@{drop}:exit_accuracy"] = test[t - 1]
        for name in POLICIES:
            exits = {name: a["calibrated"][name][str(drop)]}
            if "capped" in a:  # (analyses made before the step cap existed lack it)
                exits[f"{name}+cap"] = a["capped"][name][str(drop)]
                s[f"{name}+cap@{drop}:max_step"] = exits[f"{name}+cap"]["setting"]["max_step"] or T
            for label, c in exits.items():
                for k in ("speedup", "mean_exit_step", "test_drop", "energy_uj"):
                    s[f"{label}@{drop}:{k}"] = c[k]
                s[f"{label}@{drop}:exit_accuracy"] = _exit_accuracy(c, test)
                s[f"{label}@{drop}:vs_fixed"] = t / c["mean_exit_step"]
                s[f"{label}@{drop}:vs_fixed_accuracy"] = s[f"{label}@{drop}:exit_accuracy"] - test[t - 1]
            s[f"{name}@{drop}:test_curve_speedup"] = a["test_curve"][name][str(drop)]["speedup"]
    for prefix, (key, _, _) in BOUND_KINDS.items():
        for rule, by_drop in (a.get(key) or {}).items():  # (analyses made before the bounded exits lack them)
            for drop in DROPS:
                c, k = by_drop[str(drop)], f"{prefix}:{rule}@{drop}:"
                for name in ("speedup", "mean_exit_step", "test_drop", "ran_to_T"):
                    s[k + name] = c[name]
                s[k + "exit_accuracy"] = c["test_accuracy"]
                s[k + "within"] = float(c["test_drop"] <= drop + 1e-12)
                s[k + "max_step"] = c["max_step"] or T
                s[k + "vs_fixed"] = a[key]["timestep"][str(drop)]["mean_exit_step"] / c["mean_exit_step"]
    return s


def _exit_accuracy(c: dict, test_per_step: list[float]) -> float:
    """Test accuracy at a calibrated exit. A speed-up is read against the network's *own* full-T accuracy, so a
    variant whose final accuracy is lower can exit sooner within the same drop; comparing the accuracy at the
    exit between variants shows that (analyses without ``test_accuracy``: final accuracy − test drop)."""
    return c["test_accuracy"] if "test_accuracy" in c else test_per_step[-1] - c["test_drop"]


def matched_exit(a: dict, name: str, bar: float) -> dict:
    """The fastest setting of policy ``name`` whose *validation* accuracy is at least ``bar`` (an absolute
    accuracy, not a drop from the run's own full T), read off the run's trade-off curve (thresholds fitted on
    validation) and measured on test: ``{mean_exit_step, speedup, exit_accuracy}``. Running to T is always a
    candidate. With ``bar`` = the run's full-T validation accuracy − d it is the calibrated exit at drop d."""
    from .calibration import fastest_point

    T = a["T"]
    best = fastest_point(a["curves"][name], bar, 0.0, on="val")
    if best is None or best["val_mean_exit_step"] >= T:  # no threshold exits sooner on validation: run to T
        best = {"mean_exit_step": float(T), "accuracy": a["test_accuracy_per_step"][-1]}
    return {"mean_exit_step": best["mean_exit_step"], "speedup": T / best["mean_exit_step"],
            "exit_accuracy": best["accuracy"]}


def matched_paired(runs: dict, base_runs: dict) -> dict:
    """Paired differences at **the same validation bar**: for each seed both runs' exits are chosen to keep
    validation accuracy at or above the lower of the two networks' full-T validation accuracies minus d
    (:func:`matched_exit`). A variant that ends lower cannot exit sooner by it (the calibrated exits each
    measure d from their own network's accuracy), so a speed-up here is an earlier answer at the same accuracy.
    Keys ``{policy}@{d}:matched_{speedup,exit_accuracy,steps_saved}`` (steps saved: the baseline's mean exit step
    minus the variant's, comparable across T), each a :func:`_paired`."""
    diffs: dict = {}
    for k in (k for k in runs if k in base_runs):
        a, b = runs[k], base_runs[k]
        if not all("val_accuracy" in p for r in (a, b) for c in r["curves"].values() for p in c):
            continue  # (curves of analyses made before they carried validation figures)
        for drop in DROPS:
            bar = min(a["val_accuracy_per_step"][-1], b["val_accuracy_per_step"][-1]) - drop
            for name in POLICIES:
                mv, mb = matched_exit(a, name, bar), matched_exit(b, name, bar)
                for key in ("speedup", "exit_accuracy"):
                    diffs.setdefault(f"{name}@{drop}:matched_{key}", []).append(mv[key] - mb[key])
                saved = mb["mean_exit_step"] - mv["mean_exit_step"]
                diffs.setdefault(f"{name}@{drop}:matched_steps_saved", []).append(saved)
    return {key: _paired(vals) for key, vals in diffs.items()}


def vs_fixed(scalars: dict) -> dict:
    """Each calibrated exit against **its own network run for the fixed T** (:func:`fixed_step`), seed by seed:
    ``{rule@d:vs_fixed}``, the fixed T's steps over the exit's mean exit step (:func:`_paired` around 1: seeds
    above 1 save steps), and ``{rule@d:vs_fixed_accuracy}``, the exit's test accuracy minus the fixed T's (around 0).
    A ratio whose interval lies above 1 with an accuracy difference whose interval holds 0 is a step saving at the
    same accuracy: the RCS paper's claim, "fewer timesteps" than the T that reaches the same accuracy."""
    keys = next(iter(scalars.values())).keys()
    return {key: _paired([s[key] for s in scalars.values() if s.get(key) is not None],
                         ref=1.0 if key.endswith(":vs_fixed") else 0.0)
            for key in keys if key.endswith((":vs_fixed", ":vs_fixed_accuracy"))}


def exit_rules(stats: dict) -> tuple:
    """The rows of the calibrated-exit table: the fixed T, each policy, and each policy with its step cap where
    every run of the variant has one."""
    runs = stats["final_accuracy"]["n"]
    capped = tuple(f"{n}+cap" for n in POLICIES if (stats.get(f"{n}+cap@{DROPS[0]}:speedup") or {}).get("n") == runs)
    return ("timestep",) + POLICIES + capped


def bound_n(drop: float, confidence: float = BOUND_CONFIDENCE, kind: str = "bound") -> int:
    """The fewest samples with which a rule that changes no answer has its bound of ``kind`` (:data:`BOUND_KINDS`)
    within ``drop`` (:func:`fewstep.calibration.smallest_n`). With fewer, every bounded rule runs to T."""
    from .calibration import smallest_n

    return smallest_n(drop, confidence, BOUND_KINDS[kind][1])


def bound_rules(stats: dict, kind: str = "bound") -> tuple:
    """The rows of a bounded-exit table: the rules every run of the variant was calibrated for with the bound of
    ``kind`` (:data:`BOUND_KINDS`)."""
    runs = stats["final_accuracy"]["n"]
    return tuple(r for r in BOUNDED_RULES if (stats.get(f"{kind}:{r}@{DROPS[0]}:speedup") or {}).get("n") == runs)


def aggregate(results: dict, variants: list[str], base: dict, spec: dict) -> dict:
    """Mean ± std per variant, paired differences from the first variant, and mean trade-off curves."""
    threads = sorted({a.get("train_threads") for runs in results.values() for a in runs.values()} - {None})
    devices = sorted({a.get("train_device") for runs in results.values() for a in runs.values()} - {None})
    trained = (f"trained on {'/'.join(devices) or 'cpu'} with "
               f"{'/'.join(map(str, threads)) if threads else 'unrecorded'} torch threads")
    out = {"spec": spec, "variants": {}, "baseline": variants[0] if variants else None,
           "machine": f"{platform.machine()}, {trained}, torch {torch.__version__}"}
    base_scalars = {k: _scalars(a) for k, a in results.get(variants[0], {}).items()} if variants else {}
    for v in variants:
        runs = results.get(v, {})
        if not runs:
            continue
        sc = {k: _scalars(a) for k, a in runs.items()}
        keys = next(iter(sc.values())).keys()
        entry = {"seeds": sorted(runs), "stats": {key: _ms([s.get(key) for s in sc.values()]) for key in keys}}
        paired = [k for k in runs if k in base_scalars]
        entry["paired_diff"] = {key: _paired([sc[k][key] - base_scalars[k][key] for k in paired
                                          if sc[k].get(key) is not None and base_scalars[k].get(key) is not None])
                                for key in keys}
        if v != variants[0]:
            entry["paired_diff"].update(matched_paired(runs, results.get(variants[0], {})))
        entry["vs_fixed"] = vs_fixed(sc)
        any_run = next(iter(runs.values()))
        entry["T"] = any_run["T"]
        entry["n_test"], entry["n_val"] = any_run["n_test"], any_run["n_val"]
        entry["acc_per_step"] = {
            "test": [_ms([a["test_accuracy_per_step"][t] for a in runs.values()]) for t in range(any_run["T"])],
            "val": [_ms([a["val_accuracy_per_step"][t] for a in runs.values()]) for t in range(any_run["T"])]}
        curves = {}
        for name in POLICIES:
            per_seed = [a["curves"][name] for a in runs.values()]
            n_pts = min(len(c) for c in per_seed)
            curves[name] = [{"epsilon": per_seed[0][i].get("epsilon"),
                             "accuracy": statistics.fmean(c[i]["accuracy"] for c in per_seed),
                             "mean_exit_step": statistics.fmean(c[i]["mean_exit_step"] for c in per_seed)}
                            for i in range(n_pts)]
        entry["curves"] = curves
        histories = [a.get("val_per_epoch") or [] for a in runs.values()]
        n_ep = min(len(h) for h in histories)
        entry["val_per_epoch"] = [_ms([h[e] for h in histories]) for e in range(n_ep)]
        entry["oct"] = {"accuracy": statistics.fmean(a["oct"]["accuracy"] for a in runs.values()),
                        "mean_exit_step": statistics.fmean(a["oct"]["mean_exit_step"] for a in runs.values())}
        entry["epsilons"] = {name: {str(d): [a["calibrated"][name][str(d)]["setting"] for a in runs.values()]
                                    for d in DROPS} for name in POLICIES}
        out["variants"][v] = entry
    return out


def plot_summary(summary: dict, out: Path) -> list[str]:
    """Writes the plots into ``out``; returns their names."""
    from . import plots

    vs = summary["variants"]
    if not vs:
        return []
    plots.ablation_accuracy({v: e["acc_per_step"]["test"] for v, e in vs.items()}, out / "accuracy_per_step.png",
                            "Accuracy per timestep (test, mean ± std over seeds)")
    written = ["accuracy_per_step.png"]
    curves = {v: e["val_per_epoch"] for v, e in vs.items() if len(e.get("val_per_epoch") or []) >= 2}
    if curves:
        plots.ablation_accuracy(curves, out / "learning_curves.png", "Validation accuracy per epoch (mean ± std over seeds)",
                                xlabel="epoch", ylabel="validation accuracy (%)", log_x=False)
        written.append("learning_curves.png")
    plots.ablation_tradeoff({v: e["curves"] for v, e in vs.items()}, {v: e["oct"] for v, e in vs.items()},
                            out / "tradeoff.png")
    rules = min((exit_rules(e["stats"]) for e in vs.values()), key=len)  # the rows every variant has
    plots.ablation_speedup({v: e["stats"] for v, e in vs.items()}, rules, DROPS, out / "speedup.png")
    written += ["tradeoff.png", "speedup.png"]
    for kind, name in (("bound", "bounded.png"), ("harm", "bounded_harm.png")):
        bound = min((bound_rules(e["stats"], kind) for e in vs.values()), key=len)
        drops = [d for d in DROPS if min(e["n_val"] for e in vs.values()) >= bound_n(d, kind=kind)]  # (others: T)
        if bound and drops:
            plots.ablation_speedup({v: e["stats"] for v, e in vs.items()}, [f"{kind}:{r}" for r in bound], drops,
                                   out / name, f"Calibrated with a {100 * BOUND_CONFIDENCE:g} % bound on "
                                   f"{BOUND_KINDS[kind][2]} (validation; test)")
            written.append(name)
    others = {v: e["paired_diff"] for v, e in vs.items() if v != summary["baseline"]}
    if others:
        plots.ablation_paired(others, PAIRED_PLOT, summary["baseline"], out / "paired.png")
        written.append("paired.png")
    return written
