"""Every parametrized layer type of torch.nn, scanned with every check (and the
Hessian): the scan ends in a report, every check runs (NH401 may be skipped, with a
reason), and the layer appears in the table with its parameters' numbers."""

from __future__ import annotations

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
