"""``nnhealth report HISTORY.jsonl``: the trends in the terminal and as JSON, on
histories nnhealth.Monitor wrote while training a small MLP; sparklines recomputed here
from the numbers in the history; exit codes 0/1/2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line_error, train_history
from rich.cells import cell_len

from nnhealth import history, trends
from nnhealth.formatters import RenderOptions
from nnhealth.formatters.text import fmt

BLOCKS = "▁▂▃▄▅▆▇█"
LABELS = {
    "act var": ("act_var", True),
    "grad var": ("grad_var", True),
    "dead": ("dead_fraction", False),
    "saturated": ("saturated_fraction", False),
    "update": ("relative_update", True),
}


@pytest.fixture(scope="module")
def hot(tmp_path_factory) -> Path:
    """lr 3: above the stability limit from the start; ReLU units die, the tanh saturates."""
    return train_history(tmp_path_factory.mktemp("hot") / "hot.jsonl", 3.0, 40)


@pytest.fixture(scope="module")
def calm(tmp_path_factory) -> Path:
    return train_history(tmp_path_factory.mktemp("calm") / "calm.jsonl", 0.05, 11)


def expected_blocks(values: list, log: bool, fixed: tuple[float, float] | None) -> str:
    """The sparkline recomputed: one block per value, numpy on the plotted scale."""
    v = np.array([np.nan if x is None else float(x) for x in values])
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.log10(v) if log else v
    lo, hi = fixed if fixed else (np.nanmin(s[np.isfinite(s)]), np.nanmax(s[np.isfinite(s)]))
    out = []
    for x in s:
        if np.isnan(x):
            out.append("·")
        elif hi <= lo:
            out.append(BLOCKS[3])
        else:
            out.append(BLOCKS[int(np.rint((np.clip(x, lo, hi) - lo) / (hi - lo) * 7))])
    return "".join(out)


def table_rows(text: str) -> list[tuple[str, ...]]:
    """(layer, statistic, sparkline, first, last) of the per-layer table (layer names
    here are digits, printed on a layer's first row only)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layer  statistic"))
    rows, layer = [], None
    for line in lines[start + 1 :]:
        tokens = line.split()
        if not tokens:
            break
        if tokens[0].isdigit():
            layer, tokens = tokens[0], tokens[1:]
        words = 2 if tokens[0] in ("act", "grad") else 1
        rows.append((layer, " ".join(tokens[:words]), *tokens[words:]))
    return rows


# ---- the text view ------------------------------------------------------------------------


def test_text_view_sparklines_match_the_history(cli, hot: Path) -> None:
    lines = history.read(hot)
    captured = [ln for ln in lines if "layers" in ln]
    res = cli("report", hot)
    assert res.code == 1, res.err
    rows = table_rows(res.out)
    assert len(captured) == 8
    by_layer = {
        r["name"]: [next(x for x in ln["layers"] if x["name"] == r["name"]) for ln in captured]
        for r in captured[0]["layers"]
    }
    seen = set()
    for layer, label, spark, first, last in rows:
        key, log = LABELS[label]
        values = [row.get(key) for row in by_layer[layer]]
        fixed = (0.0, 1.0) if key.endswith("fraction") else None
        assert spark == expected_blocks(values, log, fixed), (layer, label)
        number = (lambda v: f"{100 * v:.0f}%") if fixed else fmt
        assert (first, last) == (number(values[0]), number(values[-1])), (layer, label)
        seen.add((layer, key))
    # every statistic each layer recorded has its row
    assert seen == {
        (name, key)
        for name, rows_ in by_layer.items()
        for key, _ in LABELS.values()
        if any(r.get(key) is not None for r in rows_)
    }
    assert ("1", "dead_fraction") in seen and ("3", "saturated_fraction") in seen


def test_highest_block_is_at_the_step_of_the_maximum(cli, hot: Path) -> None:
    lines = [ln for ln in history.read(hot) if "layers" in ln]
    res = cli("report", hot)
    lams = [ln["curvature"]["lambda_max"] for ln in lines]
    row = next(line for line in res.out.splitlines() if line.startswith("λmax"))
    spark = row.split()[1]
    assert len(spark) == len(lams)
    assert spark.index("█") == int(np.argmax(lams))
    assert spark.index("▁") == int(np.argmin(lams))
    assert f"{fmt(lams[0])} → {fmt(lams[-1])}" in row
    ratios = [ln["curvature"]["ratio"] for ln in lines]
    limit = next(line for line in res.out.splitlines() if line.startswith("lr / limit"))
    worst = int(np.argmax(ratios))
    assert f"max {fmt(ratios[worst])} at step {lines[worst]['step']}" in limit


def test_verdicts_are_shown_with_their_fix(cli, hot: Path) -> None:
    lines = history.read(hot)
    verdicts = history.verdicts(lines)
    codes = {f.code for f in verdicts}
    assert {"NH401", "NH101"} <= codes  # the edge of stability, units dying
    out = cli("report", hot).out
    over_time = out[out.index("Over time") : out.index("At the latest capture step")]
    flat = " ".join(over_time.split())
    for f in verdicts:
        assert f"{f.code} {f.check} {f.layer or '(model)'}" in flat
        assert " ".join(f.message.split()) in flat
        assert " ".join(f"fix: {f.fix}".split()) in flat
    latest = " ".join(out[out.index("At the latest capture step") :].split())
    last = [ln for ln in lines if "layers" in ln][-1]
    for d in last["findings"]:
        assert " ".join(d["message"].split()) in latest
    errors = [f.severity.label for f in verdicts] + [d["severity"] for d in last["findings"]]
    assert f"✗ {errors.count('error')} errors" in out


def test_sparkline_bins_are_the_means_of_runs_of_steps() -> None:
    rng = np.random.default_rng(0)
    values = list(10.0 ** rng.uniform(-6, 2, size=100))
    spark = trends.sparkline(values, 10, log=True)
    means = np.log10(values).reshape(10, 10).mean(axis=1)  # 100 values in 10 runs of 10
    lo, hi = means.min(), means.max()
    assert spark == "".join(BLOCKS[int(np.rint((m - lo) / (hi - lo) * 7))] for m in means)
    # a missing value shows as one; a constant series sits at mid height; 0 at the bottom
    assert trends.sparkline([1.0, None, 2.0], 10) == "▁·█"
    assert trends.sparkline([0.5, 0.5], 10) == "▄▄"
    assert trends.sparkline([0.0, 0.5, 1.0], 10, fixed=(0.0, 1.0)) == "▁▅█"
    assert trends.sparkline([0.0, 1e-3, 1.0], 10, log=True)[0] == "▁"


@pytest.mark.parametrize("width", [80, 100, 120])
def test_text_view_fits_the_width(hot: Path, width: int) -> None:
    lines = history.read(hot)
    # GPT-style long names that differ at their end and in the middle
    renamed = json.loads(
        json.dumps(lines)
        .replace('"name": "1"', '"name": "transformer.h.1.mlp.act"')
        .replace('"name": "3"', '"name": "transformer.h.11.mlp.act"')
        .replace('"name": "0"', '"name": "transformer.h.1.mlp.c_fc_with_a_long_name"')
    )
    text = trends.render_text(
        "runs/x.jsonl", renamed, history.verdicts(renamed), RenderOptions(width=width)
    )
    assert max(cell_len(line) for line in text.splitlines()) <= width
    assert "…h.1.mlp.act" in text or "transformer.h.1.mlp.act" in text
    assert "…h.11.mlp.act" in text or "transformer.h.11.mlp.act" in text


def test_a_nonfinite_loss_between_captures(cli, calm: Path, tmp_path: Path) -> None:
    path = tmp_path / "nan.jsonl"
    path.write_text(calm.read_text())
    history.write_line(
        path, history.nonfinite_record(13, elapsed=1.0, loss=math.nan, layer="2", epoch=None)
    )
    res = cli("report", path)
    assert res.code == 1
    assert "1 non-finite loss between them" in res.out
    flat = " ".join(res.out.split())
    assert "NH001 nonfinite 2" in flat and "at step 13 in 2" in flat


# ---- JSON ---------------------------------------------------------------------------------


def test_json_content(cli, hot: Path) -> None:
    lines = history.read(hot)
    verdicts = history.verdicts(lines)
    res = cli("report", hot, "--format", "json")
    assert res.code == 1
    doc = json.loads(res.out)
    assert doc["schema"] == history.SCHEMA
    assert [s["step"] for s in doc["steps"]] == [ln["step"] for ln in lines]
    assert [s["loss"] for s in doc["steps"]] == [ln["loss"] for ln in lines]
    assert [s["curvature"] for s in doc["steps"]] == [ln["curvature"] for ln in lines]
    assert [v["code"] for v in doc["verdicts"]] == [f.code for f in verdicts]
    assert [v["message"] for v in doc["verdicts"]] == [f.message for f in verdicts]
    assert doc["verdicts"][0]["evidence"] == verdicts[0].to_dict()["evidence"]
    last = [ln for ln in lines if "layers" in ln][-1]
    assert doc["latest"]["step"] == last["step"]
    assert [f["code"] for f in doc["latest"]["findings"]] == [d["code"] for d in last["findings"]]
    s = doc["summary"]
    every = [v["severity"] for v in doc["verdicts"]] + [d["severity"] for d in last["findings"]]
    assert {k: s[k] for k in ("error", "warning", "info")} == {
        k: every.count(k) for k in ("error", "warning", "info")
    }
    assert s["healthy"] is False and s["capture_steps"] == 8
    assert (s["first_step"], s["last_step"]) == (0, 35)
    assert (s["loss_first"], s["loss_last"]) == (lines[0]["loss"], lines[-1]["loss"])


# ---- exit codes ---------------------------------------------------------------------------


def test_exit_codes_follow_fail_on(cli, hot: Path, calm: Path, tmp_path: Path) -> None:
    calm_lines = history.read(calm)
    assert history.verdicts(calm_lines) == [] and calm_lines[-1]["findings"] == []
    assert cli("report", calm, "--fail-on", "info").code == 0
    assert cli("report", hot).code == 1
    assert cli("report", hot, "--fail-on", "never").code == 0
    assert cli("report", hot, "--format", "json", "--fail-on", "never").code == 0
    # the calm run with a warning at its latest capture step (the hot run's dead ReLU)
    warning = next(d for d in history.read(hot)[-1]["findings"] if d["severity"] == "warning")
    calm_lines[-1]["findings"] = [warning]
    path = tmp_path / "warned.jsonl"
    path.write_text("".join(json.dumps(ln) + "\n" for ln in calm_lines))
    assert cli("report", path).code == 0
    assert cli("report", path, "--fail-on", "warning").code == 1
    assert cli("report", path, "--fail-on", "info").code == 1
    res = cli("report", path)
    assert f"At the latest capture step ({calm_lines[-1]['step']})" in res.out
    assert "1 warning over 3 capture steps" in res.out


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"schema": "nnhealth-history/1", "step": 0}\nnot json\n', ":2: not a JSON line"),
        ('{"schema": "nnhealth-history/9", "step": 0}\n', "schema 'nnhealth-history/9'"),
        ("[1, 2]\n", "not a line of an nnhealth history"),
        ('{"schema": "nnhealth-history/1", "step": "x"}\n', "no integer 'step'"),
        ("\n\n", "the history is empty"),
    ],
)
def test_bad_history_is_one_line_and_exit_2(cli, tmp_path: Path, content, expected) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text(content)
    line = one_line_error(cli("report", path))
    assert expected in line and str(path) in line


def test_missing_file_directory_and_output_over_the_history(cli, tmp_path: Path, calm) -> None:
    assert "cannot read the history" in one_line_error(cli("report", tmp_path / "none.jsonl"))
    assert "cannot read the history" in one_line_error(cli("report", tmp_path))
    before = calm.read_bytes()
    assert "refusing to overwrite" in one_line_error(cli("report", calm, "-o", calm))
    assert calm.read_bytes() == before
    assert "is a directory" in one_line_error(cli("report", calm, "-o", tmp_path))
    assert "--format" in one_line_error(cli("report", calm, "--format", "sarif"))
    out = tmp_path / "r.json"
    assert cli("report", calm, "--format", "json", "-o", out).code == 0
    assert json.loads(out.read_text())["summary"]["capture_steps"] == 3


def test_report_does_not_import_torch(calm: Path) -> None:
    code = (
        "import sys\nfrom nnhealth.cli import main\n"
        f"code = main(['report', {str(calm)!r}, '--format', 'json'])\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nprint(code)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "0"
