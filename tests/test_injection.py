"""Reports cannot be injected: layer and module names, kinds, paths and the messages that
embed them come from the scanned file (a stranger's checkpoint), and every format shows
them as data, never as terminal escapes, markup, XML, HTML, table rows or workflow
commands. Hand-built reports for every format, then one end-to-end scan of a checkpoint
whose module names are hostile."""

from __future__ import annotations

import dataclasses
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest
from junitparser import Failure, JUnitXml

from nnhealth.findings import AnalyzerError, Finding, Report, Severity, Skipped
from nnhealth.formatters import Format, RenderOptions, get_formatter
from nnhealth.formatters.base import visible
from nnhealth.formatters.github import escape_data, escape_property

SCHEMA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sarif-schema-2.1.0.json"

# each a valid nn.Module name (a non-empty str without '.'), each an attack on some format
HOSTILE = (
    "\x1b]8;;http://evil\x07click\x1b]8;;\x07",  # OSC 8 hyperlink
    "\x1b[2J",  # clear screen
    "</failure><testcase name='x'>",
    "a|b\n| --- |",
    "<script>alert(1)</script>",
    "[bold red]x[/]",  # rich markup
    "\r::error::pwned",
    "%0A::add-mask::x",
    "\x00",
    "\ud800",  # a lone surrogate: pickle (and so torch.save) keeps it
    "\x9b31mcsi",  # C1 CSI
    "\u202eevil\u202c",  # bidi override
    "\u2066iso\u2069",  # bidi isolate
    "back\bspace\x7fdel",
    "`tick``s`",
    "a\\|b",
    "![img](http://evil) [l](javascript:x) *em* $x$ &amp; :smile:",
    "line\u2028sep\x85nel",
    "\ufffe\uffff",
    "tab\there\x0bvt\x0cff",
)
ORDINARY = ("features.3", "encoder.layers.0:relu", "block.relu#2")
CODES = ("NH101", "NH102", "NH201", "NH301", "NH501", "NH601")


def hostile_report(names: tuple[str, ...] = HOSTILE) -> Report:
    """Hostile strings in every place a report carries text from the scanned file."""
    layers = tuple(
        {
            "name": name,
            "module": name,
            "kind": f"Kind{name}",
            "role": "layer",
            "units": 4,
            "act_var": 1.0,
            "grad_var": 1e-3,
            "dead_fraction": 0.5,
            "weight_norm": 1.0,
            "trust_ratio": 2.0,
        }
        for name in names
    )
    findings = tuple(
        Finding(
            CODES[i % len(CODES)],
            "dead-relu",
            (Severity.ERROR, Severity.WARNING, Severity.INFO)[i % 3],
            name,
            f"50% of units dead in {name}",
            {"units": 4, "name": name},
            f"re-initialize {name}",
            f'layer = model.get_submodule("{name}")\nnn.init.zeros_(layer.bias)',
            kind=name,
        )
        for i, name in enumerate(names)
    )
    joined = "".join(names)
    return Report(
        run={
            "model": f"models/{joined}.pt",
            "model_format": f"torch.save module ({names[0]})",
            "model_class": f"Net{joined}",
            "batch": {"source": f"batch{joined}.pt", "shape": [8, 4]},
            "loss": "cross-entropy",
            "loss_value": 1.0,
            "mode": "train",
            "device": "cpu",
            "seed": 0,
            "seconds": 0.1,
            "params": 10,
            "checks": [*CODES, "NH202"],
        },
        layers=layers,
        findings=findings,
        errors=tuple(AnalyzerError(f"sym{name}", f"boom {name}") for name in names[:3]),
        skipped=(Skipped("NH202", "gradient-variance", f"no gradients at {joined}"),),
        notes=tuple(f"note about {name}" for name in names),
        tool_version="0.1.0",
    )


def with_baseline_and_what_if(report: Report) -> Report:
    keys = [f.key for f in report.findings]
    names = [f.layer for f in report.findings]
    return dataclasses.replace(
        report,
        baseline={
            "file": "base\x1b[2J.json",
            "new": keys,
            "worse": [],
            "unchanged": [],
            "fixed": keys,
        },
        what_if=tuple(
            {
                "check": "NH101",
                "layer": name,
                "before": f"dead {name}",
                "after": f"ok {name}",
                "fix": f"fix {name}",
                "applied": i % 2 == 0,
                "resolved": True,
                "note": f"note {name}",
                "new_findings": [name],
            }
            for i, name in enumerate(names)
        ),
    )


def render(fmt: str, report: Report, **kw) -> str:
    # wide: the long hostile path must not wrap in the text header
    return get_formatter(fmt, RenderOptions(**{"width": 1000, **kw})).render(report)


def unprintable(text: str, allowed: str = "\n") -> list[str]:
    return sorted({c for c in text if not c.isprintable() and c not in allowed})


# ---- the helper ----------------------------------------------------------------------------


def test_visible_keeps_ordinary_names_and_writes_out_the_rest() -> None:
    for name in (*ORDINARY, "C:\\models\\x.pt", "ünïcödé 層 😀", "a b", ""):
        assert visible(name) == name
    assert visible("\x1b[2J") == "\\x1b[2J"
    assert visible("a\r\nb\tc") == "a\\r\\nb\\tc"
    assert visible("a\nb", keep="\n") == "a\nb"
    assert visible("\x9b\x7f\x00") == "\\x9b\\x7f\\x00"
    assert visible("\u202e\u2066\u200b\u2028\xa0") == "\\u202e\\u2066\\u200b\\u2028\\xa0"
    assert visible("\ud800\ufffe") == "\\ud800\\ufffe"
    assert visible("\U000e0001") == "\\U000e0001"  # tag characters too
    assert visible(None) == "None"
    for name in HOSTILE:
        assert not unprintable(visible(name), allowed="")
        assert visible(visible(name)) == visible(name)


# ---- text ----------------------------------------------------------------------------------


def assert_terminal_safe(text: str) -> None:
    assert not unprintable(text), unprintable(text)


@pytest.mark.parametrize("verbose", [False, True])
def test_text_shows_hostile_names_literally(verbose: bool) -> None:
    report = with_baseline_and_what_if(hostile_report())
    text = render("text", report, verbose=verbose)
    assert_terminal_safe(text)
    assert "[bold red]x[/]" in text  # markup printed, not interpreted
    assert ":smile:" in text  # no emoji codes either
    assert "<script>alert(1)</script>" in text
    for name in HOSTILE:
        shown = visible(name)
        assert f"50% of units dead in {shown}" in text  # the message
        assert f"fix: re-initialize {shown}" in text
        assert f"note: note about {shown}" in text
    assert visible(report.run["model"]) in text  # the header
    assert visible(f"Net{''.join(HOSTILE)}") in text
    assert f"analyzer error in {visible('sym' + HOSTILE[0])}: boom" in text
    assert "no gradients at " + visible("".join(HOSTILE)) in text
    assert "base\\x1b[2J.json" in text
    # one line per note: none of the names started a line of its own
    assert sum(line.startswith("note: ") for line in text.splitlines()) == len(HOSTILE)
    assert not any(line.startswith(("::", "| ---")) for line in text.splitlines())


def test_text_in_colour_has_only_rich_own_colour_codes() -> None:
    text = render("text", with_baseline_and_what_if(hostile_report()), color=True, verbose=True)
    assert "\x1b[" in text  # colour is on
    assert_terminal_safe(re.sub(r"\x1b\[[0-9;]*m", "", text))
    assert "\x1b]" not in text and "\x1b[2J" not in text


def test_text_table_and_header_take_no_markup() -> None:
    report = hostile_report(("[red]a[/red]", "[link=http://evil]b[/link]", ":thumbs_up:"))
    text = render("text", report)
    for name in ("[red]a[/red]", "[link=http://evil]b[/link]", ":thumbs_up:"):
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert f"Kind{name}" in line  # table row: name and kind, literally
    colour = render("text", report, color=True)
    assert "\x1b]8" not in colour  # no hyperlink escape from [link=...]


# ---- junit ---------------------------------------------------------------------------------


def test_junit_is_well_formed_whatever_the_names(tmp_path: Path) -> None:
    report = hostile_report()
    xml = render("junit", report, fail_on="info")
    root = ET.fromstring(xml.encode("utf-8"))
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(cases)  # no case injected by a name
    assert int(suite.get("errors")) == len(report.errors)
    names = {c.get("name") for c in cases}
    for f in report.findings:
        assert f"{f.code} dead-relu: {visible(f.layer)}" in names or any(
            n.endswith(f": {visible(f.layer)}") for n in names
        )
    messages = {x.get("message") for x in suite.iter("failure")}
    assert messages == {visible(f.message) for f in report.findings}
    assert not unprintable(xml)
    path = tmp_path / "r.xml"
    path.write_text(xml, encoding="utf-8")
    parsed = next(iter(JUnitXml.fromfile(str(path))))
    failed = [c for c in parsed if any(isinstance(r, Failure) for r in c.result)]
    assert len(failed) == len(report.findings)


# ---- markdown ------------------------------------------------------------------------------


def gfm_cells(row: str) -> list[str]:
    """Split a table row as GitHub's cmark-gfm does: a backslash and an ASCII punctuation
    character are one unit, any other '|' ends a cell."""
    cells, cur, i = [], "", 0
    row = row.strip().removeprefix("|")
    while i < len(row):
        c = row[i]
        if c == "\\" and i + 1 < len(row) and row[i + 1] in r"""!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~""":
            cur += row[i : i + 2]
            i += 2
            continue
        if c == "|":
            cells.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    if cur.strip():
        cells.append(cur)
    return cells


class Cells(HTMLParser):
    """The text of every <td> of rendered HTML, by row, and every tag seen."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[list[str]] = []
        self.tags: set[str] = set()
        self._cell: str | None = None

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.add(tag)
        if tag == "tr":
            self.rows.append([])
        elif tag == "td":
            self._cell = ""

    def handle_endtag(self, tag) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append(self._cell)
            self._cell = None

    def handle_data(self, data) -> None:
        if self._cell is not None:
            self._cell += data


def markdown_html(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable("table").render(text)


def test_markdown_tables_hold_and_no_html_gets_through() -> None:
    report = hostile_report()
    text = render("markdown", report)
    assert "<script" not in text.lower()
    own = {"<details>", "<summary>", "</summary>", "</details>", "<sub>", "</sub>"}
    assert set(re.findall(r"<[^>\n]*>", text)) <= own
    assert not unprintable(text)
    lines = text.splitlines()
    findings = lines[lines.index("| severity | check | layer | finding | fix |") + 2 :]
    findings = findings[: len(report.findings)]
    assert all(len(gfm_cells(row)) == 5 for row in findings), findings
    start = lines.index("| layer | kind | act var | grad var | dead | ‖w‖/‖∇w‖ |") + 2
    layer_rows = lines[start : start + len(report.layers)]
    assert all(len(gfm_cells(row)) == 6 for row in layer_rows), layer_rows
    assert lines[start + len(report.layers)] == ""  # the table ended where it should

    # rendered: the tables have the right shape and each cell shows the name as it is
    parser = Cells()
    parser.feed(markdown_html(text))
    own_tags = {"h3", "p", "strong", "table", "thead", "tbody", "tr", "th", "td", "code"}
    assert parser.tags <= own_tags | {"details", "summary", "sub", "ul", "li"}  # no a, img, em
    body = [r for r in parser.rows if r]
    assert len(body) == len(report.findings) + len(report.layers)
    for row, f in zip(body, report.findings, strict=False):
        assert len(row) == 5
        assert row[2] == visible(f.layer)
        assert row[3] == visible(f.message)
    for row, layer in zip(body[len(report.findings) :], report.layers, strict=True):
        assert len(row) == 6
        assert row[0] == visible(layer["name"]) and row[1] == visible(layer["kind"])


def test_markdown_keeps_ordinary_names_in_code_spans() -> None:
    text = render("markdown", hostile_report(ORDINARY))
    for name in ORDINARY:
        assert f"`{name}`" in text


# ---- github --------------------------------------------------------------------------------


def runner_unescape(text: str, prop: bool) -> str:
    """What the Actions runner does to a command's data / property (ActionCommand.cs)."""
    pairs = [("%0D", "\r"), ("%0A", "\n")] + ([("%3A", ":"), ("%2C", ",")] if prop else [])
    for esc, raw in [*pairs, ("%25", "%")]:
        text = text.replace(esc, raw)
    return text


def runner_parse(line: str) -> tuple[str, dict[str, str], str]:
    """A workflow command line as the runner reads it: ``::cmd k=v,k=v::data``."""
    assert line.startswith("::"), line
    end = line.index("::", 2)
    info, data = line[2:end], line[end + 2 :]
    command, _, props = info.partition(" ")
    parsed = {}
    for prop in filter(None, props.split(",")):
        key, _, value = prop.partition("=")
        parsed[key] = runner_unescape(value, prop=True)
    return command, parsed, runner_unescape(data, prop=False)


def test_toolkit_escaping() -> None:
    assert escape_data("a%b\r\nc:d,e") == "a%25b%0D%0Ac:d,e"
    assert escape_property("a%b\r\nc:d,e") == "a%25b%0D%0Ac%3Ad%2Ce"


def test_github_one_command_per_line() -> None:
    report = hostile_report()
    out = render("github", report)
    lines = out.splitlines()  # every separator a runner or a reader might see
    assert out.endswith("\n") and len(lines) == len(report.findings) + len(report.errors)
    assert not unprintable(out)
    for line, f in zip(lines, report.findings, strict=False):
        command, props, data = runner_parse(line)
        assert command in ("error", "warning", "notice")
        assert set(props) == {"file", "line", "title"}
        assert props["title"] == visible(f"{f.code} {f.check} ({f.layer})", keep="\r\n")
        assert props["file"] == visible(report.run["model"], keep="\r\n")
        assert data == visible(f"{f.message}. Fix: {f.fix}", keep="\r\n")
    for line, e in zip(lines[len(report.findings) :], report.errors, strict=True):
        command, props, data = runner_parse(line)
        assert command == "error" and set(props) == {"title"}
        assert data == visible(e.message, keep="\r\n")


# ---- json and sarif ------------------------------------------------------------------------


def assert_plain_ascii_json(text: str) -> None:
    assert text.isascii() and not unprintable(text)


def test_json_round_trips_every_name() -> None:
    report = hostile_report()
    text = render("json", report)
    assert_plain_ascii_json(text)
    doc = json.loads(text)
    assert [r["name"] for r in doc["layers"]] == list(HOSTILE)
    assert [r["kind"] for r in doc["layers"]] == [f"Kind{n}" for n in HOSTILE]
    assert [f["layer"] for f in doc["findings"]] == list(HOSTILE)
    assert [f["message"] for f in doc["findings"]] == [f.message for f in report.findings]
    assert [f["evidence"]["name"] for f in doc["findings"]] == list(HOSTILE)
    assert doc["run"]["model"] == report.run["model"]
    assert doc["notes"] == list(report.notes)
    assert [e["check"] for e in doc["errors"]] == [e.check for e in report.errors]


def test_sarif_round_trips_every_name() -> None:
    report = hostile_report()
    text = render("sarif", report)
    assert_plain_ascii_json(text)
    doc = json.loads(text)
    run = doc["runs"][0]
    for result, f in zip(run["results"], report.findings, strict=True):
        assert result["locations"][0]["logicalLocations"][0]["fullyQualifiedName"] == f.layer
        assert result["message"]["text"] == f"{f.layer}: {f.message}. Fix: {f.fix}"
        uri = result["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
        assert uri.isascii() and not set(uri) & set(' <>"`|\\')
    notes = run["invocations"][0]["toolExecutionNotifications"]
    assert [n["message"]["text"] for n in notes] == [
        f"{e.check} failed: {e.message}" for e in report.errors
    ]
    if SCHEMA.is_file():
        import jsonschema

        jsonschema.validate(doc, json.loads(SCHEMA.read_text()))


def test_sarif_uri_of_a_path_with_undecodable_bytes() -> None:
    run = {**hostile_report().run, "model_source": {"file": "m\udcff\ud800.py", "line": 2}}
    doc = json.loads(render("sarif", dataclasses.replace(hostile_report(), run=run)))
    uri = doc["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]
    assert uri["uri"].isascii() and uri["uri"].startswith("m")


# ---- every format, ordinary names unchanged ------------------------------------------------


@pytest.mark.parametrize("fmt", [f.value for f in Format])
def test_ordinary_names_render_unchanged(fmt: str) -> None:
    text = render(fmt, hostile_report(ORDINARY))
    for name in ORDINARY:
        assert name in text
        assert "\\" + name not in text


# ---- end to end: a checkpoint with hostile module names ------------------------------------

# names for the modules of the scanned Sequential (add_module refuses '.' and '')
E2E_NAMES = (
    "\x1b]8;;http://evil\x07click\x1b]8;;\x07",
    "</failure><testcase name='x'>",
    "a|b\n| --- |",
    "\r::error::pwned",
    "<script>alert(1)</script>",
    "[bold red]x[/]",
    "\u202eevil\u202c\x9b2J\ud800\x00",
)


@pytest.fixture(scope="module")
def hostile_checkpoint(tmp_path_factory) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential()
    first = nn.Linear(4, 16)
    with torch.no_grad():
        first.bias.fill_(-50.0)  # every unit of the ReLU after it dead: an NH101 error
    model.add_module(E2E_NAMES[0], first)
    model.add_module(E2E_NAMES[1], nn.ReLU())
    model.add_module(E2E_NAMES[2], nn.Linear(16, 16))
    model.add_module(E2E_NAMES[3], nn.Tanh())
    model.add_module(E2E_NAMES[4], nn.Linear(16, 8))
    model.add_module(E2E_NAMES[5], nn.ReLU())
    model.add_module(E2E_NAMES[6], nn.Linear(8, 3))
    path = tmp_path_factory.mktemp("hostile") / "m\x1b[2J<b>|`x`.pt"
    torch.save(model, path)
    return path


@pytest.fixture(scope="module")
def hostile_json(hostile_checkpoint: Path) -> dict:
    from nnhealth.cli import main

    out = hostile_checkpoint.with_suffix(".json")
    code = main(
        [
            "scan",
            str(hostile_checkpoint),
            "--input-shape",
            "32x4",
            "--format",
            "json",
            "-o",
            str(out),
        ]
    )
    assert code == 1, code
    return json.loads(out.read_text())


def test_end_to_end_json_keeps_the_names(hostile_json: dict) -> None:
    names = {layer["name"] for layer in hostile_json["layers"]}
    assert set(E2E_NAMES) <= names
    assert any(f["layer"] == E2E_NAMES[1] for f in hostile_json["findings"])  # the dead ReLU


@pytest.mark.parametrize("fmt", [f.value for f in Format])
def test_end_to_end_every_format(
    cli, hostile_checkpoint: Path, hostile_json: dict, fmt: str
) -> None:
    res = cli("scan", hostile_checkpoint, "--input-shape", "32x4", "--format", fmt)
    assert res.code == 1, res.err
    out = res.out
    assert out and not unprintable(out), unprintable(out)
    findings = hostile_json["findings"]
    dead = next(f for f in findings if f["layer"] == E2E_NAMES[1])
    if fmt in ("json", "sarif"):
        assert out.isascii()
        doc = json.loads(out)
        if fmt == "json":
            assert {layer["name"] for layer in doc["layers"]} >= set(E2E_NAMES)
        else:
            qualified = {
                loc["fullyQualifiedName"]
                for r in doc["runs"][0]["results"]
                for loc in r["locations"][0].get("logicalLocations", [])
            }
            assert E2E_NAMES[1] in qualified
    elif fmt == "text":
        assert "[bold red]x[/]" in out or "[bold red]x[/" in out
        assert f"{dead['code']} dead-relu {visible(dead['layer'])}" in out
        assert visible(dead["message"]) in out
    elif fmt == "junit":
        root = ET.fromstring(out.encode("utf-8"))
        cases = root.findall("testsuite/testcase")
        assert int(root.find("testsuite").get("tests")) == len(cases)
        assert any(c.get("name") == f"NH101 dead-relu: {visible(E2E_NAMES[1])}" for c in cases)
        assert "<testcase name='x'>" not in out
    elif fmt == "markdown":
        assert "<script" not in out.lower()
        lines = out.splitlines()
        start = lines.index("| severity | check | layer | finding | fix |") + 2
        rows = lines[start : start + len(findings)]
        assert all(row.startswith("| ") and len(gfm_cells(row)) == 5 for row in rows), rows
        parser = Cells()
        parser.feed(markdown_html(out))
        assert visible(dead["layer"]) in [r[2] for r in parser.rows if len(r) == 5]
    elif fmt == "github":
        lines = out.splitlines()
        assert len(lines) == len(findings)
        parsed = [runner_parse(line) for line in lines]
        assert all(command in ("error", "warning", "notice") for command, _, _ in parsed)
        titles = {props["title"] for _, props, _ in parsed}
        assert f"NH101 dead-relu ({visible(E2E_NAMES[1], keep=chr(13) + chr(10))})" in titles


def test_fix_snippets_quote_hostile_names_as_python_literals() -> None:
    """A fix snippet is code a user may paste: a layer name from the file is a string
    literal in it, never code (it parses; every get_submodule/setattr argument is that
    exact name; nothing else is called)."""
    import ast

    import torch
    from torch import nn

    import nnhealth

    evil = 'x")\nimport os\n__import__("os")  # \x1b[ \u202e'  # torch refuses "." in names
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module(evil, nn.Linear(16, 32))
    model.add_module(evil + "act", nn.ReLU())
    model.add_module("out", nn.Linear(32, 4))
    with torch.no_grad():
        model.get_submodule(evil).bias[:24] = -50.0  # 75% dead: NH101 with a snippet
        model.out.weight[1] = model.out.weight[0]  # a duplicated unit: NH501's snippet
    report = nnhealth.scan(model, (torch.randn(64, 16), torch.randint(0, 4, (64,))))
    snippets = [f.fix_snippet for f in report.findings if f.fix_snippet]
    assert any("get_submodule" in s for s in snippets), [f.code for f in report.findings]
    for snippet in snippets:
        tree = ast.parse(snippet)
        assert not any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in ast.walk(tree))
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            name = getattr(call.func, "attr", getattr(call.func, "id", None))
            assert name not in ("__import__", "exec", "eval", "system")
            if name in ("get_submodule", "setattr"):
                literal = call.args[0 if name == "get_submodule" else 1]
                assert isinstance(literal, ast.Constant)
                assert literal.value in (evil, evil + "act", "out")
