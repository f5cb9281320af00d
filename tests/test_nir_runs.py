"""``fewstep import``: a run folder made of a NIR graph, so that every command works on a network trained elsewhere.
Checked on fewstep's own exports and on a graph rewritten the way other libraries write theirs (flat input,
per-neuron parameter arrays, time constants in seconds, no dt in the metadata)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

nir = pytest.importorskip("nir", reason="the nir extra is not installed (pip install 'fewstep[nir]')")

from fewstep import config as C  # noqa: E402
from fewstep.cli import main  # noqa: E402
from fewstep.metrics import predict  # noqa: E402
from fewstep.nir_io import to_nir  # noqa: E402
from fewstep.nir_runs import import_run  # noqa: E402
from fewstep.runfolder import load_network, load_run  # noqa: E402
from fewstep.train import Trainer  # noqa: E402

DIGITS = {"data": {"name": "digits", "T": 4, "encoding": "direct"},
          "train": {"epochs": 3, "batch_size": 64, "lr": 5e-3, "progress": False}}


def _train(tmp_path_factory, model: dict, name: str):
    out = tmp_path_factory.mktemp(name) / "run"
    tr = Trainer(C.from_dict({**DIGITS, "model": model}), out, log=lambda s: None)
    tr.fit()
    return out


@pytest.fixture(scope="module")
def cnn_run(tmp_path_factory):
    return _train(tmp_path_factory, {"name": "cnn", "options": {"channels": [8, 16], "hidden": 32}}, "cnn")


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    return _train(tmp_path_factory, {"name": "mlp", "options": {"hidden": [64]}, "tau": 0.6}, "mlp")


def _digits_yaml(tmp_path):
    path = tmp_path / "digits.yaml"
    C.from_dict(DIGITS).dump(path)
    return path


def _logits(run, split="test"):
    model, cfg, bundle = load_run(run)
    y, _, _ = predict(model, bundle.split(split), cfg.data.T, bundle.kind, cfg.data.encoding)
    return y


def test_an_exported_run_imports_as_the_same_network(cnn_run, tmp_path, capsys):
    assert main(["export", str(cnn_run), "--out", str(tmp_path / "m.nir")]) == 0
    assert main(["import", str(tmp_path / "m.nir"), "--data", str(_digits_yaml(tmp_path)), "--out",
                 str(tmp_path / "imp")]) == 0
    text = capsys.readouterr().out
    assert "validation accuracy per step: t=1" in text and "warning" not in text
    imp = tmp_path / "imp"
    assert sorted(p.name for p in imp.iterdir()) == ["checkpoint.pt", "config.yaml", "import.json", "model.nir"]
    saved = C.load(imp / "config.yaml")
    assert saved.model.name == "nir" and saved.model.options["graph"] == "model.nir"
    info = json.loads((imp / "import.json").read_text())
    assert info["dt"] == 1.0 and info["T"] == 4 and info["layers"][0] == "Conv2d"
    ref = _logits(cnn_run)
    assert torch.allclose(_logits(imp), ref, atol=1e-4)  # BatchNorm folded: float rounding only
    # the folder moves: the graph is named relative to it
    moved = tmp_path / "elsewhere" / "imp"
    shutil.move(str(imp), str(moved))
    model, cfg, meta = load_network(moved)
    assert cfg.model.options["graph"] == str(moved.resolve() / "model.nir") and meta.num_classes == 10
    # every command works on it
    assert main(["eval", str(moved)]) == 0
    assert json.loads((moved / "eval_test.json").read_text())["accuracy_per_step"] == pytest.approx(
        [float(a) for a in (ref.cumsum(0).argmax(-1) == _labels(cnn_run)).float().mean(1)], abs=1e-9)
    assert main(["cutoff", str(moved), "--policy", "softmax", "--epsilon", "0.2", "--repeats", "1"]) == 0
    assert (moved / "cutoff_softmax.json").is_file()
    assert main(["energy", str(moved)]) == 0
    # fine-tuning starts from the graph's weights (at lr 1e-12 the test accuracy stays the imported network's)
    assert main(["train", str(moved / "config.yaml"), "--out", str(tmp_path / "ft"), "--set", "train.epochs=1",
                 "--set", "train.lr=1e-12", "--set", f"model.options.graph={moved / 'model.nir'}"]) == 0
    assert json.loads((tmp_path / "ft" / "metrics.json").read_text())["accuracy_per_step"] == pytest.approx(
        json.loads((moved / "eval_test.json").read_text())["accuracy_per_step"], abs=1e-9)
    # an existing folder is not overwritten unless asked
    capsys.readouterr()
    assert main(["import", str(tmp_path / "m.nir"), "--data", "digits", "--set", "data.T=4", "--out", str(moved)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "m.nir"), "--data", "digits", "--set", "data.T=4", "--out", str(moved),
                 "--overwrite"]) == 0
    # re-imported from its own copy into its own folder: the graph is read before the folder is replaced
    assert main(["import", str(moved / "model.nir"), "--data", str(_digits_yaml(tmp_path)), "--out", str(moved),
                 "--overwrite"]) == 0
    assert torch.allclose(_logits(moved), ref, atol=1e-4)


def _labels(run):
    _, _, bundle = load_run(run)
    return torch.tensor([int(bundle.test[i][1]) for i in range(len(bundle.test))])


def _as_another_library_writes_it(graph, dt: float):
    """fewstep's graph of an MLP rewritten in other libraries' conventions: the input flat ([64], no Flatten node),
    every neuron parameter an array with one value per neuron, time constants in seconds for a step of ``dt``
    seconds, and no dt in the metadata."""
    nodes = {}
    for k, n in graph.nodes.items():
        kind = type(n).__name__
        if kind == "Input":
            nodes[k] = nir.Input(input_type={"input": np.array([64])})
        elif kind == "Flatten":
            continue
        elif kind == "LIF":
            size = nodes_prev_out
            full = lambda v: np.full(size, float(np.asarray(v).flat[0]))  # noqa: E731
            nodes[k] = nir.LIF(tau=full(n.tau) * dt, r=full(n.r), v_leak=full(n.v_leak),
                               v_threshold=full(n.v_threshold), v_reset=full(n.v_reset))
        else:
            nodes[k] = n
        if kind == "Affine":
            nodes_prev_out = np.asarray(n.weight).shape[0]
    flat = [k for k, n in graph.nodes.items() if type(n).__name__ == "Flatten"]
    edges = []
    for a, b in graph.edges:
        if a in flat:
            continue
        if b in flat:
            b = next(bb for aa, bb in graph.edges if aa == b)
        edges.append((a, b))
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata={})


def test_a_graph_in_other_libraries_conventions(mlp_run, tmp_path, capsys):
    model, cfg, _ = load_run(mlp_run)
    graph = _as_another_library_writes_it(to_nir(model, dt=1.0), dt=1e-3)
    nir.write(str(tmp_path / "other.nir"), graph)
    data = _digits_yaml(tmp_path)
    # without its dt the graph's time constants (milliseconds, in seconds) cannot be read: the error says what to pass
    assert main(["import", str(tmp_path / "other.nir"), "--data", str(data), "--out", str(tmp_path / "a")]) == 2
    assert "pass the step duration dt" in capsys.readouterr().err
    import_run(tmp_path / "other.nir", str(data), tmp_path / "b", dt=1e-3, log=lambda s: None)
    # a flat input takes the dataset's 1x8x8 images flattened, as the exporting library's did
    assert torch.allclose(_logits(tmp_path / "b"), _logits(mlp_run), atol=1e-4)


def test_what_does_not_fit_is_named(cnn_run, tmp_path, capsys):
    model, _, _ = load_run(cnn_run)
    graph = to_nir(model)
    data = str(_digits_yaml(tmp_path))
    # the class count and the input shape, each with both sides
    out_key = next(k for k, n in graph.nodes.items() if type(n).__name__ == "Output")
    last = [k for k, n in graph.nodes.items() if type(n).__name__ == "Affine"][-1]
    w, b = np.asarray(graph.nodes[last].weight), np.asarray(graph.nodes[last].bias)
    five = nir.NIRGraph(nodes={**graph.nodes, last: nir.Affine(weight=w[:5], bias=b[:5]),
                               out_key: nir.Output(output_type={"output": np.array([5])})},
                        edges=graph.edges, metadata=graph.metadata)
    nir.write(str(tmp_path / "five.nir"), five)
    with pytest.raises(ValueError, match="has 5 outputs, but the dataset has 10 classes"):
        import_run(tmp_path / "five.nir", data, tmp_path / "x", log=lambda s: None)
    from fewstep.models import create

    two = create("cnn", input_shape=(2, 8, 8), num_classes=10, channels=[8, 16], hidden=32).eval()
    nir.write(str(tmp_path / "two.nir"), to_nir(two))  # a network for two-channel 8x8 input
    with pytest.raises(ValueError, match=r"takes input \[2, 8, 8\], but the dataset's samples are \[1, 8, 8\]"):
        import_run(tmp_path / "two.nir", data, tmp_path / "x", log=lambda s: None)
    assert not (tmp_path / "x").exists()  # nothing written on a refusal
    with pytest.raises(FileNotFoundError, match="no NIR file at"):
        import_run(tmp_path / "missing.nir", data, tmp_path / "x")
    # keys the graph decides are refused in a config, not ignored
    with pytest.raises(ValueError, match=r"\['model.tau'\] do not apply to model 'nir'"):
        C.from_dict({"model": {"name": "nir", "tau": 0.9, "options": {"graph": "m.nir"}}})
    # a network that cannot tell the classes apart: the import warns, naming dt and the class order
    dead = nir.NIRGraph(nodes={**graph.nodes, last: nir.Affine(weight=np.zeros_like(w), bias=np.zeros_like(b))},
                        edges=graph.edges, metadata=graph.metadata)
    nir.write(str(tmp_path / "dead.nir"), dead)
    lines = []
    import_run(tmp_path / "dead.nir", data, tmp_path / "dead", log=lines.append)
    assert any("near chance" in s and "check dt" in s and "class order" in s for s in lines)


def test_a_network_exported_by_snntorch(tmp_path):
    """snnTorch's own NIR export (flat input, per-neuron arrays, its fixed dt of 1e-4 s and no dt in the metadata)
    imports as a network whose per-step outputs equal snnTorch's own loop over T, on the digits' test images."""
    snn = pytest.importorskip("snntorch", reason="snnTorch is not installed (make test installs snntorch 1.0.0)")
    from snntorch import utils
    from snntorch.export_nir import export_to_nir
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 48),
                        snn.Leaky(beta=torch.full((48,), 0.7), threshold=torch.ones(48), init_hidden=True,
                                  reset_mechanism="zero"),
                        nn.Linear(48, 10))
    with torch.no_grad():
        net[0].weight.mul_(4)  # enough drive that the hidden layer spikes
    nir.write(str(tmp_path / "snntorch.nir"), export_to_nir(net, torch.rand(1, 64), ignore_dims=[0]))
    import_run(tmp_path / "snntorch.nir", str(_digits_yaml(tmp_path)), tmp_path / "run", dt=1e-4, log=lambda s: None)
    model, cfg, bundle = load_run(tmp_path / "run")
    got, _, _ = predict(model, bundle.test, cfg.data.T, bundle.kind, cfg.data.encoding)
    x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))]).flatten(1)  # direct encoding: each step
    utils.reset(net)
    with torch.no_grad():
        ref = torch.stack([net(x) for _ in range(cfg.data.T)])
    assert float(ref.std(1).mean()) > 0.1  # the outputs differ between images: the hidden layer spikes
    assert torch.allclose(got, ref, atol=1e-5)


def test_snntorch_imports_a_fewstep_export(cnn_run, tmp_path):
    """The other way: a trained fewstep CNN exported with ``--dt 1e-4`` (the step snnTorch 1.0's importer assumes)
    loads with snnTorch's ``import_from_nir`` and gives the same per-step logits on the digits' test images. One
    adjustment, on snnTorch's side: it hands NIR's ``Flatten.start_dim`` to torch as is, counting the batch, where NIR
    counts from the first non-batch dimension (docs/deploy.md)."""
    pytest.importorskip("snntorch", reason="snnTorch is not installed (make test installs snntorch 1.0.0)")
    pytest.importorskip("nirtorch", reason="nirtorch is not installed (make test installs it)")
    from snntorch.import_nir import import_from_nir

    assert main(["export", str(cnn_run), "--out", str(tmp_path / "m.nir"), "--dt", "1e-4"]) == 0
    net = import_from_nir(nir.read(str(tmp_path / "m.nir")))
    flats = [m for m in net.modules() if isinstance(m, torch.nn.Flatten)]
    assert [m.start_dim for m in flats] == [0]  # NIR's 0 (the channels) taken as the batch dimension
    for m in flats:
        m.start_dim += 1
    model, cfg, bundle = load_run(cnn_run)
    ref, _, _ = predict(model, bundle.test, cfg.data.T, bundle.kind, cfg.data.encoding)
    x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))])  # direct encoding: the image at each step
    with torch.no_grad():
        got = torch.stack([net(x)[0] for _ in range(cfg.data.T)])  # its neurons keep their state between calls
    assert float(ref.std(1).mean()) > 0.1
    assert torch.allclose(got, ref, atol=1e-4)


def test_a_network_exported_by_norse(tmp_path):
    """Norse's own NIR export of ``Linear → LIFBoxCell → Linear``: its LIF scales its input by dt/tau (NIR's
    r·dt/tau = 0.5 here), which fewstep moves into the affine layer before it; per-step outputs equal Norse's own
    loop. (Norse 1.1 writes tau = dt / tau_mem_inv, right only at dt = 1: exported and imported at dt = 1.)"""
    nt = pytest.importorskip("norse.torch", reason="Norse is not installed (make test installs norse 1.1.0)")
    from norse.torch.utils.export_nir import to_nir as norse_to_nir
    from torch import nn

    torch.manual_seed(0)
    p = nt.LIFBoxParameters(tau_mem_inv=torch.full((48,), 0.5), v_th=torch.ones(48), v_leak=torch.zeros(48),
                            v_reset=torch.zeros(48))
    net = nt.SequentialState(nn.Linear(64, 48), nt.LIFBoxCell(p, dt=1.0), nn.Linear(48, 10))
    with torch.no_grad():
        net[0].weight.mul_(6)  # enough drive that the hidden layer spikes
    nir.write(str(tmp_path / "norse.nir"), norse_to_nir(net, torch.rand(64), dt=1.0))
    import_run(tmp_path / "norse.nir", str(_digits_yaml(tmp_path)), tmp_path / "run", dt=1.0, log=lambda s: None)
    model, cfg, bundle = load_run(tmp_path / "run")
    got, _, _ = predict(model, bundle.test, cfg.data.T, bundle.kind, cfg.data.encoding)
    x = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))]).flatten(1)
    state, ref = None, []
    with torch.no_grad():
        for _ in range(cfg.data.T):
            out, state = net(x, state)
            ref.append(out)
    ref = torch.stack(ref)
    assert float(ref.std(1).mean()) > 0.1  # the hidden layer spikes
    assert torch.allclose(got, ref, atol=1e-5)


def test_a_negative_input_gain_with_no_layer_to_take_it_is_refused():
    from fewstep.nir_io import from_nir

    g = nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array([4])}),
                            "lif": nir.LIF(tau=np.full(4, 2.0), r=-np.ones(4), v_leak=np.zeros(4),
                                           v_threshold=np.ones(4), v_reset=np.zeros(4)),
                            "output": nir.Output(output_type={"output": np.array([4])})},
                     edges=[("input", "lif"), ("lif", "output")], metadata={"dt": 1.0})
    with pytest.raises(ValueError, match=r"'lif' \(LIF\) has r·dt/tau = -0.5.*not positive.*not the input"):
        from_nir(g)
