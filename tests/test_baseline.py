"""Baselines: new, unchanged, worse and fixed findings, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import he_mlp, one_line_error


def save(tmp_path: Path, dead_fc2: int, dead_fc4: int = 0) -> Path:
    model = he_mlp([32, 64, 64, 64, 4])
    with torch.no_grad():
        model[2].bias[:dead_fc2] = -50.0
        model[4].bias[:dead_fc4] = -50.0
    path = tmp_path / "m.pt"
    torch.save(model, path)
    return path


def scan(cli, path: Path, *args):
    res = cli(
        "scan", path, "--input-shape", "64x32", "--fail-on", "warning", "--format", "json", *args
    )
    return res.code, json.loads(res.out) if res.out else None


def test_baseline_lifecycle(cli, tmp_path: Path) -> None:
    base = tmp_path / "baseline.json"
    model = save(tmp_path, dead_fc2=16)  # 25% dead at layer 3: a warning
    code, report = scan(cli, model)
    assert code == 1
    code, _ = scan(cli, model, "--write-baseline", base)
    assert code == 0 and json.loads(base.read_text())["findings"][0]["key"] == "NH101:3"

    code, report = scan(cli, model, "--baseline", base)  # unchanged: accepted
    assert code == 0
    assert report["baseline"]["unchanged"] == ["NH101:3"] and report["baseline"]["new"] == []

    save(tmp_path, dead_fc2=20)  # 31% dead: 25% more than before, past the 10% tolerance
    code, report = scan(cli, model, "--baseline", base)
    assert code == 1 and report["baseline"]["worse"] == ["NH101:3"]
    code, report = scan(cli, model, "--baseline", base, "--baseline-tolerance", "0.5")
    assert code == 0 and report["baseline"]["unchanged"] == ["NH101:3"]

    save(tmp_path, dead_fc2=16, dead_fc4=16)  # a second layer dies: new
    code, report = scan(cli, model, "--baseline", base)
    assert code == 1 and report["baseline"]["new"] == ["NH101:5"]

    save(tmp_path, dead_fc2=0)  # fixed
    code, report = scan(cli, model, "--baseline", base)
    assert code == 0 and report["baseline"]["fixed"] == ["NH101:3"]
    text = cli("scan", model, "--input-shape", "64x32", "--baseline", base).out
    assert "0 new, 0 worse, 0 unchanged, 1 fixed (NH101:3)" in text


def test_severity_rise_is_worse(cli, tmp_path: Path) -> None:
    base = tmp_path / "b.json"
    model = save(tmp_path, dead_fc2=16)
    scan(cli, model, "--write-baseline", base)
    save(tmp_path, dead_fc2=40)  # 62%: an error now
    code, report = scan(cli, model, "--baseline", base)
    assert code == 1 and report["baseline"]["worse"] == ["NH101:3"]


@pytest.mark.parametrize(
    "content,needle",
    [
        (None, "no such file"),
        ("{not json", "not a readable baseline"),
        ('{"a": 1}', "not an nnhealth baseline"),
    ],
)
def test_bad_baseline_files(cli, tmp_path: Path, content: str | None, needle: str) -> None:
    path = tmp_path / "b.json"
    if content is not None:
        path.write_text(content)
    model = save(tmp_path, dead_fc2=0)
    assert needle in one_line_error(
        cli("scan", model, "--input-shape", "64x32", "--baseline", path)
    )


def test_two_findings_of_one_check_on_one_layer_have_distinct_keys(cli, tmp_path: Path) -> None:
    from nnhealth.baseline import key
    from nnhealth.findings import Finding, Severity

    limit = Finding("NH401", "curvature", Severity.ERROR, None, "lr", {}, "f", kind="")
    negative = Finding("NH401", "curvature", Severity.INFO, None, "neg", {}, "f", kind="negative")
    assert key(limit) != key(negative)


def test_fixed_only_counts_checks_that_ran(cli, tmp_path: Path) -> None:
    base = tmp_path / "b.json"
    model = save(tmp_path, dead_fc2=16)
    scan(cli, model, "--write-baseline", base)
    code, report = scan(cli, model, "--baseline", base, "--select", "NH5")
    assert code == 0 and report["baseline"]["fixed"] == []


@pytest.mark.parametrize(
    "entry,needle",
    [
        (
            '{"key": "NH101:3", "severity": "critical"}',
            "findings[0].severity: expected error, warning or info",
        ),
        (
            '{"key": "NH101:3", "severity": "error", "score": "0.5"}',
            "findings[0].score: expected a finite number",
        ),
        ('{"severity": "error"}', "findings[0]: expected an object with a string key"),
    ],
)
def test_hand_edited_baselines(cli, tmp_path: Path, entry: str, needle: str) -> None:
    path = tmp_path / "b.json"
    path.write_text('{"nnhealth_baseline": 1, "findings": [' + entry + "]}")
    model = save(tmp_path, dead_fc2=0)
    assert needle in one_line_error(
        cli("scan", model, "--input-shape", "64x32", "--baseline", path)
    )


def _boom(self, capture, options):
    raise RuntimeError("boom")


def test_a_check_that_crashed_fixes_nothing(cli, tmp_path: Path, monkeypatch) -> None:
    """Its findings are unknown, not gone: none of them is reported fixed."""
    from nnhealth.analyzers.dead_relu import DeadRelu

    base = tmp_path / "b.json"
    model = save(tmp_path, dead_fc2=16)
    scan(cli, model, "--write-baseline", base)
    monkeypatch.setattr(DeadRelu, "run", _boom)
    code, report = scan(cli, model, "--baseline", base)
    assert code == 2
    assert report["errors"] == [{"check": "dead-relu", "message": "RuntimeError: boom"}]
    assert report["baseline"]["fixed"] == [] and report["baseline"]["new"] == []


def test_a_crash_through_the_api_fixes_nothing(tmp_path: Path, monkeypatch) -> None:
    import nnhealth
    from nnhealth import baseline
    from nnhealth.analyzers.dead_relu import DeadRelu
    from nnhealth.analyzers.symmetry import Symmetry

    model = torch.load(save(tmp_path, dead_fc2=16, dead_fc4=16), weights_only=False)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "b.json"
    baseline.write(nnhealth.scan(model, x), path)
    with torch.no_grad():
        model[4].bias.zero_()  # NH101:5 fixed, while NH101:3 stays
    report = nnhealth.scan(model, x, baseline=path)
    assert report.baseline["fixed"] == ["NH101:5"]
    monkeypatch.setattr(DeadRelu, "run", _boom)
    monkeypatch.setattr(Symmetry, "run", _boom)
    report = nnhealth.scan(model, x, baseline=path)
    assert {e.check for e in report.errors} == {"dead-relu", "symmetry"}
    assert report.baseline["fixed"] == []


def test_a_skipped_check_fixes_nothing(cli, tmp_path: Path) -> None:
    """A state_dict alone: dead-relu cannot run, so its accepted finding is not fixed."""
    base = tmp_path / "b.json"
    model = save(tmp_path, dead_fc2=16)
    scan(cli, model, "--write-baseline", base)
    weights = tmp_path / "sd.pt"
    torch.save(torch.load(model, weights_only=False).state_dict(), weights)
    res = cli("scan", weights, "--baseline", base, "--format", "json")
    report = json.loads(res.out)
    assert "NH101" in {s["code"] for s in report["skipped"]}
    assert report["baseline"]["fixed"] == []
