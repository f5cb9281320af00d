"""Per-decision latency of anytime inference on the N-MNIST subset: p50 / p99, one stream and many.

The cutoff is calibrated on the validation split (fastest setting within --max-drop of full T), then the
test recordings are answered two ways, each timed per decision:

- one stream: ``fewstep.anytime.AnytimeStream``, one recording at a time, frame by frame. The decision
  latency is the compute from the first frame to the answer; the step latency is one ``push``.
- continuous batching: ``early_exit(..., max_batch=B)`` keeps B recordings in flight and admits the next
  one into every freed slot; the latency of a decision runs from joining the batch to the answer.

The frames are ready before the clock starts, so these are compute latencies: a live sensor adds the time
the frames take to arrive (``fewstep stream --realtime``). The same policy at full T is timed beside it.

    python bench/latency.py                        # trains runs/bench-nmnist first if absent (~1.5 min)
    python bench/latency.py --run DIR --streams 1,16,64 --rounds 5
    python bench/latency.py --device cuda --streams 1,64,256     # continuous batching from CUDA graphs
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import nmnist_run, run_args, tune_allocator  # noqa: E402  (bench/common.py)
from fewstep import anytime as at  # noqa: E402
from fewstep import cutoff as cf  # noqa: E402


def pct(values, q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


def one_stream(model, x, policy, T, rounds, graphs="auto"):
    stream = at.AnytimeStream(model, policy, T, graphs=graphs)
    stream.reset()
    stream.push(x[0, 0])  # untimed warm-up (on CUDA it captures the stream's graph, ~0.1 s, once per model)
    decisions, steps, exits = [], [], []
    for _ in range(rounds):
        for i in range(x.shape[1]):
            stream.reset()
            t0 = time.perf_counter()
            for t in range(T):
                s0 = time.perf_counter()
                answer = stream.push(x[t, i])
                steps.append(time.perf_counter() - s0)
                if answer is not None:
                    break
            decisions.append(time.perf_counter() - t0)
            exits.append(answer[1])
    return decisions, steps, sum(exits) / len(exits)


def batched(model, x, policy, B, rounds, graphs="auto"):
    lat, secs, exits = [], 0.0, []
    at.early_exit(model, x[:1, :B], cf.Timestep(1, T=1), graphs=graphs)  # warm-up (and capture) at this batch
    for _ in range(rounds):
        t0 = time.perf_counter()
        r = at.early_exit(model, x, policy, max_batch=B, latency=True, graphs=graphs)
        secs += time.perf_counter() - t0
        lat += r.latency_s.tolist()
        exits += r.exit_step.tolist()
    return lat, len(lat) / secs, sum(exits) / len(exits)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_args(p, device=True)
    p.add_argument("--policy", default="topk", choices=["topk", "softmax", "spikecp", "timestep"])
    p.add_argument("--max-drop", type=float, default=0.01, help="accuracy drop accepted on validation (0.01 = 1 pt)")
    p.add_argument("--streams", default="1,16,64", help="batch sizes of the continuous-batching runs")
    p.add_argument("--rounds", type=int, default=5, help="passes over the test split per measurement")
    args = p.parse_args()
    malloc = tune_allocator(args.device)

    run = Path(args.run)
    model, cfg, bundle, Yv, yv = nmnist_run(run, args.data)
    T = cfg.data.T
    policy, _ = cf.fastest_within(args.policy, Yv, yv, args.max_drop)
    full = cf.Timestep(T, T=T)
    chunks, _ = at.prepare(bundle.test, T, bundle.kind, cfg.data.encoding, 64)
    model, x = model.to(args.device), torch.cat(chunks, 1).to(args.device)
    where = (torch.cuda.get_device_name(x.device) if x.is_cuda
             else f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"{cfg.model.name} on {cfg.data.name}, T = {T}, {x.shape[1]} test recordings x {args.rounds} rounds, "
          f"policy {args.policy} ({', '.join(f'{k}={v:g}' for k, v in policy.params().items() if k in ('epsilon', 't'))}), torch "
          f"{torch.__version__}, {where}, graphs={args.graphs}, {malloc}\n")
    print(f"{'mode':22s} {'policy':>8s} {'exit':>5s} {'p50 ms':>8s} {'p99 ms':>8s} {'step p50':>9s} {'step p99':>9s} "
          f"{'decisions/s':>12s}")
    rows = []
    for name, pol in ((args.policy, policy), ("full T", full)):
        dec, stp, ex = one_stream(model, x, pol, T, args.rounds, args.graphs)
        row = {"mode": "one stream", "policy": name, "mean_exit_step": ex, "p50_ms": 1e3 * pct(dec, 50),
               "p99_ms": 1e3 * pct(dec, 99), "step_p50_ms": 1e3 * pct(stp, 50), "step_p99_ms": 1e3 * pct(stp, 99),
               "decisions_per_s": len(dec) / sum(dec)}
        rows.append(row)
        for B in [int(b) for b in args.streams.split(",") if b.strip()]:
            lat, rate, ex = batched(model, x, pol, B, args.rounds, args.graphs)
            rows.append({"mode": f"continuous, {B} in flight", "policy": name, "mean_exit_step": ex,
                         "p50_ms": 1e3 * pct(lat, 50), "p99_ms": 1e3 * pct(lat, 99), "decisions_per_s": rate})
    for r in rows:
        step = (f"{r['step_p50_ms']:9.2f} {r['step_p99_ms']:9.2f}" if "step_p50_ms" in r else f"{'':9s} {'':9s}")
        print(f"{r['mode']:22s} {r['policy']:>8s} {r['mean_exit_step']:5.2f} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} "
              f"{step} {r['decisions_per_s']:12.1f}")
    out = run / "bench_latency.json"
    out.write_text(json.dumps({"T": T, "policy": args.policy, "rounds": args.rounds, "device": where,
                               "graphs": args.graphs, "malloc": malloc, "rows": rows}, indent=2))
    print(f"\n(compute latency per decision: frames ready, no sensor time; step = one AnytimeStream.push)\nwrote {out}")


if __name__ == "__main__":
    main()
