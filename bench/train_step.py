"""Training-step speed and memory: fewstep vs SpikingJelly vs the ANN floor, on a 2-core CPU.

The network of issue 4: conv3x3 3->64, 64->128, pool, 128->256, pool, 256->256, pool, FC 10; each
conv followed by BatchNorm and LIF (tau 0.5 leak, threshold 1, hard reset, triangle/ATan-free
surrogates as available); T = 4, batch 32, 3x32x32 input, SGD.

- fewstep (fused LIF, the default) and fewstep with the reference step loop;
- SpikingJelly (if installed: `pip install --no-deps spikingjelly==2.0.0 loguru`), multi-step mode,
  LIFNode(tau=2, decay_input=False, v_reset=0) which is u = 0.5 v + x;
- the ANN floor: the same CNN with ReLU, stepping over T.

Time: interleaved, `--steps` timed steps each after warm-up, median. Memory: each variant in its own
process, peak RSS growth over two training steps from a baseline taken after the model, the data and
one no-grad forward exist (so it counts activations kept for backward, gradients and optimiser state).
Inference (multi-step, no grad) and streaming single-step inference are timed too.

    .venv/bin/python bench/train_step.py [--steps 10]
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

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

T, N = 4, 32
CFG = (64, 128, "A", 256, "A", 256, "A")


def vgg(L, act) -> nn.Sequential:
    """The benchmark CNN from a layer namespace ``L`` (torch.nn or SpikingJelly's layer) and an activation."""
    mods, c = [], 3
    for item in CFG:
        if item == "A":
            mods.append(L.AvgPool2d(2))
        else:
            mods += [L.Conv2d(c, item, 3, padding=1, bias=False), L.BatchNorm2d(item), act()]
            c = item
    return nn.Sequential(*mods, L.Flatten(), L.Linear(256 * 4 * 4, 10))


def build(kind: str):
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
    if kind == "ann":
        ann = vgg(nn, nn.ReLU)

        class Floor(nn.Module):
            def __init__(self):
                super().__init__()
                self.ann = ann

            def forward(self, x):
                return torch.stack([self.ann(xt) for xt in x])

        return Floor()
    raise ValueError(kind)


def step_fn(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(T, N, 3, 32, 32) * 2
    y = torch.randint(0, 10, (N,))

    def step():
        out = net(x)
        loss = nn.functional.cross_entropy(out.mean(0), y)
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
    return None


def memory_child(kind: str, steps: int) -> None:
    torch.manual_seed(0)
    net = build(kind)
    step, x = step_fn(net)
    with torch.no_grad():  # import-time and first-call allocations (kernels, caches) before the baseline
        net(x[:, :1])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"kind": kind, "base_mb": base / 1024, "peak_mb": peak / 1024}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--memory-child")
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, 2)
    kinds = ["fewstep", "fewstep-reference", "ann"]
    try:
        import spikingjelly.activation_based  # noqa: F401

        kinds.insert(2, "spikingjelly")
    except Exception as exc:  # optional extra
        print(f"SpikingJelly not available ({exc}); install the 'bench' extra to compare")
    # Memory first, each variant in a fresh process: Linux carries ru_maxrss across fork/exec, so the
    # children must start before this process grows.
    mem = {}
    for k in kinds:
        r = subprocess.run([sys.executable, __file__, "--memory-child", k], capture_output=True, text=True)
        if r.returncode == 0:
            d = json.loads(r.stdout.strip().splitlines()[-1])
            mem[k] = d["peak_mb"] - d["base_mb"]
        else:
            mem[k] = float("nan")
    torch.manual_seed(0)
    nets = {k: build(k) for k in kinds}
    fns = {k: step_fn(nets[k]) for k in kinds}
    for k in kinds:
        for _ in range(2):
            fns[k][0]()
    times = {k: [] for k in kinds}
    for _ in range(args.steps):
        for k in kinds:
            t0 = time.perf_counter()
            fns[k][0]()
            times[k].append(time.perf_counter() - t0)
    infer, stream = {k: [] for k in kinds}, {k: [] for k in kinds}
    for k in kinds:
        nets[k].eval()
    for _ in range(max(3, args.steps // 2)):
        for k in kinds:
            x = fns[k][1]
            with torch.no_grad():
                t0 = time.perf_counter()
                nets[k](x)
                infer[k].append(time.perf_counter() - t0)
            run = stream_fn(nets[k], k, x)
            if run is not None:
                t0 = time.perf_counter()
                run()
                stream[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nT={T}, batch {N}, 3x32x32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}; median of {args.steps} interleaved training steps")
    print(f"{'':20s} {'train s/step':>12s} {'peak MB':>8s} {'infer s':>8s} {'stream s':>9s} {'stream/infer':>12s}")
    for k in kinds:
        st = statistics.median(stream[k]) if stream[k] else float("nan")
        inf = statistics.median(infer[k])
        print(f"{k:20s} {med[k]:12.3f} {mem[k]:8.0f} {inf:8.3f} {st:9.3f} {st / inf:12.2f}")
    print()
    if "spikingjelly" in kinds:
        print(f"fewstep / SpikingJelly: time {med['fewstep'] / med['spikingjelly']:.2f}, "
              f"peak memory {mem['fewstep'] / mem['spikingjelly']:.2f}")
    print(f"fewstep / ANN floor: time {med['fewstep'] / med['ann']:.2f}")
    print(f"fewstep fused / reference loop: time {med['fewstep'] / med['fewstep-reference']:.2f}, "
          f"peak memory {mem['fewstep'] / mem['fewstep-reference']:.2f}")


if __name__ == "__main__":
    main()
