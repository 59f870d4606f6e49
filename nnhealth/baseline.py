"""Baselines: accept the findings a model already has, fail only on new or worse ones.

A baseline file records each finding by its key (check code and layer) with its
severity and a score, the number that gets worse as the problem grows (each check's
``score``: the dead fraction for dead-relu, how far the variance drifts through depth
for activation-variance...). Compared with a later scan: a finding is *new* if its key
is absent, *worse* if its severity rose or its score grew by more than the tolerance,
*unchanged* otherwise; baseline keys that no longer appear are *fixed*, when the check
that found them ran to the end (not skipped, not crashed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nnhealth._util import first_line, regular_file
from nnhealth.analyzers import lookup
from nnhealth.errors import UsageError, flag
from nnhealth.findings import Finding, Report, Severity, json_number

FORMAT_VERSION = 1
MAX_BYTES = 64 * 2**20  # read whole into memory; real baselines are kilobytes


def key(f: Finding) -> str:
    return f.key


def score(f: Finding) -> float | None:
    """The finding's size, as its check measures it (``Check.score``): larger is worse.
    None when the evidence has no such number."""
    check = lookup(f.code)
    value = None if check is None else check().score(f)
    return float(value) if isinstance(value, (int, float)) else None


def write(report: Report, path: Path) -> None:
    entries = [
        {
            "key": key(f),
            "code": f.code,
            "check": f.check,
            "layer": f.layer,
            "severity": f.severity.label,
            "score": json_number(score(f)),
            "message": f.message,
        }
        for f in report.findings
    ]
    doc = {
        "nnhealth_baseline": FORMAT_VERSION,
        "tool_version": report.tool_version,
        "model": report.run.get("model"),
        "findings": entries,
    }
    path.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def read(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        raise UsageError(
            f"{flag('baseline')} {path}: no such file (write one with {flag('write_baseline')})"
        )
    regular_file(path, "baseline file", UsageError)  # a FIFO would block, /dev/zero never end
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise UsageError(
                f"{flag('baseline')} {path}: {size:,} bytes is too large for a baseline (at most "
                f"{MAX_BYTES:,})"
            )
        doc = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise UsageError(
            f"{flag('baseline')} {path}: not a readable baseline (JSON nested too deeply)"
        ) from None
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"{flag('baseline')} {path}: not a readable baseline ({first_line(exc)})"
        ) from None
    version = doc.get("nnhealth_baseline") if isinstance(doc, dict) else None
    if isinstance(version, bool) or version != FORMAT_VERSION:
        raise UsageError(
            f"{flag('baseline')} {path}: not an nnhealth baseline (version {FORMAT_VERSION})"
        )
    entries = doc.get("findings")
    if not isinstance(entries, list):
        raise UsageError(f"{flag('baseline')} {path}: findings: expected a list")
    out = {}
    for i, entry in enumerate(entries):
        where = f"{flag('baseline')} {path}: findings[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise UsageError(f"{where}: expected an object with a string key")
        for field in ("code", "check", "layer", "message"):
            value = entry.get(field)
            if value is not None and not isinstance(value, str):
                raise UsageError(
                    f"{where}.{field}: expected a string or null, got {type(value).__name__}"
                )
        try:
            Severity.parse(entry.get("severity", ""))
        except ValueError:
            raise UsageError(
                f"{where}.severity: expected error, warning or info, got {entry.get('severity')!r}"
            ) from None
        sc = entry.get("score")
        if sc is not None and (
            isinstance(sc, bool) or not isinstance(sc, (int, float)) or not math.isfinite(sc)
        ):
            raise UsageError(f"{where}.score: expected a finite number or null, got {sc!r}")
        out[entry["key"]] = entry
    return out


def compare(
    report: Report, baseline: dict[str, dict[str, Any]], tolerance: float
) -> dict[str, Any]:
    new, worse, unchanged = [], [], []
    for f in report.findings:
        k = key(f)
        old = baseline.get(k)
        if old is None:
            new.append(k)
            continue
        old_sev = Severity.parse(old.get("severity", "info"))
        now, before = score(f), old.get("score")
        grew = (
            now is not None
            and isinstance(before, (int, float))
            and now > before * (1 + tolerance) + 1e-12
        )
        (worse if f.severity > old_sev or grew else unchanged).append(k)
    current = {key(f) for f in report.findings}
    # only a check that ran to the end can say a finding is gone: not a skipped one,
    # not one that raised (its findings are unknown, not fixed)
    crashed = {c.code for c in map(lookup, (e.check for e in report.errors)) if c is not None}
    ran = set(report.run.get("checks") or []) - {s.code for s in report.skipped} - crashed
    fixed = [k for k, old in baseline.items() if k not in current and old.get("code") in ran]
    return {
        "new": new,
        "worse": worse,
        "unchanged": unchanged,
        "fixed": fixed,
        "tolerance": tolerance,
    }
