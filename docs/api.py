"""Write ``docs/api.md``, the Python API on one page, from the code's own signatures and docstrings.

``python docs/api.py`` rewrites the page; ``tests/test_docs.py`` fails when the page differs from what this script
writes (a signature or docstring changed without the page), or when a listed name has no docstring. To add a name to
the page, add it to ``SECTIONS``.
"""
from __future__ import annotations

import importlib
import inspect
import re
import textwrap
from pathlib import Path

PAGE = Path(__file__).resolve().parent / "api.md"

# (section, one line on where it sits in the data flow, the names a user imports)
SECTIONS = [
    ("Engine: neurons, step modes, recording",
     "The spiking layers every model is built of, their pure step functions, and the recorder regularisers read.",
     ["fewstep.lif_step", "fewstep.lif_multi_step", "fewstep.LIF", "fewstep.IF", "fewstep.set_step_mode",
      "fewstep.reset", "fewstep.record", "fewstep.Recorder"]),
    ("Models", "Every model maps time-first input `[T, N, ...]` to per-step logits `[T, N, classes]`.",
     ["fewstep.models.create", "fewstep.models.available", "fewstep.models.register"]),
    ("Data", "Local folders only (nothing is downloaded); events are framed into `[T, ...]` tensors.",
     ["fewstep.data.load", "fewstep.data.available", "fewstep.data.DataBundle", "fewstep.data.read_nmnist",
      "fewstep.data.to_frames"]),
    ("Training", "A config, a Trainer that resumes exactly, the losses and the seed methods' regularisers.",
     ["fewstep.config.load", "fewstep.config.from_dict", "fewstep.train.Trainer", "fewstep.losses.make",
      "fewstep.losses.tet", "fewstep.losses.mean_ce", "fewstep.rcs.RCS", "fewstep.rcs.RCSANN", "fewstep.str_reg.STR",
      "fewstep.trt.TRT", "fewstep.train.train", "fewstep.runfolder.load_run", "fewstep.runfolder.load_network"]),
    ("Evaluation", "Per-step logits of a whole split, and accuracy at every step.",
     ["fewstep.metrics.evaluate", "fewstep.metrics.predict", "fewstep.metrics.accuracy_per_step"]),
    ("Cutoff policies and their calibration",
     "They read only running sums of per-step logits `[T, N, C]`, so they work on any network's outputs; "
     "calibration refuses the test split.",
     ["fewstep.cutoff.make", "fewstep.cutoff.running", "fewstep.cutoff.simulate", "fewstep.cutoff.oracle",
      "fewstep.cutoff.capped", "fewstep.cutoff.fastest_within", "fewstep.cutoff.calibrate_to_target",
      "fewstep.cutoff.save", "fewstep.cutoff.load", "fewstep.bounds.drop_upper_bound",
      "fewstep.bounds.harm_upper_bound"]),
    ("Real early exit and live streams",
     "The network run step by step, finished samples dropped from the batch; one stream frame by frame.",
     ["fewstep.anytime.calibration_outputs", "fewstep.anytime.prepare", "fewstep.anytime.early_exit",
      "fewstep.anytime.run_dataset", "fewstep.anytime.AnytimeStream", "fewstep.stream.read_recording",
      "fewstep.stream.decide"]),
    ("Energy", "Operations and energy per layer, at full T or up to each sample's exit (METHODS §8).",
     ["fewstep.energy.energy_table"]),
    ("Conversion and exchange", "QCFS ANNs converted to SNNs; NIR graphs out and in.",
     ["fewstep.qcfs.QCFS", "fewstep.qcfs.convert", "fewstep.nir_io.to_nir", "fewstep.nir_io.from_nir",
      "fewstep.nir_runs.import_run"]),
    ("Ablations", "Variants trained side by side on paired seeds (`fewstep ablate`).", ["fewstep.ablation.Ablation"]),
]


def resolve(dotted: str):
    mod, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def signature(obj) -> str:
    """Parameters with their defaults, without annotations (the docstrings say what each takes)."""
    parts, star = [], False
    for p in inspect.signature(obj).parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        else:
            if p.kind is p.KEYWORD_ONLY and not star:
                parts.append("*")
                star = True
            default = "" if p.default is p.empty else "=" + (p.default.__name__ if callable(p.default)
                                                                 else repr(p.default))
            parts.append(p.name + default)
    return "(" + ", ".join(parts) + ")"


def summary(obj, dotted: str) -> str:
    """The docstring's first paragraph, Sphinx roles turned into plain code spans."""
    doc = inspect.getdoc(obj)
    if not doc:
        raise ValueError(f"{dotted} has no docstring; docs/api.md lists only documented names")
    first = doc.split("\n\n")[0].replace("\n", " ")
    return re.sub(r":(?:func|class|meth|data|mod|attr):`~?([^`]+)`", r"`\1`", first)


def where(obj) -> str:
    """The file that defines ``obj``, relative to the repository (from its module's name, so an installed copy of
    the package writes the same page)."""
    mod = importlib.import_module(inspect.unwrap(obj).__module__)
    return mod.__name__.replace(".", "/") + ("/__init__.py" if hasattr(mod, "__path__") else ".py")


def wrap(text: str) -> str:
    return textwrap.fill(text, 116, break_long_words=False, break_on_hyphens=False)


def render() -> str:
    out = ["# The Python API on one page", "",
           wrap("What a script imports at each stage of fewstep's data flow (events or images → frames "
                "`[T, N, ...]` → model → per-step logits `[T, N, C]` → running sum → cutoff policy → exit step and "
                "prediction), each with its signature and the first paragraph of its docstring; the full docstring "
                "(`help(...)`) gives the equations and the paper. The command line wraps the same calls (README, "
                "\"Using it\"); [anytime.md](anytime.md#commands) walks through calibration and early exit in "
                "Python. Written by `python docs/api.py` from the code (`tests/test_docs.py` checks it is "
                "current)."), ""]
    for title, line, names in SECTIONS:
        out += [f"## {title}", "", wrap(line), ""]
        for dotted in names:
            obj = resolve(dotted)
            kind = "class " if inspect.isclass(obj) else ""
            out += [f"### `{kind}{dotted}{signature(obj)}`", "",
                    wrap(f"{summary(obj, dotted)} ([{where(obj)}](../{where(obj)}))"), ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    PAGE.write_text(render(), encoding="utf-8")
    print(f"wrote {PAGE}")
