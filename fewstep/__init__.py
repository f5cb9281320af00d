"""fewstep: spiking neural networks that answer in few timesteps.

Time-first tensors ``[T, N, ...]``; every model returns per-step logits ``[T, N, classes]``.
"""

from . import layers, losses, neurons, runtime, surrogate  # noqa: F401
from .neurons import (IF, LIF, LIFParameters, LIFState, compact, if_step, lif_multi_step, lif_step,  # noqa: F401
                      refill, reset, set_step_mode, shrink)
from .record import Recorder, record  # noqa: F401
from . import models  # noqa: F401

__version__ = "0.1.0"
