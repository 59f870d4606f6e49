"""Broken variants of zoo models: each is found on the right layer, with the right fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nnhealth
from nnhealth.findings import Finding, Report, Severity


def _found(report: Report, code: str, layer: str | None = None) -> Finding:
    hits = [f for f in report.findings if f.code == code and (layer is None or f.layer == layer)]
    assert hits, [(f.code, f.severity.label, f.layer, f.message) for f in report.findings]
    return hits[0]


@pytest.mark.parametrize("bias", [0.0, 0.1], ids=["bias-0", "bias-trained"])
def test_gpt2_zeroed_pre_norm_gain_is_an_error_naming_the_norm(zoo_fresh, bias: float) -> None:
    """With a zero shift the next layer's input is 0; with a trained one it is the same
    constant for every example: an error either way."""
    model, ids = zoo_fresh("transformers/gpt2")
    with torch.no_grad():
        model.transformer.h[0].ln_2.weight.zero_()
        model.transformer.h[0].ln_2.bias.normal_(0.0, bias)
    report = nnhealth.scan(model, ids)
    finding = _found(report, "NH103", "transformer.h.0.ln_2")
    assert finding.severity == Severity.ERROR
    assert "transformer.h.0.ln_2" in (finding.fix_snippet or "")
    assert "ones_" in (finding.fix_snippet or "")


def test_gpt2_zeroed_final_norm_names_ln_f(zoo_fresh) -> None:
    model, ids = zoo_fresh("transformers/gpt2")
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.normal_(0.0, 0.1)
    report = nnhealth.scan(model, ids)
    finding = _found(report, "NH103", "transformer.ln_f")
    assert finding.severity == Severity.ERROR
    errors = [f for f in report.findings if f.severity == Severity.ERROR]
    assert errors == [finding], errors  # the layers below it: NH202 defers to NH103
    assert all("tanh" not in (f.fix or "") for f in report.findings), report.findings


def test_timm_vit_zeroed_layernorm_gain(zoo_fresh) -> None:
    model, batch = zoo_fresh("timm/vit_tiny")
    with torch.no_grad():
        model.blocks[1].norm1.weight.zero_()
    report = nnhealth.scan(model, batch)
    assert _found(report, "NH103", "blocks.1.norm1").severity == Severity.ERROR


class LstmClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 32)
        self.lstm = nn.LSTM(32, 64, batch_first=True)
        self.head = nn.Linear(64, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.head(out[:, -1])


def _lstm_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 100, (8, 16), generator=gen), torch.randint(0, 3, (8,), generator=gen)


def test_closed_lstm_forget_gate_is_found_with_the_forget_bias_fix() -> None:
    torch.manual_seed(0)
    model = LstmClassifier()
    hidden = model.lstm.hidden_size
    with torch.no_grad():  # PyTorch's gate order is input, forget, cell, output
        model.lstm.bias_ih_l0[hidden : 2 * hidden] = -10.0
        model.lstm.bias_hh_l0[hidden : 2 * hidden] = 0.0
    report = nnhealth.scan(model, _lstm_batch(), what_if=True)
    finding = _found(report, "NH102", "lstm")
    assert finding.severity == Severity.ERROR and "forget" in finding.message
    assert "bias_ih_l0" in (finding.fix_snippet or "")
    tried = [w for w in report.what_if if w["code"] == "NH102"]
    assert tried and all(w["applied"] and w["resolved"] for w in tried), tried


def test_default_lstm_is_not_flagged() -> None:
    torch.manual_seed(0)
    report = nnhealth.scan(LstmClassifier(), _lstm_batch())
    assert not [f for f in report.findings if f.code == "NH102"], report.findings


def test_resnet_convs_shrunk_behind_batchnorm(zoo_fresh) -> None:
    """Scale-invariant weights: BatchNorm hides the scale from the forward pass, but the
    effective step lr/||w||^2 grows by 1e4; the fix re-initializes the convs, not fc."""
    model, batch = zoo_fresh("torchvision/resnet18")
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for name in convs:
            model.get_submodule(name).weight.mul_(0.01)
    report = nnhealth.scan(model, batch, what_if=True)
    hits = [f for f in report.findings if f.code == "NH601"]
    assert hits and all(f.severity >= Severity.WARNING for f in hits), report.findings
    named = " ".join(f"{f.layer} {f.message} {f.fix_snippet}" for f in hits)
    assert "conv1" in named and "fc" not in {f.layer for f in hits}
    tried = [w for w in report.what_if if w["code"] == "NH601"]
    assert tried and not any("on fc" in w["fix"] for w in tried), tried
    assert any(w["applied"] and w["resolved"] for w in tried), tried


class Decoder(nn.Module):
    """A small GAN-style decoder: latent -> 4x4 -> 8x8 -> 16x16 image."""

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(16, 32 * 4 * 4)
        self.up1 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.act1 = nn.ReLU()
        self.up2 = nn.ConvTranspose2d(16, 3, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(-1, 32, 4, 4)
        return self.up2(self.act1(self.up1(h)))


def test_conv_transpose_decoder_with_dead_relu() -> None:
    torch.manual_seed(0)
    model = Decoder()
    with torch.no_grad():
        model.up1.bias.fill_(-100.0)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(16, 16, generator=gen), torch.randn(16, 3, 16, 16, generator=gen)
    report = nnhealth.scan(model, batch, what_if=True)
    finding = _found(report, "NH101", "act1")
    assert finding.severity == Severity.ERROR
    assert "up1" in (finding.fix or "") + (finding.fix_snippet or "")
    tried = [w for w in report.what_if if w["code"] == "NH101"]
    assert any(w["applied"] and w["resolved"] for w in tried), tried


def test_he_initialized_decoder_is_clean() -> None:
    """He init with a transposed conv's true fan-in: in_channels x k^2 / stride^2 inputs
    reach each output value (PyTorch's own default init, fan from dim 1, is x0.08 of it
    here, and the measured signal does shrink: NH601 says so)."""
    torch.manual_seed(0)
    model = Decoder()
    with torch.no_grad():
        for layer in (model.up1, model.up2):
            fan_in = layer.in_channels * 4 * 4 / (2 * 2)
            nn.init.normal_(layer.weight, std=(2 / fan_in) ** 0.5)
            nn.init.zeros_(layer.bias)
    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(16, 16, generator=gen), torch.randn(16, 3, 16, 16, generator=gen)
    report = nnhealth.scan(model, batch)
    assert not [f for f in report.findings if f.severity >= Severity.WARNING], report.findings
