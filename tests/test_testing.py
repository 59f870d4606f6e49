"""The pytest helper."""

from __future__ import annotations

import pytest
import torch
from conftest import he_mlp

from nnhealth.testing import assert_healthy


def test_healthy_model_passes_and_returns_the_report() -> None:
    model = he_mlp([16, 64, 64, 4])
    report = assert_healthy(model, (torch.randn(64, 16), torch.randint(0, 4, (64,))))
    assert report.ok()


def test_sick_model_fails_with_the_text_report() -> None:
    model = he_mlp([16, 64, 64, 4])
    with torch.no_grad():
        model[2].bias.fill_(-50.0)
    with pytest.raises(AssertionError) as info:
        assert_healthy(model, torch.randn(64, 16))
    message = str(info.value)
    assert message.startswith("nnhealth found problems at or above error:")
    assert "NH101 dead-relu 3" in message and "100% of units dead (64 of 64)" in message
    assert "fix:" in message


def test_fail_on_and_options() -> None:
    model = he_mlp([16, 64, 64, 4])
    with torch.no_grad():
        model[2].bias[:16] = -50.0  # 25% dead: a warning
    x = torch.randn(64, 16)
    assert_healthy(model, x)
    with pytest.raises(AssertionError, match="at or above warning"):
        assert_healthy(model, x, fail_on="warning")
    assert_healthy(model, x, fail_on="warning", ignore=["dead-relu"])
