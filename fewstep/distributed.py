"""Data-parallel training on PyTorch's engine: ``torchrun`` + ``torch.distributed`` + DistributedDataParallel.

``torchrun --nproc-per-node N -m fewstep train CONFIG --out DIR`` starts N processes; each one finds
``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` in its environment and :func:`from_env` joins the process group
(gloo on the CPU, NCCL on CUDA). The :class:`fewstep.train.Trainer` then trains exactly what one process
would train with the same config:

- ``train.batch_size`` stays the *global* batch. Every process draws the same permutation of the training
  set and takes its share of each global batch (:func:`shard_sizes`: 64 over 3 processes is 22 + 21 + 21).
- Each process weights its mean loss by ``n_local · world / n_global``; DDP averages the gradients over the
  processes, so the step is the gradient of the global batch's mean loss, even when the batch does not divide
  evenly. Without BatchNorm (whose statistics are per process unless ``train.sync_bn``) and without random
  augmentation or encoding (drawn per process), the weights equal a single-process run's up to float
  summation order.
- Rank 0 alone evaluates (the validation split and the test split exactly as in one process), writes the
  checkpoint (atomically), the log and metrics.json, and shows the progress bar. Resume broadcasts rank 0's
  checkpoint, so a run continues after a crash with the same command, or with another number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """Where this process sits in the job."""

    rank: int
    world: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a whole number") from None


def from_env(device_spec: str = "auto") -> "Context | None":
    """Join the process group torchrun describes in the environment; ``None`` for a single process.

    ``device_spec`` is ``train.device``: ``auto`` and ``cuda`` give each process ``cuda:LOCAL_RANK`` (NCCL)
    when CUDA is there, ``cpu`` (or no CUDA) gives gloo on the CPU."""
    world = env_world_size()
    if world <= 1:
        return None
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; start the processes with "
                           "torchrun --nproc-per-node N -m fewstep train CONFIG --out DIR")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    spec = str(device_spec)
    use_cuda = torch.cuda.is_available() and (spec == "auto" or spec.startswith("cuda"))
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {spec!r} requested but CUDA is not available; use device: auto or cpu")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} CUDA device(s); "
                               "start at most one process per GPU (--nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        # Rank 0 alone validates between epochs; the others wait for it at a barrier, hence the long timeout.
        minutes = float(os.environ.get("FEWSTEP_DIST_TIMEOUT_MIN", "120"))
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=minutes))
    return Context(rank, world, local, backend, device)


def shutdown() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_worker(code: int = 0) -> "NoReturn":
    """End a torchrun worker whose work is done and written: flush stdout and stderr, then ``os._exit(code)``.

    The interpreter's normal teardown races with the C++ threads of torch.distributed (torch 2.13, gloo): about
    one worker exit in twenty aborted with "terminate called without an active exception" *after* the run was
    complete, and torchrun then reported the whole job as failed. Ending the process without that teardown is
    what ``multiprocessing`` does for forked workers too; ``mp.spawn``'s spawned children exit through ``sys.exit``
    and showed the abort once in CI, so the tests' workers end through here as well."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said
            pass
    os._exit(code)


def shard_sizes(n: int, world: int) -> list[int]:
    """How a global batch of ``n`` samples splits over ``world`` processes (the first ones take one more)."""
    return [n // world + (1 if r < n % world else 0) for r in range(world)]


def shard(index: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This process's share of one global batch ``index`` (see :func:`shard_sizes`)."""
    sizes = shard_sizes(len(index), world)
    start = sum(sizes[:rank])
    return index[start:start + sizes[rank]]


def batch_message(batch_size: int, world: int) -> str:
    """What a global batch becomes across the processes, in words (logged at the start of training)."""
    sizes = shard_sizes(batch_size, world)
    split = " + ".join(map(str, sizes)) if len(set(sizes)) > 1 else f"{world} x {sizes[0]}"
    msg = f"global batch train.batch_size = {batch_size} = {split} samples per process per step"
    if len(set(sizes)) > 1:
        msg += (f" (it does not divide across {world} processes; each process's loss is weighted by its share, "
                f"so a step still equals one batch of {batch_size})")
    return msg


class GlobalBatchSampler(torch.utils.data.Sampler):
    """One epoch's batches for one process: ``torch.randperm(n, generator)`` cut into global batches of
    ``batch_size``, each sharded by :func:`shard` (with one process: the whole batch). With several processes,
    a final global batch smaller than the number of processes is skipped (no process may be idle)."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, rank: int = 0, world: int = 1):
        self.n, self.bs, self.g, self.rank, self.world = n, batch_size, generator, rank, world

    def __len__(self):
        return sum(1 for i in range(0, self.n, self.bs) if min(self.bs, self.n - i) >= self.world)

    def __iter__(self):
        perm = torch.randperm(self.n, generator=self.g)
        for i in range(0, self.n, self.bs):
            batch = perm[i:i + self.bs]
            if len(batch) >= self.world:
                yield shard(batch, self.rank, self.world).tolist()


def all_sum(values: list[float], ctx: "Context | None") -> list[float]:
    """Sum ``values`` over the processes (float64; identity for a single process)."""
    if ctx is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device if ctx.backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def any_true(flag: bool, ctx: "Context | None") -> bool:
    """Whether ``flag`` holds on any process (so that every process takes the same branch)."""
    if ctx is None:
        return bool(flag)
    return all_sum([1.0 if flag else 0.0], ctx)[0] > 0


def broadcast(obj, ctx: "Context | None"):
    """Rank 0's ``obj`` on every process (any picklable value, tensors included)."""
    if ctx is None:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def barrier(ctx: "Context | None") -> None:
    if ctx is not None:
        dist.barrier()


def broadcast_module(module: torch.nn.Module, ctx: "Context | None") -> torch.nn.Module:
    """Rank 0's parameters and buffers on every process (what DDP does when it wraps a model)."""
    if ctx is not None:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
    return module


def average_gradients(params, ctx: "Context | None") -> None:
    """All-reduce and average the gradients of ``params`` (coalesced), for the parameters DDP does not own."""
    if ctx is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def convert_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Swap fewstep's time-folding BatchNorm layers (and the BatchNorm inside TEBN) for SyncBatchNorm, which
    takes its statistics over every process's batch. State dict keys and values are unchanged. SyncBatchNorm
    trains on CUDA only (PyTorch's implementation); in eval mode it uses the running statistics anywhere."""
    from . import layers as L

    def swap(bn: torch.nn.modules.batchnorm._BatchNorm, cls):
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        return new.to(next(iter(bn.state_dict().values())).device) if bn.state_dict() else new

    for name, child in list(model.named_children()):
        if isinstance(child, (L.BatchNorm1d, L.BatchNorm2d)):
            setattr(model, name, swap(child, L.SyncBatchNorm))
        elif isinstance(child, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(child, torch.nn.SyncBatchNorm):
            setattr(model, name, swap(child, torch.nn.SyncBatchNorm))
        else:
            convert_sync_batchnorm(child)
    return model
