"""Channels-last layouts through the multi-step layers and the fused LIF, BatchNorm folded into the convolution at
inference, and the CPU allocator setting."""

import sys

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import fewstep
from fewstep import layers, models, runtime
from fewstep.fused import flat_time
from fewstep.neurons import LIF


def channels_last_steps(T=3, N=2, C=5, H=4, W=6):
    """[T, N, C, H, W] whose frames are NHWC in memory (what the conv layers produce)."""
    return torch.stack([torch.randn(N, C, H, W).contiguous(memory_format=torch.channels_last) for _ in range(T)])


def test_flat_time_keeps_channels_last_without_a_copy():
    x = torch.randn(3, 2, 6, 4, 5).permute(0, 1, 4, 2, 3)  # dense, channels innermost
    assert not x.is_contiguous()
    xf, perm, unflatten = flat_time(x)
    assert xf.shape == (3, 2 * 5 * 6 * 4) and xf.data_ptr() == x.data_ptr()  # a view, not a copy
    back = unflatten(xf.clone())
    assert back.shape == x.shape and back.stride() == x.stride() and torch.equal(back, x)
    y = torch.randn(4, 3, 2)[:, :, :1]  # not dense: falls back to a contiguous copy
    yf, _, unflat = flat_time(y)
    assert torch.equal(unflat(yf), y)


@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_fused_lif_on_channels_last_input_matches_contiguous(reset):
    torch.manual_seed(0)
    x = channels_last_steps() + 0.5
    outs = []
    for xi in (x, x.contiguous()):
        xi = xi.detach().requires_grad_(True)
        n = LIF(theta=0.7, reset=reset, learn_theta=True, learn_tau=True)
        s = n(xi)
        w = torch.linspace(-1, 1, s.numel()).view(s.shape)
        (s * w).sum().backward()
        outs.append((s, xi.grad, n.theta.grad, n.tau.grad, s.stride()))
    (s1, g1, th1, ta1, st1), (s2, g2, th2, ta2, _) = outs
    assert st1 == x.stride()  # spikes come back in the input's layout
    assert torch.equal(s1, s2)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(th1, th2)
    torch.testing.assert_close(ta1, ta2)


def test_channels_last_model_matches_nchw(monkeypatch):
    torch.manual_seed(0)
    a = models.create("vggsnn", input_shape=(2, 16, 16), num_classes=4, cfg=(8, "A", 16, "A"), theta=0.5)
    b = models.create("vggsnn", input_shape=(2, 16, 16), num_classes=4, cfg=(8, "A", 16, "A"), theta=0.5)
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 5, 2, 16, 16) * 2
    monkeypatch.setattr(layers, "CHANNELS_LAST_DEVICES", set())
    out_a = a(x)
    out_a.square().mean().backward()
    monkeypatch.setattr(layers, "CHANNELS_LAST_DEVICES", {"cpu"})
    out_b = b(x)
    out_b.square().mean().backward()
    torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-4)
    for (k, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-3, atol=1e-5, msg=k)
    conv = next(m for m in b.modules() if isinstance(m, layers.Conv2d))
    seen = []
    conv.register_forward_hook(lambda m, i, o: seen.append(o))
    b(x)
    assert seen[0].flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


def test_inference_convolution_reads_a_channels_last_weight_that_follows_the_parameter():
    torch.manual_seed(0)
    conv = layers.Conv2d(3, 8, 3, padding=1)
    conv.step_mode = "s"
    x = torch.rand(4, 3, 9, 9)
    with torch.no_grad():
        ref = torch.nn.functional.conv2d(x.contiguous(memory_format=torch.channels_last), conv.weight, conv.bias,
                                         padding=1)
        y = conv(x)
        assert torch.equal(y, ref)  # the same numbers as the NCHW weight
        assert conv._channels_last_weight().is_contiguous(memory_format=torch.channels_last)
        assert "_cl_weight" not in str(list(conv.state_dict()))
        conv.weight.mul_(2.0)  # an in-place update (as an optimiser step makes): the cache must follow
        assert torch.allclose(conv(x), 2 * (y - conv.bias.view(1, -1, 1, 1)) + conv.bias.view(1, -1, 1, 1), atol=1e-5)
        conv.load_state_dict({"weight": torch.zeros_like(conv.weight), "bias": conv.bias.clone()})
        assert torch.equal(conv(x), conv.bias.view(1, -1, 1, 1).expand(4, -1, 9, 9))
    conv.weight.requires_grad_(True)
    conv(x).sum().backward()  # with autograd the parameter itself is used: its gradient arrives
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    with torch.inference_mode():  # a layer built in inference mode has weights without a version counter
        made = layers.Conv2d(3, 8, 3, padding=1)
        made.step_mode = "s"
        assert made(x).shape == (4, 8, 9, 9)


@pytest.fixture
def batchnorm_calls(monkeypatch):
    """How many times a BatchNorm's own forward ran (counted without hooks, which would stop the fold)."""
    calls = []
    forward = _BatchNorm.forward

    def counted(self, x):
        calls.append(self)
        return forward(self, x)

    monkeypatch.setattr(_BatchNorm, "forward", counted)
    return calls


def test_batchnorm_folds_into_the_convolution_by_hand(batchnorm_calls, monkeypatch):
    """W' = W·γ/σ, b' = (b − μ)·γ/σ + β with σ = √(var + eps): W = 2, γ = 3, β = 1, μ = 0.5, var + eps = 4
    gives W' = 3 and b' = −0.5·1.5 + 1 = 0.25."""
    conv = layers.Conv2d(1, 1, 1, bias=False)
    bn = layers.BatchNorm2d(1, eps=1.0)
    with torch.no_grad():
        conv.weight.fill_(2.0)
        bn.weight.fill_(3.0), bn.bias.fill_(1.0), bn.running_mean.fill_(0.5), bn.running_var.fill_(3.0)
    w, b = layers.fold_batchnorm(conv.weight, conv.bias, bn)
    assert w.item() == 3.0 and b.item() == 0.25 and w.dtype == torch.float32
    seq = layers.Sequential(conv, bn).eval()
    x = torch.tensor([0.0, 1.0, -2.0, 4.0]).view(1, 1, 2, 2)
    with torch.no_grad():
        assert torch.equal(seq(x[None]), (3 * x + 0.25)[None])  # multi-step [T=1, N=1, ...]
        assert batchnorm_calls == []  # folded: the BatchNorm itself did not run
        fewstep.set_step_mode(seq, "s")
        assert torch.equal(seq(x), 3 * x + 0.25)
        assert batchnorm_calls == []
        bn.running_var.fill_(15.0)  # in place, as load_state_dict does: the cached fold must follow
        assert torch.equal(seq(x), 1.5 * x + 0.625)  # σ = 4: W' = 2·3/4, b' = −0.5·3/4 + 1
    assert torch.equal(seq(x), 1.5 * x + 0.625) and len(batchnorm_calls) == 1  # autograd: the layers as they are
    monkeypatch.setenv("FEWSTEP_FOLD_BN", "0")
    with torch.no_grad():
        assert torch.equal(seq(x), 1.5 * x + 0.625) and len(batchnorm_calls) == 2  # switched off: unfolded
    assert set(seq.state_dict()) == {"0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                     "1.num_batches_tracked"}


@pytest.mark.parametrize("name", ["cnn", "cnn+tebn", "vggsnn", "resnet19", "sew_resnet18", "sew_resnet34"])
def test_every_batchnorm_model_folds_at_inference_with_the_unfolded_numbers(name, batchnorm_calls):
    from .test_models import SMALL

    from fewstep.ops import OpCounter

    torch.manual_seed(0)
    base, opts = name.split("+")[0], ({"norm": "tebn", "T": 3} if name.endswith("+tebn") else {})
    net = models.create(base, num_classes=7, **{**SMALL[base], **opts})
    with torch.no_grad():  # non-trivial BatchNorm statistics (and TEBN scales)
        net(torch.rand(3, 4, *net.input_shape) * 2)
        for p in net.parameters():
            if p.dim() == 1 and p.numel() == 3:
                p.copy_(torch.tensor([0.5, 1.5, 2.0]))
    net.eval()
    n_bn = sum(isinstance(m, _BatchNorm) for m in net.modules())
    x = torch.rand(3, 2, *net.input_shape) * 2
    for mode in ("m", "s"):
        fewstep.set_step_mode(net, mode)

        def run():
            if mode == "m":
                return net(x)
            fewstep.reset(net)
            return torch.stack([net(f) for f in x])

        batchnorm_calls.clear()
        ref = run()  # autograd on: unfolded
        assert len(batchnorm_calls) == n_bn * (1 if mode == "m" else 3)
        batchnorm_calls.clear()
        with torch.no_grad():
            folded = run()
            assert batchnorm_calls == [], mode  # every BatchNorm folded into its convolution
            torch.testing.assert_close(folded, ref, rtol=1e-5, atol=1e-5)
            if mode == "s":  # the op counter's hooks are marked fold-safe: still folded, and counted
                fewstep.reset(net)
                with OpCounter(net) as counter:
                    counter.start_step(2, "cpu")
                    torch.testing.assert_close(net(x[0]), ref[0], rtol=1e-5, atol=1e-5)
                assert batchnorm_calls == [] and counter.macs.sum() > 0 and counter.sops.sum() > 0
            conv = next(m for m in net.modules() if isinstance(m, layers.Conv2d))
            handle = conv.register_forward_hook(lambda m, i, o: None)  # a hook may read the output: not folded
            run()
            assert len(batchnorm_calls) == (1 if mode == "m" else 3)
            handle.remove()
            batchnorm_calls.clear()
            net.train()  # training mode normalises with the batch's statistics: never folded
            run()
            assert len(batchnorm_calls) > 0
            net.eval()
    assert not any("fold" in k for k in net.state_dict())


PROBE = """
import sys, torch
from fewstep import runtime
tuned = runtime.tune_cpu_allocator()
t = torch.empty(40 << 18)  # 40 MiB: above glibc's 32 MiB ceiling, so mmap-ed by default
ptr = t.data_ptr()
del t  # glibc unmaps an mmap-ed chunk at once; a recycled heap chunk stays mapped
maps = [line.split()[0].split("-") for line in open("/proc/self/maps")]
mapped = any(int(lo, 16) <= ptr < int(hi, 16) for lo, hi in maps)
print(tuned, mapped)
"""


def probe(env_value):
    import os
    import subprocess

    env = dict(os.environ, FEWSTEP_TUNE_MALLOC=env_value)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_tune_cpu_allocator_keeps_freed_large_buffers_for_reuse(monkeypatch):
    monkeypatch.setenv("FEWSTEP_TUNE_MALLOC", "0")
    assert runtime.tune_cpu_allocator() is False  # the opt-out wins
    tuned, mapped = probe("1")
    if tuned != "True":
        pytest.skip("not glibc: nothing to tune")
    assert mapped == "True", "with tuning, a freed 40 MiB buffer stays in malloc's pool"
    assert probe("0") == ["False", "False"], "by default glibc unmaps it (this is what the tuning changes)"


def test_tune_for_device_tunes_for_the_cpu_only(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime, "tune_cpu_allocator", lambda *a, **k: calls.append(k["default_mb"]) or True)
    assert runtime.tune_for_device("cuda:0") is False and runtime.tune_for_device(torch.device("meta")) is False
    assert calls == []
    assert runtime.tune_for_device("cpu") is True and runtime.tune_for_device(torch.device("cpu")) is True
    assert runtime.tune_for_device(None) is True  # no device given: the CPU
    assert runtime.tune_for_device("cpu", inference=True) is True
    assert calls == [64, 64, 64, 1024]  # training's threshold, and the inference commands' 1 GiB


def test_an_mmap_threshold_glibc_cannot_take_is_refused_by_name(monkeypatch):
    """mallopt takes the threshold in bytes as a C int: 2048 MiB would wrap around (to a negative number, 4096 MiB
    to 0, which maps every buffer afresh), so anything outside 1..2047 MiB is an error that names its source."""
    monkeypatch.setenv("FEWSTEP_TUNE_MALLOC", "1")
    for value in ("4096", "2048", "0"):
        monkeypatch.setenv("FEWSTEP_MALLOC_MMAP_MB", value)
        with pytest.raises(ValueError, match=f"FEWSTEP_MALLOC_MMAP_MB must be 1 to 2047 MiB .* got {value}"):
            runtime.tune_cpu_allocator()
    monkeypatch.setenv("FEWSTEP_MALLOC_MMAP_MB", "64k")
    with pytest.raises(ValueError, match="whole number of MiB, got '64k'"):
        runtime.tune_cpu_allocator()
    monkeypatch.delenv("FEWSTEP_MALLOC_MMAP_MB")
    with pytest.raises(ValueError, match="mmap_threshold_mb must be 1 to 2047 MiB"):
        runtime.tune_cpu_allocator(5000)
    with pytest.raises(ValueError, match="default_mb must be 1 to 2047 MiB"):
        runtime.tune_cpu_allocator(default_mb=2048)


def test_streaming_threads_drop_to_the_free_cores_on_a_busy_machine():
    import torch

    from fewstep.runtime import streaming_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert streaming_threads("auto", cores_busy=0.2, cores=2) == (2, "torch's default")  # a quiet machine
        torch.set_num_threads(2)
        n, why = streaming_threads("auto", cores_busy=2.0, cores=2)  # another process on both cores
        assert n == 1 == torch.get_num_threads() and "other work on 2.0 of 2 cores" in why
        torch.set_num_threads(2)
        assert streaming_threads("auto", cores_busy=0.7, cores=2)[0] == 1  # 1.3 cores free: round down to 1
        torch.set_num_threads(2)
        assert streaming_threads("auto", cores_busy=1.9, cores=4)[0] == 2  # 2.1 of 4 free: enough for 2
        torch.set_num_threads(4)
        assert streaming_threads("auto", cores_busy=1.6, cores=4)[0] == 2  # 2.4 free of 4
        assert streaming_threads(3) == (3, "as asked") and torch.get_num_threads() == 3
        with pytest.raises(ValueError, match="--threads must be a whole number >= 1"):
            streaming_threads(0)
    finally:
        torch.set_num_threads(before)


def test_busy_note_warns_only_when_other_work_holds_the_cores():
    from fewstep.runtime import busy_note

    assert busy_note(2, 0.3, 2) is None and busy_note(1, 1.2, 2) is None and busy_note(2, 1.9, 4) is None
    assert busy_note(2, None, 2) is None  # (no /proc/stat: nothing to say)
    note = busy_note(2, 1.8, 2)
    assert "other work kept 1.8 of 2 cores busy" in note and "time on a quiet machine" in note


def test_other_work_leaves_out_this_process_and_sees_another(tmp_path):
    """A busy loop in this process is not contention; one in a child process is."""
    import subprocess
    import time

    from fewstep.runtime import OtherWork

    with OtherWork() as mine:
        t = time.perf_counter()
        while time.perf_counter() - t < 0.6:
            pass
    if mine.cores_busy is None:
        pytest.skip("no /proc/stat here")
    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<3: pass"])
    try:
        time.sleep(0.3)
        with OtherWork() as theirs:
            time.sleep(0.8)
    finally:
        child.wait()
    assert theirs.cores_busy > mine.cores_busy + 0.3, (mine.cores_busy, theirs.cores_busy)
