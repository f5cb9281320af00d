"""The report of ``fewstep ablate``: per-run analyses aggregated over seeds, as tables and plots.

:func:`aggregate` turns ``{variant: {seed: analysis}}`` (:mod:`fewstep.ablation` writes one
``analysis.json`` per run, plus the validation accuracy of every training epoch) into mean ± sample
standard deviation per variant and the paired difference of each variant from the first (same
seed), including the paired exits at the same validation bar (:func:`matched_paired`), which take away
the advantage a lower-ending variant gets from measuring its drop from its own accuracy. :func:`markdown`
writes the tables of ``results.md``; :func:`plot_summary` the plots
``accuracy_per_step.png``, ``learning_curves.png``, ``tradeoff.png``, ``speedup.png`` and, beside a
baseline, ``paired.png``.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from pathlib import Path

import torch

DROPS = (0.006, 0.01)  # accuracy drops (fractions) at which the calibrated exit is reported
POLICIES = ("softmax", "topk")
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


def _paired(diffs: list[float]) -> dict:
    """:func:`_ms` of paired differences plus what says whether they are beyond seed noise: the 95 %
    confidence interval of their mean (Student's t over seeds, ``ci95``; needs two seeds) and the
    seeds on which the variant is ahead, level or behind (``ahead``, ``level``, ``behind``).

    The interval is over seeds (initial weights, validation split, data order) on a fixed test split:
    it says whether another seed would likely reproduce the sign, not how the method fares on other data.
    """
    st = _ms(diffs)
    vals = st["values"]
    st["ahead"] = sum(v > 1e-12 for v in vals)
    st["behind"] = sum(v < -1e-12 for v in vals)
    st["level"] = len(vals) - st["ahead"] - st["behind"]
    st["ci95"] = None
    if len(vals) > 1:
        from scipy.stats import t as student_t

        half = float(student_t.ppf(0.975, len(vals) - 1)) * st["std"] / math.sqrt(len(vals))
        st["ci95"] = [st["mean"] - half, st["mean"] + half]
    return st


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
            c = a["calibrated"][name][str(drop)]
            for k in ("speedup", "mean_exit_step", "test_drop", "energy_uj"):
                s[f"{name}@{drop}:{k}"] = c[k]
            s[f"{name}@{drop}:exit_accuracy"] = _exit_accuracy(c, test)
            s[f"{name}@{drop}:vs_fixed"] = t / c["mean_exit_step"]
            s[f"{name}@{drop}:test_curve_speedup"] = a["test_curve"][name][str(drop)]["speedup"]
            if "capped" in a:  # (analyses made before the step cap existed lack it)
                c = a["capped"][name][str(drop)]
                for k in ("speedup", "mean_exit_step", "test_drop", "energy_uj"):
                    s[f"{name}+cap@{drop}:{k}"] = c[k]
                s[f"{name}+cap@{drop}:exit_accuracy"] = _exit_accuracy(c, test)
                s[f"{name}+cap@{drop}:vs_fixed"] = t / c["mean_exit_step"]
                s[f"{name}+cap@{drop}:max_step"] = c["setting"]["max_step"] or T
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


def exit_rules(stats: dict) -> tuple:
    """The rows of the calibrated-exit table: the fixed T, each policy, and each policy with its step cap where
    every run of the variant has one."""
    runs = stats["final_accuracy"]["n"]
    capped = tuple(f"{n}+cap" for n in POLICIES if (stats.get(f"{n}+cap@{DROPS[0]}:speedup") or {}).get("n") == runs)
    return ("timestep",) + POLICIES + capped


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


def _fmt(st: dict, scale: float = 1.0, digits: int = 2, signed: bool = False) -> str:
    """``mean ± std`` of a :func:`_ms` entry (just the mean for one seed; "–" for none)."""
    if not st or st.get("mean") is None:
        return "–"
    mean = f"{st['mean'] * scale:{'+' if signed else ''}.{digits}f}"
    return mean if st["n"] < 2 else f"{mean} ± {st['std'] * scale:.{digits}f}"


def _fmt_diff(st: dict, scale: float = 1.0, digits: int = 2) -> str:
    return _fmt(st, scale, digits, signed=True)


def _fmt_ci(st: dict, scale: float = 1.0, digits: int = 2) -> str:
    """``[lo, hi] (a/l/b)``: the paired mean's 95 % interval and the seeds ahead / level / behind."""
    if not st or st.get("mean") is None:
        return "–"
    counts = f"{st['ahead']}/{st['level']}/{st['behind']}"
    if not st.get("ci95"):
        return counts
    lo, hi = st["ci95"]
    mark = " **beyond noise**" if lo > 0 or hi < 0 else ""
    return f"[{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}] {counts}{mark}"


def shown_steps(T: int) -> list[int]:
    """Every step up to T = 12; beyond, powers of two and T (a 64-step table would not be read)."""
    if T <= 12:
        return list(range(1, T + 1))
    return sorted({2 ** i for i in range(T.bit_length()) if 2 ** i <= T} | {T})


def learning_table(vs: dict) -> list[str]:
    """Validation accuracy after each epoch (%), as the runs logged it: does a gap close with more training?"""
    n = max((len(e.get("val_per_epoch") or []) for e in vs.values()), default=0)
    if n < 2:
        return []
    shown = shown_steps(n)
    L = ["", "## Validation accuracy per epoch (%)", "",
         "Logged during training (validation split, the network as trained, at its full T; a QCFS variant's figures "
         "are its ANN's). Learning curves: `learning_curves.png`.", "",
         "| variant | " + " | ".join(f"ep {e}" for e in shown) + " |", "|---|" + "---|" * len(shown)]
    for v, e in vs.items():
        h = e.get("val_per_epoch") or []
        L.append(f"| {v} | " + " | ".join(_fmt(h[k - 1], 100) if k <= len(h) else "–" for k in shown) + " |")
    return L


def markdown(summary: dict) -> str:
    """The ablation as markdown tables (accuracies in %, drops in points)."""
    spec, vs = summary["spec"], summary["variants"]
    if not vs:
        return "# Ablation\n\nNo finished runs yet.\n"
    base = spec["base"]
    first = next(iter(vs.values()))
    tr, dt, md = base["train"], base["data"], base["model"]
    seeds = ", ".join(str(s) for s in spec["seeds"])
    times = {v: e["stats"]["train_time_s"] for v, e in vs.items()}
    Ts = " / ".join(str(t) for t in sorted({e["T"] for e in vs.values()}))
    diffs = spec.get("differences")  # absent from the ablation.json of older versions
    models = list(dict.fromkeys((diffs or {}).get(v, {}).get("model.name", md["name"]) for v in vs))
    L = [f"# Ablation: {dt['name']}, {' / '.join(models)}, T = {Ts}", "",
         f"Reproduce: `{spec['command']}`", "",
         f"- Budget per run: {tr['epochs']} epochs, batch {tr['batch_size']}, {tr['optimizer']} lr {tr['lr']:g} "
         f"({tr['schedule']}), loss {tr['loss']} unless the variant says otherwise; the same for every variant"
         + (" except where listed below." if diffs and any(diffs.get(v) for v in vs) else "."),
         f"- Seeds {seeds} (paired: a seed fixes the initial weights, the validation split and the data order). "
         f"Validation: {first['n_val']} samples carved from training; test: {first['n_test']} samples, used only "
         "for the figures below.",
         f"- Machine: {summary['machine']}. Training time per run (s): "
         + "; ".join(f"{v} {_fmt(st, 1, 0)}" for v, st in times.items()) + ".",
         "- Mean ± sample standard deviation over seeds. Cutoff thresholds are always fitted on validation."]
    if diffs:
        listed = [(v, diffs[v]) for v in vs if diffs.get(v)]
        if listed:
            L.append("- Where each variant differs from the base config (its tokens and `--variant-set`):")
            L += [f"  - {v}: " + ", ".join(f"`{k}={json.dumps(val)}`" for k, val in ds.items()) for v, ds in listed]
    L.append("")
    steps = shown_steps(max(e["T"] for e in vs.values()))
    L += ["## Accuracy per timestep (test, %)", "",
          "| variant | " + " | ".join(f"t={t}" for t in steps) + " |",
          "|---|" + "---|" * len(steps)]
    for v, e in vs.items():
        acc = e["acc_per_step"]["test"]
        L.append(f"| {v} | " + " | ".join(_fmt(acc[t - 1], 100) if t <= len(acc) else "–" for t in steps) + " |")
    converted = {v: e for v, e in vs.items() if e["stats"].get("ann_accuracy", {}).get("n")}
    if converted:
        L += ["", "## ANN→SNN conversion (test, %)", "",
              "QCFS variants are trained as ANNs (T = 1) and analysed as the SNN they convert to; every figure "
              "above and below is the converted SNN's.", "",
              "| variant | ANN acc | SNN steps | SNN acc at T | SNN − ANN (pt) |", "|---|---|---|---|---|"]
        for v, e in converted.items():
            gap = _ms([f - a for f, a in zip(e["stats"]["final_accuracy"]["values"], e["stats"]["ann_accuracy"]["values"])])
            L.append(f"| {v} | {_fmt(e['stats']['ann_accuracy'], 100)} | {e['T']} | "
                     f"{_fmt(e['stats']['final_accuracy'], 100)} | {_fmt_diff(gap, 100)} |")
    L += learning_table(vs)
    L += ["", "## Calibrated early exit (test)", "",
          "For each policy and tolerated drop d, the fastest threshold whose accuracy on **validation** is within d "
          "of running to T, then measured on test: timestep speed-up T / mean exit step, the realised test drop "
          "(pt), the test accuracy at the exit (%) and the energy per sample at exit (µJ, METHODS §8). Compare "
          "variants on the accuracy at their exits, not only on speed-up: each drop is measured from the variant's "
          "own full-T accuracy, so a variant that ends lower may exit sooner without answering better. "
          "**fixed T** is what a user without a cutoff would run: the fewest steps whose validation accuracy is "
          "within d of T, for every sample; "
          "*vs fixed T* is its step count over the policy's mean exit (above 1: the cutoff saves steps over "
          "simply running fewer of them). **+ cap** is the policy with a step cap chosen on validation together "
          "with its threshold (`max_step`, shown as its mean over seeds): a sample that has not fired by then "
          "stops there. Energy is shown where every seed's analysis counted it (capped exits added to an older "
          "analysis are not counted).", "",
          "| variant | policy | d | speed-up | mean exit | test drop (pt) | acc at exit (%) | vs fixed T | energy (µJ) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for v, e in vs.items():
        st = e["stats"]
        for d in DROPS:
            for name in exit_rules(st):
                k = f"{name}@{d}:"
                energy = st.get(k + "energy_uj") or {}
                energy = _fmt(energy, 1, 3) if energy.get("n") == len(e["seeds"]) else "–"
                label = {"timestep": "fixed T"}.get(name, name)
                if name.endswith("+cap"):
                    label = f"{name[:-4]} + cap {_fmt(st[k + 'max_step'], 1, 1)}"
                L.append(f"| {v} | {label} | {100 * d:g} pt | "
                         f"{_fmt(st[k + 'speedup'])}× | {_fmt(st[k + 'mean_exit_step'])} | "
                         f"{_fmt(st[k + 'test_drop'], 100)} | {_fmt(st.get(k + 'exit_accuracy'), 100)} | "
                         + ("1" if name == "timestep" else f"{_fmt(st[k + 'vs_fixed'])}×")
                         + f" | {energy} |")
    L += ["", "## Full-T cost and the oracle (test)", "",
          "| variant | final acc (%) | val acc (%) | firing rate | spikes / sample | energy full T (µJ) | "
          "OCT mean exit | images/s (full T) |", "|---|---|---|---|---|---|---|---|"]
    for v, e in vs.items():
        st = e["stats"]
        L.append(f"| {v} | {_fmt(st['final_accuracy'], 100)} | {_fmt(st['val_accuracy'], 100)} | "
                 f"{_fmt(st['firing_rate'], 1, 4)} | {_fmt(st['spikes_per_sample'], 1, 0)} | "
                 f"{_fmt(st['energy_uj_full'], 1, 3)} | {_fmt(st['oct_mean_exit'])} | "
                 f"{_fmt(st.get('images_per_s'), 1, 0)} |")
    base_v = summary["baseline"]
    others = [v for v in vs if v != base_v]
    if others:
        L += ["", f"## Paired differences from {base_v} (same seed; mean ± std over seeds)", "",
              "| variant | acc t=1 (pt) | final acc (pt) | softmax speed-up @0.6 | topk speed-up @0.6 | "
              "softmax @1 | topk @1 | acc at softmax exit @0.6 (pt) | acc at topk exit @0.6 (pt) | firing rate |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for v in others:
            pd = vs[v]["paired_diff"]
            L.append(f"| {v} | {_fmt_diff(pd['acc_t1'], 100)} | {_fmt_diff(pd['final_accuracy'], 100)} | "
                     f"{_fmt_diff(pd['softmax@0.006:speedup'])} | {_fmt_diff(pd['topk@0.006:speedup'])} | "
                     f"{_fmt_diff(pd['softmax@0.01:speedup'])} | {_fmt_diff(pd['topk@0.01:speedup'])} | "
                     f"{_fmt_diff(pd['softmax@0.006:exit_accuracy'], 100)} | "
                     f"{_fmt_diff(pd['topk@0.006:exit_accuracy'], 100)} | {_fmt_diff(pd['firing_rate'], 1, 4)} |")
        L += ["", "Beyond seed noise? The 95 % confidence interval of each paired mean (Student's t over seeds) "
              "and the seeds on which the variant is ahead / level / behind the baseline; **beyond noise** where "
              "the interval excludes 0. The interval is over seeds on this one test split: with n test samples, "
              "one sample is 100/n pt.", "",
              "| variant | acc t=1 (pt) | final acc (pt) | softmax speed-up @0.6 | topk speed-up @0.6 | "
              "acc at softmax exit @0.6 (pt) | acc at topk exit @0.6 (pt) |", "|---|---|---|---|---|---|---|"]
        for v in others:
            pd = vs[v]["paired_diff"]
            L.append(f"| {v} | {_fmt_ci(pd['acc_t1'], 100)} | {_fmt_ci(pd['final_accuracy'], 100)} | "
                     f"{_fmt_ci(pd['softmax@0.006:speedup'])} | {_fmt_ci(pd['topk@0.006:speedup'])} | "
                     f"{_fmt_ci(pd['softmax@0.006:exit_accuracy'], 100)} | {_fmt_ci(pd['topk@0.006:exit_accuracy'], 100)} |")
        matched = [v for v in others if "softmax@0.006:matched_speedup" in vs[v]["paired_diff"]]
        if matched:
            L += ["", f"## Paired at the same validation bar (from {base_v})", "",
                  "The calibrated exits above measure d from each network's own full-T accuracy, so a variant that "
                  "ends lower may exit sooner by that alone. Here both runs of a seed exit at the fastest threshold "
                  "that keeps their *validation* accuracy at or above the same bar: the lower of the two full-T "
                  "validation accuracies minus d. Steps saved (the baseline's mean exit step minus the variant's; "
                  "steps, not speed-ups, so that a variant of another T compares too) above 0 is an earlier answer at "
                  "the same accuracy. Paired mean ± std, then the 95 % interval and the seeds ahead / level / behind.",
                  "",
                  "| variant | d | softmax steps saved | topk steps saved | acc at softmax exit (pt) | "
                  "acc at topk exit (pt) |", "|---|---|---|---|---|---|"]
            for v in matched:
                pd = vs[v]["paired_diff"]
                for d in DROPS:
                    sts = [(pd[f"{n}@{d}:matched_{k}"], sc)
                           for k, sc in (("steps_saved", 1.0), ("exit_accuracy", 100.0)) for n in POLICIES]
                    cell = [f"{_fmt_diff(st, sc)}, {_fmt_ci(st, sc)}" for st, sc in sts]
                    L.append(f"| {v} | {100 * d:g} pt | " + " | ".join(cell) + " |")
    L += ["", "## For comparison with the papers: speed-up read off the test curve", "",
          "The papers report the fastest point of the trade-off curve within d of full-T accuracy *on the test "
          "set*; that selects on test, so it is shown only for comparison, never as a calibrated result.", "",
          "| variant | softmax @0.6 | topk @0.6 | softmax @1 | topk @1 |", "|---|---|---|---|---|"]
    for v, e in vs.items():
        st = e["stats"]
        L.append(f"| {v} | " + " | ".join(f"{_fmt(st[f'{n}@{d}:test_curve_speedup'])}×"
                                            for d in DROPS for n in POLICIES) + " |")
    L += ["", "Plots: `accuracy_per_step.png`, `learning_curves.png`, `tradeoff.png`, `speedup.png`, `paired.png`. Per run: `<variant>/seed<k>/` "
          "(config.yaml, log.csv, metrics.json, analysis.json).", ""]
    return "\n".join(L)


def plot_summary(summary: dict, out: Path) -> None:
    from . import plots

    vs = summary["variants"]
    if not vs:
        return
    plots.ablation_accuracy({v: e["acc_per_step"]["test"] for v, e in vs.items()}, out / "accuracy_per_step.png",
                            "Accuracy per timestep (test, mean ± std over seeds)")
    curves = {v: e["val_per_epoch"] for v, e in vs.items() if len(e.get("val_per_epoch") or []) >= 2}
    if curves:
        plots.ablation_accuracy(curves, out / "learning_curves.png", "Validation accuracy per epoch (mean ± std over seeds)",
                                xlabel="epoch", ylabel="validation accuracy (%)", log_x=False)
    plots.ablation_tradeoff({v: e["curves"] for v, e in vs.items()}, {v: e["oct"] for v, e in vs.items()},
                            out / "tradeoff.png")
    rules = min((exit_rules(e["stats"]) for e in vs.values()), key=len)  # the rows every variant has
    plots.ablation_speedup({v: e["stats"] for v, e in vs.items()}, rules, DROPS, out / "speedup.png")
    others = {v: e["paired_diff"] for v, e in vs.items() if v != summary["baseline"]}
    if others:
        plots.ablation_paired(others, PAIRED_PLOT, summary["baseline"], out / "paired.png")
