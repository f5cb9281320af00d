import pickle

import pytest
import torch

import fewstep
from fewstep import surrogate as S
from fewstep.neurons import IF, LIF, LIFParameters, lif_multi_step, lif_step


def run(neuron, xs):
    out = neuron(torch.tensor(xs, dtype=torch.float32).view(-1, 1))
    return out.view(-1).tolist()


def test_lif_hard_reset_hand_computed():
    n = LIF(tau=0.5, theta=1.0, reset="hard")
    with fewstep.record(n) as rec:
        s = run(n, [0.6, 0.6, 0.6, 1.5, 0.2])
    assert s == [0, 0, 1, 1, 0]
    assert rec.u[rec.layers[0]].view(-1).tolist() == pytest.approx([0.6, 0.9, 1.05, 1.5, 0.2])
    assert rec.v[rec.layers[0]].view(-1).tolist() == pytest.approx([0.6, 0.9, 0.0, 0.0, 0.2])


def test_lif_soft_reset_hand_computed():
    n = LIF(tau=0.5, theta=1.0, reset="soft")
    with fewstep.record(n) as rec:
        s = run(n, [0.6, 0.6, 0.6, 1.5, 0.2])
    assert s == [0, 0, 1, 1, 0]
    assert rec.u[rec.layers[0]].view(-1).tolist() == pytest.approx([0.6, 0.9, 1.05, 1.525, 0.4625], abs=1e-6)
    assert rec.v[rec.layers[0]].view(-1).tolist() == pytest.approx([0.6, 0.9, 0.05, 0.525, 0.4625], abs=1e-6)


def test_if_and_initial_membrane():
    assert run(IF(theta=1.0, reset="hard"), [0.6, 0.6, 0.6, 0.6]) == [0, 1, 0, 1]
    soft = IF(theta=1.0, reset="soft")
    with fewstep.record(soft) as rec:
        assert run(soft, [0.6, 0.6, 0.6]) == [0, 1, 0]
    assert rec.v[rec.layers[0]].view(-1).tolist() == pytest.approx([0.6, 0.2, 0.8])
    # v0 = 0.5 (QCFS-style half threshold): the first input of 0.5 fires at once
    assert run(IF(theta=1.0, v0=0.5), [0.5, 0.1]) == [1, 0]


def test_functional_core_matches_module():
    x = torch.randn(6, 3, 5)
    p = LIFParameters(tau=0.7, theta=0.8, reset="soft")
    s_fn, state = lif_multi_step(x, None, p)
    mod = LIF(tau=0.7, theta=0.8, reset="soft")
    assert torch.equal(s_fn, mod(x))
    # step by step with explicit state
    st = None
    for t in range(6):
        s, st = lif_step(x[t], st, p)
        assert torch.equal(s, s_fn[t])
    assert torch.equal(st.v, state.v)


@pytest.mark.parametrize(
    "name,kw,formula",
    [
        ("zif", {"gamma": 1.0}, lambda x: (1 - x.abs()).clamp(min=0)),
        ("triangle", {"gamma": 0.5}, lambda x: 4 * (0.5 - x.abs()).clamp(min=0)),
        ("sigmoid", {"alpha": 4.0}, lambda x: 4 * torch.sigmoid(4 * x) * (1 - torch.sigmoid(4 * x))),
        ("atan", {"alpha": 2.0}, lambda x: 1 / (1 + (torch.pi * x) ** 2)),
        ("rectangle", {"width": 1.0}, lambda x: (x.abs() < 0.5).float()),
    ],
)
def test_surrogate_gradients_match_formulas(name, kw, formula):
    x = torch.linspace(-2, 2, 81, requires_grad=True)
    s = S.get(name, **kw)(x)
    assert torch.equal(s, (x >= 0).float())
    s.sum().backward()
    torch.testing.assert_close(x.grad, formula(x.detach()))


def test_bptt_gradient_hand_computed_and_detach_reset():
    # u1 = x1 = 0.8 (no spike, g(-0.2) = 0.8); u2 = 0.5*0.8 + 0.7 = 1.1, g(0.1) = 0.9 (triangle, gamma 1)
    for detach, expected in [(False, 0.9 * 0.5 * (1 - 1.0 * 0.8)), (True, 0.9 * 0.5)]:
        x = torch.tensor([[0.8], [0.7]], requires_grad=True)
        s = LIF(tau=0.5, theta=1.0, reset="soft", detach_reset=detach)(x)
        s[1].sum().backward()
        assert x.grad[0].item() == pytest.approx(expected)
        assert x.grad[1].item() == pytest.approx(0.9)


def test_learnable_threshold_gets_surrogate_gradient():
    n = LIF(theta=1.0, learn_theta=True)
    assert [k for k in n.state_dict()] == ["theta"]
    x = torch.tensor([[1.2, 0.7]])
    n(x).sum().backward()
    # ds/dtheta = -g(x - theta) = -(0.8 + 0.7)
    assert n.theta.grad.item() == pytest.approx(-1.5)


def test_state_never_in_state_dict_and_streaming_equals_multistep():
    n = LIF(reset="soft")
    x = torch.randn(7, 4, 3, 5, 5)
    m_out = n(x)
    assert n.state_dict() == {}
    fewstep.set_step_mode(n, "s")
    s_out = torch.stack([n(f) for f in x])
    assert n.v is not None and "v" not in n.state_dict()
    assert torch.equal(m_out, s_out)


def test_batches_of_different_sizes_need_no_reset():
    n = LIF()
    a, b = torch.randn(5, 3, 8), torch.randn(5, 7, 8) + 0.5
    ref = LIF()(b)
    n(a)
    assert torch.equal(n(b), ref)  # nothing leaked from the first batch


def test_streaming_shape_change_requires_reset():
    n = LIF(step_mode="s")
    n(torch.randn(3, 4))
    with pytest.raises(ValueError, match="fewstep.reset"):
        n(torch.randn(5, 4))
    fewstep.reset(n)
    assert n(torch.randn(5, 4)).shape == (5, 4)


def test_compact_keeps_rows():
    n = LIF(step_mode="s")
    x = torch.randn(4, 3)
    n(x)
    v = n.v.clone()
    fewstep.compact(n, torch.tensor([0, 2]))
    assert torch.equal(n.v, v[[0, 2]])


def test_refill_gives_fresh_state_in_place_to_the_named_rows():
    from fewstep.neurons import refill

    n = LIF(tau=0.5, theta=10.0, v0=0.25, step_mode="s")
    n(torch.ones(3, 2))  # u = 0.5·0.25 + 1 = 1.125 everywhere, below θ: kept
    before = n.v
    refill(n, torch.tensor([1]))
    assert n.v is before  # in place: the other rows do not move
    assert torch.equal(n.v, torch.tensor([[1.125, 1.125], [0.25, 0.25], [1.125, 1.125]]))
    n(torch.zeros(3, 2))  # the refilled row decays from v0: 0.5·0.25
    assert torch.equal(n.v[:, 0], torch.tensor([0.5625, 0.125, 0.5625]))


def test_modules_pickle_and_bad_names():
    n = LIF(surrogate="sigmoid")
    n2 = pickle.loads(pickle.dumps(n))
    x = torch.randn(3, 2, 4)
    assert torch.equal(n(x), n2(x))
    with pytest.raises(ValueError, match="valid names: atan, rectangle, sigmoid, triangle, zif"):
        S.get("relu")
    with pytest.raises(ValueError, match="step_mode"):
        LIF(step_mode="x")
    with pytest.raises(ValueError, match="reset"):
        LIF(reset="zero")


def test_recorder_costs_nothing_when_unused_and_detaches():
    n = LIF()
    x = torch.randn(3, 2, 4, requires_grad=True)
    with fewstep.record(n) as rec:
        n(x)
    assert rec.spikes[rec.layers[0]].requires_grad
    assert n._recorder is None
    with fewstep.record(n, detach=True) as rec:
        n(x)
    assert not rec.spikes[rec.layers[0]].requires_grad
    fewstep.set_step_mode(n, "s")
    with fewstep.record(n) as rec:
        for f in x:
            n(f)
    assert rec.spikes[rec.layers[0]].shape == (3, 2, 4)


@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_inference_fast_path_is_bit_identical(reset):
    x = torch.randn(12, 64, 33) * 1.5
    n = LIF(tau=0.6, theta=0.9, reset=reset)
    with fewstep.record(n) as rec:
        ref = n(x)  # grad mode: surrogate path
    with torch.no_grad(), fewstep.record(n) as rec2:
        fast = n(x)
    assert torch.equal(ref, fast)
    for f in ("u", "v"):
        assert torch.equal(getattr(rec, f)[rec.layers[0]], getattr(rec2, f)[rec2.layers[0]])


@pytest.mark.parametrize("reset,tau,theta,v0,learn", [("hard", 0.5, 1.0, 0.0, False), ("soft", 0.7, 0.8, 0.0, False),
                                                      ("hard", 0.3, 1.2, 0.4, False), ("soft", 1.0, 2.0, 1.0, True)])
def test_inference_step_without_recorder_equals_the_autograd_step_and_keeps_channels_last(reset, tau, theta, v0, learn):
    # no recorder: the reset happens in place on u; every spike and membrane must still equal the autograd step
    torch.manual_seed(0)
    x = torch.randn(6, 5, 4, 7, 7) * 1.5
    ref = LIF(tau, theta, v0, reset, learn_theta=learn)
    fast = LIF(tau, theta, v0, reset, learn_theta=learn)
    y_ref = ref(x)  # grad mode
    with torch.no_grad():
        y_m = fast(x)
    assert torch.equal(y_ref, y_m.detach())
    fewstep.set_step_mode(ref, "s")
    fewstep.set_step_mode(fast, "s")
    for t in range(6):
        frame = x[t].contiguous(memory_format=torch.channels_last)
        s_ref = ref(frame)
        with torch.no_grad():
            s = fast(frame)
        assert torch.equal(s_ref, s) and torch.equal(s, y_ref[t])
        assert torch.equal(ref.v, fast.v)
        assert s.is_contiguous(memory_format=torch.channels_last)
        assert fast.v.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # multi-step on a channels-last [T·N] input unflattened to [T, N, ...]
        flat = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (6, 5))
        fewstep.set_step_mode(fast, "m")
        out = fast(flat)
    assert torch.equal(out, y_ref.detach()) and out[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("tau", [0.5, 0.25, 1.0, 2.0 ** -7, 0.4, 0.9])
def test_inference_charge_rounds_like_the_product_and_the_sum(tau):
    # the fused add (powers of two) and the two passes (others) both give exactly fl(fl(τ·v) + x)
    from fewstep.neurons import LIFParameters, _charge

    torch.manual_seed(1)
    x = torch.randn(200_003) * torch.logspace(-6, 6, 200_003)  # magnitudes where a fused multiply-add differs
    v = torch.randn(200_003) * torch.logspace(6, -6, 200_003)
    with torch.no_grad():
        u = _charge(x, v, LIFParameters(tau=tau))
    assert torch.equal(u, tau * v + x)


def test_shrink_moves_the_last_rows_into_the_freed_ones():
    from fewstep.neurons import shrink

    n = LIF(tau=0.5, theta=100.0, step_mode="s")
    with torch.no_grad():
        n(torch.arange(6, dtype=torch.float32).view(6, 1).repeat(1, 3))  # row i holds i
    shrink(n, torch.tensor([1]), torch.tensor([4]), 4)  # rows 1 and 5 leave: row 4 moves into row 1
    assert n.v[:, 0].tolist() == [0.0, 4.0, 2.0, 3.0]
    shrink(n, torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long), 3)  # the last row leaves
    assert n.v[:, 0].tolist() == [0.0, 4.0, 2.0]
    m = LIF(tau=0.5, theta=100.0, step_mode="s")  # more than 16 rows take the indexed copy
    with torch.no_grad():
        m(torch.arange(40, dtype=torch.float32).view(40, 1))
    shrink(m, torch.arange(20), torch.arange(20, 40), 20)
    assert m.v[:, 0].tolist() == [float(i) for i in range(20, 40)]


def test_grown_and_refilled_rows_keep_the_state_layout_and_fresh_value():
    n = LIF(tau=0.5, theta=100.0, v0=0.25, step_mode="s")
    with torch.no_grad():
        n(torch.ones(4, 3, 5, 5).contiguous(memory_format=torch.channels_last))
    n.compact(torch.tensor([0, 3]))
    n.grow(2)  # torch.cat of a channels-last state and NCHW rows would give NCHW
    assert n.v.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(n.v[2:], torch.full((2, 3, 5, 5), 0.25))
    n.v[2:] = 7.0
    fewstep.refill(n, torch.tensor([3]))
    assert torch.equal(n.v[3], torch.full((3, 5, 5), 0.25)) and torch.equal(n.v[2], torch.full((3, 5, 5), 7.0))
    n.v[:] = 7.0
    fewstep.refill(n, torch.tensor([3, 0, 1]))  # runs of adjacent rows, in any order
    assert n.v[:, 0, 0, 0].tolist() == [0.25, 0.25, 7.0, 0.25]


def test_refill_honours_a_fresh_override():
    # a neuron whose fresh state is not one constant keeps its own `fresh` on refill (the documented hook)
    from fewstep.neurons import StatefulModule

    class Ramp(StatefulModule):
        _state_names = ("v",)

        def fresh(self, name, like):
            return torch.arange(like.shape[-1], dtype=like.dtype).expand_as(like).clone()

        def forward(self, x):
            self.v = x.clone() if self.v is None else self.v + x
            return self.v

    r = Ramp(step_mode="s")
    r(torch.full((3, 4), 9.0))
    fewstep.refill(r, torch.tensor([1]))
    assert r.v[1].tolist() == [0.0, 1.0, 2.0, 3.0] and r.v[0].tolist() == [9.0] * 4
