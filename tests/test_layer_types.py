"""Every parametrized layer type of torch.nn, scanned with every check (and the
Hessian): the scan ends in a report, every check runs (NH401 may be skipped, with a
reason), and the layer appears in the table with its parameters' numbers."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from conftest import strict_json
from torch import nn

import nnhealth
from nnhealth.analyzers import REGISTRY

N = 8


class Probe(nn.Module):
    """``layer`` between the input and a ReLU + Linear head (3 classes)."""

    def __init__(self, layer: nn.Module, call: Callable | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer, self.call = layer, call
        self.act = nn.ReLU()
        self.head = nn.LazyLinear(3)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        y = self.call(self.layer, *inputs) if self.call else self.layer(*inputs)
        if isinstance(y, tuple):  # RNNs and attention return (output, state)
            y = y[0]
        return self.head(self.act(y).flatten(1))


def _attention(layer: nn.Module, x: torch.Tensor) -> tuple:
    return layer(x, x, x)


# name: (layer, inputs, call)
LAYERS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple], Callable | None]] = {
    "Conv1d": (lambda: nn.Conv1d(4, 8, 3), lambda: (torch.randn(N, 4, 10),), None),
    "Conv2d-grouped": (
        lambda: nn.Conv2d(4, 8, 3, groups=2),
        lambda: (torch.randn(N, 4, 6, 6),),
        None,
    ),
    "Conv2d-depthwise": (
        lambda: nn.Conv2d(4, 4, 3, groups=4),
        lambda: (torch.randn(N, 4, 6, 6),),
        None,
    ),
    "Conv3d": (lambda: nn.Conv3d(2, 4, 2), lambda: (torch.randn(N, 2, 4, 4, 4),), None),
    "ConvTranspose1d": (
        lambda: nn.ConvTranspose1d(4, 6, 3, stride=2),
        lambda: (torch.randn(N, 4, 10),),
        None,
    ),
    "ConvTranspose2d": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2),
        lambda: (torch.randn(N, 4, 6, 6),),
        None,
    ),
    "ConvTranspose2d-grouped": (
        lambda: nn.ConvTranspose2d(4, 6, 3, groups=2),
        lambda: (torch.randn(N, 4, 6, 6),),
        None,
    ),
    "ConvTranspose3d": (
        lambda: nn.ConvTranspose3d(2, 3, 2),
        lambda: (torch.randn(N, 2, 3, 3, 3),),
        None,
    ),
    "LazyConv2d": (lambda: nn.LazyConv2d(8, 3), lambda: (torch.randn(N, 4, 6, 6),), None),
    "Bilinear": (
        lambda: nn.Bilinear(5, 6, 7),
        lambda: (torch.randn(N, 5), torch.randn(N, 6)),
        None,
    ),
    "Embedding": (lambda: nn.Embedding(20, 8), lambda: (torch.randint(0, 20, (N, 5)),), None),
    "EmbeddingBag": (lambda: nn.EmbeddingBag(20, 8), lambda: (torch.randint(0, 20, (N, 5)),), None),
    "MultiheadAttention": (
        lambda: nn.MultiheadAttention(8, 2, batch_first=True),
        lambda: (torch.randn(N, 5, 8),),
        _attention,
    ),
    "RNN": (lambda: nn.RNN(6, 8, batch_first=True), lambda: (torch.randn(N, 5, 6),), None),
    "LSTM-2-layers": (
        lambda: nn.LSTM(6, 8, num_layers=2, batch_first=True),
        lambda: (torch.randn(N, 5, 6),),
        None,
    ),
    "GRU-bidirectional": (
        lambda: nn.GRU(6, 8, batch_first=True, bidirectional=True),
        lambda: (torch.randn(N, 5, 6),),
        None,
    ),
    "LayerNorm-2d-shape": (lambda: nn.LayerNorm([4, 6]), lambda: (torch.randn(N, 4, 6),), None),
    "GroupNorm": (lambda: nn.GroupNorm(2, 4), lambda: (torch.randn(N, 4, 6, 6),), None),
    "PReLU": (lambda: nn.PReLU(4), lambda: (torch.randn(N, 4, 6, 6),), None),
}

# layers without a second derivative on CPU: NH401 is skipped there, with the reason
NO_HESSIAN = {"EmbeddingBag"}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_every_layer_type_gets_every_check(name: str) -> None:
    make_layer, make_inputs, call = LAYERS[name]
    model = Probe(make_layer(), call)
    inputs = make_inputs()
    with torch.no_grad():
        model(*inputs)  # materialize the lazy head (and a lazy layer)
    targets = torch.randint(0, 3, (N,))
    batch = (inputs[0] if len(inputs) == 1 else inputs, targets)
    report = nnhealth.scan(model, batch, select=["ALL"], hessian=True, lr=0.1)
    assert not report.errors, report.errors
    assert set(report.run["checks"]) == {c.code for c in REGISTRY}
    skipped = {s.code: s.reason for s in report.skipped}
    assert set(skipped) <= ({"NH401"} if name in NO_HESSIAN else set()), skipped
    assert all(reason.strip() for reason in skipped.values())
    rows = {r["name"]: r for r in report.layers}
    own = model.layer.parameters(recurse=False)  # MultiheadAttention.out_proj has its row
    assert rows["layer"]["params"] == sum(p.numel() for p in own)
    assert rows["layer"]["weight_norm"] > 0
    strict_json(report.to_json())


# ---- transposed convolutions: weight [in, out/groups, k...] --------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1),
        lambda: nn.ConvTranspose2d(6, 4, 3, stride=1, groups=2),
        lambda: nn.ConvTranspose1d(3, 5, 6, stride=3),
    ],
    ids=["k4-s2", "k3-s1-groups2", "1d-k6-s3"],
)
def test_transposed_fan_in_is_the_output_variance_gain(make) -> None:
    """Var(y) = fan_in Var(w) for a unit-Gaussian input, away from the borders: exactly
    (E[y^2] at a position is the sum of w^2 over the taps reaching it: the transposed
    convolution of ones with w^2) and by Monte Carlo."""
    from nnhealth.capture.weights import from_model

    torch.manual_seed(0)
    layer = make().double()
    with torch.no_grad():
        layer.bias.zero_()
    (w,) = from_model(layer, (), None)
    dims = layer.weight.ndim - 2
    size = (1, layer.in_channels) + (48,) * dims
    window = (..., *[slice(12, 48)] * dims)  # 36 positions: every stride's residues equally
    exact = nn.functional.conv_transpose1d if dims == 1 else nn.functional.conv_transpose2d
    second = exact(
        torch.ones(size, dtype=torch.float64),
        layer.weight.square(),
        stride=layer.stride,
        padding=layer.padding,
        groups=layer.groups,
    )
    inner = second[window]
    mean_sq = float(layer.weight.detach().square().mean())
    assert float(inner.detach().mean()) / mean_sq == pytest.approx(w.fan_in, rel=1e-9)
    x = torch.randn((400,) + size[1:], dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)[window]
    assert float(y.square().mean()) / mean_sq == pytest.approx(w.fan_in, rel=0.02)
    assert w.units == layer.out_channels
    assert w.fan_out == layer.out_channels // layer.groups * math.prod(layer.kernel_size)


def test_identical_transposed_output_channels_are_found() -> None:
    """Output channels 1 and 3 of group 0 and 5, 6 of group 1 made equal by hand (the
    weight's dim 1 within each group, with their biases): found as units, by brute force
    on the outputs too."""
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(4, 8, 3, groups=2)
    with torch.no_grad():
        layer.weight[:, 3] = layer.weight[:, 1]  # channels 1 and 3 (group 0)
        layer.bias[3] = layer.bias[1]
        layer.weight[:, 2] = layer.weight[:, 1]  # channels 5 and 6 (group 1: dim-1 1, 2)
        layer.bias[6] = layer.bias[5]
    y = layer(torch.randn(3, 4, 5, 5)).detach()
    same = {(a, b) for a in range(8) for b in range(a + 1, 8) if torch.equal(y[:, a], y[:, b])}
    assert same == {(1, 3), (5, 6)}
    model = nn.Sequential(layer, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(2, 4, 5, 5))
    report = nnhealth.scan(model, (torch.randn(16, 4, 5, 5), torch.randint(0, 3, (16,))))
    (f,) = [f for f in report.findings if f.code == "NH501" and f.layer == "0"]
    assert f.evidence["units"] == 8 and f.evidence["effective_width"] == 6
    assert f.evidence["first_group"] == "1,3"


class Decoder(nn.Module):
    """Linear -> ConvTranspose2d (stride 2) -> ReLU -> ConvTranspose2d: the first
    transposed conv's bias of -30 keeps every channel of the ReLU at 0."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 32 * 4 * 4)
        self.up = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.act = nn.ReLU()
        self.out = nn.ConvTranspose2d(16, 3, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.up(self.fc(z).view(-1, 32, 4, 4))))


def test_dead_relu_after_a_transposed_conv_reinitializes_it_with_its_own_fan() -> None:
    model = Decoder()
    with torch.no_grad():
        model.up.bias.fill_(-30.0)
    batch = (torch.randn(32, 16), torch.randn(32, 3, 16, 16))
    report = nnhealth.scan(model, batch, what_if=True)
    (f,) = [f for f in report.findings if f.code == "NH101"]
    assert f.layer == "act" and f.evidence["dead_fraction"] == 1.0
    fan_in = 32 * 16 / 4  # in/groups x k^2 / stride^2
    assert 'model.get_submodule("up")' in f.fix_snippet
    assert f"std=(2 / {fan_in:g}) ** 0.5" in f.fix_snippet
    exec(f.fix_snippet, {"model": model, "nn": nn})  # noqa: S102 (runs as written)
    assert float(model.up.weight.detach().var()) == pytest.approx(2 / fan_in, rel=0.05)
    (tried,) = [w for w in report.what_if if w["code"] == "NH101" and "up" in w["fix"]]
    assert tried["resolved"], tried
