"""The model registry and the base class every fewstep network derives from."""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from ..neurons import make_neuron, step_mode_of

MODELS: dict[str, Callable[..., "SNN"]] = {}

NEURON_KEYS = ("neuron", "tau", "theta", "v0", "reset", "detach_reset", "surrogate", "learn_theta", "learn_tau",
               "backend", "levels")
NORM_KEYS = ("norm", "T")  # normalisation layers: "bn" (BatchNorm over T·N) or "tebn" (needs T)
NORMS = ("bn", "tebn")


def register(name: str):
    """Decorator: make a builder available as ``create(name, ...)``."""

    def deco(fn):
        if name in MODELS:
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return deco


def available() -> list[str]:
    """The registered model names, sorted (what :func:`create` takes)."""
    return sorted(MODELS)


def create(name: str, **kwargs) -> "SNN":
    """Build a registered model. Unknown names and unknown options raise ``ValueError``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(available())}")
    builder = MODELS[name]
    params = inspect.signature(builder).parameters
    valid = [k for k, p in params.items() if p.kind != p.VAR_KEYWORD]
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        valid += list(NEURON_KEYS) + list(NORM_KEYS)
    bad = sorted(set(kwargs) - set(valid))
    if bad:
        raise ValueError(f"model {name!r} has no option(s) {bad}; valid options: {valid}")
    net = builder(**kwargs)
    net.model_name = name
    return net


class NeuronFactory:
    """Builds the spiking neurons and the normalisation layers of a model from shared options.

    ``make()`` gives a neuron (``neuron='lif'``, ``tau``, ...); ``make.norm(c)`` a BatchNorm2d over
    T·N, or with ``norm='tebn'`` a :class:`fewstep.layers.TEBN` with ``T`` per-step scales.
    """

    def __init__(self, neuron: str = "lif", norm: str = "bn", T: "int | None" = None, **options):
        bad = sorted(set(options) - set(NEURON_KEYS))
        if bad:
            raise ValueError(f"unknown neuron option(s) {bad}; valid options: {list(NEURON_KEYS + NORM_KEYS)}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid names: {', '.join(NORMS)}")
        if norm == "tebn" and (T is None or int(T) < 1):
            raise ValueError("norm 'tebn' needs T, the number of timesteps (one learnable scale per step)")
        self.kind = neuron
        self.norm_kind, self.T = norm, T
        self.options = {k: v for k, v in options.items() if v is not None}
        make_neuron(self.kind, **self.options)  # fail early on a bad value

    def __call__(self) -> nn.Module:
        return make_neuron(self.kind, **self.options)

    def norm(self, channels: int) -> nn.Module:
        from .. import layers as L

        if self.norm_kind == "tebn":
            return L.TEBN(channels, self.T)
        return L.BatchNorm2d(channels)

    def no_norm(self, model: str) -> None:
        """For models without normalisation layers: refuse ``norm='tebn'`` rather than ignore it."""
        if self.norm_kind != "bn":
            raise ValueError(f"model {model!r} has no BatchNorm layers, so norm {self.norm_kind!r} does not apply; "
                             "use a model with BatchNorm (cnn, vggsnn, resnet19, resnet18, resnet20, sew_resnet18, sew_resnet34)")


class SNN(nn.Module):
    """Base class: checks the input shape and gives per-step logits ``[T, N, classes]``.

    In multi-step mode ``forward`` takes ``[T, N, *input_shape]``; in single-step mode (after
    ``fewstep.set_step_mode(net, "s")``) it takes one frame ``[N, *input_shape]`` and returns
    ``[N, classes]``. Subclasses implement :meth:`body`.
    """

    # Whether every spiking layer's multi-step output is time-first [T, N, ...] (a wrapper may flip it in time)
    spikes_time_first = True

    def __init__(self, input_shape, num_classes: int):
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.model_name = type(self).__name__

    def current_step_mode(self) -> str:
        """``"m"`` or ``"s"``, as set by :func:`fewstep.set_step_mode`."""
        return step_mode_of(self)

    def check_input(self, x: torch.Tensor) -> None:
        mode = self.current_step_mode()
        lead = 2 if mode == "m" else 1
        shape = tuple(x.shape)
        want = ("T", "N") if lead == 2 else ("N",)
        if x.dim() != lead + len(self.input_shape) or shape[lead:] != self.input_shape:
            raise ValueError(
                f"model {self.model_name!r} expects input [{', '.join(want + tuple(map(str, self.input_shape)))}] "
                f"(step_mode={mode!r}) but got {list(shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.body(x)

    # -- the uniform interface that training wrappers (TRT) use: where the stem ends, where the head begins
    def spiking_layers(self) -> list[tuple[str, nn.Module]]:
        """``(name, module)`` of every spiking layer, in the order the forward pass runs them (the stem
        ends at the first; a wrapper may cut the network after any of them)."""
        from ..neurons import StatefulModule

        return [(n, m) for n, m in self.named_modules() if isinstance(m, StatefulModule) and m.is_neuron]

    def classifier_head(self) -> nn.Linear:
        """The final synaptic layer, mapping the features after the last spiking layer (pooled and
        flattened where the model does so) to the logits: ``logits(t) = head(f(t))``."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        if not linears or linears[-1].out_features != self.num_classes:
            raise ValueError(f"model {self.model_name!r} does not end with a Linear layer giving the {self.num_classes} "
                             "logits; it cannot provide classifier_head()")
        return linears[-1]

    def body(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

