"""RCS and STR (METHODS §1, §3): equations on hand-built tensors, gradients through every LIF path,
config plumbing and the errors a user can hit."""

import math

import pytest
import torch

import fewstep
from fewstep import config as C
from fewstep import models, rcs, regularizers, str_reg
from fewstep.neurons import StatefulModule
from fewstep.train import Trainer, TrainingDiverged

from .test_train import quick


# ------------------------------------------------------------------------------------------------ RCS
def test_tail_has_at_least_one_step_and_no_float_surprise():
    assert rcs.tail_steps(1, 0.3) == 1  # the seed code's ⌊0.3·1⌋ = 0 fell back to all steps
    assert rcs.tail_steps(2, 0.3) == 1
    assert rcs.tail_steps(4, 0.3) == 2
    assert rcs.tail_steps(10, 0.3) == 3  # 0.3·10 is 3.0000000000000004 in floating point
    assert rcs.tail_steps(3, 1.0) == 3
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        rcs.tail_steps(4, 0.0)


def test_rcs_is_one_when_activity_is_identical_over_time():
    torch.manual_seed(0)
    s = (torch.rand(1, 3, 5, 4) > 0.5).float().expand(6, 3, 5, 4).contiguous()
    u = torch.where(s > 0, torch.full_like(s, 1.5), torch.rand(1, 3, 5, 4).expand(6, 3, 5, 4) - 0.3)
    value, active = rcs.consistency(s, u, 1.0, 0.3)
    torch.testing.assert_close(value, torch.full((3,), 1 / (1 + rcs.EPS)))
    assert active.all()


def test_rcs_is_large_when_early_activity_is_orthogonal_to_the_tail():
    T = 10
    s = torch.zeros(T, 1, 4)
    s[:9, 0, 0] = 1.0  # steps 1-9 fire on feature 0
    s[9, 0, 1] = 1.0  # the last step fires on feature 1
    u = s * 1.2  # pre-reset membrane above θ where it fired, 0 elsewhere: v = 0 everywhere
    value, _ = rcs.consistency(s, u, 1.0, beta=0.1)  # tail = the last step only
    assert value.item() == pytest.approx(1 / (0.1 + rcs.EPS), rel=1e-6)  # mean cos = 1/10
    same, _ = rcs.consistency(s, u, 1.0, beta=1.0)  # tail = all steps: target (0.9, 0.1)
    assert 1.0 < same.item() < value.item()


def test_rcs_hand_computed_with_residual_membrane_and_both_resets():
    # one sample, two features, T = 2, θ = 2. Hard reset: v = u(1 − s).
    s = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]])
    u = torch.tensor([[[2.5, 1.0]], [[1.0, -3.0]]])
    # r(1) = s + ReLU(v/θ) = (1 + 0, 0 + 0.5) = (1, 0.5); r(2) = (0.5, 0)
    r1, r2 = torch.tensor([1.0, 0.5]), torch.tensor([0.5, 0.0])
    target = r2  # β = 0.3 → one tail step
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    want = 1 / ((cos(r1, target) + cos(r2, target)) / 2 + rcs.EPS)
    got, _ = rcs.consistency(s, u, 2.0, 0.3, reset="hard")
    assert got.item() == pytest.approx(want, rel=1e-6)
    # soft reset: v = u − θ·s → r(1) = (1 + ReLU(0.5/2), 0.5) = (1.25, 0.5)
    r1s = torch.tensor([1.25, 0.5])
    want_soft = 1 / ((cos(r1s, target) + 1.0) / 2 + rcs.EPS)
    got_soft, _ = rcs.consistency(s, u, 2.0, 0.3, reset="soft")
    assert got_soft.item() == pytest.approx(want_soft, rel=1e-6)


def test_correct_mask_uses_per_step_predictions_over_the_tail():
    T, C = 4, 3
    logits = torch.zeros(T, 3, C)
    y = torch.tensor([0, 1, 2])
    logits[:, 0, 0] = 1.0  # right at every step
    logits[:, 1, 1] = 1.0
    logits[3, 1, 0] = 5.0  # wrong at the last step
    logits[2:, 2, 2] = 1.0  # wrong early, right over the tail (k = 2)
    logits[:2, 2, 0] = 1.0
    assert rcs.correct_mask(logits, y, 0.3).tolist() == [True, False, True]


def toy_layers():
    T = 4
    s = torch.zeros(T, 3, 2)
    u = torch.zeros(T, 3, 2)
    s[:, 0, 0] = 1.0  # sample 0: perfectly consistent → RCS ≈ 1
    u[:, 0, 0] = 1.5
    s[:2, 1, 0], s[2:, 1, 1] = 1.0, 1.0  # sample 1: orthogonal halves → mean cos 0.5 → RCS ≈ 2
    u[:, 1] = s[:, 1] * 1.5
    # sample 2: silent (no spike, no positive membrane) → left out
    u[:, 2] = -1.0
    return s, u


def test_reductions_mask_and_silent_samples():
    s, u = toy_layers()
    logits = torch.zeros(4, 3, 2)
    logits[..., 0] = 1.0
    y = torch.zeros(3, dtype=torch.long)  # every sample right
    layers = [(s, u, 1.0, "hard", False)]
    mx = rcs.rcs_loss(logits, y, layers, 0.3, "max").item()
    mean = rcs.rcs_loss(logits, y, layers, 0.3, "mean").item()
    assert mx == pytest.approx(1 / (0.5 + rcs.EPS), rel=1e-5)
    assert mean == pytest.approx((1 / (1 + rcs.EPS) + 1 / (0.5 + rcs.EPS)) / 2, rel=1e-5)  # silent sample out
    y_wrong = torch.tensor([0, 1, 0])  # sample 1 is wrong: only sample 0 is regularised
    assert rcs.rcs_loss(logits, y_wrong, layers, 0.3, "max").item() == pytest.approx(1 / (1 + rcs.EPS), rel=1e-5)
    none_right = rcs.rcs_loss(logits, torch.ones(3, dtype=torch.long), layers, 0.3, "max")
    assert none_right.item() == 0.0  # nothing to regularise
    all_samples = rcs.rcs_loss(logits, torch.ones(3, dtype=torch.long), layers, 0.3, "max", correct_only=False)
    assert all_samples.item() == pytest.approx(mx, rel=1e-6)
    with pytest.raises(ValueError, match=r"\['max', 'mean'\]"):
        rcs.rcs_loss(logits, y, layers, 0.3, "median")


# ------------------------------------------------------------------------------------------------ STR
def test_str_is_zero_for_a_constant_share_and_positive_otherwise():
    T = 5
    s = torch.zeros(T, 2, 4)
    s[:, :, :2] = 1.0  # two spikes per step
    u = torch.cat([torch.full((T, 2, 2), 1.5), torch.full((T, 2, 2), 0.5)], -1)
    share = str_reg.stf(s, u, 1.0)
    torch.testing.assert_close(share, torch.full((T, 2), 2 / (2 + 4.0 + str_reg.EPS)))
    for form in str_reg.FORMS:
        assert str_reg.str_term(share, form).item() == pytest.approx(0.0, abs=1e-12)
    u2 = u.clone()
    u2[0, :, 2:] = 2.5  # more membrane held back at the first step
    share2 = str_reg.stf(s, u2, 1.0)
    for form in str_reg.FORMS:
        assert str_reg.str_term(share2, form).item() > 1e-4


def test_str_hand_computed():
    # one sample, T = 2, θ = 2: STF(1) = 1 / (1 + (3 + 1)/2) = 1/3, STF(2) = 2 / (2 + (2 + 2)/2) = 1/2
    s = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    u = torch.tensor([[[3.0, 1.0]], [[2.0, 2.0]]])
    share = str_reg.stf(s, u, 2.0)
    torch.testing.assert_close(share, torch.tensor([[1 / 3], [1 / 2]]), rtol=1e-5, atol=1e-6)
    mean = (1 / 3 + 1 / 2) / 2
    assert str_reg.str_term(share).item() == pytest.approx(((1 / 3 - mean) ** 2 + (1 / 2 - mean) ** 2) / 2, rel=1e-4)
    assert str_reg.str_term(share, "tail").item() == pytest.approx((1 / 3 - 1 / 2) ** 2 / 2, rel=1e-4)


# ------------------------------------------------------------------------------------------------ gradients
REGS = [rcs.RCS(weight=1.0, correct_only=False), rcs.RCS(weight=1.0, correct_only=False, reduction="mean"),
        str_reg.STR(weight=10.0), str_reg.STR(weight=10.0, form="tail")]


def param_grads(reg, backend, sink, reset="hard", learn=False):
    torch.manual_seed(0)
    net = models.create("cnn", input_shape=(2, 12, 12), num_classes=5, channels=(6, 8), hidden=16, theta=0.5,
                        reset=reset, backend=backend, learn_theta=learn, learn_tau=learn)
    x = torch.rand(4, 7, 2, 12, 12) * 2
    y = torch.randint(0, 5, (7,))
    with fewstep.record(net, fields=reg.fields, grad_sink=sink) as rec:
        out = net(x)
    loss = reg(out, y, rec)
    loss.backward()
    return loss.item(), {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("reg", REGS, ids=repr)
@pytest.mark.parametrize("reset,learn", [("hard", False), ("soft", False), ("hard", True)])
def test_gradients_reach_the_weights_equally_through_every_lif_path(reg, reset, learn, monkeypatch):
    """Reference step loop, fused node with dense gradients, fused node with the gradient sink
    (with learnable θ and τ, whose gradients the sink's row correction must not miss)."""
    from fewstep import fused

    used = []
    for name in ("add_rows", "add_dense"):
        real = getattr(fused.GradSink, name)
        monkeypatch.setattr(fused.GradSink, name, lambda self, *a, _r=real, _n=name: (used.append(_n), _r(self, *a)))
    ref_loss, ref = param_grads(reg, "reference", False, reset, learn)
    if learn:
        assert any(k.endswith("theta") for k in ref) and any(k.endswith("tau") for k in ref)
    for sink in (False, True):
        used.clear()
        loss, got = param_grads(reg, "fused", sink, reset, learn)
        assert len(used) == (3 if sink else 0), used  # one contribution per spiking layer through the sink
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        assert set(got) == set(ref) and any(k.startswith("features.0") for k in got)  # reaches the first conv
        for k in ref:
            scale = float(ref[k].abs().max()) + 1e-12
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=2e-5 * scale, msg=k)
        assert any(float(g.abs().max()) > 0 for g in got.values())


def test_rcs_gradient_equals_autograd_through_the_whole_batch():
    """Rerunning autograd on the selected samples only gives the gradient of the full definition."""
    torch.manual_seed(3)
    s = (torch.rand(5, 6, 10) > 0.6).float().requires_grad_(True)
    u = (torch.randn(5, 6, 10) + 0.3).requires_grad_(True)
    mask = torch.tensor([True, False, True, True, False, True])
    for reduction in ("max", "mean"):
        fast = rcs.layer_term(s, u, 1.0, mask, 0.3, reduction)
        ga = torch.autograd.grad(fast, (s, u))
        vals, active = rcs.consistency(s, u, 1.0, 0.3)
        m = (mask & active).float()
        slow = (m * vals).max() if reduction == "max" else (m * vals).sum() / m.sum()
        gb = torch.autograd.grad(slow, (s, u))
        assert fast.item() == pytest.approx(slow.item(), rel=1e-6)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------ plumbing
def test_config_names_and_options_are_checked():
    cfg = C.load(None, ["regularizer.name=rcs+str", "regularizer.rcs_weight=0.01", "regularizer.str_form=tail"])
    regs = regularizers.from_config(cfg.regularizer)
    assert [r.name for r in regs] == ["rcs", "str"] and regs[0].weight == 0.01 and regs[1].form == "tail"
    assert regularizers.from_config(C.load(None).regularizer) == []
    with pytest.raises(ValueError, match=r"valid names: none, rcs, rcs_ann, str"):
        C.load(None, ["regularizer.name=rcs+l2"])
    with pytest.raises(ValueError, match=r"regularizer.rcs_gamma.*valid keys in 'regularizer'.*rcs_beta"):
        C.load(None, ["regularizer.rcs_gamma=2"])
    with pytest.raises(ValueError, match=r"'regularizer.rcs_reduction' must be one of \['max', 'mean'\]"):
        C.load(None, ["regularizer.rcs_reduction=median"])
    with pytest.raises(ValueError, match=r"'model.norm' must be one of \['bn', 'tebn'\]"):
        C.load(None, ["model.norm=layernorm"])
    with pytest.raises(ValueError, match=r"'regularizer.rcs_weight' = -1.0 is out of range: it must be >= 0"):
        C.load(None, ["regularizer.name=rcs", "regularizer.rcs_weight=-1"])
    with pytest.raises(ValueError, match="rcs weight must be >= 0"):
        rcs.RCS(weight=-1)  # the classes check too, for use without a config
    with pytest.raises(ValueError, match=r"str form must be one of \['share', 'tail', 'log'\]"):
        str_reg.STR(form="variance")


def test_each_term_is_logged_and_saved_in_the_run_config(tmp_path):
    import csv

    import yaml

    base = quick(tmp_path, epochs=2).to_dict()
    base["regularizer"] = {"name": "rcs+str", "rcs_weight": 0.01}
    t = Trainer(C.from_dict(base), tmp_path / "r", log=lambda s: None)
    t.fit()
    rows = list(csv.DictReader(open(tmp_path / "r" / "log.csv")))
    assert {"train_loss", "train_task_loss", "train_rcs", "train_str"} <= set(rows[0])
    for row in rows:
        total = float(row["train_task_loss"]) + float(row["train_rcs"]) + float(row["train_str"])
        assert float(row["train_loss"]) == pytest.approx(total, rel=1e-5)
        assert float(row["train_rcs"]) > 0.0
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["regularizer"]["name"] == "rcs+str" and saved["regularizer"]["rcs_weight"] == 0.01


@pytest.mark.parametrize("name", ["rcs", "str"])
def test_weight_zero_reproduces_plain_training_exactly(tmp_path, name):
    plain = Trainer(quick(tmp_path, epochs=2), tmp_path / "plain", log=lambda s: None)
    plain.fit()
    d = quick(tmp_path, epochs=2).to_dict()
    d["regularizer"] = {"name": name, f"{name}_weight": 0.0}
    reg = Trainer(C.from_dict(d), tmp_path / "reg", log=lambda s: None)
    reg.fit()
    assert reg.regularizers and reg.regularizers[0].weight == 0.0  # it really ran, recording and all
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, reg.model.state_dict()[k]), k


class NoSpikes(models.SNN):
    def __init__(self):
        super().__init__((1, 8, 8), 10)
        self.fc = fewstep.layers.Linear(64, 10)

    def body(self, x):
        return self.fc(x.flatten(2))


class SilentNeuron(StatefulModule):
    """A custom neuron that forgets to record."""

    def forward(self, x):
        return (x > 0).float()


class WithSilent(models.SNN):
    def __init__(self):
        super().__init__((1, 8, 8), 10)
        self.fc1 = fewstep.layers.Linear(64, 16)
        self.lif = fewstep.LIF()
        self.fc2 = fewstep.layers.Linear(16, 16)
        self.odd = SilentNeuron()
        self.out = fewstep.layers.Linear(16, 10)

    def body(self, x):
        return self.out(self.odd(self.fc2(self.lif(self.fc1(x.flatten(2))))))


@pytest.mark.parametrize("reg", [rcs.RCS(), str_reg.STR()], ids=repr)
def test_no_spiking_layer_or_a_silent_neuron_is_an_error_not_a_zero_loss(reg):
    x, y = torch.rand(3, 4, 1, 8, 8), torch.randint(0, 10, (4,))
    net = NoSpikes()
    with fewstep.record(net, fields=reg.fields) as rec:
        out = net(x)
    with pytest.raises(ValueError, match="needs spiking layers, but the model has none"):
        reg(out, y, rec)
    net = WithSilent()
    with fewstep.record(net, fields=reg.fields) as rec:
        out = net(x)
    with pytest.raises(ValueError, match=r"odd \(SilentNeuron\) recorded nothing"):
        reg(out, y, rec)


def test_nan_regularizer_term_stops_training_naming_it(tmp_path):
    class Diverging(str_reg.STR):
        calls = 0

        def __call__(self, logits, y, rec):
            Diverging.calls += 1
            term = super().__call__(logits, y, rec)
            return term * math.nan if Diverging.calls > 12 else term  # the term diverges in epoch 2

    t = Trainer(quick(tmp_path, epochs=3), tmp_path / "n", regularizers=[Diverging()], log=lambda s: None)
    with pytest.raises(TrainingDiverged, match=r"regularizer term 'str' became nan at epoch 2, step \d.*Last good "
                                               r"checkpoint: .*after epoch 1.*smaller regularizer weight"):
        t.fit()
    with pytest.raises(ValueError, match=r"'regularizer.str_weight' must be a number, got NaN"):
        C.load(None, ["regularizer.name=str", "regularizer.str_weight=.nan"])
