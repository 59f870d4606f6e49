"""``nnhealth report HISTORY.jsonl``: a training history read back (history.py) as
trends in the terminal, as JSON, and the digest the HTML page shares.

The verdicts are the checks over time (``history.verdicts``) and the findings of the
latest capture step (the model as it is now); both count for the exit code.

Sparklines are eight Unicode blocks, one cell per capture step (or per run of steps
when there are more steps than room: the mean of each run, in the plotted scale).
Variances and relative updates are drawn on a log scale, fractions on [0, 1]. A tiny
mapping rather than a dependency: the ``sparklines`` package scales linearly on the
series' own range, so log scales and the fixed [0, 1] of a fraction would be computed
here anyway, and it brings termcolor along for nothing this view uses. No torch here.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from nnhealth.findings import Finding, Severity, json_clean
from nnhealth.formatters.base import RenderOptions, visible
from nnhealth.formatters.text import STYLE, fmt, name_width, print_findings, shorten_names

BLOCKS = "▁▂▃▄▅▆▇█"
NO_VALUE = "·"  # a step where the statistic was not recorded (or not finite)
NUMBER = 9  # cells of a first/last column
GAP = 2


@dataclass(frozen=True)
class Stat:
    key: str
    label: str
    log: bool
    fixed: tuple[float, float] | None = None  # the scale's range when not the series'

    def number(self, value: float | None) -> str:
        if value is None:
            return ""
        return f"{100 * value:.0f}%" if self.fixed == (0.0, 1.0) else fmt(value)


STATS = (
    Stat("act_var", "act var", log=True),
    Stat("grad_var", "grad var", log=True),
    Stat("dead_fraction", "dead", log=False, fixed=(0.0, 1.0)),
    Stat("saturated_fraction", "saturated", log=False, fixed=(0.0, 1.0)),
    Stat("relative_update", "update", log=True),
)


# ---- sparklines ---------------------------------------------------------------------------


def _scaled(value: Any, log: bool) -> float | None:
    """``value`` in the plotted scale: None when missing or not finite; a value <= 0 on a
    log scale is -inf (drawn as the lowest block)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if log:
        return math.log10(value) if value > 0 else -math.inf
    return float(value)


def binned(values: Sequence[float | None], width: int) -> list[float | None]:
    """``values`` in at most ``width`` cells: contiguous runs of near-equal length, each
    the mean of its known values (None when it has none)."""
    n = len(values)
    if n <= width:
        return list(values)
    out: list[float | None] = []
    for i in range(width):
        run = [v for v in values[i * n // width : (i + 1) * n // width] if v is not None]
        out.append(sum(run) / len(run) if run else None)
    return out


def sparkline(
    values: Sequence[Any],
    width: int,
    *,
    log: bool = False,
    fixed: tuple[float, float] | None = None,
) -> str:
    """``values`` as blocks: the lowest block at the minimum of the series (or of
    ``fixed``), the highest at its maximum; NO_VALUE where a value is missing. A series
    that does not change is drawn at mid height (at its place when ``fixed``)."""
    cells = binned([_scaled(v, log) for v in values], max(width, 1))
    known = [c for c in cells if c is not None and math.isfinite(c)]
    if fixed is not None:
        lo, hi = (_scaled(b, log) for b in fixed)
    elif known:
        lo, hi = min(known), max(known)
    else:
        lo = hi = 0.0
    out = []
    for c in cells:
        if c is None:
            out.append(NO_VALUE)
        elif hi <= lo:
            out.append(BLOCKS[len(BLOCKS) // 2 - 1])
        else:
            frac = (min(max(c, lo), hi) - lo) / (hi - lo)
            out.append(BLOCKS[round(frac * (len(BLOCKS) - 1))])
    return "".join(out)


# ---- the digest ---------------------------------------------------------------------------


def capture_lines(lines: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines of capture steps (those with per-layer statistics), in step order."""
    return sorted((ln for ln in lines if "layers" in ln), key=lambda ln: ln["step"])


def _finding(d: Any) -> Finding | None:
    if not isinstance(d, dict):
        return None
    try:
        severity = Severity.parse(d.get("severity", ""))
    except ValueError:
        return None
    return Finding(
        code=str(d.get("code", "")),
        check=str(d.get("check", "")),
        severity=severity,
        layer=d.get("layer") if isinstance(d.get("layer"), str) else None,
        message=str(d.get("message", "")),
        evidence={},
        fix=str(d.get("fix", "")),
    )


def latest(lines: Sequence[dict[str, Any]]) -> tuple[int | None, list[Finding]]:
    """The latest capture step and the findings recorded at it."""
    captured = capture_lines(lines)
    if not captured:
        return None, []
    last = captured[-1]
    found = [_finding(d) for d in last.get("findings") or ()]
    return last["step"], [f for f in found if f is not None]


def gating(verdicts: Sequence[Finding], now: Sequence[Finding]) -> list[Finding]:
    """What the exit code and the summary count: the verdicts over time, then the
    findings of the latest capture step."""
    return [*verdicts, *now]


def _loss(line: dict[str, Any]) -> float | None:
    value = line.get("loss")
    return None if _scaled(value, False) is None else float(value)


def summary(lines: Sequence[dict[str, Any]], verdicts: Sequence[Finding]) -> dict[str, Any]:
    """Counts and the run's span: steps, capture steps, loss first and last."""
    ordered = sorted(lines, key=lambda ln: ln["step"])
    step, now = latest(lines)
    counted = gating(verdicts, now)
    counts = {s.label: 0 for s in sorted(Severity, reverse=True)}
    for f in counted:
        counts[f.severity.label] += 1
    losses = [(ln["step"], _loss(ln)) for ln in ordered if _loss(ln) is not None]
    return {
        "lines": len(ordered),
        "capture_steps": len(capture_lines(lines)),
        "first_step": ordered[0]["step"],
        "last_step": ordered[-1]["step"],
        "latest_capture_step": step,
        "loss_first": losses[0][1] if losses else None,
        "loss_last": losses[-1][1] if losses else None,
        "nonfinite_steps": [ln["step"] for ln in ordered if ln.get("nonfinite")],
        **counts,
        "healthy": not counted,
    }


def _step(line: dict[str, Any]) -> dict[str, Any]:
    keys = ("step", "epoch", "time", "loss", "lr", "optimizer", "curvature", "nonfinite")
    out = {k: line.get(k) for k in keys}
    out["findings"] = list(line.get("findings") or ())
    return out


def to_json(lines: Sequence[dict[str, Any]], verdicts: Sequence[Finding]) -> str:
    """The report as JSON: every line's step without its layers, the verdicts over time
    and the latest capture step's findings as finding dicts, the summary."""
    from nnhealth.history import SCHEMA

    step, now = latest(lines)
    doc = {
        "schema": SCHEMA,
        "steps": [_step(ln) for ln in sorted(lines, key=lambda ln: ln["step"])],
        "verdicts": [f.to_dict() for f in verdicts],
        "latest": {"step": step, "findings": [f.to_dict() for f in now]},
        "summary": summary(lines, verdicts),
    }
    return json.dumps(json_clean(doc), indent=2, allow_nan=False) + "\n"


# ---- the terminal view --------------------------------------------------------------------


def render_text(
    source: str,
    lines: Sequence[dict[str, Any]],
    verdicts: Sequence[Finding],
    options: RenderOptions,
) -> str:
    """The trends (rich text, ``options.width`` cells wide), the verdicts over time, the
    findings of the latest capture step and a one-line verdict."""
    buf = io.StringIO()
    console = Console(
        file=buf,
        width=options.width,
        force_terminal=options.color,
        color_system="auto" if options.color else None,
        highlight=False,
        soft_wrap=False,
    )
    captured = capture_lines(lines)
    if not options.quiet:
        console.print(_header(source, lines, captured, options.width))
        if captured:
            console.print()
            console.print(
                Text(
                    f"Per layer over {len(captured)} capture steps "
                    "(variances and updates on a log scale)",
                    style="bold",
                )
            )
            console.print(_layer_table(captured, options.width))
    step, now = latest(lines)
    if verdicts:
        console.print()
        console.print(Text("Over time", style="bold"))
        print_findings(console, verdicts, options)
    if now:
        console.print()
        console.print(Text(f"At the latest capture step ({step})", style="bold"))
        print_findings(console, now, options)
    console.print(_verdict(summary(lines, verdicts)))
    return "".join(line.rstrip() + "\n" for line in buf.getvalue().splitlines())


def _header(source: str, lines: Sequence[dict[str, Any]], captured: list[dict], width: int):
    ordered = sorted(lines, key=lambda ln: ln["step"])
    grid = Table.grid(padding=(0, 2))
    grid.title = Text(f"nnhealth history: {visible(source)}", style="bold")
    grid.title_justify = "left"
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    room = max(8, min(40, width // 3))
    nonfinite = sum(1 for ln in ordered if ln.get("nonfinite"))
    grid.add_row(
        "steps",
        Text(
            f"{ordered[0]['step']} → {ordered[-1]['step']}: {len(captured)} capture steps"
            + (f", {nonfinite} non-finite loss between them" if nonfinite else "")
        ),
    )
    losses = [_loss(ln) for ln in captured]
    known = [v for v in losses if v is not None]
    if known:
        spark = sparkline(losses, room)
        grid.add_row("loss", Text(f"{spark}  {fmt(known[0])} → {fmt(known[-1])}"))
    last = ordered[-1] if not captured else captured[-1]
    if last.get("lr") is not None:
        grid.add_row("lr", Text(visible(f"{fmt(last['lr'])} ({last.get('optimizer') or '?'})")))
    for label, text in _curvature_rows(captured, room):
        grid.add_row(label, Text(text))
    return grid


def _curvature_rows(captured: list[dict[str, Any]], room: int) -> list[tuple[str, str]]:
    """λmax over the steps that measured it, and lr / limit with its worst step."""
    measured = [
        (ln["step"], ln["curvature"])
        for ln in captured
        if isinstance(ln.get("curvature"), dict)
        and _scaled(ln["curvature"].get("lambda_max"), False) is not None
    ]
    if not measured:
        return []
    lams = [c["lambda_max"] for _, c in measured]
    span = f"at {len(measured)} steps, {measured[0][0]} → {measured[-1][0]}"
    rows = [("λmax", f"{sparkline(lams, room)}  {fmt(lams[0])} → {fmt(lams[-1])} ({span})")]
    ratios = [
        (s, c.get("ratio")) for s, c in measured if _scaled(c.get("ratio"), False) is not None
    ]
    if ratios:
        values = [r for _, r in ratios]
        worst_step, worst = max(ratios, key=lambda sr: sr[1])
        reached = next((s for s, r in ratios if r >= 1.0), None)
        tail = f"; reached 1 at step {reached}" if reached is not None else "; below 1 throughout"
        spark = sparkline(values, room, fixed=(0.0, max(1.0, worst)))
        text = f"{fmt(values[0])} → {fmt(values[-1])}, max {fmt(worst)} at step {worst_step}"
        rows.append(("lr / limit", f"{spark}  {text}{tail}"))
    return rows


def _layer_rows(captured: list[dict[str, Any]]) -> list[tuple[str, Stat, list[Any]]]:
    """(layer, statistic, its value at each capture step) for every statistic a layer
    has at some step, layers in order of first appearance."""
    names: dict[str, None] = {}
    table: dict[str, list[dict[str, Any]]] = {}
    for index, line in enumerate(captured):
        for row in line.get("layers") or ():
            if not isinstance(row, dict):
                continue
            name = str(row.get("name"))
            names.setdefault(name)
            table.setdefault(name, [{} for _ in captured])[index] = row
    out = []
    for name in names:
        for stat in STATS:
            values = [row.get(stat.key) for row in table[name]]
            if any(_scaled(v, False) is not None for v in values):
                out.append((name, stat, values))
    return out


def _layer_table(captured: list[dict[str, Any]], width: int) -> Table:
    rows = _layer_rows(captured)
    names = [visible(n) or "(model)" for n, _, _ in rows]
    unique = list(dict.fromkeys(names)) or ["-"]
    stat_w = max(len(s.label) for s in STATS)
    fixed = stat_w + 2 * NUMBER + 4 * GAP
    spark_w = max(4, min(len(captured), (width - fixed) // 2))
    name_w = name_width(unique, width - fixed - spark_w)
    short = dict(zip(unique, shorten_names(unique, name_w) or unique, strict=True))
    table = Table(
        box=None,
        header_style="bold",
        pad_edge=False,
        padding=(0, 1),
    )
    table.add_column("layer", width=max(name_w, len("layer")), no_wrap=True, overflow="fold")
    table.add_column("statistic", width=stat_w, no_wrap=True)
    table.add_column("trend", width=spark_w, no_wrap=True)
    table.add_column("first", justify="right", width=NUMBER, overflow="fold")
    table.add_column("last", justify="right", width=NUMBER, overflow="fold")
    previous = None
    for name, (_, stat, values) in zip(names, rows, strict=True):
        known = [v for v in values if _scaled(v, False) is not None]
        table.add_row(
            Text(short[name] if name != previous else ""),
            Text(stat.label),
            Text(sparkline(values, spark_w, log=stat.log, fixed=stat.fixed)),
            Text(stat.number(known[0])),
            Text(stat.number(known[-1])),
        )
        previous = name
    return table


def _verdict(s: dict[str, Any]) -> Text:
    where = f"over {s['capture_steps']} capture steps"
    if s["healthy"]:
        return Text(f"\n✓ healthy: no verdicts {where}", style="bold green")
    plural = {"error": "errors", "warning": "warnings", "info": "info"}
    counts = [(k, s[k]) for k in ("error", "warning", "info") if s[k]]
    text = ", ".join(f"{n} {k if n == 1 else plural[k]}" for k, n in counts)
    worst = Severity.parse(counts[0][0])
    mark = "✗" if worst == Severity.ERROR else "!"
    return Text(f"\n{mark} {text} {where}", style=STYLE[worst])
