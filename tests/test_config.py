"""Config and run-folder robustness (issue 15): numbers in every notation, ranges checked before any
data is loaded, run folders that never overwrite a user's files, and empty event files."""

import math
import re

import numpy as np
import pytest
import yaml

from fewstep import config as C
from fewstep.cli import main as cli
from fewstep.data import EventFileError, load, read_nmnist, write_nmnist
from fewstep.data.aedat import read_aedat2, read_aedat31

from .test_train import quick


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("1E5", 1e5), (".5", 0.5), ("2.", 2.0), ("+1e-2", 0.01),
                                        ("3", 3.0), ("1_000", 1000.0)])
def test_numbers_in_every_usual_notation(tmp_path, text, value):
    assert C.load(None, [f"train.lr={text}"]).train.lr == pytest.approx(value)
    f = tmp_path / "c.yaml"
    f.write_text(f"train:\n  lr: {text}\n  weight_decay: {text}\n")
    cfg = C.load(f)
    assert cfg.train.lr == pytest.approx(value) and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == pytest.approx(value)


def test_integers_accept_whole_numbers_in_any_notation_and_refuse_fractions():
    assert C.load(None, ["train.epochs=1e2"]).train.epochs == 100
    assert isinstance(C.load(None, ["data.T=4.0"]).data.T, int)
    with pytest.raises(ValueError, match=r"'data.T' must be a whole number, got 2.5"):
        C.load(None, ["data.T=2.5"])
    with pytest.raises(ValueError, match=r"'train.lr' must be a number, got NaN"):
        C.load(None, ["train.lr=.nan"])
    with pytest.raises(ValueError, match=r"'train.lr' must be a number, got 'fast'"):
        C.load(None, ["train.lr=fast"])
    with pytest.raises(ValueError, match=r"'data.name' must be a string"):
        C.load(None, ["data.name=5"])


def outside(lo, hi, lo_in, hi_in):
    """A value just outside a range (below it where it has a lower end)."""
    if lo == -math.inf and hi == math.inf:
        return math.inf
    if lo != -math.inf:
        return lo - 1 if lo_in else lo
    return hi + 1 if hi_in else hi


@pytest.mark.parametrize("sec,key", sorted(C.RANGES), ids=lambda v: str(v))
def test_every_numeric_key_out_of_range_names_the_key_value_and_range(sec, key):
    rng = C.RANGES[(sec, key)]
    bad = outside(*rng)
    family = ["data.name=nmnist"] if sec == "data" and key in C.EVENT_KEYS else []  # event keys on event data
    if (sec, key) == ("model", "levels"):
        family = ["model.neuron=qcfs", "data.T=1"]  # QCFS's quantisation applies to a QCFS model
    with pytest.raises(ValueError) as err:
        C.load(None, family + [f"{sec}.{key}={'.inf' if bad == math.inf else bad}"])
    msg = str(err.value)
    assert f"'{sec}.{key}'" in msg and ("out of range" in msg or "must be" in msg), msg
    lo, hi, lo_in, hi_in = rng
    inside = lo if lo_in else (hi if hi_in else (lo + hi) / 2 if math.isfinite(hi) else lo + 1)
    if math.isfinite(inside):
        C.load(None, family + [f"{sec}.{key}={inside}"])  # and a valid value passes


def test_every_numeric_key_has_a_range():
    for sec, cls in C.SECTIONS.items():
        for name, f in cls.__dataclass_fields__.items():
            if isinstance(f.default, (int, float)) and not isinstance(f.default, bool):
                assert (sec, name) in C.RANGES, f"{sec}.{name} has no range"


@pytest.mark.parametrize("override,match", [
    ("data.encoding=rate", r"'data.encoding' must be one of \['direct', 'poisson'\]"),
    ("data.size=[48]", r"'data.size' must be null or \[H, W\]"),
    ("data.window_us=-5", r"'data.window_us' = -5 is out of range"),
    ("model.name=alexnet", r"'model.name': unknown model 'alexnet'; valid names: .*resnet19"),
    ("model.surrogate=erf", r"'model.surrogate': unknown surrogate 'erf'"),
    ("model.options.dropout=1.5", r"'model.options.dropout' = 1.5 is out of range: it must be in \[0, 1\)"),
    ("model.options.kernel=5", r"'model.options.kernel'\] unknown for model 'cnn'; valid options: \['channels'"),
    ("model.options.channels=[16,0]", r"'model.options.channels' = \[16, 0\]"),
    ("train.optimizer=lamb", r"'train.optimizer' must be one of \['sgd', 'adamw'\]"),
    ("train.device=gpu", r"'train.device' = 'gpu': use auto, cpu, cuda or cuda:N"),
    ("data.name=mnist", r"'data.name': unknown dataset 'mnist'; valid names: cifar10"),
    ("data.name=cifar10;data.size=[48,48]", r"'data.size' = \[48, 48\] applies to event datasets only"),
    ("data.name=nmnist;data.encoding=poisson", r"'data.encoding' = 'poisson' applies to image datasets only"),
    ("data.cutout=8", r"'data.cutout' applies to cifar10, cifar100, fashion_mnist, tiny_imagenet only, not 'digits'"),
    ("data.coarse=true", r"'data.coarse' applies to cifar100 only, not 'digits'"),
    ("model.name=mlp;model.norm=tebn", r"model 'mlp' has none of"),
])
def test_names_and_combinations_are_checked_before_any_data(override, match):
    with pytest.raises(ValueError, match=match):
        C.load(None, override.split(";"))


def test_range_errors_come_before_data_loading(tmp_path, capsys):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump({"data": {"name": "nmnist", "root": str(tmp_path / "nowhere")}}))
    assert cli(["train", str(cfgfile), "--out", str(tmp_path / "r"), "--set", "data.T=0"]) == 2
    err = capsys.readouterr().err
    assert "'data.T' = 0 is out of range: it must be >= 1" in err and "nowhere" not in err
    assert not (tmp_path / "r").exists()


def test_zero_epochs_is_an_error_not_a_chance_level_run(tmp_path, capsys):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump(quick(tmp_path).to_dict()))
    assert cli(["train", str(cfgfile), "--out", str(tmp_path / "r"), "--set", "train.epochs=0"]) == 2
    assert "'train.epochs' = 0 is out of range: it must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_out_folder_with_user_files_is_refused_and_left_untouched(tmp_path, capsys):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump(quick(tmp_path, epochs=1).to_dict()))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "log.csv").write_text("my,own,data\n")
    (mine / "notes.txt").write_text("keep me")
    assert cli(["train", str(cfgfile), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert "not a fewstep run folder" in err and "log.csv" in err and "notes.txt" in err
    assert (mine / "log.csv").read_text() == "my,own,data\n" and sorted(p.name for p in mine.iterdir()) == [
        "log.csv", "notes.txt"]
    assert cli(["demo", "--out", str(mine), "--set", "train.epochs=1"]) == 2  # the demo does not wipe it either
    assert (mine / "notes.txt").read_text() == "keep me"
    # a run folder resumes as before; an empty folder or one with an interrupted start is fine
    run = tmp_path / "run"
    assert cli(["train", str(cfgfile), "--out", str(run)]) == 0
    assert cli(["train", str(cfgfile), "--out", str(run), "--set", "train.epochs=2"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["epochs"] == 2
    started = tmp_path / "started"
    started.mkdir()
    (started / "config.yaml").write_text(yaml.safe_dump(quick(tmp_path, epochs=1).to_dict()))
    assert cli(["train", str(cfgfile), "--out", str(started)]) == 0
    abl = tmp_path / "abl"
    abl.mkdir()
    (abl / "data.bin").write_bytes(b"x")
    assert cli(["ablate", str(cfgfile), "--variants", "tet", "--seeds", "1", "--out", str(abl)]) == 2
    assert "not an ablation folder" in capsys.readouterr().err


def test_cli_options_out_of_range_or_meaningless_together(tmp_path, capsys):
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump(quick(tmp_path, epochs=1).to_dict()))
    run = tmp_path / "run"
    assert cli(["train", str(cfgfile), "--out", str(run)]) == 0
    capsys.readouterr()
    for args, match in [
        (["--policy", "topk", "--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        (["--policy", "topk", "--epsilon", "1.5"], r"--epsilon: must be in \[0, 1\)"),
        (["--policy", "softmax", "--max-drop", "0.01", "--confidence", "1"], r"--confidence: must be in \(0, 1\)"),
        (["--policy", "topk", "--step", "2"], "--step sets the timestep policy's exit step"),
        (["--policy", "timestep", "--epsilon", "0.1"], "--epsilon does not apply to the timestep policy"),
        (["--policy", "timestep", "--step", "9"], r"--step 9 is outside 1..T = 1..3"),
        (["--policy", "topk", "--calibration", "x.json", "--epsilon", "0.1"], "--calibration reuses saved"),
        (["--policy", "topk", "--repeats", "0"], "--repeats: must be >= 1"),
        (["--policy", "topk", "--max-step", "soon"], "--max-step: expected a whole number >= 1, got 'soon'"),
        (["--policy", "topk", "--max-step", "auto"], "--max-step auto chooses the step cap together with the "
                                                     "threshold to meet a target: give --max-drop D"),
        (["--policy", "timestep", "--max-drop", "0.01", "--max-step", "auto"], "--max-step caps a threshold policy"),
        (["--policy", "softmax", "--max-drop", "0.01", "--mc-dropout", "0.3"], "--mc-dropout stacks perturbed copies"),
    ]:
        assert run_cli(["cutoff", str(run), *args]) == 2, args
        assert re.search(match, capsys.readouterr().err), (args, match)


def run_cli(argv) -> int:
    """The exit code, whether argparse refuses an option (SystemExit) or fewstep refuses a value."""
    try:
        return cli(argv)
    except SystemExit as exc:
        return int(exc.code)


def test_zero_byte_event_files_are_errors_naming_the_file(tmp_path):
    for reader, name in ((read_nmnist, "a.bs2"), (read_aedat31, "b.aedat"), (read_aedat2, "c.aedat")):
        (tmp_path / name).write_bytes(b"")
        with pytest.raises(EventFileError, match=rf"{name} is empty \(0 bytes\), not a recording"):
            reader(tmp_path / name)
    # inside a dataset folder: the error names the file when the frames are built
    root = tmp_path / "nm"
    r = np.random.default_rng(0)
    for split in ("Train", "Test"):
        for c in range(2):
            (root / split / str(c)).mkdir(parents=True)
            for i in range(2):
                from fewstep.data import make_events

                n = 50
                write_nmnist(root / split / str(c) / f"{i}.bin",
                             make_events(r.integers(0, 34, n), r.integers(0, 34, n), np.sort(r.integers(0, 9000, n)),
                                         r.integers(0, 2, n)))
    (root / "Train" / "1" / "1.bin").write_bytes(b"")  # a failed copy
    with pytest.raises(EventFileError, match=r"Train/1/1\.bin is empty \(0 bytes\)"):
        load("nmnist", root=str(root), T=4, val_fraction=0.5)


def test_docs_list_every_key_with_its_range():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    for sec, cls in C.SECTIONS.items():
        part = doc.split(f"## `{sec}`")[1].split("\n## ")[0]
        for name in cls.__dataclass_fields__:
            rows = [ln for ln in part.splitlines() if ln.startswith(f"| `{name}` |")]
            assert rows, f"docs/config.md has no row for {sec}.{name}"
            assert rows[0].count("|") >= 5, f"{sec}.{name}: no 'valid' column"


def test_shipped_configs_by_name_from_any_folder(tmp_path, monkeypatch):
    """An installed fewstep trains its recipes by name (``fewstep train nmnist_small``); a local file wins."""
    ship = C.shipped()
    assert {"digits", "nmnist_small", "cifar10_vgg_cpu", "fashion_mnist_cnn"} <= set(ship)
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    for name in ("nmnist_small", "nmnist_small.yaml", "configs/nmnist_small.yaml"):  # the last as the docs write it
        assert C.resolve(name) == C.SHIPPED / "nmnist_small.yaml"
    assert C.load("nmnist_small", ["data.T=5"]).data.T == 5
    assert C.load("digits").data.T == 8
    (tmp_path / "digits.yaml").write_text("data:\n  name: digits\n  T: 3\n")
    assert C.load("digits.yaml").data.T == 3  # the user's file, not the shipped one
    assert C.load("digits").data.T == 8       # no file named 'digits': the shipped one
    with pytest.raises(FileNotFoundError, match=r"nmnist_smal .*Did you mean nmnist_small\?.*fewstep configs"):
        C.load("nmnist_smal")
    with pytest.raises(FileNotFoundError, match="sub/nmnist_small.yaml. fewstep ships a config named nmnist_small: "
                                                "give the name alone"):
        C.load("sub/nmnist_small.yaml")  # a path into another folder is a path, never a shipped name
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(FileNotFoundError, match="dir.yaml is not a file"):
        C.load("dir.yaml")


def test_the_repository_configs_folder_is_the_shipped_one_and_the_package_installs_it():
    import tomllib
    from fnmatch import fnmatch
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert sorted(p.name for p in (root / "configs").glob("*.yaml")) == sorted(f.name for f in C.shipped().values())
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fewstep"]
    for f in C.shipped().values():
        rel = f.relative_to(Path(C.__file__).resolve().parent).as_posix()
        assert any(fnmatch(rel, pat) for pat in data), f"{rel} is not in the package data: a wheel would miss it"


def test_describe_reads_the_first_clause_of_the_leading_comment(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("# CIFAR-10 at T = 4 (a VGG; 6 epochs.) sized for a CPU: the budget.\n# More.\ndata: {}\n")
    assert C.describe(f) == "CIFAR-10 at T = 4 (a VGG; 6 epochs.) sized for a CPU"
    f.write_text("# One line, no stop\n# and a second line. Then more\ndata: {}\n")
    assert C.describe(f) == "One line, no stop and a second line"
    f.write_text("data: {}\n# a comment after the keys\n")
    assert C.describe(f) == ""


def test_fewstep_configs_lists_and_prints_the_shipped_configs(capsys):
    assert cli(["configs"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name, path in C.shipped().items():
        row = next(line for line in lines if line.split() and line.split()[0] == name)
        cfg = C.load(path)
        assert row.split()[1] == cfg.data.name and f"T = {cfg.data.T}" in row and f"{cfg.train.epochs} epochs" in row
    assert "N-MNIST subset (1000 train / 100 test real recordings) framed into T = 10 equal-time bins" in out
    assert cli(["configs", "nmnist_small"]) == 0
    assert capsys.readouterr().out == (C.SHIPPED / "nmnist_small.yaml").read_text()
    assert cli(["configs", "nope"]) == 2
    assert "fewstep ships no config of that name" in capsys.readouterr().err


def test_version_is_the_package_version(capsys):
    import tomllib
    from pathlib import Path

    import fewstep

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert fewstep.__version__ == project["version"]
    with pytest.raises(SystemExit) as e:
        cli(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fewstep {project['version']}"


def test_shares_given_as_percentages_are_refused_with_the_share_named(capsys):
    """``--max-drop 1`` (meaning 1 pt) would otherwise read as a drop of 100 pt: every share is checked, and a
    number that looks like a percentage gets the share it probably meant."""
    for argv in (["cutoff", "RUN", "--max-drop", "1"], ["tradeoff", "RUN", "--max-drop", "1"],
                 ["cutoff", "RUN", "--max-drop", "0.01", "--confidence", "95"]):
        err = cli_err(argv, capsys)
        assert "must be in" in err and "a share, not a percentage" in err, err
    assert "0.01 is 1 %" in cli_err(["tradeoff", "RUN", "--max-drop", "1"], capsys)
    assert "0.95 is 95 %" in cli_err(["cutoff", "RUN", "--confidence", "95"], capsys)
    assert "percentage" not in cli_err(["cutoff", "RUN", "--max-drop", "-0.1"], capsys)


def cli_err(argv, capsys) -> str:
    """What the command line refused ``argv`` with (argparse's exit status 2)."""
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert e.value.code == 2
    return capsys.readouterr().err
