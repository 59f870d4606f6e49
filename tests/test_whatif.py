"""--what-if: each sample's main finding goes away under its recommended fix, and the
model the user gave is bit-identical afterwards."""

from __future__ import annotations

import json

import make_samples
import pytest
import torch
from conftest import SAMPLE_FINDINGS
from conftest import state_of as _state
from torch import nn

import nnhealth

# sample -> (check whose finding must be resolved, a fix label that must resolve it)
MAIN = {
    "relu_dead_bias": ("NH101", "He init + bias 0.01 on 2"),
    "tanh_vanishing": ("NH201", "xavier_normal_ on every Linear/Conv"),
    "tanh_saturated": ("NH102", "xavier_normal_ on 0"),
    "sigmoid_large": ("NH102", "xavier_normal_ on 0"),
    "zero_init_mlp": ("NH501", "kaiming_normal_ on 0"),
    "duplicated_units": ("NH501", "1% noise on 2"),
    "xavier_deep_relu": ("NH601", "kaiming_normal_ on every Linear/Conv"),
    "nan_weight": ("NH001", "kaiming_normal_ on 2 (instead of the non-finite values)"),
    "norm_spread_bn": ("NH301", "kaiming_normal_ on 3"),
}


def test_every_sample_with_a_finding_is_covered() -> None:
    assert {n for n, found in SAMPLE_FINDINGS.items() if found} == set(MAIN)


@pytest.mark.parametrize("name", sorted(MAIN))
def test_main_finding_goes_away_and_the_model_is_untouched(name: str) -> None:
    model, (x, y) = make_samples.build(name)
    before = _state(model)
    report = nnhealth.scan(model, (x, y), what_if=True)
    code, label = MAIN[name]
    tried = [w for w in report.what_if if w["code"] == code and w["fix"] == label]
    assert tried, [(w["code"], w["fix"]) for w in report.what_if]
    assert all(w["applied"] and w["resolved"] for w in tried), tried
    after = _state(model)
    for key in ("training", "requires_grad", "hooks"):
        assert after[key] == before[key]
    for key in ("params", "buffers"):  # bit-identical, NaN included
        for a, b in zip(after[key], before[key], strict=True):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert all(g is None for g in after["grads"])


def test_side_effects_are_reported() -> None:
    """Inserting norm layers satisfies NH601 on a zero-init net, but the layers stay
    constant: the full re-scan still reports the symmetry."""
    model, batch = make_samples.build("zero_init_mlp")
    report = nnhealth.scan(model, batch, what_if=True)
    norm = next(
        w
        for w in report.what_if
        if w["code"] == "NH601" and w["fix"].startswith("LayerNorm/BatchNorm")
    )
    assert norm["resolved"] and norm["remaining_findings"] > 0


def test_functional_relu_cannot_be_swapped_and_says_so() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 32)
            self.head = nn.Linear(32, 2)
            with torch.no_grad():
                self.fc.bias.fill_(-50.0)

        def forward(self, x):
            return self.head(torch.relu(self.fc(x)))

    report = nnhealth.scan(Net(), torch.randn(32, 8), select=["NH101"], what_if=True)
    swap = next(w for w in report.what_if if w["fix"].startswith("LeakyReLU"))
    assert not swap["applied"] and "cannot be swapped" in swap["note"]
    reinit = next(w for w in report.what_if if w["fix"].startswith("He init"))
    assert reinit["applied"] and reinit["resolved"]


def test_lower_learning_rate_is_checked_by_sgd_steps() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 2).double()
    x = torch.randn(64, 8, dtype=torch.float64) * torch.linspace(0.2, 3.0, 8, dtype=torch.float64)
    y = torch.randn(64, 2, dtype=torch.float64)
    limit = nnhealth.scan(model, (x, y), select=["NH401"], hessian=True).curvature["lr_limit"]
    report = nnhealth.scan(
        model, (x, y), select=["NH401"], hessian=True, lr=1.5 * limit, what_if=True
    )
    (w,) = report.what_if
    assert w["applied"] and w["resolved"]
    assert (
        w["before_loss_change"] > 0 > w["after_score"]
    )  # the old rate diverges, the new converges
    assert "SGD steps" in w["after"]


def test_cli_what_if_json_and_text(cli, sample) -> None:
    model, data = sample("relu_dead_bias")
    report = json.loads(cli("scan", model, "--data", data, "--what-if", "--format", "json").out)
    assert {w["fix"] for w in report["what_if"]} == {
        "He init + bias 0.01 on 2",
        "LeakyReLU(0.01) for 3",
        "GELU() for 3",
    }
    text = cli("scan", model, "--data", data, "--what-if").out
    assert "What if (each fix applied to a copy; the model itself is unchanged)" in text
    assert (
        "dead-relu 3  60% dead  ->  He init + bias 0.01 on 2: no finding "
        "(resolved; 0 finding(s) left in all)"
    ) in text
    assert cli("scan", model, "--data", data).out.count("What if") == 0


def test_what_if_needs_a_model(cli, tmp_path) -> None:
    torch.save(nn.Linear(4, 4).state_dict(), tmp_path / "sd.pt")
    res = cli("scan", tmp_path / "sd.pt", "--what-if")
    assert res.code == 2 and "--what-if needs a model and a batch" in res.err


def test_time_budget_is_respected(cli, sample) -> None:
    model, data = sample("zero_init_mlp")
    report = json.loads(
        cli(
            "scan", model, "--data", data, "--what-if", "--what-if-budget", "0", "--format", "json"
        ).out
    )
    assert report["what_if"] and all(
        not w["applied"] and "time budget" in w["note"] for w in report["what_if"]
    )


class _Hard(nn.Module):
    """Functional hard nonlinearities fed by large weights: saturated."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.fc = nn.Linear(16, 64)
        self.head = nn.Linear(64, 2)
        with torch.no_grad():
            self.fc.weight.mul_(40.0)

    def forward(self, x):
        if self.kind == "hardtanh":
            return self.head(torch.nn.functional.hardtanh(self.fc(x)))
        return self.head(torch.nn.functional.hardsigmoid(self.fc(x)))


def _saturated(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind in ("hardtanh", "hardsigmoid"):
        return _Hard(kind)
    act = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu6": nn.ReLU6}[kind]
    model = nn.Sequential(nn.Linear(16, 64), act(), nn.Linear(64, 2))
    with torch.no_grad():
        model[0].weight.mul_(40.0)
        if kind == "relu6":
            model[0].bias.fill_(30.0)
    return model


@pytest.mark.parametrize("kind", ["tanh", "sigmoid", "hardtanh", "hardsigmoid", "relu6"])
def test_the_fix_tried_is_the_snippet_shown(kind: str) -> None:
    """--what-if applies what the finding's snippet says: the same weights, seed for seed."""
    import copy

    from nnhealth.analyzers import lookup
    from nnhealth.analyzers._fixes import FixContext

    model = _saturated(kind)
    x = torch.randn(64, 16)
    report = nnhealth.scan(model, x, select=["NH102"])
    (f,) = [f for f in report.findings if f.code == "NH102"]
    (fix,) = lookup("NH102")().fixes(f, FixContext.of(report, None, train=None))
    by_fix, by_snippet = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(7)
    assert fix.apply(by_fix) is None
    torch.manual_seed(7)
    exec(f.fix_snippet, {"model": by_snippet, "nn": nn, "torch": torch})  # noqa: S102 (our snippet)
    for a, b in zip(by_fix.parameters(), by_snippet.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(next(by_fix.parameters()), next(model.parameters()))  # re-initialized
