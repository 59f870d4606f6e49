"""The command line as a user and a CI script see it: exit codes, formats, errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, assert_schema, he_mlp, one_line_error, strict_json

NUMBER = (int, float)


def test_sick_model_exits_1_with_json_contract(cli, sample) -> None:
    model, data = sample("tanh_vanishing")
    res = cli("scan", model, "--data", data, "--format", "json")
    assert res.code == 1 and res.err == ""
    report = strict_json(res.out)
    assert_schema(report)
    assert {f["code"] for f in report["findings"]} == {"NH201", "NH601"}
    assert report["run"]["model_format"] == "torch.save module (torch.nn classes, allowlisted)"
    assert report["run"]["batch"]["shape"] == [256, 500]
    assert report["summary"]["error"] == 2 and not report["summary"]["healthy"]


def test_healthy_model_exits_0(cli, sample) -> None:
    model, data = sample("healthy_relu_mlp")
    res = cli("scan", model, "--data", data)
    assert res.code == 0, res.out
    assert "✓ healthy" in res.out


def test_exit_zero_and_fail_on(cli, tmp_path: Path) -> None:
    model = he_mlp([64, 64, 64, 64, 4])
    with torch.no_grad():
        model[2].bias[:13] = -50.0  # 20% dead: a warning, not an error
    torch.save(model, tmp_path / "m.pt")
    args = ("scan", tmp_path / "m.pt", "--input-shape", "64x64")
    assert cli(*args).code == 0
    assert cli(*args, "--fail-on", "warning").code == 1
    assert cli(*args, "--fail-on", "warning", "--exit-zero").code == 0
    assert cli(*args, "--fail-on", "info").code == 1


def test_exit_zero_never_hides_a_tool_error(cli, tmp_path: Path) -> None:
    assert cli("scan", tmp_path / "missing.pt", "--exit-zero").code == 2


def test_select_and_ignore(cli, sample) -> None:
    model, data = sample("tanh_vanishing")
    assert cli("scan", model, "--data", data, "--select", "NH101,NH102").code == 0
    assert cli("scan", model, "--data", data, "--ignore", "NH2,init-scale").code == 0
    res = cli("scan", model, "--data", data, "--select", "activation-variance", "--format", "json")
    assert [f["code"] for f in strict_json(res.out)["findings"]] == ["NH201"]
    # the plan: a selection that needs no gradients runs no backward pass
    only_dead = strict_json(
        cli("scan", model, "--data", data, "--select", "NH101", "--format", "json").out
    )
    assert all(layer.get("grad_var") is None for layer in only_dead["layers"])
    everything = strict_json(cli("scan", model, "--data", data, "--format", "json").out)
    assert all(layer["grad_var"] > 0 for layer in everything["layers"])
    assert "unknown check 'NH999'" in one_line_error(
        cli("scan", model, "--data", data, "--select", "NH999")
    )


def test_output_file_and_never_overwriting_inputs(cli, sample, tmp_path: Path) -> None:
    model, data = sample("tanh_vanishing")
    out = tmp_path / "report.json"
    res = cli("scan", model, "--data", data, "--format", "json", "-o", out)
    assert res.code == 1 and res.out == ""
    assert_schema(strict_json(out.read_text()))
    before = data.read_bytes()
    assert "refusing to overwrite" in one_line_error(cli("scan", model, "--data", data, "-o", data))
    assert data.read_bytes() == before


def test_quiet_and_verbose(cli, sample) -> None:
    model, data = sample("relu_dead_bias")
    quiet = cli("scan", model, "--data", data, "-q").out
    normal = cli("scan", model, "--data", data).out
    verbose = cli("scan", model, "--data", data, "-v").out
    assert "Layers" not in quiet and "Layers" in normal
    assert "dead_units=153" in verbose and "dead_units=153" not in normal
    assert "NH101" in quiet


def test_nonfinite_json_has_no_nan_literals(cli, sample) -> None:
    model, data = sample("nan_weight")
    res = cli("scan", model, "--data", data, "--format", "json")
    report = strict_json(res.out)  # raises on NaN/Infinity literals
    assert_schema(report)
    assert report["run"]["loss_value"] is None
    nonfinite = [f for f in report["findings"] if f["code"] == "NH001"]
    assert [f["layer"] for f in nonfinite][:2] == ["2", "2"]
    assert any("loss is nan" in f["message"] for f in nonfinite)


# ---- errors: one line, exit 2 -------------------------------------------------------


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    torch.save(he_mlp([10, 16, 3]), tmp_path / "m.pt")
    return tmp_path / "m.pt"


def test_batch_shape_that_does_not_fit(cli, small_model: Path) -> None:
    line = one_line_error(cli("scan", small_model, "--input-shape", "8x12"))
    assert "layer '0' [Linear(in_features=10)] on input of shape [8, 12]" in line
    assert "--input-shape" in line


def test_model_that_raises(cli, tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.fc = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        raise ValueError('boom in forward')\n"
        "def build():\n    return M()\n"
    )
    line = one_line_error(cli("scan", f"{tmp_path / 'bad.py'}:build", "--input-shape", "2x4"))
    assert "raised ValueError" in line and "boom in forward" in line


def test_nan_batch(cli, small_model: Path, tmp_path: Path) -> None:
    x = torch.randn(8, 10)
    x[0, 0] = float("inf")
    torch.save(x, tmp_path / "x.pt")
    assert "NaN/Inf" in one_line_error(cli("scan", small_model, "--data", tmp_path / "x.pt"))


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--frobnicate"], "No such option: --frobnicate"),
        (["--format", "xml"], "Invalid value for '--format'"),
        (["--fail-on", "never"], "Invalid value for '--fail-on'"),
        (["--seed", "-1"], "--seed"),
        (["--input-shape", "8xq"], "--input-shape"),
        (["--input-shape", "8x10", "--data", "x.pt"], "either --data or --input-shape"),
        (["--device", "cuda", "--input-shape", "8x10"], "no CUDA device"),
        (["--loss", "huber", "--input-shape", "8x10"], "Invalid value for '--loss'"),
    ],
)
def test_bad_options(cli, small_model: Path, args: list[str], needle: str) -> None:
    if "--device" in args and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert needle in one_line_error(cli("scan", small_model, *args))


def test_debug_shows_the_traceback(cli, small_model: Path) -> None:
    res = cli("scan", small_model, "--input-shape", "8x12", "--debug")
    assert res.code == 2 and "Traceback" in res.err and res.err.strip().endswith("fit the model)")


def test_explain_and_checks(cli) -> None:
    res = cli("explain", "NH101")
    assert res.code == 0 and res.out.startswith("NH101 dead-relu")
    for section in ("What it detects:", "Why it matters:", "Example:", "How to fix:", "Options:"):
        assert section in res.out
    assert "warn_fraction = 0.1" in res.out
    assert cli("explain", "saturation").out.startswith("NH102 saturation")
    assert "unknown check" in one_line_error(cli("explain", "NH777"))
    listing = cli("checks").out
    for code in ("NH001", "NH101", "NH102", "NH201", "NH202"):
        assert code in listing


def test_version_and_help(cli) -> None:
    from nnhealth import __version__

    assert cli("--version").out.strip() == f"nnhealth {__version__}"
    res = cli("scan", "--help")
    assert res.code == 0 and "--input-shape" in res.out and "--fail-on" in res.out


def _imports(*args: str) -> set[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "nnhealth", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}


@pytest.mark.parametrize("args", [["--help"], ["explain", "NH101"], ["checks"], ["scan", "--help"]])
def test_cli_start_does_not_import_torch(args: list[str]) -> None:
    mods = _imports(*args)
    assert "typer" in mods  # the measurement works
    assert not {m for m in mods if m == "torch" or m.startswith("torch.")}


def test_python_dash_m(small_model: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nnhealth",
            "scan",
            str(small_model),
            "--input-shape",
            "32x10",
            "-q",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "healthy" in proc.stdout


def test_report_seconds_and_loss_are_finite_numbers(cli, sample) -> None:
    model, data = sample("healthy_relu_mlp")
    report = strict_json(cli("scan", model, "--data", data, "--format", "json").out)
    assert report["run"]["seconds"] > 0 and math.isfinite(report["run"]["loss_value"])
    assert report["run"]["params"] == sum(
        p.numel() for p in torch.load(model, weights_only=False).parameters()
    )


def test_progress_appears_only_after_a_moment() -> None:
    import time

    from nnhealth.cli import _DelayedStatus

    with _DelayedStatus(enabled=True, delay=5.0) as fast:
        fast.update("forward and backward pass")
    assert fast._status is None  # a quick scan shows no spinner at all
    with _DelayedStatus(enabled=True, delay=0.01) as slow:
        deadline = time.monotonic() + 5
        while slow._status is None and time.monotonic() < deadline:
            time.sleep(0.01)
        slow.update("analyzing")
        assert slow._status is not None
        (task,) = slow._status.tasks
        bar, count = slow._status.columns[2:]

        def drawn() -> tuple[bool, str]:
            return bar.render(task) != "", str(count.render(task))

        assert drawn() == (False, "")  # a stage without steps: spinner and text, no bar
        slow.update("Hessian λmax ≈ 1.5, bound 2.0e-02 → 1e-03", steps=(3, 100))
        assert (task.completed, task.total) == (3, 100)
        assert task.description.startswith("Hessian λmax ≈ 1.5")
        assert drawn() == (True, "3/100")
        slow.update("Hessian: trace, 10 Hutchinson probes")  # steps, then none: bar gone
        assert drawn() == (False, "")
    assert slow._closed
    with _DelayedStatus(enabled=True, delay=0.01) as early:
        deadline = time.monotonic() + 5
        while early._status is None and time.monotonic() < deadline:
            time.sleep(0.01)
        early.stop()  # the report is about to be written: the progress line goes first
        assert early._closed and not early._status.live.is_started
        early.update("analyzing")  # a late update draws nothing
        assert early._status.tasks[0].description == "loading…"
    with _DelayedStatus(enabled=False, delay=0.0) as off:
        time.sleep(0.05)
    assert off._status is None
