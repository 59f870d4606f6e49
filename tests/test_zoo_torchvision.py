"""Stock torchvision models, built with their own default init (no weights), at small
input sizes: deliberate design choices are not reported as problems. Skipped where
torchvision does not import (it needs torch 2.14 here; CI installs 2.13)."""

from __future__ import annotations

import pytest
import torch

import nnhealth
from nnhealth.findings import Severity

models = pytest.importorskip("torchvision.models")


def scan(model: torch.nn.Module) -> nnhealth.Report:
    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(8, 3, 32, 32, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    return nnhealth.scan(model, batch)


def test_vit_zero_initialized_head_is_info() -> None:
    torch.manual_seed(0)
    vit = models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=10,
    )
    report = scan(vit)
    assert not report.errors
    assert all(f.severity == Severity.INFO for f in report.findings), report.findings
    codes = {(f.code, f.layer) for f in report.findings}
    assert ("NH601", "heads.head") in codes and ("NH202", None) in codes


def test_resnet_zero_init_residual_is_info() -> None:
    torch.manual_seed(0)
    report = scan(models.resnet18(num_classes=10, zero_init_residual=True))
    assert not report.errors
    assert all(f.severity == Severity.INFO for f in report.findings), report.findings
    collapsed = [f.layer for f in report.findings if f.code == "NH103"]
    assert collapsed == [f"layer{i}.{j}.bn2" for i in range(1, 5) for j in range(2)]
