"""The multi-step LIF alone: forward + backward time and the memory kept for backward, per backend.

Variants (those available on the device):
- ``triton``: fewstep's Triton kernels (CUDA only; one launch per direction for all T steps);
- ``compiled``: fewstep's fused node with per-step ``torch.compile`` kernels (FEWSTEP_TRITON=0, FEWSTEP_COMPILE=1);
- ``eager``: the fused node with eager per-step ops (FEWSTEP_TRITON=0, FEWSTEP_COMPILE=0);
- ``reference``: autograd over the step loop;
- ``spikingjelly``: SpikingJelly 2.0 ``LIFNode`` (multi-step, its own CUDA/Triton kernels on GPU).

The layer is the benchmark CNN's widest (128 channels at 32x32); ``u = 0.5 v + x``, θ = 1, hard
reset, sigmoid surrogate for every variant. "kept MB" is what autograd saves for backward (distinct
storages seen by ``saved_tensors_hooks``) beyond the input and the output spikes. On CUDA the effective bandwidth counts the
minimum traffic of a fused LIF (read x, write s and u; read u and ∂L/∂s, write ∂L/∂x: 24 bytes
per neuron-step in float32).

    .venv/bin/python bench/lif_kernel.py [--device cuda] [--batch 32] [--T 4] [--reps 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewstep.neurons import LIF  # noqa: E402

ENV = {
    "triton": {"FEWSTEP_TRITON": "1"},
    "compiled": {"FEWSTEP_TRITON": "0", "FEWSTEP_COMPILE": "1"},
    "eager": {"FEWSTEP_TRITON": "0", "FEWSTEP_COMPILE": "0"},
    "reference": {},
    "spikingjelly": {},
}


def make(kind):
    if kind == "spikingjelly":
        from spikingjelly.activation_based import neuron, surrogate

        return neuron.LIFNode(tau=2.0, decay_input=False, v_reset=0.0, v_threshold=1.0,
                              surrogate_function=surrogate.Sigmoid(), step_mode="m")
    return LIF(tau=0.5, theta=1.0, surrogate="sigmoid", backend="reference" if kind == "reference" else "fused")


def saved_mb(n, kind, x, gs) -> float:
    """MB of distinct tensors autograd keeps for backward, beyond the input and the output spikes."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    if kind == "spikingjelly":
        from spikingjelly.activation_based import functional

        functional.reset_net(n)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        s = n(x)
    skip = {x.untyped_storage().data_ptr(), s.untyped_storage().data_ptr()}
    s.backward(gs)
    x.grad = None
    return sum(v for k, v in seen.items() if k not in skip) / 2**20


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--T", type=int, default=4)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    kinds = (["triton"] if cuda else []) + ["compiled", "eager", "reference"]
    try:
        import spikingjelly.activation_based  # noqa: F401

        kinds.append("spikingjelly")
    except Exception as exc:
        print(f"SpikingJelly not available ({exc})")
    shape = (args.T, args.batch, 128, 32, 32)
    numel = torch.Size(shape).numel()
    x = (torch.randn(shape, device=dev) * 0.6 + 0.4).requires_grad_(True)
    gs = torch.randn(shape, device=dev)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    res = {}
    for kind in kinds:
        os.environ.update(ENV[kind])
        try:
            n = make(kind).to(dev)

            def once():
                if kind == "spikingjelly":
                    from spikingjelly.activation_based import functional

                    functional.reset_net(n)
                s = n(x)
                s.backward(gs)
                x.grad = None

            for _ in range(3):
                once()
            sync()
            kept = saved_mb(n, kind, x, gs)
            ts = []
            for _ in range(args.reps):
                sync()
                t0 = time.perf_counter()
                once()
                sync()
                ts.append(time.perf_counter() - t0)
            res[kind] = (statistics.median(ts), kept)
        except Exception as exc:  # report and go on with the other variants
            print(f"{kind}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
        finally:
            for key in ENV[kind]:
                os.environ.pop(key, None)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"\nLIF [T={args.T}, N={args.batch}, 128, 32, 32] float32, forward + backward, median of {args.reps}; "
          f"{where}; torch {torch.__version__}")
    print(f"{'':14s} {'ms':>9s} {'kept MB':>8s} {'GB/s':>7s} {'vs reference':>13s}")
    ref = res.get("reference", (float("nan"),))[0]
    for kind, (t, kept) in res.items():
        gbs = 24 * numel / t / 1e9
        print(f"{kind:14s} {t * 1e3:9.2f} {kept:8.0f} {gbs:7.1f} {ref / t:12.2f}x")


if __name__ == "__main__":
    main()
