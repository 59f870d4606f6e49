"""Gate values inside recurrent cells (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell).

The gates are computed inside torch's fused kernels, where no function mode sees them.
A forward hook takes what the module saw (its input and initial state) and recomputes,
under no_grad, each layer's hidden-state sequence with a one-layer copy of that layer
(the same kernel) and from it every gate pre-activation of every step and direction:

* LSTM (gate order i, f, g, o): W_ih x_t + b_ih + W_hh h_{t-1} + b_hh, split in four;
  i, f, o through a sigmoid, g through a tanh;
* GRU (order r, z, n): r, z = sigmoid(W_i x_t + b_i + W_h h_{t-1} + b_h), and
  n = tanh(W_in x_t + b_in + r * (W_hn h_{t-1} + b_hn)).

Padded steps of a PackedSequence are left out. With inter-layer dropout in train mode the
input of layers >= 1 is random: only layer 0 is judged, and a note says so.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from nnhealth.capture.stats import GateStats

# per cell family: (gate, function) in torch's chunk order
GATES: dict[str, tuple[tuple[str, str], ...]] = {
    "LSTM": (("input", "sigmoid"), ("forget", "sigmoid"), ("cell", "tanh"), ("output", "sigmoid")),
    "GRU": (("reset", "sigmoid"), ("update", "sigmoid"), ("new", "tanh")),
}
RECURRENT_TYPES: tuple[type, ...] = (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell)
_WEIGHT_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


def cell_family(module: nn.Module) -> str:
    return "LSTM" if isinstance(module, (nn.LSTM, nn.LSTMCell)) else "GRU"


def gate_values(
    family: str,
    x: torch.Tensor,
    h: torch.Tensor,
    w_ih: torch.Tensor,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """gate -> (pre-activation, value) for inputs ``x`` [..., in] and previous hidden
    states ``h`` [..., hidden]."""
    gi = x @ w_ih.T + (0 if b_ih is None else b_ih)
    gh = h @ w_hh.T + (0 if b_hh is None else b_hh)
    if family == "LSTM":
        pre = (gi + gh).chunk(4, dim=-1)
        return {
            name: (p, torch.sigmoid(p) if fn == "sigmoid" else torch.tanh(p))
            for (name, fn), p in zip(GATES["LSTM"], pre, strict=True)
        }
    ir, iz, i_n = gi.chunk(3, dim=-1)
    hr, hz, h_n = gh.chunk(3, dim=-1)
    r_pre, z_pre = ir + hr, iz + hz
    r = torch.sigmoid(r_pre)
    n_pre = i_n + r * h_n
    return {
        "reset": (r_pre, r),
        "update": (z_pre, torch.sigmoid(z_pre)),
        "new": (n_pre, torch.tanh(n_pre)),
    }


@dataclass
class _Sums:
    values: int = 0
    below: int = 0
    above: int = 0
    total: float = 0.0
    pre_total: float = 0.0
    pre_squares: float = 0.0


@dataclass
class GateRecorder:
    """Gate statistics of every recurrent module of one pass, summed over its calls
    (an LSTMCell runs once per step). ``bounds``: function -> (lo, hi) saturation bounds."""

    bounds: dict[str, tuple[float, float]]
    sums: dict[tuple, _Sums] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: tuple, fn: str, pre: torch.Tensor, gate: torch.Tensor) -> None:
        lo, hi = self.bounds[fn]
        s = self.sums.setdefault(key, _Sums())
        p = pre.double()
        s.values += gate.numel()
        s.below += int((gate <= lo).sum())
        s.above += int((gate >= hi).sum())
        s.total += float(gate.double().sum())
        s.pre_total += float(p.sum())
        s.pre_squares += float(p.square().sum())

    def on_call(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Recompute and count the gates of one call of ``module``."""
        kind = type(module).__name__
        family = cell_family(module)
        notes: list[str] = []
        for layer, direction, gates, mask in iter_gates(module, args, kwargs, notes):
            for gate, fn in GATES[family]:
                pre, value = gates[gate]
                if mask is not None:
                    pre, value = pre[mask], value[mask]
                self.add((name, kind, layer, direction, gate, fn), fn, pre, value)
        self.notes += [f"{name}: {n}" for n in notes if f"{name}: {n}" not in self.notes]

    def freeze(self) -> tuple[GateStats, ...]:
        out = []
        for (name, kind, layer, direction, gate, fn), s in self.sums.items():
            lo, hi = self.bounds[fn]
            out.append(
                GateStats(
                    module=name,
                    kind=kind,
                    layer=layer,
                    direction=direction,
                    gate=gate,
                    function=fn,
                    chunk=[g for g, _ in GATES[cell_family_of_kind(kind)]].index(gate),
                    values=s.values,
                    below=s.below,
                    above=s.above,
                    lo=lo,
                    hi=hi,
                    total=s.total,
                    pre_total=s.pre_total,
                    pre_squares=s.pre_squares,
                )
            )
        return tuple(out)


Gates = dict[str, tuple[torch.Tensor, torch.Tensor]]


def iter_gates(
    module: nn.Module, args: tuple, kwargs: dict, notes: list[str] | None = None
) -> Iterator[tuple[int, int, Gates, torch.Tensor | None]]:
    """(layer, direction, gate -> (pre-activation, value) [N, T, H] or [N, H], mask of
    the real steps [N, T] or None) of one call of ``module`` on ``args``/``kwargs``."""
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    family = cell_family(module)
    with torch.no_grad():
        if isinstance(module, (nn.LSTMCell, nn.GRUCell)):
            yield 0, 0, _cell(module, family, x, hx), None
        else:
            yield from _sequence(module, family, x, hx, notes)


def _cell(module: nn.Module, family: str, x: torch.Tensor, hx) -> Gates:
    x = _float(x.unsqueeze(0) if x.dim() == 1 else x)
    h = hx[0] if isinstance(hx, tuple) else hx
    if h is None:
        h = torch.zeros(x.shape[0], module.hidden_size, dtype=x.dtype, device=x.device)
    weights = [_float(getattr(module, n, None)) for n in _WEIGHT_NAMES[:4]]
    return gate_values(family, x, _float(h.reshape(x.shape[0], -1)), *weights)


def _sequence(module: nn.Module, family: str, x, hx, notes: list[str] | None):
    layers = module.num_layers
    if layers > 1 and module.training and module.dropout > 0:
        if notes is not None:
            notes.append(
                f"gates of layer 0 only for {type(module).__name__} with dropout: layers "
                f"1-{layers - 1} take their inputs through dropout in train mode, which "
                "cannot be recomputed exactly"
            )
        layers = 1
    dirs = 2 if module.bidirectional else 1
    h0 = hx[0] if isinstance(hx, tuple) else hx
    layer_in = x
    for k in range(layers):
        state = None if hx is None else _state_slice(hx, k * dirs, (k + 1) * dirs)
        layer_out = _one_layer(module, k)(layer_in, state)[0]
        xs, lengths = _batch_first(layer_in, module.batch_first)
        hs, _ = _batch_first(layer_out, module.batch_first)
        for d in range(dirs):
            h_init = _initial(h0, k * dirs + d, hs, module)
            prev = _previous(hs.chunk(dirs, dim=-1)[d], h_init, lengths, d == 1)
            suffix = f"_l{k}" + ("_reverse" if d else "")
            weights = [_float(getattr(module, n + suffix, None)) for n in _WEIGHT_NAMES[:4]]
            gates = gate_values(family, _float(xs), _float(prev), *weights)
            yield k, d, gates, _valid(lengths, xs)
        layer_in = layer_out


def cell_family_of_kind(kind: str) -> str:
    return "LSTM" if kind.startswith("LSTM") else "GRU"


def _float(t: torch.Tensor | None) -> torch.Tensor | None:
    """float32 at least (a bfloat16 product drifts); float64 stays float64."""
    if t is None or t.dtype in (torch.float32, torch.float64):
        return t
    return t.float()


def _state_slice(hx, start: int, stop: int):
    if isinstance(hx, tuple):
        return tuple(t[start:stop] for t in hx)
    return hx[start:stop]


def _one_layer(module: nn.Module, k: int) -> nn.Module:
    """A one-layer nn.LSTM/nn.GRU holding layer ``k``'s weights (made on the meta device:
    no random init, the caller's generator untouched)."""
    w = module.weight_ih_l0
    dirs = 2 if module.bidirectional else 1
    width = module.proj_size if getattr(module, "proj_size", 0) else module.hidden_size
    kwargs = {
        "input_size": module.input_size if k == 0 else dirs * width,
        "hidden_size": module.hidden_size,
        "num_layers": 1,
        "bias": module.bias,
        "batch_first": module.batch_first,
        "bidirectional": module.bidirectional,
    }
    if isinstance(module, nn.LSTM):
        kwargs["proj_size"] = module.proj_size
    cls = nn.LSTM if isinstance(module, nn.LSTM) else nn.GRU
    copy = cls(**kwargs, device="meta", dtype=w.dtype).to_empty(device=w.device)
    for suffix in ("", "_reverse")[:dirs]:
        for name in _WEIGHT_NAMES:
            src = getattr(module, f"{name}_l{k}{suffix}", None)
            if src is not None:
                getattr(copy, f"{name}_l0{suffix}").copy_(src)
    copy.flatten_parameters()
    return copy.train(module.training)


def _batch_first(seq, batch_first: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values [N, T, F], lengths [N] or None when every sequence is full)."""
    if isinstance(seq, PackedSequence):
        values, lengths = pad_packed_sequence(seq, batch_first=True)
        return values, lengths.to(values.device)
    if seq.dim() == 2:  # unbatched (T, F)
        return seq.unsqueeze(0), None
    return (seq if batch_first else seq.transpose(0, 1)), None


def _initial(h0: torch.Tensor | None, index: int, hs: torch.Tensor, module) -> torch.Tensor:
    """The initial hidden state [N, H] of one layer and direction (zeros when none)."""
    n = hs.shape[0]
    width = hs.shape[-1] // (2 if module.bidirectional else 1)
    if h0 is None:
        return hs.new_zeros(n, width)
    return h0[index].reshape(n, width)


def _previous(
    h: torch.Tensor, h_init: torch.Tensor, lengths: torch.Tensor | None, reverse: bool
) -> torch.Tensor:
    """The hidden state each step starts from: h_{t-1} (forward) or h_{t+1} (reverse,
    which starts at each sequence's own last step)."""
    first = h_init[:, None, :]
    if not reverse:
        return torch.cat([first, h[:, :-1]], dim=1)
    shifted = torch.cat([h[:, 1:], torch.zeros_like(first)], dim=1)
    steps = torch.arange(h.shape[1], device=h.device)
    last = h.shape[1] - 1 if lengths is None else (lengths - 1)[:, None]
    starts = (steps[None, :] == last)[..., None]
    if lengths is None:
        starts = starts.expand(h.shape[0], -1, 1)
    return torch.where(starts, first, shifted)


def _valid(lengths: torch.Tensor | None, xs: torch.Tensor) -> torch.Tensor | None:
    """[N, T] mask of the steps of each sequence (None: all of them)."""
    if lengths is None:
        return None
    steps = torch.arange(xs.shape[1], device=xs.device)
    return steps[None, :] < lengths[:, None]
