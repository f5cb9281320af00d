"""``eventfolder``: a user's own recordings, one folder per class, in any format fewstep reads (real N-MNIST
recordings and DVS128 Gesture clips, laid out and re-saved in the other formats)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import fewstep.data as D
from fewstep import config as C
from fewstep import stream as S
from fewstep.cli import main
from fewstep.data import EventFileError
from fewstep.data.event_datasets import READERS, reader_for
from fewstep.data.events import make_events, read_nmnist, read_numpy

from .eventwriters import write_aedat2, write_aedat31


def _nmnist_lists():
    from fewstep.data.archive import locate
    from fewstep.data.event_sets import _read_id_list

    from .conftest import SHARED, shared_archive

    shared_archive("nmnist-small.tar.gz")
    src = locate(SHARED, "nmnist-small", "nmnist-small.tar.gz", "train1K.txt", "the shared subset")
    return src, _read_id_list(src / "train1K.txt"), _read_id_list(src / "test100.txt")


def _layout(root: Path, src: Path, rows, split: str | None):
    """Link the recordings ``rows`` (id, class) into ``root[/split]/<class>/<id>.bs2``."""
    for i, c in rows:
        folder = root / split / str(c) if split else root / str(c)
        folder.mkdir(parents=True, exist_ok=True)
        os.symlink(src / f"{i}.bs2", folder / f"{i}.bs2")


@pytest.fixture(scope="module")
def nmnist_folder(tmp_path_factory):
    src, train, test = _nmnist_lists()
    root = tmp_path_factory.mktemp("eventfolder") / "mine"
    _layout(root, src, train[:500], "train")
    _layout(root, src, test, "test")
    return root


def test_train_test_folders_frame_like_the_nmnist_loader(nmnist_folder):
    from .conftest import SHARED

    b = D.load("eventfolder", root=str(nmnist_folder), T=10, sensor_size=[34, 34])
    assert b.classes == [str(c) for c in range(10)] and b.input_shape == (2, 34, 34) and b.T == 10
    assert (len(b.train) + len(b.val), len(b.test)) == (500, 100) and b.split_file is None
    ref = D.load("nmnist", root=str(SHARED), T=10)
    frames = {os.path.realpath(it.path): (ref.test.frames(j), it.label) for j, it in enumerate(ref.test.source.items)}
    for j, it in enumerate(b.test.source.items):
        x, label = frames[os.path.realpath(it.path)]
        assert np.array_equal(b.test.frames(j), x)
        assert b.test.source.label(j) == label == int(Path(it.path).parent.name)
    # the validation split is carved from train (stratified), the same way as every dataset's
    assert set(b.val.y.tolist()) == set(range(10))


def test_every_format_reads_the_same_events(tmp_path):
    """One real N-MNIST recording saved as .npy (Tonic's field order), .npz (columns; p as -1/+1) and AEDAT 3.1
    reads back to the same events; a real DVS128 Gesture clip likewise through AEDAT 2.0."""
    src, train, _ = _nmnist_lists()
    path = src / f"{train[0][0]}.bs2"
    ev = read_nmnist(path)
    tonic = np.empty(len(ev), np.dtype([("x", "<i8"), ("y", "<i8"), ("p", "<i8"), ("t", "<i8")]))
    for k in "xypt":
        tonic[k] = ev[k]
    np.save(tmp_path / "a.npy", tonic)
    np.savez(tmp_path / "b.npz", x=ev["x"], y=ev["y"], t=ev["t"], p=np.where(ev["p"] > 0, 1, -1))
    write_aedat31(tmp_path / "c.aedat", ev)
    for name, reader in (("a.npy", "numpy"), ("b.npz", "numpy"), ("c.aedat", "aedat31")):
        assert reader_for(tmp_path / name) == reader
        got = READERS["auto"](str(tmp_path / name), (34, 34))
        for k in "xytp":
            assert np.array_equal(got[k], ev[k]), (name, k)
    assert reader_for(path) == "nmnist"
    # AEDAT 2.0 is read as DVS128 addresses: a real gesture clip at 128x128
    from .conftest import shared_archive
    from fewstep.data.archive import locate

    gdir = locate(shared_archive("dvs-gesture-clips.tar.gz").parent, "dvs-gesture-clips", "dvs-gesture-clips.tar.gz",
                  "1.bs2", "the clips")
    clip = read_nmnist(gdir / "1.bs2", (128, 128))
    write_aedat2(tmp_path / "d.aedat", clip)
    (tmp_path / "d.aedat").write_bytes(b"#!AER-DAT2.0\r\n" + (tmp_path / "d.aedat").read_bytes())
    assert reader_for(tmp_path / "d.aedat") == "aedat2"
    got = READERS["auto"](str(tmp_path / "d.aedat"), (128, 128))
    assert all(np.array_equal(got[k], clip[k]) for k in "xytp")
    with pytest.raises(EventFileError, match="decoded as DVS128.*34x34"):
        READERS["auto"](str(tmp_path / "d.aedat"), (34, 34))
    # unsorted timestamps are put in time order (stable), not rejected
    shuffled = make_events(ev["x"][::-1], ev["y"][::-1], ev["t"][::-1], ev["p"][::-1])
    np.save(tmp_path / "e.npy", shuffled)
    assert np.array_equal(read_numpy(tmp_path / "e.npy")["t"], np.sort(ev["t"]))


def test_class_folders_alone_mixed_formats_split_per_class(tmp_path):
    """<class>/<recording> alone: the first 90 % of each class's sorted files train, recorded in the split file;
    formats may be mixed in one folder, and frame as the original files do."""
    src, train, _ = _nmnist_lists()
    root = tmp_path / "flat"
    rows = [r for r in train if r[1] in (3, 7)][:40]
    _layout(root, src, rows, None)
    for i, c in rows[:6]:  # re-save some as numpy, in place of the originals
        f = root / str(c) / f"{i}.bs2"
        ev = read_nmnist(f)
        f.unlink()
        np.savez(f.with_suffix(".npz"), x=ev["x"], y=ev["y"], t=ev["t"], p=ev["p"].astype(bool))
    (root / "3" / "notes.txt").write_text("not a recording: ignored")
    b = D.load("eventfolder", root=str(root), T=8, sensor_size=[34, 34])
    assert b.classes == ["3", "7"]
    n = {c: sum(1 for _, k in rows if k == int(c)) for c in b.classes}
    assert len(b.test) == sum(v - round(0.9 * v) for v in n.values())
    split = json.loads(Path(b.split_file).read_text())
    assert sorted(split["classes"]) == ["3", "7"] and split["train_share"] == 0.9
    ref = D.load("nmnist", root=str(src.parent), T=8)
    by_id = {Path(it.path).stem: j for j, it in enumerate(ref.train.source.items)}
    for part in (b.train, b.test):
        for j, it in enumerate(part.source.items):
            assert np.array_equal(part.frames(j), ref.train.frames(by_id[Path(it.path).stem])), it.path


def test_bad_folders_and_files_name_the_problem(tmp_path, nmnist_folder):
    with pytest.raises(ValueError, match=r"data.sensor_size.*events reach x = 3\d, y = 3\d"):
        D.load("eventfolder", root=str(nmnist_folder), T=4)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        D.load("eventfolder", root=str(tmp_path / "nowhere"), T=4, sensor_size=[34, 34])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no class folders with recordings"):
        D.load("eventfolder", root=str(tmp_path / "empty"), T=4, sensor_size=[34, 34])
    src, train, _ = _nmnist_lists()
    r = tmp_path / "mismatch"
    _layout(r, src, [(i, c) for i, c in train[:30] if c in (1, 2)], "train")
    _layout(r, src, [(i, c) for i, c in train[30:60] if c in (1, 4)], "test")
    with pytest.raises(ValueError, match="only in train: 2; only in test: 4"):
        D.load("eventfolder", root=str(r), T=4, sensor_size=[34, 34])
    (r / "test" / "4").rename(r / "test" / "2")
    (r / "test" / "2").mkdir(exist_ok=True)
    for f in (r / "test" / "2").iterdir():
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"test/2 holds no recordings"):
        D.load("eventfolder", root=str(r), T=4, sensor_size=[34, 34])
    # a sensor too small for the recordings: the file is named when it is framed
    flat = tmp_path / "small"
    _layout(flat, src, train[:3], None)
    with pytest.raises(EventFileError, match=r"\.bs2.*outside the 20x20 sensor"):
        D.load("eventfolder", root=str(flat), T=4, sensor_size=[20, 20])
    # files fewstep cannot read say what it reads
    bad = tmp_path / "files"
    bad.mkdir()
    (bad / "x.h5").write_bytes(b"\x89HDF")
    with pytest.raises(EventFileError, match=r"x\.h5.*\.h5 files.*numpy arrays"):
        reader_for(bad / "x.h5")
    (bad / "old.aedat").write_bytes(b"#!AER-DAT1.0\r\n" + bytes(12))
    with pytest.raises(EventFileError, match="old.aedat.*not AEDAT 1.0"):
        reader_for(bad / "old.aedat")
    np.save(bad / "secs.npy", np.zeros(3, np.dtype([("x", "i2"), ("y", "i2"), ("t", "f8"), ("p", "i1")])))
    with pytest.raises(EventFileError, match=r"secs\.npy: t has dtype float64.*microseconds"):
        read_numpy(bad / "secs.npy")
    np.save(bad / "plain.npy", np.zeros((5, 4), np.int64))
    with pytest.raises(EventFileError, match=r"plain\.npy: array of dtype int64 \(shape \(5, 4\)\).*fields x, y, t, p"):
        read_numpy(bad / "plain.npy")
    np.savez(bad / "cols.npz", a=np.zeros(3), b=np.zeros(3))
    with pytest.raises(EventFileError, match=r"cols\.npz: holds the arrays a, b"):
        read_numpy(bad / "cols.npz")
    np.savez(bad / "pol.npz", x=np.zeros(3, int), y=np.zeros(3, int), t=np.arange(3), p=np.array([0, 2, 1]))
    with pytest.raises(EventFileError, match=r"pol\.npz: p takes the values \[0, 1, 2\]"):
        read_numpy(bad / "pol.npz")
    (bad / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(EventFileError, match=r"junk\.npy: not a readable numpy file"):
        read_numpy(bad / "junk.npy")


def test_config_checks_sensor_size():
    base = {"data": {"name": "eventfolder", "root": "x", "T": 4}}
    assert C.from_dict({**base, "data": {**base["data"], "sensor_size": [34, 34]}}).data.sensor_size == [34, 34]
    with pytest.raises(ValueError, match=r"data.sensor_size' must be null or \[width, height\]"):
        C.from_dict({**base, "data": {**base["data"], "sensor_size": [34]}})
    with pytest.raises(ValueError, match="data.sensor_size' applies to eventfolder, ncaltech101 only, not 'nmnist'"):
        C.from_dict({"data": {"name": "nmnist", "T": 4, "sensor_size": [34, 34]}})


def test_stream_knows_every_event_dataset_sensor():
    cfg = C.from_dict({"data": {"name": "ncaltech101", "T": 4}})
    assert S.event_source(cfg) == ("nmnist", (240, 180))
    cfg = C.from_dict({"data": {"name": "ncaltech101", "T": 4, "sensor_size": [304, 240]}})
    assert S.event_source(cfg) == ("nmnist", (304, 240))
    cfg = C.from_dict({"data": {"name": "eventfolder", "T": 4, "sensor_size": [64, 48]}})
    assert S.event_source(cfg) == ("auto", (64, 48))
    with pytest.raises(ValueError, match="not one of the event datasets"):
        S.event_source(C.from_dict({"data": {"name": "digits", "T": 4}}))
    from fewstep.data.datasets import EVENT_DATASETS
    from fewstep.data.event_sets import SOURCES

    assert set(SOURCES) == EVENT_DATASETS  # every event dataset's recordings can be streamed


def test_train_an_eventfolder_run_and_stream_a_numpy_recording(nmnist_folder, tmp_path, capsys):
    """From the command line: train on the folder, calibrate, and stream one of its test recordings re-saved as
    .npy: the same decision as the original file's."""
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"""data:
  name: eventfolder
  root: {nmnist_folder}
  T: 6
  sensor_size: [34, 34]
model:
  name: cnn
  options: {{channels: [8, 16], hidden: 32}}
train:
  epochs: 8
  batch_size: 32
  lr: 0.003
  progress: false
""")
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # 10 classes, 450 training recordings, 8 epochs: 68-69 % at T on test when written (chance: 10 %)
    assert metrics["dataset"] == "eventfolder" and metrics["accuracy_per_step"][-1] > 0.5
    assert main(["cutoff", str(out), "--policy", "topk", "--epsilon", "0.05", "--split", "val", "--repeats", "1"]) == 0
    original = sorted((nmnist_folder / "test" / "7").iterdir())[0]
    np.save(tmp_path / "rec.npy", read_nmnist(original))
    results = []
    for rec in (original, tmp_path / "rec.npy"):
        capsys.readouterr()
        assert main(["stream", str(out), "--events", str(rec), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    a, b = results
    assert (a["prediction"], a["exit_step"], a["n_events"]) == (b["prediction"], b["exit_step"], b["n_events"])
    assert a["label"] in [str(c) for c in range(10)] and a["trace"] == b["trace"]
