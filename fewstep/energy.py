"""Energy report per layer and per sample (METHODS §8): ``fewstep energy RUN [--policy topk]``.

Counted from the modules the network really runs (forward hooks of
:class:`fewstep.ops.OpCounter`), step by step:

- a synaptic layer (Conv, Linear) fed by spikes: SOPs = (share of non-zero inputs) × (its dense MACs);
- the first synaptic layer (analog or event input), layers a model marks ``analog_input`` and LSTMs:
  MACs;
- a spiking layer: its spikes, and firing rate = spikes / (neurons × steps run);
- energy = e_MAC · MACs + e_SOP · SOPs (45 nm: 4.6 pJ and 0.9 pJ; configurable).

Under a cutoff, every count stops at each sample's exit step. Normalisation, pooling and
activation layers are not priced (METHODS §8 prices synaptic operations); any other module that ran
is listed under ``uncounted`` by name and type, never silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import anytime as _any
from . import cutoff as _cf
from . import ops as _ops

E_MAC_PJ, E_SOP_PJ = _ops.E_MAC_PJ, _ops.E_SOP_PJ


def _check_costs(e_mac: float, e_sop: float) -> None:
    if e_mac < 0 or e_sop < 0:
        raise ValueError(f"energy per operation must be >= 0 pJ, got e_mac={e_mac}, e_sop={e_sop}")


def energy_table(model, chunks, exit_step: "torch.Tensor | None" = None, e_mac: float = E_MAC_PJ,
                 e_sop: float = E_SOP_PJ, ops: "dict | None" = None) -> dict:
    """Per-layer and total counts per sample (means over samples), up to ``exit_step`` (``[N]``, 1-based)
    or through all T steps. ``ops``: the counts of ``ops_per_step(model, chunks, per_layer=True)`` when the
    caller has them (counts up to any exit are prefix sums of the same pass)."""
    _check_costs(e_mac, e_sop)
    if ops is None:
        ops = _ops.ops_per_step(model, chunks, per_layer=True)
    T, N = ops["macs"].shape
    steps = torch.full((N,), T, dtype=torch.long) if exit_step is None else exit_step.long().cpu()
    if steps.shape != (N,) or int(steps.min()) < 1 or int(steps.max()) > T:
        raise ValueError(f"exit_step must hold one step in 1..{T} per sample ({N}), got shape {tuple(steps.shape)}")
    at = lambda v: _ops.ops_at_exit(v, steps)  # noqa: E731  per-sample totals up to the exit
    rows = []
    for name, d in ops["layers"].items():
        macs, sops, spikes = at(d["macs"]), at(d["sops"]), at(d["spikes"])
        row = {"layer": name, "type": ops["kinds"].get(name, "?"), "macs": float(macs.mean()),
               "sops": float(sops.mean()), "energy_pj": float((e_mac * macs + e_sop * sops).mean())}
        if name in ops["neurons"]:
            row["neurons"] = int(ops["neurons"][name])
            row["spikes"] = float(spikes.mean())
            row["firing_rate"] = float(spikes.sum() / (ops["neurons"][name] * steps.double()).sum())
        rows.append(row)
    macs, sops, spikes = at(ops["macs"]), at(ops["sops"]), at(ops["spikes"])
    energy = e_mac * macs + e_sop * sops
    return {"T": T, "n": N, "mean_steps": float(steps.double().mean()), "e_mac_pj": e_mac, "e_sop_pj": e_sop,
            "layers": rows, "uncounted": [{"layer": k, "type": v} for k, v in ops["uncounted"].items()],
            "total": {"macs": float(macs.mean()), "sops": float(sops.mean()), "spikes": float(spikes.mean()),
                      "energy_pj": float(energy.mean()), "energy_uj": float(energy.mean()) * 1e-6},
            "per_sample_energy_pj": energy.tolist()}


def energy_report(run_dir, policy: "str | None" = None, split: str = "test", calibration=None,
                  e_mac: float = E_MAC_PJ, e_sop: float = E_SOP_PJ, log=print, data_root=None) -> dict:
    """``energy_table`` of a run's split at full T and, with ``policy``, up to its calibrated exits;
    written to ``RUN/energy[_<policy>].json``. ``data_root``: read the run's dataset from there."""
    from .stream import policy_for
    from .train import load_run

    run_dir = Path(run_dir)
    model, cfg, bundle = load_run(run_dir, data_root=data_root)
    T, bs = cfg.data.T, cfg.train.eval_batch_size
    data = bundle.split(split)
    chunks, _ = _any.prepare(data, T, bundle.kind, cfg.data.encoding, bs)
    _check_costs(e_mac, e_sop)  # (before the pass over the data)
    pol = None if policy is None else policy_for(run_dir, policy, cfg, calibration, log, model, bundle)
    # one pass: the counts of every step (so up to any exit) and, for a policy, the logits that decide the exits
    ops = _ops.ops_per_step(model, chunks, per_layer=True, outputs=pol is not None)
    out = {"run": str(run_dir), "split": split, "full": energy_table(model, chunks, None, e_mac, e_sop, ops=ops)}
    if pol is not None:
        d = _cf.simulate(pol, _cf.running(ops["logits"]))  # the exits the real early exit takes (tested equal)
        out["policy"] = pol.to_dict()
        out["cutoff"] = energy_table(model, chunks, d.exit_step, e_mac, e_sop, ops=ops)
    path = run_dir / (f"energy_{policy}.json" if policy else "energy.json")
    path.write_text(json.dumps(out, indent=2))
    out["path"] = str(path)
    return out


def table_lines(t: dict, title: str) -> list[str]:
    lines = [f"{title}: {t['n']} samples, {t['mean_steps']:.2f} of {t['T']} steps on average; "
             f"e_MAC {t['e_mac_pj']:g} pJ, e_SOP {t['e_sop_pj']:g} pJ (per sample, means)",
             f"  {'layer':28s} {'type':12s} {'MACs':>11s} {'SOPs':>11s} {'spikes':>9s} {'rate':>7s} {'energy (nJ)':>11s}"]
    for r in t["layers"]:
        rate = f"{r['firing_rate']:7.4f}" if "firing_rate" in r else f"{'':7s}"
        spikes = f"{r['spikes']:9.0f}" if "spikes" in r else f"{'':9s}"
        lines.append(f"  {r['layer'][:28]:28s} {r['type'][:12]:12s} {r['macs']:11.4g} {r['sops']:11.4g} {spikes} "
                     f"{rate} {r['energy_pj'] / 1e3:11.4g}")
    tot = t["total"]
    lines.append(f"  {'total':28s} {'':12s} {tot['macs']:11.4g} {tot['sops']:11.4g} {tot['spikes']:9.0f} {'':7s} "
                 f"{tot['energy_pj'] / 1e3:11.4g}")
    if t["uncounted"]:
        lines.append("  not counted (not a synaptic or spiking layer fewstep knows how to price): "
                     + ", ".join(f"{u['layer']} ({u['type']})" for u in t["uncounted"]))
    return lines
