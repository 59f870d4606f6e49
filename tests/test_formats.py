"""SARIF, GitHub, JUnit and Markdown: on hand-built reports and through the CLI,
validated with the official SARIF schema and a JUnit parser."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import hand_built
from junitparser import Failure, JUnitXml, Skipped

from nnhealth.findings import AnalyzerError, Finding, Severity
from nnhealth.formatters import FORMATTERS, Format, RenderOptions, get_formatter
from nnhealth.formatters.sarif import fingerprint

SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sarif-schema-2.1.0.json"


def render(fmt: str, report=None, **kw) -> str:
    return get_formatter(fmt, RenderOptions(**kw)).render(report or hand_built())


def test_every_format_has_one_formatter_class() -> None:
    assert set(FORMATTERS) == set(Format)
    assert len({cls for cls in FORMATTERS.values()}) == len(Format)


@pytest.fixture
def sarif_schema() -> dict:
    if not SCHEMA.is_file():
        pytest.skip(f"the SARIF 2.1.0 schema is not at {SCHEMA} (../shared/data)")
    return json.loads(SCHEMA.read_text())


def test_sarif_is_valid_against_the_official_schema(sarif_schema: dict) -> None:
    import jsonschema

    doc = json.loads(render("sarif"))
    jsonschema.validate(doc, sarif_schema)
    run = doc["runs"][0]
    rule_ids = [r["id"] for r in run["tool"]["driver"]["rules"]]
    assert "NH101" in rule_ids and all(
        r["shortDescription"]["text"] for r in run["tool"]["driver"]["rules"]
    )
    first = run["results"][0]
    assert first["ruleId"] == "NH101" and first["level"] == "error"
    assert rule_ids[first["ruleIndex"]] == "NH101"
    assert first["locations"][0]["logicalLocations"][0]["fullyQualifiedName"] == "act2"
    assert "act2" in first["message"]["text"]
    assert [r["level"] for r in run["results"]] == ["error", "warning", "note"]


def test_sarif_location_prefers_the_model_source() -> None:
    report = dataclasses.replace(
        hand_built(), run={**hand_built().run, "model_source": {"file": "src/nets.py", "line": 42}}
    )
    loc = json.loads(render("sarif", report))["runs"][0]["results"][0]["locations"][0]
    assert loc["physicalLocation"]["artifactLocation"]["uri"] == "src/nets.py"
    assert loc["physicalLocation"]["region"]["startLine"] == 42


def test_fingerprints_track_check_and_layer_not_numbers() -> None:
    a = Finding("NH101", "dead-relu", Severity.ERROR, "fc2", "60% dead", {"x": 1}, "fix")
    b = dataclasses.replace(a, message="70% dead", evidence={"x": 2}, severity=Severity.WARNING)
    c = dataclasses.replace(a, layer="fc3")
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_github_annotations() -> None:
    lines = render("github").splitlines()
    assert lines[0].startswith(
        "::error file=sample_models/relu_dead_bias.pt,line=1,title=NH101 dead-relu (act2)::"
    )
    assert "60%25 of units dead" in lines[0]  # % escaped per the workflow-command spec
    assert lines[1].startswith("::warning ") and lines[2].startswith("::notice ")
    report = dataclasses.replace(
        hand_built(),
        findings=(
            Finding("NH001", "nonfinite", Severity.ERROR, "a,b:c", "line1\nline2", {}, "fix"),
        ),
    )
    (line,) = render("github", report).splitlines()
    assert "title=NH001 nonfinite (a%2Cb%3Ac)" in line and "line1%0Aline2" in line


def test_junit_parses_and_fails_at_fail_on(tmp_path: Path) -> None:
    path = tmp_path / "r.xml"
    path.write_text(render("junit"))
    suite = next(iter(JUnitXml.fromfile(str(path))))
    cases = {c.name: c for c in suite}
    failed = [n for n, c in cases.items() if any(isinstance(r, Failure) for r in c.result)]
    assert failed == ["NH101 dead-relu: act2"]
    assert any(isinstance(r, Skipped) for r in cases["NH202 gradient-variance: (model)"].result)
    assert "NH001 nonfinite: fc1" in cases  # one case per check per layer
    path.write_text(render("junit", fail_on="info"))
    suite = next(iter(JUnitXml.fromfile(str(path))))
    failed = sorted(c.name for c in suite if any(isinstance(r, Failure) for r in c.result))
    assert failed == ["NH101 dead-relu: (model)", "NH101 dead-relu: act2", "NH102 saturation: x"]


def test_junit_reports_analyzer_errors(tmp_path: Path) -> None:
    report = dataclasses.replace(hand_built(), errors=(AnalyzerError("symmetry", "boom"),))
    path = tmp_path / "r.xml"
    path.write_text(render("junit", report))
    suite = next(iter(JUnitXml.fromfile(str(path))))
    assert suite.errors == 1


def test_markdown_comment() -> None:
    text = render("markdown")
    assert text.startswith("### nnhealth: `sample_models/relu_dead_bias.pt`")
    assert "❌ **1** error, **1** warning, **1** info" in text
    assert "| 🔴 error | `NH101` dead-relu | `act2` |" in text
    assert "<details><summary>Layers</summary>" in text


@pytest.mark.parametrize("fmt", ["sarif", "github", "junit", "markdown"])
def test_formats_end_to_end(cli, sample, fmt: str, tmp_path: Path) -> None:
    model, data = sample("relu_dead_bias")
    out = tmp_path / f"report.{fmt}"
    res = cli("scan", model, "--data", data, "--format", fmt, "-o", out)
    assert res.code == 1 and res.out == "" and out.read_text()
    text = out.read_text()
    assert "NH101" in text


def test_sarif_end_to_end_points_at_the_model_class(
    cli, tmp_path: Path, monkeypatch, sarif_schema
) -> None:
    import jsonschema

    (tmp_path / "nets.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n"
        "        self.fc = nn.Linear(8, 8)\n        self.head = nn.Linear(8, 2)\n"
        "        with torch.no_grad():\n            self.fc.bias.fill_(-50)\n\n"
        "    def forward(self, x):\n        return self.head(torch.relu(self.fc(x)))\n"
    )
    monkeypatch.chdir(tmp_path)
    res = cli("scan", "nets.py:Net", "--input-shape", "32x8", "--format", "sarif")
    doc = json.loads(res.out)
    jsonschema.validate(doc, sarif_schema)
    loc = doc["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == "nets.py" and loc["region"]["startLine"] == 5


def test_sarif_uri_is_encoded_and_relative_to_the_source_root(sarif_schema) -> None:
    import jsonschema

    run = {**hand_built().run, "model_source": {"file": "dir with space#/nets.py", "line": 3}}
    doc = json.loads(render("sarif", dataclasses.replace(hand_built(), run=run)))
    jsonschema.validate(doc, sarif_schema)
    art = doc["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]
    assert art == {"uri": "dir%20with%20space%23/nets.py", "uriBaseId": "%SRCROOT%"}


def test_formats_respect_a_baseline(tmp_path: Path) -> None:
    report = hand_built()
    keys = [f.key for f in report.findings]
    accepted = dataclasses.replace(
        report, baseline={"file": "b.json", "new": [], "worse": [], "unchanged": keys, "fixed": []}
    )
    states = {
        r["baselineState"] for r in json.loads(render("sarif", accepted))["runs"][0]["results"]
    }
    assert states == {"unchanged"}
    assert "::error" not in render("github", accepted)
    path = tmp_path / "r.xml"
    path.write_text(render("junit", accepted))
    suite = next(iter(JUnitXml.fromfile(str(path))))
    assert not any(isinstance(r, Failure) for c in suite for r in c.result)
