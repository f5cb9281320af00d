"""``fewstep stream``: one real recording, frame by frame, with the run's calibrated cutoff."""

import json

import numpy as np
import pytest
import torch

from fewstep import config as C
from fewstep import cutoff as _cf
from fewstep import stream as S
from fewstep.anytime import early_exit
from fewstep.cli import main
from fewstep.data import EventFileError, write_nmnist
from fewstep.data.events import make_events
from fewstep.train import Trainer


@pytest.fixture(scope="module")
def nmnist_run(tmp_path_factory):
    from .conftest import SHARED, shared_archive

    shared_archive("nmnist-small.tar.gz")
    out = tmp_path_factory.mktemp("stream") / "run"
    cfg = C.from_dict({"data": {"name": "nmnist", "root": str(SHARED), "T": 6},
                       "model": {"name": "cnn", "options": {"channels": [8, 16], "hidden": 32}},
                       "train": {"epochs": 2, "batch_size": 32, "lr": 3e-3, "progress": False}})
    tr = Trainer(cfg, out, log=lambda s: None)
    tr.fit()
    return out, tr


def test_stream_decides_like_the_batched_early_exit_on_a_real_recording(nmnist_run, capsys):
    out, tr = nmnist_run
    assert main(["cutoff", str(out), "--policy", "topk", "--epsilon", "0.05", "--split", "val", "--repeats", "1"]) == 0
    capsys.readouterr()
    bundle, cfg = tr.bundle, tr.cfg
    model = tr.model.eval()
    if tr.best_state is not None:
        model.load_state_dict(tr.best_state)
    pol = _cf.load(out / "calibration_topk.json")
    test = bundle.test
    batched = early_exit(model, torch.stack([test[k][0] for k in range(8)], 1), pol)
    for i in range(4):
        path = test.source.items[int(test.index[i])].path
        rec = S.read_recording(cfg, path)
        x, _ = test[i]
        assert torch.equal(rec.frames, x)  # framed exactly as the dataset frames it
        r = S.decide(model, rec, pol)
        assert r["exit_step"] == int(batched.exit_step[i]) and r["prediction"] == int(batched.prediction[i])
        # sensor-time latency = exit step × frame duration, the frames cover the recording's span
        t = S.read_recording(cfg, path).span_us
        assert r["frame_ms"] == pytest.approx(t / 6 / 1e3)
        assert r["sensor_ms"] == pytest.approx(r["exit_step"] * r["frame_ms"])
        assert len(r["compute_ms_per_step"]) == r["exit_step"] == len(r["trace"])
        assert r["warmup_ms"] > 0  # the blank warm-up frames ran, untimed, and left no state behind (decision above)
    # the command line: text and JSON
    assert main(["stream", str(out), "--events", path]) == 0
    text = capsys.readouterr().out
    assert "decision: class" in text and "ms recording" in text and "ms per step" in text and "warm-up" in text
    assert main(["stream", str(out), "--events", path, "--json"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["exit_step"] == r["exit_step"] and j["prediction"] == r["prediction"]


def test_stream_says_what_stopped_it(nmnist_run, capsys):
    """The policy's rule, a calibration's step cap before the rule fired, or the last frame."""
    out, tr = nmnist_run
    model = tr.model.eval()
    test = tr.bundle.test
    path = test.source.items[int(test.index[0])].path
    rec = S.read_recording(tr.cfg, path)
    never = _cf.make("softmax", epsilon=0.0)  # 1 - p_max < 0 never holds: only a cap or T stops it
    never.T = 6
    assert S.decide(model, rec, never)["stopped_by"] == "T" and S.decide(model, rec, never)["exit_step"] == 6
    r = S.decide(model, rec, never.with_max_step(3))
    assert (r["exit_step"], r["stopped_by"]) == (3, "step cap")
    assert (S.decide(model, rec, _cf.Timestep(2, T=6))["stopped_by"]) == "policy"
    meta = {"model": tr.cfg.model.name, "dataset": tr.cfg.data.name, "T": 6, "calibration_split": "val"}
    _cf.save(never, out / "capped.json", meta)
    capsys.readouterr()
    assert main(["stream", str(out), "--events", path, "--policy", "softmax", "--calibration",
                 str(out / "capped.json")]) == 0
    assert "at step 3 of 6 (policy softmax; stopped by its step cap 3: the policy had not fired)" in \
        capsys.readouterr().out


def test_stream_calibrates_first_when_the_run_has_no_calibration(nmnist_run, capsys):
    out, _ = nmnist_run
    (out / "calibration_softmax.json").unlink(missing_ok=True)
    path = _first_test_file(nmnist_run)
    assert main(["stream", str(out), "--events", path, "--policy", "softmax", "--json"]) == 0
    cap = capsys.readouterr()
    assert "no saved calibration" in cap.err and "calibrating on its validation split" in cap.err
    assert (out / "calibration_softmax.json").is_file()
    json.loads(cap.out)


def test_stream_calibrates_from_a_data_root_given_when_the_run_moved(nmnist_run, tmp_path, capsys):
    import shutil

    from .conftest import SHARED

    out, _ = nmnist_run
    moved = tmp_path / "moved-run"
    shutil.copytree(out, moved)
    ck = torch.load(moved / "checkpoint.pt", weights_only=True)
    ck["config"]["data"]["root"] = str(tmp_path / "where-it-was-trained")
    torch.save(ck, moved / "checkpoint.pt")
    for f in moved.glob("calibration_*.json"):
        f.unlink()
    path = _first_test_file(nmnist_run)
    assert main(["stream", str(moved), "--events", path, "--policy", "spikecp", "--json"]) == 2
    assert "--data-root DIR" in capsys.readouterr().err
    assert main(["stream", str(moved), "--events", path, "--policy", "spikecp", "--json",
                 "--data-root", str(SHARED)]) == 0
    cap = capsys.readouterr()
    assert "calibrating on its validation split" in cap.err and (moved / "calibration_spikecp.json").is_file()
    assert json.loads(cap.out)["exit_step"] >= 1


def _first_test_file(run):
    _, tr = run
    return tr.bundle.test.source.items[int(tr.bundle.test.index[0])].path


def test_stream_bad_recordings_name_the_problem(nmnist_run, tmp_path, capsys):
    out, tr = nmnist_run
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    assert main(["stream", str(out), "--events", str(empty)]) == 2
    assert "empty.bin is empty" in capsys.readouterr().err
    big = tmp_path / "big.bin"  # a recording from a larger sensor than the run's 34x34
    write_nmnist(big, make_events(np.array([3, 100]), np.array([4, 90]), np.array([10, 20]), np.array([1, 0])))
    with pytest.raises(EventFileError, match=r"outside the 34x34 sensor.*does not match the run's input"):
        S.read_recording(tr.cfg, big)
    path = _first_test_file(nmnist_run)
    with pytest.raises(EventFileError, match="no events between 0 and 1"):
        S.read_recording(tr.cfg, path, start_us=0, end_us=1)
    digits = C.from_dict({"data": {"name": "digits"}})
    with pytest.raises(ValueError, match="not one of the event datasets"):
        S.read_recording(digits, path)


def _gesture_run(tmp_path, clips, T=8):
    """A DVS Gesture run folder built by hand, without the dataset (its folder does not exist): a `cnn` at
    32x32 fitted for a few steps to the 10 real clips themselves (too few to train on, but enough for a network
    whose outputs differ between clips), and its checkpoint, which records the input shape and classes."""
    from fewstep.runfolder import CHECKPOINT_FORMAT, _atomic_save
    from fewstep.train import DataMeta, build_model, data_meta

    cfg = C.from_dict({"data": {"name": "dvs_gesture", "root": str(tmp_path / "no-such-folder"), "T": T,
                                "size": [32, 32]},
                       "model": {"name": "cnn", "options": {"channels": [8, 16], "hidden": 32}}})
    meta = DataMeta((2, 32, 32), 11, "frames", [f"gesture {k}" for k in range(1, 12)])
    torch.manual_seed(0)
    model = build_model(cfg, meta)
    x = torch.stack([S.read_recording(cfg, c).frames for c in clips], 1)
    y = torch.arange(len(clips))  # clip k is gesture class k (index k - 1)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).mean(0), y).backward()
        opt.step()
    model.eval()
    run = tmp_path / "gesture-run"
    run.mkdir()
    _atomic_save({"format": CHECKPOINT_FORMAT, "config": cfg.to_dict(), "data": data_meta(meta), "epoch": 0,
                  "model": model.state_dict(), "best_model": None, "best_val": None, "best_epoch": 0,
                  "history": []}, run / "checkpoint.pt")
    return run, cfg, model


def test_stream_on_the_real_dvs_gesture_clips(tmp_path, capsys):
    import tarfile

    from .conftest import shared_archive

    with tarfile.open(shared_archive("dvs-gesture-clips.tar.gz")) as tf:
        tf.extractall(tmp_path, filter="data")
    T = 8
    clips = [tmp_path / "dvs-gesture-clips" / f"{k}.bs2" for k in range(1, 11)]
    run, cfg, model = _gesture_run(tmp_path, clips, T)
    recs = [S.read_recording(cfg, c) for c in clips]
    x = torch.stack([r.frames for r in recs], 1)  # [T, 10, 2, 32, 32]
    assert x.shape == (T, 10, 2, 32, 32) and all(1.3e6 < r.span_us < 1.6e6 for r in recs)
    # per-step thresholds set by hand (no validation split) midway between the clips' 5th and 6th top-2 gaps,
    # so exits spread over steps and no clip sits on a threshold (batch 1 and batch 10 round differently)
    with torch.no_grad():
        gaps = _cf.top2_gap(_cf.running(model(x))).sort(-1).values  # [T, 10]
    betas = [float(g[4] + g[5]) / 2 for g in gaps]
    pol = _cf.TopK(0.05, betas=betas, T=T)
    _cf.save(pol, run / "calibration_topk.json", {"model": "cnn", "dataset": "dvs_gesture", "T": T})
    batched = early_exit(model, x, pol)
    assert len(set(batched.exit_step.tolist())) > 1  # the check below covers early and late exits
    for k in range(1, 11):
        assert main(["stream", str(run), "--events", str(clips[k - 1]), "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert r["exit_step"] == int(batched.exit_step[k - 1]) and r["prediction"] == int(batched.prediction[k - 1])
        assert r["frame_ms"] == pytest.approx(recs[k - 1].span_us / T / 1e3)
        assert r["sensor_ms"] == pytest.approx(r["exit_step"] * r["frame_ms"])
        assert r["label"] == f"gesture {r['prediction'] + 1}" and r["n_events"] > 60_000
    png = tmp_path / "gesture.png"  # the plot, with the dataset's class names, on a real clip
    assert main(["stream", str(run), "--events", str(clips[2]), "--plot", str(png), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plot"] == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "no-such-folder").exists()  # the network was rebuilt from the checkpoint alone
    # without a saved calibration it must calibrate on validation: here the dataset is missing, and it says so
    assert main(["stream", str(run), "--events", str(clips[0]), "--policy", "spikecp"]) == 2
    cap = capsys.readouterr()
    assert "no saved calibration" in cap.out and "calibrating on its validation split" in cap.out
    assert "DVS128 Gesture not found" in cap.err and "no-such-folder" in cap.err


def test_load_network_needs_no_dataset_and_matches_load_run(nmnist_run, tmp_path):
    from fewstep.runfolder import load_checkpoint
    from fewstep.train import load_network, load_run

    out, tr = nmnist_run
    model, cfg, bundle = load_run(out)
    net, cfg2, meta = load_network(out)
    assert cfg2.to_dict() == cfg.to_dict()
    assert (meta.input_shape, meta.num_classes, meta.kind, meta.classes) == \
        (tuple(bundle.input_shape), bundle.num_classes, bundle.kind, [str(c) for c in bundle.classes])
    x = torch.stack([bundle.test[k][0] for k in range(3)], 1)
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
    # a checkpoint from before the data entry existed is rebuilt from its dataset (meta is then the bundle)
    old = tmp_path / "old-run"
    old.mkdir()
    ckpt = load_checkpoint(out / "checkpoint.pt")
    del ckpt["data"]
    torch.save(ckpt, old / "checkpoint.pt")
    net_old, _, meta_old = load_network(old)
    assert meta_old.num_classes == bundle.num_classes and hasattr(meta_old, "test")
    with torch.no_grad():
        assert torch.equal(net_old(x), model(x))
    with pytest.raises(ValueError, match="weights must be 'best' or 'last'"):
        load_network(out, weights="newest")


def test_realtime_replays_at_sensor_speed(nmnist_run, capsys):
    out, tr = nmnist_run
    model = tr.model.eval()
    if tr.best_state is not None:
        model.load_state_dict(tr.best_state)
    rec = S.read_recording(tr.cfg, _first_test_file(nmnist_run))
    pol = _cf.Timestep(4, T=6)  # answers after 4 of 6 frames: 2/3 of the recording must have been "recorded"
    fast, live = S.decide(model, rec, pol), S.decide(model, rec, pol, realtime=True)
    assert (live["exit_step"], live["prediction"]) == (fast["exit_step"], fast["prediction"]) and live["exit_step"] == 4
    # frame t is released only once its last event would have been recorded: t x frame duration of sensor time
    assert live["wall_ms"] >= 4 * live["frame_ms"] - 1.0
    assert fast["wall_ms"] < 4 * live["frame_ms"]  # (without --realtime nothing waits: ~1 ms per step)
    assert main(["stream", str(out), "--events", _first_test_file(nmnist_run), "--realtime", "--policy", "timestep"]) == 0
    assert "wall clock at sensor speed" in capsys.readouterr().out


def test_plot_shows_the_statistic_that_made_the_decision(nmnist_run, tmp_path, capsys):
    """``--plot``: the statistic drawn against its threshold first fires at the decision's exit step, for every
    policy with a threshold, on real recordings; the figure is written and named in the text and the JSON."""
    out, tr = nmnist_run
    model = tr.model.eval()
    if tr.best_state is not None:
        model.load_state_dict(tr.best_state)
    Yv = torch.stack([S.running_trace(model, S.read_recording(tr.cfg, tr.bundle.val.source.items[int(j)].path))
                      for j in tr.bundle.val.index[:40]], 1)
    yv = torch.tensor([tr.bundle.val[k][1] for k in range(40)])
    policies = [_cf.TopK(0.05).calibrate(Yv, yv), _cf.Softmax(0.3, T=6), _cf.SpikeCP(0.2).calibrate(Yv, yv)]
    seen = set()
    for k in range(8):
        rec = S.read_recording(tr.cfg, tr.bundle.test.source.items[int(tr.bundle.test.index[k])].path)
        Y = S.running_trace(model, rec)
        assert Y.shape == (6, 10)
        for pol in policies:
            r = S.decide(model, rec, pol)
            label, values, thresholds, when, _ = S.policy_statistic(pol, Y)
            assert len(values) == len(thresholds) == 6
            fired = [{"above": v > th, "below": v < th, "at": v == th}[when] for v, th in zip(values, thresholds)]
            first = fired.index(True) + 1 if True in fired else 6
            assert first == r["exit_step"], (pol.name, k, values, thresholds)
            assert int(Y[r["exit_step"] - 1].argmax()) == r["prediction"]
            seen.add(r["exit_step"])
    assert len(seen) > 1  # the recordings do not all exit at the same step
    assert S.policy_statistic(_cf.Timestep(2, T=6), Y) is None
    png = tmp_path / "trace.png"
    path = _first_test_file(nmnist_run)
    assert main(["stream", str(out), "--events", path, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in capsys.readouterr().out
    png.unlink()
    assert main(["stream", str(out), "--events", path, "--policy", "timestep", "--plot", str(png), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["plot"] == str(png) and png.is_file()


def test_a_reader_that_goes_away_ends_the_command_quietly(nmnist_run):
    """``fewstep stream ... | head -1``: the closed pipe ends the command with status 0 and no traceback."""
    import subprocess
    import sys

    out, _ = nmnist_run
    cmd = [sys.executable, "-m", "fewstep", "stream", str(out), "--events", _first_test_file(nmnist_run),
           "--policy", "timestep"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # nobody reads: the first write raises BrokenPipeError
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_stream_many_recordings_one_line_each_with_failures_named(nmnist_run, tmp_path, capsys):
    """Several recordings (files and a folder): each decided as ``fewstep stream`` decides it alone; a bad file is
    reported by name while the others run, and the command exits 2."""
    import csv
    import shutil

    out, tr = nmnist_run
    test = tr.bundle.test
    paths = [test.source.items[int(test.index[i])].path for i in range(3)]
    folder = tmp_path / "recs"
    folder.mkdir()
    for p in paths:
        shutil.copy(p, folder)
    (folder / "notes.txt").write_text("not a recording")  # ignored: not a recording's suffix
    (folder / "zero.bs2").write_bytes(b"")
    alone = [S.stream_report(out, p, log=lambda s: None) for p in paths]
    r = S.stream_many(out, [folder], log=lambda s: None)
    assert [x["events"] for x in r["failed"]] == [str(folder / "zero.bs2")] and "is empty" in r["failed"][0]["error"]
    got = {x["events"].rsplit("/", 1)[-1]: x for x in r["recordings"]}
    assert len(got) == 3
    for p, a in zip(paths, alone):
        x = got[p.rsplit("/", 1)[-1]]
        assert (x["exit_step"], x["prediction"], x["label"]) == (a["exit_step"], a["prediction"], a["label"])
        assert x["sensor_ms"] == pytest.approx(a["sensor_ms"]) and "trace" not in x
    s = r["summary"]
    assert s["n"] == 3 and s["failed"] == 1
    assert s["mean_exit_step"] == pytest.approx(np.mean([a["exit_step"] for a in alone]))
    assert s["mean_sensor_ms"] == pytest.approx(np.mean([a["sensor_ms"] for a in alone]))
    # the command line: one line per recording, the failure by name, the means; the CSV; exit code 2
    assert main(["stream", str(out), "--events", str(folder), paths[0], "--csv", str(tmp_path / "s.csv")]) == 2
    text = capsys.readouterr().out
    assert "zero.bs2: failed:" in text and "4 recordings (policy topk): mean exit step" in text
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert len(rows) == 5 and rows[-1]["error"] and all(not w["error"] for w in rows[:4])
    assert main(["stream", str(out), "--events", *paths[:2], "--json"]) == 0
    assert [x["exit_step"] for x in json.loads(capsys.readouterr().out)["recordings"]] == \
        [a["exit_step"] for a in alone[:2]]
    threads = torch.get_num_threads()
    assert main(["stream", str(out), "--events", paths[0], "--json", "--threads", "1"]) == 0
    j = json.loads(capsys.readouterr().out)
    assert (j["threads"], j["threads_why"], j["exit_step"]) == (1, "as asked", alone[0]["exit_step"])
    assert torch.get_num_threads() == threads  # the command leaves the process's thread count as it found it
    assert main(["stream", str(out), "--events", *paths[:2], "--plot", str(tmp_path / "p.png")]) == 2
    assert "--plot draws one recording" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="holds no recordings"):
        S.recordings([tmp_path / "s.csv", tmp_path])  # (a folder without recordings)


def test_stream_on_a_run_imported_from_nir(nmnist_run, tmp_path, capsys):
    """A run exported to NIR and imported again (``fewstep import``) calibrates to the same thresholds and streams a
    real recording to the same decision, step and trace as the original run."""
    pytest.importorskip("nir", reason="the nir extra is not installed (pip install 'fewstep[nir]')")
    out, _ = nmnist_run
    path = _first_test_file(nmnist_run)
    assert main(["export", str(out), "--out", str(tmp_path / "m.nir")]) == 0
    assert main(["import", str(tmp_path / "m.nir"), "--data", str(out / "config.yaml"), "--out",
                 str(tmp_path / "imp")]) == 0
    reports = []
    for run in (out, tmp_path / "imp"):  # each calibrated alike on the same validation split
        assert main(["cutoff", str(run), "--policy", "topk", "--epsilon", "0.05", "--split", "val",
                     "--repeats", "1"]) == 0
        capsys.readouterr()
        assert main(["stream", str(run), "--events", path, "--policy", "topk", "--json"]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    a, b = reports
    assert a["policy"] == b["policy"]
    assert (a["prediction"], a["exit_step"]) == (b["prediction"], b["exit_step"])
    assert [s["prediction"] for s in a["trace"]] == [s["prediction"] for s in b["trace"]]
