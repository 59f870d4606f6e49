"""The nonlinearity table against torch itself: init snippets and their in-memory apply
agree bit for bit, bounds and peaks match the derivatives autograd computes, every
callable and module class exists and is captured as its kind."""

from __future__ import annotations

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


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.kind)
def test_family_and_gain(entry: table.Nonlinearity) -> None:
    assert entry.family in {table.RELU, table.SIGMOID, table.LINEAR}
    expected = {table.RELU: "kaiming_normal_", table.SIGMOID: "xavier_normal_"}
    assert entry.init.function == expected.get(entry.family, "kaiming_normal_")
    gain = nn.init.calculate_gain(entry.init.gain) if entry.init.gain else 1.0
    assert entry.gain == pytest.approx(gain if entry.family == table.SIGMOID else 1.0)
    assert not entry.can_die or entry.family == table.RELU


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


def test_lookup_of_unknown_kinds() -> None:
    assert table.lookup(None) is None and table.lookup("swish2") is None
    assert table.init_rule("swish2") is table.LECUN and table.family(None) is None


def test_import_is_torch_free(tmp_path: Path) -> None:
    code = "import sys, nnhealth.nonlinearities; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
