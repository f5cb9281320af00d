"""The ``fewstep`` command line: ``demo``, ``train``, ``eval``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import config as _config


def _table(rows: dict[str, list[float]]) -> str:
    names = list(rows)
    T = len(next(iter(rows.values())))
    lines = ["   t  " + "  ".join(f"{n:>8s}" for n in names)]
    for t in range(T):
        lines.append(f"{t + 1:4d}  " + "  ".join(f"{100 * rows[n][t]:7.2f}%" for n in names))
    return "\n".join(lines)


def demo_config() -> _config.Config:
    """The embedded demo: a small spiking CNN on scikit-learn's 8×8 digits, T = 6, TET loss."""
    return _config.from_dict({
        "data": {"name": "digits", "T": 6, "val_fraction": 0.15},
        "model": {"name": "cnn", "options": {"channels": [32, 64], "hidden": 128}},
        "train": {"epochs": 25, "batch_size": 64, "optimizer": "adamw", "lr": 2e-3, "loss": "tet"},
    })


def cmd_demo(args) -> int:
    from . import plots
    from .train import Trainer

    cfg = _config.from_dict(_config.apply_overrides(demo_config().to_dict(), args.set))
    out = Path(args.out)
    if (out / "checkpoint.pt").exists() and not args.resume:
        import shutil

        shutil.rmtree(out)
    print(f"fewstep demo: training a spiking CNN ({cfg.model.name}) on the 8x8 digits, T = {cfg.data.T}, "
          f"{cfg.train.epochs} epochs ...")
    t0 = time.perf_counter()
    m = Trainer(cfg, out, log=(print if args.verbose else (lambda s: None))).fit()
    dt = time.perf_counter() - t0
    print(f"\ntrained in {dt:.1f}s; best validation accuracy {100 * m['val_accuracy']:.2f}% (epoch {m['best_epoch']})\n")
    print("accuracy of the running-mean prediction at each timestep (best-on-validation weights):")
    print(_table({"val": m["val_accuracy_per_step"], "test": m["accuracy_per_step"]}))
    png = plots.accuracy_per_step({"validation": m["val_accuracy_per_step"], "test": m["accuracy_per_step"]},
                                  out / "accuracy_per_step.png", "fewstep demo: digits, spiking CNN")
    print(f"\nfiles in {out.resolve()}:")
    for name in ("config.yaml", "checkpoint.pt", "log.csv", "metrics.json", png.name):
        print(f"  {name}")
    return 0


def cmd_train(args) -> int:
    from .train import Trainer

    cfg = _config.load(args.config, args.set)
    out = Path(args.out)
    m = Trainer(cfg, out).fit()
    print(_table({"val": m["val_accuracy_per_step"], "test": m["accuracy_per_step"]}))
    print(f"wrote {out}/config.yaml, checkpoint.pt, log.csv, metrics.json")
    return 0


def cmd_eval(args) -> int:
    from .metrics import evaluate
    from .train import load_run, resolve_device

    model, cfg, bundle = load_run(args.run, weights=args.weights, device=args.device)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fewstep", description="Spiking networks that answer in few timesteps.")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="train a small SNN on the 8x8 digits (about a minute on a CPU)")
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
    e.set_defaults(fn=cmd_eval)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"fewstep {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
