"""The ``fewstep`` command line: ``demo``, ``train``, ``eval``, ``cutoff``, ``tradeoff``, ``ablate``, ``convert``,
``stream``, ``energy``, ``export``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import config as _config
from .runtime import tune_for_device

# commands that run a trained network (on --device, else the CPU): glibc's allocator is tuned for them
INFERENCE_COMMANDS = ("eval", "cutoff", "tradeoff", "stream", "energy")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def _fraction(lo_open: bool, hi_open: bool):
    """A float in [0, 1] with the chosen ends open, e.g. (0, 1) or [0, 1)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}, "
                                             f"got {v}")
        return v
    return parse


def _table(rows: dict[str, list[float]]) -> str:
    names = list(rows)
    T = len(next(iter(rows.values())))
    lines = ["   t  " + "  ".join(f"{n:>8s}" for n in names)]
    for t in range(T):
        lines.append(f"{t + 1:4d}  " + "  ".join(f"{100 * rows[n][t]:7.2f}%" for n in names))
    return "\n".join(lines)


def demo_config() -> _config.Config:
    """The embedded demo (same as configs/digits.yaml): a small spiking CNN on scikit-learn's 8×8 digits,
    Poisson rate coding over T = 8 steps (evidence builds up over time), TET loss."""
    return _config.from_dict({
        "data": {"name": "digits", "T": 8, "encoding": "poisson", "val_fraction": 0.15},
        "model": {"name": "cnn", "options": {"channels": [32, 64], "hidden": 128}},
        "train": {"epochs": 25, "batch_size": 64, "optimizer": "adamw", "lr": 2e-3, "loss": "tet"},
    })


def cmd_demo(args) -> int:
    from . import plots
    from .train import Trainer

    cfg = _config.from_dict(_config.apply_overrides(demo_config().to_dict(), args.set))
    out = Path(args.out)
    if not args.resume:
        from .train import clear_run_folder

        clear_run_folder(out)  # an earlier demo's files only; a folder of other files is refused
    print(f"fewstep demo: training a spiking CNN ({cfg.model.name}) on the 8x8 digits, {cfg.data.encoding} coding, "
          f"T = {cfg.data.T}, {cfg.train.epochs} epochs ...")
    t0 = time.perf_counter()
    m = Trainer(cfg, out, log=(print if args.verbose else (lambda s: None))).fit()
    dt = time.perf_counter() - t0
    print(f"\ntrained in {dt:.1f}s; best validation accuracy {100 * m['val_accuracy']:.2f}% (epoch {m['best_epoch']})\n")
    print("accuracy of the running-mean prediction at each timestep (best-on-validation weights):")
    print(_table({"val": m["val_accuracy_per_step"], "test": m["accuracy_per_step"]}))
    png = plots.accuracy_per_step({"validation": m["val_accuracy_per_step"], "test": m["accuracy_per_step"]},
                                  out / "accuracy_per_step.png", "fewstep demo: digits, spiking CNN")

    from .reports import cutoff_report, tradeoff_report

    print("\nanytime inference: each policy's fastest setting within 1 pt of full-T accuracy on validation "
          "(thresholds fitted there too), then run on test:")
    r = tradeoff_report(out, "test")
    print(_tradeoff_table(r))
    from . import anytime as _any
    from . import cutoff as _cf
    from .train import load_run

    model, _, bundle = load_run(out)
    Yv, yv = _any.calibration_outputs(model, bundle.val, cfg.data.T, bundle.kind, cfg.data.encoding)
    picks = [(n, *_cf.fastest_within(n, Yv, yv, 0.01)) for n in ("softmax", "topk", "spikecp", "timestep")]
    name, pol, val = min(picks, key=lambda p: p[2]["mean_exit_step"])
    cal = _cf.save(pol, out / f"calibration_{name}.json", {"model": cfg.model.name, "dataset": cfg.data.name,
                                                          "T": cfg.data.T, "calibration_split": "val"})
    c = cutoff_report(out, name, calibration=cal, repeats=3)
    setting = f"t={pol.t}" if name == "timestep" else f"epsilon={pol.epsilon:g}"
    print(f"\nreal early exit with the fastest policy within 1 pt on validation: {name} ({setting}), validation "
          f"accuracy {100 * val['accuracy']:.2f}% at mean exit step {val['mean_exit_step']:.2f}")
    print(f"  test accuracy {100 * c['accuracy']:.2f}% (full T {100 * c['full_accuracy']:.2f}%), mean exit step "
          f"{c['mean_exit_step']:.2f} of {c['T']}: {c['timestep_speedup']:.2f}x fewer steps, "
          f"{c['wallclock_speedup']:.2f}x faster in wall-clock time (batch {c['batch_size']})")
    print(f"\nfiles in {out.resolve()}:")
    for f in ("config.yaml", "checkpoint.pt", "log.csv", "metrics.json", png.name, "tradeoff.png", "tradeoff.json",
              f"calibration_{name}.json", f"cutoff_{name}.json", f"cutoff_{name}_exits.png"):
        print(f"  {f}")
    return 0


def cmd_train(args) -> int:
    from .train import Trainer

    from .distributed import end_worker, shutdown

    cfg = _config.load(args.config, args.set)
    out = Path(args.out)
    try:
        trainer = Trainer(cfg, out)  # under torchrun: joins the process group (fewstep.distributed)
        m = trainer.fit()
    finally:
        shutdown()
    if trainer.is_main:
        print(f"accuracy per timestep with the weights of epoch {m['best_epoch']} of {m['epochs']}, "
              f"the best on validation:")
        print(_table({"val": m["val_accuracy_per_step"], "test": m["accuracy_per_step"]}))
        print(f"wrote {out}/config.yaml, checkpoint.pt, log.csv, metrics.json")
    if trainer.dist is not None:
        end_worker(0)  # under torchrun: skip the interpreter teardown that can abort (fewstep.distributed)
    return 0


def _data_root_arg(p) -> None:
    p.add_argument("--data-root", metavar="DIR", help="read the run's dataset from DIR instead of the folder it was "
                   "trained on (a run or its data moved to another machine)")


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
    if args.max_step is not None and args.policy == "timestep":
        raise ValueError("--max-step caps a threshold policy; the timestep policy's exit step is --step")
    r = cutoff_report(args.run, args.policy, args.epsilon, args.step, args.max_drop, args.confidence, args.split,
                      args.batch_size, args.calibration, repeats=args.repeats, mc_dropout=args.mc_dropout,
                      device=args.device, graphs=args.graphs, max_step=args.max_step, data_root=args.data_root)
    cap = "" if r.get("max_step") is None else f", max_step={r['max_step']}"
    print(f"policy {r['policy']} {r['params'] if r['policy'] == 'timestep' else 'epsilon=' + str(r['epsilon'])}{cap} "
          f"on {r['split']} ({r['n']} samples, T = {r['T']}, batch {r['batch_size']})")
    print(f"  accuracy      {100 * r['accuracy']:.2f}% (full T: {100 * r['full_accuracy']:.2f}%, "
          f"drop {100 * r['accuracy_drop']:+.2f} pt)")
    print(f"  mean exit     {r['mean_exit_step']:.2f} of {r['T']} -> timestep speed-up {r['timestep_speedup']:.2f}x "
          f"(OCT oracle: {r['oct_mean_exit_step']:.2f})")
    q1, q3 = r["wallclock_speedup_iqr"]
    print(f"  wall clock    {r['seconds_full']:.3f}s -> {r['seconds_early_exit']:.3f}s per pass: {r['wallclock_speedup']:.2f}x "
          f"(median of {len(r['wallclock_speedup_rounds'])} paired rounds, quartiles {q1:.2f}-{q3:.2f})")
    print(f"  SOPs/sample   {r['sops_per_sample']:.3g} (full T {r['sops_per_sample_full']:.3g}); "
          f"energy {r['energy_uj_per_sample']:.3g} uJ (full {r['energy_uj_per_sample_full']:.3g})")
    if "target" in r:
        t = r["target"]
        print(f"  target        drop <= {100 * t['max_drop']:.2f} pt at {100 * t['confidence']:.0f}% confidence: "
              f"upper bound {100 * t['bound']:.2f} pt on {t['n_test']} validation samples")
        if not t["passed"]:
            print(_target_missed(args.policy, t))
    print(f"wrote {Path(args.run) / ('cutoff_' + args.policy + '.json')} and the exit histogram PNG")
    return 0


def _target_missed(policy: str, t: dict) -> str:
    """Why ``--max-drop`` left every sample at T, and what would change it."""
    n, asked = t["n_test"], 100 * t["max_drop"]
    if t["smallest_bound"] > t["max_drop"]:
        why = (f"on {n} validation samples even a setting that harms none is bounded at "
               f"{100 * t['smallest_bound']:.2f} pt at {100 * t['confidence']:.0f}% confidence, more than the "
               f"{asked:.2f} pt asked")
    else:
        first = t["tested"][0]
        setting = ", ".join(f"{k}={v:g}" for k, v in first["params"].items())
        why = (f"its most conservative setting ({setting}) already harms {first['harmed']} of {n} validation "
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


def cmd_ablate(args) -> int:
    from .ablation import Ablation

    if args.config is None and args.variants is None:  # everything else from OUT/ablation.json
        if args.set or args.variant_set:
            raise ValueError("--set and --variant-set change an ablation's configs: give the config and --variants "
                             "too (or a new --out)")
        abl = Ablation.from_folder(args.out)
        abl.reuse = Ablation.reuse_dirs(args.reuse)
        if args.seeds is not None:  # more (or other) seeds of the same ablation
            abl = Ablation(abl.config_path, list(abl.specs.values()), args.seeds, args.out, abl.overrides,
                           abl.raw_variant_sets, convert_T=abl.convert_T, base=abl.base, reuse=args.reuse)
    elif args.config is None or args.variants is None:
        raise ValueError("give both the config and --variants to start an ablation, or neither to continue or "
                         f"report the one in --out ({args.out}/ablation.json)")
    else:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        abl = Ablation(args.config, variants, "3" if args.seeds is None else args.seeds, args.out, args.set,
                       args.variant_set, convert_T=args.convert_T, reuse=args.reuse)
    summary = abl.run(analyse_only=args.analyse_only)
    print()
    print((Path(args.out) / "results.md").read_text())
    missing = [label for label in abl.variants if label not in summary["variants"]]
    if missing:
        print(f"not finished yet: {', '.join(missing)}; run the same command again to continue")
    return 0


def cmd_convert(args) -> int:
    from .qcfs import convert_run

    convert_run(args.run, args.out, T=args.T, weights=args.weights, overwrite=args.overwrite)
    print(f"next: fewstep eval {args.out}; fewstep cutoff {args.out} --policy topk --max-drop 0.01")
    return 0


def cmd_stream(args) -> int:
    from . import stream as _stream

    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    r = _stream.stream_report(args.run, args.events, args.policy, args.calibration, args.start_us, args.end_us,
                              args.realtime, args.device, log=log, plot=args.plot, data_root=args.data_root)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print("\n".join(_stream.summary_lines(r)))
    return 0


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
    from .nir_io import export_run

    r = export_run(args.run, args.out, dt=args.dt, weights=args.weights, overwrite=args.overwrite)
    print(f"wrote {r['path']}: {len(r['nodes'])} NIR nodes ({', '.join(r['nodes'])}), dt = {r['dt']:g}")
    print(f"re-imported and run on random input: max |logit difference| = {r['max_abs_diff']:.3g}")
    return 0


def _tradeoff_table(r: dict, max_drop: float = 0.01) -> str:
    """For each policy: the fastest setting whose *validation* accuracy is within ``max_drop`` of full T
    (:func:`fewstep.cutoff.fastest_point`), read on the report's split."""
    from . import cutoff as _cf

    s = r["split"]
    lines = [f"{'policy':10s} {'setting':>14s} {'val acc':>8s} {s + ' acc':>9s} {'drop':>6s} {'mean exit':>9s} "
             f"{'speed-up':>8s}",
             f"{'full T':10s} {'t=' + str(r['T']):>14s} {100 * r['val_full_accuracy']:7.2f}% "
             f"{100 * r['full_accuracy']:8.2f}% {0:+6.1f} {r['T']:9.2f} {1:7.2f}x",
             f"{'OCT':10s} {'(oracle)':>14s} {'':>8s} {100 * r['oct']['accuracy']:8.2f}% "
             f"{100 * (r['full_accuracy'] - r['oct']['accuracy']):+6.1f} {r['oct']['mean_exit_step']:9.2f} "
             f"{r['T'] / r['oct']['mean_exit_step']:7.2f}x"]
    for name, pts in r["policies"].items():
        p = _cf.fastest_point(pts, r["val_full_accuracy"], max_drop)
        if p is None:
            continue
        setting = f"t={p['t']}" if "t" in p else f"eps={p['epsilon']:g}"
        lines.append(f"{name:10s} {setting:>14s} {100 * p['val_accuracy']:7.2f}% {100 * p['accuracy']:8.2f}% "
                     f"{100 * (r['full_accuracy'] - p['accuracy']):+6.1f} {p['mean_exit_step']:9.2f} "
                     f"{r['T'] / p['mean_exit_step']:7.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fewstep", description="Spiking networks that answer in few timesteps.")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="train a small SNN on the 8x8 digits (about 30 s on a 2-core CPU)")
    d.add_argument("--out", default="fewstep-demo", help="output folder (default: ./fewstep-demo)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    d.add_argument("--resume", action="store_true", help="continue an earlier demo run instead of starting over")
    d.add_argument("-v", "--verbose", action="store_true", help="print every epoch")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="train from a YAML config")
    t.add_argument("config", help="YAML config (see configs/ and docs/config.md)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set train.lr=0.01 (repeatable)")
    t.add_argument("--out", required=True, help="run folder; an interrupted run in it resumes")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="accuracy per timestep and firing rates of a trained run")
    e.add_argument("run", help="run folder written by 'fewstep train'")
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument("--weights", default="best", choices=["best", "last"])
    e.add_argument("--device", default="cpu")
    _data_root_arg(e)
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("cutoff", help="calibrate a cutoff policy on validation data and run real early exit")
    c.add_argument("run", help="run folder written by 'fewstep train'")
    c.add_argument("--policy", required=True, choices=["topk", "softmax", "spikecp", "timestep"])
    c.add_argument("--epsilon", type=_fraction(False, True), help="softmax/topk/spikecp: tolerated error in [0, 1) "
                   "(default 0.01)")
    c.add_argument("--step", type=_int_at_least(1), help="timestep policy: the fixed exit step, 1..T (default T/2)")
    c.add_argument("--max-drop", type=_fraction(False, True), help="calibrate to a target: largest accuracy drop "
                   "accepted, as a fraction in [0, 1) (0.005 = 0.5 pt)")
    c.add_argument("--confidence", type=_fraction(True, True), default=0.95, help="confidence of the --max-drop bound, "
                   "in (0, 1) (default 0.95)")
    c.add_argument("--split", default="test", choices=["test", "val"], help="split to report on (calibration "
                   "always uses val)")
    c.add_argument("--batch-size", type=_int_at_least(1), default=64)
    c.add_argument("--repeats", type=_int_at_least(1), default=5, help="timing rounds of ~0.5 s each, full T and early exit "
                   "interleaved; the median is reported (default 5)")
    c.add_argument("--calibration", help="reuse a saved calibration JSON instead of calibrating")
    c.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (early exit runs there)")
    c.add_argument("--graphs", default="auto", choices=["auto", "off", "cuda", "emulate"],
                   help="step runner: auto replays CUDA graphs on CUDA and steps eagerly elsewhere (docs/anytime.md)")
    c.add_argument("--mc-dropout", type=_fraction(False, True), default=0.0, help="calibrate under dropout of this rate on every "
                   "synaptic layer's input (the seed code's conservative perturbation; 0 = off)")
    c.add_argument("--max-step", type=_int_at_least(1), help="step cap: a sample that has not exited by this step "
                   "stops there (with --max-drop, the bound covers the capped policy); docs/anytime.md")
    _data_root_arg(c)
    c.set_defaults(fn=cmd_cutoff)

    tr = sub.add_parser("tradeoff", help="accuracy vs latency of every policy over its thresholds (plot + JSON)")
    tr.add_argument("run", help="run folder written by 'fewstep train'")
    tr.add_argument("--split", default="test", choices=["test", "val"])
    tr.add_argument("--max-drop", type=float, default=0.01, metavar="D",
                    help="the table's choice per policy: its fastest setting within D of full-T accuracy on "
                         "validation (default 0.01 = 1 pt)")
    _data_root_arg(tr)
    tr.set_defaults(fn=cmd_tradeoff)

    a = sub.add_parser("ablate", help="train variants side by side (same data, model, budget, seeds) and compare "
                       "their accuracy per step, cutoff speed-ups and energy")
    a.add_argument("config", nargs="?", help="YAML config of the base run (see configs/); leave it and --variants "
                   "out to continue or report the ablation in --out as its ablation.json describes it")
    a.add_argument("--variants", help="comma-separated variants, each tokens joined by '+', e.g. "
                   "tet,tet+rcs,tet+str (tokens: ce, tet, rcs, str, tebn, trt, qcfs, rcs_ann); LABEL=TOKENS names a variant, to run "
                   "the same tokens under several --variant-set settings")
    a.add_argument("--seeds", help="a count (3: seeds 0, 1, 2) or a list (0,5,7; seed 4 alone: 4,); default 3, or "
                   "the folder's seeds when continuing one (give more to extend it)")
    a.add_argument("--out", required=True, help="ablation folder; run the same command again, or "
                   "'fewstep ablate --out OUT', to resume")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config key for every variant (repeatable)")
    a.add_argument("--variant-set", action="append", default=[], metavar="VARIANT:KEY=VALUE",
                   help="override a key for one variant, e.g. 'tet+rcs:regularizer.rcs_weight=0.005' (repeatable)")
    a.add_argument("--analyse-only", action="store_true", help="report the finished runs without training")
    a.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="before training a run, look under DIR (another ablation) for a finished run with exactly "
                   "its config (seed and epochs included) and copy it instead (repeatable)")
    a.add_argument("--convert-T", type=_int_at_least(1), default=64, help="steps of the SNN a QCFS variant's ANN is "
                   "converted to for the analysis (default 64)")
    a.set_defaults(fn=cmd_ablate)

    cv = sub.add_parser("convert", help="convert a QCFS ANN run into an SNN run folder (IF neurons, threshold λ), "
                        "for eval, cutoff and tradeoff")
    cv.add_argument("run", help="run folder of an ANN trained with model.neuron: qcfs and data.T: 1")
    cv.add_argument("--out", required=True, help="new run folder for the converted SNN")
    cv.add_argument("--T", type=_int_at_least(1), default=64, help="timesteps of the converted SNN (default 64)")
    cv.add_argument("--weights", default="best", choices=["best", "last"])
    cv.add_argument("--overwrite", action="store_true", help="replace an existing run folder at --out")
    cv.set_defaults(fn=cmd_convert)

    st = sub.add_parser("stream", help="feed one event recording to a trained run frame by frame and report when "
                        "its calibrated cutoff became safe")
    st.add_argument("run", help="run folder trained on an event dataset (nmnist, dvs_gesture, cifar10_dvs)")
    st.add_argument("--events", required=True, help="the recording (the run's dataset's file format)")
    st.add_argument("--policy", default="topk", choices=["topk", "softmax", "spikecp", "timestep"],
                    help="cutoff policy; its calibration is read from RUN/calibration_<policy>.json, or made on "
                    "validation first (default topk)")
    st.add_argument("--calibration", help="a saved calibration JSON to use instead")
    st.add_argument("--start-us", type=float, help="use only events from this sensor time on (µs)")
    st.add_argument("--end-us", type=float, help="use only events before this sensor time (µs)")
    st.add_argument("--realtime", action="store_true", help="release frames at sensor speed")
    st.add_argument("--json", action="store_true", help="print the report as JSON (for programs)")
    st.add_argument("--plot", metavar="PNG", help="also draw the recording stepped to T: events per frame, class "
                    "probabilities and the policy's statistic against its threshold, with the decision marked")
    st.add_argument("--device", default="cpu")
    _data_root_arg(st)
    st.set_defaults(fn=cmd_stream)

    en = sub.add_parser("energy", help="per-layer MACs, SOPs, spikes, firing rates and energy per sample (METHODS "
                        "§8), at full T and up to a cutoff's exits")
    en.add_argument("run", help="run folder written by 'fewstep train' (or 'fewstep convert')")
    en.add_argument("--policy", choices=["topk", "softmax", "spikecp", "timestep"], help="also count up to this "
                    "policy's calibrated exits (RUN/calibration_<policy>.json, or calibrated on val first)")
    en.add_argument("--calibration", help="a saved calibration JSON to use instead")
    en.add_argument("--split", default="test", choices=["test", "val"])
    en.add_argument("--e-mac", type=float, default=4.6, help="energy per MAC in pJ (default 4.6, 45 nm)")
    en.add_argument("--e-sop", type=float, default=0.9, help="energy per SOP in pJ (default 0.9, 45 nm)")
    _data_root_arg(en)
    en.set_defaults(fn=cmd_energy)

    ex = sub.add_parser("export", help="write a trained network as a NIR graph for neuromorphic simulators and "
                        "hardware (needs the nir extra; docs/deploy.md)")
    ex.add_argument("run", help="run folder written by 'fewstep train'")
    ex.add_argument("--format", default="nir", choices=["nir"], help="exchange format (default nir)")
    ex.add_argument("--out", required=True, help="file to write, e.g. model.nir")
    ex.add_argument("--dt", type=float, default=1.0, help="duration of one step in the NIR time unit (default 1); "
                    "the neurons' time constants scale with it")
    ex.add_argument("--weights", default="best", choices=["best", "last"])
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ex.set_defaults(fn=cmd_export)

    args = p.parse_args(argv)
    try:
        if args.cmd in INFERENCE_COMMANDS:  # training tunes it in the Trainer (train.tune_malloc)
            tune_for_device(getattr(args, "device", "cpu"))
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"fewstep {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``fewstep ... | head``): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (so exiting does not flush into it)
        return 0


if __name__ == "__main__":
    sys.exit(main())
