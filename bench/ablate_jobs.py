"""`fewstep ablate --jobs N` against `--jobs 1`: does training runs side by side finish an ablation sooner?

On a CPU a small network does not keep every core busy with one run (a batch's many small kernels each wait for
all of torch's threads). `--jobs N` trains N runs at a time, each in its own process with 1/N of the threads. This
times the same ablation (fresh folders, the same command) both ways, alternating the order over `--rounds`, and
prints the wall-clock of each, their ratio, and each run's test accuracy both ways, which differ as another seed's
would (one thread sums in another order than two, and training carries the difference forward).

    python bench/ablate_jobs.py        # Fashion-MNIST cnn: tet and tet+tebn, 2 seeds, 1 epoch, --jobs 2
    python bench/ablate_jobs.py --config digits --epochs 5 --jobs 2 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(args, jobs: int, out: Path) -> float:
    cmd = [sys.executable, "-m", "fewstep", "ablate", args.config, "--variants", args.variants, "--seeds",
           args.seeds, "--out", str(out), "--set", f"train.epochs={args.epochs}", "--set", "train.progress=false",
           "--jobs", str(jobs)] + [w for s in args.set for w in ("--set", s)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return took


def accuracies(out: Path) -> dict:
    return {f"{p.parent.parent.name} {p.parent.name}": json.loads(p.read_text())["test_accuracy_per_step"][-1]
            for p in sorted(out.glob("*/seed*/analysis.json"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="fashion_mnist_cnn", help="a config file or a shipped config's name")
    p.add_argument("--variants", default="tet,tet+tebn")
    p.add_argument("--seeds", default="2")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="the N of --jobs N measured against --jobs 1")
    p.add_argument("--rounds", type=int, default=1, help="ablations per setting, in alternating order")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another base override")
    args = p.parse_args()
    import torch

    print(f"fewstep ablate {args.config} --variants {args.variants} --seeds {args.seeds}, {args.epochs} epoch(s); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    times: dict = {1: [], args.jobs: []}
    accs: dict = {}
    with tempfile.TemporaryDirectory(prefix="fewstep-jobs-") as tmp:
        for r in range(args.rounds):
            for jobs in ((1, args.jobs) if r % 2 == 0 else (args.jobs, 1)):
                out = Path(tmp) / f"jobs{jobs}-round{r}"
                times[jobs].append(one(args, jobs, out))
                accs[jobs] = accuracies(out)
                print(f"  round {r + 1}, --jobs {jobs}: {times[jobs][-1]:.1f} s")
                shutil.rmtree(out)
    serial, parallel = statistics.median(times[1]), statistics.median(times[args.jobs])
    print(f"\nmedian wall-clock: --jobs 1 {serial:.1f} s, --jobs {args.jobs} {parallel:.1f} s: "
          f"{serial / parallel:.2f}x sooner with --jobs {args.jobs}")
    print("test accuracy at T per run (--jobs 1 / --jobs N):")
    for run in accs[1]:
        print(f"  {run}: {100 * accs[1][run]:.2f} / {100 * accs[args.jobs][run]:.2f}")


if __name__ == "__main__":
    main()
