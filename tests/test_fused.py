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


def recorded_loss_grads(backend, x, reset, detach, surrogate, fields=("spikes", "u", "v")):
    """Gradients of a loss on the recorded spikes, u and v (what RCS/STR read) for x, θ and τ."""
    torch.manual_seed(0)
    n = LIF(tau=0.6, theta=0.8, reset=reset, detach_reset=detach, surrogate=surrogate, learn_theta=True,
            learn_tau=True, backend=backend)
    xi = x.clone().requires_grad_(True)
    with fewstep.record(n, fields=fields) as rec:
        s = n(xi)
    name = rec.layers[0]
    loss = (s * torch.linspace(-1, 1, s[0].numel()).view(s.shape[1:])).sum()
    got = {}
    if "u" in fields:
        got["u"] = rec.u[name]
        loss = loss + (rec.u[name].relu() ** 2).mean() * 3.0
    if "v" in fields:
        got["v"] = rec.v[name]
        loss = loss + (rec.v[name] * torch.cos(torch.arange(s.shape[0], dtype=s.dtype)).view(-1, 1, 1)).sum()
    loss.backward()
    return s, got, [xi.grad, n.theta.grad, n.tau.grad]


@pytest.mark.parametrize("surrogate", ["zif", "atan"])
@pytest.mark.parametrize("reset,detach", [("hard", False), ("hard", True), ("soft", False), ("soft", True)])
def test_recording_keeps_the_fused_path_with_equal_gradients(surrogate, reset, detach, caplog):
    """Recording membranes no longer sends the LIF to the reference loop: the fused node returns u, v is
    derived from (u, s), and gradients through both equal the reference loop's."""
    fused._reported.clear()
    x = torch.randn(7, 3, 11) * 0.9 + 0.4
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        s_f, rec_f, g_f = recorded_loss_grads("fused", x, reset, detach, surrogate)
    assert not [r for r in caplog.records if "fused LIF not used" in r.getMessage()]
    s_r, rec_r, g_r = recorded_loss_grads("reference", x, reset, detach, surrogate)
    assert torch.equal(s_f, s_r)
    for k in ("u", "v"):
        torch.testing.assert_close(rec_f[k], rec_r[k], rtol=0, atol=1e-6)
    for a, b in zip(g_r, g_f):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert g_f[1].abs() > 0 and g_f[2].abs() > 0


def test_recording_only_what_is_asked():
    """fields=("spikes",) records no membrane; asking for a field not recorded is a clear error."""
    n = LIF()
    x = torch.randn(3, 2, 4, requires_grad=True)
    with fewstep.record(n, fields=("spikes",)) as rec:
        out = n(x)
    assert torch.equal(rec.spikes[rec.layers[0]], out)
    with pytest.raises(KeyError, match="was not recorded"):
        rec.u
    with pytest.raises(ValueError, match="valid fields"):
        with fewstep.record(n, fields=("spikes", "current")):
            pass
    with pytest.raises(ValueError, match="backend"):
        LIF(backend="cuda-magic")


def test_fused_membrane_output_alone_gets_gradients():
    """A loss on the membrane output only (no gradient reaching the spikes) still back-propagates."""
    x = torch.randn(5, 2, 6, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    _, u = fused.lif_multi_step_fused(x, 1.0, 0.5, 0.0, "hard", False, fewstep.surrogate.get("zif"), return_u=True)
    u.square().sum().backward()
    n = LIF(backend="reference")
    with fewstep.record(n) as rec:
        n(xr)
    rec.u[rec.layers[0]].square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-6)


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
    # recording the membrane (regularisers) through the compiled kernels
    s_r, rec_r, g_r = recorded_loss_grads("reference", x, "soft", False, "zif")
    s_c, rec_c, g_c = recorded_loss_grads("fused", x, "soft", False, "zif")
    assert (s_r != s_c).float().mean() < 1e-3
    torch.testing.assert_close(rec_c["u"], rec_r["u"], rtol=1e-5, atol=1e-5)
    for a, b in zip(g_r, g_c):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    fused._KERNELS.clear()
