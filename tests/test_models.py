import pytest
import torch

import fewstep
from fewstep import models

SMALL = {  # fast variants of the big models; layouts as registered
    "mlp": dict(input_shape=(1, 8, 8)),
    "cnn": dict(input_shape=(2, 34, 34)),
    "vggsnn": dict(input_shape=(2, 48, 48), cfg=(8, 8, "A", 16, 16, "A", 16, 16, "A", 16, 16, "A")),
    "resnet19": dict(input_shape=(3, 32, 32), widths=(8, 16, 32)),
    "resnet18": dict(input_shape=(3, 32, 32), widths=(8, 8, 16, 16)),
    "resnet20": dict(input_shape=(3, 32, 32)),
    "sew_resnet18": dict(input_shape=(3, 32, 32), widths=(8, 8, 16, 16)),
    "sew_resnet34": dict(input_shape=(3, 64, 64), widths=(8, 8, 16, 16)),  # the ImageNet stem
    "general12_cnn": dict(input_shape=(3, 32, 32), dims=(8, 16, 32, 64), depths=(1, 2, 2, 1)),
    "general12_lstm": dict(input_shape=(3, 32, 32), dims=(8, 16, 32, 64), depths=(1, 2, 2, 1)),
}


def test_registry_lists_the_documented_models():
    assert set(SMALL) <= set(models.available())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_model_gives_per_step_logits_and_streams_identically(name):
    torch.manual_seed(0)
    net = models.create(name, num_classes=7, **SMALL[name])
    x = torch.rand(3, 2, *net.input_shape) * 2
    out = net(x)  # train mode
    assert out.shape == (3, 2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    net.eval()
    ref = net(x)
    fewstep.set_step_mode(net, "s")
    stream = torch.stack([net(f) for f in x])
    fewstep.set_step_mode(net, "m")
    torch.testing.assert_close(stream, ref, rtol=1e-5, atol=1e-5)
    assert not any(k.endswith(".v") for k in net.state_dict())


@pytest.mark.parametrize("name", sorted(SMALL) + ["cnn+tebn"])
def test_predict_steps_through_time_on_the_cpu_with_the_multi_step_numbers(name):
    """predict() runs a fewstep network single-step on the CPU (faster there): the logits and firing rates
    of the multi-step pass, the step mode restored; "m" on a GPU, and for a module that is not a fewstep
    network (it may not take single frames)."""
    from torch.utils.data import TensorDataset

    from fewstep import metrics

    torch.manual_seed(0)
    base, opts = name.split("+")[0], ({"norm": "tebn", "T": 3} if name.endswith("+tebn") else {})
    net = models.create(base, num_classes=7, **{**SMALL[base], **opts})
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net(torch.rand(3, 4, *net.input_shape) * 2)
    net.eval()
    assert metrics.inference_step_mode(net, "cpu") == "s" and metrics.inference_step_mode(net, "cuda") == "m"
    assert metrics.inference_step_mode(torch.nn.Linear(2, 2), "cpu") == "m"
    ds = TensorDataset(torch.rand(5, *net.input_shape) * 2, torch.arange(5))
    O_m, y_m, r_m = metrics.predict(net, ds, 3, "static", batch_size=4, firing_rates=True, step_mode="m")
    O_s, y_s, r_s = metrics.predict(net, ds, 3, "static", batch_size=4, firing_rates=True)
    torch.testing.assert_close(O_s, O_m, rtol=1e-5, atol=1e-5)
    assert torch.equal(y_s, y_m) and r_s.keys() == r_m.keys() and len(r_s) > 0
    assert all(abs(r_s[k] - r_m[k]) < 1e-6 for k in r_m)
    assert net.current_step_mode() == "m" and all(getattr(m, "v", None) is None for m in net.modules())
    with pytest.raises(ValueError, match="step_mode must be 'm' \\(multi-step\\) or 's'"):
        metrics.predict(net, ds, 3, "static", step_mode="x")


def test_full_size_layouts():
    net = models.create("resnet19", input_shape=(3, 32, 32), num_classes=10)
    widths = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert widths[0] == 128 and max(widths) == 512
    assert sum(1 for _ in net.stages) == 8
    v = models.create("vggsnn", input_shape=(2, 128, 128), num_classes=11)
    assert v.classifier[1].in_features == 512 * 8 * 8
    # SEW ResNet-34 on ImageNet: the 21.8 M parameters of ResNet-34 (SEW adds none), stem 7x7/2 + max-pool
    s = models.create("sew_resnet34")
    assert abs(sum(p.numel() for p in s.parameters()) - 21.80e6) < 0.02e6
    assert s.stem[0].kernel_size == (7, 7) and s.stem[0].stride == (2, 2)
    with pytest.raises(ValueError, match="stem must be 'cifar' or 'imagenet'"):
        models.create("resnet18", stem="tiny")


def test_wrong_input_shape_names_both_shapes():
    net = models.create("cnn", input_shape=(2, 34, 34), num_classes=10)
    with pytest.raises(ValueError, match=r"expects input \[T, N, 2, 34, 34\].*got \[4, 3, 34, 34\]"):
        net(torch.zeros(4, 3, 34, 34))
    fewstep.set_step_mode(net, "s")
    with pytest.raises(ValueError, match=r"expects input \[N, 2, 34, 34\]"):
        net(torch.zeros(4, 2, 34, 34, 1))


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid names: .*resnet19"):
        models.create("resnet50")
    with pytest.raises(ValueError, match="no option"):
        models.create("cnn", kernel=5)
    with pytest.raises(ValueError, match=r"no option.*leak.*valid options: .*tau"):
        models.create("mlp", leak=0.3)
    with pytest.raises(ValueError, match="valid names: if, lif"):
        models.create("mlp", neuron="izhikevich")
