import logging

import pytest
import torch

import fewstep
from fewstep import fused
from fewstep.neurons import LIF

SURROGATES = ["zif", "sigmoid", "atan", "rectangle"]


def run(backend, x, reset, detach, surrogate, learn, dtype):
    torch.manual_seed(0)
    n = LIF(tau=0.6, theta=0.8, reset=reset, detach_reset=detach, surrogate=surrogate, learn_theta=learn,
            learn_tau=learn, backend=backend).to(dtype)
    xi = x.clone().to(dtype).requires_grad_(True)
    s = n(xi)
    w = torch.linspace(-1, 1, s[0].numel()).view(s.shape[1:]).to(dtype)
    loss = (s * w).sum() + (s.float().mean(0) ** 2).sum()  # a loss that mixes steps
    loss.backward()
    grads = [xi.grad] + ([n.theta.grad, n.tau.grad] if learn else [])
    return s, grads


@pytest.mark.parametrize("surrogate", SURROGATES)
@pytest.mark.parametrize("reset,detach", [("hard", False), ("hard", True), ("soft", False), ("soft", True)])
def test_fused_equals_reference_float32(surrogate, reset, detach):
    x = torch.randn(7, 3, 11) * 0.9 + 0.4
    s_ref, g_ref = run("reference", x, reset, detach, surrogate, True, torch.float32)
    s_fus, g_fus = run("fused", x, reset, detach, surrogate, True, torch.float32)
    assert torch.equal(s_ref, s_fus)
    for a, b in zip(g_ref, g_fus):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert g_fus[1].abs() > 0 and g_fus[2].abs() > 0  # threshold and leak really get gradients


@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_fused_equals_reference_bfloat16(reset):
    x = torch.randn(6, 4, 9) * 0.9 + 0.4
    s_ref, g_ref = run("reference", x, reset, False, "zif", False, torch.bfloat16)
    s_fus, g_fus = run("fused", x, reset, False, "zif", False, torch.bfloat16)
    assert torch.equal(s_ref, s_fus)
    torch.testing.assert_close(g_fus[0].float(), g_ref[0].float(), rtol=2e-2, atol=2e-2)


def test_fused_in_a_model_matches_reference_gradients():
    from fewstep import models

    torch.manual_seed(1)
    a = models.create("cnn", input_shape=(2, 16, 16), num_classes=5, backend="reference", theta=0.5)
    b = models.create("cnn", input_shape=(2, 16, 16), num_classes=5, backend="fused", theta=0.5)
    b.load_state_dict(a.state_dict())
    x = torch.rand(4, 3, 2, 16, 16) * 2
    for m in (a, b):
        m(x).square().mean().backward()
    for (k, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-5, msg=k)


def test_recording_falls_back_with_the_reason_logged_once(caplog):
    fused._reported.clear()
    n = LIF()
    x = torch.randn(3, 2, 4, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        for _ in range(3):
            with fewstep.record(n) as rec:
                out = n(x)
    assert rec.u[rec.layers[0]].shape == (3, 2, 4)  # membranes still recorded, through the reference loop
    msgs = [r.getMessage() for r in caplog.records if "fused LIF not used" in r.getMessage()]
    assert len(msgs) == 1 and "recorded" in msgs[0]
    assert torch.equal(out, LIF()(x))
    with pytest.raises(ValueError, match="backend"):
        LIF(backend="cuda-magic")


def test_compiled_kernels_match_reference(monkeypatch):
    """The torch.compile path (one generated loop per step) against the reference autograd loop."""
    monkeypatch.setenv("FEWSTEP_COMPILE", "1")
    fused._KERNELS.clear()
    x = torch.randn(5, 4, 300) * 0.9 + 0.4
    s_ref, g_ref = run("reference", x, "hard", False, "zif", True, torch.float32)
    s_fus, g_fus = run("fused", x, "hard", False, "zif", True, torch.float32)
    assert any(k[-1] for k in fused._KERNELS)  # the compiled kernels really ran
    assert (s_ref != s_fus).float().mean() < 1e-3  # FMA rounding may flip a spike sitting exactly on θ
    for a, b in zip(g_ref, g_fus):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    fused._KERNELS.clear()
