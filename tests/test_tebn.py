"""TEBN (METHODS §7): joint BatchNorm over (T, N, H, W) followed by a learnable per-step scale."""

import pytest
import torch

import fewstep
from fewstep import anytime as at
from fewstep import config as C
from fewstep import cutoff as cf
from fewstep import layers as L
from fewstep import models
from fewstep.train import Trainer, load_run

from .test_anytime import spread_policy
from .test_models import SMALL
from .test_train import quick

BN_MODELS = sorted(n for n in SMALL if n != "mlp" and not n.startswith("general12"))


def pair(T=3, c=4):
    torch.manual_seed(0)
    tebn, bn = L.TEBN(c, T), L.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    tebn.bn.load_state_dict(bn.state_dict())
    return tebn, bn


def test_tebn_equals_batchnorm_when_every_scale_is_one():
    tebn, bn = pair()
    x = torch.randn(3, 5, 4, 6, 6) * 2 + 1
    torch.testing.assert_close(tebn(x), bn(x))  # training: joint statistics over T·N·H·W
    torch.testing.assert_close(tebn.bn.running_mean, bn.running_mean)
    tebn.eval(), bn.eval()
    torch.testing.assert_close(tebn(x), bn(x))
    fewstep.set_step_mode(tebn, "s")
    torch.testing.assert_close(torch.stack([tebn(f) for f in x]), bn(x))


def test_tebn_scales_each_step_by_hand():
    tebn, bn = pair()
    with torch.no_grad():
        tebn.p.copy_(torch.tensor([0.5, 2.0, -1.0]))
    x = torch.randn(3, 5, 4, 6, 6)
    want = bn(x) * torch.tensor([0.5, 2.0, -1.0]).view(3, 1, 1, 1, 1)
    torch.testing.assert_close(tebn(x), want)
    out = tebn(x)
    out[1].sum().backward()
    assert tebn.p.grad[0] == 0 and tebn.p.grad[2] == 0 and tebn.p.grad[1] != 0
    assert "p" in dict(tebn.named_parameters()) and not any("step" in k for k in tebn.state_dict())


def test_tebn_scales_in_place_at_inference_only_what_it_owns():
    """Without autograd p·BN(x) is written over BN's own output (a multi-step activation is large, and a fresh
    buffer costs more than the multiply); the input, and an output a hook on the BatchNorm kept, stay as they were."""
    tebn, bn = pair()
    p = torch.tensor([0.5, 2.0, -1.0])
    with torch.no_grad():
        tebn.p.copy_(p)
    tebn.eval(), bn.eval()
    x = torch.randn(3, 5, 4, 6, 6)
    x0 = x.clone()
    want = bn(x) * p.view(3, 1, 1, 1, 1)
    made = []
    forward = tebn.bn.forward
    tebn.bn.forward = lambda t: made.append(forward(t)) or made[-1]  # not a hook: sees BN's output buffer
    with torch.no_grad():
        out = tebn(x)
    torch.testing.assert_close(out, want)
    assert out.data_ptr() == made[-1].data_ptr()  # in place: no second activation-sized buffer
    assert torch.equal(x, x0)
    del tebn.bn.forward
    kept = []
    tebn.bn.register_forward_hook(lambda m, i, o: kept.append(o))
    with torch.no_grad():
        out = tebn(x)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(kept[-1].unflatten(0, (3, 5)), bn(x))  # the hook's tensor is BN's, unscaled
    fewstep.set_step_mode(tebn, "s")
    with torch.no_grad():
        steps = torch.stack([tebn(f) for f in x])
    torch.testing.assert_close(steps, want)
    assert torch.equal(x, x0)


def test_tebn_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs the number of timesteps"):
        L.TEBN(4, None)
    tebn = L.TEBN(4, 2)
    with pytest.raises(ValueError, match="built for T = 2 steps but the input has T = 3"):
        tebn(torch.randn(3, 2, 4, 5, 5))
    tebn.eval()
    fewstep.set_step_mode(tebn, "s")
    tebn(torch.randn(2, 4, 5, 5))
    tebn(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="built for T = 2 steps; a sample is at step 3"):
        tebn(torch.randn(2, 4, 5, 5))
    with pytest.raises(ValueError, match="no BatchNorm layers, so norm 'tebn' does not apply"):
        models.create("mlp", norm="tebn", T=3)
    with pytest.raises(ValueError, match="norm 'tebn' needs T"):
        models.create("cnn", norm="tebn")
    with pytest.raises(ValueError, match="valid names: bn, tebn"):
        models.create("cnn", norm="groupnorm", T=3)


@pytest.mark.parametrize("name", BN_MODELS)
def test_every_batchnorm_model_takes_tebn_streams_and_exits_early_exactly(name):
    torch.manual_seed(0)
    net = models.create(name, num_classes=5, theta=0.2, norm="tebn", T=4, **SMALL[name])
    plain = models.create(name, num_classes=5, theta=0.2, **SMALL[name])
    n_tebn = sum(isinstance(m, L.TEBN) for m in net.modules())
    assert n_tebn == sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules()) > 0
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, L.TEBN):
                m.p.uniform_(0.6, 1.4)  # non-trivial per-step scales
        for _ in range(3):
            net(torch.rand(4, 6, *net.input_shape) * 2)
    net.eval()
    x = torch.rand(4, 9, *net.input_shape) * 2
    with torch.no_grad():
        ref = net(x)
    fewstep.set_step_mode(net, "s")
    with torch.no_grad():
        stream = torch.stack([net(f) for f in x])
    fewstep.set_step_mode(net, "m")
    torch.testing.assert_close(stream, ref, rtol=1e-5, atol=1e-5)
    Y = cf.running(ref)
    pol = spread_policy(Y)
    sim = cf.simulate(pol, Y)
    for max_batch in (None, 3):  # continuous batching: samples at different steps share a batch
        real = at.early_exit(net, x, pol, max_batch=max_batch)
        assert real.exit_step.tolist() == sim.exit_step.tolist()
        assert real.prediction.tolist() == sim.prediction.tolist()


def test_tebn_from_the_config_trains_saves_and_reloads(tmp_path):
    d = quick(tmp_path, epochs=4).to_dict()  # plain BatchNorm reaches ~0.49 with this budget
    d["model"]["norm"] = "tebn"
    m = Trainer(C.from_dict(d), tmp_path / "t", log=lambda s: None).fit()
    assert m["accuracy_per_step"][-1] > 0.3
    net, cfg, _ = load_run(tmp_path / "t")
    scales = [p for k, p in net.named_parameters() if k.endswith(".p")]
    assert cfg.model.norm == "tebn" and len(scales) == 2 and all(p.numel() == 3 for p in scales)
    assert any(not torch.equal(p, torch.ones(3)) for p in scales)  # the scales were trained
