"""Training-step speed and memory: fewstep vs SpikingJelly, snnTorch, Norse and the ANN floor, on a 2-core CPU.

The network of issue 4: conv3x3 3->64, 64->128, pool, 128->256, pool, 256->256, pool, FC 10; each
conv followed by BatchNorm and LIF (tau 0.5 leak, threshold 1, hard reset; fewstep's default
triangle surrogate, SpikingJelly's default sigmoid); T = 4, batch 32, 3x32x32 input, SGD.

- fewstep as a user gets it (fused LIF, convolutions over T·N on channels-last activations) and
  fewstep with the reference step loop; on CUDA also without the Triton kernels (``torchops``) and
  with NCHW convolutions (``nchw``);
- SpikingJelly (if installed: `pip install --no-deps spikingjelly==2.0.0 loguru`), multi-step mode,
  LIFNode(tau=2, decay_input=False, v_reset=0) which is u = 0.5 v + x;
- snnTorch and Norse (if installed: `pip install --no-deps snntorch==1.0.0 norse==1.1.0 nirtorch==1.0`), as their
  tutorials write a network: a Python loop over T around an ``nn.Sequential`` (Norse: ``SequentialState``) with
  ``Leaky(beta=0.5, threshold=1, reset_mechanism="zero")`` / ``LIFBoxCell`` at dt/tau = 0.5 (:class:`Stepped`);
- the ANN floor: the same CNN with ReLU, stepping over T (as the issue defines it, NCHW), and the
  same ANN with channels-last weights, to show what that layout gives an ANN;
- regularised training (issue 9): fewstep with the TET loss alone (``fewstep-tet``), and TET plus the
  RCS or the STR regulariser (``fewstep-tet+rcs``, ``fewstep-tet+str``) recording spikes and membranes
  as the Trainer does. A Trainer trains one model per process, and several models interleaved in one
  process disturb each other through the allocator, so these run in isolation: each round starts one
  fresh process per variant (warm-up, then the median of ``--steps`` steps); the cost is the median
  over ``--reg-rounds`` rounds of (regularised step / TET step of the same round). ``--no-regularizers``
  skips them.

``--tune-malloc`` runs every variant with ``fewstep.runtime.tune_cpu_allocator()`` in force (glibc
recycles buffers up to 64 MiB instead of mapping fresh pages on every allocation).

Time: interleaved, `--steps` timed steps each after warm-up, median. Memory: each variant in its own
process, peak RSS growth over two training steps from a baseline taken after the model, the data and
one no-grad forward exist (so it counts activations kept for backward, gradients and optimiser state).
Inference (multi-step, no grad) and streaming single-step inference are timed too.

On a GPU (``--device cuda``): the Triton LIF kernels for fewstep, SpikingJelly's own CUDA/Triton
kernels, CUDA-synchronised timings and peak allocated GPU memory (``torch.cuda.max_memory_allocated``
growth over two steps) measured in the same process, one variant at a time.

    .venv/bin/python bench/train_step.py [--steps 10] [--device cuda --batch 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from fewstep.runtime import allocator_status, tune_cpu_allocator  # noqa: E402

T, N = 4, 32
DEVICE = torch.device("cpu")
AMP = False
CFG = (64, 128, "A", 256, "A", 256, "A")


def vgg(L, act, container=nn.Sequential) -> nn.Module:
    """The benchmark CNN from a layer namespace ``L`` (torch.nn or SpikingJelly's layer) and an activation."""
    mods, c = [], 3
    for item in CFG:
        if item == "A":
            mods.append(L.AvgPool2d(2))
        else:
            mods += [L.Conv2d(c, item, 3, padding=1, bias=False), L.BatchNorm2d(item), act()]
            c = item
    return container(*mods, L.Flatten(), L.Linear(256 * 4 * 4, 10))


class Stepped(nn.Module):
    """A library whose networks step through time in the user's loop (snnTorch, Norse): ``[T, N, ...]`` in,
    per-step outputs ``[T, N, 10]`` out, the state reset at the start of each call, as their tutorials write it."""

    def __init__(self, net, kind: str):
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x):
        if self.kind == "snntorch":
            from snntorch import utils

            utils.reset(self.net)  # hidden states held by the Leaky layers (init_hidden=True)
            return torch.stack([self.net(xt) for xt in x])
        state, outs = None, []
        for xt in x:  # Norse: the state travels with the call
            out, state = self.net(xt, state)
            outs.append(out)
        return torch.stack(outs)


REGULARISED = ("fewstep-tet", "fewstep-tet+rcs", "fewstep-tet+str")


def build(kind: str):
    if kind in REGULARISED:
        kind = "fewstep"
    if kind in ("fewstep", "fewstep-reference"):
        from fewstep import models

        return models.create("vggsnn", input_shape=(3, 32, 32), num_classes=10, cfg=CFG,
                             backend="fused" if kind == "fewstep" else "reference")
    if kind == "spikingjelly":
        from spikingjelly.activation_based import functional, layer, neuron, surrogate

        net = vgg(layer, lambda: neuron.LIFNode(tau=2.0, decay_input=False, v_reset=0.0, v_threshold=1.0,
                                                surrogate_function=surrogate.Sigmoid(), detach_reset=False))
        functional.set_step_mode(net, "m")

        class SJ(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            def forward(self, x):
                functional.reset_net(self.net)
                return self.net(x)

        return SJ()
    if kind == "snntorch":  # u = 0.5 u + x, threshold 1, reset to zero; its default arctan surrogate
        import snntorch as snn

        return Stepped(vgg(nn, lambda: snn.Leaky(beta=0.5, threshold=1.0, reset_mechanism="zero",
                                                  init_hidden=True)), kind)
    if kind == "norse":  # LIF without a synaptic current: u = u + dt/tau (x - u), dt/tau = 0.5; SuperSpike surrogate
        import norse.torch as nt

        p = nt.LIFBoxParameters(tau_mem_inv=torch.tensor(500.0), v_th=torch.tensor(1.0), v_reset=torch.tensor(0.0))
        return Stepped(vgg(nn, lambda: nt.LIFBoxCell(p, dt=1e-3), nt.SequentialState), kind)
    if kind in ("ann", "ann-channels-last"):
        ann = vgg(nn, nn.ReLU)
        if kind == "ann-channels-last":
            ann = ann.to(memory_format=torch.channels_last)

        class Floor(nn.Module):
            def __init__(self):
                super().__init__()
                self.ann = ann

            def forward(self, x):
                return torch.stack([self.ann(xt) for xt in x])

        return Floor()
    raise ValueError(kind)


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def step_fn(net, kind: str = ""):
    import fewstep
    from fewstep import losses, regularizers

    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(T, N, 3, 32, 32, device=DEVICE) * 2
    y = torch.randint(0, 10, (N,), device=DEVICE)
    from fewstep.config import RegularizerConfig

    reg = {"fewstep-tet+rcs": "rcs", "fewstep-tet+str": "str"}.get(kind, "none")
    # every sample regularised (random labels are rarely right, and RCS skips wrong samples): the worst case
    regs = regularizers.from_config(RegularizerConfig(name=reg, rcs_correct_only=False))

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=AMP):
            if regs:  # as the Trainer does it: record what the regulariser reads, gradients through the sink
                with fewstep.record(net, fields=regularizers.fields_needed(regs), grad_sink=True) as rec:
                    out = net(x)
                loss = losses.tet(out, y) + regs[0](out, y, rec)
            else:
                out = net(x)
                loss = losses.tet(out, y) if kind in REGULARISED else nn.functional.cross_entropy(out.float().mean(0), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, x


def stream_fn(net, kind, x):
    if kind.startswith("fewstep"):
        import fewstep

        def run():
            fewstep.set_step_mode(net, "s")
            with torch.no_grad():
                for xt in x:
                    net(xt)
            fewstep.set_step_mode(net, "m")
        return run
    if kind == "spikingjelly":
        from spikingjelly.activation_based import functional

        def run():
            functional.set_step_mode(net.net, "s")
            functional.reset_net(net.net)
            with torch.no_grad():
                for xt in x:
                    net.net(xt)
            functional.set_step_mode(net.net, "m")
        return run
    if kind in ("snntorch", "norse"):  # they always step: streaming is their forward
        def run():
            with torch.no_grad():
                net(x)
        return run
    return None


def memory_child(kind: str, steps: int, tune: bool) -> None:
    if tune:
        tune_cpu_allocator()
    torch.manual_seed(0)
    net = build(kind).to(DEVICE)
    step, x = step_fn(net, kind)
    with torch.no_grad():  # import-time and first-call allocations (kernels, caches) before the baseline
        net(x[:, :1])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kind": kind, "base_mb": base / 1024, "peak_mb": peak / 1024}))


def time_child(kind: str, steps: int, tune: bool) -> None:
    """One variant alone in this process: median seconds per training step after warm-up, as JSON."""
    if tune:
        tune_cpu_allocator()
    torch.manual_seed(0)
    net = build(kind).to(DEVICE)
    step, _ = step_fn(net, kind)
    for _ in range(3):
        step()
    times = [timed(step) for _ in range(steps)]
    print(json.dumps({"kind": kind, "median_s": statistics.median(times)}))


def regularised_rounds(args) -> dict:
    """TET, TET+RCS and TET+STR steps, each in a fresh process per round (see the module doc)."""
    per_round = []
    for r in range(args.reg_rounds):
        got = {}
        for k in REGULARISED:
            out = subprocess.run([sys.executable, __file__, "--time-child", k, "--steps", str(args.steps),
                                  "--batch", str(N)] + (["--tune-malloc"] if args.tune_malloc else []),
                                 capture_output=True, text=True)
            if out.returncode != 0:
                raise RuntimeError(f"{k} failed: {out.stderr[-2000:]}")
            got[k] = json.loads(out.stdout.strip().splitlines()[-1])["median_s"]
        per_round.append(got)
        print(f"regularised round {r + 1}/{args.reg_rounds}: " + ", ".join(f"{k} {v:.3f}s" for k, v in got.items()),
              flush=True)
    rows = {k: {"train_s": statistics.median(g[k] for g in per_round)} for k in REGULARISED}
    for k in REGULARISED[1:]:
        ratios = [g[k] / g["fewstep-tet"] for g in per_round]
        rows[k]["over_tet"] = statistics.median(ratios)
        rows[k]["over_tet_range"] = [min(ratios), max(ratios)]
    return rows


def gpu_memory(kind: str, net, step) -> float:
    """Peak allocated GPU memory growth (MB) over two training steps, after one warm-up step."""
    step()
    sync()
    net.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def with_env(fn, **env):
    """Run ``fn`` with environment variables set (for the fewstep variants that differ by a switch)."""
    import os

    def run(*a, **k):
        old = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            return fn(*a, **k)
        finally:
            for key, val in old.items():
                if val is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = val
    return run


def with_nchw(fn, device_type: str):
    """Run ``fn`` with fewstep's convolutions on NCHW activations on ``device_type``."""
    from fewstep import layers

    def run(*a, **k):
        had = device_type in layers.CHANNELS_LAST_DEVICES
        layers.CHANNELS_LAST_DEVICES.discard(device_type)
        try:
            return fn(*a, **k)
        finally:
            if had:
                layers.CHANNELS_LAST_DEVICES.add(device_type)
    return run


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main():
    global N, DEVICE, AMP
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch", type=int, default=N)
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast for every variant (CUDA)")
    p.add_argument("--tune-malloc", action="store_true",
                   help="fewstep.runtime.tune_cpu_allocator() for every variant (CPU)")
    p.add_argument("--no-regularizers", action="store_true", help="skip the TET / TET+RCS / TET+STR rows")
    p.add_argument("--reg-rounds", type=int, default=4, help="rounds of isolated processes for the regularised "
                   "rows (default 4)")
    p.add_argument("--memory-child")
    p.add_argument("--time-child")
    args = p.parse_args()
    N, DEVICE, AMP = args.batch, torch.device(args.device), args.amp
    cuda = DEVICE.type == "cuda"
    if args.memory_child:
        return memory_child(args.memory_child, 2, args.tune_malloc)
    if args.time_child:
        return time_child(args.time_child, args.steps, args.tune_malloc)
    if not cuda and args.tune_malloc:
        tune_cpu_allocator()
    if cuda:
        torch.backends.cudnn.benchmark = True
    kinds = ["fewstep", "fewstep-reference", "ann", "ann-channels-last"]
    reg_rows = {} if args.no_regularizers or cuda else regularised_rounds(args)
    if cuda:
        kinds[1:1] = ["fewstep-torchops",  # the fused node without the Triton kernels (FEWSTEP_TRITON=0)
                      "fewstep-nchw"]  # NCHW convolutions
    try:
        import spikingjelly.activation_based  # noqa: F401

        kinds.insert(kinds.index("ann"), "spikingjelly")
    except Exception as exc:  # optional extra
        print(f"SpikingJelly not available ({exc}); install the 'bench' extra to compare")
    for name, module in (("snntorch", "snntorch"), ("norse", "norse.torch")):
        try:
            __import__(module)
            kinds.insert(kinds.index("ann"), name)
        except Exception as exc:  # optional: pip install --no-deps snntorch norse nirtorch
            print(f"{name} not available ({exc}); pip install --no-deps snntorch==1.0.0 norse==1.1.0 nirtorch==1.0 to compare")
    mem = {}
    if not cuda:
        # Memory first, each variant in a fresh process: Linux carries ru_maxrss across fork/exec, so
        # the children must start before this process grows.
        for k in kinds + ([] if args.no_regularizers else list(REGULARISED)):
            r = subprocess.run([sys.executable, __file__, "--memory-child", k, "--batch", str(N)]
                               + (["--tune-malloc"] if args.tune_malloc else []),
                               capture_output=True, text=True)
            if r.returncode == 0:
                d = json.loads(r.stdout.strip().splitlines()[-1])
                mem[k] = d["peak_mb"] - d["base_mb"]
            else:
                mem[k] = float("nan")
    torch.manual_seed(0)
    nets = {k: build("fewstep" if k in ("fewstep-torchops", "fewstep-nchw") else k).to(DEVICE) for k in kinds}
    fns = {k: step_fn(nets[k], k) for k in kinds}
    if "fewstep-torchops" in fns:
        step, x = fns["fewstep-torchops"]
        fns["fewstep-torchops"] = (with_env(step, FEWSTEP_TRITON="0"), x)
    if "fewstep-nchw" in fns:
        step, x = fns["fewstep-nchw"]
        fns["fewstep-nchw"] = (with_nchw(step, DEVICE.type), x)
    for k in kinds:
        for _ in range(2):
            fns[k][0]()
        if cuda:  # allocated GPU memory is per tensor, so one process serves every variant
            mem[k] = gpu_memory(k, nets[k], fns[k][0])
    times = {k: [] for k in kinds}
    for _ in range(args.steps):
        for k in kinds:
            times[k].append(timed(fns[k][0]))
    infer, stream = {k: [] for k in kinds}, {k: [] for k in kinds}
    for k in kinds:
        nets[k].eval()
    for _ in range(max(3, args.steps // 2)):
        for k in kinds:
            if k in REGULARISED:  # the same network as fewstep at inference
                continue
            x = fns[k][1]
            with torch.no_grad():
                infer[k].append(timed(lambda: nets[k](x)))
            run = stream_fn(nets[k], k, x)
            if run is not None:
                stream[k].append(timed(run))
    med = {k: statistics.median(v) for k, v in times.items()}
    where = (torch.cuda.get_device_name() if cuda else f"{torch.get_num_threads()} threads, {platform.machine()}, "
             f"{allocator_status()}")
    print(f"\nT={T}, batch {N}, 3x32x32, {'bf16 autocast' if AMP else 'float32'}, torch {torch.__version__}, "
          f"{where}; median of {args.steps} interleaved training steps")
    unit, scale = ("ms", 1e3) if cuda else ("s", 1.0)
    mem_name = "GPU MB" if cuda else "peak MB"
    print(f"{'':20s} {'train ' + unit + '/step':>12s} {mem_name:>8s} {'infer ' + unit:>9s} {'stream ' + unit:>10s} "
          f"{'stream/infer':>12s}")
    rows = {}
    for k in kinds:
        st = statistics.median(stream[k]) if stream[k] else float("nan")
        inf = statistics.median(infer[k]) if infer[k] else float("nan")
        rows[k] = {"train_s": med[k], "peak_mb": mem[k], "infer_s": inf, "stream_s": st}
        print(f"{k:20s} {med[k] * scale:12.3f} {mem[k]:8.0f} {inf * scale:9.3f} {st * scale:10.3f} {st / inf:12.2f}")
    print()
    for other, name in (("spikingjelly", "SpikingJelly"), ("snntorch", "snnTorch"), ("norse", "Norse")):
        if other in kinds:
            inf = statistics.median(infer["fewstep"]) / statistics.median(infer[other])
            print(f"fewstep / {name}: time {med['fewstep'] / med[other]:.2f}, "
                  f"peak memory {mem['fewstep'] / mem[other]:.2f}, inference {inf:.2f}")
    print(f"fewstep / ANN floor: time {med['fewstep'] / med['ann']:.2f}")
    print(f"fewstep fused / reference loop: time {med['fewstep'] / med['fewstep-reference']:.2f}, "
          f"peak memory {mem['fewstep'] / mem['fewstep-reference']:.2f}")
    reg_ratios = {}
    if reg_rows:
        print(f"\nregularised training, each variant in its own process, median of {args.reg_rounds} rounds "
              f"of {args.steps} steps:")
        for k, row in reg_rows.items():
            row["peak_mb"] = mem.get(k, float("nan"))
            extra = ""
            if "over_tet" in row:
                reg_ratios[k] = row["over_tet"]
                lo, hi = row["over_tet_range"]
                extra = (f"  / fewstep-tet: time {row['over_tet']:.3f} (rounds {lo:.2f}-{hi:.2f}), peak memory "
                         f"{row['peak_mb'] / mem['fewstep-tet']:.2f}")
            print(f"{k:20s} {row['train_s'] * scale:12.3f} {row['peak_mb']:8.0f}{extra}")
            rows[k] = row
    if args.json:
        Path(args.json).write_text(json.dumps({"device": where, "T": T, "batch": N, "amp": AMP,
                                               "torch": torch.__version__,
                                               "variants": rows, "regularized_over_tet": reg_ratios}, indent=2))


if __name__ == "__main__":
    main()
