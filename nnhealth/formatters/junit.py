"""JUnit XML: one test case per check per layer; failures at or above --fail-on.

Names and messages go through ``visible`` first: XML 1.0 cannot hold most control
characters even escaped (``&#27;`` is not well-formed), nor lone surrogates, so a layer
named with them would make the whole file unreadable to a CI's JUnit parser."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from nnhealth.findings import Finding, Report, Severity
from nnhealth.formatters.base import Formatter, visible


def _attr(text: object) -> str:
    return visible(text)


def _body(text: object) -> str:
    return visible(text, keep="\n")


class JunitFormatter(Formatter):
    name = "junit"

    def render(self, report: Report) -> str:
        suite = _Suite(report, Severity.parse(self.options.fail_on))
        for code in report.run.get("checks") or sorted({f.code for f in report.findings}):
            suite.add_check(code)
        for e in report.errors:
            suite.add_error(e.check, e.message)
        return suite.xml()


class _Suite:
    """One <testsuite>: a test case per check per layer (and one for the whole model),
    with the counts JUnit readers show."""

    def __init__(self, report: Report, threshold: Severity) -> None:
        self.report = report
        self.threshold = threshold
        self.names = {f.code: f.check for f in report.findings}
        self.layers = list(
            dict.fromkeys(
                [
                    str(r.get("module", r["name"])) if r.get("role") != "activation" else r["name"]
                    for r in report.layers
                ]
                + [f.layer for f in report.findings if f.layer]
            )
        )
        self.skipped = {s.code: s.reason for s in report.skipped}
        self.gating = {id(f) for f in report.gating()}  # with a baseline: only new or worse
        self.element = ET.Element("testsuite", name="nnhealth")
        self.tests = self.failures = self.skips = 0

    def add_check(self, code: str) -> None:
        from nnhealth.analyzers import lookup

        check = lookup(code)
        name = check.name if check else self.names.get(code, code)
        for layer in [*self.layers, None]:
            found = [f for f in self.report.findings if f.code == code and f.layer == layer]
            if layer is not None and not found and code in self.skipped:
                continue  # one skipped case per check is enough
            case = ET.SubElement(
                self.element,
                "testcase",
                classname=_attr(f"nnhealth.{code}.{name}"),
                name=_attr(f"{code} {name}: {layer or '(model)'}"),
            )
            self.tests += 1
            if code in self.skipped and layer is None:
                ET.SubElement(case, "skipped", message=_attr(self.skipped[code]))
                self.skips += 1
            else:
                self._outcome(case, found)

    def _outcome(self, case: ET.Element, found: list[Finding]) -> None:
        """Failures for the gating findings at or above the threshold; the others as
        system-out."""
        failing = [f for f in found if f.severity >= self.threshold and id(f) in self.gating]
        for f in failing:
            failure = ET.SubElement(
                case, "failure", message=_attr(f.message), type=f.severity.label
            )
            failure.text = f"{_attr(f.message)}\nfix: {_attr(f.fix)}" + (
                f"\n{_body(f.fix_snippet)}" if f.fix_snippet else ""
            )
        self.failures += bool(failing)
        below = [f for f in found if f not in failing]
        if below:
            out = ET.SubElement(case, "system-out")
            out.text = "\n".join(f"{f.severity.label}: {_attr(f.message)}" for f in below)

    def add_error(self, check: str, message: str) -> None:
        case = ET.SubElement(
            self.element, "testcase", classname="nnhealth.errors", name=_attr(check)
        )
        ET.SubElement(case, "error", message=_attr(message))
        self.tests += 1

    def xml(self) -> str:
        suite = self.element
        suite.set("tests", str(self.tests))
        suite.set("failures", str(self.failures))
        suite.set("errors", str(len(self.report.errors)))
        suite.set("skipped", str(self.skips))
        suite.set("time", _attr(self.report.run.get("seconds") or 0))
        root = ET.Element("testsuites", name="nnhealth")
        root.append(suite)
        ET.indent(root)
        return (
            '<?xml version="1.0" encoding="utf-8"?>\n'
            + ET.tostring(root, encoding="unicode")
            + "\n"
        )
