"""Recurrent gates (capture/recurrent.py, NH102): the gate values recomputed from the
weights and what the module saw equal an explicit step-by-step LSTM/GRU brute force; a
closed forget gate is found and fixed, healthy cells are not flagged."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import nnhealth
from nnhealth.capture.recurrent import iter_gates
from nnhealth.findings import Severity

N, T, IN, H = 5, 7, 4, 6


def _brute_lstm(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One LSTM step written out gate by gate (order i, f, g, o)."""

    def lin(k):
        rows = slice(k * H, (k + 1) * H)
        return x @ w_ih[rows].T + b_ih[rows] + h @ w_hh[rows].T + b_hh[rows]

    i, f, g, o = (
        torch.sigmoid(lin(0)),
        torch.sigmoid(lin(1)),
        torch.tanh(lin(2)),
        torch.sigmoid(lin(3)),
    )
    c = f * c + i * g
    return o * torch.tanh(c), c, {"input": i, "forget": f, "cell": g, "output": o}


def _brute_gru(x, h, w_ih, w_hh, b_ih, b_hh):
    """One GRU step written out (order r, z, n)."""

    def part(w, b, inp, k):
        rows = slice(k * H, (k + 1) * H)
        return inp @ w[rows].T + b[rows]

    r = torch.sigmoid(part(w_ih, b_ih, x, 0) + part(w_hh, b_hh, h, 0))
    z = torch.sigmoid(part(w_ih, b_ih, x, 1) + part(w_hh, b_hh, h, 1))
    n = torch.tanh(part(w_ih, b_ih, x, 2) + r * part(w_hh, b_hh, h, 2))
    return (1 - z) * n + z * h, {"reset": r, "update": z, "new": n}


def _brute(module, x, h0, c0, lengths):
    """{(layer, direction): gate -> [N, T, H]} by explicit steps, sequence by sequence."""
    lstm = isinstance(module, nn.LSTM)
    dirs = 2 if module.bidirectional else 1
    out: dict = {}
    layer_in = x  # [N, T, F] batch first
    for k in range(module.num_layers):
        outputs = []
        for d in range(dirs):
            sfx = f"_l{k}" + ("_reverse" if d else "")
            p = [getattr(module, n + sfx) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            hs = torch.zeros(N, T, H, dtype=x.dtype)
            gates = {}
            for n in range(N):
                h, c = h0[k * dirs + d, n], c0[k * dirs + d, n]
                steps = range(lengths[n]) if d == 0 else reversed(range(lengths[n]))
                for t in steps:
                    if lstm:
                        h, c, g = _brute_lstm(layer_in[n, t], h, c, *p)
                    else:
                        h, g = _brute_gru(layer_in[n, t], h, *p)
                    hs[n, t] = h
                    for name, v in g.items():
                        gates.setdefault(name, torch.zeros(N, T, H, dtype=x.dtype))[n, t] = v
            out[(k, d)] = gates
            outputs.append(hs)
        layer_in = torch.cat(outputs, dim=-1)
    return out


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("packed", [False, True])
def test_gates_equal_the_step_by_step_brute_force(cls, packed: bool) -> None:
    torch.manual_seed(0)
    module = cls(IN, H, num_layers=2, bidirectional=True, batch_first=False).double()
    x = torch.randn(N, T, IN, dtype=torch.float64)
    h0 = torch.randn(4, N, H, dtype=torch.float64)
    c0 = torch.randn(4, N, H, dtype=torch.float64)
    lengths = [7, 5, 7, 2, 4] if packed else [T] * N
    seq = x.transpose(0, 1)  # time first, as the module is built
    if packed:
        seq = pack_padded_sequence(seq, torch.tensor(lengths), enforce_sorted=False)
    state = (h0, c0) if cls is nn.LSTM else h0
    expected = _brute(module, x, h0, c0, lengths)
    got = list(iter_gates(module, (seq, state), {}))
    assert [(k, d) for k, d, _, _ in got] == list(expected)
    valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    for k, d, gates, mask in got:
        assert mask is None or torch.equal(mask, valid)
        for name, want in expected[(k, d)].items():
            value = gates[name][1]
            assert torch.allclose(value[valid], want[valid], atol=1e-6, rtol=0), (k, d, name)


@pytest.mark.parametrize("cls", [nn.LSTMCell, nn.GRUCell])
def test_cell_gates_equal_the_brute_force(cls) -> None:
    torch.manual_seed(0)
    cell = cls(IN, H).double()
    x = torch.randn(N, IN, dtype=torch.float64)
    h, c = torch.randn(N, H, dtype=torch.float64), torch.randn(N, H, dtype=torch.float64)
    p = (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
    if cls is nn.LSTMCell:
        want = _brute_lstm(x, h, c, *p)[2]
        state = (h, c)
    else:
        want = _brute_gru(x, h, *p)[1]
        state = h
    ((_, _, gates, _),) = iter_gates(cell, (x, state), {})
    for name, v in want.items():
        assert torch.allclose(gates[name][1], v, atol=1e-6, rtol=0), name


class Seq(nn.Module):
    def __init__(self, cls=nn.LSTM, forget_bias: float | None = None, **kwargs) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = cls(6, 16, batch_first=True, **kwargs)
        self.head = nn.Linear(16 * (2 if kwargs.get("bidirectional") else 1), 3)
        if forget_bias is not None:
            with torch.no_grad():
                for name, p in self.lstm.named_parameters():
                    if name.startswith("bias"):
                        p[16:32] = forget_bias  # forget chunk (i, f, g, o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(32, 12, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def test_a_closed_forget_gate_is_an_error_with_the_forget_bias_fix() -> None:
    model = Seq(forget_bias=-10.0)
    report = nnhealth.scan(model, _batch(), what_if=True)
    (f,) = [f for f in report.findings if f.code == "NH102"]
    assert f.severity == Severity.ERROR and f.layer == "lstm"
    assert "forget gate of layer 0" in f.message and "100%" in f.message
    assert f.evidence["saturated_values_fraction"] == 1.0
    assert "Jozefowicz" in f.fix
    assert "rnn.bias_ih_l0[h : 2 * h].fill_(1.0)" in f.fix_snippet
    exec(f.fix_snippet, {"model": model, "torch": torch})  # noqa: S102 (runs as written)
    bias = model.lstm.bias_ih_l0 + model.lstm.bias_hh_l0
    assert torch.equal(bias[16:32], torch.ones(16))
    (tried,) = [w for w in report.what_if if w["code"] == "NH102"]
    assert tried["resolved"] and "forget-gate bias 1" in tried["fix"]
    assert not [f for f in nnhealth.scan(model, _batch()).findings if f.code == "NH102"]


def test_other_chunks_are_left_alone_by_the_snippet() -> None:
    model = Seq(forget_bias=-10.0)
    before = {n: p.detach().clone() for n, p in model.lstm.named_parameters()}
    f = next(f for f in nnhealth.scan(model, _batch()).findings if f.code == "NH102")
    exec(f.fix_snippet, {"model": model, "torch": torch})  # noqa: S102
    for name, p in model.lstm.named_parameters():
        keep = torch.ones_like(p, dtype=torch.bool)
        if name.startswith("bias"):
            keep[16:32] = False
        assert torch.equal(p[keep], before[name][keep]), name


def test_deeper_and_reverse_layers_are_judged() -> None:
    report = nnhealth.scan(Seq(forget_bias=-10.0, num_layers=2, bidirectional=True), _batch())
    (f,) = [f for f in report.findings if f.code == "NH102"]
    assert f.evidence["layers_flagged"] == 4
    assert "rnn.bias_ih_l1_reverse[h : 2 * h].fill_(1.0)" in f.fix_snippet


def test_dropout_between_layers_judges_layer_0_and_says_so() -> None:
    model = Seq(forget_bias=-10.0, num_layers=2, dropout=0.5)
    report = nnhealth.scan(model, _batch())
    (f,) = [f for f in report.findings if f.code == "NH102"]
    assert f.evidence["suffixes"] == "_l0"
    assert any("gates of layer 0 only" in n for n in report.notes)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Seq(),
        lambda: Seq(forget_bias=1.0),
        lambda: Seq(nn.GRU),
        lambda: Seq(num_layers=2, bidirectional=True),
    ],
    ids=["lstm-default", "lstm-forget-bias-1", "gru-default", "lstm-2-layers-bidirectional"],
)
def test_healthy_recurrent_cells_are_not_flagged(build) -> None:
    report = nnhealth.scan(build(), _batch())
    assert not [f for f in report.findings if f.code == "NH102"]


def test_a_closed_gru_update_gate_is_found() -> None:
    model = Seq(nn.GRU)
    with torch.no_grad():
        model.lstm.bias_ih_l0[16:32] = 12.0  # update gate z at 1: the state never changes
    (f,) = [f for f in nnhealth.scan(model, _batch()).findings if f.code == "NH102"]
    assert "update gate" in f.message and "never changes" in f.message


def test_gates_are_measured_only_with_the_saturation_check() -> None:
    report = nnhealth.scan(Seq(forget_bias=-10.0), _batch(), select=["NH101"])
    assert not [f for f in report.findings if f.code == "NH102"]
