"""``fewstep eval``, ``cutoff``, ``tradeoff``, ``stream``, ``energy`` and ``export``: the commands that run or
write a trained network (the parser is :mod:`fewstep.cli`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _table(rows: dict[str, list[float]]) -> str:
    names = list(rows)
    T = len(next(iter(rows.values())))
    lines = ["   t  " + "  ".join(f"{n:>8s}" for n in names)]
    for t in range(T):
        lines.append(f"{t + 1:4d}  " + "  ".join(f"{100 * rows[n][t]:7.2f}%" for n in names))
    return "\n".join(lines)


def _tradeoff_table(r: dict, max_drop: float = 0.01) -> str:
    """For each policy: the fastest setting whose *validation* accuracy is within ``max_drop`` of full T
    (:func:`fewstep.calibration.fastest_point`), read on the report's split."""
    from . import calibration as _cal

    s = r["split"]
    lines = [f"{'policy':10s} {'setting':>14s} {'val acc':>8s} {s + ' acc':>9s} {'drop':>6s} {'mean exit':>9s} "
             f"{'speed-up':>8s}",
             f"{'full T':10s} {'t=' + str(r['T']):>14s} {100 * r['val_full_accuracy']:7.2f}% "
             f"{100 * r['full_accuracy']:8.2f}% {0:+6.1f} {r['T']:9.2f} {1:7.2f}x",
             f"{'OCT':10s} {'(oracle)':>14s} {'':>8s} {100 * r['oct']['accuracy']:8.2f}% "
             f"{100 * (r['full_accuracy'] - r['oct']['accuracy']):+6.1f} {r['oct']['mean_exit_step']:9.2f} "
             f"{r['T'] / r['oct']['mean_exit_step']:7.2f}x"]
    for name, pts in r["policies"].items():
        p = _cal.fastest_point(pts, r["val_full_accuracy"], max_drop)
        if p is None:
            continue
        setting = f"t={p['t']}" if "t" in p else f"eps={p['epsilon']:g}"
        lines.append(f"{name:10s} {setting:>14s} {100 * p['val_accuracy']:7.2f}% {100 * p['accuracy']:8.2f}% "
                     f"{100 * (r['full_accuracy'] - p['accuracy']):+6.1f} {p['mean_exit_step']:9.2f} "
                     f"{r['T'] / p['mean_exit_step']:7.2f}x")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from .metrics import evaluate
    from .train import load_run, resolve_device

    model, cfg, bundle = load_run(args.run, weights=args.weights, device=args.device, data_root=args.data_root)
    dev = resolve_device(args.device)
    res = evaluate(model, bundle.split(args.split), cfg.data.T, bundle.kind, cfg.data.encoding,
                   cfg.train.eval_batch_size, dev)
    print(_table({args.split: res["accuracy_per_step"]}))
    print("firing rate per spiking layer:")
    for k, v in res["firing_rates"].items():
        print(f"  {k:30s} {v:.4f}")
    path = Path(args.run) / f"eval_{args.split}.json"
    path.write_text(json.dumps({"split": args.split, "weights": args.weights, **res}, indent=2))
    print(f"wrote {path}")
    return 0


def cmd_cutoff(args) -> int:
    from .reports import cutoff_report

    if args.max_drop is not None and args.epsilon is not None:
        raise ValueError("give either --epsilon or --max-drop (with --confidence), not both")
    if args.step is not None and args.policy != "timestep":
        raise ValueError(f"--step sets the timestep policy's exit step; policy {args.policy!r} takes --epsilon or "
                         "--max-drop")
    if args.epsilon is not None and args.policy == "timestep":
        raise ValueError("--epsilon does not apply to the timestep policy; give --step (or --max-drop)")
    if args.calibration is not None and (args.epsilon is not None or args.max_drop is not None or args.step is not None
                                         or args.mc_dropout or args.max_step is not None):
        raise ValueError("--calibration reuses saved thresholds: --epsilon, --max-drop, --step, --max-step and "
                         "--mc-dropout would be ignored; give one or the other")
    if args.bound != "drop" and args.max_drop is None:
        raise ValueError("--bound says what --max-drop bounds: give --max-drop D with it")
    r = cutoff_report(args.run, args.policy, args.epsilon, args.step, args.max_drop, args.confidence, args.split,
                      args.batch_size, args.calibration, repeats=args.repeats, mc_dropout=args.mc_dropout,
                      device=args.device, graphs=args.graphs, max_step=args.max_step, data_root=args.data_root,
                      progress=True, timing_samples=args.timing_samples or None, bound=args.bound)
    cap = "" if r.get("max_step") is None else f", max_step={r['max_step']}"
    setting = f"{r['params'] if r['policy'] == 'timestep' else 'epsilon=' + str(r['epsilon'])}{cap}"
    name = r["policy"]
    if "target" in r and not r["target"]["passed"] and name != args.policy:  # every sample runs to T (note below)
        name, setting = args.policy, f"-> no setting met the target: timestep t = {r['T']}"
    print(f"policy {name} {setting} on {r['split']} ({r['n']} samples, T = {r['T']}, batch {r['batch_size']})")
    print(f"  accuracy      {100 * r['accuracy']:.2f}% (full T: {100 * r['full_accuracy']:.2f}%, "
          f"drop {100 * r['accuracy_drop']:+.2f} pt)")
    print(f"  mean exit     {r['mean_exit_step']:.2f} of {r['T']} -> timestep speed-up {r['timestep_speedup']:.2f}x "
          f"(OCT oracle: {r['oct_mean_exit_step']:.2f})")
    q1, q3 = r["wallclock_speedup_iqr"]
    on = "" if r["timing_samples"] == r["n"] else f" on {r['timing_samples']} of the {r['n']} samples"
    print(f"  wall clock    {r['seconds_full']:.3f}s -> {r['seconds_early_exit']:.3f}s per pass{on}: "
          f"{r['wallclock_speedup']:.2f}x (median of {len(r['wallclock_speedup_rounds'])} paired rounds, "
          f"quartiles {q1:.2f}-{q3:.2f})")
    if r.get("timing_note"):
        print(f"  note          {r['timing_note']}")
    vs = r["wallclock_speedup_vs_multistep"]
    print(f"  vs multi-step {r['seconds_full_multistep']:.3f}s per pass running all T steps in one call per batch: "
          f"early exit is {vs:.2f}x {'faster' if vs >= 1 else 'slower'}")
    if vs < 1:
        print("  note          here one multi-step pass to T is faster than stepping with early exit: steps cost "
              "launches, not compute, and a batch waits for its slowest sample. Early exit still saves the steps, "
              "spikes and energy above; for time, stream many inputs (continuous batching), cap the steps "
              "(--max-step) or run the network multi-step (docs/anytime.md)")
    print(f"  SOPs/sample   {r['sops_per_sample']:.3g} (full T {r['sops_per_sample_full']:.3g}); "
          f"energy {r['energy_uj_per_sample']:.3g} uJ (full {r['energy_uj_per_sample_full']:.3g})")
    for line in _breakdown_lines(r):
        print(line)
    if "target" in r:
        t = r["target"]
        on = "the share of samples harmed" if t.get("bound_on") == "harm" else "the drop"
        print(f"  target        drop <= {100 * t['max_drop']:.2f} pt at {100 * t['confidence']:.0f}% confidence: "
              f"upper bound {100 * t['bound']:.2f} pt on {on}, from {t['n_test']} validation samples")
        if t.get("max_step_auto") and t["passed"]:
            k = t["max_step"]
            print(f"  step cap      {'none' if k is None else k} (--max-step auto: its path of settings was chosen "
                  f"on the other {t['n_fit']} validation samples{'; no cap passed faster' if k is None else ''})")
        if not t["passed"]:
            print(_target_missed(args.policy, t))
    print(f"wrote {Path(args.run) / ('cutoff_' + args.policy + '.json')}, the exits per sample (_exits.csv) and "
          f"their histogram (_exits.png)")
    return 0


def _breakdown_lines(r: dict, max_classes: int = 20) -> list[str]:
    """The exits by step (grouped into at most 8 ranges beyond T = 12) and by class, as table lines."""
    T, hist, acc = r["T"], r["exit_histogram"], r["accuracy_by_exit_step"]
    edges = list(range(T + 1)) if T <= 12 else [round(T * i / 8) for i in range(9)]
    bounds = [(a + 1, b) for a, b in zip(edges[:-1], edges[1:])]
    cols = []
    for a, b in bounds:
        n = sum(hist[a - 1:b])
        if n:
            right = sum(hist[t - 1] * acc[t - 1] for t in range(a, b + 1) if acc[t - 1] is not None)
            cols.append((str(a) if a == b else f"{a}-{b}", str(n), f"{100 * right / n:.0f}%"))
    w = max(len(v) for c in cols for v in c)
    lines = [f"  exits         {'step':<8}" + " ".join(c[0].rjust(w) for c in cols),
             f"                {'samples':<8}" + " ".join(c[1].rjust(w) for c in cols),
             f"                {'right':<8}" + " ".join(c[2].rjust(w) for c in cols)]
    pc = r["per_class"]
    shown = pc if len(pc) <= max_classes else sorted(pc, key=lambda c: -c["mean_exit_step"])[:5]
    head = "by class" if len(pc) <= max_classes else f"the {len(shown)} slowest of {len(pc)} classes (all: the JSON)"
    wn = max(5, *(len(c["class"]) for c in shown))
    lines.append(f"  {head}:  {'class':<{wn}}  {'n':>5}  {'full T':>7}  {'at exit':>7}  {'mean exit':>9}")
    pad = " " * (len(head) + 5)
    for c in shown:
        lines.append(f"{pad}{c['class']:<{wn}}  {c['n']:>5}  {100 * c['full_accuracy']:>6.1f}%  "
                     f"{100 * c['accuracy']:>6.1f}%  {c['mean_exit_step']:>9.2f}")
    return lines


def _target_missed(policy: str, t: dict) -> str:
    """Why ``--max-drop`` left every sample at T, and what would change it."""
    n, asked = t["n_test"], 100 * t["max_drop"]
    if t["smallest_bound"] > t["max_drop"]:
        why = (f"on {n} validation samples even a setting that changes no answer is bounded at "
               f"{100 * t['smallest_bound']:.2f} pt at {100 * t['confidence']:.0f}% confidence, more than the "
               f"{asked:.2f} pt asked")
    else:
        first = t["tested"][0]
        setting = ", ".join(f"{k}={v:g}" for k, v in first["params"].items())
        helps = f" and helps {first['helped']}" if t.get("bound_on", "drop") == "drop" and "helped" in first else ""
        why = (f"its most conservative setting ({setting}) already harms {first['harmed']}{helps} of {n} validation "
               f"samples (bound {100 * first['bound']:.2f} pt > {asked:.2f} pt)")
    return (f"  note          no {policy} setting met the target, so every sample runs to T: {why}. Allow a larger "
            "--max-drop, a lower --confidence, or validate on more samples (data.val_fraction)")


def cmd_tradeoff(args) -> int:
    from .reports import tradeoff_report

    r = tradeoff_report(args.run, args.split, data_root=args.data_root)
    print(f"each policy's fastest setting within {100 * args.max_drop:g} pt of full-T accuracy on validation, "
          f"read on {args.split}:")
    print(_tradeoff_table(r, args.max_drop))
    print(f"wrote {Path(args.run) / 'tradeoff.json'}, tradeoff.png and accuracy_per_step.png")
    return 0


def cmd_stream(args) -> int:
    import torch

    before = torch.get_num_threads()
    try:
        return _stream_cmd(args)
    finally:
        torch.set_num_threads(before)  # (main() called in a process that goes on: tests, notebooks)


def _stream_cmd(args) -> int:
    from . import stream as _stream
    from .runtime import streaming_threads

    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    threads = streaming_threads(args.threads) if str(args.device).startswith("cpu") else None
    if len(args.events) == 1 and not Path(args.events[0]).is_dir() and not args.csv:
        r = _stream.stream_report(args.run, args.events[0], args.policy, args.calibration, args.start_us,
                                  args.end_us, args.realtime, args.device, log=log, plot=args.plot,
                                  data_root=args.data_root)
        if threads:
            r["threads"], r["threads_why"] = threads
        print(json.dumps(r, indent=2) if args.json else "\n".join(_stream.summary_lines(r)))
        return 0
    if args.plot:
        raise ValueError("--plot draws one recording: give a single --events FILE with it")
    r = _stream.stream_many(args.run, args.events, args.policy, args.calibration, args.start_us, args.end_us,
                            args.realtime, args.device, log=log, data_root=args.data_root, progress=True)
    if threads:
        r["summary"]["threads"], r["summary"]["threads_why"] = threads
    print(json.dumps(r, indent=2) if args.json else "\n".join(_stream.many_lines(r)))
    if args.csv:
        log(f"wrote {_stream.write_many_csv(args.csv, r)}")
    return 2 if r["failed"] else 0


def cmd_energy(args) -> int:
    from . import energy as _energy

    r = _energy.energy_report(args.run, args.policy, args.split, args.calibration, args.e_mac, args.e_sop,
                              data_root=args.data_root)
    print("\n".join(_energy.table_lines(r["full"], f"full T ({r['split']})")))
    if "cutoff" in r:
        pol = r["policy"]
        setting = f"t={pol['t']}" if "t" in pol else f"epsilon={pol['epsilon']:g}"
        print("\n".join(_energy.table_lines(r["cutoff"], f"with the {args.policy} cutoff ({setting}), up to each exit")))
    print(f"wrote {r['path']}")
    return 0


def cmd_export(args) -> int:
    from .nir_runs import export_run

    r = export_run(args.run, args.out, dt=args.dt, weights=args.weights, overwrite=args.overwrite)
    print(f"wrote {r['path']}: {len(r['nodes'])} NIR nodes ({', '.join(r['nodes'])}), dt = {r['dt']:g}")
    print(f"re-imported and run on random input: max |logit difference| = {r['max_abs_diff']:.3g}")
    return 0
