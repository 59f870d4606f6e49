"""Configuration: [tool.nnhealth], nnhealth.toml, --config, NNHEALTH_*, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import he_mlp, one_line_error


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository with a model whose layer 3 is 25% dead (an NH101 warning)."""
    model = he_mlp([32, 64, 64, 64, 4])
    with torch.no_grad():
        model[2].bias[:16] = -50.0
    torch.save(model, tmp_path / "model.pt")
    torch.save((torch.randn(64, 32), torch.randint(0, 4, (64,))), tmp_path / "batch.pt")
    monkeypatch.chdir(tmp_path)
    for key in ("NNHEALTH_FAIL_ON", "NNHEALTH_MODEL", "NNHEALTH_LR", "NNHEALTH_SELECT"):
        monkeypatch.delenv(key, raising=False)
    return tmp_path


def pyproject(project: Path, body: str) -> None:
    (project / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.nnhealth]\n' + body)


def test_plain_scan_from_pyproject(cli, project: Path) -> None:
    pyproject(
        project, 'model = "model.pt"\ndata = "batch.pt"\nfail-on = "warning"\nformat = "json"\n'
    )
    res = cli("scan")
    assert res.code == 1, res.err
    report = json.loads(res.out)
    assert [f["code"] for f in report["findings"]] == ["NH101"]


def test_precedence_flag_over_env_over_file(cli, project: Path, monkeypatch) -> None:
    pyproject(project, 'model = "model.pt"\ndata = "batch.pt"\nfail-on = "warning"\n')
    assert cli("scan", "-q").code == 1  # file: warning
    monkeypatch.setenv("NNHEALTH_FAIL_ON", "error")
    assert cli("scan", "-q").code == 0  # env beats the file
    assert cli("scan", "-q", "--fail-on", "info").code == 1  # the flag beats both


def test_nnhealth_toml_wins_and_the_nearest_directory_counts(
    cli, project: Path, monkeypatch
) -> None:
    pyproject(project, 'model = "model.pt"\ndata = "batch.pt"\nfail-on = "error"\n')
    (project / "nnhealth.toml").write_text(
        'model = "model.pt"\ndata = "batch.pt"\nfail-on = "warning"\n'
    )
    assert cli("scan", "-q").code == 1
    sub = project / "sub"
    sub.mkdir()
    monkeypatch.chdir(sub)
    (sub / "nnhealth.toml").write_text('model = "../model.pt"\ndata = "../batch.pt"\n')
    assert cli("scan", "-q").code == 0  # its own config: fail-on defaults to error


def test_explicit_config_file(cli, project: Path, tmp_path: Path) -> None:
    other = tmp_path / "ci.toml"
    other.write_text('model = "model.pt"\ndata = "batch.pt"\nfail-on = "warning"\n')
    assert cli("scan", "--config", other, "-q").code == 1
    assert "no such file" in one_line_error(cli("scan", "--config", tmp_path / "nope.toml"))


def test_check_thresholds_severities_and_layer_ignores(cli, project: Path) -> None:
    base = 'model = "model.pt"\ndata = "batch.pt"\nfail-on = "warning"\n'
    pyproject(project, base + "[tool.nnhealth.checks.dead-relu]\nwarn_fraction = 0.3\n")
    assert cli("scan", "-q").code == 0  # 25% dead is under the raised threshold
    pyproject(project, base + '[tool.nnhealth.checks.NH101]\nseverity = "info"\n')
    res = cli("scan", "--format", "json")
    assert res.code == 0 and json.loads(res.out)["findings"][0]["severity"] == "info"
    pyproject(project, base + '[tool.nnhealth.per-layer-ignores]\n"3*" = ["dead-relu"]\n')
    assert json.loads(cli("scan", "--format", "json").out)["findings"] == []


def test_env_for_every_option(cli, project: Path, monkeypatch) -> None:
    monkeypatch.setenv("NNHEALTH_MODEL", "model.pt")
    monkeypatch.setenv("NNHEALTH_DATA", "batch.pt")
    monkeypatch.setenv("NNHEALTH_SELECT", "NH101,NH102")
    monkeypatch.setenv("NNHEALTH_FAIL_ON", "warning")
    monkeypatch.setenv("NNHEALTH_LR", "0.5")
    res = cli("scan", "--format", "json")
    report = json.loads(res.out)
    assert (
        res.code == 1
        and report["run"]["checks"] == ["NH101", "NH102"]
        and report["run"]["lr"] == 0.5
    )


@pytest.mark.parametrize(
    "body,needle",
    [
        (
            '[tool.nnhealth.checks.dead-relu]\nwarn_fraction = "high"\n',
            "pyproject.toml: tool.nnhealth.checks.dead-relu.warn_fraction: expected a number in [0, 1], got 'high'",
        ),
        (
            "[tool.nnhealth.checks.dead-relu]\nwarn_fraction = 1.5\n",
            "expected a number in [0, 1], got 1.5",
        ),
        (
            "[tool.nnhealth.checks.dead-relu]\nthreshold = 0.5\n",
            "dead-relu.threshold: unknown option",
        ),
        ("[tool.nnhealth.checks.NH999]\nx = 1\n", "tool.nnhealth.checks.NH999: unknown check"),
        (
            '[tool.nnhealth.checks.NH101]\nseverity = "fatal"\n',
            "severity: expected error, warning or info",
        ),
        ('fail_on = "warning"\n', "tool.nnhealth.fail_on: unknown key"),
        ('fail-on = "sometimes"\n', "tool.nnhealth.fail-on: expected one of error, warning, info"),
        ("lr = -1\n", "tool.nnhealth.lr: expected a finite number > 0, got -1"),
        ("seed = 1.5\n", "tool.nnhealth.seed: expected an integer in [0, 2**63 - 1]"),
        ("trust = true\n", "tool.nnhealth.trust: not allowed in a config file"),
        ("select = 3\n", "tool.nnhealth.select: expected a list"),
        (
            '[tool.nnhealth.per-layer-ignores]\n"x" = ["NH999"]\n',
            "per-layer-ignores.x: unknown check",
        ),
        ("model = \n", "invalid TOML"),
    ],
)
def test_config_errors_name_their_place(cli, project: Path, body: str, needle: str) -> None:
    pyproject(project, 'data = "batch.pt"\n' + body)
    assert needle in one_line_error(cli("scan", "model.pt"))


def test_env_errors_name_the_variable(cli, project: Path, monkeypatch) -> None:
    monkeypatch.setenv("NNHEALTH_LR", "fast")
    assert "NNHEALTH_LR: expected a number, got 'fast'" in one_line_error(
        cli("scan", "model.pt", "--data", "batch.pt")
    )


def test_no_model_anywhere(cli, project: Path) -> None:
    assert "no MODEL" in one_line_error(cli("scan"))


def test_paths_in_a_config_file_are_relative_to_it(cli, project: Path, monkeypatch) -> None:
    (project / "nnhealth.toml").write_text(
        'model = "model.pt"\ndata = "batch.pt"\nfail-on = "warning"\n'
    )
    sub = project / "deeper" / "still"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    assert cli("scan", "-q").code == 1  # found ../../model.pt through the file's directory


def test_select_codes_are_checked_where_they_are_written(cli, project: Path, monkeypatch) -> None:
    (project / "nnhealth.toml").write_text(
        'model = "model.pt"\ndata = "batch.pt"\nselect = ["NH999"]\n'
    )
    assert "nnhealth.toml: select: unknown check 'NH999'" in one_line_error(cli("scan"))
    (project / "nnhealth.toml").write_text('model = "model.pt"\ndata = "batch.pt"\n')
    monkeypatch.setenv("NNHEALTH_IGNORE", "bogus")
    assert "NNHEALTH_IGNORE: unknown check 'bogus'" in one_line_error(cli("scan"))


def test_what_if_from_the_environment(cli, project: Path, monkeypatch) -> None:
    (project / "nnhealth.toml").write_text(
        'model = "model.pt"\ndata = "batch.pt"\nformat = "json"\n'
    )
    monkeypatch.setenv("NNHEALTH_WHAT_IF", "1")
    assert json.loads(cli("scan").out)["what_if"]


def test_hessian_sub_batches_from_the_file_and_the_environment(
    cli, project: Path, monkeypatch
) -> None:
    """hessian-batch and hessian-batches reach the scan from a file and from NNHEALTH_*;
    the variable beats the file, and a product beyond the batch is refused there too."""
    pyproject(
        project,
        'model = "model.pt"\ndata = "batch.pt"\nhessian = true\nselect = ["NH401"]\n'
        'format = "json"\nhessian-batch = 16\nhessian-batches = 2\n',
    )
    res = cli("scan")
    assert res.code == 0, res.err
    c = json.loads(res.out)["curvature"]
    assert (c["examples"], c["batches"], len(c["batch_lambda_max"])) == (16, 2, 2)
    monkeypatch.setenv("NNHEALTH_HESSIAN_BATCHES", "3")
    c = json.loads(cli("scan").out)["curvature"]
    assert (c["examples"], c["batches"]) == (16, 3)
    monkeypatch.setenv("NNHEALTH_HESSIAN_BATCHES", "5")
    line = one_line_error(cli("scan"))
    assert line.endswith(
        "--hessian-batches 5 x --hessian-batch 16 = 80 examples: the batch has 64; lower "
        "either so that the product is at most 64"
    )
