"""Every stock model of the zoo, at its own default init, scans clean: a report (exit 0
or 1), no error-level finding, at most two warnings, and the model left as found."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

import nnhealth
from nnhealth.cli import main
from nnhealth.findings import Severity
from nnhealth.formatters import RenderOptions, get_formatter

MAX_WARNINGS = 2


def render(report: nnhealth.Report) -> str:
    return get_formatter("text", RenderOptions(width=120, quiet=True)).render(report)


def _state(model: torch.nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "params": {
            n: (p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()
        },
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


def _same(before: dict, after: dict) -> bool:
    if before["training"] != after["training"] or before["hooks"] != after["hooks"]:
        return False
    if before["params"].keys() != after["params"].keys():
        return False
    for name, (value, grad_flag, grad) in before["params"].items():
        now, now_flag, now_grad = after["params"][name]
        if not torch.equal(value, now) or grad_flag != now_flag or grad is not now_grad:
            return False
    return all(torch.equal(b, after["buffers"][n]) for n, b in before["buffers"].items())


def test_stock_model_scans_clean(zoo, zoo_name: str) -> None:
    model, batch = zoo(zoo_name)
    before = _state(model)
    report = nnhealth.scan(model, batch)
    text = render(report)
    assert not report.errors, text
    assert not [f for f in report.findings if f.severity == Severity.ERROR], text
    warnings = [f for f in report.findings if f.severity == Severity.WARNING]
    assert len(warnings) <= MAX_WARNINGS, text
    assert _same(before, _state(model)), "the scan changed the model"


@pytest.mark.parametrize(
    "name", ["torchvision/mobilenet_v3_small", "timm/vit_tiny", "transformers/gpt2"]
)
def test_stock_model_with_hessian_keeps_the_report(zoo, name: str) -> None:
    model, batch = zoo(name)
    before = _state(model)
    report = nnhealth.scan(model, batch, hessian=True)
    assert _same(before, _state(model)), "the Hessian products changed the model"
    assert not report.errors, render(report)
    assert report.curvature is not None and report.curvature["top_eigenvalues"][0] > 0
    assert not [f for f in report.findings if f.severity == Severity.ERROR]


def test_resnet50_at_the_standard_lr_is_not_an_error(zoo) -> None:
    """lr 0.1 with momentum is the ImageNet recipe for ResNet-50: not a divergence."""
    model, batch = zoo("torchvision/resnet50")
    report = nnhealth.scan(model, batch, lr=0.1)
    assert not [f for f in report.findings if f.severity == Severity.ERROR], render(report)


FACTORIES = {
    "torchvision": """
        import torch, torchvision
        def make():
            torch.manual_seed(0)
            return torchvision.models.resnet18(num_classes=10)
    """,
    "timm": """
        import timm, torch
        def make():
            torch.manual_seed(0)
            return timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    """,
    "transformers": """
        import torch, transformers
        def make():
            torch.manual_seed(0)
            config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100,
                                             n_positions=32, bos_token_id=0, eos_token_id=0)
            ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
            return transformers.GPT2LMHeadModel(config), ids
    """,
}


@pytest.mark.parametrize("library", sorted(FACTORIES))
def test_cli_scans_a_stock_model(
    library: str, lib, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lib(library)
    factory = tmp_path / "zoo_factory.py"
    factory.write_text(textwrap.dedent(FACTORIES[library]))
    args = [f"{factory}:make", "--format", "json", "--seed", "0"]
    if library != "transformers":
        args += ["--input-shape", "4x3x64x64"]
    code = main(["scan", *args])
    out, err = capsys.readouterr()
    assert code in (0, 1), err
    report = json.loads(out)
    assert report["summary"]["error"] == 0, out
    assert report["summary"]["warning"] <= MAX_WARNINGS, out
