"""BatchNorm folded into the convolution at inference on the CPU (``fewstep.layers.Sequential``), against
the same layers unfolded (``FEWSTEP_FOLD_BN=0``), in one process, interleaved.

Measures one streaming step of the N-MNIST ``cnn`` (``runs/bench-nmnist``, trained first if absent) at several
batch sizes, the early-exit passes of ``bench/anytime.py`` over the 100 test recordings (full T and each
policy's validation-calibrated threshold), and checks that the decisions are the same.

    python bench/batchnorm_fold.py [--batches 1,2,4,8,16,64] [--rounds 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import nmnist_run, run_args, step_us, tune_allocator  # noqa: E402  (bench/common.py)
import fewstep  # noqa: E402
from fewstep import anytime as at  # noqa: E402
from fewstep import cutoff as cf  # noqa: E402

MODES = ("folded", "unfolded")


def use(mode: str) -> None:
    os.environ["FEWSTEP_FOLD_BN"] = "1" if mode == "folded" else "0"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_args(p)
    p.add_argument("--batches", default="1,2,4,8,16,64")
    p.add_argument("--batch-size", type=int, default=64, help="early-exit batch (continuous batching)")
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    malloc = tune_allocator("cpu")
    model, cfg, bundle, Yv, yv = nmnist_run(Path(args.run), args.data)
    T = cfg.data.T
    print(f"{cfg.model.name}, T = {T}, torch {torch.__version__}, {torch.get_num_threads()} threads, {malloc}; "
          f"median over {args.rounds} interleaved rounds\n")

    frames = at.prepare(bundle.test, T, bundle.kind, cfg.data.encoding, 64)[0][0][0]  # step 1 of 64 recordings
    fewstep.set_step_mode(model, "s")
    print(f"{'batch':>5s} {'folded us':>10s} {'unfolded us':>12s} {'ratio':>6s}")
    for b in [int(v) for v in args.batches.split(",")]:
        x = frames[:b] if b <= len(frames) else frames.repeat((b + len(frames) - 1) // len(frames), 1, 1, 1)[:b]
        res = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for m in MODES:
                use(m)
                res[m].append(step_us(model, x))
        a, u = statistics.median(res["folded"]), statistics.median(res["unfolded"])
        print(f"{b:5d} {a:10.0f} {u:12.0f} {a / u:6.3f}")
    fewstep.set_step_mode(model, "m")

    chunks, _ = at.prepare(bundle.test, T, bundle.kind, cfg.data.encoding, args.batch_size)
    pols = {"full T": cf.Timestep(T, T=T)}
    pols.update({n: cf.fastest_within(n, Yv, yv, 0.01)[0] for n in ("softmax", "topk", "spikecp")})
    print(f"\nearly exit over the {len(bundle.test)} test recordings, continuous batching at {args.batch_size}, "
          "ms per pass (best of 3 per round)")
    print(f"{'policy':8s} {'folded':>8s} {'unfolded':>9s} {'ratio':>6s}  same decisions")
    for name, pol in pols.items():
        res, dec = {m: [] for m in MODES}, {}
        for _ in range(args.rounds):
            for m in MODES:
                use(m)
                best = None
                for _ in range(3):
                    parts, s = at.run_chunks(model, chunks, pol, args.batch_size, True)
                    best = s if best is None else min(best, s)
                res[m].append(best)
                dec[m] = (parts[0].exit_step, parts[0].prediction)
        a, u = statistics.median(res["folded"]), statistics.median(res["unfolded"])
        same = all(torch.equal(f, g) for f, g in zip(dec["folded"], dec["unfolded"]))
        print(f"{name:8s} {1e3 * a:8.2f} {1e3 * u:9.2f} {a / u:6.3f}  {same}")
    use("folded")


if __name__ == "__main__":
    main()
