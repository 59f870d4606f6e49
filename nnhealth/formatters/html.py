"""One self-contained HTML page: the plots inline as SVG (nnhealth.plots), the findings,
the layer table; the style in the page, no script, nothing fetched at view time.

``HtmlFormatter`` renders a scan's report; ``history_page`` a training history
(``nnhealth report --format html``). Every string from the report or the history goes
through ``visible`` and is HTML-escaped."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from typing import Any

from nnhealth.findings import Finding, Report, Severity
from nnhealth.formatters.base import Formatter, visible
from nnhealth.formatters.text import fmt, layer_columns

COLOR = {Severity.ERROR: "#c62828", Severity.WARNING: "#b26a00", Severity.INFO: "#1565c0"}
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       margin: 24px auto; max-width: 1000px; padding: 0 16px; color: #1f2328; }
h1 { font-size: 1.4em; margin-bottom: 4px; }
h2 { font-size: 1.15em; margin-top: 28px; border-bottom: 1px solid #d0d7de; }
.meta { color: #57606a; margin: 2px 0; }
.verdict { font-weight: 600; margin: 12px 0; }
figure { margin: 16px 0; }
figure svg { max-width: 100%; height: auto; display: block; }
figcaption, .note { color: #57606a; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { border-bottom: 1px solid #eaeef2; padding: 3px 8px; text-align: left;
         vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.sev { font-weight: 600; white-space: nowrap; }
.fix { color: #1a7f37; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.9em; }
pre { background: #f6f8fa; padding: 6px 8px; white-space: pre-wrap; margin: 4px 0; }
"""


def esc(text: object, keep: str = "") -> str:
    """A string from the report as HTML text: control characters (but ``keep``) written
    out, then escaped (quotes too: the same function serves attributes)."""
    return html.escape(visible(text, keep=keep), quote=True)


def page(title: str, head: Sequence[str], body: Sequence[str]) -> str:
    """The page: ``title``, lines of ``head`` under it (HTML), then ``body`` (HTML)."""
    meta = "".join(f'<p class="meta">{line}</p>\n' for line in head)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{esc(title)}</h1>\n{meta}" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def figure(plot: Any) -> str:
    """A plot as a figure: its SVG (the title is inside it), or its title and why not."""
    slug = esc(plot.key)
    if plot.svg is None:
        return (
            f'<figure data-plot="{slug}" class="empty"><h3>{esc(plot.title)}</h3>'
            f'<p class="note">{esc(plot.note)}</p></figure>'
        )
    caption = f"<figcaption>{esc(plot.note)}</figcaption>" if plot.note else ""
    return f'<figure data-plot="{slug}">\n{plot.svg}\n{caption}</figure>'


def findings_table(findings: Iterable[Finding]) -> str:
    """Severity, code and check, layer, message and fix (with its snippet)."""
    rows = []
    for f in sorted(findings, key=lambda f: -f.severity):
        snippet = f"<pre>{esc(f.fix_snippet, keep=chr(10))}</pre>" if f.fix_snippet else ""
        rows.append(
            f'<tr><td class="sev" style="color:{COLOR[f.severity]}">{f.severity.label}</td>'
            f'<td class="sev"><code>{esc(f.code)}</code> {esc(f.check)}</td>'
            f"<td><code>{esc(f.layer or '(model)')}</code></td>"
            f'<td>{esc(f.message)}<div class="fix">fix: {esc(f.fix)}</div>{snippet}</td></tr>'
        )
    if not rows:
        return '<p class="note">none</p>'
    head = "<tr><th>severity</th><th>check</th><th>layer</th><th>finding and fix</th></tr>"
    return f"<table>\n{head}\n" + "\n".join(rows) + "\n</table>"


def layer_table(rows: Sequence[dict[str, Any]]) -> str:
    """The scan's layer table: the text report's columns but its bars (the plot has them)."""
    columns = [c for c in layer_columns(tuple(rows)) if not c.partner]
    head = "<tr><th>layer</th>" + "".join(f"<th>{esc(c.header)}</th>" for c in columns) + "</tr>"
    body = []
    for r in rows:
        cells = "".join(
            f"<td{'' if c.left else ' class=num'}>{esc(c.cell(r))}</td>" for c in columns
        )
        body.append(f"<tr><td><code>{esc(r.get('name') or '(model)')}</code></td>{cells}</tr>")
    return f"<table>\n{head}\n" + "\n".join(body) + "\n</table>"


def verdict(counts: dict[str, int], healthy: bool, where: str) -> str:
    if healthy:
        return f'<p class="verdict" style="color:#1a7f37">✓ healthy: no findings {esc(where)}</p>'
    plural = {"error": "errors", "warning": "warnings", "info": "info"}
    text = ", ".join(f"{n} {k if n == 1 else plural[k]}" for k, n in counts.items() if n)
    if not text:  # checks skipped or failed: no finding, but no full verdict either
        return f'<p class="verdict">no findings {esc(where)}: not a full verdict</p>'
    worst = next(Severity.parse(k) for k, n in counts.items() if n)
    return f'<p class="verdict" style="color:{COLOR[worst]}">{esc(text)} {esc(where)}</p>'


class HtmlFormatter(Formatter):
    """The scan's report as one page: the variance through depth, findings, layers."""

    name = "html"

    def render(self, report: Report) -> str:
        from nnhealth import plots

        plots.require()
        run = report.run
        head = _scan_head(report)
        checks = len(run.get("checks", [])) - len(report.skipped)
        body = [
            verdict(report.counts(), report.healthy, f"from {checks} checks"),
            figure(plots.depth(report.layers)) if report.layers else "",
            "<h2>Findings</h2>",
            findings_table(report.findings),
        ]
        notes = [
            *(esc(f"note: {n}") for n in report.notes),
            *(esc(f"skipped {s.code} {s.check}: {s.reason}") for s in report.skipped),
            *(esc(f"analyzer error in {e.check}: {e.message}") for e in report.errors),
        ]
        if notes:
            body.append("<ul>" + "".join(f"<li>{n}</li>" for n in notes) + "</ul>")
        if report.layers:
            body += ["<h2>Layers (forward order)</h2>", layer_table(report.layers)]
        title = f"nnhealth {report.tool_version}: {run.get('model')}"
        return page(title, [h for h in head if h], [b for b in body if b])


def _scan_head(report: Report) -> list[str]:
    """The lines under the scan page's title: the model, the batch, the loss, λmax."""
    run = report.run
    batch = run.get("batch") or {}
    model = (run.get("model_class"), run.get("model_format"), run.get("device"))
    head = [esc(" · ".join(str(b) for b in model if b))]
    if batch:
        head.append(esc(f"batch {batch.get('source')} · inputs {batch.get('shape')}"))
    if run.get("loss"):
        head.append(esc(f"loss {run['loss']} = {fmt(run.get('loss_value'))}"))
    c = report.curvature
    if c and c.get("top_eigenvalues"):
        limit = c.get("lr_limit")
        tail = f" · lr limit {fmt(limit)}" if limit is not None else ""
        head.append(esc(f"λmax {fmt(c['top_eigenvalues'][0])}{tail}"))
    return head


def history_page(source: str, lines: Sequence[dict[str, Any]], verdicts: Sequence[Finding]) -> str:
    """``nnhealth report --format html``: the loss, λmax against its limit, dead and
    saturated fractions over steps, the variance through depth at the latest capture
    step; the verdicts over time and the findings of that step."""
    from nnhealth import plots, trends

    plots.require()
    captured = trends.capture_lines(lines)
    s = trends.summary(lines, verdicts)
    step, now = trends.latest(lines)
    span = f"steps {s['first_step']} → {s['last_step']}: {s['capture_steps']} capture steps"
    head = [esc(span)]
    if s["loss_first"] is not None:
        head.append(esc(f"loss {fmt(s['loss_first'])} → {fmt(s['loss_last'])}"))
    if s["nonfinite_steps"]:
        head.append(esc(f"non-finite loss at steps {s['nonfinite_steps'][:10]}"))
    counts = {k: s[k] for k in ("error", "warning", "info")}
    where = f"over {s['capture_steps']} capture steps"
    body = [
        verdict(counts, s["healthy"], where),
        figure(plots.loss(lines)),
        figure(plots.curvature(captured)),
        figure(plots.fraction(captured, "dead_fraction", plots.DEAD)),
        figure(plots.fraction(captured, "saturated_fraction", plots.SATURATED)),
        figure(plots.depth(captured[-1]["layers"] if captured else (), step=step)),
        "<h2>Verdicts over time</h2>",
        findings_table(verdicts),
        f"<h2>Findings at the latest capture step ({esc(step)})</h2>",
        findings_table(now),
    ]
    return page(f"nnhealth history: {source}", head, body)
