"""SARIF 2.1.0 for GitHub code scanning and other SARIF consumers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from nnhealth.analyzers import REGISTRY
from nnhealth.findings import Finding, Report, Severity
from nnhealth.formatters.base import Formatter

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "note"}


def fingerprint(f: Finding) -> str:
    """Stable across runs: the check and the layer, nothing that changes with numbers."""
    # surrogatepass: a lone surrogate in a layer name (pickle keeps one) still hashes
    return hashlib.sha256(f.key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _uri(path: str) -> str:
    """A file path as a URI reference. A path Python decoded with surrogate escapes (bytes
    that are not UTF-8) gets its original bytes back; any other lone surrogate, which no
    encoding holds, is written out as ``\\udXXX`` rather than crash the report."""
    posix = Path(path).as_posix()
    try:
        return quote(posix, errors="surrogateescape")
    except UnicodeEncodeError:
        return quote(posix, errors="backslashreplace")


def _rule(check) -> dict[str, Any]:
    doc = check.doc()
    first = doc.split("\n\n", 1)[0].replace("\n", " ")
    return {
        "id": check.code,
        "name": check.name,
        "shortDescription": {"text": check.summary},
        "fullDescription": {"text": first},
        "help": {"text": doc, "markdown": f"`nnhealth explain {check.code}`\n\n```\n{doc}\n```"},
        "properties": {"tags": ["training-health", check.name]},
    }


class SarifFormatter(Formatter):
    """One run, one rule per check, one result per finding, located in the model's code."""

    name = "sarif"

    def render(self, report: Report) -> str:
        rules = [_rule(c) for c in REGISTRY]
        index = {c.code: i for i, c in enumerate(REGISTRY)}
        where = report.run.get("model_source") or {"file": str(report.run.get("model")), "line": 1}
        results = []
        for f in report.findings:
            text = f"{f.layer or 'model'}: {f.message}. Fix: {f.fix}"
            location: dict[str, Any] = {
                "physicalLocation": {
                    "artifactLocation": {
                        "uri": _uri(where["file"]),
                        **({} if Path(where["file"]).is_absolute() else {"uriBaseId": "%SRCROOT%"}),
                    },
                    "region": {"startLine": int(where["line"])},
                },
            }
            if f.layer:
                location["logicalLocations"] = [{"fullyQualifiedName": f.layer, "kind": "module"}]
            state = {}
            if report.baseline is not None:  # new / unchanged / updated, as SARIF says it
                k = f.key
                state = {
                    "baselineState": "new"
                    if k in report.baseline["new"]
                    else "updated"
                    if k in report.baseline["worse"]
                    else "unchanged"
                }
            results.append(
                {
                    **state,
                    "ruleId": f.code,
                    "ruleIndex": index[f.code],
                    "level": LEVEL[f.severity],
                    "message": {"text": text},
                    "locations": [location],
                    "partialFingerprints": {"nnhealthFinding/v1": fingerprint(f)},
                    "properties": {"evidence": f.to_dict()["evidence"]},
                }
            )
        notifications = [
            {"level": "error", "message": {"text": f"{e.check} failed: {e.message}"}}
            for e in report.errors
        ]
        sarif = {
            "$schema": SARIF_SCHEMA,
            "version": "2.1.0",
            "runs": [
                {
                    "tool": {
                        "driver": {
                            "name": "nnhealth",
                            "version": report.tool_version,
                            "informationUri": "https://pypi.org/project/nnhealth/",
                            "rules": rules,
                        }
                    },
                    "invocations": [
                        {
                            "executionSuccessful": not report.errors,
                            "toolExecutionNotifications": notifications,
                        }
                    ],
                    "results": results,
                }
            ],
        }
        return json.dumps(sarif, indent=2, allow_nan=False) + "\n"
