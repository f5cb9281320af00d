"""``results.md`` of ``fewstep ablate``: the tables of a :func:`fewstep.ablation_report.aggregate` summary.

Accuracies in %, drops and differences in points; mean ± sample std over seeds, and for paired figures the
95 % interval over seeds with the seeds ahead / level / behind (:func:`_fmt_ci`).
"""

from __future__ import annotations

import json

from .ablation_report import (BOUND_CONFIDENCE, BOUND_KINDS, DROPS, POLICIES, _ms, _paired, bound_n, bound_rules,
                              exit_rules)


def _fmt(st: dict, scale: float = 1.0, digits: int = 2, signed: bool = False) -> str:
    """``mean ± std`` of a :func:`_ms` entry (just the mean for one seed; "–" for none)."""
    if not st or st.get("mean") is None:
        return "–"
    mean = f"{st['mean'] * scale:{'+' if signed else ''}.{digits}f}"
    return mean if st["n"] < 2 else f"{mean} ± {st['std'] * scale:.{digits}f}"


def _fmt_diff(st: dict, scale: float = 1.0, digits: int = 2) -> str:
    return _fmt(st, scale, digits, signed=True)


def _fmt_ci(st: dict, scale: float = 1.0, digits: int = 2) -> str:
    """``[lo, hi] (a/l/b)``: the paired mean's 95 % interval and the seeds ahead / level / behind (of 0, or of the
    entry's ``ref``: 1 for a ratio, whose bounds are then unsigned)."""
    if not st or st.get("mean") is None:
        return "–"
    counts = f"{st['ahead']}/{st['level']}/{st['behind']}"
    if not st.get("ci95"):
        return counts
    lo, hi = st["ci95"]
    ref = st.get("ref", 0.0)
    mark = " **beyond noise**" if lo > ref or hi < ref else ""
    sign = "+" if ref == 0 else ""
    return f"[{lo * scale:{sign}.{digits}f}, {hi * scale:{sign}.{digits}f}] {counts}{mark}"


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


def fixed_t_table(vs: dict) -> list[str]:
    """Each exit against its own network run for the fixed T, seed by seed, with the 95 % intervals over seeds
    (:func:`fewstep.ablation_report.vs_fixed`): does the cutoff save steps over a shorter fixed run at its accuracy?"""
    rows = []
    for v, e in vs.items():
        vf = e.get("vs_fixed") or {}
        for d in DROPS:
            for name in exit_rules(e["stats"])[1:]:
                ratio, acc = vf.get(f"{name}@{d}:vs_fixed"), vf.get(f"{name}@{d}:vs_fixed_accuracy")
                if ratio and ratio.get("n"):
                    label = name.replace("+cap", " + cap")
                    rows.append(f"| {v} | {label} | {100 * d:g} pt | {_fmt(ratio)}× | {_fmt_ci(ratio)} | "
                                f"{_fmt_diff(acc, 100)} | {_fmt_ci(acc, 100)} |")
    if not rows:
        return []
    return ["", "## Against the fixed T, seed by seed", "",
            "Each exit above against the same network run for its fixed T (same seed): the fixed T's steps over "
            "the exit's mean steps (above 1: fewer steps), with the 95 % interval of its mean over seeds and the "
            "seeds above / at / below 1; and the exit's test accuracy minus the fixed T's (pt), with its interval "
            "and the seeds ahead / level / behind. A ratio whose interval lies above 1, with an accuracy "
            "difference whose interval holds 0 or lies above it, is a step saving at the same accuracy.", "",
            "| variant | policy | d | vs fixed T | its interval, seeds above / at / below 1 | acc at exit − fixed T's "
            "(pt) | its interval, seeds ahead / level / behind |", "|---|---|---|---|---|---|---|"] + rows


BOUND_TEXT = {  # what each bounded table's exits bound, in its description
    "bound": ("whose upper confidence bound on its accuracy drop on validation is at most d (`--bound drop`, the "
              "default: an exact test of the drop, the share of samples it harms, right at T and wrong at the exit, "
              "minus the share it helps, wrong at T and right at the exit, from both counts together; "
              "`fewstep.bounds.drop_upper_bound`)"),
    "harm": ("whose one-sided Clopper-Pearson bound on the share of validation samples it harms (right at T, wrong "
             "at the exit) is at most d (`--bound harm`: stricter than the drop bound, it keeps full T's answers, "
             "and where answers change both ways between steps it certifies less)"),
}


def bound_table(vs: dict, base_v: str, kind: str = "bound") -> list[str]:
    """The exits calibrated with a 95 % bound (:func:`fewstep.ablation_analysis.bounded_exits`) on the drop
    (``kind="bound"``) or on the share of samples harmed (``"harm"``), measured on test: did each stay within its
    d, and how many steps does it take against the fixed T under the same bound? Then each variant's paired steps
    saved and accuracy at the exit against the baseline's bounded exits."""
    n_val = min(e["n_val"] for e in vs.values())
    need = {d: bound_n(d, BOUND_CONFIDENCE, kind) for d in DROPS}
    short = [d for d in DROPS if n_val < need[d]]
    rows, paired = [], []
    for v, e in vs.items():
        st, vf, pd = e["stats"], e.get("vs_fixed") or {}, e.get("paired_diff") or {}
        for d in (d for d in DROPS if d not in short):
            for rule in bound_rules(st, kind):
                k = f"{kind}:{rule}@{d}:"
                name = rule.removesuffix("+cap")
                label = {"timestep": "fixed T"}.get(name, name)
                if rule.endswith("+cap"):
                    label += f" + cap {_fmt(st[k + 'max_step'], 1, 1)}"
                within, ratio = st[k + "within"], vf.get(k + "vs_fixed")
                rows.append(f"| {v} | {label} | {100 * d:g} pt | {_fmt(st[k + 'mean_exit_step'])} | "
                            f"{_fmt(st[k + 'speedup'])}× | {_fmt(st[k + 'test_drop'], 100)} | "
                            f"{_fmt(st[k + 'exit_accuracy'], 100)} | "
                            f"{round(within['mean'] * within['n'])}/{within['n']} | "
                            f"{_fmt(st[k + 'ran_to_T'], 100, 1)} | "
                            + ("1" if rule == "timestep" else f"{_fmt(ratio)}×, {_fmt_ci(ratio)}") + " |")
                if v != base_v and rule != "timestep" and (pd.get(k + "mean_exit_step") or {}).get("n"):
                    saved = _paired([0.0 - x for x in pd[k + "mean_exit_step"]["values"]])  # baseline's − variant's
                    acc = pd[k + "exit_accuracy"]
                    paired.append(f"| {v} | {label} | {100 * d:g} pt | {_fmt_diff(saved)}, {_fmt_ci(saved)} | "
                                  f"{_fmt_diff(acc, 100)}, {_fmt_ci(acc, 100)} |")
    if not any(bound_rules(e["stats"], kind) for e in vs.values()):
        return []
    flag = "" if kind == "bound" else f" --bound {BOUND_KINDS[kind][1]}"
    L = ["", f"## Calibrated with a {100 * BOUND_CONFIDENCE:g} % bound on {BOUND_KINDS[kind][2]} (test)", "",
         f"As `fewstep cutoff --max-drop d --confidence {BOUND_CONFIDENCE:g}{flag}` calibrates: for each rule the most "
         f"aggressive setting {BOUND_TEXT[kind]}, tested in a fixed sequence; top-k's thresholds and the step caps "
         "(**+ cap**, `--max-step auto`, shown as their mean over seeds, T where none was chosen) are fitted on one "
         "half of validation and tested on the other. Then measured on test. Unlike the calibrated exits above, the "
         "drop is bounded, not estimated: "
         "*within d* counts the seeds whose test drop stayed within d. **fixed T** is the fixed step count under "
         "the same bound; *vs fixed T* its steps over the rule's mean exit, seed by seed, with the 95 % interval and "
         "the seeds above / at / below 1. *ran to T*: the share of test samples that ran every step.", ""]
    L += [f"With no answer changed, the bound reaches d only from n = {need[DROPS[0]]} validation samples at "
          f"{100 * DROPS[0]:g} pt and {need[DROPS[-1]]} at {100 * DROPS[-1]:g} pt (twice as many for the halved "
          "rules)." + (f" This ablation has {n_val}: at {' and '.join(f'{100 * d:g} pt' for d in short)} every "
                        "bounded rule runs every sample to T (not tabled)." if short else ""), ""]
    if not rows:
        return L[:-1]
    L += ["| variant | rule | d | mean exit | speed-up | test drop (pt) | acc at exit (%) | within d on test | "
          "ran to T (%) | vs fixed T |", "|---|---|---|---|---|---|---|---|---|---|"] + rows
    if paired:
        L += ["", f"Paired with {base_v}'s bounded exits (same seed, same rule and d): steps saved (its mean exit "
              "step minus the variant's) and the accuracy at the exit (pt), each with its 95 % interval and the seeds "
              "ahead / level / behind. Each exit's bound is on the drop from its own network's full-T accuracy.", "",
              "| variant | rule | d | steps saved | acc at exit (pt) |", "|---|---|---|---|---|"] + paired
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
    L += fixed_t_table(vs)
    L += bound_table(vs, summary["baseline"], "bound") + bound_table(vs, summary["baseline"], "harm")
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
    L += ["", "Plots: `accuracy_per_step.png`, `learning_curves.png`, `tradeoff.png`, `speedup.png`, `bounded.png`, "
          "`bounded_harm.png`, `paired.png` (those that apply). Per run: `<variant>/seed<k>/` "
          "(config.yaml, log.csv, metrics.json, analysis.json).", ""]
    return "\n".join(L)
