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
``--reuse OTHER`` copies a run that another ablation finished with the same config in everything it trains
(:func:`fewstep.train.config_differences`) instead of training it again.

After training, each run is analysed once (``analysis.json``), on the best-on-validation weights:
accuracy per timestep (validation and test), the softmax and top-k trade-off curves (thresholds
fitted on validation, evaluated on test) with the OCT oracle, the calibrated exit at ≤ 0.6 pt and
≤ 1 pt accuracy drop (the fastest setting within that drop *on validation*, then measured on
test), firing rates, and energy per sample at full T and at the calibrated exits (METHODS §8).
Beside each calibrated exit the report puts the baseline it must beat: the fixed T a user without a
cutoff would run (the fewest steps whose validation accuracy is within the same drop), read off the
validation accuracy per step, and the exit's step saving over it ("vs fixed T"). The same exits are also
calibrated with a 95 % bound on the drop, as ``fewstep cutoff --max-drop d`` calibrates them (the fixed T, each
policy, and each policy with a step cap chosen for the bound), and measured on test: did each stay within d?
The aggregate goes to ``OUT/results.md`` (mean ± sample std over seeds, and each variant's paired
difference from the first), ``OUT/summary.json`` and the plots ``accuracy_per_step.png``,
``learning_curves.png`` (validation accuracy per epoch), ``tradeoff.png``, ``speedup.png``, ``bounded.png`` (the
bounded exits) and ``paired.png`` (each variant's paired differences with their 95 % interval over seeds).

By concern: the variant tokens live in :mod:`fewstep.ablation_variants`, the per-run analysis in
:mod:`fewstep.ablation_analysis`, the report in :mod:`fewstep.ablation_report`, ``--jobs`` (several runs at a time,
each in its own process) in :mod:`fewstep.ablation_parallel`; this module runs the command
(their public names are importable from here too).
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from pathlib import Path
from typing import Callable

import yaml

from . import config as _config
from . import cutoff as _cf
from .bounds import DROP_BOUND
from .ablation_analysis import (ANALYSIS_VERSION, analyse, bounded_exits, calibrated_exits,  # noqa: F401
                                images_per_second)
from .ablation_markdown import markdown
from .ablation_parallel import in_parallel
from .ablation_report import BOUNDED_KEYS, aggregate, plot_summary
from .ablation_variants import (LABEL_CHARS, TOKENS, describe_seeds, flatten, parse_seeds,  # noqa: F401
                                parse_variant_sets, register_token, seeds_arg, tokens, variant_dict)

# the exits added to the analysis after its version 1 (an older analysis gets them from --analyse-only): key -> name
LATER_EXITS = {"capped": "capped", "bounded": "harm-bounded", "bounded_drop": "drop-bounded"}


def time_left(took: dict, left: list[tuple[str, int]]) -> "float | None":
    """Seconds the runs ``left`` (``(variant, epochs)`` each) should take, from the runs timed so far: ``took`` maps
    a variant to its runs' ``(seconds, epochs)``. A variant's own seconds per epoch where it has run, else the mean
    over every timed run; None before any run was timed."""
    per_epoch = {v: sum(s for s, _ in runs) / sum(e for _, e in runs) for v, runs in took.items() if runs}
    if not per_epoch:
        return None
    every = sum(s for runs in took.values() for s, _ in runs) / sum(e for runs in took.values() for _, e in runs)
    return sum(per_epoch.get(v, every) * epochs for v, epochs in left)


def duration(seconds: float) -> str:
    """``'42 s'``, ``'7 min'``, ``'1 h 05 min'``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def later_missing(a: dict) -> list[str]:
    """The exits added to analyses after version 1 (:data:`LATER_EXITS`) that ``a`` lacks, or holds from an older
    construction of the drop bound (before ``drop_bound`` was :data:`fewstep.bounds.DROP_BOUND`)."""
    return [k for k in LATER_EXITS
            if k not in a or (k == "bounded_drop" and a.get("drop_bound", "bonferroni") != DROP_BOUND)]


def _trained(rd: Path) -> bool:
    """Whether the run folder ``rd`` holds a finished run (its metrics and its checkpoint)."""
    return (rd / "metrics.json").is_file() and (rd / "checkpoint.pt").is_file()


# ------------------------------------------------------------------------------------------ the command
class Ablation:
    """Train and analyse every (variant, seed), then aggregate. ``run()`` does it all, resuming;
    ``run(processes=N)`` trains N runs at a time, each in its own process (``--jobs``,
    :mod:`fewstep.ablation_parallel`)."""

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
        self.seeds_named = describe_seeds(seeds)
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
                 "--seeds", seeds_arg(self.seeds), "--out", str(self.out)]
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

    def run(self, analyse_only: bool = False, processes: int = 1) -> dict:
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
        self.log(f"ablation {self.out}: {len(self.variants)} variant{'s' if len(self.variants) > 1 else ''} "
                 f"({', '.join(self.variants)}) × {self.seeds_named} = {len(jobs)} run{'s' if len(jobs) > 1 else ''}")
        results: dict = {v: {} for v in self.variants}
        took: dict = {v: [] for v in self.variants}  # (seconds, epochs) of each run trained and analysed here
        by_workers = set()
        if processes > 1 and not analyse_only:
            by_workers = in_parallel(self, jobs, processes)  # the loop below then finds them all analysed
        for i, (v, k) in enumerate(jobs, 1):
            r = self._one(i, jobs, analyse_only, bundles, took, by_worker=(v, k) in by_workers)
            if r is not None:
                results[v][k] = r
        summary = aggregate(results, self.variants, self.base, self._spec())
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        (self.out / "results.md").write_text(markdown(summary))
        plotted = plot_summary(summary, self.out)
        self.log(f"wrote {self.out / 'results.md'}, summary.json" + "".join(f", {name}" for name in plotted))
        return summary

    def _one(self, i: int, jobs: list, analyse_only: bool, bundles: dict, took: dict,
             estimate: bool = True, by_worker: bool = False) -> "dict | None":
        """Train (or resume, or copy with ``--reuse``) and analyse ``jobs[i - 1]``; its analysis, or None where
        ``analyse_only`` skips an unfinished run. ``bundles`` caches the dataset between runs; ``took`` gathers the
        ``(seconds, epochs)`` of each run trained, per variant, from which it logs the time left (``estimate``; a
        worker of ``--jobs`` leaves that to the parent, which knows every worker's runs); ``by_worker``: a worker
        of this call trained and analysed it, so it is collected, not "finished earlier"."""
        from .train import Trainer, load_data

        v, k = jobs[i - 1]
        cfg, rd = self.configs[(v, k)], self.run_dir(v, k)
        tag = f"[{i}/{len(jobs)}] {v} seed {k}"
        done = _trained(rd)
        if not done and not (rd / "checkpoint.pt").exists() and self.reuse:
            src, near = self._reusable(cfg)
            if src is not None:
                shutil.copytree(src, rd, dirs_exist_ok=True)  # copy2: mtimes kept, so its analysis stays current
                self.log(f"{tag}: copied from {src} (a finished run with this config)")
                done = True
            elif near is not None:  # say why the nearest run was not taken, so a user can align the configs
                self.log(f"{tag}: not copied from {near[0]}, which differs in {', '.join(near[1])}")
        if not done and analyse_only:
            self.log(f"{tag}: not trained yet, skipped (--analyse-only)")
            return None
        cached = self._cached(cfg, rd) if done else None
        if cached is not None:  # analysed since its last epoch: no data or network needed
            said = "trained above, collected" if by_worker else f"finished earlier ({cached[1]} epochs), kept"
            self.log(f"{tag}: {said}")
            return dict(cached[0], val_per_epoch=cached[2])
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
        start = time.perf_counter()
        result = dict(self._analysis(trainer, metrics, tag), val_per_epoch=val_curve)
        if not done:  # every epoch's time is in the run's history (a resumed run's earlier epochs too)
            trained = sum(row.get("epoch_time_s", 0.0) for row in trainer.history)
            took.setdefault(v, []).append((trained + time.perf_counter() - start, max(1, len(trainer.history))))
        if not done and estimate:
            left = [(w, self.configs[(w, s)].train.epochs) for w, s in jobs[i:] if self._will_train(w, s)]
            eta = time_left(took, left)
            if left and eta is not None:
                self.log(f"{tag}: trained and analysed in {duration(took[v][-1][0])}; about {duration(eta)} "
                         f"left for the {len(left)} run{'s' if len(left) > 1 else ''} to train")
        return result

    def _finished(self, variant: str, seed: int) -> bool:
        """Whether a run is trained and its analysis current (nothing for :meth:`_one` to do but read it)."""
        rd = self.run_dir(variant, seed)
        return _trained(rd) and self._cached(self.configs[(variant, seed)], rd) is not None

    @staticmethod
    def reuse_dirs(folders) -> list[Path]:
        """``--reuse`` folders as paths; a missing one is an error that names it."""
        out = [Path(r) for r in (folders or [])]
        for r in out:
            if not r.is_dir():
                raise FileNotFoundError(f"--reuse {r}: no such folder (give an ablation folder or a folder of run folders)")
        return out

    def _will_train(self, variant: str, seed: int) -> bool:
        """Whether the run still has to train: not finished in this folder, nor to be copied by ``--reuse``."""
        rd = self.run_dir(variant, seed)
        if (rd / "metrics.json").is_file():
            return False
        copied = self.reuse and not (rd / "checkpoint.pt").exists()
        return not (copied and self._reusable(self.configs[(variant, seed)])[0] is not None)

    def _reusable(self, cfg) -> "tuple[Path | None, tuple[Path, list[str]] | None]":
        """``(run, None)``: a finished run folder under a ``--reuse`` folder whose config is ``cfg`` in everything it
        trains, the number of epochs included (its seed too: the seed is in the config); else ``(None, near)``, with
        ``near`` the run of this seed that differs in the fewest keys (at most 3) and those keys, or None."""
        from .train import config_differences

        if self._reuse_runs is None:  # the finished runs under the --reuse folders, read once
            self._reuse_runs = []
            own = self.out.resolve()
            for cf in (cf for root in self.reuse for cf in sorted(root.rglob("config.yaml"))):
                rd = cf.parent
                if rd.resolve() == own or own in rd.resolve().parents:
                    continue  # this ablation's own runs
                if _trained(rd):
                    try:
                        self._reuse_runs.append((rd, yaml.safe_load(cf.read_text())))
                    except yaml.YAMLError:
                        continue
        mine = _config.with_absolute_root(cfg)
        near = None
        for rd, saved in self._reuse_runs:
            try:
                diff = config_differences(saved, mine)
                if saved["train"]["epochs"] != mine.train.epochs:
                    diff.append("train.epochs")
            except (TypeError, ValueError, KeyError, AttributeError):
                continue  # not a fewstep run config
            if not diff:
                return rd, None
            if "train.seed" not in diff and len(diff) <= 3 and (near is None or len(diff) < len(near[1])):
                near = (rd, diff)
        return None, near

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
        if (a.get("version") != ANALYSIS_VERSION or "images_per_s" not in a or later_missing(a)
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

    def _outputs(self, trainer, ann: bool) -> tuple:
        """Running logits and labels of validation and test (``Yv, yv, Yt, yt``), for figures added to an analysis
        after it was made."""
        from .metrics import predict

        model, cfg = self._judged_model(trainer, ann)
        b, T, bs = trainer.bundle, cfg.data.T, cfg.train.eval_batch_size
        Ov, yv, _ = predict(model, b.val, T, b.kind, cfg.data.encoding, bs)
        Ot, yt, _ = predict(model, b.test, T, b.kind, cfg.data.encoding, bs)
        return _cf.running(Ov), yv, _cf.running(Ot), yt

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
                missing = later_missing(a)
                if missing:  # the outputs again, not the energy counts
                    stale = "bounded_drop" in missing and "bounded_drop" in a
                    self.log(f"{tag}: {'redoing' if stale else 'adding'} the "
                             f"{' and the '.join(LATER_EXITS[k] for k in missing)} exits of its analysis"
                             + (f" (the drop bound is now {DROP_BOUND}, fewstep.bounds)" if stale else ""))
                    outputs = self._outputs(trainer, ann)
                    for k in missing:
                        a[k] = (calibrated_exits(*outputs, cap=True) if k == "capped"
                                else bounded_exits(*outputs, bound=BOUNDED_KEYS[k]))
                    a["drop_bound"] = DROP_BOUND
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
