"""QCFS ANN → IF SNN conversion (METHODS §6), RCS-ANN (METHODS §1), ``fewstep convert``."""

import json

import pytest
import torch
import yaml
from torch import nn

import fewstep
from fewstep import config as C
from fewstep import layers as L
from fewstep import models
from fewstep.cli import main as cli
from fewstep.qcfs import QCFS, ConvertedIF, check_convertible, convert, qcfs
from fewstep.rcs import RCSANN, ann_ratio
from fewstep.train import Trainer, load_run


def test_qcfs_forward_matches_the_formula_at_hand_computed_points():
    # λ = 8, L = 8: h(x) = 8·clamp(floor(x + 0.5)/8, 0, 1)
    x = torch.tensor([-1.0, 0.2, 0.6, 3.4, 3.6, 7.4, 7.6, 9.0])
    want = torch.tensor([0.0, 0.0, 1.0, 3.0, 4.0, 7.0, 8.0, 8.0])
    assert torch.equal(qcfs(x, 8.0, 8), want)
    # λ = 2, L = 4: h(x) = 2·clamp(floor(2x + 0.5)/4, 0, 1); x = 0.3 → floor(1.1) = 1 → 0.5
    assert qcfs(torch.tensor(0.3), 2.0, 4).item() == pytest.approx(0.5)
    m = QCFS(theta=8.0, levels=8)
    assert torch.equal(m(x.view(1, -1)), want.view(1, -1))


def test_qcfs_straight_through_gradient_by_hand():
    lam = torch.tensor(8.0, requires_grad=True)
    x = torch.tensor([3.4, 9.0, -1.0], requires_grad=True)
    h = qcfs(x, lam, 8)
    gx, glam = torch.autograd.grad(h.sum(), (x, lam))
    # inside the range: dh/dx = λ·(1/L)·(L/λ) = 1; above: 0 (clamped); below: 0
    assert torch.allclose(gx, torch.tensor([1.0, 0.0, 0.0]))
    # dh/dλ: inside q − x/λ = 3/8 − 3.4/8 = −0.05; above: 1 (h = λ); below: 0
    assert glam.item() == pytest.approx(-0.05 + 1.0 + 0.0, abs=1e-6)


def test_converted_if_neuron_on_hand_computed_inputs():
    n = ConvertedIF(theta=2.0)
    assert n.v0 == 1.0  # λ/2
    x = torch.full((6, 1, 1), 0.7)
    # u: 1.7, 2.4→spike (v 0.4), 1.1, 1.8, 2.5→spike (v 0.5), 1.2
    out = n(x).view(-1)
    assert torch.allclose(out, torch.tensor([0.0, 2.0, 0.0, 0.0, 2.0, 0.0]))
    # v0 follows a loaded threshold
    n.load_state_dict({"theta": torch.tensor(4.0)})
    assert n.v0 == 2.0
    fewstep.set_step_mode(n, "s")
    from fewstep.anytime import OpCounter

    with OpCounter(n) as counter:
        counter.start_step(1, "cpu")
        assert n(torch.tensor([[2.5]])).item() == 4.0  # u = 2 + 2.5 ≥ 4: spike, output λ
    assert counter.spikes.item() == 1.0  # counted as one event, not as λ


def _tiny(neuron="qcfs", **kw):
    torch.manual_seed(0)
    if neuron == "qcfs":
        kw["levels"] = 8
    return models.create("cnn", input_shape=(1, 8, 8), num_classes=5, neuron=neuron, theta=2.0,
                         channels=(4,), hidden=16, **kw)


def test_conversion_replaces_every_qcfs_and_leaves_the_other_layers_alone():
    ann = _tiny().eval()
    snn = convert(ann).eval()
    assert not any(isinstance(m, QCFS) for m in snn.modules())
    assert sum(isinstance(m, ConvertedIF) for m in snn.modules()) == 2
    a, s = ann.state_dict(), snn.state_dict()
    assert a.keys() == s.keys()
    for k in a:
        assert torch.equal(a[k], s[k]), k
    # the input layer's output is unchanged
    x = torch.rand(1, 3, 1, 8, 8)
    assert torch.equal(ann.features[0](x), snn.features[0](x))
    assert any(isinstance(m, QCFS) for m in ann.modules())  # the ANN itself is untouched


def test_converted_if_layer_equals_qcfs_exactly_at_T_equal_L():
    # constant input I, v(0) = λ/2, soft reset: after L steps the count is floor(L·I/λ + 1/2), clipped to
    # [0, L], so rate × λ is exactly h(I) (METHODS §6)
    lam, levels = 8.0, 8
    current = torch.linspace(-2.0, 11.0, 261)
    n = ConvertedIF(theta=lam)
    with torch.no_grad():
        rate_lam = n(current.expand(levels, -1)).mean(0)
    assert torch.allclose(rate_lam, qcfs(current, lam, levels))


def test_converted_network_rate_converges_as_T_grows():
    # As T grows the IF network tends to its limit, the ANN with L → ∞ levels (QCFS's clip), error ~1/T
    ann = _tiny().eval()
    with torch.no_grad():  # thresholds of a trained net's scale
        for m in ann.modules():
            if isinstance(m, QCFS):
                m.theta.fill_(1.5)
    snn = convert(ann).eval()
    for m in ann.modules():
        if isinstance(m, QCFS):
            m.levels = 10 ** 6
    x = torch.rand(32, 1, 8, 8)
    with torch.no_grad():
        want = ann(x.unsqueeze(0))[0]
        errs = [(snn(x.unsqueeze(0).expand(T, *x.shape)).mean(0) - want).abs().mean().item()
                for T in (16, 64, 256, 1024)]
    assert all(a > 2.5 * b for a, b in zip(errs, errs[1:])), errs


def test_unmappable_layers_are_named():
    with pytest.raises(ValueError, match="no QCFS layers"):
        check_convertible(_tiny(neuron="lif"))
    net = _tiny()
    net.features[3] = L.MaxPool2d(2)
    with pytest.raises(ValueError, match=r"'features.3' \(MaxPool2d\).*average pooling"):
        convert(net)
    net = _tiny()
    net.classifier[2] = nn.ReLU()
    with pytest.raises(ValueError, match=r"'classifier.2' \(ReLU\)"):
        convert(net)
    net = _tiny(norm="tebn", T=1)
    with pytest.raises(ValueError, match=r"'features.1' \(TEBN\)"):
        convert(net)


def test_rcs_ann_on_hand_built_inputs():
    flat = torch.ones(1, 1, 8)  # every positive input equal: max / RMS = 1
    peak = torch.zeros(1, 1, 8)
    peak[..., 0] = 4.0  # one peak: max 4, RMS sqrt(16/8) = sqrt(2) → 2·sqrt(2)
    x = torch.cat([flat, peak, -torch.ones(1, 1, 8)], 1)  # the third sample is silent (no x⁺)
    r, active = ann_ratio(x)
    assert r[0].item() == pytest.approx(1.0) and r[1].item() == pytest.approx(2 * 2 ** 0.5)
    assert active.tolist() == [True, True, False]
    rb, _ = ann_ratio(x, "batch")  # the seed code's batch-global max: 4 / RMS
    assert rb[0].item() == pytest.approx(4.0)


def test_rcs_ann_regularises_correct_samples_and_reaches_the_weights():
    net = _tiny().train()
    x, y = torch.rand(1, 6, 1, 8, 8), torch.arange(6) % 5
    reg = RCSANN(weight=1.0, reduction="mean", correct_only=False)
    with fewstep.record(net, fields=("u",)) as rec:
        logits = net(x)
    val = reg(logits, y, rec)
    by_hand = torch.stack([ann_ratio(u)[0][ann_ratio(u)[1]].mean() for u in rec.u.values()]).mean()
    assert val.item() == pytest.approx(by_hand.item(), rel=1e-5)
    val.backward()
    assert net.features[0].weight.grad.abs().sum() > 0
    # only correct samples: with labels nobody gets right, nothing is regularised
    wrong = (logits[0].argmax(-1) + 1) % 5
    assert RCSANN(weight=1.0)(logits, wrong, rec).item() == 0.0
    # RCS (for spiking neurons) refuses an ANN
    from fewstep.rcs import RCS

    with fewstep.record(net) as rec2:
        lo = net(x)
    with pytest.raises(ValueError, match="QCFS.*rcs_ann"):
        RCS()(lo, y, rec2)


def test_config_checks_for_qcfs():
    with pytest.raises(ValueError, match="data.T: 1"):
        C.from_dict({"model": {"neuron": "qcfs"}, "data": {"T": 4}})
    with pytest.raises(ValueError, match="model.levels"):
        C.from_dict({"model": {"levels": 4}})
    with pytest.raises(ValueError, match="model.neuron.*qcfs"):
        C.from_dict({"model": {"neuron": "relu"}})
    cfg = C.from_dict({"model": {"neuron": "qcfs", "levels": 4}, "data": {"T": 1},
                       "regularizer": {"name": "rcs_ann", "rcs_ann_weight": 0.01, "rcs_weight": 0.5}})
    from fewstep import regularizers as R

    (reg,) = R.build(cfg)
    assert isinstance(reg, RCSANN) and reg.weight == 0.01  # rcs_weight belongs to rcs, not rcs_ann
    assert R.options(cfg.regularizer, "rcs")["weight"] == 0.5 and "ann_weight" not in R.options(cfg.regularizer, "rcs")


def _ann_config(tmp_path, **train):
    d = {"data": {"name": "digits", "T": 1},
         "model": {"name": "mlp", "neuron": "qcfs", "theta": 4.0, "levels": 8, "options": {"hidden": [64]}},
         "train": {"epochs": 8, "batch_size": 64, "lr": 5e-3, "loss": "ce", "progress": False, **train}}
    p = tmp_path / "ann.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def test_convert_run_on_real_digits_then_eval_and_cutoff(tmp_path, capsys):
    cfg = _ann_config(tmp_path)
    assert cli(["train", str(cfg), "--out", str(tmp_path / "ann")]) == 0
    ann_acc = json.loads((tmp_path / "ann" / "metrics.json").read_text())["test_accuracy"]
    assert ann_acc > 0.9  # a QCFS ANN learns the digits
    assert cli(["convert", str(tmp_path / "ann"), "--out", str(tmp_path / "snn"), "--T", "32"]) == 0
    snn_cfg = yaml.safe_load((tmp_path / "snn" / "config.yaml").read_text())
    assert snn_cfg["model"]["neuron"] == "qcfs_if" and snn_cfg["data"]["T"] == 32
    model, c, bundle = load_run(tmp_path / "snn")
    assert sum(isinstance(m, ConvertedIF) for m in model.modules()) == 1
    capsys.readouterr()
    assert cli(["eval", str(tmp_path / "snn")]) == 0
    acc = json.loads((tmp_path / "snn" / "eval_test.json").read_text())["accuracy_per_step"]
    assert len(acc) == 32 and acc[-1] > ann_acc - 0.03  # within 3 pt of the ANN by T = 32
    assert acc[-1] > acc[0]  # and it gets there by integrating over time
    assert cli(["cutoff", str(tmp_path / "snn"), "--policy", "topk", "--max-drop", "0.01", "--repeats", "1"]) == 0
    assert (tmp_path / "snn" / "cutoff_topk.json").is_file()
    # --out holding a run is refused unless asked; converting a converted or plain-SNN run is refused
    assert cli(["convert", str(tmp_path / "ann"), "--out", str(tmp_path / "snn")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["convert", str(tmp_path / "ann"), "--out", str(tmp_path / "snn"), "--T", "8", "--overwrite"]) == 0
    assert yaml.safe_load((tmp_path / "snn" / "config.yaml").read_text())["data"]["T"] == 8
    assert cli(["convert", str(tmp_path / "snn"), "--out", str(tmp_path / "x")]) == 2
    assert "no QCFS layers" in capsys.readouterr().err
    with pytest.raises(ValueError, match="converted from an ANN"):
        Trainer(C.from_dict(snn_cfg), tmp_path / "snn", log=lambda s: None).resume()


def test_ablation_with_converted_variants_beside_a_direct_snn(tmp_path, capsys):
    d = {"data": {"name": "digits", "T": 4},
         "model": {"name": "cnn", "theta": 1.0, "options": {"channels": [8, 16], "hidden": 32}},
         "train": {"epochs": 2, "batch_size": 128, "lr": 3e-3, "progress": False}}
    cfg = tmp_path / "base.yaml"
    cfg.write_text(yaml.safe_dump(d))
    out = tmp_path / "abl"
    assert cli(["ablate", str(cfg), "--variants", "tet,qcfs,qcfs+rcs_ann", "--seeds", "1", "--out", str(out),
                "--convert-T", "16", "--variant-set", "qcfs:model.theta=4", "--variant-set",
                "qcfs+rcs_ann:model.theta=4"]) == 0
    text = capsys.readouterr().out
    assert "## ANN→SNN conversion (test, %)" in text and "| qcfs+rcs_ann |" in text
    assert "t=16" in text and "T = 4 / 16" in text
    a = json.loads((out / "qcfs" / "seed0" / "analysis.json").read_text())
    assert a["T"] == 16 and len(a["test_accuracy_per_step"]) == 16 and 0 < a["ann_test_accuracy"] <= 1
    saved = yaml.safe_load((out / "qcfs+rcs_ann" / "seed0" / "config.yaml").read_text())
    assert saved["model"]["neuron"] == "qcfs" and saved["data"]["T"] == 1
    assert saved["regularizer"]["name"] == "rcs_ann"
    log = (out / "qcfs+rcs_ann" / "seed0" / "log.csv").read_text().splitlines()[0]
    assert "train_rcs_ann" in log
    assert "--convert-T 16" in json.loads((out / "ablation.json").read_text())["command"]
