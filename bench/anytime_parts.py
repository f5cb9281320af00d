"""Where an early-exit pass spends its time: the network, the policy, rows leaving, refills, the rest.

Times one continuous-batching pass over the N-MNIST test split per policy (the calibrations that
``bench/anytime.py`` saved in the run folder, and the same runner at full T for reference), with timers wrapped around the network's forward, the
policy's ``fire``, ``fewstep.shrink`` and ``fewstep.refill`` as the runner calls them; "runner" is the
rest of the pass (gathering inputs, running sums, bookkeeping). Also prints the batch size of every
network call, so a short stream's tail (the last samples stepping alone) shows. Means over ``--passes``
passes after a warm-up, in one process; the timers themselves add a few microseconds per call.

A second table splits each policy's pass against the time it may take for a wall-clock / timestep ratio
of ``--target`` (issue 16: 0.90). The budget is ``full-T pass / (target x timestep speed-up)``; the
pass's sample-steps at the full-T pass's network cost per sample-step are its "ideal network" time; what
the network spends beyond that is the small-batch penalty (the tail); the runner is the rest of the pass.

    python bench/anytime.py                    # first: trains the run and saves its calibrations
    python bench/anytime_parts.py [--run DIR] [--passes 40] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import nmnist_run, run_args, tune_allocator  # noqa: E402  (bench/common.py)
from fewstep import anytime as at  # noqa: E402
from fewstep import cutoff as cf  # noqa: E402

PARTS = ("network", "fire", "shrink", "refill")


class Timers:
    def __init__(self):
        self.total = collections.Counter()
        self.batches = []

    def wrap(self, fn, part):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[part] += time.perf_counter() - t0
        return timed


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_args(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--passes", type=int, default=40)
    p.add_argument("--target", type=float, default=0.90, help="wall-clock / timestep ratio for the budget table")
    args = p.parse_args()
    tune_allocator("cpu")
    run = Path(args.run)
    model, cfg, bundle, _, _ = nmnist_run(run, args.data)
    T = cfg.data.T
    chunks, _ = at.prepare(bundle.test, T, bundle.kind, cfg.data.encoding, args.batch_size)
    x = torch.cat(chunks, 1)
    print(f"{cfg.model.name} on {cfg.data.name}, T = {T}, test n = {x.shape[1]}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads; ms per pass, mean of {args.passes}\n")
    print(f"{'policy':9s} {'pass':>6s} {'network':>8s} {'fire':>6s} {'shrink':>7s} {'refill':>7s} {'runner':>7s}"
          f" {'µs/sample-step':>14s}  batch size of each network call")
    timers = Timers()
    forward = model.forward

    def counted(xt):
        timers.batches.append(xt.shape[0])
        return forward(xt)

    model.forward = timers.wrap(counted, "network")
    orig = at.shrink, at.refill
    at.shrink, at.refill = timers.wrap(at.shrink, "shrink"), timers.wrap(at.refill, "refill")
    rows = {}
    try:
        for name in ("full T", "timestep", "softmax", "topk", "spikecp"):
            path = run / f"bench_calibration_{name}.json"
            if name != "full T" and not path.is_file():
                raise SystemExit(f"{path} not found: run bench/anytime.py first (it calibrates on validation)")
            pol = cf.Timestep(T, T=T) if name == "full T" else cf.load(path)
            pol.fire = timers.wrap(pol.fire, "fire")
            for _ in range(5):
                at.early_exit(model, x, pol, args.batch_size)
            timers.total.clear()
            t0 = time.perf_counter()
            for _ in range(args.passes):
                timers.batches = []
                at.early_exit(model, x, pol, args.batch_size)
            per = {k: 1e3 * v / args.passes for k, v in timers.total.items()}
            whole = 1e3 * (time.perf_counter() - t0) / args.passes
            rest = whole - sum(per.get(k, 0.0) for k in PARTS)
            rows[name] = (whole, per.get("network", 0.0), sum(timers.batches))
            print(f"{name:9s} {whole:6.1f} {per.get('network', 0):8.1f} {per.get('fire', 0):6.2f} "
                  f"{per.get('shrink', 0):7.2f} {per.get('refill', 0):7.2f} {rest:7.2f} "
                  f"{1e3 * whole / sum(timers.batches):14.0f}  {', '.join(map(str, timers.batches))}")
    finally:
        at.shrink, at.refill = orig
        model.forward = forward
    budget_table(rows, args.target)


def budget_table(rows: dict, target: float) -> None:
    """Each policy's pass against its budget for ``target`` (ms; see the module docstring)."""
    full, full_net, full_ss = rows["full T"]
    per_ss = full_net / full_ss  # the full-T pass's network time per sample-step
    print(f"\nms per pass against the budget for a ratio of {target:.2f} (budget = full-T pass / ({target:.2f} x steps x))")
    print(f"{'policy':9s} {'steps x':>7s} {'ratio':>6s} {'network only':>12s} {'budget':>7s} {'ideal net':>9s} "
          f"{'left':>6s} {'small-batch':>11s} {'runner':>7s}")
    for name, (whole, net, ss) in rows.items():
        if name == "full T":
            continue
        sx = full_ss / ss  # = T / mean exit step: every sample starts at step 0 and runs to its exit
        budget, ideal = full / (target * sx), ss * per_ss
        print(f"{name:9s} {sx:6.2f}x {full / whole / sx:6.2f} {full_net / net / sx:12.2f} {budget:7.2f} {ideal:9.2f} "
              f"{budget - ideal:6.2f} {net - ideal:11.2f} {whole - net:7.2f}")
    print("(ratio: wall x / steps x of these passes; network only: the same from the network's time alone; "
          "left = budget - ideal net, what the small-batch penalty and the runner may spend between them)")


if __name__ == "__main__":
    main()
