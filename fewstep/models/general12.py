"""The general SNN at T = 1: ``general12_cnn`` and ``general12_lstm`` (METHODS §5).

Shen et al., "Rethinking the membrane dynamics and optimization objectives of spiking neural
networks", ACML 2023 (arXiv 2401.10843; authors' code iverss1/ACML_SNN). A Sequencer2D-style
hybrid in which only the token mixer spikes; stem, channel MLPs, patch merging, residual stream
and head are real-valued::

    stem  Conv(3→d0, k = s = patch)                     tokens [N, H, W, C], channels last
    block x = x + Mixer(x);  x = x + MLP(x)             MLP: Linear(C→rC) → GELU → Linear(rC→C)
    stage blocks, then PatchMerging (2×2 tokens → Linear(4C→2C)) between stages
    head  mean over tokens → Linear(C→classes)

The mixer splits the token map into windows visited in order TL, TR, BL, BR ("multi receptive
field"): plain quadrants and overlapping corner windows of 3/4 the side ("dilated") alternate
from block to block (the last stage always uses quadrants). Each window's tokens are encoded as
spikes and fed to a spiking cell whose membrane carries over from window to window::

    neuron   U = τ·U_init + I,   S = H(U − θ)   (τ = 0.4, θ = 0.5, rectangular surrogate of width 1;
             the carried membrane is the pre-reset U)
    CNN cell c1_p = τ·c1_{p−1} + conv1(x_p);   c2_p = τ·Ω(c2_{p−1}, c1_{p−1}) + conv2(S1_p)
    LSTM     U_p = τ·Ω(U_{p−1}, M_p) + BiLSTM(x_p), M = the previous block's membrane map
             (patch-merged by a learned Linear at stage changes)
    Ω(a, b)  = 2·sin(θ_Ω π/2 · a · cos(θ_Ω π/2 · b)),  θ_Ω = 0.5

Re-tiling averages the windows' spikes where they overlap (0.25/0.5/0.75 "median spikes"),
optionally binarised by a region threshold (``x > 0.1 → 1``), then a Linear mixes channels.

Where the paper and the authors' code disagree, fewstep makes the choice explicit (docs/models.md):
``omega_args`` says which membrane is Ω's first argument (``window_layer``: a = the same layer's
previous window, b = the previous layer, as the paper's text orders them; ``layer_window`` swaps
them, as METHODS writes the CNN formula); ``omega`` picks Ω, ``mean`` (the authors' CNN code) or
``sum``; ``encoding`` picks the authors' ``bernoulli`` re-encoding (random, blocks gradients),
``straight_through`` (fewstep's default: deterministic ``H(x − 0.5)`` whose gradient passes as the
identity on [0, 1]) or ``direct`` (analog tokens). All state lives in the forward call.

With T > 1 every step is run independently (the design is single-step); logits are ``[T, N, C]``
like every fewstep network. ``published_param_count=True`` also builds, and never runs, the
reverse-order cell and the Conv1d that the authors' code constructs in every mixer: with them the
full CIFAR-10 CNN variant has the paper's 26.84 M parameters; without them (default) it has the
13.9 M that the forward pass uses.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import surrogate as _surrogate
from ..neurons import StatefulModule
from .registry import SNN, register

OMEGAS = ("omega", "mean", "sum")
OMEGA_ARGS = ("window_layer", "layer_window")
ENCODINGS = ("bernoulli", "straight_through", "direct")
WINDOWS = ("alternate", "plain", "global")
CELLS = ("cnn", "lstm")


def _choice(what: str, value, valid) -> str:
    if value not in valid:
        raise ValueError(f"general12: unknown {what} {value!r}; valid names: {', '.join(valid)}")
    return value


# ------------------------------------------------------------------------------------------ functions
def omega(a: torch.Tensor, b: torch.Tensor, theta: float = 0.5) -> torch.Tensor:
    """The projection Ω(a, b) = 2·sin(θπ/2 · a · cos(θπ/2 · b)) (METHODS §5): Ω(a, 0) = 2 sin(θπ/2·a)."""
    k = theta * math.pi / 2
    return 2.0 * torch.sin(k * a * torch.cos(k * b))


def merge_membranes(kind: str, a: torch.Tensor, b: torch.Tensor, theta: float = 0.5) -> torch.Tensor:
    """Merge two membrane sources: ``omega`` (Ω(a, b)), ``mean`` ((a + b)/2) or ``sum`` (a + b)."""
    if kind == "omega":
        return omega(a, b, theta)
    if kind == "mean":
        return 0.5 * (a + b)
    if kind == "sum":
        return a + b
    raise ValueError(f"general12: unknown omega {kind!r}; valid names: {', '.join(OMEGAS)}")


def window_boxes(h: int, w: int, kind: str) -> list[tuple[int, int, int, int]]:
    """``(top, left, height, width)`` of the windows of an h×w map, in visiting order TL, TR, BL, BR.

    ``plain``: the four quadrants (h/2 × w/2); ``dilated``: four corner windows of 3/4 the side,
    overlapping in the middle; ``global``: one window, the whole map (g = 1). The paper's maps have
    sides divisible by 4; on other sides fewstep rounds a window's side up (⌈h/2⌉, ⌈3h/4⌉), so the
    windows still cover the map and overlap by the extra rows and columns, which re-tiling averages
    (fewstep's extension, not the paper's)."""
    if kind == "global":
        return [(0, 0, h, w)]
    if kind not in ("plain", "dilated"):
        raise ValueError(f"unknown window kind {kind!r}; valid names: plain, dilated, global")
    if h < 2 or w < 2:
        raise ValueError(f"{kind} windows need a token map of at least 2x2, got {h}x{w}")
    if kind == "plain":
        wh, ww = -(-h // 2), -(-w // 2)
    else:
        wh, ww = -(-3 * h // 4), -(-3 * w // 4)
    return [(0, 0, wh, ww), (0, w - ww, wh, ww), (h - wh, 0, wh, ww), (h - wh, w - ww, wh, ww)]


def split_windows(x: torch.Tensor, boxes) -> list[torch.Tensor]:
    """The windows ``x[..., top:top+height, left:left+width]`` of a ``[..., H, W]`` map."""
    return [x[..., t:t + hh, l:l + ww] for t, l, hh, ww in boxes]


def tile_windows(parts, boxes, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`split_windows`: place every window back and average where windows overlap."""
    if len(boxes) == 1 and boxes[0] == (0, 0, h, w):
        return parts[0]
    out = parts[0].new_zeros(*parts[0].shape[:-2], h, w)
    count = parts[0].new_zeros(h, w)
    for p, (t, l, hh, ww) in zip(parts, boxes):
        pad = (l, w - l - ww, t, h - t - hh)
        out = out + nn.functional.pad(p, pad)
        count[t:t + hh, l:l + ww] += 1
    return out / count


def encode(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Spike-encode a mixer input: ``bernoulli`` (``x > U[0, 1)``, no gradient; the authors'),
    ``straight_through`` (``H(x − 0.5)``, gradient 1 on [0, 1]) or ``direct`` (``x`` itself)."""
    if kind == "direct":
        return x
    if kind == "bernoulli":
        return (x > torch.rand_like(x)).to(x.dtype)
    if kind == "straight_through":
        c = x.clamp(0.0, 1.0)
        return c + ((x > 0.5).to(x.dtype) - c).detach()
    raise ValueError(f"general12: unknown encoding {kind!r}; valid names: {', '.join(ENCODINGS)}")


# ------------------------------------------------------------------------------------------ modules
class Fire(StatefulModule):
    """``S = H(U − θ)`` with a surrogate gradient, on a membrane ``U`` its caller computed.

    Holds no state (the cells carry membranes in their forward call); it exists so that
    ``fewstep.record`` and the op counter see these spikes like any other spiking layer's. A
    recorder gets one entry per window (windows take the place of time steps)."""

    _state_names = ()

    def __init__(self, theta: float = 0.5, surrogate="rectangle"):
        super().__init__()
        self.theta = float(theta)
        self.surrogate = _surrogate.get(surrogate)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        s = self.surrogate(u - self.theta)
        rec = self._recorder
        if rec is not None:
            rec.add(self, s.unsqueeze(0), u.unsqueeze(0), u.unsqueeze(0))
        return s

    def post_reset(self, u: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return u  # the carried membrane is the pre-reset U

    def extra_repr(self) -> str:
        return f"theta={self.theta:g}, surrogate={self.surrogate.name}"


class _CellBase(nn.Module):
    def __init__(self, tau, theta, surrogate, merge, merge_theta, omega_args, encoding):
        super().__init__()
        self.tau, self.merge, self.merge_theta = float(tau), merge, float(merge_theta)
        self.omega_args, self.encoding = omega_args, encoding
        self._fire = (theta, surrogate)

    def combine(self, window: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        """Merge the previous-window membrane and the previous-layer membrane in the chosen order."""
        a, b = (window, layer) if self.omega_args == "window_layer" else (layer, window)
        return merge_membranes(self.merge, a, b, self.merge_theta)


class ConvCell(_CellBase):
    """Two 3×3 conv-LIF layers whose membranes carry from window to window (METHODS §5)."""

    def __init__(self, cin: int, hid: int, **kw):
        super().__init__(**kw)
        self.conv1 = nn.Conv2d(cin, hid, 3, padding=1)
        self.conv2 = nn.Conv2d(hid, hid, 3, padding=1)
        self.conv1.analog_input = self.encoding == "direct"  # analog tokens: MACs, not SOPs (METHODS §8)
        self.fire1, self.fire2 = Fire(*self._fire), Fire(*self._fire)

    def forward(self, parts, mems=None):
        c1 = c2 = None
        outs = []
        for p in parts:
            u1 = self.conv1(encode(p, self.encoding))
            if c1 is not None:
                u1 = u1 + self.tau * c1
            s1 = self.fire1(u1)
            u2 = self.conv2(s1)
            if c2 is not None:  # c1 still holds the previous window's first-layer membrane here
                u2 = u2 + self.tau * self.combine(c2, c1)
            s2 = self.fire2(u2)
            c1, c2 = u1, u2
            outs.append(s2)
        return outs, None


class LSTMCell(_CellBase):
    """A bidirectional LSTM over each window's tokens gives the input current of one spiking layer,
    whose membrane carries from window to window and, as the map ``M``, from block to block."""

    def __init__(self, cin: int, hid: int, **kw):
        super().__init__(**kw)
        if hid % 2:
            raise ValueError(f"general12_lstm: the hidden width must be even (two LSTM directions), got {hid}")
        self.lstm = nn.LSTM(cin, hid // 2, batch_first=True, bidirectional=True)
        self.fire = Fire(*self._fire)
        self.hid = hid

    def forward(self, parts, mems=None):
        prev = None
        outs, us = [], []
        for i, p in enumerate(parts):
            n, c, h, w = p.shape
            tokens = encode(p, self.encoding).flatten(2).transpose(1, 2)  # [N, h·w, C], row-major
            u = self.lstm(tokens)[0].transpose(1, 2).reshape(n, self.hid, h, w)
            layer = None if mems is None else mems[i]
            if prev is not None or layer is not None:
                u = u + self.tau * self.combine(prev if prev is not None else torch.zeros_like(u),
                                                layer if layer is not None else torch.zeros_like(u))
            outs.append(self.fire(u))
            us.append(u)
            prev = u
        return outs, us


class SpikingMixer(nn.Module):
    """Split into windows → spiking cell with window recurrence → re-tile (average overlaps) →
    optional region threshold → Linear. Works on channels-last tokens ``[N, H, W, C]``."""

    def __init__(self, dim: int, kind: str, cell: str, region_threshold, published_param_count: bool, **kw):
        super().__init__()
        self.kind = kind
        self.region_threshold = None if region_threshold is None else float(region_threshold)
        self.cell = (ConvCell if cell == "cnn" else LSTMCell)(dim, dim, **kw)
        self.fc = nn.Linear(dim, dim)
        if published_param_count and cell == "cnn":
            # Built and never run, as in the authors' code, so the parameter count matches the paper's.
            self.unused = nn.ModuleDict({"reverse_cell": ConvCell(dim, dim, **kw),
                                         "conv1d": nn.Conv1d(dim, 2 * dim, 3, padding=1)})

    def forward(self, x: torch.Tensor, mem: "torch.Tensor | None" = None):
        n, h, w, c = x.shape
        boxes = window_boxes(h, w, self.kind)
        xc = x.permute(0, 3, 1, 2)  # NCHW view of channels-last memory
        parts = split_windows(xc, boxes)
        mems = None if mem is None else split_windows(mem, boxes)
        outs, us = self.cell(parts, mems)
        y = tile_windows(outs, boxes, h, w)
        if self.kind == "dilated" and self.region_threshold is not None:
            y = y + ((y > self.region_threshold).to(y.dtype) - y).detach()  # binarise, straight-through
        new_mem = None if us is None else tile_windows(us, boxes, h, w)
        return self.fc(y.permute(0, 2, 3, 1)), new_mem


class Block(nn.Module):
    """``x = x + Mixer(x); x = x + MLP(x)`` (LayerNorm before each with ``layernorm=True``)."""

    def __init__(self, dim: int, kind: str, mlp_ratio: float, norm: bool, **mixer):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()
        self.mixer = SpikingMixer(dim, kind, **mixer)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()
        hidden = int(round(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                m.analog_input = True  # real-valued input: the op counter counts MACs, not SOPs

    def forward(self, x, mem=None):
        y, mem = self.mixer(self.norm1(x), mem)
        x = x + y
        return x + self.mlp(self.norm2(x)), mem


class PatchMerging(nn.Module):
    """2×2 neighbouring tokens concatenated (4C) → Linear(4C → 2C, no bias); halves H and W.
    A map with an odd side is first padded with zero tokens at the bottom/right (as Swin does)."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.reduction.analog_input = True

    def forward(self, x):
        h, w = x.shape[1], x.shape[2]
        if h % 2 or w % 2:
            x = nn.functional.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(x)


class General12(SNN):
    """The general T = 1 network (module docstring). Input ``[T, N, C, H, W]`` → logits ``[T, N, classes]``."""

    spikes_time_first = False  # its spiking layers see windows of T·N folded frames, not [T, N, ...]

    def __init__(self, input_shape, num_classes, cell="cnn", patch=2, depths=(2, 2, 6, 2), dims=(48, 96, 192, 384),
                 mlp_ratio=3.0, windows="alternate", omega="omega", omega_args="window_layer", omega_theta=0.5,
                 encoding="straight_through", region_threshold=0.1, layernorm=False, published_param_count=False,
                 tau=0.4, theta=0.5, surrogate="rectangle"):
        super().__init__(input_shape, num_classes)
        name = f"general12_{cell}"
        _choice("cell", cell, CELLS)
        _choice("windows", windows, WINDOWS)
        _choice("omega", omega, OMEGAS)
        _choice("omega_args", omega_args, OMEGA_ARGS)
        _choice("encoding", encoding, ENCODINGS)
        depths, dims = [int(d) for d in depths], [int(d) for d in dims]
        if len(depths) != len(dims) or not depths or min(depths + dims) < 1:
            raise ValueError(f"{name}: depths {depths} and dims {dims} must be equally long lists of numbers >= 1")
        if any(b != 2 * a for a, b in zip(dims, dims[1:])):
            raise ValueError(f"{name}: patch merging doubles the width from stage to stage, so dims must be "
                             f"d, 2d, 4d, ...; got {dims}")
        if len(self.input_shape) != 3:
            raise ValueError(f"{name}: input must be images [C, H, W], got input_shape {self.input_shape}")
        c, h, w = self.input_shape
        patch = int(patch)
        if h % patch or w % patch:
            raise ValueError(f"{name}: the stem's patch {patch} does not divide the input {h}x{w}")
        self.kinds = self._window_kinds(depths, windows)
        self._check_tiling(name, h // patch, w // patch, patch)

        self.stem = nn.Conv2d(c, dims[0], patch, stride=patch)
        kw = dict(tau=tau, theta=theta, surrogate=surrogate, merge=omega, merge_theta=omega_theta,
                  omega_args=omega_args, encoding=encoding)
        self.cell_kind = cell
        # the published count's extra cells never run: DDP must look for parameters without gradients
        self.has_unused_parameters = bool(published_param_count and cell == "cnn")
        self.stages = nn.ModuleList(
            nn.ModuleList(Block(d, k, mlp_ratio, layernorm, cell=cell, region_threshold=region_threshold,
                                published_param_count=published_param_count, **kw) for k in kinds)
            for d, kinds in zip(dims, self.kinds))
        self.merges = nn.ModuleList(PatchMerging(d) for d in dims[:-1])
        # the LSTM variant carries its membrane map across stages through a learned merge of its own
        self.mem_merges = nn.ModuleList(PatchMerging(d) for d in dims[:-1]) if cell == "lstm" else None
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6) if layernorm else nn.Identity()
        self.head = nn.Linear(dims[-1], num_classes)
        self.head.analog_input = True

    @staticmethod
    def _window_kinds(depths, windows) -> list[list[str]]:
        last = len(depths) - 1
        kinds = []
        for i, n in enumerate(depths):
            if windows == "global":
                kinds.append(["global"] * n)
            elif windows == "plain" or i == last:
                kinds.append(["plain"] * n)
            else:
                kinds.append(["plain" if j % 2 == 0 else "dilated" for j in range(n)])
        return kinds

    def _check_tiling(self, name, h, w, patch):
        """Quadrant and dilated windows and patch merging (which pads an odd side) need at least 2×2 tokens;
        only a last stage with one window may get 1×1."""
        last = len(self.kinds) - 1
        needs = [2 if i < last or any(k != "global" for k in ks) else 1 for i, ks in enumerate(self.kinds)]
        for i, need in enumerate(needs):
            if h < need or w < need:
                # stage j sees ceil(side / 2^j) tokens: the deepest stage that needs 2 sets the smallest side
                j = max(k for k, n in enumerate(needs) if n == 2)
                what = "patch merging needs" if all(k == "global" for k in self.kinds[i]) else \
                    f"its windows ({', '.join(sorted(set(self.kinds[i])))}) need"
                raise ValueError(
                    f"{name}: stage {i} gets a {h}x{w} token map, but {what} at least 2x2 tokens; with patch "
                    f"{patch} and {len(needs)} stages the input sides must be at least {(2 ** j + 1) * patch}: use "
                    f"a smaller patch or fewer stages")
            h, w = -(-h // 2), -(-w // 2)

    def body(self, x):
        lead = x.shape[:-3]
        x = self.stem(x.flatten(0, len(lead) - 1)).permute(0, 2, 3, 1)  # [B, H, W, C] (channels-last memory)
        mem = None
        for i, stage in enumerate(self.stages):
            for block in stage:
                x, mem = block(x, mem)
            if i < len(self.merges):
                x = self.merges[i](x)
                if mem is not None:
                    mem = self.mem_merges[i](mem.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(self.norm(x).mean(dim=(1, 2)).unflatten(0, lead))  # the head sees [T, N, C] (TRT reads it)


_NEURON_DEFAULTS = {"neuron": "lif", "v0": 0.0, "reset": "hard", "detach_reset": False, "learn_theta": False}


def _build(cell, input_shape, num_classes, neuron_opts, **options) -> General12:
    name = f"general12_{cell}"
    bad = [k for k, v in neuron_opts.items() if k in _NEURON_DEFAULTS and v != _NEURON_DEFAULTS[k]]
    bad += [k for k in neuron_opts if k not in _NEURON_DEFAULTS and k not in ("tau", "theta", "surrogate")]
    if bad:
        raise ValueError(f"{name}: option(s) {sorted(bad)} do not apply; its neurons are fixed by METHODS §5 "
                         "(set tau = the decay, theta = the threshold, surrogate)")
    for k in ("tau", "theta", "surrogate"):
        if k in neuron_opts and neuron_opts[k] is not None:
            options[k] = neuron_opts[k]
    return General12(input_shape, num_classes, cell=cell, **options)


@register("general12_cnn")
def general12_cnn(input_shape=(3, 32, 32), num_classes=10, patch=2, depths=(2, 2, 6, 2), dims=(48, 96, 192, 384),
                  mlp_ratio=3.0, windows="alternate", omega="omega", omega_args="window_layer", omega_theta=0.5,
                  encoding="straight_through", region_threshold=0.1, layernorm=False, published_param_count=False,
                  **neuron) -> General12:
    """The conv-LIF-cell variant; defaults are the paper's CIFAR network."""
    return _build("cnn", input_shape, num_classes, neuron, patch=patch, depths=depths, dims=dims,
                  mlp_ratio=mlp_ratio, windows=windows, omega=omega, omega_args=omega_args, omega_theta=omega_theta,
                  encoding=encoding, region_threshold=region_threshold, layernorm=layernorm,
                  published_param_count=published_param_count)


@register("general12_lstm")
def general12_lstm(input_shape=(3, 32, 32), num_classes=10, patch=2, depths=(2, 2, 6, 2), dims=(48, 96, 192, 384),
                   mlp_ratio=3.0, windows="alternate", omega="omega", omega_args="window_layer", omega_theta=0.5,
                   encoding="straight_through", region_threshold=0.1, layernorm=False, **neuron) -> General12:
    """The bidirectional-LSTM-cell variant; defaults are the paper's CIFAR network."""
    return _build("lstm", input_shape, num_classes, neuron, patch=patch, depths=depths, dims=dims,
                  mlp_ratio=mlp_ratio, windows=windows, omega=omega, omega_args=omega_args, omega_theta=omega_theta,
                  encoding=encoding, region_threshold=region_threshold, layernorm=layernorm)
