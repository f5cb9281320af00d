"""What TEBN's per-step scale costs at inference on the CPU: the N-MNIST ``cnn`` with plain BatchNorm, with TEBN
(``p · BN(x)`` written in place, as ``fewstep.layers.TEBN`` does without autograd), and with TEBN's scale
written to a fresh buffer (how it was before), on the same weights and the same 100 real test recordings.
One process, interleaved rounds, medians; the ratios are against BatchNorm measured in the same round.

    python bench/tebn_inference.py [--batch 256] [--stream-batch 64] [--rounds 7]

Multi-step: the full-T pass over every recording in batches of ``--batch`` (the ablation's "images/s"
figure). Streaming: one step at ``--stream-batch``, as early exit runs it. Needs ``../shared/data`` (the
N-MNIST subset); ``runs/bench-nmnist`` is trained first if absent (~1.5 min), only for its data bundle.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import nmnist_run, run_args, step_us, tune_allocator  # noqa: E402  (bench/common.py)
import fewstep  # noqa: E402
from fewstep import anytime as at  # noqa: E402
from fewstep import layers as L  # noqa: E402
from fewstep import models  # noqa: E402

IN_PLACE = L.TEBN._times_p


def out_of_place(self, x, p, multi):
    """TEBN's scale as it was computed before: always into a fresh buffer."""
    y = self._normalised(x, multi)
    return y * self._scale(p, 1, y)


def build(norm: str, T: int, source=None):
    torch.manual_seed(0)
    net = models.create("cnn", input_shape=(2, 34, 34), num_classes=10, norm=norm, **({"T": T} if norm == "tebn" else {}))
    with torch.no_grad():
        if source is None:  # BatchNorm statistics and affine of a trained network's scale
            for m in net.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
        else:  # the same weights; TEBN's own p is a ramp around 1
            src = {k.replace(".bn.", "."): v for k, v in source.state_dict().items()}
            own = net.state_dict()
            net.load_state_dict({k: src.get(k.replace(".bn.", "."), v) for k, v in own.items()})
            for m in net.modules():
                if isinstance(m, L.TEBN):
                    m.p.copy_(torch.linspace(0.8, 1.2, T))
    return net.eval()


@torch.no_grad()
def multi_s(net, chunks) -> float:
    fewstep.set_step_mode(net, "m")
    t = time.perf_counter()
    for x in chunks:
        net(x)
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_args(p)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--stream-batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    malloc = tune_allocator("cpu")
    _, cfg, bundle, _, _ = nmnist_run(Path(args.run), args.data)
    T = cfg.data.T
    chunks, _ = at.prepare(bundle.test, T, bundle.kind, cfg.data.encoding, args.batch)
    frame = torch.cat(chunks, 1)[0, : args.stream_batch]
    bn = build("bn", T)
    tebn = build("tebn", T, source=bn)
    variants = {"bn": (bn, IN_PLACE), "tebn": (tebn, IN_PLACE), "tebn, fresh buffer": (tebn, out_of_place)}
    with torch.no_grad():  # the same outputs in every variant
        fewstep.set_step_mode(tebn, "m")
        ref = tebn(chunks[0])
        L.TEBN._times_p = out_of_place
        same = torch.equal(tebn(chunks[0]), ref)
        L.TEBN._times_p = IN_PLACE
    n = sum(x.shape[1] for x in chunks)
    print(f"cnn on {n} N-MNIST test recordings, T = {T}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, {malloc}; median of {args.rounds} interleaved rounds; TEBN outputs equal both ways: {same}\n")
    res = {k: {"multi": [], "step": []} for k in variants}
    for _ in range(args.rounds):
        for name, (net, impl) in variants.items():
            L.TEBN._times_p = impl
            try:
                multi_s(net, chunks[:1])  # warm
                res[name]["multi"].append(multi_s(net, chunks))
                res[name]["step"].append(step_us(net, frame, 60))
            finally:
                L.TEBN._times_p = IN_PLACE
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in res.items()}
    print(f"{'variant':20s} {'full T, img/s':>14s} {'x bn':>6s} {'step @' + str(args.stream_batch) + ', us':>14s} "
          f"{'x bn':>6s}")
    for name, m in med.items():
        print(f"{name:20s} {n / m['multi']:14.0f} {med['bn']['multi'] / m['multi']:6.2f} {m['step']:14.0f} "
              f"{med['bn']['step'] / m['step']:6.2f}")


if __name__ == "__main__":
    main()
