"""Anytime-inference reports for a run folder: ``cutoff_<policy>.json`` and ``tradeoff.json`` + PNGs.

Thresholds are always fitted on the validation split; the report split (``test`` by default) is
only evaluated. Wall-clock figures time the same streaming runner with and without early exit, on
the same split and batch size: the median of the per-round speed-ups over ``repeats`` rounds, each
timing both back to back (about half a second each), with their quartiles (:func:`fewstep.wallclock.spread`).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

from . import anytime as _any
from . import calibration as _cal
from . import cutoff as _cf
from . import ops as _ops
from . import plots
from . import wallclock as _wc
from .metrics import predict
from .runtime import OtherWork, busy_note
from .train import load_checkpoint, load_run


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _stage(on: bool, what: str):
    """One line on stderr per stage of a long report (a T = 64 Fashion-MNIST cutoff report: ~7 min on 2 cores)."""
    t0, done = time.perf_counter(), False
    if on:
        print(f"  {what} ...", end="", file=sys.stderr, flush=True)
    try:
        yield
        done = True
    finally:
        if on:
            print(f" {time.perf_counter() - t0:.1f} s" if done else " stopped", file=sys.stderr, flush=True)


def _outputs(model, bundle, cfg, split):
    O, y, _ = predict(model, bundle.split(split), cfg.data.T, bundle.kind, cfg.data.encoding,
                      cfg.train.eval_batch_size, _device(model))
    return _cf.running(O), y


def _meta(run_dir: Path, cfg) -> dict:
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    return {"model": cfg.model.name, "dataset": cfg.data.name, "T": cfg.data.T,
            "best_epoch": ckpt["best_epoch"], "calibration_split": "val"}


def _check_target(policy: str, max_drop, max_step, mc_dropout: float = 0.0) -> None:
    """Options that cannot go together with (or without) a ``--max-drop`` target, refused before any work."""
    if max_drop is not None and mc_dropout:
        raise ValueError("--mc-dropout stacks perturbed copies of every validation sample, which the --max-drop bound "
                         "would count as independent samples (a bound that is too tight): give one or the other")
    if max_step == "auto" and max_drop is None:
        raise ValueError("--max-step auto chooses the step cap together with the threshold to meet a target: "
                         "give --max-drop D (and --confidence), or a fixed --max-step K")
    if max_step is not None and policy == "timestep":
        raise ValueError("--max-step caps a threshold policy; the timestep policy's exit step is --step")


def calibrate(run_dir, policy: str, epsilon: float | None = None, step: int | None = None,
              max_drop: float | None = None, confidence: float = 0.95, mc_dropout: float = 0.0, mc_samples: int = 4,
              model=None, cfg=None, bundle=None, max_step: "int | str | None" = None, data_root=None,
              bound: str = "drop"):
    """Fit ``policy`` on the validation split of a run; returns ``(policy, target_info_or_None)``. ``max_step``
    caps the policy (:attr:`fewstep.cutoff.Policy.max_step`); with ``max_drop`` the bound (``bound``: on the
    ``drop`` or on the share of samples harmed, ``harm``) covers the capped policy, and ``max_step="auto"`` chooses
    the cap too (:func:`fewstep.calibration.calibrate_to_target`).
    ``data_root`` reads the run's dataset from another folder (:func:`fewstep.runfolder.load_run`)."""
    run_dir = Path(run_dir)
    _check_target(policy, max_drop, max_step, mc_dropout)
    if model is None:
        model, cfg, bundle = load_run(run_dir, data_root=data_root)
    T = cfg.data.T
    if max_step != "auto" and max_step is not None and not 1 <= max_step <= T:
        raise ValueError(f"--max-step {max_step} is outside 1..T = 1..{T} for this run")
    Yv, yv = _any.calibration_outputs(model, bundle.val, T, bundle.kind, cfg.data.encoding,
                                      cfg.train.eval_batch_size, _device(model), mc_dropout=mc_dropout,
                                      mc_samples=mc_samples)
    target = None
    if policy == "oct":
        raise ValueError("'oct' is the oracle (it needs the labels); it appears in 'fewstep tradeoff', "
                         "not as a deployable policy")
    if max_drop is not None:
        res = _cal.calibrate_to_target(policy, Yv, yv, max_drop, confidence, max_step=max_step, bound=bound)
        pol = res.policy
        target = {"max_drop": max_drop, "confidence": confidence, **res.summary(), "tested": res.tested,
                  "passed": any(t["accepted"] for t in res.tested),
                  # the bound of a setting that changes no answer: below it only a setting that helps more than
                  # it harms can meet a target on this split
                  "smallest_bound": _cal.upper_bound(bound, 0, 0, res.n_test, confidence) if confidence else 0.0}
    elif policy == "timestep":
        if step is not None and not 1 <= step <= T:
            raise ValueError(f"--step {step} is outside 1..T = 1..{T} for this run")
        pol = _cf.Timestep(step if step is not None else max(1, T // 2), T=T)
    else:
        pol = _cf.make(policy, epsilon=0.01 if epsilon is None else epsilon)
        if pol.needs_calibration:
            pol.calibrate(Yv, yv)
        pol.with_max_step(max_step)
    pol.T = T
    _cf.save(pol, run_dir / f"calibration_{policy}.json", {**_meta(run_dir, cfg), "n_val": int(len(yv)),
                                                          "mc_dropout": mc_dropout,
                                                          "target": target and {k: v for k, v in target.items()
                                                                                if k != "tested"}})
    return pol, target


def _class_name(c: int, classes) -> str:
    return str(classes[c]) if classes and c < len(classes) else str(c)


def exit_breakdown(d: _cf.Decision, y: torch.Tensor, full_prediction: torch.Tensor, T: int,
                   classes=None) -> dict:
    """Where a cutoff's exits fall and how right they are: the accuracy of the samples exiting at each step
    (``None`` where none exits; late exits are usually the hard samples), and per class the samples, full T's
    accuracy, the accuracy at the exit and the mean exit step. ``classes`` names the class indices."""
    right = d.prediction == y
    by_step = [None if not (m := d.exit_step == t).any() else right[m].float().mean().item() for t in range(1, T + 1)]
    per_class = []
    for c in torch.unique(y).tolist():
        m = y == c
        per_class.append({"class": _class_name(c, classes), "index": int(c),
                          "n": int(m.sum()), "full_accuracy": (full_prediction[m] == c).float().mean().item(),
                          "accuracy": right[m].float().mean().item(),
                          "mean_exit_step": d.exit_step[m].float().mean().item()})
    return {"accuracy_by_exit_step": by_step, "per_class": per_class}


def write_exits_csv(path, d: _cf.Decision, y: torch.Tensor, full_prediction: torch.Tensor, classes=None) -> Path:
    """One row per sample of the split (in its order): label, the exit step, the answer there and at T, and
    whether the cutoff *harmed* it (right at T, wrong at the exit) or *helped* it (the reverse)."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sample", "label", "label_name", "exit_step", "prediction", "correct", "prediction_full_T",
                    "correct_full_T", "change"])
        for i, (lab, ex, pr, pf) in enumerate(zip(y.tolist(), d.exit_step.tolist(), d.prediction.tolist(),
                                                  full_prediction.tolist())):
            change = "harmed" if pf == lab != pr else "helped" if pr == lab != pf else ""
            w.writerow([i, lab, _class_name(lab, classes), ex, pr, int(pr == lab), pf, int(pf == lab), change])
    return Path(path)


def cutoff_report(run_dir, policy: str, epsilon=None, step=None, max_drop=None, confidence=0.95, split="test",
                  batch_size: int = 64, calibration=None, repeats: int = 5, mc_dropout: float = 0.0,
                  continuous: bool = True, device: str = "cpu", graphs: str = "auto",
                  max_step: "int | str | None" = None, data_root=None, progress: bool = False,
                  timing_samples: "int | None" = None, bound: str = "drop") -> dict:
    """Calibrate (or load) ``policy``, run early exit on ``split`` for real on ``device`` (``graphs``: see
    :func:`fewstep.anytime.early_exit`), time it against full T, count operations; writes cutoff_POLICY.json.
    ``data_root`` reads the run's dataset from another folder (:func:`fewstep.runfolder.load_run`).
    ``progress`` prints each stage and its time on stderr. ``timing_samples`` times the wall clock on that many
    samples of the split, evenly spaced (``None``: all of them; every other figure uses the whole split). ``bound``:
    what ``max_drop`` bounds (``drop`` or ``harm``, :func:`calibrate`)."""
    run_dir = Path(run_dir)
    if calibration is None:
        _check_target(policy, max_drop, max_step, mc_dropout)
    model, cfg, bundle = load_run(run_dir, device=device, data_root=data_root)
    dev = _device(model)
    T = cfg.data.T
    if policy not in _cf.POLICIES:
        raise ValueError(f"unknown policy {policy!r}; valid names: {', '.join(sorted(_cf.POLICIES))}")
    if calibration is not None:
        pol = _cf.load(calibration, expect={"model": cfg.model.name, "T": T, "dataset": cfg.data.name})
        target = None
    else:
        with _stage(progress, f"calibrating {policy} on the validation split (T = {T})"):
            pol, target = calibrate(run_dir, policy, epsilon, step, max_drop, confidence, mc_dropout,
                                    model=model, cfg=cfg, bundle=bundle, max_step=max_step, bound=bound)
    ds = bundle.split(split)
    full_pol = _cf.Timestep(T, T=T)
    with _stage(progress, f"early exit on {split} ({len(ds)} samples)"):
        ee = _any.run_dataset(model, ds, pol, T, bundle.kind, cfg.data.encoding, batch_size, dev,
                              continuous=continuous, graphs=graphs)
    timed = ds
    if timing_samples and timing_samples < len(ds):
        timed = Subset(ds, torch.linspace(0, len(ds) - 1, timing_samples).round().long().tolist())
    with _stage(progress, f"timing full T against early exit on {len(timed)} samples ({repeats} rounds) and "
                          "multi-step passes"), OtherWork() as others:
        chunks, _ = _any.prepare(timed, T, bundle.kind, cfg.data.encoding, batch_size, dev)
        rounds = _wc.speedup_rounds(model, chunks, pol, T, batch_size, continuous, repeats, graphs=graphs)
        t_full, t_exit = (statistics.median(r) for r in rounds)
        sp = _wc.spread(*rounds)
        t_multi = _wc.multistep_seconds(model, chunks, repeats)
    busy = busy_note(torch.get_num_threads(), others.cores_busy, others.cores) if dev.type == "cpu" else None
    with _stage(progress, "counting operations up to the exits and at full T"):
        ops = _any.run_dataset(model, ds, pol, T, bundle.kind, cfg.data.encoding, batch_size, dev, count_ops=True)
        ops_full = _any.run_dataset(model, ds, full_pol, T, bundle.kind, cfg.data.encoding, batch_size, dev,
                                    count_ops=True)
    with _stage(progress, f"full-T outputs on {split} (the simulation check and the oracle)"):
        Y, y = _outputs(model, bundle, cfg, split)
    sim = _cf.simulate(pol, Y)
    d = ee.decision
    differ = d.differs(sim)
    full_acc = (Y[-1].argmax(-1) == y).float().mean().item()
    acc = d.accuracy(ee.labels)
    hist = torch.bincount(d.exit_step - 1, minlength=T)[:T].tolist()
    labels = ee.labels.to(y.device)
    if not torch.equal(labels, y):  # the runner and the full-T pass read the split in one order
        raise RuntimeError("the early-exit runner returned the split's samples in another order than the full-T pass")
    breakdown = exit_breakdown(d, y, Y[-1].argmax(-1), T, bundle.classes)
    oct_d = _cf.oracle(Y, y)
    per = lambda v: float(v.mean())  # noqa: E731
    out = {
        "policy": pol.name, "params": pol.params(), "epsilon": getattr(pol, "epsilon", None),
        "max_step": pol.max_step, "split": split,
        "n": int(len(y)), "T": T, "batch_size": batch_size, "continuous_batching": continuous,
        "full_accuracy": full_acc, "accuracy": acc, "accuracy_drop": full_acc - acc,
        "mean_exit_step": d.mean_exit_step(), "timestep_speedup": T / d.mean_exit_step(),
        "wallclock_speedup": sp["median"], "seconds_full": t_full, "seconds_early_exit": t_exit,
        "timing_samples": len(timed),
        "wallclock_speedup_rounds": sp["rounds"], "wallclock_speedup_iqr": [sp["q1"], sp["q3"]],
        # the plain way to run to T: one multi-step call per batch (faster than stepping on a GPU, slower on the CPU)
        "seconds_full_multistep": t_multi, "wallclock_speedup_vs_multistep": t_multi / t_exit,
        "exit_histogram": hist, **breakdown, "matches_simulation": not differ,
        # samples whose exit step or prediction differs from cutoff.simulate on the multi-step outputs (0 in every CPU
        # run so far): convolutions at the shrinking batch sizes may round differently (bench/README.md)
        "differ_from_simulation": differ,
        "oct_mean_exit_step": oct_d.mean_exit_step(),
        "spikes_per_sample": per(ops.spikes), "spikes_per_sample_full": per(ops_full.spikes),
        "sops_per_sample": per(ops.sops), "sops_per_sample_full": per(ops_full.sops),
        "macs_per_sample": per(ops.macs), "macs_per_sample_full": per(ops_full.macs),
        "energy_uj_per_sample": per(_ops.E_MAC_PJ * ops.macs + _ops.E_SOP_PJ * ops.sops) * 1e-6,
        "energy_uj_per_sample_full": per(_ops.E_MAC_PJ * ops_full.macs + _ops.E_SOP_PJ * ops_full.sops) * 1e-6,
        "calibration_file": str(calibration or run_dir / f"calibration_{policy}.json"),
    }
    if busy:
        out["timing_note"] = busy
    if target is not None:
        out["target"] = target
    (run_dir / f"cutoff_{policy}.json").write_text(json.dumps(out, indent=2))
    write_exits_csv(run_dir / f"cutoff_{policy}_exits.csv", d, y, Y[-1].argmax(-1), bundle.classes)
    plots.exit_histogram(d.exit_step.numpy(), T, run_dir / f"cutoff_{policy}_exits.png",
                         f"{pol.name}: exit steps on {split} (mean {d.mean_exit_step():.2f} of {T})",
                         correct=(d.prediction == y).numpy())
    return out


def tradeoff_report(run_dir, split: str = "test", policies=("timestep", "softmax", "topk", "spikecp"),
                    model=None, cfg=None, bundle=None, data_root=None) -> dict:
    """Sweep every policy's threshold (fitted on val), evaluate on ``split``; JSON + PNG. ``data_root`` reads
    the run's dataset from another folder (:func:`fewstep.runfolder.load_run`).

    The curves come from :func:`fewstep.cutoff.simulate` on full-length outputs, which gives the
    same exits and predictions as the real early-exit runner (``tests/test_anytime.py``).
    """
    run_dir = Path(run_dir)
    if model is None:
        model, cfg, bundle = load_run(run_dir, data_root=data_root)
    T = cfg.data.T
    Yv, yv = _outputs(model, bundle, cfg, "val")
    Y, y = _outputs(model, bundle, cfg, split)
    curves = {name: _cal.sweep(name, Yv, yv, Y, y) for name in policies}
    oct_d = _cf.oracle(Y, y)
    out = {"split": split, "T": T, "n": int(len(y)),
           "full_accuracy": (Y[-1].argmax(-1) == y).float().mean().item(),
           "accuracy_per_step": (Y.argmax(-1) == y).float().mean(1).tolist(),
           "oct": {"accuracy": oct_d.accuracy(y), "mean_exit_step": oct_d.mean_exit_step()},
           "policies": curves}
    out["val_accuracy_per_step"] = (Yv.argmax(-1) == yv).float().mean(1).tolist()
    out["val_full_accuracy"] = out["val_accuracy_per_step"][-1]
    (run_dir / "tradeoff.json").write_text(json.dumps(out, indent=2))
    plots.accuracy_per_step({"validation": out["val_accuracy_per_step"], split: out["accuracy_per_step"]},
                            run_dir / "accuracy_per_step.png", f"{cfg.model.name} on {cfg.data.name}")
    plots.tradeoff(curves, out["oct"], out["full_accuracy"], T, run_dir / "tradeoff.png",
                   f"{cfg.model.name} on {cfg.data.name} ({split}): accuracy vs latency")
    return out
