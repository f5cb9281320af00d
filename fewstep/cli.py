"""The ``fewstep`` command line: ``demo``, ``train``, ``eval``, ``cutoff``, ``tradeoff``, ``ablate``, ``convert``,
``stream``, ``energy``, ``export``, ``import``. This module holds the parser and the argument types; the commands
that make run folders are in :mod:`fewstep.cli_train`, those that run or write a trained network in
:mod:`fewstep.cli_run`."""

from __future__ import annotations

import argparse
import os
import sys

from .cli_run import cmd_cutoff, cmd_energy, cmd_eval, cmd_export, cmd_stream, cmd_tradeoff
from .cli_train import cmd_ablate, cmd_configs, cmd_convert, cmd_demo, cmd_import, cmd_train
from .runtime import tune_for_device

# commands that run a trained network (on --device, else the CPU): glibc's allocator is tuned for them
INFERENCE_COMMANDS = ("eval", "cutoff", "tradeoff", "stream", "energy")


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def _step_or_auto(text: str):
    """A step >= 1, or 'auto'."""
    return "auto" if text.strip().lower() == "auto" else _int_at_least(1)(text)


def _fraction(lo_open: bool, hi_open: bool):
    """A float in [0, 1] with the chosen ends open, e.g. (0, 1) or [0, 1)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        ok = (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)
        if not ok:
            hint = f" (a share, not a percentage: {v / 100:g} is {v:g} %)" if 1 <= v <= 100 else ""
            raise argparse.ArgumentTypeError(f"must be in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}, "
                                             f"got {v:g}{hint}")
        return v
    return parse


def _data_root_arg(p) -> None:
    p.add_argument("--data-root", metavar="DIR", help="read the run's dataset from DIR instead of the folder it was "
                   "trained on (a run or its data moved to another machine)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fewstep", description="Spiking networks that answer in few timesteps.")
    from . import __version__

    p.add_argument("--version", action="version", version=f"fewstep {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="train a small SNN on the 8x8 digits (about 30 s on a 2-core CPU)")
    d.add_argument("--out", default="fewstep-demo", help="output folder (default: ./fewstep-demo)")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    d.add_argument("--resume", action="store_true", help="continue an earlier demo run instead of starting over")
    d.add_argument("-v", "--verbose", action="store_true", help="print every epoch")
    d.set_defaults(fn=cmd_demo)

    t = sub.add_parser("train", help="train from a YAML config")
    t.add_argument("config", help="YAML config file, or the name of a shipped one (`fewstep configs` lists them; "
                   "docs/config.md)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key, e.g. --set train.lr=0.01 (repeatable)")
    t.add_argument("--out", required=True, help="run folder; an interrupted run in it resumes")
    t.set_defaults(fn=cmd_train)

    cf = sub.add_parser("configs", help="list the configs that ship with fewstep (train one by name), or print one")
    cf.add_argument("name", nargs="?", help="print this config's YAML (to copy and edit)")
    cf.set_defaults(fn=cmd_configs)

    e = sub.add_parser("eval", help="accuracy per timestep and firing rates of a trained run")
    e.add_argument("run", help="run folder written by 'fewstep train'")
    e.add_argument("--split", default="test", choices=["test", "val"])
    e.add_argument("--weights", default="best", choices=["best", "last"])
    e.add_argument("--device", default="cpu")
    _data_root_arg(e)
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("cutoff", help="calibrate a cutoff policy on validation data and run real early exit")
    c.add_argument("run", help="run folder written by 'fewstep train'")
    c.add_argument("--policy", required=True, choices=["topk", "softmax", "spikecp", "timestep"])
    c.add_argument("--epsilon", type=_fraction(False, True), help="softmax/topk/spikecp: tolerated error in [0, 1) "
                   "(default 0.01)")
    c.add_argument("--step", type=_int_at_least(1), help="timestep policy: the fixed exit step, 1..T (default T/2)")
    c.add_argument("--max-drop", type=_fraction(False, True), help="calibrate to a target: largest accuracy drop "
                   "accepted, as a fraction in [0, 1) (0.005 = 0.5 pt)")
    c.add_argument("--confidence", type=_fraction(True, True), default=0.95, help="confidence of the --max-drop bound, "
                   "in (0, 1) (default 0.95)")
    c.add_argument("--bound", choices=["drop", "harm"], default="drop", help="with --max-drop: bound the accuracy drop "
                   "itself (samples harmed minus samples helped; default), or the share of samples harmed, right at T "
                   "and wrong at the exit (stricter: the exits keep full T's answers); docs/anytime.md")
    c.add_argument("--split", default="test", choices=["test", "val"], help="split to report on (calibration "
                   "always uses val)")
    c.add_argument("--batch-size", type=_int_at_least(1), default=64)
    c.add_argument("--repeats", type=_int_at_least(1), default=5, help="timing rounds of at least ~0.5 s each, full T and "
                   "early exit interleaved; the median is reported (default 5)")
    c.add_argument("--timing-samples", type=_int_at_least(0), default=2048, metavar="N",
                   help="time the wall clock on N samples of the split, evenly spaced (default 2048; 0: all); "
                        "accuracy, exits and counts always use the whole split")
    c.add_argument("--calibration", help="reuse a saved calibration JSON instead of calibrating")
    c.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (early exit runs there)")
    c.add_argument("--graphs", default="auto", choices=["auto", "off", "cuda", "emulate"],
                   help="step runner: auto replays CUDA graphs on CUDA and steps eagerly elsewhere (docs/anytime.md)")
    c.add_argument("--mc-dropout", type=_fraction(False, True), default=0.0, help="calibrate under dropout of this rate on every "
                   "synaptic layer's input (the seed code's conservative perturbation; 0 = off)")
    c.add_argument("--max-step", type=_step_or_auto, help="step cap: a sample that has not exited by this step "
                   "stops there (with --max-drop, the bound covers the capped policy); 'auto' (with --max-drop) "
                   "chooses the cap on half of the validation data and tests the bound on the other half; "
                   "docs/anytime.md")
    _data_root_arg(c)
    c.set_defaults(fn=cmd_cutoff)

    tr = sub.add_parser("tradeoff", help="accuracy vs latency of every policy over its thresholds (plot + JSON)")
    tr.add_argument("run", help="run folder written by 'fewstep train'")
    tr.add_argument("--split", default="test", choices=["test", "val"])
    tr.add_argument("--max-drop", type=_fraction(False, True), default=0.01, metavar="D",
                    help="the table's choice per policy: its fastest setting within D of full-T accuracy on "
                         "validation (default 0.01 = 1 pt)")
    _data_root_arg(tr)
    tr.set_defaults(fn=cmd_tradeoff)

    a = sub.add_parser("ablate", help="train variants side by side (same data, model, budget, seeds) and compare "
                       "their accuracy per step, cutoff speed-ups and energy")
    a.add_argument("config", nargs="?", help="YAML config of the base run (a file, or a shipped config's name); leave it and --variants "
                   "out to continue or report the ablation in --out as its ablation.json describes it")
    a.add_argument("--variants", help="comma-separated variants, each tokens joined by '+', e.g. "
                   "tet,tet+rcs,tet+str (tokens: ce, tet, rcs, str, tebn, trt, qcfs, rcs_ann); LABEL=TOKENS names a variant, to run "
                   "the same tokens under several --variant-set settings")
    a.add_argument("--seeds", help="a count (3: seeds 0, 1, 2) or a list (0,5,7; seed 4 alone: 4,); default 3, or "
                   "the folder's seeds when continuing one (give more to extend it)")
    a.add_argument("--out", required=True, help="ablation folder; run the same command again, or "
                   "'fewstep ablate --out OUT', to resume")
    a.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config key for every variant (repeatable)")
    a.add_argument("--variant-set", action="append", default=[], metavar="VARIANT:KEY=VALUE",
                   help="override a key for one variant, e.g. 'tet+rcs:regularizer.rcs_weight=0.005' (repeatable)")
    a.add_argument("--analyse-only", action="store_true", help="report the finished runs without training")
    a.add_argument("--reuse", action="append", default=[], metavar="DIR",
                   help="before training a run, look under DIR (another ablation) for a finished run with exactly "
                   "its config (seed and epochs included) and copy it instead (repeatable)")
    a.add_argument("--convert-T", type=_int_at_least(1), default=64, help="steps of the SNN a QCFS variant's ANN is "
                   "converted to for the analysis (default 64)")
    a.add_argument("--jobs", type=_int_at_least(1), default=1, metavar="N",
                   help="train and analyse N runs at a time, each in its own process with 1/N of torch's threads "
                   "(default 1): sooner where one run does not keep every core busy (a 2-core CPU gains little, "
                   "bench/ablate_jobs.py); a run is reproduced with its own thread count (docs/config.md)")
    a.set_defaults(fn=cmd_ablate)

    cv = sub.add_parser("convert", help="convert a QCFS ANN run into an SNN run folder (IF neurons, threshold λ), "
                        "for eval, cutoff and tradeoff")
    cv.add_argument("run", help="run folder of an ANN trained with model.neuron: qcfs and data.T: 1")
    cv.add_argument("--out", required=True, help="new run folder for the converted SNN")
    cv.add_argument("--T", type=_int_at_least(1), default=64, help="timesteps of the converted SNN (default 64)")
    cv.add_argument("--weights", default="best", choices=["best", "last"])
    cv.add_argument("--overwrite", action="store_true", help="replace an existing run folder at --out")
    cv.set_defaults(fn=cmd_convert)

    st = sub.add_parser("stream", help="feed an event recording to a trained run frame by frame and report when "
                        "its calibrated cutoff became safe (or many recordings, one line each)")
    st.add_argument("run", help="run folder trained on an event dataset (nmnist, dvs_gesture, cifar10_dvs, "
                    "ncaltech101, eventfolder)")
    st.add_argument("--events", required=True, nargs="+", metavar="FILE", help="the recording (the run's "
                    "dataset's file format, or .bin/.bs2, .npy/.npz, .aedat4 by suffix); several files or a folder: "
                    "each streamed in turn, one line each")
    st.add_argument("--csv", metavar="FILE", help="also write one row per recording (decision, step, sensor time, "
                    "compute) to FILE")
    st.add_argument("--policy", default="topk", choices=["topk", "softmax", "spikecp", "timestep"],
                    help="cutoff policy; its calibration is read from RUN/calibration_<policy>.json, or made on "
                    "validation first (default topk)")
    st.add_argument("--calibration", help="a saved calibration JSON to use instead")
    st.add_argument("--start-us", type=float, help="use only events from this sensor time on (µs)")
    st.add_argument("--end-us", type=float, help="use only events before this sensor time (µs)")
    st.add_argument("--realtime", action="store_true", help="release frames at sensor speed")
    st.add_argument("--json", action="store_true", help="print the report as JSON (for programs)")
    st.add_argument("--plot", metavar="PNG", help="also draw the recording stepped to T: events per frame, class "
                    "probabilities and the policy's statistic against its threshold, with the decision marked")
    st.add_argument("--device", default="cpu")
    st.add_argument("--threads", default="auto", metavar="N", help="torch threads on the CPU (default auto: "
                    "torch's count, or fewer while other work keeps the cores busy, where a thread of a batch-1 "
                    "step would wait for a time slice)")
    _data_root_arg(st)
    st.set_defaults(fn=cmd_stream)

    en = sub.add_parser("energy", help="per-layer MACs, SOPs, spikes, firing rates and energy per sample (METHODS "
                        "§8), at full T and up to a cutoff's exits")
    en.add_argument("run", help="run folder written by 'fewstep train' (or 'fewstep convert')")
    en.add_argument("--policy", choices=["topk", "softmax", "spikecp", "timestep"], help="also count up to this "
                    "policy's calibrated exits (RUN/calibration_<policy>.json, or calibrated on val first)")
    en.add_argument("--calibration", help="a saved calibration JSON to use instead")
    en.add_argument("--split", default="test", choices=["test", "val"])
    en.add_argument("--e-mac", type=float, default=4.6, help="energy per MAC in pJ (default 4.6, 45 nm)")
    en.add_argument("--e-sop", type=float, default=0.9, help="energy per SOP in pJ (default 0.9, 45 nm)")
    _data_root_arg(en)
    en.set_defaults(fn=cmd_energy)

    ex = sub.add_parser("export", help="write a trained network as a NIR graph for neuromorphic simulators and "
                        "hardware (needs the nir extra; docs/deploy.md)")
    ex.add_argument("run", help="run folder written by 'fewstep train'")
    ex.add_argument("--format", default="nir", choices=["nir"], help="exchange format (default nir)")
    ex.add_argument("--out", required=True, help="file to write, e.g. model.nir")
    ex.add_argument("--dt", type=float, default=1.0, help="duration of one step in the NIR time unit (default 1); "
                    "the neurons' time constants scale with it")
    ex.add_argument("--weights", default="best", choices=["best", "last"])
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ex.set_defaults(fn=cmd_export)

    im = sub.add_parser("import", help="make a run folder of a NIR graph (a network trained in snnTorch, Norse, "
                        "SpikingJelly, ...), for eval, cutoff, tradeoff, energy and stream (needs the nir extra)")
    im.add_argument("graph", help="the NIR file")
    im.add_argument("--data", required=True, metavar="CONFIG", help="a config (file, or a shipped config's name) "
                    "whose data and train sections give the dataset, T, encoding and validation split; its model is "
                    "replaced by the graph")
    im.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key of that config")
    im.add_argument("--out", required=True, help="new run folder")
    im.add_argument("--dt", type=float, help="duration of one step in the graph's time unit (default: the graph's "
                    "metadata['dt'], else 1; e.g. 1e-3 for a graph in seconds run at 1 ms per step)")
    im.add_argument("--overwrite", action="store_true", help="replace an existing run folder at --out")
    im.set_defaults(fn=cmd_import)

    args = p.parse_args(argv)
    try:
        if args.cmd in INFERENCE_COMMANDS:  # training tunes it in the Trainer (train.tune_malloc)
            tune_for_device(getattr(args, "device", "cpu"), inference=True)
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"fewstep {args.cmd}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (``fewstep ... | head``): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (so exiting does not flush into it)
        return 0


if __name__ == "__main__":
    sys.exit(main())
