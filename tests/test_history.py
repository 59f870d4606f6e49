"""The history's checks over time (nnhealth/history.py) on hand-made histories, where
each verdict's step and numbers are known, and the reading of history files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnhealth.errors import DataError
from nnhealth.findings import Severity
from nnhealth.history import SCHEMA, read, verdicts


def line(step: int, layers=(), curvature=None, findings=(), **extra) -> dict:
    return {
        "schema": SCHEMA,
        "step": step,
        "epoch": None,
        "time": float(step),
        "loss": 1.0,
        "lr": 0.1,
        "optimizer": "SGD",
        "examples": 32,
        "layers": list(layers),
        "curvature": curvature,
        "findings": list(findings),
        **extra,
    }


def relu(fraction: float) -> dict:
    return {"name": "act", "kind": "relu", "role": "activation", "dead_fraction": fraction}


def linear(update: float) -> dict:
    return {"name": "fc", "kind": "Linear", "role": "layer", "relative_update": update}


def curvature(lam: float, lr: float = 0.1) -> dict:
    return {"lambda_max": lam, "bound": 0.0, "lr_limit": 2 / lam, "ratio": lr * lam / 2}


def test_dead_units_rising_names_the_step_they_died() -> None:
    history = [line(s, [relu(f)]) for s, f in [(0, 0.02), (100, 0.05), (200, 0.2), (300, 0.6)]]
    (found,) = verdicts(history)
    assert (found.code, found.layer, found.severity) == ("NH101", "act", Severity.ERROR)
    assert found.evidence["died_at_step"] == 200  # 0.2 - 0.02 >= 0.1 first at step 200
    assert (found.evidence["first_fraction"], found.evidence["last_fraction"]) == (0.02, 0.6)
    assert "from 2% at step 0 to 60% at step 300" in found.message


@pytest.mark.parametrize(
    ("fractions", "expected"),
    [
        ((0.0, 0.15), Severity.WARNING),  # risen 15 points, at 15%: a warning
        ((0.0, 0.08), None),  # below warn_fraction 10%
        ((0.5, 0.55), None),  # high but not risen by 10 points: the scan's own finding
        ((0.3, 0.1), None),  # fell
    ],
)
def test_dead_units_thresholds(fractions, expected) -> None:
    history = [line(i * 10, [relu(f)]) for i, f in enumerate(fractions)]
    found = [f for f in verdicts(history) if f.code == "NH101"]
    assert [f.severity for f in found] == ([] if expected is None else [expected])


def test_edge_of_stability_at_the_first_crossing_with_the_sharpening() -> None:
    # lr 0.1: the limit 2/lambda is met at lambda = 20
    lams = [(0, 5.0), (1000, 9.0), (2000, 12.0), (3000, 21.0), (4000, 25.0)]
    history = [line(s, curvature=curvature(lam)) for s, lam in lams]
    (found,) = verdicts(history)
    assert (found.code, found.severity, found.evidence["step"]) == ("NH401", Severity.ERROR, 3000)
    assert found.evidence["ratio"] == pytest.approx(0.1 * 21.0 / 2)
    assert "x4.2 from 5 at step 0" in found.message


def test_edge_of_stability_approached_is_a_warning() -> None:
    history = [line(s, curvature=curvature(lam)) for s, lam in [(0, 5.0), (10, 11.0)]]
    (found,) = verdicts(history)
    assert (found.severity, found.evidence["step"]) == (Severity.WARNING, 10)  # 0.55 >= 0.5


def test_relative_update_drifting_out_of_range() -> None:
    history = [line(s, [linear(u)]) for s, u in [(0, 1e-3), (100, 0.05), (200, 0.4)]]
    (found,) = verdicts(history)
    assert (found.code, found.layer, found.severity) == ("NH301", "fc", Severity.WARNING)
    assert (found.evidence["first_update"], found.evidence["last_update"]) == (1e-3, 0.4)
    assert "above" in found.message
    low = [line(s, [linear(u)]) for s, u in [(0, 1e-3), (100, 1e-8)]]
    assert "below" in verdicts(low)[0].message
    always_high = [line(s, [linear(u)]) for s, u in [(0, 0.5), (100, 0.6)]]
    assert verdicts(always_high) == []  # out of range from the start: the scan's finding


def test_first_non_finite_is_the_earliest_step_with_its_layer() -> None:
    layer = {"name": "fc2", "kind": "Linear", "role": "layer", "nonfinite": 0, "param_nonfinite": 3}
    history = [
        line(0, [linear(1e-3)]),
        {
            "schema": SCHEMA,
            "step": 57,
            "epoch": None,
            "time": 5.7,
            "loss": None,
            "nonfinite": {"loss": "nan", "layer": "fc1"},
        },
        line(100, [layer]),
    ]
    found = [f for f in verdicts(history) if f.code == "NH001"]
    assert [(f.evidence["step"], f.layer) for f in found] == [(57, "fc1")]
    found = [f for f in verdicts([history[0], history[2]]) if f.code == "NH001"]
    assert [(f.evidence["step"], f.layer) for f in found] == [(100, "fc2")]


def test_threshold_options_are_the_checks_own() -> None:
    history = [line(s, [relu(f)]) for s, f in [(0, 0.0), (10, 0.15)]]
    assert verdicts(history, {"dead-relu": {"warn_fraction": 0.2}}) == []


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "h.jsonl"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("{not json\n", r"h.jsonl:1: not a JSON line"),
        (json.dumps({"schema": "other/1", "step": 0}) + "\n", "schema 'other/1'"),
        (json.dumps(line(0)) + "\n" + json.dumps({**line(1), "step": "x"}), r"h.jsonl:2: .*step"),
        ("[1, 2]\n", "not a line of an nnhealth history"),
        (json.dumps({**line(0), "layers": 5}), "'layers' is not a list of objects"),
        (json.dumps({**line(0), "layers": [5]}), "'layers' is not a list of objects"),
        (json.dumps({**line(0), "findings": 3}), "'findings' is not a list of objects"),
        (json.dumps(line(0, [{"kind": "relu"}])), "no string 'name'"),
        (json.dumps(line(0, [{**relu(0.1), "dead_fraction": "x"}])), "'dead_fraction' is not"),
        (json.dumps(line(0, curvature={"lambda_max": "big"})), "'curvature' is not"),
        (json.dumps({**line(0), "loss": "low"}), "'loss' or 'lr'"),
        (json.dumps({**line(0), "nonfinite": 1}), "'nonfinite' is not"),
        (json.dumps({**line(0), "lr": "fast"}), "'loss' or 'lr'"),
    ],
)
def test_bad_history_files_are_one_line_errors(tmp_path, text, message) -> None:
    with pytest.raises(DataError, match=message) as raised:
        read(_write(tmp_path, text))
    assert "\n" not in str(raised.value)


def test_read_skips_blank_lines_and_keeps_order(tmp_path) -> None:
    path = _write(tmp_path, json.dumps(line(0)) + "\n\n" + json.dumps(line(10)) + "\n")
    assert [x["step"] for x in read(path)] == [0, 10]
    with pytest.raises(DataError, match="cannot read"):
        read(tmp_path / "missing.jsonl")


def test_a_curvature_entry_without_lambda_max_is_left_out_of_the_limit_check() -> None:
    entry = {"lambda_max": None, "bound": None, "lr_limit": 1.0, "ratio": 2.0}
    assert verdicts([line(0, curvature=entry)]) == []
