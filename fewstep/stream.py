"""Anytime inference on one recording: ``fewstep stream RUN --events FILE`` (or on many, one after another:
``--events FILE FILE ...`` or a folder, :func:`stream_many`).

The recording is framed exactly as the run's dataset frames its samples (``data.T`` equal-time bins
over the recording's span, or the first ``data.window_us``), then fed to the network one frame at a
time through the single-step API. After every step the run's calibrated cutoff policy reads the
running logits ``Y(t) = Σ_{k≤t} O(k)``; the first step at which it fires is the decision. The
report gives the decision, its step, the *sensor time* at which it became safe (step × frame
duration: the events the network had seen by then), the compute time of each step and the
prediction trace. With ``realtime=True`` frames are released at sensor speed (each frame only once
its last event would have been recorded), so the wall-clock latency is the sensor latency plus
compute.

Decisions equal those of the batched early exit (:func:`fewstep.anytime.early_exit`) on the same
sample (tested on real N-MNIST recordings and on the ten DVS128 Gesture clips). The network is rebuilt
from its checkpoint alone (:func:`fewstep.train.load_network`); the dataset is read only to calibrate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import cutoff as _cf
from .data.events import EventFileError


def event_source(cfg) -> tuple[str, tuple]:
    """The event reader and sensor size ``(W, H)`` of the recordings a run's dataset is built from. A file whose
    suffix names a format (:data:`~fewstep.data.event_datasets.SUFFIX_READERS`, e.g. DVS128 Gesture clips saved in
    N-MNIST's binary format) is read in that format whatever the dataset."""
    from .data.event_sets import SOURCES

    name = cfg.data.name
    if name not in SOURCES:
        raise ValueError(f"fewstep stream reads event recordings; this run was trained on {name!r}, which is not "
                         f"one of the event datasets {', '.join(sorted(SOURCES))}")
    reader, sensor = SOURCES[name]
    sensor = cfg.data.sensor_size or sensor  # the run's own sensor, where its dataset takes one
    if sensor is None:
        raise ValueError(f"the run's config has no data.sensor_size, which {name} needs")
    return reader, tuple(int(v) for v in sensor)


@dataclass
class Recording:
    frames: torch.Tensor  # [T, P, H, W]
    frame_us: float       # sensor time per frame
    span_us: float        # sensor time the frames cover
    n_events: int
    path: str


def framing_of(cfg):
    """The :class:`~fewstep.data.event_datasets.Framing` of a run's event dataset."""
    from .data.event_datasets import Framing

    d = cfg.data
    return Framing(int(d.T), d.by, tuple(d.size) if d.size else None, int(d.polarities), bool(d.binarize),
                   d.window_us)


def read_recording(cfg, path, start_us: "float | None" = None, end_us: "float | None" = None) -> Recording:
    """Read and frame one recording the way the run's dataset frames its samples. The file is decoded by its
    suffix where that names a format (``.bin``/``.bs2``: N-MNIST's binary events, ``.npy``/``.npz``, ``.aedat4``),
    else by the dataset's own reader (AEDAT 3.1 for DVS Gesture, AEDAT 2.0 for CIFAR10-DVS, any format fewstep reads
    for ``eventfolder``); events must lie on the run's sensor."""
    from .data.event_datasets import READERS, SUFFIX_READERS, frame_events

    name = cfg.data.name
    reader, sensor = event_source(cfg)
    reader = SUFFIX_READERS.get(Path(path).suffix.lower(), reader)
    path = str(path)
    try:
        ev = READERS[reader](path, sensor)
    except EventFileError as exc:
        if "outside" in str(exc):
            raise EventFileError(f"{exc}; the run ({name}) takes recordings from a {sensor[0]}x{sensor[1]} sensor: "
                                 f"the recording's sensor does not match the run's input") from None
        raise
    if start_us is not None or end_us is not None:
        lo = -np.inf if start_us is None else float(start_us)
        hi = np.inf if end_us is None else float(end_us)
        if hi <= lo:
            raise ValueError(f"--start-us {start_us} must be before --end-us {end_us}")
        ev = ev[(ev["t"] >= lo) & (ev["t"] < hi)]
    if len(ev) == 0:
        where = "" if start_us is None and end_us is None else f" between {start_us} and {end_us} µs"
        raise EventFileError(f"{path}: the recording has no events{where}; nothing to classify")
    f = framing_of(cfg)
    t = ev["t"].astype(np.int64)
    span = float(t.max() - t.min())
    if f.window_us is not None:
        span = min(span, float(f.window_us))
    frames = torch.from_numpy(frame_events(ev, sensor, f, path))
    if f.by != "time":
        frame_us = float("nan")  # equal event counts: frames have no fixed duration
    else:
        frame_us = span / f.T
    return Recording(frames, frame_us, span, int(len(ev)), path)


@torch.no_grad()
def decide(model, rec: Recording, policy: _cf.Policy, realtime: bool = False, device="cpu") -> dict:
    """Feed ``rec`` frame by frame through :class:`fewstep.anytime.AnytimeStream`; stop when ``policy``
    fires (or at the last frame)."""
    from .anytime import AnytimeStream
    from .neurons import set_step_mode, step_mode_of

    T = rec.frames.shape[0]
    prev = step_mode_of(model)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    frames = rec.frames.to(device)
    # untimed warm-up on blank frames, as a live system does once at start-up: the first steps of a process
    # pay for kernel selection, allocation and page faults (tens of ms on a CPU), which is not per-step cost
    warm = AnytimeStream(model, _cf.Timestep(min(2, T), T=T), T)
    t0 = time.perf_counter()
    for _ in range(min(2, T)):
        warm.push(torch.zeros_like(frames[0]))
    sync()
    warmup_ms = 1e3 * (time.perf_counter() - t0)
    live = AnytimeStream(model, policy, T)  # fresh state
    trace, compute_ms = [], []
    start = time.perf_counter()
    answer = None
    try:
        for t in range(1, T + 1):
            if realtime and rec.frame_us == rec.frame_us:  # (NaN: count framing has no frame duration)
                wait = start + t * rec.frame_us * 1e-6 - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)  # the frame's last event has not been recorded yet
            t0 = time.perf_counter()
            answer = live.push(frames[t - 1])
            sync()
            compute_ms.append(1e3 * (time.perf_counter() - t0))
            Y = live.Y[0]
            top = torch.topk(Y, min(2, Y.numel()))
            trace.append({"step": t, "prediction": int(top.indices[0]),
                          "p_max": float(torch.softmax(Y, -1).max()),  # as the softmax policy reads it
                          "gap": float(top.values[0] - top.values[-1])})
            if answer is not None:
                break
    finally:
        set_step_mode(model, prev)
    prediction, step = answer
    wall_ms = 1e3 * (time.perf_counter() - start)
    # what ended the stream: the policy's rule, its step cap (a calibration may carry one), or the last frame
    fired = bool(policy.fire(live.Y, step)[0])
    stopped_by = "policy" if fired else "step cap" if policy.max_step is not None and step >= policy.max_step else "T"
    return {"exit_step": step, "T": T, "prediction": prediction, "stopped_by": stopped_by,
            "sensor_ms": step * rec.frame_us / 1e3, "recording_ms": rec.span_us / 1e3,
            "frame_ms": rec.frame_us / 1e3, "compute_ms_per_step": compute_ms, "wall_ms": wall_ms,
            "warmup_ms": warmup_ms,
            "realtime": realtime, "trace": trace}


def policy_for(run_dir, policy: str, cfg, calibration=None, log=print, model=None, bundle=None,
               data_root=None) -> _cf.Policy:
    """The run's saved calibration for ``policy`` (or ``calibration``), calibrating on validation if none
    (reading the dataset from ``data_root`` when given)."""
    run_dir = Path(run_dir)
    path = Path(calibration) if calibration else run_dir / f"calibration_{policy}.json"
    expect = {"model": cfg.model.name, "T": cfg.data.T, "dataset": cfg.data.name}
    if path.is_file():
        return _cf.load(path, expect=expect)
    if calibration:
        raise FileNotFoundError(f"no calibration file at {path}")
    from .reports import calibrate
    from .runfolder import _run_data, with_data_root

    log(f"{run_dir} has no saved calibration for policy {policy!r}: calibrating on its validation split first "
        f"(the same as 'fewstep cutoff {run_dir} --policy {policy}'; written to {path})")
    if data_root is not None:
        cfg = with_data_root(cfg, data_root)
    if bundle is None or not hasattr(bundle, "val"):  # (the network was rebuilt without its data)
        bundle = _run_data(run_dir, cfg, given=data_root is not None)  # (a missing dataset: the error says what to do)
    pol, _ = calibrate(run_dir, policy, model=model, cfg=cfg, bundle=bundle)
    return pol


def stream_report(run_dir, events, policy: str = "topk", calibration=None, start_us=None, end_us=None,
                  realtime: bool = False, device: str = "cpu", log=print, plot=None, data_root=None) -> dict:
    """Everything ``fewstep stream`` prints (and writes with ``--json``); ``plot``: also draw
    :func:`plot_trace` into that PNG file (after the decision, untimed). ``data_root``: where the run's
    dataset lies now, read only to calibrate when the run has no saved calibration."""
    from .train import load_network

    model, cfg, meta = load_network(run_dir, device=device)  # (the dataset is read only to calibrate)
    rec = _read_for(cfg, meta, events, start_us, end_us)
    pol = policy_for(run_dir, policy, cfg, calibration, log, model, meta, data_root)
    out = _report(model, meta, rec, pol, realtime, device, run_dir)
    if plot:
        out["plot"] = str(plot_trace(model, rec, out, pol, plot, getattr(meta, "classes", None),
                                     bool(cfg.data.binarize), device))
    return out


def _read_for(cfg, meta, events, start_us=None, end_us=None) -> Recording:
    rec = read_recording(cfg, events, start_us, end_us)
    want = tuple(meta.input_shape)
    if tuple(rec.frames.shape[1:]) != want:
        raise ValueError(f"{events}: framed into {list(rec.frames.shape[1:])}, but the run's network takes "
                         f"{list(want)}")
    return rec


def _report(model, meta, rec: Recording, pol: _cf.Policy, realtime, device, run_dir) -> dict:
    out = decide(model, rec, pol, realtime, device)
    classes = getattr(meta, "classes", None)
    out.update(run=str(run_dir), events=str(rec.path), n_events=rec.n_events, policy=pol.to_dict(),
               label=(classes[out["prediction"]] if classes else str(out["prediction"])))
    return out


def recordings(paths) -> list[Path]:
    """The recordings ``paths`` name: files as given, folders expanded to the recordings directly in them (files
    ending in :data:`~fewstep.data.event_datasets.RECORDING_SUFFIXES`, every format fewstep reads, in name order). A
    missing path, or a folder without recordings, is an error."""
    from .data.event_datasets import RECORDING_SUFFIXES, recordings_in

    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = recordings_in(p)
            if not found:
                raise FileNotFoundError(f"{p} holds no recordings (files ending in {', '.join(RECORDING_SUFFIXES)})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"event file not found: {p}")
    return out


def stream_many(run_dir, paths, policy: str = "topk", calibration=None, start_us=None, end_us=None,
                realtime: bool = False, device: str = "cpu", log=print, data_root=None, progress: bool = False) -> dict:
    """:func:`stream_report` for many recordings, one after another through one loaded network and policy (each
    a fresh stream). A recording that cannot be read or framed is reported in ``failed`` with its error, and the
    others still run. Returns ``{"run", "policy", "recordings": [report, ...], "failed": [{"events", "error"}],
    "summary"}`` (the reports without their step-by-step traces)."""
    from tqdm import tqdm

    from .data.events import EventFileError
    from .train import load_network

    files = recordings(paths)
    model, cfg, meta = load_network(run_dir, device=device)
    pol = policy_for(run_dir, policy, cfg, calibration, log, model, meta, data_root)
    done, failed = [], []
    for f in tqdm(files, desc="recordings", unit="rec", disable=not progress or len(files) < 2, leave=False):
        try:
            rec = _read_for(cfg, meta, f, start_us, end_us)
        except (EventFileError, ValueError, OSError) as exc:
            failed.append({"events": str(f), "error": str(exc)})
            continue
        r = _report(model, meta, rec, pol, realtime, device, run_dir)
        r.pop("trace")
        done.append(r)
    summary = {"n": len(done), "failed": len(failed)}
    if done:
        summary.update(mean_exit_step=float(np.mean([r["exit_step"] for r in done])), T=done[0]["T"],
                       median_compute_ms_per_step=float(np.median([c for r in done for c in r["compute_ms_per_step"]])))
        timed = [r for r in done if r["sensor_ms"] == r["sensor_ms"]]  # (NaN: count framing has no frame time)
        if timed:
            summary.update(mean_sensor_ms=float(np.mean([r["sensor_ms"] for r in timed])),
                           mean_recording_ms=float(np.mean([r["recording_ms"] for r in timed])))
    return {"run": str(run_dir), "policy": pol.to_dict(), "recordings": done, "failed": failed, "summary": summary}


def many_lines(r: dict) -> list[str]:
    """``fewstep stream`` on several recordings: one line each, then the means."""
    rows = [(Path(x["events"]).name, _decided_class(x), f"{x['exit_step']}/{x['T']}",
             "" if x["sensor_ms"] != x["sensor_ms"] else f"{x['sensor_ms']:.1f} of {x['recording_ms']:.1f} ms",
             f"{sum(x['compute_ms_per_step']):.2f} ms", x["stopped_by"]) for x in r["recordings"]]
    head = ("recording", "decision", "step", "answered after (sensor time)", "compute", "stopped by")
    w = [max(len(v) for v in col) for col in zip(head, *rows)]
    fmt = lambda row: "  ".join(v.ljust(w[i]) for i, v in enumerate(row)).rstrip()  # noqa: E731
    lines = [fmt(head)] + [fmt(row) for row in rows]
    for x in r["failed"]:
        lines.append(f"{Path(x['events']).name}: failed: {x['error']}")
    s = r["summary"]
    if s["n"]:
        lines.append(f"{s['n']} recordings (policy {r['policy']['policy']}): mean exit step {s['mean_exit_step']:.2f} "
                     f"of {s['T']}" + (f", answered after {s['mean_sensor_ms']:.1f} ms of {s['mean_recording_ms']:.1f} "
                                       f"ms on average" if "mean_sensor_ms" in s else "")
                     + f"; compute {s['median_compute_ms_per_step']:.2f} ms per step (median)" + _threads_note(s))
    if s["failed"]:
        lines.append(f"{s['failed']} of {s['n'] + s['failed']} recordings could not be read (above)")
    return lines


def write_many_csv(path, r: dict) -> Path:
    """One row per recording: the decision, its step, its sensor time and the compute it took (failures with
    their error)."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["events", "n_events", "prediction", "label", "exit_step", "T", "stopped_by", "sensor_ms",
                    "recording_ms", "compute_ms", "error"])
        for x in r["recordings"]:
            w.writerow([x["events"], x["n_events"], x["prediction"], x["label"], x["exit_step"], x["T"],
                        x["stopped_by"], f"{x['sensor_ms']:.3f}", f"{x['recording_ms']:.3f}",
                        f"{sum(x['compute_ms_per_step']):.3f}", ""])
        for x in r["failed"]:
            w.writerow([x["events"]] + [""] * 9 + [x["error"]])
    return Path(path)


@torch.no_grad()
def running_trace(model, rec: Recording, device="cpu") -> torch.Tensor:
    """Running logits ``Y[T, C]`` of the whole recording, stepped through the same per-stream API as
    :func:`decide` but never stopping (for the plot of :func:`plot_trace`; untimed)."""
    from .anytime import AnytimeStream
    from .neurons import set_step_mode, step_mode_of

    T = rec.frames.shape[0]
    prev = step_mode_of(model)
    stream = AnytimeStream(model, _cf.Timestep(T, T=T), T)
    Y = []
    try:
        for t in range(T):
            stream.push(rec.frames[t].to(device))
            Y.append(stream.Y[0].float().cpu())
    finally:
        set_step_mode(model, prev)
    return torch.stack(Y)


def policy_statistic(policy: _cf.Policy, Y: torch.Tensor):
    """What ``policy`` reads at each step of the running logits ``Y[T, C]`` and where it fires:
    ``(label, values[T], thresholds[T], fires_when, log_scale)``, or ``None`` for a policy without a threshold
    (``timestep``). top-k: the top-2 gap against its per-step β(t), firing above it; softmax: 1 − p_max
    against ε, firing below it; spikecp: the size of the conformal prediction set, firing at 1."""
    T = Y.shape[0]
    if isinstance(policy, _cf.TopK):
        return ("top-2 gap of Y(t)", _cf.top2_gap(Y).tolist(), list(policy.betas[:T]), "above", False)
    if isinstance(policy, _cf.Softmax):
        return ("1 − p_max", (1.0 - Y.double().softmax(-1).max(-1).values).clamp_min(1e-300).tolist(),
                [policy.epsilon] * T, "below", True)
    if isinstance(policy, _cf.SpikeCP):
        sizes = [int(policy.set_size(Y[t:t + 1], t + 1)[0]) for t in range(T)]
        return ("prediction-set size", sizes, [1] * T, "at", False)
    return None


def plot_trace(model, rec: Recording, report: dict, policy: _cf.Policy, path, classes=None, binarize=False,
               device="cpu"):
    """The figure of ``fewstep stream --plot``: events per frame over sensor time, the running class
    probabilities, and (top-k, softmax, spikecp) the policy's statistic against its threshold, with the
    decision's step marked."""
    from .plots import stream_trace

    Y = running_trace(model, rec, device=device)
    probs = Y.double().softmax(-1)
    counts = rec.frames.flatten(1).sum(1).tolist()
    title = (f"{Path(rec.path).name}: {_decided_class(report)} at step "
             f"{report['exit_step']} of {report['T']}, policy {report['policy']['policy']}")
    return stream_trace(counts, probs, report["exit_step"], report["prediction"], rec.frame_us / 1e3,
                        policy_statistic(policy, Y), path, title, classes,
                        "active pixels per frame" if binarize else "events per frame")


def _decided_class(r: dict) -> str:
    """``class 3``, or ``class 2 (gesture 3)`` where the class has a name other than its index."""
    return f"class {r['prediction']}" + ("" if r["label"] == str(r["prediction"]) else f" ({r['label']})")


def _threads_note(r: dict) -> str:
    """``; 1 thread (the machine is busy ...)`` where the CLI chose the thread count for a reason worth saying."""
    if "threads" not in r:
        return ""
    why = r.get("threads_why", "")
    return f"; {r['threads']} thread{'s' if r['threads'] > 1 else ''}" + (f" ({why})" if "busy" in why else "")


def summary_lines(r: dict) -> list[str]:
    c = r["compute_ms_per_step"]
    med = float(np.median(c))
    why = {"policy": "", "step cap": f"; stopped by its step cap {r['exit_step']}: the policy had not fired",
           "T": "; the policy had not fired by the last frame"}.get(r.get("stopped_by"), "")
    lines = [f"decision: {_decided_class(r)} at step {r['exit_step']} of {r['T']} "
             f"(policy {r['policy']['policy']}{why})"]
    if r["frame_ms"] == r["frame_ms"]:
        lines.append(f"answered after {r['sensor_ms']:.1f} ms of a {r['recording_ms']:.1f} ms recording "
                     f"({r['frame_ms']:.2f} ms per frame, {r['n_events']} events)")
    lines.append(f"compute: {med:.2f} ms per step (median; first {c[0]:.2f} ms), {sum(c):.2f} ms in all, after "
                 f"{r['warmup_ms']:.1f} ms of untimed warm-up on blank frames"
                 + (f"; wall clock at sensor speed {r['wall_ms']:.1f} ms" if r["realtime"] else "")
                 + _threads_note(r))
    lines.append("trace:  step  prediction  p_max   top-2 gap")
    for s in r["trace"]:
        lines.append(f"        {s['step']:4d}  {s['prediction']:10d}  {s['p_max']:.3f}  {s['gap']:9.3f}")
    if r.get("plot"):
        lines.append(f"wrote {r['plot']} (the recording stepped on to step {r['T']}, with the decision marked)")
    return lines
