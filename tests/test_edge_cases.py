"""Regressions from review: user code that exits, files that lie, models that are
unusual but healthy, and nonlinearities that are not layers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import he_mlp, one_line_error
from torch import nn
from torch.utils.checkpoint import checkpoint

import nnhealth


@pytest.fixture
def userdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text(
        "import argparse, sys, torch\n"
        "from torch import nn\n"
        "args = argparse.ArgumentParser().parse_args()  # a training script parses argv\n"
        "def make_model():\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))\n"
        "def exits():\n"
        "    sys.exit(7)\n"
        "def with_bad_loss():\n"
        "    def loss(out, y):\n"
        "        raise KeyError('logits')\n"
        "    return make_model(), (torch.randn(32, 8), torch.randint(0, 2, (32,))), loss\n"
    )
    return tmp_path


def test_output_never_overwrites_the_entry_point_source(cli, userdir: Path) -> None:
    before = (userdir / "train.py").read_text()
    line = one_line_error(
        cli("scan", "train.py:make_model", "--input-shape", "32x8", "-o", "train.py")
    )
    assert "refusing to overwrite" in line
    assert (userdir / "train.py").read_text() == before


def test_user_code_that_parses_argv_or_exits(cli, userdir: Path) -> None:
    assert cli("scan", "train.py:make_model", "--input-shape", "32x8", "-q").code == 0
    line = one_line_error(cli("scan", "train.py:exits", "--input-shape", "32x8"))
    assert "called sys.exit(7)" in line


def test_custom_loss_that_raises(cli, userdir: Path) -> None:
    line = one_line_error(cli("scan", "train.py:with_bad_loss"))
    assert "loss function loss raised KeyError" in line


def test_huge_input_shape_is_refused(cli, tmp_path: Path) -> None:
    torch.save(he_mlp([8, 4]), tmp_path / "m.pt")
    line = one_line_error(cli("scan", tmp_path / "m.pt", "--input-shape", "99999999999x99999999"))
    assert "--input-shape" in line and "smaller batch" in line


@pytest.mark.parametrize("length", [2**63, 2**40, 50])
def test_a_length_field_in_the_file_is_not_trusted(cli, tmp_path: Path, length: int) -> None:
    path = tmp_path / "x.pt"
    path.write_bytes(struct.pack("<Q", length) + b"{ not json at all")
    assert "not a model format" in one_line_error(cli("scan", path, "--input-shape", "2x2"))


def test_select_and_ignore_leaving_nothing(cli, tmp_path: Path) -> None:
    torch.save(he_mlp([8, 4]), tmp_path / "m.pt")
    line = one_line_error(
        cli(
            "scan",
            tmp_path / "m.pt",
            "--input-shape",
            "32x8",
            "--select",
            "NH101",
            "--ignore",
            "dead-relu",
        )
    )
    assert "no checks left" in line


def test_skipped_checks_mean_no_full_verdict(cli, tmp_path: Path) -> None:
    torch.save(he_mlp([8, 16, 4]).state_dict(), tmp_path / "sd.pt")
    res = cli("scan", tmp_path / "sd.pt", "--format", "json")
    report = json.loads(res.out)
    assert res.code == 0 and report["findings"] == [] and report["summary"]["healthy"] is False
    assert "not a full verdict" in cli("scan", tmp_path / "sd.pt").out


class Gated(nn.Module):
    """A learned gate: sigmoid of a parameter is not a layer's activation."""

    def __init__(self) -> None:
        super().__init__()
        self.net = he_mlp([16, 64, 64, 64, 4])
        self.g = nn.Parameter(torch.zeros(64))

    def forward(self, x):
        h = F.relu(self.net[0](x)) * 2 * torch.sigmoid(self.g)
        return self.net[4](F.relu(self.net[2](h)))


def test_nonlinearity_of_parameters_is_not_recorded() -> None:
    report = nnhealth.scan(Gated(), torch.randn(64, 16))  # batch == gate width, on purpose
    assert not any(r["kind"] == "sigmoid" for r in report.layers)
    assert report.findings == ()


def test_hardsigmoid_mean_derivative() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Hardsigmoid(), nn.Linear(32, 2))
    with torch.no_grad():
        model[0].weight.mul_(5)
    x = torch.randn(256, 8)
    report = nnhealth.scan(model, x, select=["NH102"])
    row = next(r for r in report.layers if r["kind"] == "hardsigmoid")
    s = model[0](x).detach()
    expected = float(((s > -3) & (s < 3)).double().mean() / 6)  # hardsigmoid' = 1/6 inside
    assert row["mean_derivative"] == pytest.approx(expected, rel=1e-6)


def test_relu6_mean_derivative_counts_the_flat_zero() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU6(), nn.Linear(32, 2))
    x = torch.randn(256, 8) * 10
    row = next(r for r in nnhealth.scan(model, x).layers if r["kind"] == "relu6")
    s = model[0](x).detach()
    assert row["mean_derivative"] == pytest.approx(
        float(((s > 0) & (s < 6)).double().mean()), rel=1e-6
    )


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return self.head(x)


def test_activation_checkpointing_adds_no_phantom_layers() -> None:
    report = nnhealth.scan(Checkpointed(), torch.randn(32, 16))
    names = [r["name"] for r in report.layers]
    assert not any("#" in n for n in names), names
    assert all(r["grad_var"] is not None for r in report.layers if r["role"] != "params")


class ConvThenSequence(nn.Module):
    """Conv1d over (N, C, L), then back to (N, L, C) for LayerNorm and GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 32, 3, padding=1)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        h = F.gelu(self.norm(self.conv(x).transpose(1, 2)))
        return self.head(h.mean(dim=1))


def test_unit_dimension_follows_the_layout() -> None:
    report = nnhealth.scan(ConvThenSequence(), torch.randn(8, 4, 10))
    gelu = next(r for r in report.layers if r["kind"] == "gelu")
    conv = next(r for r in report.layers if r["name"] == "conv")
    assert gelu["units"] == 32 and conv["units"] == 32


def test_prelu_is_one_nonlinearity_not_a_layer() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.PReLU(), nn.Linear(8, 2))
    rows = [(r["name"], r["role"]) for r in nnhealth.scan(model, torch.randn(32, 8)).layers]
    assert rows == [("0", "layer"), ("1", "activation"), ("2", "layer"), ("1", "params")]


def test_output_sigmoid_is_not_saturation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1), nn.Sigmoid())
    with torch.no_grad():
        model[2].weight.mul_(50)  # a confident classifier
    x = torch.randn(64, 8)
    y = (torch.rand(64, 1) > 0.5).float()
    report = nnhealth.scan(model, (x, y), loss_fn=nn.BCELoss(), select=["NH102"])
    assert report.findings == ()


class SEBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.fc1 = nn.Linear(c, c // 4)
        self.fc2 = nn.Linear(c // 4, c)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean(dim=(2, 3))))))
        return F.relu(x + h * gate[:, :, None, None])


def test_squeeze_excitation_gates_do_not_make_a_variance_trend() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        *[SEBlock(16) for _ in range(4)],
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    batch = (torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,)))
    report = nnhealth.scan(model, batch, select=["NH201", "NH202"])
    assert report.findings == (), [f.message for f in report.findings]


class LanguageModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.lstm = nn.LSTM(32, 64, batch_first=True)
        self.head = nn.Linear(64, 100)

    def forward(self, ids):
        return self.head(self.lstm(self.emb(ids))[0][:, -1])


def test_lstm_language_model_is_healthy() -> None:
    torch.manual_seed(0)
    batch = (torch.randint(0, 100, (32, 12)), torch.randint(0, 100, (32,)))
    report = nnhealth.scan(LanguageModel(), batch)
    assert report.findings == (), [f.message for f in report.findings]


def test_norm_collapse_needs_the_modules(cli, tmp_path: Path) -> None:
    """NH103 reads which parameters are normalization scales from the modules: a bare
    state_dict cannot say, so the check is skipped with the reason (not called healthy);
    a float8 model, scanned without a pass, still has its modules."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[1].weight.mul_(1e-5)
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    report = json.loads(
        cli("scan", tmp_path / "sd.pt", "--select", "NH103", "--format", "json").out
    )
    assert report["findings"] == []
    (skip,) = report["skipped"]
    assert skip["code"] == "NH103" and "bare state_dict" in skip["reason"]
    eight = nnhealth.scan(
        model.to(torch.float8_e4m3fn),
        (torch.randn(8, 16), torch.randint(0, 4, (8,))),
        select=["NH103"],
    )
    assert [(f.code, f.layer) for f in eight.findings] == [("NH103", "1")]


def test_a_sparse_embedding_gradient_is_scanned() -> None:
    """nn.Embedding(sparse=True) has a sparse COO gradient: its norm is that of the dense
    gradient (the stored values), and the scan runs with or without an optimizer."""
    from nnhealth.capture.precision import norm64

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Flatten(), nn.Linear(32, 3))
    x, y = torch.randint(0, 50, (4, 4)), torch.zeros(4, dtype=torch.long)
    loss = nn.functional.cross_entropy(model(x), y)
    (g,) = torch.autograd.grad(loss, [model[0].weight])
    assert g.layout == torch.sparse_coo
    assert norm64(g) == pytest.approx(float(g.to_dense().double().norm()), rel=1e-6)
    for kw in ({}, {"lr": 0.1}, {"lr": 1e-3, "optimizer": "adam"}):
        report = nnhealth.scan(model, (x, y), **kw)
        assert not report.errors
        row = next(r for r in report.layers if r["name"] == "0")
        assert row["weight_grad_norm"] == pytest.approx(norm64(g), rel=1e-5)
