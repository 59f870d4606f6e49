"""GitHub Actions workflow commands: one annotation per finding."""

from __future__ import annotations

from nnhealth.findings import Report, Severity
from nnhealth.formatters.base import Formatter

COMMAND = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def _data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _prop(text: str) -> str:
    return _data(text).replace(":", "%3A").replace(",", "%2C")


class GithubFormatter(Formatter):
    """``::error file=...,line=...,title=...::message`` lines, as GitHub parses them."""

    name = "github"

    def render(self, report: Report) -> str:
        where = report.run.get("model_source") or {"file": str(report.run.get("model")), "line": 1}
        lines = []
        gating = {id(f) for f in report.gating()}  # findings a baseline accepted become notices
        for f in report.findings:
            title = f"{f.code} {f.check}" + (f" ({f.layer})" if f.layer else "")
            props = f"file={_prop(where['file'])},line={where['line']},title={_prop(title)}"
            command = COMMAND[f.severity] if id(f) in gating else "notice"
            lines.append(f"::{command} {props}::{_data(f.message + '. Fix: ' + f.fix)}")
        for e in report.errors:
            lines.append(f"::error title={_prop('nnhealth ' + e.check)}::{_data(e.message)}")
        return "".join(line + "\n" for line in lines)
