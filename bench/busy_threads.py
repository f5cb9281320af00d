"""A batch-1 streaming step on a busy CPU: torch's threads against one, with and without other work.

`fewstep stream` answers one recording at batch 1, where a step is a few dozen small kernels, each an OpenMP
parallel region that waits for all of its threads. When another process keeps the cores busy, a region can wait
for its second thread's time slice. This measures one streaming step of the N-MNIST `cnn` (median µs, 30 steps
per round, rounds interleaved) on a quiet machine and while `--load` processes spin on the cores, for 1 thread
and for torch's count, and prints what `fewstep.runtime.streaming_threads("auto")` chose under load.

    python bench/busy_threads.py                 # trains runs/bench-nmnist first if absent (~1.5 min)
    python bench/busy_threads.py --run DIR --rounds 10 --load 2
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch
from common import ROOT, nmnist_run, run_args, step_us, tune_allocator

from fewstep import runtime


def _spin(stop):
    x = torch.rand(256, 256)
    torch.set_num_threads(1)
    while not stop.is_set():
        x = torch.tanh(x @ x)  # a busy core, as a training run or another service keeps it


def _rounds(net, x, threads, rounds):
    out = {n: [] for n in threads}
    for _ in range(rounds):
        for n in threads:
            torch.set_num_threads(n)
            out[n].append(step_us(net, x, 30))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    run_args(p)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--load", type=int, default=os.cpu_count(), help="busy processes (default: one per core)")
    a = p.parse_args()
    alloc = tune_allocator("cpu")
    model, cfg, bundle, _, _ = nmnist_run(a.run, a.data)
    model.eval()
    x = bundle.test[0][0][0].unsqueeze(0)  # the first frame of a test recording, batch 1
    default = torch.get_num_threads()
    threads = sorted({1, default})
    print(f"{cfg.model.name} on {cfg.data.name}, batch 1, torch {torch.__version__}, {os.cpu_count()} CPUs, {alloc}")
    with torch.no_grad():
        quiet = _rounds(model, x, threads, a.rounds)
        stop = mp.Event()
        procs = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(a.load)]
        for q in procs:
            q.start()
        time.sleep(2)  # let the spinners start
        torch.set_num_threads(default)
        chosen = runtime.streaming_threads("auto")
        busy = _rounds(model, x, threads, a.rounds)
        stop.set()
        for q in procs:
            q.join()
    torch.set_num_threads(default)
    print(f"\nµs per step, median of 30 steps per round ({a.rounds} rounds, interleaved):")
    for name, res in (("quiet", quiet), (f"{a.load} busy processes", busy)):
        for n in threads:
            v = res[n]
            print(f"  {name:<18} {n} thread{'s' if n > 1 else ' '}: median {statistics.median(v):8.0f}  "
                  f"max {max(v):8.0f}  rounds {', '.join(f'{u:.0f}' for u in v)}")
    print(f"\nunder load, streaming_threads('auto') chose {chosen[0]} ({chosen[1]})")


if __name__ == "__main__":
    main()
