import multiprocessing as mp

import numpy as np
import pytest
import torch

from fewstep.data import EventFileError, load, make_events, read_nmnist, to_frames, write_nmnist
from fewstep.data.aedat import read_aedat2, read_aedat31, read_aedat4
from fewstep.data.event_datasets import EventAugment, EventFrames, FileSource, Framing, Item, frame_events, from_tonic

from .conftest import shared_archive
from .eventwriters import write_aedat2, write_aedat31


def rand_events(n, w=128, h=128, t0=0, span=1_000_000, seed=0):
    r = np.random.default_rng(seed)
    return make_events(r.integers(0, w, n), r.integers(0, h, n), np.sort(r.integers(t0, t0 + span, n)),
                       r.integers(0, 2, n))


def test_aedat31_round_trip_with_overflow_invalid_and_other_packets(tmp_path):
    ev = rand_events(2500, t0=(1 << 31) - 400_000, span=800_000)  # crosses the 31-bit timestamp wrap
    write_aedat31(tmp_path / "a.aedat", ev, packet_size=700, invalid_every=1)
    back = read_aedat31(tmp_path / "a.aedat")
    assert back.tobytes() == ev.tobytes()


def test_aedat2_round_trip(tmp_path):
    ev = rand_events(3000)
    write_aedat2(tmp_path / "c.aedat", ev)
    assert read_aedat2(tmp_path / "c.aedat").tobytes() == ev.tobytes()


def test_corrupt_aedat_files_name_the_file(tmp_path):
    ev = rand_events(100)
    write_aedat31(tmp_path / "t.aedat", ev)
    data = (tmp_path / "t.aedat").read_bytes()
    (tmp_path / "cut.aedat").write_bytes(data[:-30])
    with pytest.raises(EventFileError, match=r"cut\.aedat.*(truncated|needs)"):
        read_aedat31(tmp_path / "cut.aedat")
    (tmp_path / "v2.aedat").write_bytes(b"#!AER-DAT2.0\r\n" + bytes(16))
    with pytest.raises(EventFileError, match=r"v2\.aedat.*END-HEADER"):
        read_aedat31(tmp_path / "v2.aedat")
    write_aedat2(tmp_path / "ok2.aedat", ev)
    (tmp_path / "odd2.aedat").write_bytes((tmp_path / "ok2.aedat").read_bytes()[:-3])
    with pytest.raises(EventFileError, match=r"odd2\.aedat.*multiple of 8"):
        read_aedat2(tmp_path / "odd2.aedat")
    with pytest.raises(EventFileError, match=r"t\.aedat.*AEDAT 2\.0"):
        read_aedat2(tmp_path / "t.aedat")


def test_aedat4_needs_its_optional_package(tmp_path):
    try:
        import aedat  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install aedat"):
            read_aedat4(tmp_path / "x.aedat4")
    else:
        pytest.skip("the optional 'aedat' package is installed")


def test_real_gesture_clips_decode_and_frame(tmp_path):
    import tarfile

    arch = shared_archive("dvs-gesture-clips.tar.gz")
    with tarfile.open(arch) as tf:
        tf.extractall(tmp_path, filter="data")
    for k in range(1, 11):
        ev = read_nmnist(tmp_path / "dvs-gesture-clips" / f"{k}.bs2", (128, 128))
        assert 60_000 < len(ev) < 200_000
        assert ev["x"].max() <= 127 and ev["y"].max() <= 127 and ev["x"].min() >= 0
        assert np.all(np.diff(ev["t"]) >= 0)
        assert 1.3e6 < ev["t"][-1] - ev["t"][0] < 1.6e6
        fr = frame_events(ev, (128, 128), Framing(16))
        assert fr.shape == (16, 2, 128, 128) and fr.sum() == len(ev)


def test_framing_options_hand_checked():
    ev = make_events([0, 127, 64, 10], [0, 127, 64, 10], [0, 10, 20, 1000], [0, 1, 1, 0])
    by_count = frame_events(ev, (128, 128), Framing(2, by="count"))
    assert by_count[0].sum() == 2 and by_count[1].sum() == 2  # two events per frame, whatever their times
    small = frame_events(ev, (128, 128), Framing(1, size=(4, 4)))
    assert small.shape == (1, 2, 4, 4) and small[0, 1, 3, 3] == 1 and small[0, 1, 2, 2] == 1 and small[0, 0, 0, 0] == 2
    win = frame_events(ev, (128, 128), Framing(1, window_us=500))
    assert win.sum() == 3
    merged = frame_events(ev, (128, 128), Framing(1, polarities=1))
    assert merged.shape == (1, 1, 128, 128) and merged.sum() == 4
    with pytest.raises(ValueError, match="'time' or 'count'"):
        Framing(4, by="rate")


def make_gesture_folder(root, users=(1, 24), with_lists=False):
    root.mkdir(parents=True, exist_ok=True)
    for u in users:
        ev = rand_events(3000, span=3_000_000, seed=u)
        write_aedat31(root / f"user{u:02d}_led.aedat", ev)
        (root / f"user{u:02d}_led_labels.csv").write_text(
            "class,startTime_usec,endTime_usec\n" + "".join(f"{c},{c * 250_000},{c * 250_000 + 200_000}\n" for c in range(1, 12)))
    if with_lists:
        (root / "trials_to_train.txt").write_text(f"user{users[1]:02d}_led.aedat\n")
        (root / "trials_to_test.txt").write_text(f"user{users[0]:02d}_led.aedat\n")


def test_dvs_gesture_fake_folder_end_to_end(tmp_path):
    make_gesture_folder(tmp_path / "DvsGesture")
    b = load("dvs_gesture", root=str(tmp_path), T=4, val_fraction=0.2)
    assert len(b.test) == 11 and len(b.train) + len(b.val) == 11 and b.num_classes == 11
    x, y = b.test[3]
    assert x.shape == (4, 2, 128, 128) and y == 3
    # the frames hold exactly the events of the labelled cut
    ev = read_aedat31(tmp_path / "DvsGesture" / "user24_led.aedat")
    cut = ev[(ev["t"] >= 4 * 250_000) & (ev["t"] < 4 * 250_000 + 200_000)]
    assert float(x.sum()) == len(cut) > 0
    small = load("dvs_gesture", root=str(tmp_path), T=4, size=(48, 48), val_fraction=0.2)
    assert small.test[0][0].shape == (4, 2, 48, 48) and small.input_shape == (2, 48, 48)
    make_gesture_folder(tmp_path / "lists", users=(3, 5), with_lists=True)
    b = load("dvs_gesture", root=str(tmp_path / "lists"), T=2, val_fraction=0.2)
    assert {it.path.split("/")[-1] for it in b.test.source.items} == {"user03_led.aedat"}


def test_gesture_labels_outside_the_recording_are_refused(tmp_path):
    make_gesture_folder(tmp_path, users=(2,))
    (tmp_path / "user02_led_labels.csv").write_text("class,startTime_usec,endTime_usec\n1,5000000,6000000\n")
    make_gesture_folder(tmp_path, users=(30,))
    with pytest.raises(EventFileError, match=r"user02_led\.aedat.*outside the recording"):
        load("dvs_gesture", root=str(tmp_path), T=2)
    (tmp_path / "user02_led_labels.csv").write_text("class,startTime_usec,endTime_usec\n12,0,10\n")
    with pytest.raises(ValueError, match=r"user02_led_labels\.csv:2: class 12"):
        load("dvs_gesture", root=str(tmp_path), T=2)


def test_cifar10_dvs_fake_folder_split_and_orientation(tmp_path):
    for cls in ("airplane", "cat"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            write_aedat2(tmp_path / cls / f"cifar10_{cls}_{i}.aedat", rand_events(200, seed=i))
    b = load("cifar10_dvs", root=str(tmp_path), T=3, val_fraction=0.25)
    assert b.classes == ["airplane", "cat"] and len(b.test) == 2 and len(b.train) + len(b.val) == 18
    assert [it.path.endswith("_9.aedat") for it in b.test.source.items] == [True, True]  # last 10 % by name
    import json

    rec = json.loads(open(b.split_file).read())
    assert rec["classes"]["cat"]["test"] == ["cifar10_cat_9.aedat"]
    b2 = load("cifar10_dvs", root=str(tmp_path), T=3, val_fraction=0.25)
    assert torch.equal(b.val.index, b2.val.index)
    assert b.test[0][0].shape == (3, 2, 48, 48)
    # orientation: x = 127 - y_raw, y = 127 - x_raw, p = 1 - p_raw
    one = make_events([3], [100], [0], [1])
    write_aedat2(tmp_path / "one.aedat", one)
    from fewstep.data.event_datasets import READERS

    got = READERS["cifar10dvs"](tmp_path / "one.aedat", (128, 128))
    assert (int(got["x"][0]), int(got["y"][0]), int(got["p"][0])) == (27, 124, 0)


def test_ncaltech101_fake_folder(tmp_path):
    for cls in ("accordion", "BACKGROUND_Google", "yin_yang"):
        (tmp_path / "Caltech101" / cls).mkdir(parents=True)
        for i in range(5):
            write_nmnist(tmp_path / "Caltech101" / cls / f"image_{i:04d}.bin", rand_events(100, w=230, h=170, seed=i))
    b = load("ncaltech101", root=str(tmp_path), T=2, val_fraction=0.25)
    assert b.classes == ["BACKGROUND_Google", "accordion", "yin_yang"] and len(b.test) == 3
    x, _ = b.test[0]
    assert x.shape == (2, 2, 48, 48) and float(x.sum()) == 100


def test_wrong_layouts_say_what_is_expected(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="userNN_<lighting>.aedat"):
        load("dvs_gesture", root=str(tmp_path), T=4)
    with pytest.raises(FileNotFoundError, match=r"<class>/\*\.aedat"):
        load("cifar10_dvs", root=str(tmp_path), T=4)
    with pytest.raises(FileNotFoundError, match=r"<class>/\*\.bin"):
        load("ncaltech101", root=str(tmp_path), T=4)


def _build(args):
    path, T = args
    src = FileSource([Item(path, 0)], "nmnist", (34, 34))
    ds = EventFrames("race", src, Framing(T))
    ds.build_cache()
    return float(ds[0][0].sum())


def test_cache_keys_every_parameter_and_survives_concurrent_builds(tmp_path):
    f = tmp_path / "s.bin"
    write_nmnist(f, rand_events(300, 34, 34))
    src = FileSource([Item(str(f), 1)], "nmnist", (34, 34))
    a = EventFrames("cachetest", src, Framing(4))
    assert a[0][0].shape == (4, 2, 34, 34) and a._path(0).is_file()
    b = EventFrames("cachetest", src, Framing(5))
    assert b._path(0) != a._path(0) and b[0][0].shape == (5, 2, 34, 34)
    c = EventFrames("cachetest", src, Framing(4, binarize=True))
    assert c._path(0) != a._path(0)
    # the file changes: the cached frames of the old contents are never served
    write_nmnist(f, rand_events(120, 34, 34, seed=9))
    assert float(EventFrames("cachetest", src, Framing(4))[0][0].sum()) == 120
    g = tmp_path / "r.bin"
    write_nmnist(g, rand_events(500, 34, 34, seed=3))
    with mp.get_context("spawn").Pool(2) as pool:
        sums = pool.map(_build, [(str(g), 6)] * 4)
    assert sums == [500.0] * 4


def test_tonic_style_dataset_wraps_into_framing_and_cache():
    tonic_like = [(rand_events(80, 34, 34, seed=i), i % 3) for i in range(6)]
    ds = from_tonic(tonic_like, (34, 34, 2), Framing(3), name="tonic-like-test", cache=False)
    x, y = ds[4]
    assert x.shape == (3, 2, 34, 34) and y == 1 and float(x.sum()) == 80


def test_event_augmentations():
    torch.manual_seed(0)
    x = torch.zeros(3, 2, 8, 8)
    x[:, 0, 4, 4] = 5
    aug = EventAugment(max_shift=2)
    for _ in range(10):
        y = aug(x)
        pos = [tuple(torch.nonzero(y[t, 0])[0].tolist()) for t in range(3)]
        assert len(set(pos)) == 1  # one shift shared by all frames
    flipped = EventAugment(flip=True)
    seen = {tuple(torch.nonzero(flipped(x)[0, 0])[0].tolist()) for _ in range(20)}
    assert seen == {(4, 4), (4, 3)}
    big = torch.full((4, 2, 16, 16), 10.0)
    kept = EventAugment(drop=0.3)(big).sum() / big.sum()
    assert abs(float(kept) - 0.7) < 0.03
    assert to_frames(make_events([], [], [], []), (4, 4), 2).shape == (2, 2, 4, 4)
