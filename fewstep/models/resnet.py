"""Spiking ResNets: ``resnet19`` (TET), ``resnet18``, ``resnet20``, ``sew_resnet18``, ``sew_resnet34``.

Every one takes ``stem="cifar"`` (one 3×3 conv, stride 1: 32×32 inputs) or ``stem="imagenet"``
(7×7 conv with stride 2, then 3×3 max-pool with stride 2: 224×224 inputs, as in He et al.).

Spiking basic block (TET / tdBN style): ``LIF(BN(conv(LIF(BN(conv(x))))) + shortcut(x))``.
SEW block (Fang et al., NeurIPS 2021, ADD connect): ``LIF(BN(conv(LIF(BN(conv(x)))))) + shortcut(x)``
where the shortcut of a SEW block is the identity or conv1×1-BN-LIF, so spikes are added.
"""

from __future__ import annotations

from torch import nn

from .. import layers as L
from .registry import SNN, NeuronFactory, register


def conv_bn(cin, cout, make, k=3, stride=1):
    """Conv k×k (no bias) then the model's normalisation (BatchNorm or TEBN, from ``make.norm``)."""
    return [L.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), make.norm(cout)]


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, make):
        super().__init__()
        self.residual = L.Sequential(*conv_bn(cin, cout, make, 3, stride), make(), *conv_bn(cout, cout, make, 3))
        self.shortcut = (L.Sequential(*conv_bn(cin, cout, make, 1, stride)) if stride != 1 or cin != cout
                         else nn.Identity())
        self.sn = make()

    def forward(self, x):
        return self.sn(self.residual(x) + self.shortcut(x))


class SEWBlock(nn.Module):
    def __init__(self, cin, cout, stride, make):
        super().__init__()
        self.residual = L.Sequential(*conv_bn(cin, cout, make, 3, stride), make(), *conv_bn(cout, cout, make, 3),
                                     make())
        self.shortcut = (
            L.Sequential(*conv_bn(cin, cout, make, 1, stride), make()) if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x):
        return self.residual(x) + self.shortcut(x)


class SpikingResNet(SNN):
    """Stem conv3×3 → stages of blocks → global average pool → head (one Linear, or Linear-LIF-Linear)."""

    def __init__(self, input_shape, num_classes, widths, blocks, stem_width=None, block=BasicBlock, fc_hidden=None,
                 stem="cifar", **neuron):
        super().__init__(input_shape, num_classes)
        if len(widths) != len(blocks):
            raise ValueError(f"widths {widths} and blocks {blocks} must have the same length")
        make = NeuronFactory(**neuron)
        c = stem_width or widths[0]
        if stem == "cifar":
            self.stem = L.Sequential(*conv_bn(self.input_shape[0], c, make, 3), make())
        elif stem == "imagenet":
            self.stem = L.Sequential(*conv_bn(self.input_shape[0], c, make, 7, 2), make(),
                                     L.MaxPool2d(3, stride=2, padding=1))
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        stages = []
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            for j in range(n):
                stages.append(block(c, w, stride if j == 0 else 1, make))
                c = w
        self.stages = L.Sequential(*stages)
        self.pool = L.Sequential(L.AdaptiveAvgPool2d(1), L.Flatten())
        if fc_hidden:
            self.head = L.Sequential(L.Linear(c, fc_hidden), make(), L.Linear(fc_hidden, num_classes))
        else:
            self.head = L.Linear(c, num_classes)

    def body(self, x):
        return self.head(self.pool(self.stages(self.stem(x))))


@register("resnet19")
def resnet19(input_shape=(3, 32, 32), num_classes=10, widths=(128, 256, 512), blocks=(3, 3, 2), stem="cifar",
             **neuron):
    """ResNet-19 of TET: widths 128/256/512, blocks 3/3/2, head Linear(512, 256)-LIF-Linear."""
    return SpikingResNet(input_shape, num_classes, tuple(widths), tuple(blocks), fc_hidden=256, stem=stem, **neuron)


@register("resnet18")
def resnet18(input_shape=(3, 32, 32), num_classes=10, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2), stem="cifar",
             **neuron):
    """ResNet-18 (CIFAR stem by default: one 3×3 conv, no max-pool)."""
    return SpikingResNet(input_shape, num_classes, tuple(widths), tuple(blocks), stem=stem, **neuron)


@register("resnet20")
def resnet20(input_shape=(3, 32, 32), num_classes=10, widths=(16, 32, 64), blocks=(3, 3, 3), stem="cifar", **neuron):
    """ResNet-20 of He et al. for CIFAR: widths 16/32/64, three blocks each."""
    return SpikingResNet(input_shape, num_classes, tuple(widths), tuple(blocks), stem=stem, **neuron)


@register("sew_resnet18")
def sew_resnet18(input_shape=(3, 32, 32), num_classes=10, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2),
                 stem="cifar", **neuron):
    """SEW ResNet-18 (ADD connect); CIFAR stem by default."""
    return SpikingResNet(input_shape, num_classes, tuple(widths), tuple(blocks), block=SEWBlock, stem=stem, **neuron)


@register("sew_resnet34")
def sew_resnet34(input_shape=(3, 224, 224), num_classes=1000, widths=(64, 128, 256, 512), blocks=(3, 4, 6, 3),
                 stem="imagenet", **neuron):
    """SEW ResNet-34 (ADD connect), the ImageNet baseline of SEW and of later SNN papers; ImageNet stem by default."""
    return SpikingResNet(input_shape, num_classes, tuple(widths), tuple(blocks), block=SEWBlock, stem=stem, **neuron)
