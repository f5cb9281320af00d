"""``fewstep ablate``: every variant trained with the same data, model, budget and seeds, then compared.

    fewstep ablate configs/nmnist_small.yaml --variants tet,tet+rcs,tet+str --seeds 3 --out runs/abl

A variant is a ``+``-joined list of tokens, each an edit of the base config (:data:`TOKENS`):
``ce``/``tet`` set the loss, ``rcs``/``str`` add a regulariser, ``tebn`` switches BatchNorm to TEBN.
A new method adds its token with :func:`register_token`. ``--variant-set VARIANT:KEY=VALUE`` tunes
one variant only (e.g. its regulariser weight); ``--set`` changes the base for all of them. To
compare one method under several settings, label the variants: ``LABEL=TOKENS``, e.g.
``--variants tet,str-tail=tet+str --variant-set str-tail:regularizer.str_form=tail``.

Every (variant, seed) is a normal run folder ``OUT/<variant>/seed<k>/`` (``fewstep eval``,
``cutoff`` and ``tradeoff`` work on it). Seeds are paired: a seed fixes the initial weights, the
validation split and the data order, identically for every variant. Interrupt at any time and run
the same command again: finished runs are kept, a half-trained run resumes from its last epoch.
``--reuse OTHER`` copies a run that another ablation finished with exactly the same config instead of
training it again.

After training, each run is analysed once (``analysis.json``), on the best-on-validation weights:
accuracy per timestep (validation and test), the softmax and top-k trade-off curves (thresholds
fitted on validation, evaluated on test) with the OCT oracle, the calibrated exit at ≤ 0.6 pt and
≤ 1 pt accuracy drop (the fastest setting within that drop *on validation*, then measured on
test), firing rates, and energy per sample at full T and at the calibrated exits (METHODS §8).
Beside each calibrated exit the report puts the baseline it must beat: the fixed T a user without a
cutoff would run (the fewest steps whose validation accuracy is within the same drop), read off the
validation accuracy per step, and the exit's step saving over it ("vs fixed T").
The aggregate goes to ``OUT/results.md`` (mean ± sample std over seeds, and each variant's paired
difference from the first), ``OUT/summary.json`` and the plots ``accuracy_per_step.png``,
``learning_curves.png`` (validation accuracy per epoch), ``tradeoff.png``, ``speedup.png`` and ``paired.png``
(each variant's paired differences with their 95 % interval over seeds). The report
itself lives in :mod:`fewstep.ablation_report`.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from . import config as _config
from . import cutoff as _cf
from . import ops as _ops
from . import regularizers as _regs
from .ablation_report import DROPS, POLICIES, aggregate, markdown, plot_summary

ANALYSIS_VERSION = 1

# ------------------------------------------------------------------------------------------ variants
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


# ------------------------------------------------------------------------------------------ analysis
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
        curve = _cf.sweep(name, Yv, yv, Yt, yt)
        out["curves"][name] = curve
        out["test_curve"][name] = {}
        for drop in DROPS:
            best = _cf.fastest_point(curve, full_test, drop, on="test") or {"mean_exit_step": float(T)}
            out["test_curve"][name][str(drop)] = {"mean_exit_step": best["mean_exit_step"],
                                                  "speedup": T / best["mean_exit_step"]}
    out["calibrated"] = calibrated_exits(Yv, yv, Yt, yt, ops["energy_pj"])
    out["capped"] = calibrated_exits(Yv, yv, Yt, yt, ops["energy_pj"], cap=True)
    return out


def calibrated_exits(Yv, yv, Yt, yt, energy_pj=None, cap: bool = False) -> dict:
    """``{policy: {drop: ...}}``: the fastest setting within each drop on validation (with ``cap``, the step cap
    chosen with it: :func:`fewstep.cutoff.fastest_within`), measured on test; energy at exit when the per-step
    energy of the test samples (``energy_pj[T, N]``) is given."""
    T = Yt.shape[0]
    full_val, full_test = _acc(Yv, yv)[-1], _acc(Yt, yt)[-1]
    out: dict = {}
    for name in POLICIES:
        out[name] = {}
        for drop in DROPS:
            pol, val = _cf.fastest_within(name, Yv, yv, drop, cap=cap)
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


# ------------------------------------------------------------------------------------------ the command
class Ablation:
    """Train and analyse every (variant, seed), then aggregate. ``run()`` does it all, resuming."""

    def __init__(self, config_path, variants: list[str], seeds, out, overrides: list[str] | None = None,
                 variant_sets: list[str] | None = None, log: Callable[[str], None] = print, convert_T: int = 64,
                 base: dict | None = None, reuse: "list | None" = None):
        if not variants:
            raise ValueError("--variants needs at least one variant, e.g. tet,tet+rcs")
        if len(set(variants)) != len(variants):
            raise ValueError(f"--variants lists a variant twice: {variants}")
        for v in variants:
            tokens(v)
        self.config_path = str(config_path) if config_path else None
        self._base_from_folder = base is not None
        if base is not None:  # a resolved base config (overrides applied), as an ablation folder stores it
            self.base = _config.from_dict(base).to_dict()
        else:  # data.root made absolute, as in the run folders, so the folder is read from anywhere
            self.base = _config.with_absolute_root(_config.load(config_path or None, overrides or [])).to_dict()
        self.specs = {v.rpartition("=")[0] or v: v for v in variants}  # label -> LABEL=TOKENS (or TOKENS)
        if len(self.specs) != len(variants):
            raise ValueError(f"--variants lists a label twice: {variants}")
        self.variants, self.seeds = list(self.specs), parse_seeds(seeds)
        self.overrides = list(overrides or [])
        self.raw_variant_sets = list(variant_sets or [])
        self.variant_sets = parse_variant_sets(self.raw_variant_sets, self.variants)
        self.out = Path(out)
        self.reuse = self.reuse_dirs(reuse)
        self._reuse_runs: "list | None" = None
        self.log = log
        if int(convert_T) != convert_T or convert_T < 1:
            raise ValueError(f"--convert-T must be a whole number >= 1, got {convert_T!r}")
        self.convert_T = int(convert_T)
        self.configs = {(v, k): _config.from_dict(variant_dict(self.base, self.specs[v], k, self.variant_sets[v]))
                        for v in self.variants for k in self.seeds}  # every config checked before any training

    @classmethod
    def from_folder(cls, out, log: Callable[[str], None] = print) -> "Ablation":
        """The ablation an ``OUT/ablation.json`` describes (base config, variants, seeds, per-variant settings),
        to resume or report it without repeating its command; the config file itself need not exist any more."""
        spec_path = Path(out) / "ablation.json"
        if not spec_path.is_file():
            raise FileNotFoundError(f"{spec_path} not found: {out} is not an ablation folder; give the config and "
                                    "--variants to start one")
        spec = json.loads(spec_path.read_text())
        specs = spec.get("variant_specs")
        if specs is None:  # folders written before the specs were stored: the labels' tokens are in the command
            words = shlex.split(spec.get("command", ""))
            specs = (words[words.index("--variants") + 1].split(",") if "--variants" in words
                     else list(spec["variants"]))
        convert_T = spec.get("convert_T") or 64
        base = spec["base"]
        root = str(base.get("data", {}).get("root", ""))
        if root and not Path(root).expanduser().is_absolute():  # older folders: the runs stored it absolute
            for run_cfg in sorted(Path(out).glob("*/seed*/config.yaml")):
                saved = str((yaml.safe_load(run_cfg.read_text()) or {}).get("data", {}).get("root", ""))
                if Path(saved).is_absolute() and Path(saved).as_posix().endswith(Path(root).as_posix().lstrip("./")):
                    base = dict(base, data=dict(base["data"], root=saved))
                    break
        return cls(spec.get("config"), specs, ",".join(map(str, spec["seeds"])) + ",", out, spec.get("overrides"),
                   spec.get("variant_sets"), log=log, convert_T=convert_T, base=base)

    def run_dir(self, variant: str, seed: int) -> Path:
        return self.out / variant / f"seed{seed}"

    def command(self) -> str:
        parts = ["fewstep ablate", self.config_path or "(defaults)", "--variants", ",".join(self.specs.values()),
                 "--seeds", ",".join(map(str, self.seeds)), "--out", str(self.out)]
        parts += [f"--set {o}" for o in self.overrides] + [f"--variant-set '{o}'" for o in self.raw_variant_sets]
        if self.converts():
            parts += ["--convert-T", str(self.convert_T)]
        return " ".join(parts)

    def converts(self) -> bool:
        return any(c.model.neuron == "qcfs" for c in self.configs.values())

    def differences(self) -> dict[str, dict]:
        """Per variant, ``{KEY: value}`` of every resolved setting in which it differs from the base config (the
        seed aside): what its tokens and ``--variant-set`` changed, so a report never calls a budget shared that is not."""
        flat_base = flatten(self.base)
        return {v: {k: val for k, val in flatten(self.configs[(v, self.seeds[0])].to_dict()).items()
                    if k != "train.seed" and flat_base.get(k, object()) != val}
                for v in self.variants}

    def _spec(self) -> dict:
        return {"command": self.command(), "config": self.config_path, "base": self.base, "variants": self.variants,
                "variant_specs": list(self.specs.values()),
                "seeds": self.seeds, "overrides": self.overrides, "variant_sets": self.raw_variant_sets,
                "differences": self.differences(), "convert_T": self.convert_T if self.converts() else None}

    def run(self, analyse_only: bool = False) -> dict:
        from .train import Trainer, load_data

        spec_path = self.out / "ablation.json"
        if self.out.is_dir() and not spec_path.is_file() and any(self.out.iterdir()):
            held = sorted(p.name for p in self.out.iterdir())
            raise ValueError(f"{self.out} is not empty and is not an ablation folder (no ablation.json); it holds "
                             f"{', '.join(held[:8])}{' ...' if len(held) > 8 else ''}. Choose a new or empty --out")
        self.out.mkdir(parents=True, exist_ok=True)
        if spec_path.is_file() and not self._base_from_folder:  # (from_folder: the base is that file's)
            old = json.loads(spec_path.read_text())
            try:  # read through today's schema, so a key added since (with its default) is no difference
                old_base = _config.from_dict(old.get("base")).to_dict()
            except (TypeError, ValueError):
                old_base = old.get("base")
            if isinstance(old_base, dict):  # (older folders: a relative root)
                old_base = _config.with_absolute_root(_config.from_dict(old_base)).to_dict()
            if old_base != self.base:
                raise ValueError(f"{self.out} holds an ablation of a different base config (see {spec_path}); "
                                 "use a new --out folder")
        spec_path.write_text(json.dumps(self._spec(), indent=2))
        bundles: dict = {}
        jobs = [(v, k) for k in self.seeds for v in self.variants]  # seed-major: early results are paired
        results: dict = {v: {} for v in self.variants}
        for i, (v, k) in enumerate(jobs, 1):
            cfg, rd = self.configs[(v, k)], self.run_dir(v, k)
            tag = f"[{i}/{len(jobs)}] {v} seed {k}"
            done = (rd / "metrics.json").is_file() and (rd / "checkpoint.pt").is_file()
            if not done and not (rd / "checkpoint.pt").exists() and self.reuse:
                src = self._reusable(cfg)
                if src is not None:
                    shutil.copytree(src, rd, dirs_exist_ok=True)  # copy2: mtimes kept, so its analysis stays current
                    self.log(f"{tag}: copied from {src} (a finished run with this config)")
                    done = True
            if not done and analyse_only:
                self.log(f"{tag}: not trained yet, skipped (--analyse-only)")
                continue
            cached = self._cached(cfg, rd) if done else None
            if cached is not None:  # analysed since its last epoch: no data or network needed
                self.log(f"{tag}: finished earlier ({cached[1]} epochs), kept")
                results[v][k] = dict(cached[0], val_per_epoch=cached[2])
                continue
            akey = (cfg.data.T, k, json.dumps(cfg.to_dict()["data"], sort_keys=True))
            if akey not in bundles:
                bundles.clear()  # one dataset in memory at a time
                bundles[akey] = load_data(cfg)
            bundle = bundles[akey]
            if not done:
                trainer = Trainer(cfg, rd, bundle=bundle, log=lambda s, tag=tag: self.log(f"{tag}: {s}"))
                self.log(f"{tag}: training -> {rd}")
                metrics = trainer.fit()
            else:
                trainer = Trainer(cfg, rd, bundle=bundle, log=lambda s: None)
                trainer.resume()  # refuses a folder trained with another config
                self.log(f"{tag}: finished earlier ({trainer.epoch} epochs), kept")
                metrics = json.loads((rd / "metrics.json").read_text())
            val_curve = [row.get("val_acc") for row in trainer.history]  # one row per epoch, kept by the checkpoint
            results[v][k] = dict(self._analysis(trainer, metrics, tag), val_per_epoch=val_curve)
        summary = aggregate(results, self.variants, self.base, self._spec())
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        (self.out / "results.md").write_text(markdown(summary))
        plot_summary(summary, self.out)
        self.log(f"wrote {self.out / 'results.md'}, summary.json, accuracy_per_step.png, learning_curves.png, "
                 "tradeoff.png, speedup.png" + (", paired.png" if len(summary["variants"]) > 1 else ""))
        return summary

    @staticmethod
    def reuse_dirs(folders) -> list[Path]:
        """``--reuse`` folders as paths; a missing one is an error that names it."""
        out = [Path(r) for r in (folders or [])]
        for r in out:
            if not r.is_dir():
                raise FileNotFoundError(f"--reuse {r}: no such folder (give an ablation folder or a folder of run folders)")
        return out

    def _reusable(self, cfg) -> "Path | None":
        """A finished run folder under a ``--reuse`` folder whose config is ``cfg`` in everything it trains,
        the number of epochs included (its seed too: the seed is in the config), or None."""
        from .train import config_differences

        if self._reuse_runs is None:  # the finished runs under the --reuse folders, read once
            self._reuse_runs = []
            own = self.out.resolve()
            for cf in (cf for root in self.reuse for cf in sorted(root.rglob("config.yaml"))):
                rd = cf.parent
                if rd.resolve() == own or own in rd.resolve().parents:
                    continue  # this ablation's own runs
                if (rd / "metrics.json").is_file() and (rd / "checkpoint.pt").is_file():
                    try:
                        self._reuse_runs.append((rd, yaml.safe_load(cf.read_text())))
                    except yaml.YAMLError:
                        continue
        mine = _config.with_absolute_root(cfg)
        for rd, saved in self._reuse_runs:
            try:
                if saved["train"]["epochs"] == mine.train.epochs and not config_differences(saved, mine):
                    return rd
            except (TypeError, ValueError, KeyError, AttributeError):
                continue  # not a fewstep run config
        return None

    def _cached(self, cfg, rd: Path):
        """``(analysis, epochs, validation accuracy per epoch)`` of a finished run whose ``analysis.json`` is
        current (this version, newer than the checkpoint, at this ``--convert-T``), else None; refuses a run
        folder trained with another config, as resuming it would."""
        from .runfolder import load_checkpoint
        from .train import config_differences

        path, ck = rd / "analysis.json", rd / "checkpoint.pt"
        if not path.is_file() or path.stat().st_mtime < ck.stat().st_mtime:
            return None
        a = json.loads(path.read_text())
        ann = cfg.model.neuron == "qcfs"
        if (a.get("version") != ANALYSIS_VERSION or "images_per_s" not in a or "capped" not in a
                or (ann and a.get("T") != self.convert_T)):
            return None
        ckpt = load_checkpoint(ck)
        diff = config_differences(ckpt["config"], _config.with_absolute_root(cfg))
        if diff:
            raise ValueError(f"{rd} holds a run with a different config (differs in {diff}); use a new --out folder")
        return a, ckpt["epoch"], [row.get("val_acc") for row in ckpt["history"]]

    def _judged_model(self, trainer, ann: bool):
        """The best-on-validation network and its config, as analysed (a QCFS ANN as the SNN it converts to)."""
        if trainer.best_state is not None:
            trainer.model.load_state_dict(trainer.best_state)
        model, cfg = trainer.model.cpu().eval(), trainer.cfg
        if ann:
            from . import qcfs as _qcfs

            _qcfs.check_static(cfg)
            model, cfg = _qcfs.convert(model).eval(), _qcfs.converted_config(cfg, self.convert_T)
        return model, cfg

    def _capped(self, trainer, ann: bool) -> dict:
        from .metrics import predict

        model, cfg = self._judged_model(trainer, ann)
        b, T, bs = trainer.bundle, cfg.data.T, cfg.train.eval_batch_size
        Ov, yv, _ = predict(model, b.val, T, b.kind, cfg.data.encoding, bs)
        Ot, yt, _ = predict(model, b.test, T, b.kind, cfg.data.encoding, bs)
        return calibrated_exits(_cf.running(Ov), yv, _cf.running(Ot), yt, cap=True)

    def _analysis(self, trainer, metrics: dict, tag: str) -> dict:
        rd = trainer.out
        path = rd / "analysis.json"
        ck = (rd / "checkpoint.pt").stat().st_mtime
        ann = trainer.cfg.model.neuron == "qcfs"
        if path.is_file() and path.stat().st_mtime >= ck:
            a = json.loads(path.read_text())
            if a.get("version") == ANALYSIS_VERSION and (not ann or a.get("T") == self.convert_T):
                if "images_per_s" not in a:  # added after version 1: measured alone, kept with the rest
                    a["images_per_s"] = images_per_second(*self._judged_model(trainer, ann), trainer.bundle)
                    path.write_text(json.dumps(a, indent=2))
                if "capped" not in a:  # added after version 1: the outputs again, not the energy counts
                    self.log(f"{tag}: adding the capped exits to its analysis")
                    a["capped"] = self._capped(trainer, ann)
                    path.write_text(json.dumps(a, indent=2))
                return a
        self.log(f"{tag}: analysing (accuracy per step, trade-off curves, calibrated exits, energy)"
                 + (f" of the SNN converted to T = {self.convert_T}" if ann else ""))
        model, cfg = self._judged_model(trainer, ann)
        t0 = time.perf_counter()
        a = analyse(model, cfg, trainer.bundle)
        a["images_per_s"] = images_per_second(model, cfg, trainer.bundle)
        if ann:
            a.update(ann_test_accuracy=metrics.get("test_accuracy"), ann_val_accuracy=metrics.get("val_accuracy"))
        a.update(train_time_s=metrics.get("train_time_s"), epochs=metrics.get("epochs"),
                 best_epoch=metrics.get("best_epoch"), analysis_time_s=round(time.perf_counter() - t0, 1),
                 n_params=metrics.get("n_params"), train_threads=metrics.get("threads"),
                 train_device=metrics.get("device"))
        path.write_text(json.dumps(a, indent=2))
        return a
