"""``nir``: a network read from a NIR graph file, e.g. one trained in snnTorch, Norse or SpikingJelly and exported
to NIR (``fewstep import GRAPH --data CONFIG --out RUN`` makes a run folder of it; :mod:`fewstep.nir_io`).

The graph fixes the layers, their weights and the neurons (threshold, leak), read with the step duration ``dt``
(``model.options.dt``, else the graph's ``metadata["dt"]``, else 1). A graph whose input is flat (``[D]``) takes
samples of any shape with ``D`` values: they are flattened first, as the exporting library did.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from .. import layers as L
from .registry import register

# model keys the graph decides: set in a config with model.name: nir they would be silently ignored
GRAPH_DECIDES = ("neuron", "tau", "theta", "v0", "reset", "norm", "levels", "learn_theta")


@register("nir")
def nir(input_shape, num_classes: int, graph: str = "", dt=None, **_neuron):
    """The network of the NIR file ``graph`` (see the module docstring); its input shape and class count must be
    the dataset's."""
    from ..nir_io import from_nir

    if not graph:
        raise ValueError("model 'nir' needs model.options.graph, the path of a NIR file")
    net = from_nir(graph, dt)
    want = tuple(int(s) for s in input_shape)
    if net.input_shape != want:
        if len(net.input_shape) == 1 and net.input_shape[0] == math.prod(want):
            net.layers = _flatten_first(net.layers)
            net.input_shape = want
        else:
            raise ValueError(f"the NIR graph {graph} takes input {list(net.input_shape)}, but the dataset's samples "
                             f"are {list(want)}")
    if net.num_classes != int(num_classes):
        raise ValueError(f"the NIR graph {graph} has {net.num_classes} outputs, but the dataset has {num_classes} "
                         "classes")
    return net


def _flatten_first(seq: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("flatten_input", L.Flatten(1, -1)), *seq.named_children()]))
