"""JUnit XML: one test case per check per layer; failures at or above --fail-on.

Names and messages go through ``visible`` first: XML 1.0 cannot hold most control
characters even escaped (``&#27;`` is not well-formed), nor lone surrogates, so a layer
named with them would make the whole file unreadable to a CI's JUnit parser."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from nnhealth.findings import Report, Severity
from nnhealth.formatters.base import Formatter, visible


def _attr(text: object) -> str:
    return visible(text)


def _body(text: object) -> str:
    return visible(text, keep="\n")


class JunitFormatter(Formatter):
    name = "junit"

    def render(self, report: Report) -> str:
        threshold = Severity.parse(self.options.fail_on)
        checks = report.run.get("checks") or sorted({f.code for f in report.findings})
        names = {f.code: f.check for f in report.findings}
        from nnhealth.analyzers import lookup

        layers = list(
            dict.fromkeys(
                [
                    str(r.get("module", r["name"])) if r.get("role") != "activation" else r["name"]
                    for r in report.layers
                ]
                + [f.layer for f in report.findings if f.layer]
            )
        )
        skipped = {s.code: s.reason for s in report.skipped}
        gating = {id(f) for f in report.gating()}  # with a baseline: only new or worse ones
        suite = ET.Element("testsuite", name="nnhealth", timestamp="", hostname="")
        tests = failures = skips = 0
        for code in checks:
            check = lookup(code)
            name = check.name if check else names.get(code, code)
            for layer in [*layers, None]:
                found = [f for f in report.findings if f.code == code and f.layer == layer]
                if layer is not None and not found and code in skipped:
                    continue  # one skipped case per check is enough
                case = ET.SubElement(
                    suite,
                    "testcase",
                    classname=_attr(f"nnhealth.{code}.{name}"),
                    name=_attr(f"{code} {name}: {layer or '(model)'}"),
                )
                tests += 1
                if code in skipped and layer is None:
                    ET.SubElement(case, "skipped", message=_attr(skipped[code]))
                    skips += 1
                    continue
                failing = [f for f in found if f.severity >= threshold and id(f) in gating]
                for f in failing:
                    failure = ET.SubElement(
                        case, "failure", message=_attr(f.message), type=f.severity.label
                    )
                    failure.text = f"{_attr(f.message)}\nfix: {_attr(f.fix)}" + (
                        f"\n{_body(f.fix_snippet)}" if f.fix_snippet else ""
                    )
                failures += bool(failing)
                below = [f for f in found if f not in failing]
                if below:
                    out = ET.SubElement(case, "system-out")
                    out.text = "\n".join(f"{f.severity.label}: {_attr(f.message)}" for f in below)
        for e in report.errors:
            case = ET.SubElement(
                suite, "testcase", classname="nnhealth.errors", name=_attr(e.check)
            )
            ET.SubElement(case, "error", message=_attr(e.message))
            tests += 1
        suite.set("tests", str(tests))
        suite.set("failures", str(failures))
        suite.set("errors", str(len(report.errors)))
        suite.set("skipped", str(skips))
        suite.set("time", _attr(report.run.get("seconds") or 0))
        suite.attrib.pop("timestamp")
        suite.attrib.pop("hostname")
        root = ET.Element("testsuites", name="nnhealth")
        root.append(suite)
        ET.indent(root)
        return (
            '<?xml version="1.0" encoding="utf-8"?>\n'
            + ET.tostring(root, encoding="unicode")
            + "\n"
        )
