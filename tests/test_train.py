import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from fewstep import config as C
from fewstep import losses
from fewstep.cli import main as cli
from fewstep.train import Trainer, TrainingDiverged, load_run


def test_losses_hand_computed():
    out = torch.tensor([[[0.0, 0.0]], [[math.log(3), 0.0]]])  # [T=2, N=1, C=2]
    y = torch.tensor([0])
    ce_t = (math.log(2) + math.log(4 / 3)) / 2
    mse = (1 + 1 + (math.log(3) - 1) ** 2 + 1) / 4
    assert losses.tet(out, y, lam=1e-3, phi=1.0).item() == pytest.approx((1 - 1e-3) * ce_t + 1e-3 * mse, rel=1e-6)
    assert losses.mean_ce(out, y).item() == pytest.approx(math.log(1 + 1 / math.sqrt(3)), rel=1e-6)
    with pytest.raises(ValueError, match=r"\[T, N, C\]"):
        losses.tet(out[0], y)
    with pytest.raises(ValueError, match="valid names: ce, tet"):
        losses.make("focal")


def test_config_validation_and_overrides(tmp_path):
    cfg = C.load(None, ["train.lr=0.01", "model.options.hidden=[32]", "data.T=3"])
    assert cfg.train.lr == 0.01 and cfg.model.options == {"hidden": [32]} and cfg.data.T == 3
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['train.lrate'\]; valid keys in 'train'"):
        C.load(None, ["train.lrate=1"])
    with pytest.raises(ValueError, match="must be a number"):
        C.load(None, ["train.lr=fast"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        C.load(tmp_path / "nope.yaml")
    from pathlib import Path

    shipped = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(shipped) >= 7
    for f in shipped:
        C.load(f)  # shipped configs are valid


def quick(tmp_path, epochs=3, **over):
    base = {"data": {"name": "digits", "T": 3}, "model": {"name": "cnn", "options": {"channels": [8, 16], "hidden": 32}},
            "train": {"epochs": epochs, "batch_size": 128, "lr": 3e-3, "progress": False}}
    for k, v in over.items():
        s, key = k.split("__")
        base[s][key] = v
    return C.from_dict(base)


def test_resume_equals_uninterrupted(tmp_path):
    a = Trainer(quick(tmp_path, data__augment=True), tmp_path / "a", log=lambda s: None)
    ma = a.fit()
    logs, logs2 = [], []
    b = Trainer(quick(tmp_path, data__augment=True), tmp_path / "b", log=logs.append)
    assert b.fit(stop_after=2) is None
    assert b.epoch == 2 and not (tmp_path / "b" / "metrics.json").exists()
    # before the first epoch, one line says what trains on what, with the numbers a log file needs
    n, bs = len(b.bundle.train), b.cfg.train.batch_size
    n_params = sum(p.numel() for p in b.model.parameters())
    assert logs[0] == (f"training cnn ({n_params:,} parameters) on digits: {n:,} train / {len(b.bundle.val):,} val / "
                       f"{len(b.bundle.test):,} test samples, T = {b.cfg.data.T}, {b.cfg.train.loss} loss; "
                       f"3 epochs of {-(-n // bs)} batches of {bs} on cpu"), logs[0]
    assert logs[1].startswith("epoch   1/3") and len(logs) == 3
    b2 = Trainer(quick(tmp_path, data__augment=True), tmp_path / "b", log=logs2.append)
    mb = b2.fit()
    assert logs2[0] == "resuming " + str(tmp_path / "b") + " after epoch 2"
    assert logs2[1].endswith(f"3 epochs of {-(-n // bs)} batches of {bs}, from epoch 3 on cpu"), logs2[1]
    assert b2.history[0] == b.history[0]
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b2.model.state_dict()[k]), k
    assert ma["accuracy_per_step"] == mb["accuracy_per_step"]
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and set(ckpt) >= {"model", "best_model", "optimizer", "scheduler", "rng", "config"}
    # a different config in the same folder is refused, not silently mixed
    with pytest.raises(ValueError, match="different config"):
        Trainer(quick(tmp_path, train__lr=0.5), tmp_path / "b", log=lambda s: None).fit()


def test_a_resume_reads_one_data_folder_by_either_of_its_names(tmp_path):
    """The checkpoint's data.root and the command's name the same folder through a link: the same data, no
    difference; another folder is one (it may hold other recordings)."""
    from fewstep.train import config_differences

    (tmp_path / "data").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    saved = C.from_dict({"data": {"name": "nmnist", "root": str(tmp_path / "data")}}).to_dict()
    assert config_differences(saved, C.from_dict({"data": {"name": "nmnist", "root": str(tmp_path / "link")}})) == []
    assert config_differences(saved, C.from_dict({"data": {"name": "nmnist", "root": str(tmp_path / "other")}})) \
        == ["data.root"]


def test_options_of_a_training_term_that_is_off_are_no_difference():
    """STR's weight with no STR, TRT's λ with TRT off: the same network is trained, so a resume or ``--reuse``
    takes the run; the same options with the term on, or the term itself turned on, are a difference."""
    from fewstep.regularizers import inert_keys
    from fewstep.train import config_differences

    def cfg(**sections):
        return C.from_dict({"data": {"name": "nmnist"}, **sections})

    saved = cfg(regularizer={"name": "rcs", "str_weight": 0.5, "rcs_ann_weight": 0.1}, trt={"lam": 3.0}).to_dict()
    assert config_differences(saved, cfg(regularizer={"name": "rcs"})) == []
    assert config_differences(saved, cfg(regularizer={"name": "rcs", "rcs_weight": 0.01})) == ["regularizer.rcs_weight"]
    assert config_differences(saved, cfg(regularizer={"name": "rcs+str"})) == ["regularizer.name", "regularizer.str_weight"]
    assert config_differences(saved, cfg(regularizer={"name": "rcs"}, trt={"enabled": True, "lam": 3.0})) \
        == ["trt.enabled"]
    on = cfg(regularizer={"name": "str"}, trt={"enabled": True, "lam": 3.0}).to_dict()
    assert config_differences(on, cfg(regularizer={"name": "str"}, trt={"enabled": True})) == ["trt.lam"]
    # rcs_ann's keys belong to rcs_ann, not to rcs (whose name is their prefix)
    keys = set(inert_keys(cfg(regularizer={"name": "rcs"}).to_dict()))
    assert ("regularizer", "rcs_ann_weight") in keys and ("regularizer", "rcs_weight") not in keys
    assert ("regularizer", "rcs_weight") in set(inert_keys(cfg(regularizer={"name": "rcs_ann"}).to_dict()))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def poison(out, y, rec):
        calls["n"] += 1
        return out.sum() * (float("nan") if calls["n"] > 12 else 0.0)

    t = Trainer(quick(tmp_path, epochs=5), tmp_path / "r", regularizers=[poison], log=lambda s: None)
    with pytest.raises(TrainingDiverged, match=r"regularizer term 'poison' became nan at epoch 2.*Last good "
                                               r"checkpoint: .*after epoch 1"):
        t.fit()
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_digits_learns_to_90_percent(tmp_path):
    cfg = C.load("configs/digits.yaml", ["train.epochs=8", "train.progress=false"])
    m = Trainer(cfg, tmp_path / "d", log=print).fit()
    print("digits test accuracy per step:", m["accuracy_per_step"])
    assert m["accuracy_per_step"][-1] >= 0.90, m
    assert len(m["accuracy_per_step"]) == 8 and m["val_accuracy"] >= 0.90


@pytest.mark.slow
def test_nmnist_subset_learns_to_75_percent(tmp_path, nmnist_root):
    cfg = C.load("configs/nmnist_small.yaml", [f"data.root={nmnist_root}", "train.epochs=4", "train.progress=false"])
    m = Trainer(cfg, tmp_path / "n", log=print).fit()
    print("N-MNIST subset test accuracy per step:", m["accuracy_per_step"])
    assert m["T"] == 10 and m["n_test"] == 100
    assert m["accuracy_per_step"][-1] >= 0.75, m


def test_cli_train_eval_and_errors(tmp_path, capsys, monkeypatch):
    from fewstep import runtime

    tuned = []
    monkeypatch.setattr(runtime, "tune_cpu_allocator", lambda *a, **k: tuned.append(k.get("default_mb", 64)) or True)
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump(quick(tmp_path, epochs=2).to_dict()))
    assert cli(["train", str(cfgfile), "--out", str(tmp_path / "run"), "--set", "train.epochs=1"]) == 0
    assert "with the weights of epoch 1 of 1, the best on validation" in capsys.readouterr().out
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "checkpoint.pt", "log.csv", "metrics.json"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"dataset", "model", "T", "val_accuracy", "accuracy_per_step"} <= set(metrics)
    assert metrics["dataset"] == "digits" and len(metrics["accuracy_per_step"]) == 3
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 1
    assert tuned == [64]  # the Trainer, on the CPU
    assert cli(["eval", str(run), "--split", "val"]) == 0
    assert tuned == [64, 1024]  # an inference command on the CPU tunes the allocator too, for its larger passes
    assert json.loads((run / "eval_val.json").read_text())["split"] == "val"
    model, cfg, _ = load_run(run)
    assert cfg.data.T == 3
    capsys.readouterr()
    assert cli(["train", str(cfgfile), "--out", str(tmp_path / "x"), "--set", "model.name=alexnet"]) == 2
    assert "valid names" in capsys.readouterr().err
    assert cli(["eval", str(tmp_path / "nothing")]) == 2


def test_console_script_demo_runs(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fewstep.cli", "demo", "--out", str(tmp_path / "demo"),
                        "--set", "train.epochs=2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "accuracy of the running-mean prediction" in r.stdout
    assert (tmp_path / "demo" / "accuracy_per_step.png").stat().st_size > 1000
    listed = r.stdout.split("\nfiles in ", 1)[1].splitlines()[1:]
    assert len(listed) == 11 and all((tmp_path / "demo" / f.strip()).is_file() for f in listed), listed


def test_cpu_training_tunes_the_allocator_unless_told_not_to(tmp_path, monkeypatch):
    from fewstep import runtime

    calls = []
    monkeypatch.setattr(runtime, "tune_cpu_allocator", lambda *a, **k: calls.append(a) or True)
    Trainer(quick(tmp_path, epochs=1), tmp_path / "a", log=lambda s: None)
    assert len(calls) == 1
    Trainer(quick(tmp_path, epochs=1, train__tune_malloc=False), tmp_path / "b", log=lambda s: None)
    assert len(calls) == 1


def test_warmup_then_cosine_learning_rates_by_hand(tmp_path):
    from fewstep.train import lr_factor

    cfg = quick(tmp_path, epochs=6, train__warmup_epochs=2, train__mixup=0.4)
    t = Trainer(cfg, tmp_path / "w", log=lambda s: None)
    assert t.fit(stop_after=4) is None
    lrs = [row["lr"] for row in t.history]
    # epochs 1-2 warm up linearly (1/2, 2/2), then cosine over the remaining 4: 1, ½(1 + cos(π/4))
    want = [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4))]
    assert lrs == pytest.approx([3e-3 * w for w in want])
    assert lr_factor(5, cfg.train) == pytest.approx(0.5 * (1 + math.cos(3 * math.pi / 4)))
    # resumed (mixup's draws are seeded per epoch): the same weights as an uninterrupted run
    t2 = Trainer(cfg, tmp_path / "w", log=lambda s: None)
    t2.fit()
    ref = Trainer(cfg, tmp_path / "ref", log=lambda s: None)
    ref.fit()
    assert [r["lr"] for r in t2.history] == pytest.approx([r["lr"] for r in ref.history])
    for k, v in ref.model.state_dict().items():
        assert torch.equal(v, t2.model.state_dict()[k]), k
    with pytest.raises(ValueError, match="warmup_epochs' = 6 must be smaller than train.epochs = 6"):
        quick(tmp_path, epochs=6, train__warmup_epochs=6)
    with pytest.raises(ValueError, match="'train.mixup' = -1"):
        quick(tmp_path, train__mixup=-1)


def test_mixup_mixes_inputs_and_labels_by_the_same_lambda():
    from fewstep.train import mixup

    torch.manual_seed(0)
    x = torch.arange(2 * 4, dtype=torch.float32).view(2, 4, 1)  # [T=2, N=4, 1]: sample n holds n and 4 + n
    y = torch.tensor([0, 1, 2, 3])
    for _ in range(20):
        xm, ya, yb, lam = mixup(x, y, alpha=0.4)
        assert 0.5 <= lam <= 1.0
        # the mix is lam·x[ya] + (1 − lam)·x[yb] (labels equal sample indices here), at every step
        assert torch.allclose(xm, lam * x[:, ya] + (1 - lam) * x[:, yb])
        assert sorted(ya.tolist()) == [0, 1, 2, 3] and sorted(yb.tolist()) == [0, 1, 2, 3]
    out = torch.randn(3, 4, 5)
    t = Trainer.__new__(Trainer)
    t.loss_fn = losses.mean_ce
    mix = (None, y, y.flip(0), 0.7)
    assert t._task_loss(out, y, mix).item() == pytest.approx(
        0.7 * losses.mean_ce(out, y).item() + 0.3 * losses.mean_ce(out, y.flip(0)).item(), rel=1e-6)


def test_predict_slices_long_runs_without_changing_results(monkeypatch):
    """A batch runs in slices of at most MAX_SAMPLE_STEPS samples x steps (T = 64 keeps T = 4's memory)."""
    from torch.utils.data import TensorDataset

    from fewstep import metrics
    from fewstep.models import create

    torch.manual_seed(0)
    net = create("cnn", input_shape=(1, 8, 8), num_classes=10, channels=(4,), hidden=16).eval()
    ds = TensorDataset(torch.rand(10, 1, 8, 8) * 3, torch.arange(10))
    whole = metrics.predict(net, ds, 6, "static", batch_size=10, firing_rates=True, step_mode="m")
    calls = []
    net.register_forward_pre_hook(lambda m, i: calls.append(i[0].shape[1]))
    monkeypatch.setattr(metrics, "MAX_SAMPLE_STEPS", 18)  # 3 samples of 6 steps per forward
    sliced = metrics.predict(net, ds, 6, "static", batch_size=10, firing_rates=True, step_mode="m")
    assert calls == [3, 3, 3, 1]
    assert torch.allclose(whole[0], sliced[0], atol=1e-6) and torch.equal(whole[1], sliced[1])
    assert whole[2].keys() == sliced[2].keys() and all(abs(whole[2][k] - sliced[2][k]) < 1e-9 for k in whole[2])


def test_a_run_trained_with_a_relative_data_root_is_read_from_anywhere(nmnist_root, tmp_path, monkeypatch, capsys):
    """config.yaml and the checkpoint keep data.root absolute, so `fewstep eval RUN` finds the data from any
    directory; resuming with the relative root as written still matches; an older run whose checkpoint kept
    a relative root, read from elsewhere, gets an error that says where it looked and why."""
    from fewstep.runfolder import load_checkpoint

    monkeypatch.chdir(nmnist_root.parent)
    cfg = C.from_dict({"data": {"name": "nmnist", "root": nmnist_root.name, "T": 2},
                       "model": {"name": "mlp", "options": {"hidden": [16]}},
                       "train": {"epochs": 1, "batch_size": 256, "progress": False}})
    run = tmp_path / "run"
    Trainer(cfg, run, log=lambda s: None).fit()
    assert cfg.data.root == nmnist_root.name  # the caller's config is left as it was
    saved = yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]
    assert saved == str(nmnist_root.resolve()) == load_checkpoint(run / "checkpoint.pt")["config"]["data"]["root"]
    again = C.from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "epochs": 2}})
    Trainer(again, run, log=lambda s: None).fit()  # resumes: the same root, written relative
    monkeypatch.chdir(tmp_path)
    model, rcfg, bundle = load_run(run)
    assert len(bundle.test) == 100 and rcfg.data.root == saved
    ck = torch.load(run / "checkpoint.pt", weights_only=True)  # an older run: its root kept as written
    ck["config"]["data"]["root"] = nmnist_root.name
    torch.save(ck, run / "checkpoint.pt")
    with pytest.raises(FileNotFoundError, match=rf"trained on data.root '{nmnist_root.name}', read relative to the "
                                                rf"working directory {tmp_path}.*run from the folder it was trained in"):
        load_run(run)
    # the data given where it lies now (a run or its data moved): same split, and the cfg says where it was read
    model2, cfg2, bundle2 = load_run(run, data_root=nmnist_root)
    assert cfg2.data.root == os.path.abspath(nmnist_root) and len(bundle2.test) == 100
    assert torch.equal(bundle2.val.index, bundle.val.index) and torch.equal(bundle2.val.y, bundle.val.y)  # same split
    with pytest.raises(FileNotFoundError, match=rf"the data root given for {run}: {tmp_path / 'elsewhere'}"):
        load_run(run, data_root=tmp_path / "elsewhere")
    from fewstep.cli import main  # the same from the command line

    assert main(["eval", str(run), "--split", "val", "--data-root", str(nmnist_root)]) == 0
    assert json.loads((run / "eval_val.json").read_text())["n"] == len(bundle.val)
    assert main(["eval", str(run)]) == 2 and "--data-root DIR" in capsys.readouterr().err
