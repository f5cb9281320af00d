"""TRT (METHODS §4, fewstep's reading): exact reversal, the terms by hand, a plain saved model."""

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F

import fewstep
from fewstep import config as C
from fewstep import models, trt
from fewstep.cli import main as cli
from fewstep.losses import mean_ce, tet
from fewstep.train import Trainer, load_run

from .test_models import SMALL
from .test_train import quick


def attached(name="cnn", T=4, kind="static", base=mean_ce, **opts):
    torch.manual_seed(0)
    net = models.create(name, num_classes=5, theta=0.3, **SMALL[name]).train()
    reg = trt.TRT(**opts).setup(model=net, T=T, kind=kind, base_loss=base)
    return net, reg


def test_static_reversal_flips_the_chosen_layers_spikes_exactly():
    for at, before in ((None, None), ("features.6", "features.2")):
        net, reg = attached(reverse_at=at)
        x = torch.rand(4, 3, 2, 34, 34) * 2
        seen = {}
        nxt = dict(net.named_modules())["features.3" if at is None else "features.7"]  # the layer after it
        hook = nxt.register_forward_pre_hook(lambda m, i: seen.setdefault("main" if "main" not in seen else "rev",
                                                                          i[0].detach().clone()))
        with fewstep.record(net, fields=("spikes",)) as rec:
            net(x)
        reg.reversed_branch(x)
        hook.remove()
        layer = at or "features.2"
        assert reg.reverse_at == layer and reg.static
        assert torch.equal(seen["main"], rec.spikes[layer])
        assert torch.equal(seen["rev"], rec.spikes[layer].flip(0))  # the reversed branch reads flipped spikes
        if before is not None:  # layers before the cut see the original spikes in both branches
            with fewstep.record(net, fields=("spikes",)) as rec2:
                reg.reversed_branch(x)
            assert torch.equal(rec2.spikes[before], rec.spikes[before])


def test_event_input_is_reversed_in_time():
    net, reg = attached(kind="frames")
    assert not reg.static
    x = torch.rand(4, 3, 2, 34, 34)
    seen = []
    hook = net.features[0].register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().clone()))
    reg.reversed_branch(x)
    hook.remove()
    assert torch.equal(seen[0], x.flip(0))


def test_terms_match_a_hand_computation():
    net, reg = attached(base=tet, lam=0.7, tau=3.0, reversed_weight=0.5, star_weight=0.25)
    x, y = torch.rand(4, 6, 2, 34, 34) * 2, torch.randint(0, 5, (6,))
    feats = []
    hook = net.classifier_head().register_forward_pre_hook(lambda m, i: feats.append(i[0]))
    logits = net(x)
    with fewstep.record(net, fields=()) as rec:
        pass
    rec.input = x
    terms = reg(logits, y, rec)
    hook.remove()
    f_o, f_r = feats[0], feats[1]
    out_r = net.classifier_head()(f_r)
    z_o, z_r = logits.mean(0), out_r.mean(0)
    p, q = F.softmax(z_o / 3, -1), F.softmax(z_r / 3, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean() * 9
    star = F.cross_entropy(reg.head_star(f_o.mean(0) * f_r.mean(0)), y)
    torch.testing.assert_close(terms["consistency"], 0.7 * kl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["star"], 0.25 * star, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["reversed"], 0.5 * tet(out_r, y), rtol=1e-5, atol=1e-7)


def test_consistency_divergences_by_hand():
    a = torch.tensor([[2.0, 0.0, -1.0]])
    b = torch.tensor([[0.5, 1.0, 0.0]])
    p, q = F.softmax(a / 2, -1), F.softmax(b / 2, -1)
    kl_pq = float((p * (p / q).log()).sum())
    kl_qp = float((q * (q / p).log()).sum())
    assert trt.consistency(a, b, "kl", 2.0).item() == pytest.approx(4 * kl_pq, rel=1e-5)
    assert trt.consistency(a, b, "sym_kl", 2.0).item() == pytest.approx(4 * (kl_pq + kl_qp) / 2, rel=1e-5)
    assert trt.consistency(a, b, "mse").item() == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-6)
    assert trt.consistency(a, a, "kl").item() == pytest.approx(0.0, abs=1e-7)


def trt_cfg(tmp_path, epochs=2, **trt_opts):
    d = quick(tmp_path, epochs=epochs).to_dict()
    d["trt"] = {"enabled": True, **trt_opts}
    return C.from_dict(d)


def test_every_extra_weight_zero_reproduces_plain_training_exactly(tmp_path):
    plain = Trainer(quick(tmp_path, epochs=2), tmp_path / "plain", log=lambda s: None)
    plain.fit()
    zero = Trainer(trt_cfg(tmp_path, lam=0, reversed_weight=0, star_weight=0), tmp_path / "zero", log=lambda s: None)
    zero.fit()
    assert zero.regularizers and isinstance(zero.regularizers[0], trt.TRT)
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, zero.model.state_dict()[k]), k


@pytest.mark.parametrize("share_head,loss", [(True, "tet"), (False, "ce")])
def test_saved_model_is_the_plain_model_and_resumes_with_its_heads(tmp_path, share_head, loss, caplog):
    cfg = trt_cfg(tmp_path, epochs=3, share_head=share_head)
    cfg.train.loss = loss
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        full = Trainer(cfg, tmp_path / "full", log=lambda s: None)
        full.fit()
    assert not [r for r in caplog.records if "fused LIF not used" in r.getMessage()]  # the fused path throughout
    ckpt = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    heads = ckpt["regularizers"]["trt"]
    assert ("head_rev.weight" in heads) is (not share_head) and "head_star.weight" in heads
    net, _, bundle = load_run(tmp_path / "full", weights="last")
    plain = models.create("cnn", input_shape=(1, 8, 8), num_classes=10, channels=(8, 16), hidden=32)
    assert set(net.state_dict()) == set(plain.state_dict())  # no training heads in the model
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())
    x = torch.rand(3, 5, 1, 8, 8)
    full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), full.model(x))  # the trained trunk's logits
    # interrupted after one epoch and resumed: the heads come back, so the weights match exactly
    part = Trainer(cfg, tmp_path / "part", log=lambda s: None)
    part.fit(stop_after=1)
    resumed = Trainer(cfg, tmp_path / "part", log=lambda s: None)
    resumed.fit()
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for k, v in full.regularizers[0].state_dict().items():
        assert torch.equal(v, resumed.regularizers[0].state_dict()[k]), k


def test_a_trt_run_goes_through_eval_cutoff_and_tradeoff(tmp_path, capsys):
    import yaml

    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump(trt_cfg(tmp_path, epochs=2).to_dict()))
    run = tmp_path / "run"
    assert cli(["train", str(cfgfile), "--out", str(run)]) == 0
    assert cli(["eval", str(run), "--split", "val"]) == 0
    assert cli(["cutoff", str(run), "--policy", "softmax", "--epsilon", "0.1", "--repeats", "1"]) == 0
    assert cli(["tradeoff", str(run)]) == 0
    assert json.loads((run / "cutoff_softmax.json").read_text())["matches_simulation"]
    log = (run / "log.csv").read_text().splitlines()[0]
    assert "train_trt_reversed" in log and "train_trt_star" in log and "train_trt_consistency" in log


def test_bad_input_names_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"reverse_at 'features.0' is not a spiking layer of model 'cnn'; valid "
                                         r"names: features.2, features.6, classifier.2"):
        attached(reverse_at="features.0")
    with pytest.raises(ValueError, match="needs T >= 2; this run has T = 1: nothing to reverse"):
        attached(T=1)
    with pytest.raises(ValueError, match=r"trt.enabled needs data.T >= 2.*nothing to reverse"):
        C.load(None, ["trt.enabled=true", "data.T=1"])

    class Plain(torch.nn.Module):
        model_name = "myconvnet"

    with pytest.raises(ValueError, match="stem/trunk/head interface.*model 'myconvnet'"):
        trt.TRT().setup(model=Plain(), T=4, kind="static", base_loss=mean_ce)
    with pytest.raises(ValueError, match=r"consistency must be one of \['kl', 'sym_kl', 'mse'\]"):
        trt.TRT(consistency="js")
    with pytest.raises(ValueError, match=r"'trt.tau' = 0.0 is out of range"):
        C.load(None, ["trt.tau=0"])
    assert math.isfinite(trt.TRT().tau)
