"""The capture sees activations however they are written, and leaves the model as found."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import BasicBlock, state_of
from torch import nn

from nnhealth.capture.instrument import run_pass
from nnhealth.plan import Plan


def mse(out):
    return out.square().mean()


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        parts = [
            F.relu(h),
            torch.tanh(h),
            h.sigmoid(),
            F.gelu(h),
            F.silu(h),
            F.leaky_relu(h, 0.1),
            F.elu(h),
            F.relu6(h),
            F.hardtanh(h),
            torch.relu(h),
        ]
        return sum(parts)


def test_functional_calls_are_seen_and_named_after_their_module() -> None:
    model = nn.Sequential(Functional(), nn.Linear(8, 2))
    cap = run_pass(model, torch.randn(16, 8), mse, Plan(), examples=16)
    acts = [(s.name, s.kind, s.functional) for s in cap.activation_sites()]
    assert acts == [
        ("0:relu", "relu", True),
        ("0:tanh", "tanh", True),
        ("0:sigmoid", "sigmoid", True),
        ("0:gelu", "gelu", True),
        ("0:silu", "silu", True),
        ("0:leaky_relu", "leaky_relu", True),
        ("0:elu", "elu", True),
        ("0:relu6", "relu6", True),
        ("0:hardtanh", "hardtanh", True),
        ("0:relu#2", "relu", True),
    ]
    assert all(s.grad_var is not None for s in cap.activation_sites())


def test_inplace_relu_module_reused_twice() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), BasicBlock(4), nn.Flatten(), nn.Linear(4 * 25, 3)
    )
    x = torch.randn(6, 3, 5, 5)
    cap = run_pass(model, x, mse, Plan(), examples=6)
    relus = [s for s in cap.activation_sites() if s.module == "1.relu"]
    assert [s.name for s in relus] == ["1.relu", "1.relu#2"]
    assert all(not s.functional and s.unit_dim == 1 and s.units == 4 for s in relus)
    # the second call sees the residual sum, checked against a direct computation
    block = model[1]
    with torch.no_grad():
        y0 = model[0](x)
        first = F.relu(block.bn1(block.conv1(y0)))
        second = F.relu(block.bn2(block.conv2(first)) + y0)
    assert relus[0].mean == pytest.approx(float(first.double().mean()), rel=1e-5)
    assert relus[1].mean == pytest.approx(float(second.double().mean()), rel=1e-5)
    # the pre-activation's gradient is taken before the in-place ReLU overwrote it
    conv = next(s for s in cap.sites if s.name == "0")
    assert conv.grad_var is not None and conv.grad_var > 0


def test_activation_modules_of_every_family() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4),
        nn.ReLU6(),
        nn.Linear(4, 4),
        nn.Hardtanh(),
        nn.Linear(4, 4),
        nn.GELU(),
        nn.Linear(4, 4),
        nn.SiLU(),
        nn.Linear(4, 4),
        nn.LeakyReLU(),
        nn.Linear(4, 4),
        nn.ELU(),
        nn.Linear(4, 4),
        nn.Tanh(),
        nn.Linear(4, 4),
        nn.Sigmoid(),
        nn.Linear(4, 2),
    )
    cap = run_pass(model, torch.randn(8, 4), mse, Plan(), examples=8)
    kinds = [(s.name, s.kind) for s in cap.activation_sites()]
    assert kinds == [
        ("1", "relu6"),
        ("3", "hardtanh"),
        ("5", "gelu"),
        ("7", "silu"),
        ("9", "leaky_relu"),
        ("11", "elu"),
        ("13", "tanh"),
        ("15", "sigmoid"),
    ]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_model_is_left_exactly_as_found(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        BasicBlock(4),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(100, 3),
    )
    model.eval()
    model[1].train()  # mixed modes must come back mixed
    model[0].weight.requires_grad_(False)  # a frozen parameter stays frozen
    model[4].weight.grad = torch.full_like(model[4].weight, 7.0)  # an existing .grad survives
    x = torch.randn(6, 3, 5, 5)
    before = state_of(model)
    rng = torch.get_rng_state()
    cap = run_pass(model, x, mse, Plan(mode=mode), examples=6)
    after = state_of(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["grad_ids"] == before["grad_ids"]
    for a, b in zip(after["grads"], before["grads"], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for key in ("params", "buffers"):
        assert all(torch.equal(a, b) for a, b in zip(after[key], before[key], strict=True))
    assert after["hooks"] == before["hooks"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert cap.mode == mode
    frozen = next(p for p in cap.params if p.name == "0.weight")
    assert not frozen.trainable and frozen.grad_norm is None


def test_model_left_as_found_when_it_raises() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(5, 2))
    model.eval()
    before = state_of(model)
    from nnhealth.errors import CaptureError

    with pytest.raises(
        CaptureError, match=r"layer '2' \[Linear\(in_features=5\)\] on input of shape \[3, 4\]"
    ):
        run_pass(model, torch.randn(3, 4), mse, Plan(), examples=3)
    after = state_of(model)
    assert after["hooks"] == before["hooks"] and after["training"] == before["training"]


def test_deepcopy_equivalence_of_results() -> None:
    """Capturing twice gives the same numbers: nothing leaked from the first pass."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 2)
    )
    twin = copy.deepcopy(model)
    x = torch.randn(12, 6)
    a = run_pass(model, x, mse, Plan(seed=5), examples=12)
    run_pass(model, x, mse, Plan(seed=9), examples=12)
    b = run_pass(twin, x, mse, Plan(seed=5), examples=12)
    assert [s.var for s in a.sites] == [s.var for s in b.sites]
    assert a.loss == b.loss


def test_other_libraries_norm_classes_are_norms_by_name() -> None:
    """LlamaRMSNorm, T5LayerNorm...: normalization layers from their class names, so
    what follows them is judged as normalized (NH601, NH202, NH103)."""
    from nnhealth.capture.structure import is_norm

    class LlamaRMSNorm(nn.Module):  # the shape of transformers' own class
        def __init__(self, dim: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    class T5LayerNorm(LlamaRMSNorm):
        pass

    class NormalizedBlock(nn.Module):  # a name that ends in Norm but holds layers
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)

    NormalizedBlock.__name__ = "BlockLayerNorm"
    assert is_norm(LlamaRMSNorm(4)) and is_norm(T5LayerNorm(4)) and is_norm(nn.LayerNorm(4))
    assert not is_norm(NormalizedBlock()) and not is_norm(nn.Linear(4, 4))
    model = nn.Sequential(nn.Linear(8, 8), LlamaRMSNorm(8), nn.Linear(8, 2))
    cap = run_pass(model, torch.randn(16, 8), mse, Plan(), examples=16)
    roles = {s.name: (s.kind, s.role) for s in cap.sites}
    assert roles["1"] == ("LlamaRMSNorm", "norm") and roles["0"][1] == "layer"


def test_each_layer_knows_which_site_it_read() -> None:
    """A layer's input taken straight from another site's output is linked to it (NH103
    tells a pre-norm zero gain from a residual-end one by this); one read from a sum or
    from the model's input is not."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.inner = nn.Linear(8, 8)
            self.after = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x + self.inner(self.norm(x))  # pre-norm branch into a residual sum
            return self.after(h)

    cap = run_pass(Block(), torch.randn(16, 8), mse, Plan(), examples=16)
    reads = {s.name: s.reads for s in cap.sites if s.role in ("layer", "norm")}
    assert reads == {"norm": None, "inner": "norm", "after": None}


@pytest.mark.parametrize("rows", [[], [3], [0, 5], [2, 7]])
def test_embedding_with_untouched_rows_is_told_apart(rows: list[int]) -> None:
    """An embedding table's gradient with a row of zeros (a token not in the batch) gives
    the parameter the role "embedding", as a row-by-row comparison with zero says; a row
    of zeros but for a NaN, or -0.0 values, are judged as that comparison judges them."""
    from nnhealth.capture.params import _sparse_rows

    g = torch.randn(8, 4, generator=torch.Generator().manual_seed(len(rows)))
    for r in rows:
        g[r] = 0.0
    g[1] = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    g[6] = -0.0 if 2 in rows else g[6]
    expected = bool((g == 0).all(dim=1).any())
    assert _sparse_rows("Embedding", "weight", g) is expected is bool(rows)
    assert not _sparse_rows("Linear", "weight", g)
