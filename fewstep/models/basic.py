"""Small networks: ``mlp`` and ``cnn`` (34×34 event frames, 8×8 digits, any small image)."""

from __future__ import annotations

import math

from torch import nn

from .. import layers as L
from .registry import SNN, NeuronFactory, register


class MLP(SNN):
    """Flatten → [Linear → LIF] × len(hidden) → Linear (logits every step)."""

    def __init__(self, input_shape, num_classes, hidden=(256, 256), **neuron):
        super().__init__(input_shape, num_classes)
        make = NeuronFactory(**neuron)
        make.no_norm("mlp")
        mods: list[nn.Module] = [L.Flatten()]
        width = math.prod(self.input_shape)
        for h in hidden:
            mods += [L.Linear(width, h), make()]
            width = h
        self.features = L.Sequential(*mods)
        self.classifier = L.Linear(width, num_classes)

    def body(self, x):
        return self.classifier(self.features(x))


class CNN(SNN):
    """[Conv3×3 → BN → LIF → AvgPool2] per entry of ``channels`` → Linear → LIF → Linear."""

    def __init__(self, input_shape, num_classes, channels=(32, 64), hidden=128, dropout=0.0, **neuron):
        super().__init__(input_shape, num_classes)
        make = NeuronFactory(**neuron)
        c, h, w = self.input_shape
        mods: list[nn.Module] = []
        for out in channels:
            if h < 2 or w < 2:
                raise ValueError(f"cnn: input {self.input_shape} is too small for {len(channels)} pooling stages")
            mods += [L.Conv2d(c, out, 3, padding=1, bias=False), make.norm(out), make(), L.AvgPool2d(2)]
            c, h, w = out, h // 2, w // 2
        self.features = L.Sequential(*mods)
        head: list[nn.Module] = [L.Flatten()]
        if dropout:
            head.append(L.Dropout(dropout))
        head += [L.Linear(c * h * w, hidden), make(), L.Linear(hidden, num_classes)]
        self.classifier = L.Sequential(*head)

    def body(self, x):
        return self.classifier(self.features(x))


@register("mlp")
def mlp(input_shape=(1, 8, 8), num_classes=10, hidden=(256, 256), **neuron) -> MLP:
    """``create("mlp", hidden=(256, 256), ...)``: :class:`MLP`; ``neuron`` options go to every LIF."""
    return MLP(input_shape, num_classes, tuple(hidden), **neuron)


@register("cnn")
def cnn(input_shape=(2, 34, 34), num_classes=10, channels=(32, 64), hidden=128, dropout=0.0, **neuron) -> CNN:
    """``create("cnn", channels=(32, 64), hidden=128, dropout=0.0, ...)``: :class:`CNN`; ``neuron`` options go to
    every LIF."""
    return CNN(input_shape, num_classes, tuple(channels), hidden, dropout, **neuron)
