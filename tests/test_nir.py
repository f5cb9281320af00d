"""NIR export and import (fewstep.nir_io): exact round trips, the ODE mapping checked by an independent Euler
simulation of the graph, BatchNorm folding, and errors that name what NIR cannot represent."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

nir = pytest.importorskip("nir", reason="the nir extra is not installed (pip install 'fewstep[nir]')")

from fewstep import layers as L  # noqa: E402
from fewstep.models import create  # noqa: E402
from fewstep.models.registry import SNN  # noqa: E402
from fewstep.neurons import IF, LIF, set_step_mode  # noqa: E402
from fewstep.nir_io import from_nir, to_nir  # noqa: E402


class Chain(SNN):
    """conv → neuron → avgpool → conv (stride 2) → neuron → flatten → linear → neuron → linear."""

    def __init__(self, neuron, gain=2.5):
        super().__init__((2, 8, 8), 5)
        self.net = nn.Sequential(L.Conv2d(2, 4, 3, padding=1), neuron(), L.AvgPool2d(2),
                                 L.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), neuron(), L.Flatten(),
                                 L.Linear(6 * 2 * 2, 16), neuron(), L.Linear(16, 5))
        torch.manual_seed(0)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.data.mul_(gain)  # enough drive that every layer spikes

    def body(self, x):
        return self.net(x)


NEURONS = {"lif": lambda: LIF(tau=0.7, theta=0.3), "if": lambda: IF(theta=0.5)}


def _spike_counts(model, x):
    counts = []
    hooks = [m.register_forward_hook(lambda mod, i, o: counts.append(float(o.sum())))
             for m in model.modules() if isinstance(m, LIF)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return counts


def simulate_nir(graph, x: torch.Tensor) -> torch.Tensor:
    """NIR's own equations, integrated by forward Euler with the graph's dt, in float64 (independent of
    fewstep's neurons): LIF  v ← v + dt/τ·(v_leak − v + r·I);  IF  v ← v + dt·r·I;  spike where v > θ, then
    v ← v_reset."""
    dt = graph.metadata["dt"]
    nexts = dict(graph.edges)
    order, k = [], "input"
    while k in nexts:
        k = nexts[k]
        order.append(k)
    state, outs = {}, []
    d = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    for xt in x.double():
        h = xt
        for k in order:
            n, kind = graph.nodes[k], type(graph.nodes[k]).__name__
            if kind == "Conv2d":
                h = F.conv2d(h, d(n.weight), d(n.bias), tuple(n.stride), tuple(n.padding), tuple(n.dilation), n.groups)
            elif kind == "Affine":
                h = h @ d(n.weight).T + d(n.bias)
            elif kind == "Linear":
                h = h @ d(n.weight).T
            elif kind == "AvgPool2d":
                h = F.avg_pool2d(h, tuple(int(v) for v in n.kernel_size), tuple(int(v) for v in n.stride))
            elif kind == "Flatten":
                h = h.flatten(n.start_dim + 1, n.end_dim + 1 if n.end_dim >= 0 else n.end_dim)
            elif kind in ("LIF", "IF"):
                v = state.get(k, torch.zeros_like(h))
                v = v + dt / d(n.tau) * (d(n.v_leak) - v + d(n.r) * h) if kind == "LIF" else v + dt * d(n.r) * h
                z = v > d(n.v_threshold)
                state[k] = torch.where(z, d(n.v_reset).expand_as(v), v)
                h = z.double()
            elif kind == "Output":
                pass
            else:
                raise AssertionError(kind)
        outs.append(h)
    return torch.stack(outs)


@pytest.mark.parametrize("kind", ["lif", "if"])
def test_export_then_import_reproduces_outputs_exactly(kind, tmp_path):
    model = Chain(NEURONS[kind]).eval()
    x = torch.rand(6, 3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    assert all(c > 0 for c in _spike_counts(model, x))  # a test of spikes, not of silence
    path = tmp_path / f"{kind}.nir"
    nir.write(str(path), to_nir(model))
    back = from_nir(path)
    types = [type(m).__name__ for m in back.layers]
    assert types == ["Conv2d", "LIF" if kind == "lif" else "IF", "AvgPool2d", "Conv2d", types[1], "Flatten", "Linear",
                     types[1], "Linear"]
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    set_step_mode(back, "s")  # the rebuilt network streams like any fewstep network
    with torch.no_grad():
        assert torch.equal(torch.stack([back(f) for f in x]), model(x))


@pytest.mark.parametrize("kind,dt", [("lif", 1.0), ("if", 1.0), ("lif", 1e-3)])
def test_the_graph_means_the_same_under_nir_equations(kind, dt):
    model = Chain(NEURONS[kind]).eval().double()
    graph = to_nir(model, dt=dt)
    node = next(n for n in graph.nodes.values() if type(n).__name__ in ("LIF", "IF"))
    if kind == "lif":  # τ_nir = dt/(1 − 0.7), r = 1/(1 − 0.7), by hand
        assert node.tau.flat[0] == pytest.approx(dt / 0.3) and node.r.flat[0] == pytest.approx(1 / 0.3)
        assert node.tau.shape == (4, 8, 8) and float(node.v_leak.max()) == 0.0
    else:
        assert node.r.flat[0] == pytest.approx(1 / dt)
    assert float(node.v_threshold.flat[0]) == pytest.approx(0.3 if kind == "lif" else 0.5)
    x = torch.rand(8, 3, 2, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(simulate_nir(graph, x), ref, atol=1e-9)
    assert from_nir(graph).layers[1].tau == pytest.approx(0.7 if kind == "lif" else 1.0)  # dt read from metadata


def _neuron(kind: str, shape: tuple, r: float, theta: float = 1.0):
    full = lambda v: np.full(shape, float(v))  # noqa: E731
    if kind == "LIF":  # at dt = 1: decay 1 − dt/τ = 0.5, input gain r·dt/τ = r / 2
        return nir.LIF(tau=full(2.0), r=full(r), v_leak=full(0), v_threshold=full(theta), v_reset=full(0))
    return nir.IF(r=full(r), v_threshold=full(theta), v_reset=full(0))


@pytest.mark.parametrize("kind,r", [("LIF", 1.0), ("LIF", 5.0), ("IF", 0.25)])
def test_an_input_gain_with_no_layer_before_goes_into_the_threshold(kind, r):
    """A neuron that reads the input with a gain g ≠ 1 (NIR's r·dt/τ, or r·dt for an IF): fewstep's neuron adds its
    input unscaled, so the import spikes at θ/g instead, the same spikes as NIR's equations."""
    g = nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array([6])}),
                            "lif": _neuron(kind, (6,), r),
                            "fc": nir.Affine(weight=np.eye(3, 6) * 2.0 - 0.5, bias=np.full(3, 0.1)),
                            "output": nir.Output(output_type={"output": np.array([3])})},
                     edges=[("input", "lif"), ("lif", "fc"), ("fc", "output")], metadata={"dt": 1.0})
    gain = r / 2 if kind == "LIF" else r
    net = from_nir(g).double()
    assert net.layers.lif.theta == pytest.approx(1.0 / gain)
    x = 3.0 * torch.rand(12, 5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = simulate_nir(g, x)
    with torch.no_grad():
        got = net(x)
    assert 0 < float((ref != 0.1).double().mean()) < 1  # some neurons spike, not all
    assert torch.allclose(got, ref, atol=1e-12)


def test_an_input_gain_moves_through_pooling_into_the_convolution():
    """Conv → AvgPool → Flatten → LIF with r·dt/τ = 0.75: pooling and flattening commute with a scale, so the gain goes
    into the convolution (the neuron's threshold and membrane stay NIR's); outputs equal NIR's equations."""
    w = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(4)).double().numpy()
    g = nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array([2, 8, 8])}),
                            "conv": nir.Conv2d(input_shape=(8, 8), weight=w, stride=1, padding=1, dilation=1, groups=1,
                                               bias=np.full(4, 0.2)),
                            "pool": nir.AvgPool2d(kernel_size=np.array([2, 2]), stride=np.array([2, 2]),
                                                  padding=np.array([0, 0])),
                            "flat": nir.Flatten(input_type={"input": np.array([4, 4, 4])}, start_dim=0, end_dim=-1),
                            "lif": _neuron("LIF", (64,), 1.5),
                            "fc": nir.Affine(weight=np.ones((3, 64)) / 8, bias=np.zeros(3)),
                            "output": nir.Output(output_type={"output": np.array([3])})},
                     edges=[("input", "conv"), ("conv", "pool"), ("pool", "flat"), ("flat", "lif"), ("lif", "fc"),
                            ("fc", "output")], metadata={"dt": 1.0})
    net = from_nir(g).double()
    assert net.layers.lif.theta == 1.0
    assert torch.allclose(net.layers.conv.weight, torch.from_numpy(w) * 0.75)
    x = torch.rand(10, 3, 2, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = simulate_nir(g, x)
    assert float(ref.abs().sum()) > 0  # the hidden layer spikes
    with torch.no_grad():
        assert torch.allclose(net(x), ref, atol=1e-12)


def test_batchnorm_is_folded_into_the_convolution():
    model = create("cnn", input_shape=(1, 8, 8), num_classes=10, tau=0.6, theta=0.4).eval()
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    graph = to_nir(model)
    assert [type(n).__name__ for n in graph.nodes.values()] == [
        "Input", "Conv2d", "LIF", "AvgPool2d", "Conv2d", "LIF", "AvgPool2d", "Flatten", "Affine", "LIF", "Affine",
        "Output"]
    x = torch.rand(5, 4, 1, 8, 8, generator=g)
    with torch.no_grad():
        assert torch.allclose(from_nir(graph)(x), model(x), atol=1e-5)


def test_what_nir_cannot_represent_is_listed():
    class Bad(SNN):
        def __init__(self):
            super().__init__((1, 8, 8), 3)
            self.a = L.Conv2d(1, 2, 3, padding=1)
            self.b = LIF(reset="soft")
            self.c = L.MaxPool2d(2)
            self.d = LIF(v0=0.2)
            self.e = L.Flatten()
            self.f = L.Linear(32, 3)

        def body(self, x):
            return self.f(self.e(self.d(self.c(self.b(self.a(x))))))

    with pytest.raises(ValueError) as e:
        to_nir(Bad())
    msg = str(e.value)
    assert "b (LIF): soft reset" in msg and "c (MaxPool2d)" in msg and "d (LIF): initial membrane v0 = 0.2" in msg
    with pytest.raises(ValueError, match="not a chain of layers"):
        to_nir(create("resnet20", input_shape=(3, 32, 32), num_classes=10))
    qcfs = create("cnn", input_shape=(1, 8, 8), num_classes=10, neuron="qcfs", levels=4)
    with pytest.raises(ValueError, match="quantised ANN activation, and NIR cannot express its conversion"):
        to_nir(qcfs)


def test_import_names_what_fewstep_cannot_rebuild():
    net = Chain(NEURONS["lif"]).eval()
    graph = to_nir(net)
    node = graph.nodes["net_1"]
    node.v_threshold = node.v_threshold.copy()
    node.v_threshold[0, 0, 0] = 9.0
    with pytest.raises(ValueError, match="'net_1': v_threshold differs between neurons"):
        from_nir(graph)
    g2 = to_nir(net)
    g2.nodes["net_2"] = nir.Scale(scale=g2.nodes["net_2"].input_type["input"] * 0 + 1.0)
    with pytest.raises(ValueError, match="'net_2' is a Scale"):
        from_nir(g2)
    with pytest.raises(FileNotFoundError, match="no NIR file"):
        from_nir("/nonexistent/model.nir")


def test_cli_export_of_a_trained_run(tmp_path, capsys):
    from fewstep import config as C
    from fewstep.cli import main
    from fewstep.train import Trainer

    cfg = C.from_dict({"data": {"name": "digits", "T": 4, "encoding": "direct", "val_fraction": 0.15},
                       "model": {"name": "cnn", "options": {"channels": [8], "hidden": 32}},
                       "train": {"epochs": 1, "batch_size": 64, "progress": False, "device": "cpu"}})
    run = tmp_path / "run"
    Trainer(cfg, run, log=lambda m: None).fit()
    out = tmp_path / "model.nir"
    assert main(["export", str(run), "--format", "nir", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "Conv2d, LIF, AvgPool2d, Flatten, Affine, LIF, Affine" in text
    diff = float(text.split("max |logit difference| = ")[1].split()[0])
    assert diff < 1e-5  # BatchNorm folded: equal up to float rounding
    assert main(["export", str(run), "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
