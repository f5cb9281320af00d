"""Export a trained network to NIR and rebuild a fewstep network from a NIR graph.

NIR (Neural Intermediate Representation, the ``nir`` package; Pedersen et al., Nature Communications 2024)
is the exchange format neuromorphic simulators and chips read. Install it with ``pip install fewstep[nir]``.

NIR neurons are ODEs; fewstep's are discrete-time (METHODS §0). With one fewstep step lasting ``dt`` (stored in
the graph's metadata as ``dt``; default 1), fewstep's LIF and IF are NIR's LIF and IF integrated by forward
Euler, exactly::

    fewstep LIF   u(t) = τ·v(t−1) + I(t)      NIR LIF  tau = dt/(1−τ), r = 1/(1−τ), v_leak = 0,
                                                        v_threshold = θ, v_reset = 0
    fewstep IF    u(t) = v(t−1) + I(t)        NIR IF   r = 1/dt, v_threshold = θ, v_reset = 0

(Euler: ``v ← v + dt/tau·(v_leak − v + r·I) = τ·v + I``; ``v ← v + dt·r·I = v + I``.) Both fire and reset to
zero at the threshold. fewstep fires at ``u ≥ θ`` and NIR writes ``v > θ``: they differ only when the membrane
lands exactly on the threshold.

Synaptic layers map one to one: ``Conv2d`` → ``Conv2d``, ``Linear`` → ``Affine`` (``Linear`` without bias),
``AvgPool2d`` → ``AvgPool2d``, ``Flatten`` → ``Flatten``. BatchNorm after a convolution or linear layer is folded
into it (exact in evaluation); dropout is the identity at inference. What NIR cannot represent is refused with
the list of such layers: soft reset (reset by subtraction, e.g. converted QCFS networks), a non-zero initial
membrane, TEBN's per-step scales, max pooling, QCFS activations, and networks that are not a chain of layers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import layers as L
from .models.registry import SNN
from .neurons import IF, LIF, StatefulModule

NIR_HINT = "NIR export needs the nir package: pip install 'fewstep[nir]' (or pip install nir)"


def _nir():
    try:
        import nir
    except ImportError as exc:  # an optional extra
        raise RuntimeError(NIR_HINT) from exc
    return nir


def _np(t) -> np.ndarray:
    return t.detach().cpu().float().numpy().copy()


# ----------------------------------------------------------------------------------------------- tracing
def _units(model: nn.Module):
    """The modules a forward pass runs as units: neurons and other stateful modules whole, else leaves."""
    out = []

    def walk(prefix, m):
        if isinstance(m, StatefulModule) or not any(True for _ in m.children()):
            out.append((prefix, m))
            return
        for n, c in m.named_children():
            walk(f"{prefix}.{n}" if prefix else n, c)

    walk("", model)
    return out


def trace_chain(model: SNN) -> list[tuple[str, nn.Module, tuple]]:
    """``(name, module, output shape per sample)`` of the units the model runs, in order, checking that each
    one takes exactly the previous one's output (a chain). Anything else raises, naming where it breaks."""
    from .neurons import set_step_mode

    set_step_mode(model, "m")
    ref = next(iter(model.parameters()), torch.empty(0))
    x = torch.rand(2, 1, *model.input_shape, dtype=ref.dtype, device=ref.device)
    calls = []
    hooks = []
    for name, m in _units(model):
        hooks.append(m.register_forward_hook(lambda mod, inp, out, name=name: calls.append((name, mod, inp, out))))
    try:
        with torch.no_grad():
            y = model(x)
    finally:
        for h in hooks:
            h.remove()
    prev, chain = x, []
    for name, mod, inp, out in calls:
        if len(inp) != 1 or inp[0] is not prev:
            where = chain[-1][0] if chain else "the input"
            raise ValueError(f"model {getattr(model, 'model_name', type(model).__name__)!r} is not a chain of layers: "
                             f"'{name}' ({type(mod).__name__}) does not take the output of {where!r} (a residual or "
                             "other branch, or an operation outside a module). NIR export supports layer chains")
        chain.append((name, mod, tuple(out.shape[2:])))
        prev = out
    if prev is not y:
        raise ValueError(f"model {getattr(model, 'model_name', type(model).__name__)!r}: its output is not the output of "
                         f"its last layer {chain[-1][0] if chain else ''!r}; NIR export supports layer chains")
    return chain


# ----------------------------------------------------------------------------------------------- export
def _unsupported(name: str, m: nn.Module, prev) -> "str | None":
    """Why ``m`` cannot be exported, or None."""
    from .qcfs import QCFS, ConvertedIF

    kind = type(m).__name__
    if isinstance(m, ConvertedIF):
        return f"{name} ({kind}): IF with soft reset, initial membrane λ/2 and output λ·spike (NIR resets to v_reset)"
    if isinstance(m, QCFS):
        return (f"{name} ({kind}): a quantised ANN activation, and NIR cannot express its conversion "
                f"(fewstep convert gives IF neurons with soft reset) either")
    if isinstance(m, L.TEBN):
        return f"{name} ({kind}): TEBN scales each timestep differently; NIR layers are time-invariant"
    if isinstance(m, LIF):
        why = []
        if m.reset_mode != "hard":
            why.append("soft reset (NIR resets to v_reset)")
        if m.v0 != 0:
            why.append(f"initial membrane v0 = {m.v0:g} (NIR starts at 0)")
        return (f"{name} ({kind}): " + " and ".join(why)) if why else None
    if isinstance(m, StatefulModule):
        return f"{name} ({kind}): a stateful layer NIR has no node for"
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not isinstance(prev, (nn.Conv2d, nn.Linear)):
            return f"{name} ({kind}): BatchNorm not right after a convolution or linear layer cannot be folded"
        return None
    if isinstance(m, nn.AvgPool2d):
        if m.padding not in (0, (0, 0)) or m.ceil_mode:
            return f"{name} ({kind}): padding or ceil_mode (NIR's AvgPool2d has neither)"
        return None
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return None  # checked against the shapes in export
    if isinstance(m, (nn.Conv2d, nn.Linear, nn.Flatten, nn.Dropout, nn.Identity)):
        if isinstance(m, nn.Conv2d) and m.padding_mode != "zeros":
            return f"{name} ({kind}): padding_mode {m.padding_mode!r}"
        return None
    return f"{name} ({kind}): no NIR node for this layer"


def to_nir(model: SNN, dt: float = 1.0):
    """The NIR graph of a fewstep chain network (see the module doc for the mapping)."""
    nir = _nir()
    if not dt > 0:
        raise ValueError(f"dt must be > 0 (the duration of one step), got {dt}")
    model = model.eval()
    chain = trace_chain(model)
    problems, prev = [], None
    for name, m, _ in chain:
        why = _unsupported(name, m, prev)
        if why:
            problems.append(why)
        if not isinstance(m, (nn.Dropout, nn.Identity)):
            prev = m
    if problems:
        raise ValueError(f"model {getattr(model, 'model_name', type(model).__name__)!r} has layers NIR cannot represent:\n  "
                         + "\n  ".join(problems))
    nodes: dict = {"input": nir.Input(input_type=np.array(model.input_shape))}
    order = ["input"]
    shape = tuple(model.input_shape)
    pending = None  # a conv/linear waiting for a BatchNorm to fold: (name, module, out shape)

    def emit(name, node):
        key = name.replace(".", "_")
        nodes[key] = node
        order.append(key)

    def flush():
        nonlocal pending
        if pending is not None:
            name, m, w, b, in_shape = pending
            if isinstance(m, nn.Conv2d):
                bias = _np(b) if b is not None else np.zeros(m.out_channels, dtype=np.float32)
                emit(name, nir.Conv2d(input_shape=tuple(in_shape[1:]), weight=_np(w), stride=m.stride,
                                      padding=m.padding if not isinstance(m.padding, str) else m.padding,
                                      dilation=m.dilation, groups=m.groups, bias=bias))
            elif b is None:
                emit(name, nir.Linear(weight=_np(w)))
            else:
                emit(name, nir.Affine(weight=_np(w), bias=_np(b)))
            pending = None

    for name, m, out_shape in chain:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            flush()
            pending = (name, m, m.weight, m.bias, shape)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            pname, pm, w, b, in_shape = pending
            w, b = L.fold_batchnorm(w, b, m)
            pending = (pname, pm, w, b, in_shape)
        elif isinstance(m, (nn.Dropout, nn.Identity)):
            pass
        else:
            flush()
            if isinstance(m, LIF):
                full = np.ones(out_shape, dtype=np.float32)
                theta = float(m.theta)
                if isinstance(m, IF) or float(m.tau) == 1.0:
                    emit(name, nir.IF(r=full / dt, v_threshold=full * theta, v_reset=full * 0.0))
                else:
                    tau = float(m.tau)
                    emit(name, nir.LIF(tau=full * (dt / (1.0 - tau)), r=full / (1.0 - tau), v_leak=full * 0.0,
                                       v_threshold=full * theta, v_reset=full * 0.0))
            elif isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                if isinstance(m, nn.AdaptiveAvgPool2d):
                    (h, w_), (oh, ow) = shape[1:], out_shape[1:]
                    if h % oh or w_ % ow:
                        raise ValueError(f"model layer {name} (AdaptiveAvgPool2d) maps {h}x{w_} to {oh}x{ow}, which is "
                                         "not a fixed window: NIR's AvgPool2d cannot represent it")
                    k = s = (h // oh, w_ // ow)
                else:
                    k, s = m.kernel_size, m.stride if m.stride is not None else m.kernel_size
                pair = lambda v: np.array(v if isinstance(v, (tuple, list)) else (v, v))  # noqa: E731
                emit(name, nir.AvgPool2d(kernel_size=pair(k), stride=pair(s), padding=np.array([0, 0])))
            elif isinstance(m, nn.Flatten):
                rank = len(shape)
                start = m.start_dim - 1 if m.start_dim >= 0 else rank + m.start_dim + 1
                end = m.end_dim - 1 if m.end_dim >= 0 else (m.end_dim if m.end_dim == -1 else rank + m.end_dim + 1)
                emit(name, nir.Flatten(input_type={"input": np.array(shape)}, start_dim=start, end_dim=end))
        shape = out_shape
    flush()
    nodes["output"] = nir.Output(output_type=np.array(shape))
    order.append("output")
    edges = list(zip(order[:-1], order[1:]))
    meta = {"dt": float(dt), "source": "fewstep", "model": getattr(model, "model_name", type(model).__name__),
            "num_classes": int(model.num_classes)}
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=meta)


# ----------------------------------------------------------------------------------------------- import
class NIRNetwork(SNN):
    """A fewstep network rebuilt from a NIR graph: a chain of fewstep layers, per-step logits ``[T, N, C]``."""

    def __init__(self, input_shape, num_classes: int, layers: list[nn.Module], names: list[str]):
        super().__init__(input_shape, num_classes)
        self.layers = nn.Sequential()
        for n, m in zip(names, layers):
            self.layers.add_module(n, m)

    def body(self, x):
        return self.layers(x)


def _uniform(node_name: str, field: str, value) -> float:
    a = np.asarray(value, dtype=np.float64)
    if a.size == 0 or not np.all(a == a.flat[0]):
        raise ValueError(f"NIR node {node_name!r}: {field} differs between neurons; fewstep's neurons share one "
                         f"{field} per layer")
    return float(a.flat[0])


def _chain_order(graph) -> list[str]:
    nexts: dict = {}
    for a, b in graph.edges:
        nexts.setdefault(a, []).append(b)
    starts = [k for k, n in graph.nodes.items() if type(n).__name__ == "Input"]
    if len(starts) != 1:
        raise ValueError(f"NIR graph has {len(starts)} Input nodes; fewstep imports graphs with one input")
    order, k = [starts[0]], starts[0]
    while nexts.get(k):
        if len(nexts[k]) != 1:
            raise ValueError(f"NIR graph branches at node {k!r} (to {nexts[k]}); fewstep imports chains of layers")
        k = nexts[k][0]
        if k in order:
            raise ValueError(f"NIR graph has a cycle through node {k!r}; fewstep imports feed-forward chains")
        order.append(k)
    if len(order) != len(graph.nodes):
        missing = sorted(set(graph.nodes) - set(order))
        raise ValueError(f"NIR graph nodes {missing} are not on the path from the input; fewstep imports chains")
    return order


def _gain_into(layers: list, key: str, kind: str, gain: float, what: str, theta: float) -> float:
    """A neuron that scales its input by ``gain`` (NIR's ``r·dt/tau`` for a LIF, ``r·dt`` for an IF; e.g. 0.5 for
    Norse's LIF at dt/tau = 0.5), while fewstep's add it unscaled: the same network, exactly, with the gain moved
    into the last convolution or affine layer before the neuron (through any average pooling and flattening between,
    which commute with a scale; in a chain that layer feeds only this neuron). With no such layer (the neuron reads
    the input, or a layer that does not commute), a positive gain goes into the threshold instead: with leak and
    reset to 0 the membrane of ``u = τ·v + g·I`` is ``g`` times that of ``u = τ·v + I``, so spiking at ``θ / g`` gives
    the same spikes (the recorded membrane is then 1/g of NIR's). Returns the threshold to build the neuron with."""
    if np.isclose(gain, 1.0, rtol=1e-6):
        return theta
    i = len(layers) - 1
    while i >= 0 and isinstance(layers[i], (nn.AvgPool2d, nn.Flatten)):
        i -= 1
    prev = layers[i] if i >= 0 else None
    if isinstance(prev, (nn.Conv2d, nn.Linear)):
        with torch.no_grad():
            prev.weight.mul_(gain)
            if prev.bias is not None:
                prev.bias.mul_(gain)
        return theta
    if gain <= 0:
        raise ValueError(f"NIR node {key!r} ({kind}) has {what} = {gain:g}; fewstep's {kind} adds its input unscaled, "
                         f"and a gain that is not positive can be moved only into a convolution or affine layer before "
                         f"it, not {type(prev).__name__ if prev is not None else 'the input'}")
    return theta / gain


def from_nir(graph, dt: "float | None" = None) -> NIRNetwork:
    """Rebuild a fewstep network from a NIR graph (or the path of a NIR file). ``dt`` defaults to the graph's
    ``metadata['dt']`` (written by fewstep), else 1."""
    nir = _nir()
    if isinstance(graph, (str, Path)):
        if not Path(graph).is_file():
            raise FileNotFoundError(f"no NIR file at {graph}")
        graph = nir.read(str(graph))
    dt = float(dt if dt is not None else (graph.metadata or {}).get("dt", 1.0))
    order = _chain_order(graph)
    layers, names, input_shape, classes = [], [], None, None
    for key in order:
        n = graph.nodes[key]
        kind = type(n).__name__
        if kind == "Input":
            input_shape = tuple(int(v) for v in np.asarray(n.input_type["input"]).reshape(-1))
            continue
        if kind == "Output":
            out = np.asarray(n.output_type["output"]).reshape(-1)
            classes = int(out[-1]) if out.size else None
            continue
        if kind == "Conv2d":
            w = torch.from_numpy(np.asarray(n.weight, dtype=np.float32))
            pad = n.padding
            m = L.Conv2d(w.shape[1] * n.groups, w.shape[0], tuple(w.shape[2:]), stride=tuple(np.atleast_1d(n.stride)),
                         padding=pad if isinstance(pad, str) else tuple(int(p) for p in np.atleast_1d(pad)),
                         dilation=tuple(int(d) for d in np.atleast_1d(n.dilation)), groups=int(n.groups), bias=True)
            m.weight.data.copy_(w)
            m.bias.data.copy_(torch.from_numpy(np.asarray(n.bias, dtype=np.float32)).expand(w.shape[0]))
        elif kind in ("Affine", "Linear"):
            w = torch.from_numpy(np.asarray(n.weight, dtype=np.float32))
            m = L.Linear(w.shape[1], w.shape[0], bias=kind == "Affine")
            m.weight.data.copy_(w)
            if kind == "Affine":
                m.bias.data.copy_(torch.from_numpy(np.asarray(n.bias, dtype=np.float32)))
        elif kind == "AvgPool2d":
            if np.any(np.asarray(n.padding) != 0):
                raise ValueError(f"NIR node {key!r} (AvgPool2d) has padding; fewstep imports unpadded pooling")
            m = L.AvgPool2d(tuple(int(v) for v in np.atleast_1d(n.kernel_size)),
                            tuple(int(v) for v in np.atleast_1d(n.stride)))
        elif kind == "Flatten":
            end = int(n.end_dim)
            m = L.Flatten(int(n.start_dim) + 1, end + 1 if end >= 0 else end)
        elif kind in ("LIF", "IF"):
            theta = _uniform(key, "v_threshold", n.v_threshold)
            if _uniform(key, "v_reset", n.v_reset) != 0.0:
                raise ValueError(f"NIR node {key!r} ({kind}) resets to {float(np.asarray(n.v_reset).flat[0])}; "
                                 "fewstep's hard reset goes to 0")
            if kind == "IF":
                m = IF(theta=_gain_into(layers, key, kind, _uniform(key, "r", n.r) * dt, "r·dt", theta))
            else:
                tau_n, r = _uniform(key, "tau", n.tau), _uniform(key, "r", n.r)
                if _uniform(key, "v_leak", n.v_leak) != 0.0:
                    raise ValueError(f"NIR node {key!r} (LIF) leaks towards v_leak ≠ 0; fewstep's LIF leaks to 0")
                decay = 1.0 - dt / tau_n
                if not 0.0 < decay < 1.0:
                    raise ValueError(f"NIR node {key!r} (LIF): dt/tau = {dt / tau_n:g} gives the decay {decay:g} per "
                                     "step, outside (0, 1); pass the step duration dt the graph was made for")
                m = LIF(tau=decay, theta=_gain_into(layers, key, kind, r * dt / tau_n, "r·dt/tau", theta))
        else:
            raise ValueError(f"NIR node {key!r} is a {kind}, which fewstep cannot rebuild; supported: Conv2d, Affine, "
                             "Linear, AvgPool2d, Flatten, LIF, IF")
        layers.append(m)
        names.append(key)
    if input_shape is None or classes is None:
        raise ValueError("NIR graph needs an Input and an Output node with shapes")
    net = NIRNetwork(input_shape, classes, layers, names).eval()
    net.dt = dt  # the step duration the graph's neurons were read with
    return net
