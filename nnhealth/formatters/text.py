"""The terminal report: header, per-layer table with log-scale variance bars, findings
grouped by severity with their fixes, and a one-line verdict.

Every string from the report goes to rich as a ``Text`` (never markup: a layer named
``[bold red]x[/]`` prints as it is) and through ``visible`` (no control character or
escape sequence from the scanned file reaches the terminal)."""

from __future__ import annotations

import io
import math
from typing import Any

from rich.console import Console, Group
from rich.padding import Padding
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from nnhealth.findings import Report, Severity
from nnhealth.formatters.base import Formatter, visible

BAR_WIDTH = 8
STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}
TITLE = {Severity.ERROR: "Errors", Severity.WARNING: "Warnings", Severity.INFO: "Info"}


def fmt(x: Any) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return "0" if x == 0 else f"{x:.3g}"
    return visible(x)


def safe(text: object, style: str = "") -> Text:
    """A report string as rich text: printed literally, control characters made visible."""
    return Text(visible(text), style=style)


def log_bar(value: float | None, lo: float, hi: float) -> str:
    """A bar whose length is log10(value) placed between log10(lo) and log10(hi)."""
    if value is None or not math.isfinite(value):
        return ""
    if value <= 0:
        return "·" * BAR_WIDTH
    span = math.log10(hi) - math.log10(lo)
    frac = 1.0 if span <= 0 else (math.log10(value) - math.log10(lo)) / span
    filled = max(1, round(1 + frac * (BAR_WIDTH - 1)))
    return "█" * filled + "·" * (BAR_WIDTH - filled)


def _range(values: list[float | None]) -> tuple[float, float]:
    good = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return (min(good), max(good)) if good else (1.0, 1.0)


class TextFormatter(Formatter):
    """Rich text for a terminal (colour only when writing to one)."""

    name = "text"

    def render(self, report: Report) -> str:
        buf = io.StringIO()
        console = Console(
            file=buf,
            width=self.options.width,
            force_terminal=self.options.color,
            color_system="auto" if self.options.color else None,
            highlight=False,
            soft_wrap=False,
        )
        if not self.options.quiet:
            console.print(self._header(report))
            if report.layers:
                console.print()
                console.print(self._table(report))
            if report.notes or report.skipped or report.errors:
                console.print()
            self._notes(console, report)
        else:  # quiet: notes and skips go, but a check that failed is still named
            self._errors(console, report)
        self._findings(console, report)
        if report.what_if:
            self._what_if(console, report)
        if report.baseline is not None:
            b = report.baseline
            console.print()
            console.print(
                safe(
                    f"baseline {b['file']}: {len(b['new'])} new, {len(b['worse'])} worse, "
                    f"{len(b['unchanged'])} unchanged, {len(b['fixed'])} fixed"
                    + (f" ({', '.join(b['fixed'][:5])})" if b["fixed"] else ""),
                    style="bold",
                )
            )
            for label in ("new", "worse"):
                for k in b[label]:
                    console.print(safe(f"  {label}: {k}", style="yellow"))
        console.print(self._verdict(report))
        return "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())

    # ---- parts ------------------------------------------------------------------------
    def _header(self, report: Report) -> Table:
        run = report.run
        grid = Table.grid(padding=(0, 2))
        grid.title = safe(f"nnhealth {report.tool_version}: {run.get('model')}", style="bold")
        grid.title_justify = "left"
        grid.add_column(style="bold")
        grid.add_column()
        params = run.get("params")
        model_bits = [run.get("model_class") or "state_dict", run.get("model_format")]
        if params is not None:
            trainable = run.get("trainable_params")
            extra = f" ({trainable:,} trainable)" if trainable not in (None, params) else ""
            model_bits.append(f"{params:,} params{extra}")
        grid.add_row("model", safe(" · ".join(str(b) for b in model_bits if b)))
        batch = run.get("batch")
        if batch:
            bits = [str(batch.get("source")), f"inputs {batch.get('shape')}"]
            if batch.get("targets_shape") is not None:
                bits.append(f"targets {batch['targets_shape']}")
            if run.get("output_shape") is not None:
                bits.append(f"output {run['output_shape']}")
            grid.add_row("batch", safe(" · ".join(bits)))
        if run.get("loss"):
            lv = run.get("loss_value")
            grid.add_row(
                "pass",
                safe(
                    f"loss {run['loss']} = {fmt(lv)} · mode {run.get('mode')} · "
                    f"{run.get('device')} · seed {run.get('seed')} · {fmt(run.get('seconds'))} s"
                ),
            )
        else:
            grid.add_row(
                "pass", safe(f"weights only, no forward pass · {fmt(run.get('seconds'))} s")
            )
        c = report.curvature
        if c:
            top = ", ".join(f"{v:.6g}" for v in c["top_eigenvalues"])
            state = "converged" if c["converged"] else "NOT converged"
            bits = [
                (
                    f"λmax {top} (bound {c['bounds'][0]:.1e}, {state}, "
                    f"{c['lanczos_hvps']} HVPs, {c['mode']} mode)"
                )
            ]
            if c.get("lr_limit") is not None:
                bits.append(f"lr limit 2/λmax = {c['lr_limit']:.4g}")
            if c.get("lambda_min") is not None:
                bits.append(f"λmin {c['lambda_min']:.4g}")
            if c.get("trace") is not None:
                bits.append(f"trace {c['trace']:.4g} ± {c['trace_stderr']:.2g}")
            grid.add_row("hessian", safe(" · ".join(bits)))
        return grid

    def _table(self, report: Report) -> Table:
        rows = report.layers
        alo, ahi = _range([r.get("act_var") for r in rows])
        glo, ghi = _range([r.get("grad_var") for r in rows])

        def pct_of(key: str):
            return lambda r: "" if r.get(key) is None else f"{100 * r[key]:.0f}%"

        def init(r: dict) -> str:
            if r.get("init_rule", "").startswith("not judged"):
                return "norm"
            return "" if r.get("init_ratio") is None else f"x{fmt(r['init_ratio'])}"

        def width(r: dict) -> str:
            eff, units = r.get("effective_width"), r.get("units")
            if eff is None or eff == units or r.get("symmetry_groups") == 0:
                return ""
            return str(eff) if units is None else f"{eff}/{units}"  # no pass: units unknown

        # (header, cell, shown when this key has a value in some row)
        columns: list[tuple[str, Any, str | None]] = [
            ("layer", lambda r: r["name"], None),
            ("kind", lambda r: r["kind"] + ("()" if r.get("functional") else ""), None),
            ("units", lambda r: fmt(r.get("units")), None),
            ("act var", lambda r: fmt(r.get("act_var")), "act_var"),
            ("log scale", lambda r: log_bar(r.get("act_var"), alo, ahi), "act_var"),
            ("grad var", lambda r: fmt(r.get("grad_var")), "grad_var"),
            ("log scale", lambda r: log_bar(r.get("grad_var"), glo, ghi), "grad_var"),
            ("dead", pct_of("dead_fraction"), "dead_fraction"),
            ("sat", pct_of("saturated_fraction"), "saturated_fraction"),
            ("‖w‖", lambda r: fmt(r.get("weight_norm")), "weight_norm"),
            ("‖w‖/‖∇w‖", lambda r: fmt(r.get("trust_ratio")), "trust_ratio"),
            ("upd", lambda r: fmt(r.get("relative_update")), "relative_update"),
            ("init", init, "init_rule"),
            ("width", width, "effective_width"),
        ]
        shown = [c for c in columns if c[2] is None or any(r.get(c[2]) is not None for r in rows)]
        if not any(width(r) for r in rows):  # every layer at full width: nothing to show
            shown = [c for c in shown if c[0] != "width"]
        table = Table(
            title="Layers (forward order)",
            title_justify="left",
            box=None,
            header_style="bold",
            pad_edge=False,
            padding=(0, 1),
        )
        for header, _, _ in shown:
            left = header in ("layer", "kind") or header == "log scale"
            table.add_column(
                header,
                justify="left" if left else "right",
                no_wrap=True,
                overflow="ellipsis",
                max_width=34 if header == "layer" else None,
            )
        for r in rows:
            bad = r.get("nonfinite") or r.get("param_nonfinite")
            table.add_row(*(safe(cell(r)) for _, cell, _ in shown), style="red" if bad else None)
        return table

    def _notes(self, console: Console, report: Report) -> None:
        for note in report.notes:
            console.print(safe(f"note: {note}", style="dim"))
        for s in report.skipped:
            console.print(safe(f"skipped {s.code} {s.check}: {s.reason}", style="dim"))
        self._errors(console, report)

    def _errors(self, console: Console, report: Report) -> None:
        for e in report.errors:
            console.print(safe(f"analyzer error in {e.check}: {e.message}", style="red"))

    def _findings(self, console: Console, report: Report) -> None:
        for sev in sorted(Severity, reverse=True):
            group = [f for f in report.findings if f.severity == sev]
            if not group:
                continue
            console.print()
            console.print(Text(f"{TITLE[sev]} ({len(group)})", style=STYLE[sev]))
            for f in group:
                head = Text()
                head.append(f"{visible(f.code)} ", style=STYLE[sev])
                head.append(f"{visible(f.check)} ", style="bold")
                head.append(visible(f.layer or "(model)"), style="magenta")
                parts: list[Any] = [
                    head,
                    Padding(safe(f.message), (0, 0, 0, 2)),
                    Padding(safe("fix: " + f.fix, style="green"), (0, 0, 0, 2)),
                ]
                if f.fix_snippet and not self.options.quiet:
                    parts.append(
                        Padding(
                            Syntax(
                                visible(f.fix_snippet, keep="\n"),
                                "python",
                                theme="ansi_dark",
                                background_color="default",
                            ),
                            (0, 0, 0, 4),
                        )
                    )
                if self.options.verbose and f.evidence:
                    ev = ", ".join(f"{k}={fmt(v)}" for k, v in f.evidence.items())
                    parts.append(Padding(safe(ev, style="dim"), (0, 0, 0, 2)))
                console.print(Group(*parts))

    def _what_if(self, console: Console, report: Report) -> None:
        console.print()
        console.print(
            Text(
                "What if (each fix applied to a copy; the model itself is unchanged)", style="bold"
            )
        )
        last = None
        for w in report.what_if:
            head = visible(f"{w['check']} {w['layer'] or ''}".strip())
            before = visible(w["before"])
            prefix = f"  {head}  {before}" if head != last else " " * (len(head) + 4 + len(before))
            last = head
            if not w.get("applied"):
                console.print(
                    Text(
                        prefix + visible(f"  ->  {w['fix']}: not applied ({w.get('note')})"),
                        style="dim",
                    )
                )
                continue
            mark = "resolved" if w.get("resolved") else "not resolved"
            if w.get("new_findings"):
                mark += f"; new: {', '.join(w['new_findings'][:3])}"
            elif "remaining_findings" in w:
                mark += f"; {w['remaining_findings']} finding(s) left in all"
            style = "green" if w.get("resolved") else "yellow"
            console.print(
                Text(prefix + visible(f"  ->  {w['fix']}: {w['after']} ({mark})"), style=style)
            )

    def _verdict(self, report: Report) -> Text:
        counts = report.counts()
        ran = len(report.run.get("checks", [])) - len(report.skipped)
        tail = f" ({len(report.skipped)} skipped)" if report.skipped else ""
        if report.healthy:
            return Text(f"\n✓ healthy: no findings from {ran} checks", style="bold green")
        if not report.findings and not report.errors:
            return Text(
                f"\n✓ no findings from {ran} checks{tail}: not a full verdict", style="green"
            )
        plural = {"error": "errors", "warning": "warnings", "info": "info"}
        summary = ", ".join(f"{n} {k if n == 1 else plural[k]}" for k, n in counts.items())
        if report.errors:
            summary += f", {len(report.errors)} check(s) failed to run"
        worst = report.worst()
        style = STYLE[worst] if worst else "red"
        mark = "✗" if worst == Severity.ERROR or report.errors else "!"
        if report.baseline is not None:
            gating = len(report.gating())
            tail += f"; {gating} new or worse than the baseline"
            if not gating and not report.errors:
                mark, style = "✓", "green"
        return Text(f"\n{mark} {summary} from {ran} checks{tail}", style=style)
