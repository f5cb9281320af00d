"""Anytime-inference benchmark on the N-MNIST subset (T = 10, TET-trained `cnn`).

For each cutoff policy, the threshold is chosen on the validation split (the fastest setting whose
validation accuracy is within --max-drop of full T); the test split is then run for real, step by
step, at --batch-size, and timed against the same runner without early exit. Prints the accuracy
drop, timestep speed-up, wall-clock speed-up and their ratio, with continuous batching (freed slots
refilled) and with plain per-batch early exit. ``--stream-passes K`` also times continuous batching on a
stream of the test recordings played K times over (the same decisions, repeated), which separates the
cost of a short stream's tail (the hard samples stepping alone once the stream runs dry) from the
runner's steady state.

    python bench/anytime.py                    # trains runs/bench-nmnist first if it is not there (~1.5 min)
    python bench/anytime.py --run DIR          # any run folder
    python bench/anytime.py --device cuda --batch-size 256                  # CUDA graphs (fewstep.graphs)
    python bench/anytime.py --device cuda --batch-size 256 --graphs off     # eager steps, for comparison
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import nmnist_run, run_args, tune_allocator  # noqa: E402  (bench/common.py)
from fewstep import anytime as at  # noqa: E402
from fewstep import cutoff as cf  # noqa: E402
from fewstep import wallclock as wc  # noqa: E402
from fewstep.reports import cutoff_report  # noqa: E402


def _where(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"


def _iqr(q) -> str:
    return f"({q[0]:.2f}-{q[1]:.2f})"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_args(p, device=True)
    p.add_argument("--max-drop", type=float, default=0.01, help="accuracy drop accepted on validation (0.01 = 1 pt)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--stream-passes", type=int, default=4,
                   help="also time continuous batching on the test split played this many times over (1: off)")
    args = p.parse_args()
    malloc = tune_allocator(args.device)

    run = Path(args.run)
    model, cfg, bundle, Yv, yv = nmnist_run(run, args.data)
    T = cfg.data.T
    print(f"\n{cfg.model.name} on {cfg.data.name}, T = {T}, test n = {len(bundle.test)}, batch {args.batch_size}, "
          f"torch {torch.__version__}, {_where(args.device)}, graphs={args.graphs}, {malloc}")
    print(f"threshold per policy: fastest setting within {100 * args.max_drop:.1f} pt of full-T accuracy on validation\n")
    K = args.stream_passes
    if K < 1:
        raise SystemExit(f"--stream-passes must be >= 1, got {K}")
    head = (f"{'policy':9s} {'setting':>12s} {'acc':>7s} {'drop':>6s} {'exit':>5s} {'steps x':>7s} "
            f"{'wall x':>7s} {'ratio':>6s} {'(IQR)':>11s} {'wall x':>7s} {'ratio':>6s}"
            + (f" {'wall x':>7s} {'ratio':>6s} {'(IQR)':>11s}" if K > 1 else ""))
    print(f"{'':52s}{'continuous':>27s} {'per-batch':>15s}" + (f" {f'{K}x stream':>27s}" if K > 1 else ""))
    print(head)
    if K > 1:  # the test recordings played K times over, as one stream
        dmodel = model.to(args.device)  # (its validation outputs are already taken)
        chunks, _ = at.prepare(bundle.test, T, bundle.kind, cfg.data.encoding, args.batch_size, args.device)
        stream = chunks * K
    rows = []
    for name in ("timestep", "softmax", "topk", "spikecp"):
        pol, _ = cf.fastest_within(name, Yv, yv, args.max_drop)
        path = cf.save(pol, run / f"bench_calibration_{name}.json",
                       {"model": cfg.model.name, "dataset": cfg.data.name, "T": T, "calibration_split": "val"})
        r = {}
        for cont in (True, False):
            r[cont] = cutoff_report(run, name, calibration=path, batch_size=args.batch_size, repeats=args.repeats,
                                    continuous=cont, device=args.device, graphs=args.graphs, data_root=args.data)
        a = r[True]
        sx = a["timestep_speedup"]
        iqr = [q / sx for q in a["wallclock_speedup_iqr"]]  # quartiles of the per-round ratios
        setting = f"t={pol.t}" if name == "timestep" else f"eps={pol.epsilon:g}"
        row = {"policy": name, "setting": setting, "accuracy": a["accuracy"], "full_accuracy": a["full_accuracy"],
               "drop_pt": 100 * a["accuracy_drop"], "mean_exit_step": a["mean_exit_step"],
               "timestep_speedup": a["timestep_speedup"],
               "wallclock_speedup_continuous": a["wallclock_speedup"],
               "ms_full_continuous": 1e3 * a["seconds_full"], "ms_early_exit_continuous": 1e3 * a["seconds_early_exit"],
               "ratio_continuous": a["wallclock_speedup"] / a["timestep_speedup"], "ratio_continuous_iqr": iqr,
               "wallclock_speedup_per_batch": r[False]["wallclock_speedup"],
               "ratio_per_batch": r[False]["wallclock_speedup"] / a["timestep_speedup"],
               "matches_simulation": a["matches_simulation"] and r[False]["matches_simulation"],
               "differ_from_simulation": max(a["differ_from_simulation"], r[False]["differ_from_simulation"])}
        extra = ""
        if K > 1:
            rounds = wc.speedup_rounds(dmodel, stream, pol, T, args.batch_size, True, args.repeats, graphs=args.graphs)
            sp = wc.spread(*rounds)
            row.update(stream_passes=K, wallclock_speedup_stream=sp["median"], ratio_stream=sp["median"] / sx,
                       ratio_stream_iqr=[sp["q1"] / sx, sp["q3"] / sx])
            extra = (f" {row['wallclock_speedup_stream']:6.2f}x {row['ratio_stream']:6.2f} "
                     f"{_iqr(row['ratio_stream_iqr'])}")
        rows.append(row)
        print(f"{name:9s} {setting:>12s} {100 * a['accuracy']:6.1f}% {row['drop_pt']:+5.1f} {a['mean_exit_step']:5.2f} "
              f"{a['timestep_speedup']:6.2f}x {row['wallclock_speedup_continuous']:6.2f}x {row['ratio_continuous']:6.2f} "
              f"{_iqr(iqr)} "
              f"{row['wallclock_speedup_per_batch']:6.2f}x {row['ratio_per_batch']:6.2f}" + extra)
    off = [f"{r['policy']} ({r['differ_from_simulation']} of {a['n']})" for r in rows if r["differ_from_simulation"]]
    if off:
        print("\nsamples whose exit or prediction differs from cutoff.simulate: " + ", ".join(off)
              + " (on a GPU, convolutions at shrinking batch sizes may round differently; bench/README.md)")
    out = run / "bench_anytime.json"
    out.write_text(json.dumps({"T": T, "batch_size": args.batch_size, "device": _where(args.device),
                               "graphs": args.graphs, "malloc": malloc, "rows": rows}, indent=2))
    print(f"\n(drop in accuracy points on test; 'steps x' = T / mean exit step; 'wall x' = full-T time / early-exit "
          f"time, same runner, split and batch size: the median over {args.repeats} rounds, each timing both back to "
          f"back; ratio = wall x / steps x; IQR: quartiles of the {args.repeats} per-round ratios"
          + (f"; '{K}x stream': continuous batching over the test split played {K} times, same decisions" if K > 1 else "")
          + f")\nwrote {out}")


if __name__ == "__main__":
    main()
