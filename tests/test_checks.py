"""Each check on named good and bad cases, run by one generic test (sqlfluff style),
and the registry's invariants."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import he, stack, upstream_symmetry
from torch import nn

import nnhealth
from nnhealth.analyzers import REGISTRY, lookup, select_checks
from nnhealth.analyzers.base import REQUIRED_SECTIONS, Check
from nnhealth.findings import Severity

N = 128  # examples per batch


def xavier(n: int) -> float:
    return math.sqrt(1 / n)


def dead_bias(fraction: float) -> nn.Module:
    model = stack(128, 3, nn.ReLU, he)
    with torch.no_grad():
        model[2].bias.fill_(0.01)
        model[2].bias[: int(fraction * 128)] = -20.0
    return model


class SqrtAtZero(nn.Module):
    """Finite forward, infinite gradient: d sqrt(x)/dx at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(torch.sqrt(F.relu(self.fc(x)) * 0.0))


def with_nan_weight() -> nn.Module:
    model = stack(64, 2, nn.ReLU, he)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    return model


def overflowing() -> nn.Module:
    model = stack(64, 2, nn.ReLU, he)
    with torch.no_grad():
        model[2].weight.mul_(1e38)
    return model


def duplicated_units(count: int) -> nn.Module:
    """He MLP whose hidden layer 2 has ``count`` copies of unit 0 (net2net-style widening)."""
    model = stack(128, 3, nn.ReLU, he)
    with torch.no_grad():
        model[2].weight[1 : count + 1] = model[2].weight[0]
        model[2].bias[1 : count + 1] = model[2].bias[0]
    return model


def bn_scaled_layer(scale: float) -> nn.Module:
    """Linear-BN-ReLU x3 with one layer's weights scaled: BN makes the output scale-free,
    so that layer's gradient shrinks by the scale while its norm grows by it."""
    model = stack(128, 3, nn.ReLU, he, nn.BatchNorm1d)
    with torch.no_grad():
        model[3].weight.mul_(scale)
    return model


def xavier_exact(n: int) -> float:
    return math.sqrt(2 / (n + n))


def zero_head() -> nn.Module:
    model = stack(128, 2, nn.ReLU, he)
    with torch.no_grad():
        model[-1].weight.zero_()
        model[-1].bias.zero_()
    return model


def frozen_constant() -> nn.Module:
    model = stack(128, 2, nn.ReLU, he)
    with torch.no_grad():
        model[2].weight.fill_(0.01)
    model[2].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


def one_layer_scaled(factor: float) -> nn.Module:
    model = stack(128, 2, nn.ReLU, he)
    with torch.no_grad():
        model[2].weight.mul_(factor)  # Var x100
    return model


@dataclass(frozen=True)
class Case:
    id: str
    code: str
    build: Callable[[], nn.Module]
    expect: Severity | None  # the worst severity this check must report (None: nothing)
    layer: str | None = "any"  # the layer the worst finding must name ("any": don't care)
    width: int = 128
    examples: int = N
    kwargs: tuple = ()  # extra nnhealth.scan arguments, as (name, value) pairs


CASES = [
    # NH001 nonfinite
    Case("healthy-he-relu", "NH001", lambda: stack(128, 4, nn.ReLU, he), None),
    Case("nan-weight", "NH001", with_nan_weight, Severity.ERROR, "2", width=64),
    Case("overflow-in-forward", "NH001", overflowing, Severity.ERROR, "2", width=64),
    Case("inf-gradient-only", "NH001", SqrtAtZero, Severity.ERROR, width=16),
    # NH101 dead-relu
    Case("healthy-he-relu", "NH101", lambda: stack(128, 4, nn.ReLU, he), None),
    Case("most-units-dead", "NH101", lambda: dead_bias(0.6), Severity.ERROR, "3"),
    Case("some-units-dead", "NH101", lambda: dead_bias(0.2), Severity.WARNING, "3"),
    Case("few-dead-below-threshold", "NH101", lambda: dead_bias(0.05), None),
    Case(
        "leaky-relu-never-dead", "NH101", lambda: stack(128, 3, nn.LeakyReLU, lambda n: 0.0), None
    ),
    Case("batch-too-small", "NH101", lambda: dead_bias(0.6), Severity.INFO, None, examples=8),
    # NH102 saturation
    Case("xavier-tanh", "NH102", lambda: stack(128, 5, nn.Tanh, xavier), None),
    Case("tanh-w-randn", "NH102", lambda: stack(128, 5, nn.Tanh, lambda n: 1.0), Severity.ERROR),
    Case(
        "sigmoid-large", "NH102", lambda: stack(128, 4, nn.Sigmoid, lambda n: 1.0), Severity.ERROR
    ),
    Case(
        "tanh-mildly-large",
        "NH102",
        lambda: stack(128, 3, nn.Tanh, lambda n: 2.2 / math.sqrt(n)),
        Severity.WARNING,
    ),
    Case("relu-cannot-saturate", "NH102", lambda: stack(128, 4, nn.ReLU, lambda n: 1.0), None),
    # NH201 activation-variance
    Case("healthy-he-relu", "NH201", lambda: stack(128, 6, nn.ReLU, he), None),
    Case(
        "tanh-0.01-vanishing",
        "NH201",
        lambda: stack(128, 5, nn.Tanh, lambda n: 0.01),
        Severity.ERROR,
        None,
    ),
    Case(
        "relu-2x-he-exploding",
        "NH201",
        lambda: stack(128, 6, nn.ReLU, lambda n: 2 * he(n)),
        Severity.WARNING,
        None,
    ),
    Case(
        "default-init-deep-relu",
        "NH201",
        lambda: stack(128, 6, nn.ReLU, None),
        Severity.WARNING,
        None,
    ),
    Case("default-init-shallow-relu", "NH201", lambda: stack(128, 2, nn.ReLU, None), None),
    Case(
        "tiny-init-batchnorm",
        "NH201",
        lambda: stack(128, 6, nn.Tanh, lambda n: 0.01, nn.BatchNorm1d),
        None,
    ),
    Case(
        "tiny-init-layernorm",
        "NH201",
        lambda: stack(128, 6, nn.ReLU, lambda n: 0.001, nn.LayerNorm),
        None,
    ),
    Case(
        "zero-init",
        "NH201",
        lambda: stack(64, 3, nn.ReLU, lambda n: 0.0),
        Severity.ERROR,
        None,
        width=64,
    ),
    # NH202 gradient-variance
    Case("healthy-he-relu", "NH202", lambda: stack(128, 6, nn.ReLU, he), None),
    Case("xavier-tanh", "NH202", lambda: stack(128, 6, nn.Tanh, xavier), None),
    Case(
        "tanh-0.01-vanishing",
        "NH202",
        lambda: stack(128, 5, nn.Tanh, lambda n: 0.01),
        Severity.ERROR,
        None,
    ),
    Case(
        "tanh-w-randn-exploding",
        "NH202",
        lambda: stack(128, 5, nn.Tanh, lambda n: 1.0),
        Severity.WARNING,
        None,
    ),
    Case(
        "tanh-w-randn-deeper",
        "NH202",
        lambda: stack(128, 8, nn.Tanh, lambda n: 1.0),
        Severity.ERROR,
        None,
    ),
    Case(
        "tiny-init-batchnorm",
        "NH202",
        lambda: stack(128, 6, nn.Tanh, lambda n: 0.01, nn.BatchNorm1d),
        None,
    ),
    # NH301 norm-ratio
    Case("healthy-he-relu", "NH301", lambda: stack(128, 4, nn.ReLU, he), None),
    Case("bn-layer-scaled-100x", "NH301", lambda: bn_scaled_layer(100.0), Severity.WARNING, None),
    Case("bn-layer-scaled-3x", "NH301", lambda: bn_scaled_layer(3.0), None),
    # NH401 curvature (the lr limit itself is checked against the dense Hessian and SGD
    # in test_curvature.py)
    Case(
        "he-relu-small-lr",
        "NH401",
        lambda: stack(64, 2, nn.ReLU, he),
        None,
        width=64,
        kwargs=(("lr", 1e-3),),
    ),
    Case(
        "he-relu-huge-lr",
        "NH401",
        lambda: stack(64, 2, nn.ReLU, he),
        Severity.ERROR,
        None,
        width=64,
        kwargs=(("lr", 1e3),),
    ),
    Case(
        "he-relu-no-lr", "NH401", lambda: stack(64, 2, nn.ReLU, he), Severity.INFO, None, width=64
    ),
    # NH501 symmetry
    Case("healthy-he-relu", "NH501", lambda: stack(128, 4, nn.ReLU, he), None),
    Case(
        "zero-init",
        "NH501",
        lambda: stack(64, 3, nn.ReLU, lambda n: 0.0),
        Severity.ERROR,
        "0",
        width=64,
    ),
    Case(
        "constant-init",
        "NH501",
        lambda: stack(64, 3, nn.Tanh, lambda n: 0.0, seed=1),
        Severity.ERROR,
        "2",
        width=64,
    ),
    Case("three-copied-units", "NH501", lambda: duplicated_units(3), Severity.WARNING, "2"),
    Case("symmetry-created-upstream", "NH501", upstream_symmetry, Severity.WARNING, "3"),
    Case("zero-output-layer-only", "NH501", lambda: zero_head(), None),
    Case("frozen-constant-layer", "NH501", lambda: frozen_constant(), None),
    # NH601 init-scale
    Case("healthy-he-relu", "NH601", lambda: stack(128, 8, nn.ReLU, he), None),
    Case("xavier-tanh", "NH601", lambda: stack(128, 8, nn.Tanh, xavier_exact), None),
    Case(
        "default-init-deep-relu", "NH601", lambda: stack(128, 6, nn.ReLU, None), Severity.ERROR, "0"
    ),
    Case(
        "default-init-4-relu", "NH601", lambda: stack(128, 4, nn.ReLU, None), Severity.WARNING, "0"
    ),
    Case("default-init-shallow-relu", "NH601", lambda: stack(128, 1, nn.ReLU, None), None),
    Case(
        "xavier-scale-deep-relu",
        "NH601",
        lambda: stack(128, 8, nn.ReLU, xavier),
        Severity.WARNING,
        "0",
    ),
    Case("tanh-0.01", "NH601", lambda: stack(128, 5, nn.Tanh, lambda n: 0.01), Severity.ERROR, "0"),
    Case(
        "tiny-init-batchnorm",
        "NH601",
        lambda: stack(128, 6, nn.Tanh, lambda n: 0.01, nn.BatchNorm1d),
        None,
    ),
    Case("one-layer-100x", "NH601", lambda: one_layer_scaled(10.0), Severity.WARNING, "2"),
]


def scan_case(case: Case, **kwargs):
    model = case.build()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(case.examples, case.width, generator=gen)
    y = torch.randint(0, 10 if case.width != 16 else 4, (case.examples,), generator=gen)
    report = nnhealth.scan(model, (x, y), select=[case.code], **dict(case.kwargs), **kwargs)
    assert not report.errors and not report.skipped
    return list(report.findings)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.code}-{c.id}" for c in CASES])
def test_case(case: Case) -> None:
    findings = scan_case(case)
    worst = max(findings, key=lambda f: f.severity, default=None)
    if case.expect is None:
        assert findings == [], [f.message for f in findings]
        return
    assert worst is not None, f"{case.code} found nothing on {case.id}"
    assert worst.severity == case.expect, worst.message
    if case.layer != "any":
        assert case.layer in [f.layer for f in findings if f.severity == case.expect]
    assert worst.fix and worst.message
    assert all(f.code == case.code for f in findings)


def test_every_check_has_good_and_bad_cases() -> None:
    for check in REGISTRY:
        kinds = {c.expect is None for c in CASES if c.code == check.code}
        assert kinds == {True, False}, check.code


def test_dead_relu_numbers() -> None:
    (finding,) = scan_case(Case("x", "NH101", lambda: dead_bias(0.6), Severity.ERROR))
    assert finding.evidence["dead_units"] == int(0.6 * 128)
    assert finding.evidence["dead_fraction"] == pytest.approx(int(0.6 * 128) / 128)
    assert 'model.get_submodule("2")' in finding.fix_snippet
    assert "LeakyReLU" in finding.fix_snippet


def test_vanishing_factor_matches_theory() -> None:
    """tanh(s) ~ s for small s, so Var grows by n Var(w) = 128 * 1e-4 per layer."""
    findings = scan_case(
        Case("x", "NH201", lambda: stack(128, 5, nn.Tanh, lambda n: 0.01), Severity.ERROR)
    )
    assert findings[0].evidence["factor_per_layer"] == pytest.approx(128 * 1e-4, rel=0.1)
    assert findings[0].evidence["verdict"] == "vanishing"
    assert "xavier_normal_" in findings[0].fix_snippet


# ---- registry ------------------------------------------------------------------------


def test_codes_and_names_unique_and_stable() -> None:
    codes = [c.code for c in REGISTRY]
    names = [c.name for c in REGISTRY]
    assert len(set(codes)) == len(codes) and len(set(names)) == len(names)
    assert dict(zip(codes, names, strict=True)) == {
        "NH001": "nonfinite",
        "NH101": "dead-relu",
        "NH102": "saturation",
        "NH201": "activation-variance",
        "NH202": "gradient-variance",
        "NH301": "norm-ratio",
        "NH401": "curvature",
        "NH501": "symmetry",
        "NH601": "init-scale",
    }


@pytest.mark.parametrize("check", REGISTRY, ids=[c.code for c in REGISTRY])
def test_docstring_sections_and_options(check: type[Check]) -> None:
    doc = check.doc()
    for section in REQUIRED_SECTIONS:
        assert f"{section}:" in doc
    for opt in check.options:
        assert opt.doc and (opt.default is None or isinstance(opt.default, (int, float)))


def test_check_without_docs_is_refused() -> None:
    with pytest.raises(TypeError, match="docstring lacks"):

        class Undocumented(Check):
            """Nothing."""

            code, name, summary, needs = "NH999", "undocumented", "", frozenset()


def test_selection_by_code_prefix_and_name() -> None:
    assert [c.code for c in select_checks(["NH1"], None)] == ["NH101", "NH102"]
    assert [c.code for c in select_checks(None, ["NH2", "nonfinite", "NH3", "NH5"])] == [
        "NH101",
        "NH102",
        "NH401",
        "NH601",
    ]
    assert [c.code for c in select_checks(["dead-relu", "NH001"], None)] == ["NH001", "NH101"]
    with pytest.raises(ValueError, match="unknown check 'NH9'"):
        select_checks(["NH9"], None)


def test_option_overrides_are_validated() -> None:
    check = lookup("dead-relu")
    assert check.resolve_options({"warn_fraction": 0.3})["warn_fraction"] == 0.3
    with pytest.raises(ValueError, match="unknown option"):
        check.resolve_options({"nope": 1})
    with pytest.raises(ValueError, match="expected a number"):
        check.resolve_options({"warn_fraction": "high"})
