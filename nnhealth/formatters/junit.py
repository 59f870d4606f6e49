"""JUnit XML: one test case per check per layer; failures at or above --fail-on."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from nnhealth.findings import Report, Severity
from nnhealth.formatters.base import Formatter


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
                    classname=f"nnhealth.{code}.{name}",
                    name=f"{code} {name}: {layer or '(model)'}",
                )
                tests += 1
                if code in skipped and layer is None:
                    ET.SubElement(case, "skipped", message=skipped[code])
                    skips += 1
                    continue
                failing = [f for f in found if f.severity >= threshold and id(f) in gating]
                for f in failing:
                    failure = ET.SubElement(
                        case, "failure", message=f.message, type=f.severity.label
                    )
                    failure.text = f"{f.message}\nfix: {f.fix}" + (
                        f"\n{f.fix_snippet}" if f.fix_snippet else ""
                    )
                failures += bool(failing)
                below = [f for f in found if f not in failing]
                if below:
                    out = ET.SubElement(case, "system-out")
                    out.text = "\n".join(f"{f.severity.label}: {f.message}" for f in below)
        for e in report.errors:
            case = ET.SubElement(suite, "testcase", classname="nnhealth.errors", name=e.check)
            ET.SubElement(case, "error", message=e.message)
            tests += 1
        suite.set("tests", str(tests))
        suite.set("failures", str(failures))
        suite.set("errors", str(len(report.errors)))
        suite.set("skipped", str(skips))
        suite.set("time", str(report.run.get("seconds") or 0))
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
