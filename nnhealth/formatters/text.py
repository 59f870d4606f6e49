"""The terminal report: header, per-layer table with log-scale variance bars, findings
grouped by severity with their fixes, and a one-line verdict.

Every string from the report goes to rich as a ``Text`` (never markup: a layer named
``[bold red]x[/]`` prints as it is) and through ``visible`` (no control character or
escape sequence from the scanned file reaches the terminal)."""

from __future__ import annotations

import io
import math
import statistics
import textwrap
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from nnhealth.findings import Finding, Report, Severity
from nnhealth.formatters.base import Formatter, RenderOptions, number_snippets, visible

BAR_WIDTH = 8
GAP = 2  # cells between two table columns (padding 1 on either side)
NAME_ROOM = 24  # cells the layer column keeps before other columns are dropped for it
NAME_FLOOR = 12  # names are not shortened below this (unless they are shorter)
SNIPPET_INDENT = 4
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


@dataclass(frozen=True)
class Column:
    """One column of the layer table. When the terminal is too narrow for all of them,
    the highest ``rank`` goes first; ``needs`` hides a column no row has a value for."""

    header: str
    label: str  # how the note on left-out columns names it
    cell: Callable[[dict], str]
    rank: int
    needs: str | None = None
    left: bool = False
    partner: str = ""  # a bar's numbers; without them beside it the header is ``apart``
    apart: str = ""


def _pct(key: str) -> Callable[[dict], str]:
    return lambda r: "" if r.get(key) is None else f"{100 * r[key]:.0f}%"


def _init(r: dict) -> str:
    if r.get("init_rule", "").startswith("not judged"):
        return "norm"
    return "" if r.get("init_ratio") is None else f"x{fmt(r['init_ratio'])}"


def _width(r: dict) -> str:
    eff, units = r.get("effective_width"), r.get("units")
    if eff is None or eff == units or r.get("symmetry_groups") == 0:
        return ""
    return str(eff) if units is None else f"{eff}/{units}"  # no pass: units unknown


def _variance_columns(rows: tuple[dict, ...], what: str, priority: int, bars: int) -> list[Column]:
    """``what`` var (act or grad) and its log-scale bars, on the range of every row."""
    key, label = f"{what}_var", f"{what} var"
    lo, hi = _range([r.get(key) for r in rows])
    return [
        Column(label, label, lambda r: fmt(r.get(key)), priority, key),
        Column(
            "log scale",
            f"{label} bars",
            lambda r: log_bar(r.get(key), lo, hi),
            bars,
            key,
            left=True,
            partner=label,
            apart=f"{what} log",
        ),
    ]


def layer_columns(rows: tuple[dict, ...]) -> list[Column]:
    """The columns after the layer name, in display order, that some row fills."""
    columns = [
        Column("kind", "kind", lambda r: r["kind"] + ("()" if r.get("functional") else ""), 5),
        Column("units", "units", lambda r: fmt(r.get("units")), 12),
        *_variance_columns(rows, "act", 1, 10),
        *_variance_columns(rows, "grad", 2, 11),
        Column("dead", "dead", _pct("dead_fraction"), 3, "dead_fraction"),
        Column("sat", "sat", _pct("saturated_fraction"), 4, "saturated_fraction"),
        Column("‖w‖", "‖w‖", lambda r: fmt(r.get("weight_norm")), 13, "weight_norm"),
        Column("‖w‖/‖∇w‖", "‖w‖/‖∇w‖", lambda r: fmt(r.get("trust_ratio")), 6, "trust_ratio"),
        Column("upd", "upd", lambda r: fmt(r.get("relative_update")), 7, "relative_update"),
        Column("init", "init", _init, 8, "init_rule"),
        Column("width", "width", _width, 9, "effective_width"),
    ]
    columns[0] = Column(**{**columns[0].__dict__, "left": True})
    kept = [c for c in columns if c.needs is None or any(r.get(c.needs) is not None for r in rows)]
    # every layer at full width: nothing to show
    return [c for c in kept if c.header != "width" or any(_width(r) for r in rows)]


def shorten_left(name: str, width: int, snap: bool = True) -> str:
    """``name`` in at most ``width`` cells, cut from the left so that the end that tells
    layers apart stays: ``transformer.h.0.ln_1`` -> ``…h.0.ln_1``. With ``snap`` the cut
    moves to just after a ``.`` when that costs at most a third of the room."""
    if cell_len(name) <= width:
        return name
    room, used, keep = max(width - 1, 1), 0, len(name)
    while keep > 1 and used + cell_len(name[keep - 1]) <= room:
        keep -= 1
        used += cell_len(name[keep])
    tail = name[keep:]
    dot = tail.find(".")
    if snap and name[keep - 1] != "." and 0 <= dot < min(room // 3, len(tail) - 1):
        tail = tail[dot + 1 :]
    return "…" + tail


def shorten_names(names: list[str], width: int) -> list[str] | None:
    """Every name in ``width`` cells (``shorten_left``), or None when two different names
    would read the same. A cut snaps to a ``.`` only where that keeps the names apart."""
    short = {n: shorten_left(n, width, snap=False) for n in dict.fromkeys(names)}
    taken = set(short.values())
    if len(taken) < len(short):
        return None
    for n, plain in short.items():
        snapped = shorten_left(n, width)
        if snapped not in taken:
            taken.discard(plain)
            taken.add(snapped)
            short[n] = snapped
    return [short[n] for n in names]


def name_width(names: list[str], room: int) -> int:
    """The widest layer column up to ``room`` (at least the narrowest at which shortened
    names stay apart) at which no two names shorten to the same string."""
    natural = max(map(cell_len, names), default=0)
    floor = min(NAME_FLOOR, natural)
    narrowest = next((w for w in range(floor, natural) if shorten_names(names, w)), natural)
    return next(
        (w for w in range(min(room, natural), narrowest, -1) if shorten_names(names, w)),
        narrowest,
    )


def _fit(columns: list[Column], widths: dict[int, int], used: int, room: int) -> list[Column]:
    """The columns, best rank first, until the next one does not fit in ``room``."""
    kept: list[Column] = []
    for c in sorted(columns, key=lambda c: c.rank):
        if kept and used + GAP + widths[id(c)] > room:
            break
        kept.append(c)
        used += GAP + widths[id(c)]
    return [c for c in columns if c in kept]  # display order


def layer_tables(rows: tuple[dict, ...], width: int, verbose: bool) -> list[RenderableType]:
    """The layer table in ``width`` cells: no number is ever cut. Columns that do not fit
    are left out, lowest priority first, and named in a note; with ``verbose`` they follow
    in further tables, each led by the layer names. Long names are cut from the left."""
    columns = layer_columns(rows)
    cells = {id(c): [visible(c.cell(r)) for r in rows] for c in columns}
    widths = {id(c): max(map(cell_len, [c.header, *cells[id(c)]])) for c in columns}
    names = [visible(r["name"]) or "(model)" for r in rows]  # "": the root module
    narrowest = name_width(names, 0)
    reserve = max(narrowest, min(NAME_ROOM, name_width(names, width)))
    parts: list[RenderableType] = []
    left = columns
    while left and (verbose or not parts):
        shown = _fit(left, widths, reserve, width)
        used = sum(widths[id(c)] + GAP for c in shown)
        name_w = name_width(names, width - used)
        title = "Layers (forward order)" if not parts else "Layers, continued"
        parts.append(_render_table(title, rows, names, name_w, shown, cells, widths))
        left = [c for c in left if c not in shown]
    if left:
        dropped = ", ".join(c.label for c in left)
        parts.append(
            Text(
                f"left out at {width} columns: {dropped} (-v adds them in a second table; "
                "a wider terminal or --format json shows every column)",
                style="dim",
            )
        )
    return parts


def _render_table(
    title: str,
    rows: tuple[dict, ...],
    names: list[str],
    name_w: int,
    shown: list[Column],
    cells: dict[int, list[str]],
    widths: dict[int, int],
) -> Table:
    table = Table(
        title=title,
        title_justify="left",
        box=None,
        header_style="bold",
        pad_edge=False,
        padding=(0, 1),
    )
    table.add_column("layer", width=name_w, no_wrap=True, overflow="fold")
    headers = {c.header for c in shown}
    for c in shown:  # fold, never ellipsis: a number is wrapped, not cut
        header = c.apart if c.partner and c.partner not in headers else c.header
        justify = "left" if c.left else "right"
        table.add_column(header, justify=justify, width=widths[id(c)], overflow="fold")
    short = shorten_names(names, name_w) or names  # name_width chose a width where they differ
    for i, r in enumerate(rows):
        bad = r.get("nonfinite") or r.get("param_nonfinite")
        row = [short[i], *(cells[id(c)][i] for c in shown)]
        table.add_row(*(Text(cell) for cell in row), style="red" if bad else None)
    return table


def wrap_comments(code: str, width: int) -> str:
    """``code`` with each comment line longer than ``width`` wrapped into more comment
    lines (a wrapped comment must stay a comment); code lines are left to the terminal."""
    out = []
    for line in code.splitlines():
        body = line.lstrip()
        if body.startswith("#") and cell_len(line) > width:
            lead = line[: len(line) - len(body)] + "# "
            text = body.lstrip("#").strip()
            out += textwrap.wrap(
                text,
                width,
                initial_indent=lead,
                subsequent_indent=lead,
                break_long_words=False,
                break_on_hyphens=False,
            )
        else:
            out.append(line)
    return "\n".join(out)


def _snippet(
    code: str, number: int | None, uses: Counter, printed: set[str], width: int
) -> list[Any]:
    """A fix snippet under its finding, the first time it is met; a pointer to it after.
    Long lines wrap (a cropped line of code is a wrong line of code)."""
    if code in printed:
        return [Padding(Text(f"snippet: see [{number}] above", style="dim"), (0, 0, 0, 2))]
    printed.add(code)
    parts: list[Any] = []
    if number is not None:
        label = f"snippet [{number}] ({uses[code]} findings use it):"
        parts.append(Padding(Text(label, style="dim"), (0, 0, 0, 2)))
    syntax = Syntax(
        wrap_comments(visible(code, keep="\n"), width - SNIPPET_INDENT),
        "python",
        theme="ansi_dark",
        background_color="default",
        word_wrap=True,
    )
    return [*parts, Padding(syntax, (0, 0, 0, SNIPPET_INDENT))]


def _limit_formula(c: dict) -> str:
    """The optimizer's limit as the header writes it: 2/λmax for SGD, 38/λmax(P⁻¹H) for
    Adam at beta1 0.9 (and the optimizer's name when it is not plain SGD)."""
    factor = c.get("limit_factor", 2.0)
    lam = "λmax(P⁻¹H)" if c.get("operator") == "preconditioned" else "λmax"
    name = c.get("optimizer", "SGD")
    who = "" if name == "SGD" else f" ({name})"
    return f"{factor:.4g}/{lam}{who}"


def _hessian(c: dict, total: int | None) -> str:
    """The header's hessian row: the eigenvalues, how they were had, the limit; which
    examples they are of when not the whole batch (``total`` examples)."""
    top = ", ".join(f"{v:.6g}" for v in c["top_eigenvalues"])
    state = "converged" if c["converged"] else "NOT converged"
    bits = [
        (
            f"λmax {top} (bound {c['bounds'][0]:.1e}, {state}, "
            f"{c['lanczos_hvps']} HVPs, {c['mode']} mode)"
        )
    ]
    if c.get("operator") == "preconditioned":
        bits[0] = bits[0].replace("λmax", "λmax(P⁻¹H)", 1)
    bits += _sub_batches(c, total)
    if c.get("lr_limit") is not None:
        bits.append(f"lr limit {_limit_formula(c)} = {c['lr_limit']:.4g}")
    if c.get("lambda_min") is not None:
        bits.append(f"λmin {c['lambda_min']:.4g}")
    if c.get("trace") is not None:
        bits.append(f"trace {c['trace']:.4g} ± {c['trace_stderr']:.2g}")
    return " · ".join(bits)


def _sub_batches(c: dict, total: int | None) -> list[str]:
    """The sub-batch the Hessian was taken on, or the K it was averaged over with the
    spread of their λmax; nothing for the whole batch."""
    n, k, each = c.get("examples"), c.get("batches", 1), c.get("batch_lambda_max") or []
    if k > 1 and len(each) > 1:
        std = statistics.stdev(each)
        lo, hi = min(each), max(each)
        return [f"mean over {k} sub-batches of {n}: λmax ± {std:.2g}, min {lo:.4g}, max {hi:.4g}"]
    if n is not None and total is not None and n < total:
        return [f"on the first {n} of {total} examples"]
    return []


def print_findings(console: Console, findings: Iterable[Finding], options: RenderOptions) -> None:
    """The findings grouped by severity (most severe first), each with its message, fix
    and snippet (a snippet shared by several printed once, then pointed at)."""
    order = sorted(findings, key=lambda f: -f.severity)  # stable within a severity
    shared = number_snippets(order, shared_only=True)
    uses = Counter(f.fix_snippet for f in order)
    printed: set[str] = set()
    for sev in sorted(Severity, reverse=True):
        group = [f for f in order if f.severity == sev]
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
            if f.fix_snippet and not options.quiet:
                number = shared.get(f.fix_snippet)
                parts += _snippet(f.fix_snippet, number, uses, printed, options.width)
            if options.verbose and f.evidence:
                ev = ", ".join(f"{k}={fmt(v)}" for k, v in f.evidence.items())
                parts.append(Padding(safe(ev, style="dim"), (0, 0, 0, 2)))
            console.print(Group(*parts))


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
                for part in layer_tables(report.layers, self.options.width, self.options.verbose):
                    console.print()
                    console.print(part)
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
        if report.curvature:
            grid.add_row("hessian", safe(_hessian(report.curvature, (batch or {}).get("examples"))))
        return grid

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
        print_findings(console, report.findings, self.options)

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
