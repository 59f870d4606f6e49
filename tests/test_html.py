"""The HTML pages (``scan --format html``, ``nnhealth report --format html``): one file,
nothing fetched at view time, an SVG per plot with its title, the plotted numbers those
of the report; rendered in a real headless Chromium (screenshot checked non-blank, with
ink in every plot and the titles in its DOM), skipped where no browser exists."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line_error, train_history
from torch import nn

import nnhealth
from nnhealth import history, plots
from nnhealth.errors import UsageError
from nnhealth.findings import Finding, Report, Severity
from nnhealth.formatters import get_formatter

pytest.importorskip("matplotlib", reason="the HTML report needs pip install 'nnhealth[html]'")

HISTORY_TITLES = {
    "loss": plots.LOSS,
    "curvature": plots.CURVATURE,
    "dead_fraction": plots.DEAD,
    "saturated_fraction": plots.SATURATED,
    "depth": plots.DEPTH,
}
BLUE = np.array([0x1F, 0x77, 0xB4])  # matplotlib's first line colour: every plot has one
WIDTH = 1000


@pytest.fixture(scope="module")
def hot(tmp_path_factory) -> Path:
    return train_history(tmp_path_factory.mktemp("html") / "hot.jsonl", 3.0, 40)


@pytest.fixture(scope="module")
def history_html(hot: Path, tmp_path_factory) -> Path:
    from nnhealth.cli import main

    out = tmp_path_factory.mktemp("page") / "history.html"
    assert main(["report", str(hot), "--format", "html", "-o", str(out)]) == 1
    return out


class Figures(HTMLParser):
    """Per ``<figure data-plot>``: whether it holds an <svg>, and the text of its
    <text> elements (the plot's title among them)."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, dict] = {}
        self.current: str | None = None
        self.in_text = False
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        attrs = dict(attrs)
        if tag == "figure" and "data-plot" in attrs:
            self.current = attrs["data-plot"]
            self.figures[self.current] = {"svg": 0, "text": []}
        elif tag == "svg" and self.current:
            self.figures[self.current]["svg"] += 1
        self.in_text = tag == "text"

    def handle_endtag(self, tag):
        if tag == "figure":
            self.current = None
        self.in_text = False

    def handle_data(self, data):
        if self.in_text and self.current:
            self.figures[self.current]["text"].append(data)


def figures(page: str) -> dict[str, dict]:
    parser = Figures()
    parser.feed(page)
    return parser.figures


def assert_self_contained(page: str) -> None:
    """Nothing the browser would fetch: every src/href and url() points inside the page
    (#id, the SVG's clip paths and markers); no script, stylesheet link, frame, image or
    @import."""
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"https?://[^\s\"']*\.(?:js|css|woff2?|ttf|png|svg)", page)
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]*)""", page, re.IGNORECASE)
    refs += re.findall(r"""url\(\s*["']?([^"')\s]*)""", page, re.IGNORECASE)
    assert refs and all(r.startswith("#") for r in refs), sorted(set(refs))[:5]
    for banned in ("<script", "<link", "<iframe", "<img", "<object", "<embed", "@import"):
        assert banned not in page.lower(), banned


# ---- the history page -----------------------------------------------------------------


def test_history_page_is_self_contained_with_a_titled_svg_per_plot(history_html: Path) -> None:
    page = history_html.read_text(encoding="utf-8")
    assert_self_contained(page)
    found = figures(page)
    assert set(found) == set(HISTORY_TITLES)
    for key, title in HISTORY_TITLES.items():
        assert found[key]["svg"] == 1, key
        assert any(t.startswith(title) for t in found[key]["text"]), (key, found[key]["text"])
    assert page.count("<svg") == len(HISTORY_TITLES)


def test_history_page_shows_the_verdicts(hot: Path, history_html: Path) -> None:
    import html

    page = history_html.read_text(encoding="utf-8")
    lines = history.read(hot)
    for f in history.verdicts(lines):
        assert html.escape(f.message, quote=True) in page
        assert html.escape(f.fix, quote=True) in page
    for d in lines[-1]["findings"]:
        assert html.escape(d["message"], quote=True) in page


def test_the_stability_limit_plotted_is_2_over_lr(hot: Path) -> None:
    lines = history.read(hot)
    points = plots.curvature_points(lines)
    assert [p[0] for p in points] == [ln["step"] for ln in lines if ln.get("curvature")]
    for (_, lam, edge), line in zip(points, lines, strict=True):
        assert lam == line["curvature"]["lambda_max"]
        assert edge == pytest.approx(2.0 / line["lr"], rel=1e-9)  # SGD: lr meets 2/λmax


def path_points(svg: str, colour: str) -> list[tuple[float, float]]:
    """The vertices of the longest polyline stroked in ``colour``."""
    best: list[tuple[float, float]] = []
    for match in re.finditer(r'<path d="([^"]+)"[^>]*?stroke: ' + colour, svg, re.DOTALL):
        nums = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", match.group(1))]
        pts = list(zip(nums[0::2], nums[1::2], strict=True))
        best = max(best, pts, key=len)
    return best


def scanned(seed: int = 0) -> tuple[Report, nn.Module]:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    with torch.no_grad():
        model[2].bias.fill_(-50.0)  # every unit of the ReLU after it dead: NH101 error
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    return nnhealth.scan(model, (x, y)), model


def test_scan_page_plots_the_report_numbers() -> None:
    report, _ = scanned()
    page = get_formatter("html").render(report)
    assert_self_contained(page)
    found = figures(page)
    assert list(found) == ["depth"] and found["depth"]["svg"] == 1
    assert plots.DEPTH in found["depth"]["text"]
    svg = page[page.index("<svg") : page.index("</svg>")]
    shown = [i for i, r in enumerate(report.layers) if r["act_var"] > 0]
    assert len(shown) == len(report.layers) - 1  # the dead ReLU's variance is 0
    pts = path_points(svg, "#1f77b4")  # the activation variance line, broken at the 0
    assert len(pts) == len(shown)
    xs, ys = np.array(pts).T
    step, start = np.polyfit(shown, xs, 1)  # layer i at x = start + i * step
    assert step > 0 and np.abs(start + step * np.array(shown) - xs).max() < 0.05
    logs = np.log10([report.layers[i]["act_var"] for i in shown])
    slope, intercept = np.polyfit(logs, ys, 1)  # SVG y is affine in log10(variance)
    assert slope < 0  # higher variance, higher on the page
    assert np.abs(slope * logs + intercept - ys).max() < 0.05  # within 0.05 pt
    assert "zero variance (no signal)" in found["depth"]["text"]
    # the findings and the layer table
    assert "NH101" in page and "dead-relu" in page
    import html

    for f in report.findings:
        assert html.escape(f.message, quote=True) in page
        if f.fix_snippet:  # code to paste: its lines kept, in a <pre>
            assert f"<pre>{html.escape(f.fix_snippet, quote=True)}</pre>" in page
    assert any(f.fix_snippet and "\n" in f.fix_snippet for f in report.findings)
    table = page[page.index("Layers (forward order)") :]
    for r in report.layers:
        assert f"<code>{r['name']}</code>" in table


def test_scan_format_html_from_the_cli(cli, tmp_path: Path) -> None:
    _, model = scanned()
    path = tmp_path / "m.pt"
    torch.save(model, path)
    out = tmp_path / "r.html"
    res = cli("scan", path, "--input-shape", "64x8", "--format", "html", "-o", out)
    assert res.code == 1, res.err
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page)
    assert figures(page)["depth"]["svg"] == 1 and "NH101" in page


def test_hostile_names_are_escaped_text() -> None:
    names = ("<script>alert(1)</script>", "$\\frac{a}{b}$", "a\x1b[2Jb")
    report = Report(
        run={"model": "<b>m</b>.pt", "checks": ["NH101"]},
        layers=tuple(
            {"name": n, "kind": "Linear", "role": "layer", "act_var": 2.0**i, "grad_var": 1e-3}
            for i, n in enumerate(names)
        ),
        findings=(
            Finding("NH101", "dead-relu", Severity.ERROR, names[0], f"dead in {names[0]}", {}, "x"),
        ),
    )
    page = get_formatter("html").render(report)
    assert "<script" not in page and "<b>m</b>" not in page and "\x1b" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    labels = figures(page)["depth"]["text"]
    assert "$\\frac{a}{b}$" in labels  # the name as it is, not typeset as math
    assert "a\\x1b[2Jb" in labels


def test_missing_matplotlib_is_one_line_naming_the_extra(
    cli, hot: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    line = one_line_error(cli("report", hot, "--format", "html"))
    assert "pip install 'nnhealth[html]'" in line
    with pytest.raises(UsageError, match=re.escape("pip install 'nnhealth[html]'")):
        get_formatter("html").render(scanned()[0])
    assert cli("report", hot, "--format", "json", "--fail-on", "never").code == 0


def test_the_users_matplotlib_state_is_left_alone(hot: Path) -> None:
    """No pyplot, no backend chosen; rcParams as the user set them, which the page's
    figures do not follow (text stays text, default line widths)."""
    code = """
import matplotlib
matplotlib.rcParams["svg.fonttype"] = "path"
matplotlib.rcParams["lines.linewidth"] = 9.0
def params():  # reading "backend" would resolve it (importing pyplot): every other key
    return {k: matplotlib.rcParams[k] for k in matplotlib.rcParams if k != "backend"}
before = params()
from nnhealth import history
from nnhealth.formatters.html import history_page
lines = history.read(__import__("pathlib").Path(HISTORY))
page = history_page("h", lines, history.verdicts(lines))
import sys
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
assert params() == before, "rcParams changed"
assert "<text" in page and "stroke-width: 9" not in page
print("ok")
""".replace("HISTORY", repr(str(hot)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ---- in a real browser --------------------------------------------------------------------


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(
        "no headless Chromium to render the HTML report in: apt-get install chromium "
        "(Debian/Ubuntu) to run this test"
    )


def run_browser(exe: str, tmp: Path, height: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",  # root in CI containers
        "--disable-gpu",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--user-data-dir={tmp / 'profile'}",
        f"--window-size={WIDTH},{height}",
        *args,
    ]
    env = {**os.environ, "HOME": str(tmp)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


PROBE = """<script>
document.addEventListener("DOMContentLoaded", () => {
  const out = {height: document.documentElement.scrollHeight, plots: {}};
  for (const f of document.querySelectorAll("figure[data-plot]")) {
    const r = f.querySelector("svg").getBoundingClientRect();
    out.plots[f.dataset.plot] = [r.left, r.top, r.width, r.height];
  }
  const pre = document.createElement("pre");
  pre.id = "layout";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def test_history_page_in_headless_chromium(history_html: Path, tmp_path: Path) -> None:
    from PIL import Image

    exe = chromium()
    page = history_html.read_text(encoding="utf-8")
    # the layout, read by a probe added to a copy of the page, and the DOM the browser built
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = run_browser(exe, tmp_path, 800, "--dump-dom", probe.as_uri()).stdout
    layout = json.loads(re.search(r'<pre id="layout">(.*?)</pre>', dom, re.DOTALL).group(1))
    in_dom = figures(dom)
    for key, title in HISTORY_TITLES.items():
        assert in_dom[key]["svg"] == 1 and any(t.startswith(title) for t in in_dom[key]["text"])
    assert set(layout["plots"]) == set(HISTORY_TITLES)
    # the page itself (no probe) as the browser draws it, whole
    height = math.ceil(layout["height"])
    shot = tmp_path / "history.png"
    run_browser(exe, tmp_path, height, f"--screenshot={shot}", history_html.as_uri())
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert image.shape == (height, WIDTH, 3)
    assert image.std() > 20  # not blank
    for key, (left, top, width, tall) in layout["plots"].items():
        assert width > 300 and tall > 100, key
        region = image[int(top) : int(top + tall), int(left) : int(left + width)]
        ink = (region < 200).any(axis=2).mean()  # axes, ticks, labels, lines
        blue = (np.abs(region - BLUE).max(axis=2) < 40).sum()  # the plotted data
        assert 0.01 < ink < 0.5, (key, ink)
        assert blue > 50, (key, blue)


def test_the_page_is_the_same_on_every_run(hot: Path, history_html: Path) -> None:
    """SVG ids come from each plot's name (no random salt, no date): a page can be
    compared or committed."""
    from nnhealth.formatters.html import history_page

    lines = history.read(hot)
    page = history_page(str(hot), lines, history.verdicts(lines))
    assert page == history_html.read_text(encoding="utf-8")
    ids = re.findall(r'\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids))  # unique across the page's five SVGs
    refs = set(re.findall(r'(?:url\(#|href="#)([^)"]+)', page))
    assert refs and refs <= set(ids)  # clip paths and markers: each points at its own
