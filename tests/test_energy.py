"""Energy report (fewstep/energy.py, METHODS §8): exact counts on a hand-computed network."""

import json

import pytest
import torch
from torch import nn

from fewstep import layers as L
from fewstep import models
from fewstep.cli import main
from fewstep.energy import energy_table
from fewstep.neurons import LIF
from fewstep.train import Trainer

from .test_train import quick


def hand_net():
    """Linear(2→3) → LIF(τ 0.5, θ 1, hard reset) → Linear(3→2), weights set by hand."""
    net = models.create("mlp", input_shape=(2,), num_classes=2, hidden=(3,), tau=0.5, theta=1.0)
    with torch.no_grad():
        net.features[1].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        net.features[1].bias.zero_()
        net.classifier.weight.fill_(0.1)
        net.classifier.bias.zero_()
    return net.eval()


# T = 2 steps, two samples with constant input: A = (1.5, 0), B = (0.6, 0.6)
X = torch.tensor([[1.5, 0.0], [0.6, 0.6]]).expand(2, 2, 2).contiguous()
# currents A (1.5, 0, 1.5): spikes (1, 0, 1) at both steps. B (0.6, 0.6, 1.2): u = (.6, .6, 1.2) → (0, 0, 1);
# then u = (.5·.6 + .6, same, 1.2) = (.9, .9, 1.2) → (0, 0, 1).
# layer 1 (analog input): 2·3 = 6 MACs per step. layer 2: SOPs = (spikes / 3) · 6 = 2 · spikes.


def test_counts_of_a_hand_computed_network_are_exact():
    t = energy_table(hand_net(), [X])
    rows = {r["layer"]: r for r in t["layers"]}
    assert rows["features.1"]["macs"] == 12 and rows["features.1"]["sops"] == 0
    assert rows["features.2"]["spikes"] == 3 and rows["features.2"]["neurons"] == 3
    assert rows["features.2"]["firing_rate"] == pytest.approx(6 / 12)
    assert rows["classifier"]["sops"] == pytest.approx((8 + 4) / 2) and rows["classifier"]["macs"] == 0
    assert t["total"]["macs"] == 12 and t["total"]["sops"] == pytest.approx(6) and t["total"]["spikes"] == 3
    assert t["per_sample_energy_pj"] == pytest.approx([4.6 * 12 + 0.9 * 8, 4.6 * 12 + 0.9 * 4])
    assert t["uncounted"] == []


def test_nonzero_per_sample_counts_exactly_in_every_layout(monkeypatch):
    from fewstep import ops

    x = torch.zeros(3, 2, 2, 3)
    x[0, 0, 0, 0], x[0, 1, 1, 2], x[2] = 0.5, -1.0, 1.0  # 2, 0 and 12 non-zeros (a converted IF emits spike·λ)
    want = [2.0, 0.0, 12.0]
    for t in (x, x.contiguous(memory_format=torch.channels_last), x.flatten(1), x.half()):
        got = ops.nonzero_per_sample(t)
        assert got.dtype == torch.float64 and got.tolist() == want
    monkeypatch.setattr(ops, "_EXACT_F32", 4)  # past float32's exact range: summed in float64
    assert ops.nonzero_per_sample(x).tolist() == want
    assert ops.nonzero_per_sample(torch.tensor([0.0, 3.0, 0.0])).tolist() == [0.0, 1.0, 0.0]


def test_one_counting_pass_also_gives_predicts_logits_and_firing_rates():
    """The ablation's analysis reads test logits, firing rates and counts from one pass (ops_per_step); they
    equal predict()'s, hand-checked on the network above: layer rates A (1, 0, 1), B (0, 0, 1) at both steps."""
    from torch.utils.data import TensorDataset

    from fewstep import ops
    from fewstep.anytime import prepare
    from fewstep.metrics import predict

    net = hand_net()
    ds = TensorDataset(X[0], torch.tensor([0, 1]))  # the constant inputs, direct-encoded over T = 2
    chunks, y = prepare(ds, 2, "static", "direct", batch_size=1)  # two chunks of one sample
    r = ops.ops_per_step(net, chunks, outputs=True, firing_rates=True)
    O, y2, rates = predict(net, ds, 2, "static", batch_size=2, firing_rates=True)
    assert torch.equal(y, y2) and torch.equal(r["logits"], O) and r["logits"].shape == (2, 2, 2)
    assert list(r["firing_rates"]) == list(rates) and len(rates) == 1
    name = next(iter(rates))
    assert r["firing_rates"][name] == rates[name] == pytest.approx(3 / 6)  # 6 spikes of 12 neuron-steps
    assert "logits" not in ops.ops_per_step(net, chunks) and net.current_step_mode() == "m"


def test_counts_stop_at_each_samples_exit_and_constants_are_configurable():
    t = energy_table(hand_net(), [X], exit_step=torch.tensor([1, 2]), e_mac=1.0, e_sop=0.5)
    rows = {r["layer"]: r for r in t["layers"]}
    assert t["mean_steps"] == 1.5
    assert rows["features.1"]["macs"] == pytest.approx((6 + 12) / 2)
    assert rows["features.2"]["spikes"] == pytest.approx((2 + 2) / 2)
    assert rows["features.2"]["firing_rate"] == pytest.approx(4 / 9)  # 4 spikes over 3·1 + 3·2 neuron-steps
    assert t["per_sample_energy_pj"] == pytest.approx([6 + 0.5 * 4, 12 + 0.5 * 4])
    with pytest.raises(ValueError, match=r"one step in 1..2 per sample"):
        energy_table(hand_net(), [X], exit_step=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match=">= 0 pJ"):
        energy_table(hand_net(), [X], e_mac=-1)


class Odd(nn.Module):
    """A layer type fewstep does not know how to price."""

    def forward(self, x):
        return 2 * x


def test_a_module_it_cannot_price_is_named_not_dropped():
    net = nn.Sequential(L.Linear(2, 3), Odd(), LIF(), L.Linear(3, 2))
    t = energy_table(net, [X])
    assert t["uncounted"] == [{"layer": "1", "type": "Odd"}]


def test_energy_command_on_a_run_with_and_without_a_cutoff(tmp_path, capsys):
    cfg = quick(tmp_path, epochs=2)
    Trainer(cfg, tmp_path / "run", log=lambda s: None).fit()
    assert main(["energy", str(tmp_path / "run"), "--policy", "timestep"]) == 0
    out = capsys.readouterr().out
    assert "features.0" in out and "total" in out and "energy_timestep.json" in out
    r = json.loads((tmp_path / "run" / "energy_timestep.json").read_text())
    assert r["cutoff"]["mean_steps"] <= r["full"]["mean_steps"] == r["full"]["T"] == 3
    assert f"with the timestep cutoff (t={r['policy']['t']}), up to each exit" in out  # names its setting
    assert r["cutoff"]["total"]["energy_pj"] < r["full"]["total"]["energy_pj"]
    assert main(["energy", str(tmp_path / "run"), "--e-sop", "-1"]) == 2
