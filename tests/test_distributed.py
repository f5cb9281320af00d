"""Data-parallel training (fewstep.distributed): 2 gloo processes on the CPU train what 1 process trains."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fewstep import config as C
from fewstep import distributed as D
from fewstep.train import Trainer, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(epochs: int = 3, batch: int = 63) -> C.Config:
    # No BatchNorm (statistics per process) and no random encoding or augmentation (drawn per process):
    # then 2 processes must give 1 process's weights. 63 does not divide by 2: the shares are 32 + 31.
    return C.from_dict({
        "data": {"name": "digits", "T": 2, "encoding": "direct", "val_fraction": 0.15},
        "model": {"name": "mlp", "options": {"hidden": [64]}},
        "train": {"epochs": epochs, "batch_size": batch, "lr": 3e-3, "loss": "tet", "progress": False,
                  "device": "cpu", "eval_batch_size": 500},
    })


def _worker(rank, world, port, cfg_dict, out, stop_after):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        Trainer(C.from_dict(cfg_dict), out, log=lambda msg: None).fit(stop_after=stop_after)
    finally:
        D.shutdown()
    # Done and written: end without the interpreter's teardown, which races with gloo's C++ threads ("terminate
    # called without an active exception", SIGABRT after a complete run; seen once in CI under mp.spawn, whose
    # spawned children exit through sys.exit). A worker that raised still reaches mp.spawn's error report above.
    D.end_worker(0)


def _train_ddp(world: int, cfg: C.Config, out: Path, stop_after=None) -> None:
    # The port is free when chosen but may be taken before rank 0 binds it: then (only then) try another.
    for attempt in range(3):
        try:
            mp.spawn(_worker, args=(world, _free_port(), cfg.to_dict(), str(out), stop_after), nprocs=world, join=True)
            return
        except Exception as e:  # noqa: BLE001  mp.spawn re-raises a worker's error as ProcessRaisedException
            if attempt == 2 or "address already in use" not in str(e).lower():
                raise


def _weights(out: Path) -> dict:
    return load_checkpoint(out / "checkpoint.pt")["model"]


def _assert_same_weights(a: dict, b: dict, atol=2e-5):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=1e-4), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    metrics = Trainer(_cfg(), out, log=lambda msg: None).fit()
    return out, metrics


def test_shards_cover_every_global_batch_once():
    assert D.shard_sizes(64, 3) == [22, 21, 21] and D.shard_sizes(63, 2) == [32, 31] and D.shard_sizes(4, 4) == [1] * 4
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(5)).tolist()
    shares = [list(D.GlobalBatchSampler(50, 16, torch.Generator().manual_seed(5), r, 3)) for r in range(3)]
    # the last global batch (2 samples) is smaller than the 3 processes: skipped by all
    assert [len(s) for s in shares] == [3, 3, 3]
    assert sum(D.GlobalBatchSampler(50, 16, torch.Generator().manual_seed(5)), []) == perm  # one process: all
    for b in range(3):
        assert sum((shares[r][b] for r in range(3)), []) == perm[16 * b:16 * (b + 1)]
    assert "22 + 21 + 21" in D.batch_message(64, 3) and "does not divide" in D.batch_message(64, 3)
    assert "2 x 32" in D.batch_message(64, 2) and "does not divide" not in D.batch_message(64, 2)


def test_two_processes_train_the_weights_of_one(one_process, tmp_path):
    out1, m1 = one_process
    out2 = tmp_path / "two"
    _train_ddp(2, _cfg(), out2)
    _assert_same_weights(_weights(out2), _weights(out1))
    m2 = json.loads((out2 / "metrics.json").read_text())
    assert m2["processes"] == 2 and m1["processes"] == 1
    assert m2["val_accuracy"] > 0.85  # it learned, and the learning is the single process's
    assert abs(m2["test_accuracy"] - m1["test_accuracy"]) <= 1 / m1["n_test"] + 1e-9
    log1 = (out1 / "log.csv").read_text().splitlines()
    log2 = (out2 / "log.csv").read_text().splitlines()
    assert len(log2) == 4 and log2[0] == log1[0]  # rank 0 alone wrote one row per epoch
    assert sorted(p.name for p in out2.iterdir()) == sorted(p.name for p in out1.iterdir())


def test_trt_averages_its_gradients_by_hand_and_matches_one_process(tmp_path):
    """TRT runs the network twice per step and trains heads of its own: the step averages every gradient after
    the backward pass instead of DDP's hooks, and still gives one process's weights, heads included."""
    cfg = _cfg(epochs=2)
    cfg.trt.enabled = True
    one, two = tmp_path / "one", tmp_path / "two"
    Trainer(cfg, one, log=lambda msg: None).fit()
    _train_ddp(2, cfg, two)
    _assert_same_weights(_weights(two), _weights(one))
    h1, h2 = (load_checkpoint(d / "checkpoint.pt")["regularizers"]["trt"] for d in (one, two))
    assert h1 and h1.keys() == h2.keys()
    _assert_same_weights(h2, h1)
    assert "train_trt_star" in (two / "log.csv").read_text().splitlines()[0]


def test_resume_with_a_different_process_count(one_process, tmp_path):
    """Killed after epoch 1 of 2 processes, resumed by 1 process: it finishes with the uninterrupted weights."""
    out1, _ = one_process
    out = tmp_path / "resumed"
    _train_ddp(2, _cfg(), out, stop_after=1)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1 and not (out / "metrics.json").exists()
    Trainer(_cfg(), out, log=lambda msg: None).fit()
    _assert_same_weights(_weights(out), _weights(out1))
    assert len((out / "log.csv").read_text().splitlines()) == 4


def test_torchrun_command_resumes_a_one_process_run(one_process, tmp_path):
    """The README's command: ``torchrun --nproc-per-node 2 -m fewstep train CONFIG --out DIR``, here picking up
    a run that one process started (1 -> 2 processes)."""
    out1, _ = one_process
    cfg_path = tmp_path / "digits_mlp.yaml"
    _cfg().dump(cfg_path)
    out = tmp_path / "run"
    Trainer(_cfg(), out, log=lambda msg: None).fit(stop_after=1)
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.is_file():
        pytest.skip(f"no torchrun beside {sys.executable}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "fewstep",
                        "train", str(cfg_path), "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout and "distributed: 2 processes (gloo, cpu)" in r.stdout
    assert r.stdout.count("wrote ") == 1  # rank 0 alone reports
    _assert_same_weights(_weights(out), _weights(out1))


def test_sync_batchnorm_swap_keeps_state_and_eval_output():
    from fewstep import layers as L
    from fewstep.models import create

    net = create("cnn", input_shape=(1, 8, 8), num_classes=10, norm="tebn", T=2).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    x = torch.rand(2, 3, 1, 8, 8)
    before, state = net(x), {k: v.clone() for k, v in net.state_dict().items()}
    D.convert_sync_batchnorm(net)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, torch.nn.SyncBatchNorm) for m in bns)
    assert net.state_dict().keys() == state.keys()
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(net(x), before)  # eval: running statistics, on any device
    net2 = create("cnn", input_shape=(1, 8, 8), num_classes=10)
    D.convert_sync_batchnorm(net2)
    assert any(isinstance(m, L.SyncBatchNorm) for m in net2.modules())  # the time-folding layer keeps folding


def test_sync_bn_on_cpu_processes_is_refused(tmp_path):
    ctx = D.Context(rank=0, world=2, local_rank=0, backend="gloo", device=torch.device("cpu"))
    cfg = _cfg()
    cfg.train.sync_bn = True
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(D, "from_env", lambda spec: ctx)
        with pytest.raises(ValueError, match="sync_bn needs CUDA"):
            Trainer(cfg, tmp_path / "run", log=lambda msg: None)


def test_torchrun_environment_without_rendezvous_is_explained(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node"):
        D.from_env("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        D.from_env("cpu")


def test_end_worker_flushes_and_exits_with_the_code():
    """torchrun workers end with os._exit (the interpreter teardown can abort after the run is written); what was
    printed, even without a newline into a pipe, must still arrive."""
    code = "import sys; from fewstep.distributed import end_worker; print('done', end=''); " \
           "print('warn', end='', file=sys.stderr); end_worker(3)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered, as under torchrun
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (3, "done", "warn")
