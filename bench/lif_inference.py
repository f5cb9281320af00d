"""The streaming LIF step at inference (no grad): fewstep against the obvious torch op sequence.

One single-step ``LIF`` (τ = 0.5, θ = 1, hard reset) stepping ``--steps`` frames with its membrane carried,
on the benchmark N-MNIST ``cnn``'s widest layer (32 channels at 34x34) in both memory layouts. Variants:

- ``fewstep``: ``fewstep.neurons.LIF`` in ``step_mode="s"`` under ``torch.no_grad()``;
- ``bool ops``: the same equations written the obvious way, as fewstep did before 2026-12-02:
  ``u = τ·v + x; f = u >= θ; s = f.to(u.dtype); v = u.masked_fill(f, 0)``;
- ``spikingjelly``: SpikingJelly 2.0 ``LIFNode(tau=2, decay_input=False, v_reset=0)`` single-step (the same
  0.5 leak), when it is installed (``make bench`` installs it).

Every variant's spikes are checked equal to fewstep's. Median over ``--reps`` passes, interleaved.

    .venv/bin/python bench/lif_inference.py [--batches 1,8,64] [--steps 10] [--reps 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewstep import runtime  # noqa: E402
from fewstep.neurons import LIF, reset  # noqa: E402


def bool_ops(xs):
    v, out = None, []
    for x in xs:
        u = x if v is None else 0.5 * v + x
        f = u >= 1.0
        s = f.to(u.dtype)
        v = u.masked_fill(f, 0.0)
        out.append(s)
    return out


def variants():
    n = LIF(tau=0.5, theta=1.0, reset="hard", step_mode="s")

    def fewstep_lif(xs):
        reset(n)
        return [n(x) for x in xs]

    out = {"fewstep": fewstep_lif, "bool ops": bool_ops}
    try:
        from spikingjelly.activation_based import neuron

        sj = neuron.LIFNode(tau=2.0, decay_input=False, v_reset=0.0, v_threshold=1.0, step_mode="s")

        def sj_lif(xs):
            sj.reset()
            return [sj(x) for x in xs]

        out["spikingjelly"] = sj_lif
    except ImportError:
        pass
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    runtime.tune_for_device(args.device)  # as fewstep's inference commands do (FEWSTEP_TUNE_MALLOC=0: glibc's defaults)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    fns = variants()
    print(f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, {runtime.allocator_status()}; "
          f"{args.steps} steps of "
          f"[N, 32, 34, 34], median of {args.reps}; µs per step (ratio to fewstep)")
    print(f"{'layout':14s} {'N':>4s} " + " ".join(f"{k:>22s}" for k in fns))
    for layout in ("channels-last", "NCHW"):
        for b in (int(s) for s in args.batches.split(",")):
            g = torch.Generator().manual_seed(0)
            xs = [torch.randn(b, 32, 34, 34, generator=g).mul_(0.8).add_(0.4).to(args.device) for _ in range(args.steps)]
            if layout == "channels-last":
                xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
            times = {k: [] for k in fns}
            with torch.no_grad():
                ref = fns["fewstep"](xs)
                for k, fn in fns.items():
                    if not all(torch.equal(a, b_) for a, b_ in zip(ref, fn(xs))):
                        raise SystemExit(f"{k}: spikes differ from fewstep's")
                    for _ in range(5):  # warm-up
                        fn(xs)
                for _ in range(args.reps):
                    for k, fn in fns.items():
                        sync()
                        t0 = time.perf_counter()
                        fn(xs)
                        sync()
                        times[k].append((time.perf_counter() - t0) / args.steps)
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{layout:14s} {b:4d} " + " ".join(
                f"{1e6 * med[k]:12.0f} ({med[k] / med['fewstep']:5.2f}x)" for k in fns))


if __name__ == "__main__":
    main()
