"""Training loop: seeding, SGD/AdamW, cosine schedule, AMP on CUDA, progress bar, CSV log,
a checkpoint every epoch (atomic), exact resume, best-on-validation weights, and metrics.json.

A run lives in one folder::

    config.yaml     the full resolved config
    checkpoint.pt   weights, optimiser, scheduler, epoch, RNG states, config, best weights, input shape
                    and class names (so the network rebuilds without the dataset: load_network)
    log.csv         one row per epoch
    metrics.json    dataset, model, T, val_accuracy, accuracy_per_step (test, best weights), ...

Checkpoints hold only tensors and plain Python values: ``torch.load(path, weights_only=True)``.
Model selection uses the validation split only; the test split is evaluated once, at the end.
Under ``torchrun`` the same Trainer runs data-parallel (DDP); see :mod:`fewstep.distributed`. Run folders,
checkpoint I/O and rebuilding a run (``load_data``, ``build_model``, ``load_run``, ``load_network``) live in
:mod:`fewstep.runfolder`, optimiser, schedule and mixup in :mod:`fewstep.optim` (both re-exported here).
"""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import config as _config
from . import distributed as _dist
from . import losses as _losses
from . import regularizers as _regs
from .data import datasets as _datasets
from .metrics import evaluate, time_first
from .optim import lr_factor, make_optimizer, make_scheduler, mixup  # noqa: F401  (re-exported)
from .record import record
from .runfolder import (CHECKPOINT_FORMAT, RUN_FILES, RUN_PATTERNS, DataMeta, _atomic_save,  # noqa: F401
                        build_model, check_run_folder, clear_run_folder, data_meta, is_run_file, load_checkpoint,
                        load_data, load_network, load_run, resolve_device)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is left intact."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _DeviceBatches:
    """One epoch of batches read whole from an in-memory image split (``ds.batch``) in ``sampler``'s order,
    augmentation drawn from a generator on ``device``."""

    def __init__(self, ds, device: torch.device, seed: int, sampler):
        self.ds, self.device, self.seed, self.sampler = ds, device, seed, sampler

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        dg = torch.Generator(device=self.device).manual_seed(self.seed)
        for idx in self.sampler:
            yield self.ds.batch(torch.tensor(idx, dtype=torch.long), self.device, dg)


def config_differences(saved: dict, cfg: "_config.Config") -> list[str]:
    """The keys (``section.key``) in which a checkpoint's config differs from ``cfg`` in what is trained: the
    number of epochs (it may grow on resume), how batches are read or shown, and the options of a training
    term that neither config turns on (:func:`fewstep.regularizers.inert_keys`) are no difference."""
    saved = _config.with_absolute_root(_config.from_dict(saved)).to_dict()  # (a relative root: older runs)
    mine = cfg.to_dict()
    for s, k in set(_regs.inert_keys(saved)) & set(_regs.inert_keys(mine)):
        saved[s].pop(k), mine[s].pop(k)
    saved["train"].pop("epochs"), mine["train"].pop("epochs")
    for k in ("progress", "num_workers", "eval_batch_size", "device", "tune_malloc", "sync_bn"):
        saved["train"].pop(k), mine["train"].pop(k)
    saved["data"].pop("loader"), mine["data"].pop("loader")  # how batches are read, not what is trained
    for d in (saved["data"], mine["data"]):  # one folder by two names (a link, ``..``) is the same data
        if d.get("root"):
            d["root"] = str(Path(d["root"]).resolve())
    return [f"{s}.{k}" for s in mine for k in mine[s] if mine[s][k] != saved[s].get(k)]


class Trainer:
    """Train ``cfg`` into ``out_dir``; resumes automatically from ``out_dir/checkpoint.pt``.

    ``regularizers`` are callables ``(logits, y, rec) -> loss`` added to the base loss, after those
    the config's ``regularizer`` section asks for (:mod:`fewstep.regularizers`: RCS, STR). When any
    is present, the forward pass runs under :func:`fewstep.record` (recording only the fields they
    read) and each term is logged in ``log.csv`` as ``train_<name>`` beside ``train_task_loss``.

    Started by ``torchrun`` (``WORLD_SIZE`` > 1), it trains data-parallel with DistributedDataParallel
    (:mod:`fewstep.distributed`); ``self.model`` stays the plain network, ``self.net`` is what the
    training step calls.
    """

    def __init__(self, cfg: _config.Config, out_dir, bundle: _datasets.DataBundle | None = None,
                 regularizers: list[Callable] | None = None, log: Callable[[str], None] = print):
        self.cfg = cfg = _config.with_absolute_root(cfg)  # the run folder's config finds its data from anywhere
        self.out = Path(out_dir)
        check_run_folder(self.out)  # before any data is loaded
        self.dist = _dist.from_env(cfg.train.device)  # None: one process
        self.is_main = self.dist is None or self.dist.is_main
        self.rank, self.world = (self.dist.rank, self.dist.world) if self.dist is not None else (0, 1)
        self.log = log if self.is_main else (lambda msg: None)
        self.regularizers = _regs.build(cfg) + list(regularizers or [])
        self.reg_names = _regs.term_names(self.regularizers)
        self.record_fields = _regs.fields_needed(self.regularizers)
        seed_everything(cfg.train.seed)
        self.device = self.dist.device if self.dist is not None else resolve_device(cfg.train.device)
        if self.device.type == "cpu" and cfg.train.tune_malloc:
            from .runtime import tune_cpu_allocator

            tune_cpu_allocator()  # large activations recycled instead of fresh pages each step (docs/performance.md)
        self.bundle = bundle if bundle is not None else load_data(cfg)
        if self.bundle.kind == "frames" and self.bundle.T != cfg.data.T:
            raise ValueError(f"T mismatch: dataset frames have T = {self.bundle.T} but data.T = {cfg.data.T}")
        self.model = build_model(cfg, self.bundle).to(self.device)
        if cfg.train.sync_bn and self.dist is not None:
            if self.dist.backend != "nccl":
                raise ValueError("train.sync_bn needs CUDA processes (NCCL): PyTorch's SyncBatchNorm does not train on "
                                 "the CPU. Without it each process normalises with the statistics of its own share")
            self.model = _dist.convert_sync_batchnorm(self.model)
        self.loss_fn = _losses.make(cfg.train.loss, cfg.train.tet_lambda, cfg.train.tet_phi)
        for r in self.regularizers:
            if hasattr(r, "setup"):
                r.setup(self)
        # Regularisers with parameters (TRT's training-only heads): trained and checkpointed beside the model.
        self.reg_modules = {n: r.to(self.device) for n, r in zip(self.reg_names, self.regularizers)
                            if isinstance(r, torch.nn.Module) and any(True for _ in r.parameters())}
        params = list(self.model.parameters()) + [p for r in self.reg_modules.values() for p in r.parameters()]
        self.net = self._data_parallel() if self.dist is not None else self.model
        self.opt = make_optimizer(cfg.train, params)
        self.sched = make_scheduler(cfg.train, self.opt)
        self.epoch = 0  # epochs completed
        self.best_val = -1.0
        self.best_epoch = 0
        self.best_state = None
        self.history: list[dict] = []
        self.train_time = 0.0

    def _data_parallel(self) -> torch.nn.Module:
        """Wrap the model in DistributedDataParallel. A regulariser that runs the model a second time (TRT's
        reversed branch) or has parameters of its own makes the step average gradients itself, after the
        backward pass (``self._manual_sync``), instead of DDP's overlapped buckets."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        ctx = self.dist
        if self.cfg.train.batch_size < ctx.world:
            raise ValueError(f"train.batch_size = {self.cfg.train.batch_size} is smaller than the {ctx.world} "
                             "processes: every process needs at least one sample per step")
        self._manual_sync = bool(self.reg_modules) or any(getattr(r, "runs_model", False) for r in self.regularizers)
        self.log(f"distributed: {ctx.world} processes ({ctx.backend}, {ctx.device.type}); "
                 + _dist.batch_message(self.cfg.train.batch_size, ctx.world)
                 + ("; gradients averaged after each backward pass (a regulariser runs the model twice or has "
                    "parameters)" if self._manual_sync else ""))
        if self._manual_sync:
            for r in self.reg_modules.values():
                _dist.broadcast_module(r, ctx)
            return _dist.broadcast_module(self.model, ctx)
        return DDP(self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                   find_unused_parameters=bool(getattr(self.model, "has_unused_parameters", False)))

    # ------------------------------------------------------------------ checkpointing
    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def state(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "config": self.cfg.to_dict(), "data": data_meta(self.bundle),
                "epoch": self.epoch,
                "model": self.model.state_dict(), "best_model": self.best_state, "best_val": self.best_val,
                "best_epoch": self.best_epoch, "optimizer": self.opt.state_dict(),
                "regularizers": {n: r.state_dict() for n, r in self.reg_modules.items()},
                "scheduler": self.sched.state_dict(), "rng": _rng_state(), "history": self.history,
                "train_time": self.train_time}

    def resume(self) -> bool:
        # Under torchrun rank 0 reads the checkpoint and sends it to the others (no shared folder needed).
        ckpt = load_checkpoint(self.ckpt_path) if self.is_main and self.ckpt_path.is_file() else None
        ckpt = _dist.broadcast(ckpt, self.dist)
        if ckpt is None:
            return False
        if ckpt.get("conversion") is not None:
            raise ValueError(f"{self.out} holds a network converted from an ANN (fewstep convert), which has no "
                             "training state to resume; train into a new --out folder")
        diff = config_differences(ckpt["config"], self.cfg)
        if diff:
            raise ValueError(f"{self.out} holds a run with a different config (differs in {diff}); "
                             "use a new --out folder")
        self.model.load_state_dict(ckpt["model"])
        for n, r in self.reg_modules.items():
            r.load_state_dict(ckpt.get("regularizers", {})[n])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.sched.load_state_dict(ckpt["scheduler"])
        if self.sched.__class__.__name__ == "CosineAnnealingLR":
            self.sched.T_max = max(1, self.cfg.train.epochs)
        _set_rng_state(ckpt["rng"])
        self.epoch, self.best_val, self.best_epoch = ckpt["epoch"], ckpt["best_val"], ckpt["best_epoch"]
        self.best_state, self.history = ckpt["best_model"], list(ckpt["history"])
        self.train_time = ckpt.get("train_time", 0.0)
        self.log(f"resuming {self.out} after epoch {self.epoch}")
        return True

    # ------------------------------------------------------------------ one epoch
    @property
    def batch_loader(self) -> bool:
        """Whether training batches come whole from the in-memory images, normalised and augmented on the
        training device (``data.loader``: ``batch``, or ``auto`` on CUDA), instead of a per-sample DataLoader."""
        mode = self.cfg.data.loader
        return hasattr(self.bundle.train, "batch") and (mode == "batch" or (mode == "auto" and self.device.type == "cuda"))

    def _batches(self, epoch: int):
        """This epoch's batches for this process. The order is ``torch.randperm`` from a generator seeded by
        (seed, epoch), cut into batches of ``train.batch_size``; under torchrun every process draws the same
        order and takes its share of each batch, so any number of processes trains on the same batches."""
        seed = self.cfg.train.seed * 100_003 + epoch
        g = torch.Generator().manual_seed(seed)
        sampler = _dist.GlobalBatchSampler(len(self.bundle.train), self.cfg.train.batch_size, g, self.rank, self.world)
        if self.batch_loader:
            return _DeviceBatches(self.bundle.train, self.device, seed, sampler)
        return DataLoader(self.bundle.train, batch_sampler=sampler, num_workers=self.cfg.train.num_workers)

    def train_epoch(self, epoch: int) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg.train
        # augmentation / dropout / Poisson: reproducible per epoch (and different draws on every process)
        torch.manual_seed(cfg.seed * 100_003 + epoch + 1_000_003 * self.rank)
        self.model.train()
        amp = cfg.amp and self.device.type == "cuda"
        tot_loss, tot_correct, tot_n = 0.0, 0, 0
        tot_terms: dict[str, float] = {}
        bar = tqdm(self._batches(epoch), desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=None if cfg.progress and self.is_main else True)
        ctx = self.dist
        for step, (x, y) in enumerate(bar):
            x = time_first(x, self.bundle.kind, self.cfg.data.T, self.cfg.data.encoding).to(self.device)
            y = y.to(self.device)
            mix = mixup(x, y, cfg.mixup) if cfg.mixup else None
            if mix is not None:
                x, y = mix[0], mix[1]  # y: the dominant label (regularisers, train accuracy)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                if self.regularizers:
                    with record(self.model, fields=self.record_fields, grad_sink=True) as rec:
                        out = self.net(x)
                    rec.input = x
                    terms = {"task_loss": self._task_loss(out, y, mix)}
                    for n, r in zip(self.reg_names, self.regularizers):
                        value = r(out, y, rec)
                        terms.update({f"{n}_{k}": v for k, v in value.items()} if isinstance(value, dict)
                                     else {n: value})
                    loss = sum(terms.values())
                else:
                    out = self.net(x)
                    loss = self._task_loss(out, y, mix)
                    terms = {}
            finite, n_global = bool(torch.isfinite(loss)), y.numel()
            if ctx is not None:  # one collective: the global batch size and whether any process diverged
                n_global, n_bad = _dist.all_sum([y.numel(), 0.0 if finite else 1.0], ctx)
                if finite and n_bad:
                    raise TrainingDiverged(f"the loss became NaN or infinite on another process at epoch {epoch}, "
                                           f"step {step}; training stopped")
            if not finite:
                last = f"{self.ckpt_path} (after epoch {self.epoch})" if self.ckpt_path.is_file() else "none yet"
                bad = [f"'{n}' became {v.item()}" for n, v in terms.items() if n != "task_loss" and not torch.isfinite(v)]
                what = f"regularizer term {', '.join(bad)}" if bad else f"loss became {loss.item()}"
                raise TrainingDiverged(f"{what} at epoch {epoch}, step {step}; training stopped. "
                                       f"Last good checkpoint: {last}. Try a lower train.lr or train.grad_clip"
                                       + (", or a smaller regularizer weight." if bad else "."))
            self.opt.zero_grad(set_to_none=True)
            if ctx is None:
                loss.backward()
            else:  # gradients are averaged over processes; weighting by the share makes it the global batch's mean
                (loss * (y.numel() * ctx.world / n_global)).backward()
                if self._manual_sync:
                    _dist.average_gradients([p for g in self.opt.param_groups for p in g["params"]], ctx)
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.opt.step()
            n = y.numel()
            tot_loss += loss.item() * n
            for k, v in terms.items():
                tot_terms[k] = tot_terms.get(k, 0.0) + float(v.detach()) * n
            tot_correct += int((out.detach().float().mean(0).argmax(-1) == y).sum())
            tot_n += n
            bar.set_postfix(loss=f"{tot_loss / tot_n:.3f}", acc=f"{tot_correct / tot_n:.3f}")
        if self.dist is not None:  # every process's share of the epoch
            names = list(tot_terms)
            tot_loss, tot_correct, tot_n, *vals = _dist.all_sum([tot_loss, tot_correct, tot_n]
                                                                 + [tot_terms[k] for k in names], self.dist)
            tot_terms = dict(zip(names, vals))
        row = {"train_loss": tot_loss / tot_n}
        row.update((f"train_{k}", v / tot_n) for k, v in tot_terms.items())
        row["train_acc"] = tot_correct / tot_n
        return row

    def _task_loss(self, out, y, mix):
        """The loss against the labels; with mixup, λ·L(y) + (1 − λ)·L(y') (exact for CE and TET, whose
        MSE term does not depend on the label)."""
        if mix is None:
            return self.loss_fn(out, y)
        _, _, y_other, lam = mix
        return lam * self.loss_fn(out, y) + (1.0 - lam) * self.loss_fn(out, y_other)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def plan(self) -> str:
        """One line saying what this run trains, on what and where, printed before the first epoch (so a run
        logging to a file says what it does long before its first epoch ends)."""
        cfg, b = self.cfg, self.bundle
        batches = len(_dist.GlobalBatchSampler(len(b.train), cfg.train.batch_size, None, 0, self.world))  # as _batches cuts
        extra = (f"; regularisers: {', '.join(self.reg_names)}" if self.reg_names else "")
        done = f", from epoch {self.epoch + 1}" if self.epoch else ""
        return (f"training {cfg.model.name} ({self.n_params:,} parameters) on {b.name}: {len(b.train):,} train / "
                f"{len(b.val):,} val / {len(b.test):,} test samples, T = {cfg.data.T}, {cfg.train.loss} loss{extra}; "
                f"{cfg.train.epochs} epochs of {batches} batches of {cfg.train.batch_size}{done} on {self.device}")

    def evaluate(self, split: str) -> dict:
        return evaluate(self.model, self.bundle.split(split), self.cfg.data.T, self.bundle.kind,
                        self.cfg.data.encoding, self.cfg.train.eval_batch_size, self.device)

    # ------------------------------------------------------------------ the whole run
    def fit(self, stop_after: int | None = None) -> dict | None:
        """Train to ``cfg.train.epochs`` (resuming if a checkpoint exists) and write metrics.json.

        ``stop_after`` stops after that many epochs of this call (to simulate an interruption);
        then no metrics are written and ``None`` is returned.
        """
        check_run_folder(self.out)
        self.resume()
        tb = None
        if self.is_main:  # under torchrun rank 0 writes the run folder, the others only train
            self.out.mkdir(parents=True, exist_ok=True)
            self.cfg.dump(self.out / "config.yaml")
            tb = _tensorboard(self.out)
        if self.epoch < self.cfg.train.epochs:
            self.log(self.plan())
        done_now = 0
        while self.epoch < self.cfg.train.epochs:
            if stop_after is not None and done_now >= stop_after:
                return None
            e = self.epoch + 1
            t0 = time.perf_counter()
            row = {"epoch": e, "lr": self.opt.param_groups[0]["lr"], **self.train_epoch(e)}
            self.sched.step()
            self.epoch = e
            if not self.is_main:
                _dist.barrier(self.dist)  # rank 0 validates and checkpoints
                done_now += 1
                continue
            val = self.evaluate("val")
            row.update(val_acc=val["accuracy"], epoch_time_s=time.perf_counter() - t0)
            self.train_time += row["epoch_time_s"]
            if val["accuracy"] > self.best_val:
                self.best_val, self.best_epoch = val["accuracy"], e
                self.best_state = {k: v.detach().clone().cpu() for k, v in self.model.state_dict().items()}
            self.history.append(row)
            _atomic_save(self.state(), self.ckpt_path)
            self._log_csv()
            _dist.barrier(self.dist)
            if tb is not None:
                for k, v in row.items():
                    if k != "epoch":
                        tb.add_scalar(k, v, e)
            self.log(f"epoch {e:3d}/{self.cfg.train.epochs}  loss {row['train_loss']:.4f}  "
                     f"train {row['train_acc']:.3f}  val {row['val_acc']:.3f}  ({row['epoch_time_s']:.1f}s)")
            done_now += 1
        return self.finish()

    def finish(self) -> dict:
        if not self.is_main:
            return _dist.broadcast(None, self.dist)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        test = self.evaluate("test")
        val = self.evaluate("val")
        metrics = {
            "dataset": self.cfg.data.name, "model": self.cfg.model.name, "T": self.cfg.data.T,
            "val_accuracy": val["accuracy"], "val_accuracy_per_step": val["accuracy_per_step"],
            "test_accuracy": test["accuracy"], "accuracy_per_step": test["accuracy_per_step"],
            "firing_rates": test["firing_rates"], "mean_firing_rate": test["mean_firing_rate"],
            "best_epoch": self.best_epoch, "epochs": self.epoch, "train_time_s": round(self.train_time, 2),
            "n_params": self.n_params, "device": str(self.device),
            "threads": torch.get_num_threads(), "n_test": test["n"], "n_val": val["n"], "n_train": len(self.bundle.train),
            "processes": self.world,
        }
        (self.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        _dist.broadcast(metrics, self.dist)
        return metrics

    def _log_csv(self) -> None:
        keys = list(self.history[0])
        with open(self.out / "log.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.history)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed: the CSV log is enough
        return None
    return SummaryWriter(str(out / "tb"))


def train(cfg: _config.Config, out_dir, **kwargs) -> dict:
    """``Trainer(cfg, out_dir, **kwargs).fit()``: train (or resume) into ``out_dir``; returns the dict written to
    ``metrics.json``."""
    return Trainer(cfg, out_dir, **kwargs).fit()
