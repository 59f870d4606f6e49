"""Training history: one JSON line per capture step of nnhealth.Monitor, and the checks
that read it over time. No torch here (``nnhealth report`` reads a history without it).

A line (schema SCHEMA, documented in the README) is a scan report cut to what trends
need: the step, the loss, the learning rate, per layer the statistics below, the step's
findings, and lambda_max with its limit on the steps that measured it. Lines that
record a non-finite loss between capture steps carry ``nonfinite`` instead of layers.

The verdicts over time reuse the scan's check codes, each with the step it happened at:

- NH101 dead units rising: a nonlinearity's dead fraction rose by at least RISE since
  the first record and is now at least the check's ``warn_fraction`` (0.1; an error at
  its ``error_fraction``, 0.5); the step reported is the first at which it had risen by
  RISE.
- NH401 edge of stability: the first step at which lambda_max reached the stability
  limit (lr >= limit_factor / lambda_max, 2/lambda_max for SGD), with the ratio
  lr * lambda_max / limit_factor and how far lambda_max rose before (progressive
  sharpening); reaching half of it (the check's ``warn_fraction``) is a warning.
- NH301 relative update drifting: a layer whose update ||dw||/||w|| was within
  [``update_low``, ``update_high``] at its first record and is out of it at the latest.
- NH001 first non-finite: the first step with a non-finite loss, weight, gradient or
  activation, and the layer where it was first seen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nnhealth.errors import DataError
from nnhealth.findings import Finding, Report, Severity, json_number

SCHEMA = "nnhealth-history/1"
# a layer row's keys kept in the history (those a report's layer rows have)
LAYER_KEYS = (
    "name",
    "kind",
    "role",
    "module",
    "act_var",
    "grad_var",
    "nonfinite",
    "param_nonfinite",
    "dead_fraction",
    "saturated_fraction",
    "relative_update",
    "weight_norm",
    "grad_norm",
)
RISE = 0.1  # a dead fraction this much above its first record has risen


def record(
    report: Report,
    step: int,
    *,
    elapsed: float,
    lr: float | None,
    epoch: int | None = None,
) -> dict[str, Any]:
    """The history line of a capture step's report."""
    curvature = report.curvature
    line: dict[str, Any] = {
        "schema": SCHEMA,
        "step": step,
        "epoch": epoch,
        "time": round(elapsed, 3),
        "loss": json_number(report.run.get("loss_value")),
        "lr": lr,
        "optimizer": (report.run.get("optimizer") or {}).get("name"),
        "examples": (report.run.get("batch") or {}).get("examples"),
        "layers": [
            {k: json_number(row[k]) for k in LAYER_KEYS if k in row} for row in report.layers
        ],
        "curvature": None if curvature is None else _curvature(curvature, lr),
        "findings": [
            {k: f.to_dict()[k] for k in ("code", "check", "severity", "layer", "message", "fix")}
            for f in report.findings
        ],
    }
    return line


def _curvature(curvature: dict[str, Any], lr: float | None) -> dict[str, Any]:
    top = curvature["top_eigenvalues"][0] if curvature["top_eigenvalues"] else None
    limit = curvature.get("lr_limit")
    return {
        "lambda_max": json_number(top),
        "bound": json_number(curvature["bounds"][0] if curvature["bounds"] else None),
        "lr_limit": json_number(limit),
        "ratio": json_number(lr / limit) if lr is not None and limit else None,
        "operator": curvature.get("operator"),
        "hvps": curvature.get("hvps"),
    }


def nonfinite_record(
    step: int, *, elapsed: float, loss: float | None, layer: str | None, epoch: int | None
) -> dict[str, Any]:
    """The line of a step between captures whose loss was not finite."""
    return {
        "schema": SCHEMA,
        "step": step,
        "epoch": epoch,
        "time": round(elapsed, 3),
        "loss": json_number(loss),
        "nonfinite": {"loss": str(loss), "layer": layer},
    }


def write_line(path: Path, line: dict[str, Any]) -> None:
    """Append one line to the history at ``path`` (created if missing)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line, allow_nan=False) + "\n")


def read(path: Path) -> list[dict[str, Any]]:
    """The lines of a history file; DataError naming the line when one is not a history
    line of this schema."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: cannot read the history ({exc}); give a file nnhealth.Monitor wrote"
        ) from exc
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}:{number}: not a JSON line ({exc.msg}); a history holds one JSON "
                "object per line, as nnhealth.Monitor writes it"
            ) from None
        if not isinstance(line, dict) or line.get("schema") != SCHEMA:
            found = line.get("schema") if isinstance(line, dict) else type(line).__name__
            raise DataError(
                f"{path}:{number}: not a line of an nnhealth history (schema {found!r}, "
                f"expected {SCHEMA!r})"
            )
        if not isinstance(line.get("step"), int):
            raise DataError(f"{path}:{number}: the line has no integer 'step'")
        wrong = _malformed(line)
        if wrong:
            raise DataError(
                f"{path}:{number}: {wrong}; the line is not as nnhealth.Monitor writes it"
            )
        lines.append(line)
    if not lines:
        raise DataError(
            f"{path}: the history is empty; nnhealth.Monitor writes a line per capture step"
        )
    return lines


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _malformed(line: dict[str, Any]) -> str | None:
    """What in a line of the right schema is not of the documented shape, or None."""
    for key in ("layers", "findings"):
        rows = line.get(key, [])
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            return f"'{key}' is not a list of objects"
    for row in line.get("layers", []):
        if not isinstance(row.get("name"), str):
            return "a layer has no string 'name'"
        bad = [k for k in LAYER_KEYS[4:] if k in row and not _number(row[k])]
        if bad:
            return f"layer {row['name']!r}: {bad[0]!r} is not a number"
    curvature = line.get("curvature")
    if curvature is not None and (
        not isinstance(curvature, dict)
        or not all(_number(curvature.get(k)) for k in ("lambda_max", "bound", "lr_limit", "ratio"))
    ):
        return "'curvature' is not null or an object of numbers"
    if not _number(line.get("loss")) or not _number(line.get("lr")):
        return "'loss' or 'lr' is not a number"
    nonfinite = line.get("nonfinite")
    if nonfinite is not None and not isinstance(nonfinite, dict):
        return "'nonfinite' is not an object"
    return None


# ---- verdicts over time ---------------------------------------------------------------


def verdicts(
    lines: Iterable[dict[str, Any]], options: dict[str, dict[str, Any]] | None = None
) -> list[Finding]:
    """The checks over time on a history (see the module docstring), errors first."""
    from nnhealth.analyzers import select_checks

    defaults = {c.name: c.defaults() for c in select_checks(None, None)}
    for name, values in (options or {}).items():
        defaults.setdefault(name, {}).update(values)
    lines = sorted(lines, key=lambda line: line["step"])
    found = [
        *_first_nonfinite(lines),
        *_dead_rising(lines, defaults["dead-relu"]),
        *_edge_of_stability(lines, defaults["curvature"]),
        *_update_drift(lines, defaults["norm-ratio"]),
    ]
    return sorted(found, key=lambda f: -f.severity)


def _series(lines: list[dict[str, Any]], key: str) -> dict[str, list[tuple[int, float]]]:
    """Per layer name, the (step, value) of ``key`` where recorded and finite."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        for row in line.get("layers") or ():
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                out.setdefault(row["name"], []).append((line["step"], float(value)))
    return out


def _first_nonfinite(lines: list[dict[str, Any]]) -> list[Finding]:
    for line in lines:
        where = _nonfinite_in(line)
        if where is None:
            continue
        layer, what = where
        at = f" in {layer}" if layer else ""
        return [
            Finding(
                code="NH001",
                check="nonfinite",
                severity=Severity.ERROR,
                layer=layer,
                message=f"the first non-finite value appeared at step {line['step']}{at} ({what})",
                evidence={"step": line["step"], "loss": line.get("loss")},
                fix=(
                    "lower the learning rate or add warmup, clip gradients "
                    "(torch.nn.utils.clip_grad_norm_), and look at the layer named for a log "
                    "or division of values that can reach zero; train in float32 if it ran "
                    "in half precision"
                ),
                kind="history",
            )
        ]
    return []


def _nonfinite_in(line: dict[str, Any]) -> tuple[str | None, str] | None:
    """(the layer, what was non-finite) at this line, or None."""
    if line.get("nonfinite"):
        return line["nonfinite"].get("layer"), f"loss {line['nonfinite'].get('loss')}"
    for row in line.get("layers") or ():
        if (row.get("nonfinite") or 0) > 0:
            return row["name"], f"{row['nonfinite']} non-finite output values"
        if (row.get("param_nonfinite") or 0) > 0:
            return row["name"], f"{row['param_nonfinite']} non-finite weights"
    for finding in line.get("findings") or ():
        if finding.get("code") == "NH001":
            return finding.get("layer"), finding.get("message", "")
    return None


def _dead_rising(lines: list[dict[str, Any]], options: dict[str, Any]) -> list[Finding]:
    out = []
    for layer, series in _series(lines, "dead_fraction").items():
        (first_step, first), (last_step, last) = series[0], series[-1]
        if last - first < RISE or last < options["warn_fraction"]:
            continue
        died = next(step for step, value in series if value - first >= RISE)
        severity = Severity.ERROR if last >= options["error_fraction"] else Severity.WARNING
        out.append(
            Finding(
                code="NH101",
                check="dead-relu",
                severity=severity,
                layer=layer,
                message=(
                    f"units died during training: the dead fraction rose from {first:.0%} at "
                    f"step {first_step} to {last:.0%} at step {last_step}, first by "
                    f"{RISE:.0%} or more at step {died}"
                ),
                evidence={
                    "died_at_step": died,
                    "first_step": first_step,
                    "first_fraction": first,
                    "last_step": last_step,
                    "last_fraction": last,
                },
                fix=(
                    "units that die during training were pushed below zero for every input by "
                    "large updates: lower the learning rate (or warm it up), clip gradients, "
                    "or use LeakyReLU/GELU, which keep a gradient below zero"
                ),
                kind="history",
            )
        )
    return out


def _edge_of_stability(lines: list[dict[str, Any]], options: dict[str, Any]) -> list[Finding]:
    measured = [
        (line["step"], line["curvature"])
        for line in lines
        if line.get("curvature")
        and line["curvature"].get("ratio") is not None
        and line["curvature"].get("lambda_max") is not None
        and line["curvature"].get("lr_limit") is not None
    ]
    if not measured:
        return []
    first_step, first = measured[0]
    reached = next(((s, c) for s, c in measured if c["ratio"] >= 1.0), None)
    near = next(((s, c) for s, c in measured if c["ratio"] >= options["warn_fraction"]), None)
    hit = reached or near
    if hit is None:
        return []
    step, curvature = hit
    rose = curvature["lambda_max"] / first["lambda_max"] if first["lambda_max"] else math.nan
    where = "reached" if reached else f"came within {options['warn_fraction']:.0%} of"
    sharpening = (
        f"; it rose x{rose:.3g} from {first['lambda_max']:.4g} at step {first_step} "
        "(progressive sharpening)"
        if step != first_step and rose > 1
        else ""
    )
    return [
        Finding(
            code="NH401",
            check="curvature",
            severity=Severity.ERROR if reached else Severity.WARNING,
            layer=None,
            message=(
                f"lambda_max {where} the stability limit at step {step}: lambda_max = "
                f"{curvature['lambda_max']:.4g}, lr / limit = {curvature['ratio']:.3g} (limit "
                f"{curvature['lr_limit']:.3g}){sharpening}"
            ),
            evidence={
                "step": step,
                "lambda_max": curvature["lambda_max"],
                "lr_limit": curvature["lr_limit"],
                "ratio": curvature["ratio"],
                "first_step": first_step,
                "first_lambda_max": first["lambda_max"],
            },
            fix=(
                f"at the edge of stability the loss oscillates or spikes: lower the learning "
                f"rate below {curvature['lr_limit']:.3g} (or decay it from here), warm it up, "
                "or use an adaptive optimizer"
            ),
            kind="history",
        )
    ]


def _update_drift(lines: list[dict[str, Any]], options: dict[str, Any]) -> list[Finding]:
    low, high = options["update_low"], options["update_high"]
    out = []
    for layer, series in _series(lines, "relative_update").items():
        (first_step, first), (last_step, last) = series[0], series[-1]
        if not (low <= first <= high) or low <= last <= high:
            continue
        direction = "above" if last > high else "below"
        out.append(
            Finding(
                code="NH301",
                check="norm-ratio",
                severity=Severity.WARNING,
                layer=layer,
                message=(
                    f"the relative update ||dw||/||w|| drifted {direction} its range "
                    f"[{low:g}, {high:g}]: {first:.3g} at step {first_step}, {last:.3g} at "
                    f"step {last_step}"
                ),
                evidence={
                    "first_step": first_step,
                    "first_update": first,
                    "last_step": last_step,
                    "last_update": last,
                },
                fix=(
                    "lower the learning rate (or schedule it down) for this layer"
                    if direction == "above"
                    else "the layer has all but stopped learning: raise its learning rate, or "
                    "use a layer-wise rate (LARS/LAMB)"
                ),
                kind="history",
            )
        )
    return out
