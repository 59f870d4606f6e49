"""The nonlinearity table against torch itself: init snippets and their in-memory apply
agree bit for bit, bounds and peaks match the derivatives autograd computes, every
callable and module class exists and is captured as its kind."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnhealth
from nnhealth import nonlinearities as table
from nnhealth.capture.activations import build_table
from nnhealth.nonlinearities import NONLINEARITIES, Init

ENTRIES = list(NONLINEARITIES.values())
RULES = [
    table.HE,
    table.HE_LEAKY,
    table.XAVIER,
    table.XAVIER_TANH,
    table.XAVIER_SIGMOID,
    table.LECUN,
]


def _derivative(fn, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x).sum(), x)
    return grad


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.snippet("w"))
def test_snippet_and_apply_are_the_same_call(rule: Init) -> None:
    by_text, in_memory = torch.empty(32, 16), torch.empty(32, 16)
    torch.manual_seed(3)
    eval(rule.snippet("w"), {"nn": nn, "w": by_text})  # our own snippet
    torch.manual_seed(3)
    rule.apply(in_memory)
    assert torch.equal(by_text, in_memory)


def test_snippets_read_as_before() -> None:
    assert table.HE.snippet("m.weight") == 'nn.init.kaiming_normal_(m.weight, nonlinearity="relu")'
    assert (
        table.XAVIER_TANH.snippet("layer.weight")
        == 'nn.init.xavier_normal_(layer.weight, gain=nn.init.calculate_gain("tanh"))'
    )
    assert table.XAVIER.snippet("layer.weight") == "nn.init.xavier_normal_(layer.weight)"
    assert table.LECUN.name == "LeCun init" and table.HE.name == "kaiming_normal_"


SMOOTH = [e for e in ENTRIES if e.init.variance is not None]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.kind)
def test_family_and_gain(entry: table.Nonlinearity) -> None:
    assert entry.family in {table.RELU, table.SIGMOID, table.LINEAR}
    expected = {table.RELU: "kaiming_normal_", table.SIGMOID: "xavier_normal_"}
    if entry.init.variance is not None:  # GELU, SiLU...: their own gain
        assert entry.family == table.RELU and entry.init.function == "normal_"
        assert entry.gain == pytest.approx(math.sqrt(entry.init.variance))
        assert "relu" not in entry.init.snippet("w")
    else:
        assert entry.init.function == expected.get(entry.family, "kaiming_normal_")
        gain = nn.init.calculate_gain(entry.init.gain) if entry.init.gain else 1.0
        assert entry.gain == pytest.approx(gain if entry.family == table.SIGMOID else 1.0)
    assert not entry.can_die or entry.family == table.RELU


def _second_moment_quadrature(fn) -> float:
    """E[f(z)^2], z ~ N(0, 1), by adaptive quadrature in float64."""
    from scipy import integrate

    def integrand(z: float) -> float:
        y = float(fn(torch.tensor(z, dtype=torch.float64)))
        return y * y * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    value, _ = integrate.quad(integrand, -40, 40, limit=200, points=[-3.0, 0.0, 3.0])
    return value


@pytest.mark.parametrize("entry", SMOOTH, ids=lambda e: e.kind)
def test_gain_is_one_over_the_second_moment(entry: table.Nonlinearity) -> None:
    fn = getattr(F, entry.kind)
    by_quadrature = 1.0 / _second_moment_quadrature(fn)
    assert entry.init.variance == pytest.approx(by_quadrature, rel=1e-3)
    # Monte Carlo: 1M draws, within 5 standard errors of the mean of f(z)^2
    z = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y2 = fn(z).square()
    stderr = float(y2.std()) / math.sqrt(z.numel()) / float(y2.mean())
    assert float(y2.mean()) * entry.init.variance == pytest.approx(1.0, abs=5 * stderr + 1e-3)


@pytest.mark.parametrize("entry", SMOOTH, ids=lambda e: e.kind)
def test_the_rule_preserves_a_unit_variance(entry: table.Nonlinearity) -> None:
    """A unit-Gaussian pre-activation through f and a layer of 1024 initialized by the
    rule has unit variance again (to Monte Carlo error: 1024 units' means and 2048
    examples, a few percent).
    (The fixed point at variance 1 is not attracting for GELU-like kinds: over many
    layers small deviations grow, as for any fixed gain.)"""
    fn = getattr(F, entry.kind)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 1024, generator=gen, dtype=torch.float64)
    w = torch.empty(1024, 1024, dtype=torch.float64)
    torch.manual_seed(1)  # not the inputs' stream
    entry.init.apply(w)
    y = fn(x) @ w.T
    assert float(y.var()) == pytest.approx(1.0, abs=0.06)


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.3])
@pytest.mark.parametrize("kind,fn", [("tanh", torch.tanh), ("sigmoid", torch.sigmoid)])
def test_bounds_are_where_the_derivative_falls_to_the_fraction(kind, fn, fraction) -> None:
    entry = NONLINEARITIES[kind]
    lo, hi = entry.bounds(fraction)
    inverse = torch.atanh if kind == "tanh" else torch.logit
    x = inverse(torch.tensor([lo, hi], dtype=torch.float64))
    assert _derivative(fn, x) / entry.peak == pytest.approx([fraction, fraction], rel=1e-9)


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.peak is not None], ids=lambda e: e.kind)
def test_peak_and_hard_slope(entry: table.Nonlinearity) -> None:
    fn = getattr(F, entry.kind)
    x = torch.linspace(-8, 8, 16001, dtype=torch.float64)
    grads = _derivative(fn, x)
    assert grads.max().item() == pytest.approx(entry.peak, rel=1e-6)
    if entry.hard:  # piecewise linear: the slope between the flat parts, 0 on them
        slopes = grads[grads != 0]
        assert torch.allclose(slopes, torch.full_like(slopes, entry.peak), rtol=1e-6)
        assert table.hard_slope(entry.kind) == entry.peak
        lo, hi = entry.bounds(0.05)
        y = fn(x)
        flat = (y <= lo if lo is not None else False) | (y >= hi)
        assert (grads[flat] == 0).all()
    assert table.hard_slope("gelu") == 1.0


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.kind)
def test_callables_exist_and_map_to_the_kind(entry: table.Nonlinearity) -> None:
    capture = build_table(0.05)
    namespaces = {"F": F, "torch": torch, "T": torch.Tensor}
    for dotted in entry.callables:
        ns, attr = dotted.split(".")
        fn = getattr(namespaces[ns], attr)
        assert capture[fn]((), {}).kind == entry.kind


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e.modules], ids=lambda e: e.kind)
def test_module_classes_are_captured_as_their_kind(entry: table.Nonlinearity) -> None:
    assert {table.MODULE_KINDS[m] for m in entry.modules} == {entry.kind}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), getattr(nn, entry.modules[0])(), nn.Linear(16, 2))
    report = nnhealth.scan(model.eval(), torch.randn(32, 8), select=["NH201"])
    kinds = [r["kind"] for r in report.layers if r["role"] == "activation"]
    assert kinds == [entry.kind]


@pytest.mark.parametrize(
    "name,kind",
    [
        ("NewGELUActivation", "gelu"),
        ("GELUActivation", "gelu"),
        ("FastGELUActivation", "gelu"),
        ("QuickGELUActivation", "gelu"),
        ("AccurateGELUActivation", "gelu"),
        ("GELUTanh", "gelu"),
        ("PytorchGELUTanh", "gelu"),
        ("SiLUActivation", "silu"),
        ("MishActivation", "mish"),
        ("Swish", "silu"),
        ("SwishMe", "silu"),
        ("HardSwishMe", "hardswish"),
        ("HardSigmoid", "hardsigmoid"),
        ("QuickGELU", "gelu"),
        ("GELU", "gelu"),
        ("Tanh", "tanh"),
        ("ReLU6", "relu6"),
        ("HardMish", None),
        ("LinearActivation", None),
        ("ReLUSquaredActivation", None),
        ("GEGLU", None),
        ("SwiGLU", None),
        ("Linear", None),
    ],
)
def test_module_kind_by_class_name(name: str, kind: str | None) -> None:
    assert table.module_kind(name) == kind


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class NewGELUActivation(nn.Module):
    """Hugging Face's GELU, written with torch.tanh (no import of transformers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _gelu_tanh(x)


class Swish(nn.Module):
    """timm's Swish: x * sigmoid(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(x.sigmoid())


@pytest.mark.parametrize("act,kind", [(NewGELUActivation, "gelu"), (Swish, "silu")])
def test_an_activation_module_is_its_kind_not_its_ops(act, kind) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), act(), nn.Linear(16, 2))
    report = nnhealth.scan(model, torch.randn(32, 8), select=["ALL"])
    acts = [(r["name"], r["kind"]) for r in report.layers if r["role"] == "activation"]
    assert acts == [("1", kind)]
    snippets = " ".join(f.fix_snippet or "" for f in report.findings)
    assert 'nonlinearity="relu"' not in snippets


def test_a_functional_tanh_outside_an_activation_module_is_still_tanh() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return _gelu_tanh(self.fc(x))  # written in a block, not an activation module

    report = nnhealth.scan(nn.Sequential(Block(), nn.Linear(16, 2)), torch.randn(32, 8))
    assert [r["kind"] for r in report.layers if r["role"] == "activation"] == ["tanh"]


def test_gelu_fix_snippets_use_the_gelu_rule() -> None:
    """A GELU MLP at 0.01 x randn: the depth fixes re-initialize for GELU, not ReLU."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        lin = nn.Linear(64, 64)
        nn.init.normal_(lin.weight, std=0.01)
        layers += [lin, NewGELUActivation()]
    model = nn.Sequential(*layers, nn.Linear(64, 3))
    report = nnhealth.scan(model, (torch.randn(64, 64), torch.randint(0, 3, (64,))))
    snippets = [f.fix_snippet for f in report.findings if f.fix_snippet and "init" in f.fix_snippet]
    assert snippets, [f.message for f in report.findings]
    assert not any('nonlinearity="relu"' in s for s in snippets)
    assert any("2.352" in s for s in snippets), snippets


def test_lookup_of_unknown_kinds() -> None:
    assert table.lookup(None) is None and table.lookup("swish2") is None
    assert table.init_rule("swish2") is table.LECUN and table.family(None) is None


def test_import_is_torch_free(tmp_path: Path) -> None:
    code = "import sys, nnhealth.nonlinearities; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_gpt2_gelu_is_gelu_not_tanh() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, n_positions=32)
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(config)

    class Last(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = lm

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=ids).logits[:, -1]

    ids = torch.randint(0, 100, (4, 16))
    report = nnhealth.scan(Last(), (ids, torch.randint(0, 100, (4,))), select=["NH102", "NH201"])
    acts = [(r["name"], r["kind"]) for r in report.layers if r["role"] == "activation"]
    assert acts == [(f"m.transformer.h.{i}.mlp.act", "gelu") for i in range(2)]


def test_timm_vit_gelu_is_gelu() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32)
    batch = (torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,)))
    report = nnhealth.scan(vit, batch, select=["NH102"])
    kinds = {r["kind"] for r in report.layers if r["role"] == "activation"}
    assert kinds == {"gelu"}
