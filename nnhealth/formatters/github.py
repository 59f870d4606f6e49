"""GitHub Actions workflow commands: one annotation per finding."""

from __future__ import annotations

from nnhealth.findings import Report, Severity
from nnhealth.formatters.base import Formatter, visible

COMMAND = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def escape_data(text: str) -> str:
    """``escapeData`` of GitHub's toolkit (@actions/core, command.ts): the runner decodes
    these, so a CR or LF in the text cannot end the command and start another."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    """``escapeProperty`` of GitHub's toolkit: ``escapeData`` plus ``:`` and ``,``, which
    end a property."""
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _data(text: object) -> str:
    # other control characters (ESC, bidi overrides, lone surrogates) are written out
    # visibly first: the runner would pass them on to the log and the annotation raw
    return escape_data(visible(text, keep="\r\n"))


def _prop(text: object) -> str:
    return escape_property(visible(text, keep="\r\n"))


class GithubFormatter(Formatter):
    """``::error file=...,line=...,title=...::message`` lines, as GitHub parses them."""

    name = "github"

    def render(self, report: Report) -> str:
        where = report.run.get("model_source") or {"file": str(report.run.get("model")), "line": 1}
        lines = []
        gating = {id(f) for f in report.gating()}  # findings a baseline accepted become notices
        for f in report.findings:
            title = f"{f.code} {f.check}" + (f" ({f.layer})" if f.layer else "")
            props = f"file={_prop(where['file'])},line={_prop(where['line'])},title={_prop(title)}"
            command = COMMAND[f.severity] if id(f) in gating else "notice"
            lines.append(f"::{command} {props}::{_data(f.message + '. Fix: ' + f.fix)}")
        for e in report.errors:
            lines.append(f"::error title={_prop('nnhealth ' + e.check)}::{_data(e.message)}")
        return "".join(line + "\n" for line in lines)
