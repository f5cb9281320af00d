"""Static image datasets (fewstep.data.images): each layout from a small folder written here, bad input."""

import gzip
import logging
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from fewstep import config as C
from fewstep.data import images, load


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSTEP_CACHE", str(tmp_path / "cache"))


def _png(path, a):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _unnormalise(x, mean, std):
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return ((x * s + m) * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)


def test_cifar100_pickles_fine_and_coarse_labels(tmp_path):
    r = np.random.default_rng(0)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name, n in (("train", 20), ("test", 6)):
        data = r.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(d / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": list(np.arange(n) % 100), b"coarse_labels": list(np.arange(n) % 20)}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"c{i}".encode() for i in range(20)]}, f)
    b = load("cifar100", root=str(tmp_path), val_fraction=0.25, augment=False)
    assert b.num_classes == 100 and b.classes[3] == "f3" and len(b.test) == 6 and len(b.train) + len(b.val) == 20
    assert b.input_shape == (3, 32, 32)
    x, y = b.test[5]
    with open(d / "test", "rb") as f:
        raw = pickle.load(f)[b"data"][5].reshape(3, 32, 32).transpose(1, 2, 0)
    assert int(y) == 5 and np.array_equal(_unnormalise(x, images.CIFAR100_MEAN, images.CIFAR100_STD), raw)
    c = load("cifar100", root=str(d), coarse=True, val_fraction=0.25)
    assert c.num_classes == 20 and c.classes[0] == "c0"
    with pytest.raises(FileNotFoundError, match=r"CIFAR-100 not found under .*cifar-100-python/\{train,test,meta\}"):
        load("cifar100", root=str(tmp_path / "nowhere"))


def test_image_folders_labels_order_splits_and_class_mismatch(tmp_path):
    r = np.random.default_rng(1)
    for split, n in (("train", 5), ("test", 2)):
        for cls in ("zebra", "apple"):
            for i in range(n):
                _png(tmp_path / "f" / split / cls / f"{i}.png", r.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    b = load("cifar100", root=str(tmp_path / "f"), val_fraction=0.2, augment=False)
    assert b.classes == ["apple", "zebra"] and b.num_classes == 2
    assert len(b.test) == 4 and len(b.train) == 8 and len(b.val) == 2
    assert sorted(int(b.test[i][1]) for i in range(4)) == [0, 0, 1, 1]
    _png(tmp_path / "f" / "test" / "mango" / "0.png", r.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"class folders differ between train and test.*only in test: \['mango'\]"):
        load("cifar100", root=str(tmp_path / "f"))


def test_the_cache_is_rebuilt_when_an_image_changes(tmp_path):
    r = np.random.default_rng(2)
    src = tmp_path / "src"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(2):
                _png(src / split / cls / f"{i}.png", r.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    first = load("cifar10", root=str(src), val_fraction=0.5, augment=False).test[0][0]
    again = load("cifar10", root=str(src), val_fraction=0.5, augment=False).test[0][0]
    assert torch.equal(first, again) and len(list((tmp_path / "cache").glob("cifar10-*.npz"))) == 1  # served from it
    new = np.zeros((32, 32, 3), dtype=np.uint8)
    _png(src / "test" / "a" / "0.png", new)
    st = os.stat(src / "test" / "a" / "0.png")
    os.utime(src / "test" / "a" / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    x = load("cifar10", root=str(src), val_fraction=0.5, augment=False).test[0][0]
    assert np.array_equal(_unnormalise(x, images.CIFAR_MEAN, images.CIFAR_STD), new)


def test_corrupt_images_are_named_or_skipped_and_counted(tmp_path, caplog):
    r = np.random.default_rng(3)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(2):
                _png(tmp_path / split / cls / f"{i}.png", r.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    bad = tmp_path / "train" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated, as a failed copy leaves it
    with pytest.raises(ValueError, match=r"corrupt or truncated image .*train/b/1.png"):
        load("cifar10", root=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        b = load("cifar10", root=str(tmp_path), skip_corrupt=True, val_fraction=0.34)
    assert len(b.train) + len(b.val) == 3
    assert "skipped 1 corrupt image(s)" in caplog.text and "1.png" in caplog.text


def _idx(path, arr, gz):
    head = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = head + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files(tmp_path, gz):
    r = np.random.default_rng(4)
    d = tmp_path / "fashion-mnist"
    d.mkdir()
    ext = ".gz" if gz else ""
    xtr, xte = r.integers(0, 256, (30, 28, 28)), r.integers(0, 256, (10, 28, 28))
    _idx(d / f"train-images-idx3-ubyte{ext}", xtr, gz)
    _idx(d / f"train-labels-idx1-ubyte{ext}", np.arange(30) % 10, gz)
    _idx(d / f"t10k-images-idx3-ubyte{ext}", xte, gz)
    _idx(d / f"t10k-labels-idx1-ubyte{ext}", np.arange(10) % 10, gz)
    b = load("fashion_mnist", root=str(tmp_path), val_fraction=0.2, augment=False)
    assert b.input_shape == (1, 28, 28) and b.num_classes == 10 and b.classes[9] == "Ankle boot"
    assert len(b.test) == 10 and len(b.train) + len(b.val) == 30
    x, y = b.test[3]
    assert int(y) == 3 and np.array_equal(_unnormalise(x, images.FASHION_MEAN, images.FASHION_STD)[..., 0], xte[3])
    # a truncated file and a wrong magic number are named
    raw = d / f"t10k-images-idx3-ubyte{ext}"
    data = (gzip.open if gz else open)(raw, "rb").read()
    (gzip.open if gz else open)(raw, "wb").write(data[:-5])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.* is truncated"):
        load("fashion_mnist", root=str(tmp_path))
    (gzip.open if gz else open)(raw, "wb").write(b"\x01\x02" + data[2:])
    with pytest.raises(ValueError, match="bad magic number"):
        load("fashion_mnist", root=str(tmp_path))


def test_fashion_mnist_missing_names_every_place_it_looked(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "FASHION_SYSTEM", tmp_path / "system")
    with pytest.raises(FileNotFoundError, match=r"looked in .*fashion-mnist.*system.*apt install dataset-fashion-mnist"):
        load("fashion_mnist", root=str(tmp_path))


def test_real_fashion_mnist_from_debian():
    if not images._fashion_folder(images.FASHION_SYSTEM):
        pytest.skip(f"Fashion-MNIST is not installed at {images.FASHION_SYSTEM} (apt install dataset-fashion-mnist)")
    b = load("fashion_mnist", root="/nonexistent", val_fraction=0.1, augment=False)
    assert len(b.train) + len(b.val) == 60000 and len(b.test) == 10000
    ys = torch.stack([b.test[i][1] for i in range(0, 10000, 97)])
    assert set(ys.tolist()) == set(range(10))  # every class in the test split


def test_tiny_imagenet_layout(tmp_path):
    r = np.random.default_rng(5)
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]  # the label order is wnids.txt's
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        for i in range(3):
            _png(root / "train" / w / "images" / f"{w}_{i}.JPEG", r.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    lines = []
    for i, w in enumerate(["n01", "n02", "n01"]):
        _png(root / "val" / "images" / f"val_{i}.JPEG", r.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    b = load("tiny_imagenet", root=str(tmp_path), val_fraction=0.34, augment=False)
    assert b.classes == wnids and b.input_shape == (3, 64, 64) and len(b.test) == 3
    assert [int(b.test[i][1]) for i in range(3)] == [1, 0, 1]
    assert len(b.train) + len(b.val) == 6
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="n99.*not in wnids.txt"):
        load("tiny_imagenet", root=str(root))
    with pytest.raises(FileNotFoundError, match="Tiny-ImageNet not found .*wnids.txt"):
        load("tiny_imagenet", root=str(tmp_path / "x"))


def test_imagefolder_crops_flips_and_refuses_what_it_cannot_read(tmp_path):
    r = np.random.default_rng(6)
    for split, n in (("train", 4), ("val", 2)):
        for cls in ("dog", "cat"):
            for i in range(n):
                h, w = (int(r.integers(40, 90)), int(r.integers(40, 90)))
                _png(tmp_path / split / cls / f"{i}.png", r.integers(0, 256, (h, w, 3), dtype=np.uint8))
    b = load("imagefolder", root=str(tmp_path), size=[32, 48], val_fraction=0.25)
    assert b.classes == ["cat", "dog"] and b.input_shape == (3, 32, 48)
    assert len(b.test) == 4 and len(b.train) == 6 and len(b.val) == 2
    assert b.train[0][0].shape == (3, 32, 48) and b.test[0][0].shape == (3, 32, 48)
    torch.manual_seed(0)
    a1 = b.train[1][0]
    torch.manual_seed(0)
    assert torch.equal(a1, b.train[1][0])  # reproducible under a seed
    assert torch.equal(b.test[2][0], b.test[2][0])  # evaluation is deterministic
    # corrupt file: named when read; skipped and counted with skip_corrupt
    bad = tmp_path / "val" / "dog" / "0.png"
    bad.write_bytes(b"not an image")
    b = load("imagefolder", root=str(tmp_path), size=[32, 32])
    with pytest.raises(ValueError, match=r"corrupt or truncated image .*val/dog/0.png"):
        [b.test[i] for i in range(len(b.test))]
    assert len(load("imagefolder", root=str(tmp_path), size=[32, 32], skip_corrupt=True).test) == 3
    with pytest.raises(FileNotFoundError, match=r"no image folders under .*train.*val"):
        load("imagefolder", root=str(tmp_path / "train"))


def test_config_takes_the_new_keys_where_they_apply():
    C.from_dict({"data": {"name": "imagefolder", "size": [64, 64], "skip_corrupt": True}})
    C.from_dict({"data": {"name": "cifar100", "coarse": True, "cutout": 8}})
    with pytest.raises(ValueError, match="'data.skip_corrupt' applies to"):
        C.from_dict({"data": {"name": "fashion_mnist", "skip_corrupt": True}})
    with pytest.raises(ValueError, match="'data.size' .* applies to event datasets only"):
        C.from_dict({"data": {"name": "cifar100", "size": [16, 16]}})


def _cifar_folder(root, n=6, seed=7):
    r = np.random.default_rng(seed)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(n):
                _png(root / split / cls / f"{i}.png", r.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_batch_fast_path_gives_the_per_sample_tensors_and_augments_reproducibly(tmp_path):
    from fewstep.data.images import Augment, batch_augment

    _cifar_folder(tmp_path / "c")
    b = load("cifar10", root=str(tmp_path / "c"), val_fraction=0.25, augment=True, cutout=8)
    pos = torch.tensor([3, 0, 5])
    x, y = b.test.batch(pos, "cpu")  # the test split never augments
    want = torch.stack([b.test[i][0] for i in pos.tolist()])
    assert torch.equal(x, want) and torch.equal(y, torch.stack([b.test[i][1] for i in pos.tolist()]))
    plain = load("cifar10", root=str(tmp_path / "c"), val_fraction=0.25, augment=False)
    xa, _ = plain.train.batch(pos, "cpu", torch.Generator().manual_seed(0))  # no augmentation: identical
    assert torch.equal(xa, torch.stack([plain.train[i][0] for i in pos.tolist()]))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a1, _ = b.train.batch(pos, "cpu", g1)
    a2, _ = b.train.batch(pos, "cpu", g2)
    assert a1.shape == (3, 3, 32, 32) and torch.equal(a1, a2)  # shapes kept, reproducible under a seed
    # each augmented sample is a shifted (and maybe flipped) copy of the original, with a cutout hole
    base = x[:1].repeat(64, 1, 1, 1)
    aug = batch_augment(base, Augment(pad=4, flip=True, cutout=0), torch.Generator().manual_seed(1))
    assert len({a.flatten().tolist().__str__() for a in aug}) > 8  # the draws differ between samples
    padded = torch.nn.functional.pad(x[0], (4,) * 4)
    for k in range(8):
        found = any(torch.equal(aug[k], v) for i in range(9) for j in range(9)
                    for v in (padded[:, i:i + 32, j:j + 32], padded[:, i:i + 32, j:j + 32].flip(-1)))
        assert found, k
    holes = batch_augment(base, Augment(pad=0, flip=False, cutout=8), torch.Generator().manual_seed(2))
    zeros = (holes == 0).all(1).flatten(1).sum(1)
    assert int(zeros.max()) <= 64 and int(zeros.min()) >= 16  # an 8x8 square, clipped at the border


def test_training_with_the_batch_loader(tmp_path):
    from fewstep.train import Trainer

    _cifar_folder(tmp_path / "c", n=16)
    cfg = C.from_dict({"data": {"name": "cifar10", "root": str(tmp_path / "c"), "T": 2, "loader": "batch",
                                "val_fraction": 0.25},
                       "model": {"name": "cnn", "options": {"channels": [4], "hidden": 8}},
                       "train": {"epochs": 2, "batch_size": 8, "progress": False}})
    t = Trainer(cfg, tmp_path / "run", log=lambda s: None)
    assert t.batch_loader
    batches = list(t._batches(1))
    assert len(batches) == 3 and batches[0][0].shape == (8, 3, 32, 32)  # 24 training images in batches of 8
    assert torch.equal(batches[0][0], list(t._batches(1))[0][0])  # the same epoch reads the same batches
    m = t.fit()
    assert len(m["accuracy_per_step"]) == 2
    with pytest.raises(ValueError, match="'data.loader' = 'batch' applies to the in-memory image datasets"):
        C.from_dict({"data": {"name": "digits", "loader": "batch"}})


def test_real_cifar10_archive_still_trains(tmp_path, monkeypatch):
    from pathlib import Path

    from fewstep.train import Trainer

    root = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not (root / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip(f"the CIFAR-10 JPEG archive is not at {root / 'cifar10-jpeg.tar.gz'}")
    monkeypatch.delenv("FEWSTEP_CACHE")  # the real archive is decoded once per machine, into the usual cache
    cfg = C.from_dict({"data": {"name": "cifar10", "root": str(root), "T": 2, "val_fraction": 0.1},
                       "model": {"name": "cnn", "options": {"channels": [16, 32], "hidden": 64}},
                       "train": {"epochs": 2, "batch_size": 64, "lr": 3e-3, "progress": False, "eval_batch_size": 500}})
    t = Trainer(cfg, tmp_path / "run", log=lambda s: None)
    assert len(t.bundle.train) == 45000 and len(t.bundle.test) == 10000 and t.bundle.classes[0] == "airplane"
    for split, n in (("train", 4000), ("val", 1000), ("test", 1000)):  # a slice, to stay quick
        ds = t.bundle.split(split)
        ds.index = ds.index[:n]
    m = t.fit()
    assert m["test_accuracy"] > 0.3, m["test_accuracy"]  # chance is 0.1
