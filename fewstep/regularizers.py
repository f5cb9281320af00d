"""Regularisers for the Trainer: the hook they plug into, a registry by name, and the config plumbing.

A regulariser is a callable ``(logits[T, N, C], y[N], rec) -> scalar`` (``rec``: the
:class:`fewstep.record.Recorder` of the forward pass, with ``rec.model`` and ``rec.input``) that
returns its *weighted* term, or a dict of named weighted terms. Optional attributes: ``name`` (its
column in ``log.csv``, default the function's name; a dict's terms log as ``<name>_<key>``),
``fields`` (what it reads from the recording, default spikes, u and v; asking for less keeps
recording cheaper), ``setup(trainer)`` (called once, after the model is built, before training).
A regulariser that is an ``nn.Module`` (TRT's training-only heads) has its parameters trained and
checkpointed beside the model, never in it.

Built-in: ``rcs`` (:mod:`fewstep.rcs`), ``str`` (:mod:`fewstep.str_reg`) and, for an ANN trained for
conversion, ``rcs_ann`` (:mod:`fewstep.rcs`, :mod:`fewstep.qcfs`), chosen in the config::

    regularizer:
      name: rcs            # none | rcs | str | rcs+str | rcs_ann
      rcs_weight: 0.003    # options of regulariser X are the keys X_<option>

To add one: write its class, then add it to :data:`REGISTRY` and its ``<name>_<option>`` keys to
:class:`fewstep.config.RegularizerConfig`.
"""

from __future__ import annotations

from dataclasses import asdict

from .rcs import RCS, RCSANN
from .str_reg import STR

REGISTRY = {"rcs": RCS, "str": STR, "rcs_ann": RCSANN}
ALL_FIELDS = ("spikes", "u", "v")


def parse(name: str) -> list[str]:
    """``"none"`` → ``[]``; ``"rcs+str"`` → ``["rcs", "str"]``; unknown names raise with the valid ones."""
    if name is None or str(name).strip().lower() in ("", "none"):
        return []
    names = [p.strip().lower() for p in str(name).split("+")]
    bad = [n for n in names if n not in REGISTRY]
    if bad or len(set(names)) != len(names):
        raise ValueError(f"unknown or repeated regularizer {bad or name!r} in {name!r}; valid names: "
                         f"none, {', '.join(sorted(REGISTRY))} (combine with '+', e.g. rcs+str)")
    return names


def _own_keys(keys, name: str) -> list[str]:
    """The ``<name>_<option>`` keys among ``keys`` (a longer name that starts with this one, ``rcs_ann`` for
    ``rcs``, owns its own keys)."""
    longer = [o + "_" for o in REGISTRY if o != name and o.startswith(name + "_")]
    return [k for k in keys if k.startswith(name + "_") and not any(k.startswith(o) for o in longer)]


def options(cfg, name: str) -> dict:
    """The ``<name>_<option>`` keys of a :class:`RegularizerConfig`, without the prefix."""
    d = asdict(cfg)
    return {k[len(name) + 1:]: d[k] for k in _own_keys(d, name)}


def from_config(cfg) -> list:
    """The regularisers a :class:`fewstep.config.RegularizerConfig` asks for."""
    return [REGISTRY[n](**options(cfg, n)) for n in parse(cfg.name)]


def inert_keys(cfg: dict) -> list[tuple[str, str]]:
    """``(section, key)`` of a config dict's settings that no training term reads: the options of a
    regulariser its ``regularizer.name`` does not ask for, and the ``trt`` options while TRT is off.
    Two configs that differ only there train the same network (``--reuse``, resume)."""
    reg, trt = cfg.get("regularizer", {}), cfg.get("trt", {})
    on = parse(reg.get("name", "none"))
    out = [("regularizer", k) for n in REGISTRY if n not in on for k in _own_keys(reg, n)]
    if not trt.get("enabled", False):
        out += [("trt", k) for k in trt if k != "enabled"]
    return out


def build(cfg) -> list:
    """Every training-loss term a whole :class:`fewstep.config.Config` asks for: the ``regularizer``
    section, then TRT (its own ``trt`` section)."""
    from . import trt

    return from_config(cfg.regularizer) + trt.from_config(cfg.trt)


def term_names(regs) -> list[str]:
    """Column names for the terms in ``log.csv`` (unique; ``reg<i>`` for anonymous callables)."""
    out = []
    for i, r in enumerate(regs):
        base = getattr(r, "name", None) or getattr(r, "__name__", None) or f"reg{i}"
        name, k = base, 2
        while name in out:
            name, k = f"{base}{k}", k + 1
        out.append(name)
    return out


def fields_needed(regs) -> tuple[str, ...]:
    need = set()
    for r in regs:
        need |= set(getattr(r, "fields", ALL_FIELDS))
    return tuple(f for f in ALL_FIELDS if f in need)


def recorded_layers(rec, who: str, ann: bool = False) -> list[str]:
    """Names of the recorded spiking layers, or a clear error where a regulariser would silently read nothing.
    ``ann``: the regulariser reads QCFS layers of an ANN (RCS-ANN); otherwise those are refused."""
    from .qcfs import QCFS

    quantised = [n for n, m in rec.modules.items() if isinstance(m, QCFS)]
    if quantised and not ann:
        raise ValueError(f"the {who} regularizer reads spikes and membranes of spiking neurons, but this model's "
                         f"layers are QCFS activations (an ANN for conversion: {', '.join(quantised[:3])}"
                         f"{' ...' if len(quantised) > 3 else ''}); use regularizer.name: rcs_ann")
    if not rec.modules:
        raise ValueError(f"the {who} regularizer needs spiking layers, but the model has none (no LIF/IF or other "
                         "fewstep neuron module); remove the regularizer or use a spiking model")
    silent = rec.silent()
    if silent:
        raise ValueError(f"the {who} regularizer reads every spiking layer, but {', '.join(silent)} recorded nothing "
                         "in this forward pass (a custom neuron must call self._recorder.add(...) when recording, "
                         "see docs/extending.md)")
    return rec.layers
