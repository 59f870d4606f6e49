"""nnhealth.scan on an in-memory model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, he_mlp
from torch import nn

import nnhealth
from nnhealth.errors import CaptureError, DataError, UsageError


def test_scan_in_memory_model_left_unchanged() -> None:
    model = he_mlp([32, 64, 64, 4])
    with torch.no_grad():
        model[2].bias[:40] = -30.0
    model.eval()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(64, 32), torch.randint(0, 4, (64,))
    report = nnhealth.scan(model, (x, y))
    assert [f.code for f in report.findings] == ["NH101"]
    assert report.findings[0].severity is nnhealth.Severity.ERROR
    assert not report.ok() and report.ok(fail_on="error") is False
    assert report.run["mode"] == "train" and report.run["loss"] == "cross-entropy"
    assert not model.training
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())
    assert '"schema_version": 1' in report.to_json()


def test_custom_loss_options_and_selection() -> None:
    model = he_mlp([8, 16, 16, 2])
    with torch.no_grad():
        model[2].bias[:4] = -30.0  # 25% dead: a warning at the default threshold
    x = torch.randn(32, 8)
    calls = []

    def loss_fn(out, target):
        calls.append(out.shape)
        return F.mse_loss(out, target)

    report = nnhealth.scan(model, (x, torch.randn(32, 2)), loss_fn=loss_fn)
    assert calls == [torch.Size([32, 2])] and report.run["loss"] == "custom (loss_fn)"
    assert [f.severity for f in report.findings] == [nnhealth.Severity.WARNING]
    quiet = nnhealth.scan(model, x, options={"dead-relu": {"warn_fraction": 0.5}})
    assert quiet.findings == ()
    assert nnhealth.scan(model, x, ignore=["NH101"]).findings == ()
    with pytest.raises(UsageError, match="unknown option"):
        nnhealth.scan(model, x, options={"dead-relu": {"nope": 1}})
    with pytest.raises(UsageError, match="unknown check"):
        nnhealth.scan(model, x, options={"nope": {}})


def test_errors_are_exceptions_not_exits() -> None:
    model = he_mlp([8, 4])
    with pytest.raises(CaptureError, match="layer '0'"):
        nnhealth.scan(model, torch.randn(4, 9))
    with pytest.raises(DataError, match="NaN"):
        nnhealth.scan(model, torch.full((4, 8), float("nan")))
    # option values the CLI's choices would refuse are refused from Python too, naming
    # the keyword (not a CLI flag)
    with pytest.raises(UsageError, match="^loss 'cross_entropy': expected one of auto, ce"):
        nnhealth.scan(model, torch.randn(4, 8), loss="cross_entropy")
    with pytest.raises(UsageError, match="^mode 'test'"):
        nnhealth.scan(model, torch.randn(4, 8), mode="test")


def test_eval_mode_pass() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model.train()
    report = nnhealth.scan(model, torch.randn(16, 4), mode="eval")
    assert report.run["mode"] == "eval" and model.training


def test_import_does_not_import_torch() -> None:
    code = "import sys, nnhealth; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT)},
        check=True,
    ).stdout
    assert out.strip() == "False"


def test_python_booleans_may_be_0_or_1_and_infinity_is_named() -> None:
    model, batch = he_mlp([8, 16, 4]), (torch.randn(32, 8), torch.randint(0, 4, (32,)))
    report = nnhealth.scan(model, batch, what_if=0, hessian=1, select=["NH401"], lr=0.1)
    assert report.curvature is not None and report.what_if is None
    with pytest.raises(UsageError, match="^what_if 2: expected true or false"):
        nnhealth.scan(model, batch, what_if=2)
    with pytest.raises(UsageError, match="^lr inf: expected a finite number > 0"):
        nnhealth.scan(model, batch, lr=float("inf"))
    with pytest.raises(UsageError, match=r"^hessian_top 0: expected an integer in \[1, 100,000\]"):
        nnhealth.scan(model, batch, hessian_top=0)


def test_scan_refuses_what_is_not_a_module() -> None:
    """A path or a state_dict is not a model: one clear error, not an AttributeError."""
    for wrong in ("model.pt", {"weight": torch.zeros(2, 2)}):
        with pytest.raises(UsageError, match="takes a torch.nn.Module"):
            nnhealth.scan(wrong, torch.randn(4, 2))
