"""Where a GPU's early exit loses its step saving, and how far its decisions follow the simulated ones.

On the N-MNIST test split (one batch of every sample, as ``bench/anytime.py`` runs it per batch):

1. **Decisions.** The per-step logits of the same network computed several ways: multi-step (one Triton launch
   per LIF layer on CUDA), multi-step with the reference (torch) LIF, single-step over the full batch and over
   slices of 1, 8 and 32 samples (the batch sizes early exit steps at); how
   far they differ, and how many samples' (exit step, prediction) differ from ``cutoff.simulate`` on the
   multi-step logits, for the real early exit with and without CUDA graphs too. On the CPU all agree exactly.
2. **Time per call.** Early exit at full T, with each calibrated policy and with a step cap, with and without
   graphs, beside one multi-step forward over all T steps (what a GPU user pays without early exit): the
   median ms per call, the loop's iterations (the last sample's exit step, since every sample starts
   together) and the ms per iteration. Launch-bound, a call costs its iterations, not its sample-steps.
3. ``--profile``: the top operators of one early-exit call by self CPU time (what the loop pays per step).

    python bench/anytime.py                      # first: trains the run and saves its calibrations
    python bench/exit_diag.py [--run DIR] [--device cuda] [--profile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import run_args  # noqa: E402  (bench/common.py)
from fewstep import anytime as at  # noqa: E402
from fewstep import cutoff as cf  # noqa: E402
from fewstep.neurons import LIF, reset, set_step_mode  # noqa: E402
from fewstep.runfolder import load_run  # noqa: E402


@torch.no_grad()
def per_step_logits(model, x, how: str) -> torch.Tensor:
    """Running logits ``[T, N, C]`` of ``model`` on ``x``: ``how`` is "multi", "multi-reference" or "single"."""
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    backends = [m.backend for m in lifs]
    try:
        if how == "multi-reference":
            for m in lifs:
                m.backend = "reference"
        reset(model)
        if how == "single":
            set_step_mode(model, "s")
            O = torch.stack([model(xt).float() for xt in x])
        else:
            set_step_mode(model, "m")
            O = model(x).float()
    finally:
        for m, b in zip(lifs, backends):
            m.backend = b
        set_step_mode(model, "m")
        reset(model)
    return cf.running(O)


def timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_args(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cap", type=int, default=3, help="the step cap of the capped top-k row")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    run = Path(args.run)
    model, cfg, bundle = load_run(run, device=args.device, data_root=args.data)
    dev = next(model.parameters()).device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    T = cfg.data.T
    chunks, _ = at.prepare(bundle.test, T, bundle.kind, cfg.data.encoding, 10**6, dev)
    x = chunks[0]
    pols = {}
    for name in ("softmax", "topk", "spikecp"):
        path = run / f"bench_calibration_{name}.json"
        if path.is_file():
            pols[name] = cf.load(path)
    if not pols:
        raise SystemExit(f"no bench_calibration_*.json in {run}: run bench/anytime.py first")
    gpu = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    modes = ("off", "auto") if dev.type == "cuda" else ("off", "emulate")  # the static schedule: graphs / emulated
    print(f"{cfg.model.name} on {cfg.data.name}, T = {T}, test n = {x.shape[1]}, torch {torch.__version__}, {gpu}\n")

    Ys = {how: per_step_logits(model, x, how) for how in ("multi", "multi-reference", "single")}
    for b in (1, 8, 32):  # the same single steps on slices of the batch: does a batch size change the rounding?
        Ys[f"single, batch {b}"] = torch.cat([per_step_logits(model, x[:, i:i + b], "single")
                                              for i in range(0, x.shape[1], b)], 1)
    ref = Ys["multi"]
    print("1. decisions: samples whose (exit step, prediction) differ from simulate on the multi-step logits")
    print(f"{'logits / runner':28s} {'max |dY|':>9s} " + " ".join(f"{n:>8s}" for n in pols))
    sims = {n: cf.simulate(pol, ref) for n, pol in pols.items()}
    for how, Y in Ys.items():
        row = " ".join(f"{cf.simulate(pol, Y).differs(sims[n]):8d}" for n, pol in pols.items())
        print(f"{'simulate on ' + how:28s} {float((Y - ref).abs().max()):9.2e} {row}")
    for g in modes:
        row = " ".join(f"{at.early_exit(model, x, pol, graphs=g).decision.differs(sims[n]):8d}"
                       for n, pol in pols.items())
        print(f"{'early exit, graphs=' + g:28s} {'':9s} {row}")
    print("(graphs=auto: CUDA graphs of the step and of the decision with its bookkeeping; emulate: the same static"
          " schedule without capture)")

    print("\n2. time per call (median of", args.repeats, "; iterations = the last sample's exit step)")
    print(f"{'what':30s} {'graphs':>7s} {'iters':>5s} {'ms/call':>8s} {'ms/iter':>8s}")
    rows = [("multi-step forward, all T", None, None)]
    capped = copy.deepcopy(pols.get("topk", next(iter(pols.values())))).with_max_step(args.cap)
    for label, pol in [("early exit, full T", cf.Timestep(T, T=T))] + [(f"early exit, {n}", q) for n, q in pols.items()] \
            + [(f"early exit, {capped.name} cap {args.cap}", capped)]:
        for g in modes:
            rows.append((label, pol, g))
    for label, pol, g in rows:
        if pol is None:
            def fn():
                with torch.no_grad():
                    reset(model)
                    model(x)
            ms, iters = timed(fn, args.repeats, sync), T
        else:
            iters = int(at.early_exit(model, x, pol, graphs=g).exit_step.max())
            ms = timed(lambda: at.early_exit(model, x, pol, graphs=g), args.repeats, sync)
        print(f"{label:30s} {g or '-':>7s} {iters:5d} {ms:8.2f} {ms / iters:8.3f}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        pol = pols.get("topk", next(iter(pols.values())))
        for g in modes:
            at.early_exit(model, x, pol, graphs=g)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                at.early_exit(model, x, pol, graphs=g)
                sync()
            print(f"\n3. one early exit ({pol.name}, graphs={g}): top operators by self CPU time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
