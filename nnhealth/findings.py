"""Frozen result types: Severity, Finding, Report. No torch here."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any


class Severity(enum.IntEnum):
    INFO = 1
    WARNING = 2
    ERROR = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | Severity) -> Severity:
        if isinstance(value, Severity):
            return value
        try:
            return cls[str(value).strip().upper()]
        except KeyError:
            raise ValueError(
                f"unknown severity {value!r}: expected one of error, warning, info"
            ) from None


Number = float | int | str | bool | None


@dataclass(frozen=True)
class Finding:
    """One problem found by one check, at one layer (or model-wide when ``layer`` is None)."""

    code: str
    check: str
    severity: Severity
    layer: str | None
    message: str
    evidence: dict[str, Number]
    fix: str
    fix_snippet: str | None = None
    # tells apart findings of one check on one layer (NH401: limit / negative curvature)
    kind: str = ""

    @property
    def key(self) -> str:
        """Stable identity across runs: check, layer, kind; never the numbers."""
        return ":".join(p for p in (self.code, self.layer or "(model)", self.kind) if p)

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "kind": self.kind or None,
            "check": self.check,
            "severity": self.severity.label,
            "layer": self.layer,
            "message": self.message,
            "evidence": {k: json_number(v) for k, v in self.evidence.items()},
            "fix": self.fix,
            "fix_snippet": self.fix_snippet,
        }


@dataclass(frozen=True)
class AnalyzerError:
    """A check that raised: reported, while the other checks still ran."""

    check: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.check, "message": self.message}


@dataclass(frozen=True)
class Skipped:
    """A selected check that could not run on this input, and why."""

    code: str
    check: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "check": self.check, "reason": self.reason}


def json_number(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_clean(obj: Any) -> Any:
    """``obj`` with every non-finite float in it as None (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_clean(v) for v in obj]
    return json_number(obj)


SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Report:
    """Everything one scan produced. Formatters render it; analysis code never prints."""

    run: dict[str, Any]
    layers: tuple[dict[str, Any], ...]
    findings: tuple[Finding, ...]
    errors: tuple[AnalyzerError, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    notes: tuple[str, ...] = ()
    curvature: dict[str, Any] | None = None
    tool_version: str = field(default="")
    # comparison with a baseline: keys of new / worse / unchanged / fixed findings
    baseline: dict[str, Any] | None = None
    # --what-if: each fix tried on a copy of the model, with the metric before and after
    what_if: tuple[dict[str, Any], ...] | None = None

    def gating(self) -> tuple[Finding, ...]:
        """The findings that decide the exit code: all, or only new and worse ones when
        compared with a baseline."""
        if self.baseline is None:
            return self.findings
        from nnhealth.baseline import key

        counted = set(self.baseline["new"]) | set(self.baseline["worse"])
        return tuple(f for f in self.findings if key(f) in counted)

    def counts(self) -> dict[str, int]:
        out = {s.label: 0 for s in sorted(Severity, reverse=True)}
        for f in self.findings:
            out[f.severity.label] += 1
        return out

    def worst(self) -> Severity | None:
        return max((f.severity for f in self.findings), default=None)

    def ok(self, fail_on: Severity | str = Severity.ERROR) -> bool:
        """True when no (new or worse, with a baseline) finding is at or above ``fail_on``
        and no check failed to run."""
        threshold = Severity.parse(fail_on)
        return not self.errors and all(f.severity < threshold for f in self.gating())

    @property
    def healthy(self) -> bool:
        """No findings, no failed check, and no selected check skipped."""
        return not self.findings and not self.errors and not self.skipped

    def to_dict(self) -> dict[str, Any]:
        counts = self.counts()
        return json_clean(
            {
                "schema_version": SCHEMA_VERSION,
                "tool": {"name": "nnhealth", "version": self.tool_version},
                "run": self.run,
                "layers": list(self.layers),
                "curvature": self.curvature,
                "findings": [f.to_dict() for f in self.findings],
                "errors": [e.to_dict() for e in self.errors],
                "skipped": [s.to_dict() for s in self.skipped],
                "notes": list(self.notes),
                "baseline": self.baseline,
                "what_if": None if self.what_if is None else list(self.what_if),
                "summary": {**counts, "healthy": self.healthy},
            }
        )

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)
