"""The plots of the HTML pages (``scan --format html``, ``nnhealth report --format html``)
as inline SVG, drawn by matplotlib (the optional extra ``html``).

matplotlib is imported here only, when a plot is drawn. Figures are built with
``matplotlib.figure.Figure`` and its SVG canvas, never pyplot: no backend is chosen, no
figure is registered, and the user's rcParams are left as they were (the figures are
drawn under matplotlib's default style inside ``rc_context``, which restores them).
Text stays text in the SVG (``svg.fonttype: none``): the titles can be found in the page
and the browser draws them with its own fonts; nothing is fetched at view time.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from nnhealth.errors import UsageError
from nnhealth.formatters.base import visible

INSTALL = "pip install 'nnhealth[html]'"
SIZE = (7.5, 3.4)  # inches: 720 x 326 px at the page's 96 px per inch
MOST_LINES = 12  # layers drawn over steps; beyond it, those that end highest
MOST_TICKS = 40  # layer names under the depth plot; beyond it, every k-th
NAME_CHARS = 28  # a tick label's longest name (cut from the left, where names differ)

# the plots' titles (the page and its tests find them by these)
DEPTH = "Activation and gradient variance through depth"
DEAD = "Dead fraction per layer over steps"
SATURATED = "Saturated fraction per layer over steps"
CURVATURE = "λmax against the stability limit over steps"
LOSS = "Loss over steps"


@dataclass(frozen=True)
class Plot:
    """One plot of a page: a name for it, its title, and its SVG or why there is none."""

    key: str
    title: str
    svg: str | None
    note: str = ""


def _matplotlib() -> Any:
    try:
        import matplotlib
        import matplotlib.style
        from matplotlib.backends.backend_svg import FigureCanvasSVG  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            f"the HTML report needs matplotlib, which is not installed ({exc.name or exc}); "
            f"install it with: {INSTALL}"
        ) from None
    return matplotlib


def require() -> None:
    """UsageError naming the extra to install when matplotlib is missing."""
    _matplotlib()


# an id, or a reference to one, in matplotlib's SVG
_ID = re.compile(r'(\sid="|url\(#|href="#)')


def _svg(fig: Any, key: str) -> str:
    """The figure as an SVG element for an HTML page (no XML prolog, no DOCTYPE). Its ids
    and the references to them are prefixed with ``key``: unique among the page's plots
    (matplotlib numbers ``figure_1``, ``axes_1`` ... alike in every figure) and the same
    on every run (no random salt, no date)."""
    matplotlib = _matplotlib()
    buf = io.StringIO()
    rc = {"svg.fonttype": "none", "svg.hashsalt": key}
    with matplotlib.rc_context(rc):
        fig.savefig(
            buf, format="svg", metadata=dict.fromkeys(("Creator", "Date", "Format", "Type"))
        )
    text = buf.getvalue()
    return _ID.sub(lambda m: f"{m.group(1)}{key}-", text[text.index("<svg") :].strip())


def _draw(salt: str, title: str, draw: Any, *args: Any) -> Plot:
    """``draw(ax, *args)`` on a new figure under matplotlib's default style."""
    matplotlib = _matplotlib()
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    with matplotlib.style.context("default"):
        fig = Figure(figsize=SIZE, layout="constrained")
        FigureCanvasSVG(fig)
        ax = fig.add_subplot()
        ax.set_title(title)
        draw(ax, *args)
        ax.grid(True, which="major", alpha=0.3)
        return Plot(salt, title, _svg(fig, salt))


def _finite(value: Any, positive: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value > 0 if positive else True


def _short(name: Any) -> str:
    """A layer name for a label: cut from the left, ``$`` escaped (no mathtext)."""
    name = visible(name) or "(model)"
    name = name if len(name) <= NAME_CHARS else "…" + name[-(NAME_CHARS - 1) :]
    return name.replace("$", r"\$")


# ---- through depth (a scan, or a history's latest capture step) -------------------------


def depth(rows: Sequence[dict[str, Any]], *, step: int | None = None) -> Plot:
    """Activation and gradient variance of each layer in forward order, log scale."""
    title = DEPTH if step is None else f"{DEPTH} (step {step})"
    drawn = [r for r in rows if _finite(r.get("act_var"), True) or _finite(r.get("grad_var"), True)]
    if not drawn:
        why = "no layer has a positive activation or gradient variance"
        return Plot("depth", title, None, why)
    return _draw("depth", title, _draw_depth, drawn)


def _draw_depth(ax: Any, rows: list[dict[str, Any]]) -> None:
    zero_label = "zero variance (no signal)"
    for key, label, marker in (("act_var", "activation", "o"), ("grad_var", "gradient", "s")):
        # a value <= 0 or missing breaks the line; zeros are marked at the bottom
        ys = [r[key] if _finite(r.get(key), True) else math.nan for r in rows]
        ax.plot(
            range(len(rows)),
            ys,
            marker=marker,
            markersize=3,
            linewidth=1.2,
            label=f"{label} variance",
        )
        zeros = [i for i, r in enumerate(rows) if r.get(key) == 0]
        if zeros:
            ax.plot(
                zeros,
                [0.02] * len(zeros),
                "v",
                color="tab:red",
                markersize=6,
                transform=ax.get_xaxis_transform(),
                label=zero_label,
            )
            zero_label = None
    ax.set_yscale("log")
    every = max(1, math.ceil(len(rows) / MOST_TICKS))
    ticks = list(range(0, len(rows), every))
    labels = [_short(rows[i]["name"]) for i in ticks]
    slanted = max(map(len, labels)) > 3
    ax.set_xticks(ticks, labels, rotation=60 if slanted else 0, ha="right" if slanted else "center")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("variance")
    ax.legend(fontsize=8)


# ---- over steps (a history) -------------------------------------------------------------


def layer_series(lines: Iterable[dict[str, Any]], key: str) -> dict[str, list[tuple[int, float]]]:
    """Per layer, in order of first appearance, the (step, value) of ``key`` at each line
    where it is a finite number."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        for row in line.get("layers") or ():
            if isinstance(row, dict) and _finite(row.get(key)):
                out.setdefault(str(row.get("name")), []).append((line["step"], float(row[key])))
    return out


def fraction(lines: Sequence[dict[str, Any]], key: str, title: str) -> Plot:
    """A fraction (dead, saturated) of each layer over the steps, on [0, 1]."""
    series = layer_series(lines, key)
    if not series:
        what = "ReLU-family" if key == "dead_fraction" else "saturating (sigmoid/tanh)"
        return Plot(key, title, None, f"no {what} nonlinearity recorded in the history")
    shown = sorted(series, key=lambda name: -series[name][-1][1])[:MOST_LINES]
    note = (
        f"the {MOST_LINES} of {len(series)} layers that end highest"
        if len(series) > MOST_LINES
        else ""
    )
    plot = _draw(key, title, _draw_fraction, {n: series[n] for n in series if n in shown})
    return Plot(key, plot.title, plot.svg, note)


def _draw_fraction(ax: Any, series: dict[str, list[tuple[int, float]]]) -> None:
    from matplotlib.ticker import PercentFormatter

    for name, points in series.items():
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=_short(name))
    ax.set_ylim(-0.02, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("step")
    ax.legend(fontsize=7, ncols=2 if len(series) > 6 else 1, loc="upper left")


def curvature_points(lines: Iterable[dict[str, Any]]) -> list[tuple[int, float, float | None]]:
    """(step, lambda_max, the lambda_max at which the lr meets its limit) at each line
    that measured it; the last is lambda_max / (lr / limit): 2/lr for SGD."""
    out = []
    for line in lines:
        c = line.get("curvature")
        if not isinstance(c, dict) or not _finite(c.get("lambda_max")):
            continue
        ratio = c.get("ratio")
        edge = c["lambda_max"] / ratio if _finite(ratio, True) else None
        out.append((line["step"], float(c["lambda_max"]), edge))
    return out


def curvature(lines: Sequence[dict[str, Any]]) -> Plot:
    points = curvature_points(lines)
    if not points:
        why = "no step measured λmax (Monitor's hessian_every)"
        return Plot("curvature", CURVATURE, None, why)
    return _draw("curvature", CURVATURE, _draw_curvature, points)


def _draw_curvature(ax: Any, points: list[tuple[int, float, float | None]]) -> None:
    steps = [p[0] for p in points]
    ax.plot(steps, [p[1] for p in points], marker="o", markersize=4, label="λmax")
    edges = [(s, e) for s, _, e in points if e is not None]
    if edges:
        xs, ys = zip(*edges, strict=True)
        label = "limit: the λmax where lr meets it (2/lr for SGD)"
        ax.plot(xs, ys, "--", color="tab:red", label=label)
        crossed = next((s for s, lam, e in points if e is not None and lam >= e), None)
        if crossed is not None:
            ax.axvline(crossed, color="tab:red", alpha=0.4, linewidth=1)
            ax.annotate(
                f"reached at step {crossed}",
                (crossed, ax.get_ylim()[1]),
                fontsize=8,
                xytext=(4, -12),
                textcoords="offset points",
                color="tab:red",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("λmax")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncols=2)


def loss(lines: Sequence[dict[str, Any]]) -> Plot:
    points = [(line["step"], float(line["loss"])) for line in lines if _finite(line.get("loss"))]
    bad = [line["step"] for line in lines if line.get("nonfinite") or line.get("loss") is None]
    if not points and not bad:
        return Plot("loss", LOSS, None, "no loss recorded")
    return _draw("loss", LOSS, _draw_loss, points, bad)


def _draw_loss(ax: Any, points: list[tuple[int, float]], bad: list[int]) -> None:
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label="loss")
    for i, step in enumerate(bad):
        label = "non-finite loss" if i == 0 else None
        ax.axvline(step, color="tab:red", linestyle=":", linewidth=1.5, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=8)
