"""NH201/NH202 through depth: the quantity NH202 compares against a brute-force
computation from the raw tensors, its invariances, which layers count as depth, the
scoped fix snippet, and stock models (when their libraries are installed) that must
not be flagged."""

from __future__ import annotations

import pytest
import torch
from conftest import HFLogits, relu_cnn_avgpool, sensitivities, small_bert
from torch import nn

import nnhealth
from nnhealth.analyzers._advice import dominant_nonlinearity, init_fix
from nnhealth.analyzers.gradient_variance import (
    block_of,
    depth_groups,
    sensitivity,
)
from nnhealth.capture.instrument import run_pass
from nnhealth.findings import Severity
from nnhealth.plan import Plan

DEPTH = ("NH201", "NH202")


def ce(targets: torch.Tensor):
    return lambda out: nn.functional.cross_entropy(out, targets)


def brute_force(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """E_n ||y_n||^2 * E_n ||g_n||^2 of every Conv/Linear/norm output, from the tensors."""
    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
    return sensitivities(
        model, x, y, [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]
    )


def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def test_sensitivity_equals_brute_force() -> None:
    model = _cnn()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 12, 12, generator=gen), torch.randint(0, 5, (6,), generator=gen)
    expected = brute_force(model, x, y)
    cap = run_pass(model, x, ce(y), Plan(), examples=6)
    got = {s.name: sensitivity(s) for s in cap.sites if s.name in expected}
    assert set(got) == set(expected) == {"0", "1", "3", "7"}
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name


def test_sensitivity_ignores_pooling_and_output_scale() -> None:
    """Pooling over H*W divides each position's gradient by H*W; scaling a layer's output
    by c divides its gradient by c when the next layer undoes it: neither moves it."""
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, 16, 16, generator=gen), torch.randint(0, 5, (4,), generator=gen)

    def net(size: int, scale: float) -> nn.Module:
        torch.manual_seed(0)
        conv, head = nn.Conv2d(3, 8, 1), nn.Linear(8, 5)  # 1x1: upsampling commutes
        with torch.no_grad():
            conv.weight.mul_(scale)
            conv.bias.mul_(scale)
            head.weight.div_(scale)
        return nn.Sequential(
            conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head
        ), nn.functional.interpolate(x, size=size, mode="nearest")

    values = []
    for size, scale in ((16, 1.0), (32, 1.0), (16, 100.0)):
        model, inputs = net(size, scale)
        cap = run_pass(model, inputs, ce(y), Plan(), examples=4)
        values.append(next(sensitivity(s) for s in cap.sites if s.name == "0"))
    assert values[1] == pytest.approx(values[0], rel=1e-4)  # 4x the positions
    assert values[2] == pytest.approx(values[0], rel=1e-4)  # output x100, gradient /100


def test_zero_gradient_is_zero_and_zero_output_has_no_value() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    nn.init.zeros_(model[2].weight)
    nn.init.zeros_(model[2].bias)
    y = torch.randint(0, 3, (8,))
    cap = run_pass(model, torch.randn(8, 4), ce(y), Plan(), examples=8)
    by_name = {s.name: s for s in cap.sites}
    assert sensitivity(by_name["0"]) == 0.0  # nothing flows back through the zero head
    assert sensitivity(by_name["2"]) is None  # the zero head's own output: no scale


def test_blocks_of_module_names() -> None:
    assert block_of("stages.3.blocks.0.mlp.fc2") == "stages.3.blocks.0"
    assert block_of("layer1.0.conv1") == "layer1.0"
    assert block_of("features.1.0.block.0") == "features.1.0"
    assert block_of("4") == "" and block_of("0.0") == "" and block_of("fc") == ""


class _Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = torch.softmax(self.query(x) @ self.key(x).transpose(1, 2) / 4, dim=-1)
        return self.out(att @ self.value(x))


def test_query_key_value_are_one_point() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_Attention(16), nn.Flatten(), nn.Linear(16 * 5, 3))
    y = torch.randint(0, 3, (4,))
    cap = run_pass(model, torch.randn(4, 5, 16), ce(y), Plan(), examples=4)
    names = [[s.name for s in g] for g, _ in depth_groups(cap)]
    # the output projection joins them (no captured site between: the softmax and the
    # matmuls are not layers): one depth point fewer, never a trend through q and k
    assert names == [["0.query", "0.key", "0.value", "0.out"]]  # not the output layer


def test_gates_and_normalized_blocks_start_new_runs() -> None:
    """An SE-style sigmoid gate in a ReLU net, and a new block of blocks with norms."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)
            self.gate = nn.Linear(8, 8)

        def forward(self, x):
            h = torch.relu(self.norm(self.fc(x)))
            return x + h * torch.sigmoid(self.gate(h))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), Block(), Block(), nn.Linear(8, 3))
    model = nn.Sequential(*model[:2], nn.ModuleList([model[2], model[3]]), model[4])
    model.forward = lambda x: model[3](model[2][1](model[2][0](model[1](model[0](x)))))
    y = torch.randint(0, 3, (16,))
    cap = run_pass(model, torch.randn(16, 8), ce(y), Plan(), examples=16)
    runs = [(g[0].name, new) for g, new in depth_groups(cap)]
    assert runs == [
        ("0", False),
        ("2.0.fc", True),  # a block with a norm layer begins
        ("2.0.gate", True),  # after the norm
        ("2.1.fc", True),  # after the sigmoid gate, and the next normalized block
        ("2.1.gate", True),
    ]  # the output layer "3" is not a depth point


def test_init_fix_scoped_to_named_layers_runs() -> None:
    """The scoped snippet re-initializes exactly the layers it names."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    before = [p.clone() for p in model.parameters()]
    text, snippet = init_fix("gelu", ["2", "4"])
    assert "2.352/fan_in" in text and "relu" not in snippet
    exec(snippet, {"model": model, "nn": nn})  # noqa: S102 (our snippet)
    after = list(model.parameters())
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not torch.equal(after[2], before[2]) and not torch.equal(after[4], before[4])
    assert float(after[2].detach().var()) == pytest.approx(2.352 / 8, rel=0.5)
    assert not after[3].any() and not after[5].any()  # biases zeroed
    _, everything = init_fix("relu")
    assert "model.modules()" in everything and "kaiming_normal_" in everything


def test_dominant_nonlinearity_by_elements_not_sites() -> None:
    """Many small sigmoid gates (SE blocks) do not make a SiLU net a sigmoid net."""

    class SE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            h = nn.functional.silu(self.fc(x))
            gates = [torch.sigmoid(h[:, i : i + 1]) for i in range(3)]
            return h * sum(gates)

    torch.manual_seed(0)
    cap = run_pass(
        nn.Sequential(SE(), nn.Linear(64, 2)),
        torch.randn(8, 64),
        lambda o: o.sum(),
        Plan(),
        examples=8,
    )
    assert dominant_nonlinearity(cap) == "silu"


# ---- stock models from their configs (default init, no downloads) ----------------------


def _depth_findings(model: nn.Module, batch, **kw) -> list:
    report = nnhealth.scan(model, batch, select=[*DEPTH, "NH301"], **kw)
    assert not report.errors, report.errors
    return [
        (f.code, f.severity, f.message) for f in report.findings if f.severity >= Severity.WARNING
    ]


def _images(n: int, size: int, classes: int = 10):
    gen = torch.Generator().manual_seed(0)
    return (
        torch.randn(n, 3, size, size, generator=gen),
        torch.randint(0, classes, (n,), generator=gen),
    )


def test_issue_cnn_with_average_pooling_is_healthy() -> None:
    model = relu_cnn_avgpool()
    assert _depth_findings(model, _images(4, 32)) == []


def test_timm_convnext_and_vit() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    for name, size in (("convnext_atto", 32), ("vit_tiny_patch16_224", 32)):
        kw = {"img_size": size} if name.startswith("vit") else {}
        model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
        assert _depth_findings(model, _images(2, size)) == [], name


def test_torchvision_convnext() -> None:
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    assert _depth_findings(models.convnext_tiny(num_classes=10), _images(2, 32)) == []


def test_transformers_bert_and_gpt2() -> None:
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (4, 16), generator=gen)
    bert = small_bert()
    assert _depth_findings(HFLogits(bert, False), (ids, torch.randint(0, 3, (4,)))) == []
    gpt2 = tr.GPT2LMHeadModel(
        tr.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32)
    )
    assert _depth_findings(HFLogits(gpt2, True), (ids, torch.randint(0, 100, (4,)))) == []
