"""Markdown for a pull-request comment: the verdict, the findings, the layer table folded.

Strings from the report are escaped so that the comment shows them as they are: no HTML
(``<``, ``>``, ``&`` as entities), no link, image, emphasis or math, no line or ``|``
that ends a table row, no backtick that ends a code span; control characters written out
visibly (``visible``)."""

from __future__ import annotations

from nnhealth.findings import Report, Severity
from nnhealth.formatters.base import Formatter, visible
from nnhealth.formatters.text import fmt

ICON = {Severity.ERROR: "🔴 error", Severity.WARNING: "🟠 warning", Severity.INFO: "🔵 info"}

# backslash escapes (CommonMark: any ASCII punctuation may be escaped, and shows as itself)
_BACKSLASHED = {c: "\\" + c for c in "\\`*_~[]|$"}
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_TEXT = str.maketrans({**_BACKSLASHED, **_ENTITIES})
# what a code span cannot show as it is: a backtick ends it, a pipe ends the table cell
# (GFM splits cells before it parses code spans), entities are not decoded inside it
_NOT_IN_CODE = frozenset("`|&<>")


def md_text(text: object) -> str:
    """A report string as Markdown text that shows exactly that string, on one line."""
    return visible(text).translate(_TEXT)


def md_code(text: object) -> str:
    """A name as a code span; as plain escaped text when a code span cannot hold it."""
    s = visible(text)
    if not s or _NOT_IN_CODE.intersection(s) or s[0] == " " or s[-1] == " ":
        return md_text(s)
    return f"`{s}`"


class MarkdownFormatter(Formatter):
    name = "markdown"

    def render(self, report: Report) -> str:
        run = report.run
        counts = report.counts()
        if report.healthy:
            verdict = "✅ **healthy**: no findings"
        elif not report.findings and not report.errors:
            verdict = f"✅ no findings ({len(report.skipped)} checks skipped)"
        else:
            verdict = "❌ " + ", ".join(f"**{n}** {k}" for k, n in counts.items())
        out = [
            f"### nnhealth: {md_code(run.get('model'))}",
            "",
            verdict,
            "",
        ]
        if report.findings:
            out += ["| severity | check | layer | finding | fix |", "|---|---|---|---|---|"]
            for f in report.findings:
                out.append(
                    f"| {ICON[f.severity]} | {md_code(f.code)} {md_text(f.check)} | "
                    f"{md_code(f.layer or '(model)')} | {md_text(f.message)} | {md_text(f.fix)} |"
                )
            out.append("")
        for e in report.errors:
            out.append(f"- ⚠️ {md_code(e.check)} failed to run: {md_text(e.message)}")
        for s in report.skipped:
            out.append(f"- skipped {md_code(s.code)} {md_text(s.check)}: {md_text(s.reason)}")
        if report.layers:
            out += [
                "",
                "<details><summary>Layers</summary>",
                "",
                "| layer | kind | act var | grad var | dead | ‖w‖/‖∇w‖ |",
                "|---|---|---|---|---|---|",
            ]
            for r in report.layers:
                dead = r.get("dead_fraction")
                out.append(
                    f"| {md_code(r['name'])} | {md_text(r['kind'])} | "
                    f"{md_text(fmt(r.get('act_var')))} | {md_text(fmt(r.get('grad_var')))} | "
                    f"{'' if dead is None else f'{100 * dead:.0f}%'} | "
                    f"{md_text(fmt(r.get('trust_ratio')))} |"
                )
            out += ["", "</details>"]
        batch = run.get("batch") or {}
        out += [
            "",
            (
                "<sub>"
                + md_text(
                    f"nnhealth {report.tool_version} · {run.get('model_format')} · batch "
                    f"{batch.get('shape')} · loss {run.get('loss')} · {run.get('mode')} mode"
                )
                + "</sub>"
            ),
        ]
        return "\n".join(out) + "\n"
