"""``fewstep demo``, ``train``, ``ablate``, ``convert`` and ``import``: the commands that make run folders (the parser
is :mod:`fewstep.cli`)."""

from __future__ import annotations

import time
from pathlib import Path

from . import config as _config
from .cli_run import _table, _tradeoff_table


def demo_config() -> _config.Config:
    """The demo's recipe, the shipped ``digits`` config: a small spiking CNN on scikit-learn's 8×8 digits,
    Poisson rate coding over T = 8 steps (evidence builds up over time), TET loss."""
    return _config.load(_config.shipped()["digits"])


def cmd_configs(args) -> int:
    """``fewstep configs``: the shipped configs, one per recipe; ``fewstep configs NAME`` prints one (to copy)."""
    import sys
    import textwrap

    if args.name:
        sys.stdout.write(_config.resolve(args.name).read_text())
        return 0
    ship = _config.shipped()
    rows = []
    for name, path in ship.items():
        c = _config.load(path)
        model = c.model.name + (" (QCFS ANN)" if c.model.neuron == "qcfs" else "")
        rows.append((name, c.data.name, model, f"T = {c.data.T}", f"{c.train.epochs} epochs", _config.describe(path)))
    w = [max(len(r[i]) for r in rows) for i in range(5)]
    print(f"{len(rows)} configs ship with fewstep ({_config.SHIPPED}):\n")
    for r in rows:
        print("  ".join(v.ljust(w[i]) for i, v in enumerate(r[:5])).rstrip())
        if r[5]:
            print(textwrap.fill(r[5], 112, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False))
    print("\nfewstep train NAME --out DIR trains one (data.root defaults to ../shared/data: --set data.root=DIR for "
          "yours);\nfewstep configs NAME prints it, to copy and edit; docs/config.md explains every key.")
    return 0


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
    from . import calibration as _cal
    from . import cutoff as _cf
    from .train import load_run

    model, _, bundle = load_run(out)
    Yv, yv = _any.calibration_outputs(model, bundle.val, cfg.data.T, bundle.kind, cfg.data.encoding)
    picks = [(n, *_cal.fastest_within(n, Yv, yv, 0.01)) for n in ("softmax", "topk", "spikecp", "timestep")]
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
    if c.get("timing_note"):
        print(f"  note: {c['timing_note']}")
    print(f"\nfiles in {out.resolve()}:")
    for f in ("config.yaml", "checkpoint.pt", "log.csv", "metrics.json", png.name, "tradeoff.png", "tradeoff.json",
              f"calibration_{name}.json", f"cutoff_{name}.json", f"cutoff_{name}_exits.csv",
              f"cutoff_{name}_exits.png"):
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
        abl = Ablation(args.config, variants, 3 if args.seeds is None else args.seeds, args.out, args.set,
                       args.variant_set, convert_T=args.convert_T, reuse=args.reuse)
    summary = abl.run(analyse_only=args.analyse_only, processes=args.jobs)
    print()
    print((Path(args.out) / "results.md").read_text())
    missing = [label for label in abl.variants if label not in summary["variants"]]
    if missing:
        print(f"not finished yet: {', '.join(missing)}; run the same command again to continue")
    return 0


def cmd_import(args) -> int:
    from .nir_runs import import_run

    import_run(args.graph, args.data, args.out, overrides=args.set, dt=args.dt, overwrite=args.overwrite)
    print(f"next: fewstep eval {args.out}; fewstep cutoff {args.out} --policy softmax --max-drop 0.01")
    return 0


def cmd_convert(args) -> int:
    from .qcfs import convert_run

    convert_run(args.run, args.out, T=args.T, weights=args.weights, overwrite=args.overwrite)
    # the converted networks measured so far answered soonest under a bound with softmax (docs/results.md)
    print(f"next: fewstep eval {args.out}; fewstep cutoff {args.out} --policy softmax --max-drop 0.01 --max-step auto")
    return 0
