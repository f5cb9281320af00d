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


def test_stream_calibrates_first_when_the_run_has_no_calibration(nmnist_run, capsys):
    out, _ = nmnist_run
    (out / "calibration_softmax.json").unlink(missing_ok=True)
    path = _first_test_file(nmnist_run)
    assert main(["stream", str(out), "--events", path, "--policy", "softmax", "--json"]) == 0
    cap = capsys.readouterr()
    assert "no saved calibration" in cap.err and "calibrating on its validation split" in cap.err
    assert (out / "calibration_softmax.json").is_file()
    json.loads(cap.out)


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
