"""A check that raises becomes an analyzer error in the report while the other checks
still run: through the Python API, and through the CLI (exit 2, the report still
written, the error listed in text and JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_schema, stack, strict_json
from torch import nn

import nnhealth
from nnhealth.analyzers import lookup
from nnhealth.findings import AnalyzerError

SELECT = ["NH201", "NH601"]  # on the model below: a NH201 warning and a NH601 error
MESSAGE = "RuntimeError: init-scale broke"


def default_init_deep() -> nn.Module:
    return stack(128, 6, nn.ReLU, None)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(64, 128, generator=gen), torch.randint(0, 10, (64,), generator=gen)


def raise_in(monkeypatch: pytest.MonkeyPatch, name: str, exc: BaseException) -> None:
    def run(self, capture, options):
        raise exc

    monkeypatch.setattr(lookup(name), "run", run)


@pytest.fixture
def broken(monkeypatch: pytest.MonkeyPatch) -> None:
    raise_in(monkeypatch, "init-scale", RuntimeError("init-scale broke"))


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "deep.pt"
    torch.save(default_init_deep(), path)
    return path


def test_the_other_checks_still_report(monkeypatch: pytest.MonkeyPatch) -> None:
    whole = nnhealth.scan(default_init_deep(), batch(), select=SELECT)
    assert {f.code for f in whole.findings} == set(SELECT) and not whole.errors
    raise_in(monkeypatch, "init-scale", RuntimeError("init-scale broke"))
    report = nnhealth.scan(default_init_deep(), batch(), select=SELECT)
    assert report.errors == (AnalyzerError("init-scale", MESSAGE),)
    assert report.findings == tuple(f for f in whole.findings if f.code != "NH601")
    assert report.layers and report.run["checks"] == SELECT
    assert not report.ok() and not report.ok("info") and not report.healthy
    data = report.to_dict()
    assert data["errors"] == [{"check": "init-scale", "message": MESSAGE}]
    assert data["summary"]["healthy"] is False


def test_every_broken_check_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    raise_in(monkeypatch, "init-scale", RuntimeError("init-scale broke"))
    raise_in(monkeypatch, "activation-variance", ValueError("no variance"))
    report = nnhealth.scan(default_init_deep(), batch(), select=SELECT)
    assert report.findings == ()
    assert report.errors == (
        AnalyzerError("activation-variance", "ValueError: no variance"),
        AnalyzerError("init-scale", MESSAGE),
    )


def test_an_interrupt_in_a_check_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    raise_in(monkeypatch, "init-scale", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        nnhealth.scan(default_init_deep(), batch(), select=SELECT)


def test_cli_text_report_is_written_and_exits_2(
    cli, broken, model_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report.txt"
    args = ["scan", model_file, "--input-shape", "64x128", "--select", ",".join(SELECT)]
    res = cli(*args, "-o", out)
    assert res.code == 2 and res.out == "", (res.code, res.err)
    text = out.read_text()
    assert f"analyzer error in init-scale: {MESSAGE}" in text
    assert "NH201 activation-variance" in text and "NH601" not in text
    assert "1 check(s) failed to run" in text
    assert cli(*args, "--exit-zero").code == 2  # --exit-zero never hides a broken check
    quiet = cli(*args, "-q")  # quiet drops notes and skips, not the name of the broken check
    assert quiet.code == 2 and f"analyzer error in init-scale: {MESSAGE}" in quiet.out


def test_cli_json_report_lists_the_error(cli, broken, model_file: Path, tmp_path: Path) -> None:
    res = cli(
        "scan",
        model_file,
        "--input-shape",
        "64x128",
        "--select",
        ",".join(SELECT),
        "--format",
        "json",
    )
    assert res.code == 2, res.err
    report = strict_json(res.out)
    assert_schema(report)
    assert report["errors"] == [{"check": "init-scale", "message": MESSAGE}]
    assert [f["code"] for f in report["findings"]] == ["NH201"]
    out = tmp_path / "report.json"
    written = cli("scan", model_file, "--input-shape", "64x128", "--format", "json", "-o", out)
    assert written.code == 2 and written.out == ""
    assert json.loads(out.read_text())["errors"] == report["errors"]
