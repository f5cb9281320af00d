"""Static-shape streaming (fewstep.graphs): bucketed batches, padding and state hand-over give the eager
runner's decisions; on CUDA the captured graphs do too (skipped elsewhere)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fewstep import anytime as at
from fewstep import cutoff as cf
from fewstep import graphs as G
from fewstep import layers as L
from fewstep import models
from fewstep.neurons import LIF, StatefulModule

from .test_anytime import spread_policy, warmed
from .test_models import SMALL

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; none here")


def test_bucket_sizes_hand_checked():
    assert G.bucket_sizes(9) == [1, 2, 4, 8, 9]
    assert G.bucket_sizes(8) == [1, 2, 4, 8]
    assert G.bucket_sizes(1) == [1]
    with pytest.raises(ValueError, match="batch must be >= 1"):
        G.bucket_sizes(0)


class TEBNNet(nn.Module):
    """A small conv net with TEBN (per-sample step counters as state) between LIF layers."""

    input_shape = (1, 4, 4)

    def __init__(self, T=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), L.TEBN(4, T), LIF(theta=0.2), nn.Flatten(),
                                  nn.Linear(4 * 16, 5))

    def forward(self, x):
        return self.body(x)


def _cases():
    # The schedule is model-agnostic; these cover plain LIF states, residual blocks, the T = 1 network's
    # states and TEBN's step counters (every model against the eager runner: tests/test_anytime.py).
    return ["mlp", "cnn", "resnet20", "general12_cnn", "tebn"]


def _net(name):
    if name == "tebn":
        torch.manual_seed(0)
        net = TEBNNet()
        with torch.no_grad():
            net.body[1].bn.running_mean.uniform_(-0.5, 0.5)
            net.body[1].p.uniform_(0.5, 1.5)
        return net.eval(), (1, 4, 4)
    net = warmed(name)
    return net, tuple(net.input_shape)


def _stream_policy(net, x):
    """A Top-K policy splitting the batch, fitted to the network's own streaming outputs on ``x``."""
    from fewstep.neurons import set_step_mode

    with torch.no_grad():
        set_step_mode(net, "s")
        Y = cf.running(torch.stack([net(x[t]) for t in range(x.shape[0])]).float().cpu())
        set_step_mode(net, "m")
    return spread_policy(Y)


@pytest.mark.parametrize("name", _cases())
def test_emulated_static_schedule_equals_the_eager_runner(name):
    net, shape = _net(name)
    x = torch.rand(4, 9, *shape) * 2
    pol = _stream_policy(net, x)
    eager = at.early_exit(net, x, pol, graphs="off")  # equal to max_batch=3 (tests/test_anytime.py)
    assert 1 < len(set(eager.exit_step.tolist()))  # the policy splits the batch
    for mb in (None, 3):  # 9 samples: buckets 9, 8, 4, 2, 1; with 3 in flight, refills, then padding
        em = at.early_exit(net, x, pol, max_batch=mb, graphs="emulate")
        assert em.exit_step.tolist() == eager.exit_step.tolist()
        assert em.prediction.tolist() == eager.prediction.tolist()
    pol.with_max_step(2)  # a step cap decides inside the static schedule too
    eager2, em2 = at.early_exit(net, x, pol, graphs="off"), at.early_exit(net, x, pol, max_batch=3, graphs="emulate")
    assert em2.exit_step.tolist() == eager2.exit_step.tolist() and max(eager2.exit_step.tolist()) <= 2
    assert em2.prediction.tolist() == eager2.prediction.tolist()
    assert all(getattr(m, "v", None) is None for m in net.modules())  # states released after the run


def test_survivors_move_to_smaller_buckets(monkeypatch):
    """9 samples together: the batch starts at 9 and shrinks through the buckets; padding rows never decide."""
    net = warmed("mlp")
    x = torch.rand(4, 9, *net.input_shape) * 2
    with torch.no_grad():
        pol = spread_policy(cf.running(net(x)))
    sizes = []
    step = G.StepGraph.step
    monkeypatch.setattr(G.StepGraph, "step", lambda self: sizes.append(self.batch) or step(self))
    res = at.early_exit(net, x, pol, graphs="emulate")
    assert sizes[0] == 9 and sizes == sorted(sizes, reverse=True) and sizes[-1] < 9
    assert set(sizes) <= {1, 2, 4, 8, 9}
    running = [int((res.exit_step > t).sum()) for t in range(len(sizes))]
    assert all(b >= n for b, n in zip(sizes, running))  # every bucket holds the samples still running
    assert len(sizes) == int(res.exit_step.max())


def test_latency_in_the_static_schedule():
    net = warmed("mlp")
    x = torch.rand(4, 5, *net.input_shape) * 2
    r = at.early_exit(net, x, cf.Timestep(2, T=4), max_batch=2, latency=True, graphs="emulate")
    assert r.exit_step.tolist() == [2] * 5 and r.latency_s.shape == (5,) and bool((r.latency_s >= 0).all())


def test_mode_errors_name_the_problem():
    net = warmed("mlp")
    x = torch.rand(2, 3, *net.input_shape)
    pol = cf.Timestep(2, T=2)
    with pytest.raises(ValueError, match="graphs must be one of"):
        at.early_exit(net, x, pol, graphs="yes")
    with pytest.raises(ValueError, match="needs the input on a CUDA device, got cpu"):
        at.early_exit(net, x, pol, graphs="cuda")
    with pytest.raises(ValueError, match="cannot count operations"):
        at.early_exit(net, x, pol, graphs="emulate", count_ops=True)
    assert at.early_exit(net, x, pol, graphs="auto", count_ops=True).spikes is not None  # auto: eager, counted


def test_auto_steps_eagerly_on_the_cpu(monkeypatch):
    net = warmed("mlp")
    x = torch.rand(2, 3, *net.input_shape)
    monkeypatch.setattr(G, "run", lambda *a, **k: pytest.fail("the static schedule ran on the CPU under auto"))
    assert at.early_exit(net, x, cf.Timestep(2, T=2)).exit_step.tolist() == [2, 2, 2]


def test_unsupported_names_hooks_and_recorders():
    net = warmed("mlp")
    assert G.unsupported(net) is None
    h = net.register_forward_hook(lambda m, i, o: None)
    assert "forward hooks" in G.unsupported(net)
    h.remove()
    import fewstep

    with fewstep.record(net):
        assert G.unsupported(net) == "fewstep.record is attached"
    assert G.unsupported(net) is None


def test_decision_buffers_and_the_fallback_when_the_decision_cannot_be_captured(caplog):
    """Off CUDA a captured decision cannot be made: each bucket then decides eagerly on its static buffers,
    with one warning, and the early-exit loop on those buffers gives the eager runner's decisions."""
    net = warmed("mlp")
    x = torch.rand(4, 5, *net.input_shape) * 2
    pol = _stream_policy(net, x)
    from fewstep.neurons import set_step_mode

    set_step_mode(net, "s")
    try:
        graphs = G.graphs_for(net, 5, x[0], capture=False)
        with caplog.at_level(logging.WARNING, logger="fewstep"):
            ds = G.decisions_for(graphs, pol, 4, capture=True, model=net)
            G.decisions_for(graphs, pol, 4, capture=True, model=net)  # cached on the step graphs: no second try
    finally:
        set_step_mode(net, "m")
    assert sorted(ds) == [1, 2, 4, 5] and all(d.graph is None and d.batch == b for b, d in ds.items())
    assert all(graphs[b].decisions[G._policy_key(pol, 4)] is ds[b] for b in ds)
    msgs = [r.getMessage() for r in caplog.records if "decision graphs off" in r.getMessage()]
    assert len(msgs) == 1 and "the decision runs eagerly" in msgs[0]
    d = ds[2]  # the body: Y += out, steps += 1, padding never decides, step T always does; then the bookkeeping
    d.reset(3)  # rows 0 and 1 run samples 0 and 1; sample 2 waits
    d.valid[1] = False  # row 1: padding
    d.steps[0] = 3
    for buf in graphs[2].buffers:
        buf.fill_(7.0)
    fire = d.step(torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0, 0.0]]))
    assert fire.tolist() == [True, False]
    # row 0 decided: sample 0 at step 4 with class 2; row 1 decided nothing (dummy sample 3)
    assert d.done.tolist() == [[0, 3], [4, 1], [2, 0]]
    # row 0 takes sample 2 from fresh state; the padding row keeps its sum and counts steps
    assert d.active.tolist() == [2, 1] and d.valid.tolist() == [True, False] and d.steps.tolist() == [0, 1]
    assert d.Y[0].abs().sum() == 0 and d.Y[1, 0] == 9.0
    assert d.waiting.tolist() == [3] and d.counts.tolist() == [1, 3]
    assert d.gather.tolist() == [0 * 3 + 2, 1 * 3 + 1]  # frame rows t * n_total + sample
    for buf in graphs[2].buffers:
        assert bool((buf[0] == 0.0).all()) and bool((buf[1] == 7.0).all())  # LIF fresh state: v0 = 0
    d.steps[0] = 3  # sample 2 decides at the next step, T; no sample waits, so its row becomes padding
    fire = d.step(torch.zeros(2, 5))
    assert fire.tolist() == [True, False] and d.done[:2].tolist() == [[2, 3], [4, 2]]
    assert d.counts.tolist() == [0, 3] and not d.valid.any() and d.active.tolist() == [0, 1]
    with pytest.raises(ValueError, match="a run of 1 samples cannot fill a bucket of 2 rows"):
        d.reset(1)


def test_a_captured_decision_is_keyed_by_the_policy_parameters_and_T():
    k = G._policy_key
    assert k(cf.Softmax(0.1), 4) == k(cf.Softmax(0.1), 4)
    assert len({k(cf.Softmax(0.1), 4), k(cf.Softmax(0.2), 4), k(cf.Softmax(0.1), 5), k(cf.Timestep(1), 4)}) == 4
    assert k(cf.TopK(betas=[1.0, 2.0]), 2) != k(cf.TopK(betas=[1.0, 2.5]), 2)


# --------------------------------------------------------------------------- CUDA only


@CUDA
@pytest.mark.parametrize("name", ["cnn", "vggsnn", "resnet20", "general12_cnn", "tebn"])
def test_cuda_graphs_give_the_eager_decisions(name):
    net, shape = _net(name)
    net = net.cuda()
    x = (torch.rand(4, 9, *shape) * 2).cuda()
    pol = _stream_policy(net, x)
    for mb in (None, 3, 4):
        eager = at.early_exit(net, x, pol, max_batch=mb, graphs="off")
        graph = at.early_exit(net, x, pol, max_batch=mb, graphs="cuda")
        assert graph.exit_step.tolist() == eager.exit_step.tolist()
        assert graph.prediction.tolist() == eager.prediction.tolist()
    assert at.early_exit(net, x, pol, graphs="cuda").exit_step.tolist() == eager.exit_step.tolist()  # cached graphs


class PythonCounter(StatefulModule):
    """A step that keeps Python-side state: a replay would freeze it, so the capture check must refuse it. It
    adds its step count to the network's output, so the frozen count shows whatever the weights are (a count
    that scales a layer's input can leave every spike unchanged)."""

    _state_names = ()
    is_neuron = False

    def reset(self):
        super().reset()
        self.t = 0

    def forward(self, x):
        self.t += 1
        return x + self.t


@CUDA
def test_cuda_capture_falls_back_once_with_the_reason(caplog):
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), LIF(theta=0.1), nn.Linear(5, 3), PythonCounter(step_mode="s"))
    net = net.cuda().eval()
    x = torch.rand(3, 4, 1, 4, 4, device="cuda")
    pol = cf.Timestep(3, T=3)
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        r = at.early_exit(net, x, pol)
        at.early_exit(net, x, pol)
    assert r.exit_step.tolist() == [3] * 4
    msgs = [rec.getMessage() for rec in caplog.records if "CUDA graphs off" in rec.getMessage()]
    assert len(msgs) == 1 and "differs from the eager step" in msgs[0]
    with pytest.raises(G.CaptureError):
        at.early_exit(net, x, pol, graphs="cuda")


class SyncingPolicy(cf.Timestep):
    """A policy whose fire() reads a value back to the host: a graph cannot capture it."""

    def fire(self, Yt, t):
        float(Yt.sum())
        return super().fire(Yt, t)


@CUDA
def test_cuda_decision_that_cannot_be_captured_decides_eagerly_with_one_warning(caplog):
    net, shape = _net("cnn")
    net = net.cuda()
    x = (torch.rand(4, 9, *shape) * 2).cuda()
    pol = SyncingPolicy(3, T=4)
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        r = at.early_exit(net, x, pol, max_batch=4, graphs="cuda")
    assert r.exit_step.tolist() == [3] * 9
    msgs = [rec.getMessage() for rec in caplog.records if "decision graphs off" in rec.getMessage()]
    assert len(msgs) == 1 and "capturing the timestep decision" in msgs[0]
    assert r.exit_step.tolist() == at.early_exit(net, x, pol, max_batch=4, graphs="off").exit_step.tolist()


@pytest.mark.parametrize("mode", ["emulate", pytest.param("cuda", marks=CUDA)])
def test_anytime_stream_on_static_state_matches_the_batch_runner(mode):
    """One live stream on the batch-1 static state (a CUDA graph on the GPU): the same answers as the batch
    runner, stream after stream, with another runner using the model in between."""
    net, shape = _net("tebn")
    dev = "cuda" if mode == "cuda" else "cpu"
    net = net.to(dev)
    x = (torch.rand(4, 6, *shape) * 2).to(dev)
    pol = _stream_policy(net, x)
    ref = at.early_exit(net, x, pol, graphs="off")
    stream = at.AnytimeStream(net, pol, T=4, graphs=mode)
    for i in range(6):
        stream.reset()
        for t in range(4):
            answer = stream.push(x[t, i])
            if answer is not None:
                break
        assert answer == (int(ref.prediction[i]), int(ref.exit_step[i]))
        assert stream._graph is not None and stream._graph.batch == 1
        if i == 2:  # another runner in between releases the model's states; the next reset() rebinds
            assert at.early_exit(net, x, pol, graphs="off").exit_step.tolist() == ref.exit_step.tolist()
    with pytest.raises(ValueError, match="graphs must be one of"):
        at.AnytimeStream(net, pol, T=4, graphs="on")
