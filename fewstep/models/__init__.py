"""Model registry: every model maps ``[T, N, C, H, W]`` (or ``[T, N, D]``) to per-step logits ``[T, N, classes]``.

    net = fewstep.models.create("cnn", input_shape=(2, 34, 34), num_classes=10, tau=0.5)

Add a model by decorating a builder with :func:`register` (see ``docs/extending.md``).
"""

from .registry import MODELS, SNN, available, create, register  # noqa: F401
from . import basic, general12, imported, resnet, vgg  # noqa: F401  (register the built-in models)
