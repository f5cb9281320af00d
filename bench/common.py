"""Shared by the benchmarks: the trained N-MNIST run they measure, its validation outputs for calibration, the
allocator setting of the CLI's inference commands, and the timing of one streaming step."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fewstep  # noqa: E402
from fewstep import anytime as at  # noqa: E402
from fewstep import config as C  # noqa: E402
from fewstep import runtime  # noqa: E402
from fewstep.train import Trainer, load_run  # noqa: E402


def nmnist_run(run, data):
    """``(model, cfg, bundle, Yv, yv)`` of the run folder ``run``; trains it from configs/nmnist_small.yaml
    (data under ``data``) first if it is not there (~1.5 min on 2 cores)."""
    run = Path(run)
    if not (run / "metrics.json").is_file():
        print(f"training {run} from configs/nmnist_small.yaml ...")
        cfg = C.load(ROOT / "configs" / "nmnist_small.yaml", [f"data.root={data}"])
        Trainer(cfg, run).fit()
    model, cfg, bundle = load_run(run, data_root=data)  # the run may have been trained where the data lay elsewhere
    Yv, yv = at.calibration_outputs(model, bundle.val, cfg.data.T, bundle.kind, cfg.data.encoding)
    return model, cfg, bundle, Yv, yv


def run_args(p, device: bool = False) -> None:
    """Add the arguments of a benchmark of the trained N-MNIST run to the parser ``p``: ``--run`` and ``--data`` and,
    with ``device``, ``--device`` and ``--graphs`` (the step runner)."""
    p.add_argument("--run", default=str(ROOT / "runs" / "bench-nmnist"),
                   help="run folder of the N-MNIST network (bench/anytime.py trains it if absent)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder holding nmnist-small.tar.gz")
    if device:
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
        p.add_argument("--graphs", default="auto", choices=["auto", "off", "cuda", "emulate"],
                       help="step runner (fewstep.graphs): auto = CUDA graphs on CUDA, eager on the CPU")


def tune_allocator(device) -> str:
    """Tune glibc's allocator for a CPU run, as the CLI's inference commands do (``FEWSTEP_TUNE_MALLOC=0``
    keeps glibc's defaults, for comparison); returns the line the benchmarks print."""
    runtime.tune_for_device(device, inference=True)
    return runtime.allocator_status()


@torch.no_grad()
def step_us(net, x, n: int = 100) -> float:
    """Median µs of one streaming step of ``net`` on the frame batch ``x`` (state carried, reset every 10 steps;
    the first 10 steps untimed)."""
    fewstep.set_step_mode(net, "s")
    ts = []
    for i in range(n + 10):
        if i % 10 == 0:
            fewstep.reset(net)
        t = time.perf_counter()
        net(x)
        ts.append(time.perf_counter() - t)
    return 1e6 * statistics.median(ts[10:])
