from __future__ import annotations

from nnhealth.findings import Report
from nnhealth.formatters.base import Formatter


class JsonFormatter(Formatter):
    """The JSON report of DESIGN.md (schema_version 1); NaN/Inf are written as null."""

    name = "json"

    def render(self, report: Report) -> str:
        return report.to_json(indent=2) + "\n"
