"""Does the CIFAR data path keep the trainer fed? Images per second delivered, against images per second
a ResNet-19 T = 4 training step consumes, measured in the same run on the same device.

Paths (``data.loader``): ``sample`` = the DataLoader, one image at a time (normalise + pad-crop + flip
+ cutout per sample in Python), ``num_workers`` as given; ``batch`` = whole batches read from the
in-memory ``uint8`` images, moved to the device, normalised and augmented there as tensor ops (the
default on CUDA). Delivered means: the batch is on the device, ready for the model (on CUDA after a
synchronise). The data is CIFAR-10 from ``--root`` (the JPEG archive in ../shared/data by default,
decoded once into the cache).

    .venv/bin/python bench/loader.py [--device cuda] [--batch 128] [--workers 0] [--seconds 5]

The goal (issue 13): the loader is never the bottleneck, and at least 20,000 images/s on the GPU path.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewstep import models  # noqa: E402
from fewstep.data import load  # noqa: E402
from fewstep.losses import make as make_loss  # noqa: E402
from fewstep.metrics import time_first  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def rate_of(batches, dev, seconds: float, batch: int) -> float:
    """Images per second over whole passes of ``batches()`` (an iterator factory) for about ``seconds``."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for x, y in batches():
            x = x.to(dev, non_blocking=True)
            n += x.shape[0]
            if time.perf_counter() - t0 > seconds:
                break
    _sync(dev)
    return n / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=3, help="timed ResNet-19 training steps")
    args = p.parse_args()
    dev = torch.device(args.device)
    b = load("cifar10", root=args.root, val_fraction=0.1, augment=True, cutout=8)
    ds = b.train
    g = torch.Generator().manual_seed(0)

    def sample_path():
        return iter(torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, generator=g,
                                                num_workers=args.workers, drop_last=True))

    dg = torch.Generator(device=dev).manual_seed(0)

    def batch_path():
        perm = torch.randperm(len(ds), generator=g)
        return (ds.batch(perm[i:i + args.batch], dev, dg) for i in range(0, len(perm) - args.batch + 1, args.batch))

    rates = {"sample": rate_of(sample_path, dev, args.seconds, args.batch),
             "batch": rate_of(batch_path, dev, args.seconds, args.batch)}

    # what the model consumes: a ResNet-19 T = 4 TET training step on the same device
    net = models.create("resnet19", input_shape=(3, 32, 32), num_classes=10).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    loss_fn = make_loss("tet")
    x, y = next(batch_path())
    amp = dev.type == "cuda"

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(net(time_first(x, "static", 4, "direct")), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(dev)
    consumed = args.batch * args.steps / (time.perf_counter() - t0)
    print(f"device {dev}, batch {args.batch}, DataLoader workers {args.workers}, torch {torch.__version__}")
    print(f"{'path':8s} {'images/s':>10s} {'/ consumed':>11s}")
    for k, r in rates.items():
        print(f"{k:8s} {r:10.0f} {r / consumed:10.1f}×")
    print(f"{'ResNet-19 T=4 train step consumes':34s} {consumed:.0f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
