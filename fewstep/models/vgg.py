"""VGGSNN, the layout of TET (Deng et al., ICLR 2022) for DVS data (2×48×48 or 2×128×128)."""

from __future__ import annotations

from torch import nn

from .. import layers as L
from .registry import SNN, NeuronFactory, register

VGGSNN_CFG = (64, 128, "A", 256, 256, "A", 512, 512, "A", 512, 512, "A")


class VGGSNN(SNN):
    """Conv3×3-BN-LIF stacks with 2×2 average pooling ('A'), then one Linear classifier."""

    def __init__(self, input_shape, num_classes, cfg=VGGSNN_CFG, **neuron):
        super().__init__(input_shape, num_classes)
        make = NeuronFactory(**neuron)
        c, h, w = self.input_shape
        mods: list[nn.Module] = []
        for item in cfg:
            if item == "A":
                if h < 2 or w < 2:
                    raise ValueError(f"vggsnn: input {self.input_shape} is too small for the pooling in {list(cfg)}")
                mods.append(L.AvgPool2d(2))
                h, w = h // 2, w // 2
            else:
                mods += [L.Conv2d(c, int(item), 3, padding=1, bias=False), make.norm(int(item)), make()]
                c = int(item)
        self.features = L.Sequential(*mods)
        self.classifier = L.Sequential(L.Flatten(), L.Linear(c * h * w, num_classes))

    def body(self, x):
        return self.classifier(self.features(x))


@register("vggsnn")
def vggsnn(input_shape=(2, 48, 48), num_classes=10, cfg=VGGSNN_CFG, **neuron) -> VGGSNN:
    """``create("vggsnn", cfg=(64, 128, "A", ...))``: :class:`VGGSNN`, channel counts with ``"A"`` for pooling."""
    return VGGSNN(input_shape, num_classes, tuple(cfg), **neuron)
