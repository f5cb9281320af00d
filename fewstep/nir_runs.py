"""Run folders to and from NIR files: ``fewstep export`` writes a run's network as a NIR graph, ``fewstep import``
makes a run folder of a NIR graph (a network trained anywhere: snnTorch, Norse, SpikingJelly, Lava-dl, ...) so that
``eval``, ``cutoff``, ``tradeoff``, ``energy`` and ``stream`` work on it. The graph ↔ network mapping is
:mod:`fewstep.nir_io`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .nir_io import _nir, from_nir, to_nir


def export_run(run, out, dt: float = 1.0, weights: str = "best", overwrite: bool = False) -> dict:
    """Write ``run``'s network to ``out`` (a NIR HDF5 file); re-import it and compare outputs on random input."""
    from .train import load_run

    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    model, cfg, _ = load_run(run, weights=weights)
    graph = to_nir(model, dt=dt)
    nir = _nir()
    out.parent.mkdir(parents=True, exist_ok=True)
    nir.write(str(out), graph)
    back = from_nir(nir.read(str(out)))
    x = torch.rand(max(2, int(cfg.data.T)), 4, *model.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((model(x) - back(x)).abs().max())
    kinds = [type(n).__name__ for k, n in graph.nodes.items() if k not in ("input", "output")]
    return {"path": str(out), "dt": dt, "nodes": kinds, "max_abs_diff": diff}


def import_run(graph, data, out, overrides=(), dt=None, overwrite: bool = False, log=print) -> dict:
    """``fewstep import``: a run folder ``out`` holding the NIR file ``graph`` as model ``nir``, for the dataset of the
    config ``data`` (a file or a shipped config's name; its ``data`` and ``train`` sections are used, its model is
    replaced). The graph is copied into the folder and named relative to it, so the folder can move. The network is
    checked against the dataset (input shape, classes) and its accuracy per step on validation is printed: a wrong
    ``dt`` shows there as near-chance accuracy. Returns the summary written to ``out/import.json``."""
    from . import config as _config
    from . import runfolder as _run
    from .metrics import evaluate

    graph, out = Path(graph), Path(out)
    if not graph.is_file():
        raise FileNotFoundError(f"no NIR file at {graph}")
    _nir()
    _run.make_room(out, overwrite, remove=False)  # refused before any work; replaced once the graph fits
    base = _config.load(data, list(overrides)).to_dict()
    options = {"graph": str(graph.resolve())} if dt is None else {"graph": str(graph.resolve()), "dt": float(dt)}
    cfg = _config.with_absolute_root(_config.from_dict({**base, "model": {"name": "nir", "options": options}}))
    bundle = _run.load_data(cfg)
    model = _run.build_model(cfg, bundle)  # checks the graph against the dataset
    val = evaluate(model, bundle.val, cfg.data.T, bundle.kind, cfg.data.encoding, cfg.train.eval_batch_size,
                   progress=cfg.train.progress)["accuracy_per_step"]
    blob, source = graph.read_bytes(), str(graph.resolve())  # read before --out is replaced: it may lie there
    _run.make_room(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.nir").write_bytes(blob)
    saved = _config.from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"],
                                                          "options": {**options, "graph": "model.nir"}}})
    saved.dump(out / "config.yaml")
    info = {"imported_from": source, "dt": float(model.dt), "T": int(cfg.data.T),
            "dataset": cfg.data.name, "layers": [type(m).__name__ for m in model.layers],
            "val_accuracy_per_step": [float(a) for a in val]}
    _run._atomic_save({"format": _run.CHECKPOINT_FORMAT, "config": saved.to_dict(), "data": _run.data_meta(bundle),
                       "epoch": 0, "model": model.state_dict(), "best_model": None, "best_val": float(val[-1]),
                       "best_epoch": 0, "history": [], "import": {k: v for k, v in info.items()
                                                                   if k != "val_accuracy_per_step"}},
                      out / "checkpoint.pt")
    (out / "import.json").write_text(json.dumps(info, indent=2))
    log(f"imported {graph} ({len(info['layers'])} layers, dt = {info['dt']:g}) for {cfg.data.name} at T = "
        f"{cfg.data.T} -> {out}")
    log("validation accuracy per step: " + ", ".join(f"t={t} {100 * a:.1f} %" for t, a in enumerate(val, 1)))
    chance = 1.0 / max(1, bundle.num_classes)
    if val[-1] < 1.5 * chance:
        log(f"warning: {100 * val[-1]:.1f} % at T is near chance ({100 * chance:.0f} %): check dt (the graph's neurons "
            f"were read with dt = {info['dt']:g}; pass --dt with the step duration the graph was made for), the "
            "input encoding (data.encoding, data.T) and the class order (the dataset's: "
            f"{', '.join(map(str, bundle.classes[:5]))}{', ...' if len(bundle.classes) > 5 else ''})")
    return info

