"""Markdown for a pull-request comment: the verdict, the findings, the layer table folded."""

from __future__ import annotations

from nnhealth.findings import Report, Severity
from nnhealth.formatters.base import Formatter
from nnhealth.formatters.text import fmt

ICON = {Severity.ERROR: "🔴 error", Severity.WARNING: "🟠 warning", Severity.INFO: "🔵 info"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


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
            f"### nnhealth: `{run.get('model')}`",
            "",
            verdict,
            "",
        ]
        if report.findings:
            out += ["| severity | check | layer | finding | fix |", "|---|---|---|---|---|"]
            for f in report.findings:
                out.append(
                    f"| {ICON[f.severity]} | `{f.code}` {f.check} | `{f.layer or '(model)'}` | "
                    f"{_cell(f.message)} | {_cell(f.fix)} |"
                )
            out.append("")
        for e in report.errors:
            out.append(f"- ⚠️ `{e.check}` failed to run: {_cell(e.message)}")
        for s in report.skipped:
            out.append(f"- skipped `{s.code}` {s.check}: {_cell(s.reason)}")
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
                    f"| `{r['name']}` | {r['kind']} | {fmt(r.get('act_var'))} | "
                    f"{fmt(r.get('grad_var'))} | {'' if dead is None else f'{100 * dead:.0f}%'} | "
                    f"{fmt(r.get('trust_ratio'))} |"
                )
            out += ["", "</details>"]
        batch = run.get("batch") or {}
        out += [
            "",
            (
                f"<sub>nnhealth {report.tool_version} · {run.get('model_format')} · batch "
                f"{batch.get('shape')} · loss {run.get('loss')} · {run.get('mode')} mode</sub>"
            ),
        ]
        return "\n".join(out) + "\n"
