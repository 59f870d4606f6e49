"""NH301 norm-ratio: per-layer weight-to-gradient norm ratios spread over orders of
magnitude, and relative updates out of range at the given learning rate."""

from __future__ import annotations

import torch
from conftest import Case, he, healthy_cases, stack
from torch import nn

from nnhealth.findings import Finding, Severity

CODE = "NH301"


def bn_scaled_layer(scale: float) -> nn.Module:
    """Linear-BN-ReLU x3 with one layer's weights scaled: BN makes the output scale-free,
    so that layer's gradient shrinks by the scale while its norm grows by it."""
    model = stack(128, 3, nn.ReLU, he, nn.BatchNorm1d)
    with torch.no_grad():
        model[3].weight.mul_(scale)
    return model


class TokensAndLayerScale(nn.Module):
    """A ViT/ConvNeXt-like model's free tensors: a class token, positional embeddings and
    layer scale 1e-6. Their ratios (x1e6 and more from the weights') are not layers'."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(16, 32)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 32).normal_(std=1e-6))
        self.pos_embed = nn.Parameter(torch.randn(1, 9, 32) * 0.02)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.gamma = nn.Parameter(torch.full((32, 1), 1e-6))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], 8, 16))
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), h], 1) + self.pos_embed
        h = h + (self.gamma.T * self.fc2(torch.relu(self.fc1(h))))
        return self.head(h.mean(1))


class SparseTokens(nn.Module):
    """An embedding table of 5000 rows of which a batch touches ~100: the untouched rows
    have zero gradient and the table's ratio is not a layer's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(5000, 32)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (x[:, :4].abs() * 30).long().clamp(max=4999)
        return self.head(torch.relu(self.fc(self.emb(ids).mean(1))))


def grouped(findings: list[Finding], model: nn.Module) -> None:
    """One finding per pattern: every layer in one divergence finding, the output layer
    included once its step exceeds 10x its norm (below that it is info)."""
    kinds = sorted(f.kind for f in findings)
    assert kinds == ["divergence"], kinds
    (div,) = findings
    assert div.evidence["layers"] == 5 and div.layer in {"0", "2", "4", "6", "8"}


def invariant_only(findings: list[Finding], model: nn.Module) -> None:
    """Behind BatchNorm a large relative update is not divergence: one info."""
    inv = [f for f in findings if f.kind == "scale-invariant"]
    assert len(inv) == 1 and inv[0].severity == Severity.INFO
    assert "lr / ||w||^2" in inv[0].message and inv[0].evidence["layers"] == 3


def only_layers_counted(findings: list[Finding], model: nn.Module) -> None:
    for f in findings:
        assert "cls_token" not in f.message and "gamma" not in f.message
        assert "pos_embed" not in f.message and "emb.weight" not in f.message


# the bad case on which --what-if must resolve the finding (tests/test_registry.py)
WHAT_IF = "bn-layer-scaled-100x"

BAD = [
    # one layer alone, 1e4 from the others: its effective step is 1e-4 of theirs
    Case("bn-layer-scaled-100x", lambda: bn_scaled_layer(100.0), Severity.WARNING, None),
    # a plain MLP (no normalization) at a rate that rewrites its hidden layers each step
    Case(
        "mlp-lr-far-too-high",
        lambda: stack(128, 4, nn.ReLU, he),
        Severity.ERROR,
        "any",
        kwargs=(("lr", 100.0),),
        verify=grouped,
    ),
    Case(
        "mlp-lr-too-high",
        lambda: stack(128, 4, nn.ReLU, he),
        Severity.WARNING,
        "any",
        kwargs=(("lr", 10.0),),
    ),
    Case(
        "mlp-lr-frozen",
        lambda: stack(128, 4, nn.ReLU, he),
        Severity.WARNING,
        "any",
        kwargs=(("lr", 1e-9),),
    ),
    # scale-invariant, but a first step 1e5x the weights cuts the effective step 1e10x
    # (a warning); the output layer, not scale-invariant, diverges (the error)
    Case(
        "bn-lr-extreme",
        lambda: bn_scaled_layer(1.0),
        Severity.ERROR,
        "any",
        kwargs=(("lr", 1e6),),
    ),
]

GOOD = [
    Case("healthy-he-relu", lambda: stack(128, 4, nn.ReLU, he)),
    Case("bn-layer-scaled-3x", lambda: bn_scaled_layer(3.0)),
    Case("bn-high-lr", lambda: bn_scaled_layer(1.0), kwargs=(("lr", 10.0),), verify=invariant_only),
    Case("tokens-and-layer-scale", TokensAndLayerScale, verify=only_layers_counted),
    Case("sparse-embedding", SparseTokens, verify=only_layers_counted),
    *healthy_cases(),
]
