"""The per-run analysis of ``fewstep ablate`` (``analysis.json``): accuracy per step, trade-off curves, calibrated
exits (by validation accuracy, and with a bound on the drop) and energy of one trained network. Thresholds are only
ever fitted on validation; test is only measured.
"""

from __future__ import annotations

import math
import time

import torch

from . import calibration as _cal
from . import cutoff as _cf
from . import ops as _ops
from .bounds import DROP_BOUND
from .ablation_report import BOUND_CONFIDENCE, BOUNDED_KEYS, DROPS, POLICIES  # noqa: F401

ANALYSIS_VERSION = 1


def _acc(Y, y) -> list[float]:
    return (Y.argmax(-1) == y).float().mean(1).tolist()


def analyse(model, cfg, bundle, batch_size: int | None = None) -> dict:
    """Anytime figures of one trained run (see the module doc); thresholds only ever fitted on validation."""
    from . import anytime as _any
    from .metrics import predict

    T, kind, enc = cfg.data.T, bundle.kind, cfg.data.encoding
    bs = batch_size or cfg.train.eval_batch_size
    Ov, yv, _ = predict(model, bundle.val, T, kind, enc, bs)
    chunks, yt = _any.prepare(bundle.test, T, kind, enc, bs)
    # one pass over test gives its logits, firing rates and operation counts (the same inputs predict() encodes)
    ops = _ops.ops_per_step(model, chunks, outputs=True, firing_rates=True)
    Ot, rates = ops["logits"], ops["firing_rates"]
    Yv, Yt = _cf.running(Ov), _cf.running(Ot)
    full_test = _acc(Yt, yt)[-1]
    energy_full = float(ops["energy_pj"].sum(0).mean()) * 1e-6
    oct_d = _cf.oracle(Yt, yt)
    out = {
        "version": ANALYSIS_VERSION, "T": T, "n_val": int(len(yv)), "n_test": int(len(yt)),
        "val_accuracy_per_step": _acc(Yv, yv), "test_accuracy_per_step": _acc(Yt, yt),
        "firing_rates": rates, "firing_rate": sum(rates.values()) / max(1, len(rates)),
        "spikes_per_sample": float(ops["spikes"].sum(0).mean()),
        "energy_uj_full": energy_full,
        "oct": {"accuracy": oct_d.accuracy(yt), "mean_exit_step": oct_d.mean_exit_step()},
        "curves": {}, "calibrated": {}, "test_curve": {},
    }
    for name in POLICIES:
        curve = _cal.sweep(name, Yv, yv, Yt, yt)
        out["curves"][name] = curve
        out["test_curve"][name] = {}
        for drop in DROPS:
            best = _cal.fastest_point(curve, full_test, drop, on="test") or {"mean_exit_step": float(T)}
            out["test_curve"][name][str(drop)] = {"mean_exit_step": best["mean_exit_step"],
                                                  "speedup": T / best["mean_exit_step"]}
    out["calibrated"] = calibrated_exits(Yv, yv, Yt, yt, ops["energy_pj"])
    out["capped"] = calibrated_exits(Yv, yv, Yt, yt, ops["energy_pj"], cap=True)
    out["drop_bound"] = DROP_BOUND  # the construction of the "bounded_drop" exits (fewstep.bounds)
    for key, bound in BOUNDED_KEYS.items():  # "bounded": the harm bound (the first bounded exits); "bounded_drop"
        out[key] = bounded_exits(Yv, yv, Yt, yt, bound=bound)
    return out


def bounded_exits(Yv, yv, Yt, yt, confidence: float = BOUND_CONFIDENCE, drops=DROPS, policies=POLICIES,
                  bound: str = "drop") -> dict:
    """``{rule: {drop: ...}}``: each rule calibrated on validation *with a guarantee*, as ``fewstep cutoff --max-drop
    d --confidence 0.95 --bound BOUND`` calibrates it (:func:`fewstep.calibration.calibrate_to_target`: the most
    aggressive setting whose upper confidence bound on its accuracy drop, ``bound="drop"``, or on the share of
    samples it harms, ``bound="harm"``, is <= d), then measured on test. Rules: ``timestep`` (the fixed T under the
    same bound), each policy, and each policy ``+cap`` with its step cap chosen for the bound (``--max-step auto``).
    Where no setting passes (too few validation samples to bound d:
    :func:`fewstep.calibration.smallest_n`) the rule runs every sample to T."""
    T = Yt.shape[0]
    full_test = _acc(Yt, yt)[-1]
    out: dict = {}
    for rule in ("timestep",) + tuple(policies) + tuple(f"{n}+cap" for n in policies):
        name, auto = rule.removesuffix("+cap"), rule.endswith("+cap")
        out[rule] = {}
        for drop in drops:
            r = _cal.calibrate_to_target(name, Yv, yv, drop, confidence, max_step="auto" if auto else None,
                                         bound=bound)
            d = _cf.simulate(r.policy, Yt)
            out[rule][str(drop)] = {
                "setting": {k: v for k, v in r.policy.params().items() if k in ("epsilon", "t")},
                "max_step": r.cap, "bound": r.bound, "n_fit": r.n_fit, "n_tested": r.n_test,
                "val_mean_exit_step": r.mean_exit_step,
                "test_accuracy": d.accuracy(yt), "test_drop": full_test - d.accuracy(yt),
                "test_harmed": _cal.harmed(d, Yt, yt),
                "mean_exit_step": d.mean_exit_step(), "speedup": T / d.mean_exit_step(),
                "ran_to_T": (d.exit_step >= T).float().mean().item(),
            }
    return out


def calibrated_exits(Yv, yv, Yt, yt, energy_pj=None, cap: bool = False) -> dict:
    """``{policy: {drop: ...}}``: the fastest setting within each drop on validation (with ``cap``, the step cap
    chosen with it: :func:`fewstep.calibration.fastest_within`), measured on test; energy at exit when the per-step
    energy of the test samples (``energy_pj[T, N]``) is given."""
    T = Yt.shape[0]
    full_val, full_test = _acc(Yv, yv)[-1], _acc(Yt, yt)[-1]
    out: dict = {}
    for name in POLICIES:
        out[name] = {}
        for drop in DROPS:
            pol, val = _cal.fastest_within(name, Yv, yv, drop, cap=cap)
            d = _cf.simulate(pol, Yt)
            setting = {k: v for k, v in pol.params().items() if k in ("epsilon", "t")}
            if cap:
                setting["max_step"] = pol.max_step
            out[name][str(drop)] = {
                "setting": setting,
                "val_accuracy": val["accuracy"], "val_drop": full_val - val["accuracy"],
                "val_mean_exit_step": val["mean_exit_step"],
                "test_accuracy": d.accuracy(yt), "test_drop": full_test - d.accuracy(yt),
                "mean_exit_step": d.mean_exit_step(), "speedup": T / d.mean_exit_step(),
                "energy_uj": None if energy_pj is None else float(_ops.ops_at_exit(energy_pj, d.exit_step).mean()) * 1e-6,
            }
    return out


@torch.no_grad()
def images_per_second(model, cfg, bundle, n: int = 2000, repeats: int = 3) -> float:
    """Inference throughput at full T: test images per second through the multi-step forward pass
    (evaluation mode, batches of ``train.eval_batch_size``, inputs encoded before the clock; the best of
    ``repeats`` passes over the first ``n`` test images — fewer beyond T = 4, down to one batch, so that a
    T = 64 network costs no more time — after one untimed warm-up batch)."""
    from torch.utils.data import Subset

    from . import anytime as _any
    from .metrics import MAX_SAMPLE_STEPS

    test = bundle.test
    n = max(cfg.train.eval_batch_size, n * 4 // max(4, cfg.data.T))  # about as many sample-steps at any T
    sub = Subset(test, range(min(n, len(test))))
    bs = min(cfg.train.eval_batch_size, max(1, MAX_SAMPLE_STEPS // cfg.data.T))  # the memory predict() allows
    chunks, _ = _any.prepare(sub, cfg.data.T, bundle.kind, cfg.data.encoding, bs)
    model.eval()
    model(chunks[0])
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for x in chunks:
            model(x)
        best = min(best, time.perf_counter() - t0)
    return sum(x.shape[1] for x in chunks) / best
