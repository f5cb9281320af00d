import pickle

import numpy as np
import pytest
import torch

from fewstep.data import EventFileError, datasets, load, make_events, read_nmnist, to_frames, write_nmnist
from fewstep.data import encoding, images
from fewstep.data.archive import locate
from fewstep.metrics import time_first



def events(n=500, w=34, h=34, seed=0, t_max=300_000):
    r = np.random.default_rng(seed)
    return make_events(r.integers(0, w, n), r.integers(0, h, n), np.sort(r.integers(0, t_max, n)), r.integers(0, 2, n))


def test_framing_keeps_every_event_and_places_them():
    ev = events()
    fr = to_frames(ev, (34, 34), 10)
    assert fr.shape == (10, 2, 34, 34) and fr.sum() == len(ev)
    # hand-placed events: t0 = 0, span = 100, 4 bins of 25 µs; t = 100 goes to the closed last bin
    ev = make_events([0, 1, 2, 3, 3], [0, 0, 1, 2, 2], [0, 24, 25, 100, 100], [0, 1, 1, 0, 0])
    fr = to_frames(ev, (4, 3), 4)
    assert fr[0, 0, 0, 0] == 1 and fr[0, 1, 0, 1] == 1 and fr[1, 1, 1, 2] == 1 and fr[3, 0, 2, 3] == 2
    assert fr.sum() == 5 and fr[2].sum() == 0  # an empty bin is fine
    assert to_frames(ev, (4, 3), 4, binarize=True).max() == 1


def test_framing_edge_cases():
    empty = make_events([], [], [], [])
    assert to_frames(empty, (8, 8), 3).sum() == 0
    same_t = make_events([1, 2], [1, 2], [7, 7], [1, 0])
    fr = to_frames(same_t, (8, 8), 3)
    assert fr[0].sum() == 2 and fr.sum() == 2
    with pytest.raises(ValueError, match="n_bins"):
        to_frames(same_t, (8, 8), 0)
    with pytest.raises(EventFileError, match="outside the 2x2 sensor"):
        to_frames(same_t, (2, 2), 3)


def test_nmnist_round_trip(tmp_path):
    ev = events(1000)
    write_nmnist(tmp_path / "a.bin", ev)
    back = read_nmnist(tmp_path / "a.bin")
    assert back.tobytes() == ev.tobytes()


def test_corrupt_event_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\x00" * 12)
    with pytest.raises(EventFileError, match=r"bad\.bin.*not a multiple of 5"):
        read_nmnist(bad)
    off = tmp_path / "off.bin"
    off.write_bytes(bytes([40, 3, 0, 0, 1]))  # x = 40 on a 34x34 sensor
    with pytest.raises(EventFileError, match=r"off\.bin.*x=40"):
        read_nmnist(off)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        read_nmnist(tmp_path / "missing.bin")


def test_real_nmnist_recording_decodes(nmnist_root):
    folder = locate(nmnist_root, "nmnist-small", "nmnist-small.tar.gz", "train1K.txt", "")
    ev = read_nmnist(folder / "1.bs2")
    assert len(ev) == 4681
    assert ev["x"].min() >= 0 and ev["x"].max() <= 33 and ev["y"].min() >= 0 and ev["y"].max() <= 33
    assert ev["t"][-1] == 305_924
    assert np.all(np.diff(ev["t"]) >= 0)
    assert to_frames(ev, (34, 34), 10).sum() == 4681


def test_nmnist_subset_loads_with_fixed_splits(nmnist_root):
    b = load("nmnist", root=str(nmnist_root), T=5, seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (900, 100, 100)
    x, y = b.test[0]
    assert x.shape == (5, 2, 34, 34) and 0 <= int(y) < 10
    b2 = load("nmnist", root=str(nmnist_root), T=5, seed=0)
    assert torch.equal(b.val.index, b2.val.index)
    assert not set(b.val.index.tolist()) & set(b.train.index.tolist())


def test_nmnist_original_layout(tmp_path):
    for split, n in (("Train", 3), ("Test", 2)):
        for c in (0, 7):
            d = tmp_path / split / str(c)
            d.mkdir(parents=True)
            for i in range(n):
                write_nmnist(d / f"{i:05d}.bin", events(50, seed=i + 10 * c))
    b = load("nmnist", root=str(tmp_path), T=4, val_fraction=0.34)
    assert len(b.train) + len(b.val) == 6 and len(b.test) == 4
    assert sorted(b.test.y.tolist()) == [0, 0, 7, 7]
    assert sum(float(b.test[i][0].sum()) for i in range(4)) == 4 * 50  # framing kept every event


def test_missing_folder_says_where_and_what(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"looked for .*train1K.txt.*Expected layout: .*Train/<class>"):
        load("nmnist", root=str(tmp_path / "nowhere"), T=10)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load("cifar10", root=str(tmp_path))
    with pytest.raises(ValueError, match="valid names: cifar10, cifar100, cifar10_dvs, digits, dvs_gesture, eventfolder, fashion_mnist, imagefolder, ncaltech101, nmnist, tiny_imagenet"):
        load("mnist")


def test_cifar_image_folder_and_pickle_layouts(tmp_path):
    from PIL import Image

    r = np.random.default_rng(0)
    imgs = {}
    for split in ("train", "test"):
        for c in ("cat", "airplane"):
            (tmp_path / "folder" / split / c).mkdir(parents=True)
            for i in range(4):
                a = r.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(a).save(tmp_path / "folder" / split / c / f"{i}.png")
                imgs[(split, c, i)] = a
    b = load("cifar10", root=str(tmp_path / "folder"), val_fraction=0.25, augment=False)
    assert b.classes == ["airplane", "cat"] and len(b.test) == 8 and len(b.train) + len(b.val) == 8
    x, y = b.test[0]
    assert x.shape == (3, 32, 32)
    # PNG is lossless: de-normalise and compare with the written pixels of airplane/0
    mean = torch.tensor(images.CIFAR_MEAN).view(3, 1, 1)
    std = torch.tensor(images.CIFAR_STD).view(3, 1, 1)
    px = ((x * std + mean) * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
    assert int(y) == 0 and np.array_equal(px, imgs[("test", "airplane", 0)])

    pk = tmp_path / "pk" / "cifar-10-batches-py"
    pk.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = r.integers(0, 256, (3, 3072), dtype=np.uint8)
        with open(pk / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [1, 2, 3]}, f)
    b = load("cifar10", root=str(tmp_path / "pk"), val_fraction=0.2)
    assert len(b.train) + len(b.val) == 15 and len(b.test) == 3
    assert b.train[0][0].shape == (3, 32, 32)


def test_digits_splits_are_fixed_and_disjoint():
    a, b = load("digits", seed=0), load("digits", seed=1)
    assert torch.equal(a.test.index, b.test.index)  # the test split never depends on the run's seed
    assert not torch.equal(a.val.index, b.val.index)
    assert not set(a.val.index.tolist()) & set(a.train.index.tolist())
    assert not set(a.test.index.tolist()) & (set(a.train.index.tolist()) | set(a.val.index.tolist()))
    assert len(a.train) + len(a.val) + len(a.test) == 1797


def test_encodings_and_time_first():
    x = torch.rand(5, 1, 8, 8)
    d = encoding.direct(x, 4)
    assert d.shape == (4, 5, 1, 8, 8) and torch.equal(d[3], x)
    g = torch.Generator().manual_seed(0)
    p = encoding.poisson(torch.full((2000,), 0.3), 50, g)
    assert set(p.unique().tolist()) <= {0.0, 1.0}
    assert abs(p.mean().item() - 0.3) < 0.01
    # the same sample gets the same spike train whatever the batching
    imgs = torch.rand(6, 1, 4, 4)
    whole = encoding.poisson(imgs, 5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    parts = torch.cat([encoding.poisson(imgs[:2], 5, g), encoding.poisson(imgs[2:], 5, g)], 1)
    assert torch.equal(whole, parts)
    frames = torch.zeros(3, 6, 2, 4, 4)
    assert time_first(frames, "frames", 6).shape == (6, 3, 2, 4, 4)
    with pytest.raises(ValueError, match="T mismatch: the data has 6 frames .* but T = 10"):
        time_first(frames, "frames", 10)
    with pytest.raises(ValueError, match="valid names: direct, poisson"):
        encoding.get("latency")
