"""The variants of ``fewstep ablate``: tokens that edit a base config, and the seeds and per-variant settings.

A variant is a ``+``-joined list of tokens (:data:`TOKENS`), or ``LABEL=TOKENS``; a new method adds its token
with :func:`register_token`. :func:`variant_dict` builds the config of one (variant, seed).
"""

from __future__ import annotations

from typing import Callable

from . import config as _config
from . import regularizers as _regs

TOKENS: dict[str, tuple[Callable[[dict], None], str]] = {}


def register_token(name: str, doc: str):
    """Decorator: ``fn(config_dict)`` edits the config for the variant token ``name``."""

    def deco(fn):
        if name in TOKENS:
            raise ValueError(f"ablation token {name!r} is already registered")
        TOKENS[name] = (fn, doc)
        return fn

    return deco


def _add_regularizer(d: dict, name: str) -> None:
    reg = d.setdefault("regularizer", {})
    names = _regs.parse(reg.get("name", "none"))
    if name not in names:
        reg["name"] = "+".join(names + [name])


@register_token("ce", "loss: cross-entropy of the time-averaged logits")
def _ce(d):
    d.setdefault("train", {})["loss"] = "ce"


@register_token("tet", "loss: TET (per-step cross-entropy)")
def _tet(d):
    d.setdefault("train", {})["loss"] = "tet"


@register_token("rcs", "add the RCS regulariser (regularizer.rcs_* options)")
def _rcs(d):
    _add_regularizer(d, "rcs")


@register_token("str", "add the STR regulariser (regularizer.str_* options)")
def _str(d):
    _add_regularizer(d, "str")


@register_token("tebn", "TEBN instead of BatchNorm (model.norm: tebn)")
def _tebn(d):
    d.setdefault("model", {})["norm"] = "tebn"


@register_token("trt", "temporal reversed training (trt.enabled: true; trt.* options)")
def _trt(d):
    d.setdefault("trt", {})["enabled"] = True


@register_token("qcfs", "an ANN with QCFS activations (model.neuron: qcfs, data.T: 1), analysed as the SNN it "
                "converts to at --convert-T steps (fewstep/qcfs.py)")
def _qcfs(d):
    d.setdefault("model", {})["neuron"] = "qcfs"
    d.setdefault("data", {})["T"] = 1


@register_token("rcs_ann", "add the RCS-ANN regulariser to a QCFS ANN (regularizer.rcs_ann_* options)")
def _rcs_ann(d):
    _add_regularizer(d, "rcs_ann")


@register_token("general12", "the general SNN at T = 1 (model.name: general12_cnn with the paper's neuron: tau 0.4, "
                "theta 0.5, rectangle surrogate; data.T: 1; model.options reset to the paper's network, sized with "
                "--variant-set VARIANT:model.options.dims=[...] and .depths=[...]; fewstep/models/general12.py)")
def _general12(d):
    d["model"] = {**d.get("model", {}), "name": "general12_cnn", "tau": 0.4, "theta": 0.5,
                  "surrogate": "rectangle", "options": {}}
    d.setdefault("data", {})["T"] = 1


LABEL_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-_.@")


def tokens(variant: str) -> list[str]:
    """The tokens of ``TOKENS`` or ``LABEL=TOKENS``."""
    label, _, spec = variant.rpartition("=")
    if label and (not set(label) <= LABEL_CHARS or label.startswith(".")):
        raise ValueError(f"variant label {label!r} must be letters, digits and + - _ . @ (it names a folder)")
    parts = [p.strip() for p in spec.split("+")]
    bad = [p for p in parts if p not in TOKENS]
    if not variant.strip() or bad:
        valid = ", ".join(f"{k} ({doc})" for k, (_, doc) in sorted(TOKENS.items()))
        raise ValueError(f"unknown ablation token(s) {bad or [variant]} in variant {variant!r}; valid tokens: {valid}")
    return parts


def variant_dict(base: dict, variant: str, seed: int, variant_sets: "list[str] | None" = None) -> dict:
    """The config dict of one (variant, seed): base → the variant's tokens → its --variant-set → the seed."""
    d = {k: dict(v or {}) for k, v in base.items()}
    for tok in tokens(variant):  # (a variant LABEL=TOKENS is built from its TOKENS)
        TOKENS[tok][0](d)
    d = _config.apply_overrides(d, variant_sets or [])
    d.setdefault("train", {})["seed"] = int(seed)
    return d


def flatten(d: dict, prefix: str = "") -> dict:
    """``{"train": {"lr": 0.1}}`` → ``{"train.lr": 0.1}`` (nested dicts only; lists stay values)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_seeds(spec) -> list[int]:
    """``3`` → ``[0, 1, 2]``; ``"0,5,7"`` → ``[0, 5, 7]``; ``"4,"`` → ``[4]`` (a lone number is a count)."""
    s = str(spec).strip()
    if "," in s:
        seeds = [int(p) for p in s.split(",") if p.strip()]
    else:
        if not s.isdigit() or int(s) < 1:
            raise ValueError(f"--seeds takes a count (3 → seeds 0, 1, 2) or a list (0,5,7; one seed: 0,), got {spec!r}")
        seeds = list(range(int(s)))
    if len(set(seeds)) != len(seeds) or any(k < 0 for k in seeds):
        raise ValueError(f"--seeds must be distinct non-negative integers, got {spec!r}")
    return seeds


def seeds_arg(seeds: list[int]) -> str:
    """``--seeds`` as a command line names ``seeds`` (the inverse of :func:`parse_seeds`): ``[8]`` → ``8,`` (a lone
    ``8`` would be a count, seeds 0–7), ``[6, 7]`` → ``6,7``."""
    return ",".join(map(str, seeds)) + ("," if len(seeds) == 1 else "")


def describe_seeds(spec) -> str:
    """The seeds ``spec`` (:func:`parse_seeds`) names, as ``fewstep ablate`` announces them before training; where
    a typed lone number (a string) was read as a count of seeds, how to name that seed alone instead (``--seeds 8``
    trains seeds 0–7, ``--seeds 8,`` seed 8)."""
    seeds = parse_seeds(spec)
    s = str(spec).strip()
    if len(seeds) > 4 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        named = f"seeds {seeds[0]}–{seeds[-1]}"
    else:
        named = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    if isinstance(spec, str) and "," not in s and len(seeds) > 1:  # (a typed count; not a default int)
        named += f" (--seeds {s} is a count; seed {s} alone: --seeds {s},)"
    return named


def parse_variant_sets(items: list[str], variants: list[str]) -> dict[str, list[str]]:
    """``["tet+rcs:regularizer.rcs_weight=0.01", ...]`` → ``{"tet+rcs": ["regularizer.rcs_weight=0.01"]}``."""
    out: dict[str, list[str]] = {v: [] for v in variants}
    for item in items or []:
        if ":" not in item or "=" not in item.split(":", 1)[1]:
            raise ValueError(f"--variant-set expects VARIANT:KEY=VALUE, got {item!r}")
        v, kv = item.split(":", 1)
        if v not in out:
            raise ValueError(f"--variant-set names variant {v!r}, which is not among --variants {variants}")
        out[v].append(kv)
    return out
