"""The text report in a real terminal: at 80, 100 and 120 columns (and the width a pipe
gets) no line is longer than the width, no number is cut, every layer name stays
distinguishable, and each distinct fix snippet is printed once. On models built here:
a hand-built one with GPT-style long names, torchvision's ResNet-50 and ViT, and
transformers' GPT-2 (each skipped when the library is absent)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rich.cells import cell_len

import nnhealth
from nnhealth.findings import Finding, Report, Severity
from nnhealth.formatters import RenderOptions, get_formatter
from nnhealth.formatters.base import number_snippets, visible
from nnhealth.formatters.text import (
    NAME_FLOOR,
    fmt,
    layer_columns,
    name_width,
    shorten_left,
    shorten_names,
)

WIDTHS = [80, 100, 120]

# a GPT-style model whose names are long, alike, and differ at their end (ln_1 / ln_2),
# in the middle (h.1 / h.11) or both; also loaded by the CLI from a file
LONG_NAMES = """
from collections import OrderedDict

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attention_output_projection = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(d, 4 * d), act=nn.GELU(), c_proj=nn.Linear(4 * d, d))
        )

    def forward(self, x):
        x = x + self.attention_output_projection(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class LongNames(nn.Module):
    def __init__(self, d=16, depth=12):
        super().__init__()
        self.transformer = nn.ModuleDict(
            {"h": nn.ModuleList(Block(d) for _ in range(depth)), "ln_f": nn.LayerNorm(d)}
        )
        self.classification_head_with_a_rather_long_name = nn.Linear(d, 10)
        with torch.no_grad():  # a finding with a snippet
            self.transformer["h"][3].mlp.c_fc.weight.mul_(0.01)

    def forward(self, x):
        for block in self.transformer["h"]:
            x = block(x)
        return self.classification_head_with_a_rather_long_name(self.transformer["ln_f"](x))


def long_names():
    torch.manual_seed(0)
    return LongNames()
"""

SNIPPET_A = 'layer = model.get_submodule("x")\nnn.init.ones_(layer.weight)'
SNIPPET_B = (
    "# a comment line long enough to need wrapping at eighty columns, so it is wrapped "
    "into more comment lines\nfor p in model.parameters():\n    p.grad.mul_(0.5)"
)


@pytest.fixture(scope="module")
def long_names_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "long_names.py"
    path.write_text(LONG_NAMES)
    return path


@pytest.fixture(scope="module")
def long_names_report(long_names_file: Path) -> Report:
    spec = importlib.util.spec_from_file_location("nnhealth_test_long_names", long_names_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return nnhealth.scan(module.long_names(), torch.randn(32, 16))


def with_shared_snippets(report: Report) -> Report:
    """``report`` plus one finding per layer, alternating two snippets (the per-layer
    pattern that used to repeat one snippet under every finding)."""
    extra = tuple(
        Finding(
            "NH601",
            "init-scale",
            Severity.WARNING if i % 3 else Severity.ERROR,
            r["name"],
            f"Var(w) is x{0.01 * (i + 1):.3g} of its target",
            {"ratio": 0.01 * (i + 1)},
            "re-initialize",
            SNIPPET_B if i % 2 else SNIPPET_A,
        )
        for i, r in enumerate(report.layers)
    )
    return dataclasses.replace(report, findings=report.findings + extra)


def render(report: Report, width: int | None, fmt_: str = "text", **kw) -> str:
    options = RenderOptions(**kw) if width is None else RenderOptions(width=width, **kw)
    return get_formatter(fmt_, options).render(report)


def table_rows(text: str, report: Report) -> list[tuple[str, list[list[str]]]]:
    """Each layer table's header line and its rows (split on spaces), by the titles."""
    lines = text.splitlines()
    tables = []
    for i, line in enumerate(lines):
        if line in ("Layers (forward order)", "Layers, continued"):
            header = lines[i + 1]
            rows = [row.split() for row in lines[i + 2 : i + 2 + len(report.layers)]]
            tables.append((header, rows))
    return tables


def assert_fits(text: str, report: Report, width: int) -> None:
    """No line wider than ``width``; the table's numbers whole; names apart."""
    too_long = [line for line in text.splitlines() if cell_len(line) > width]
    assert not too_long, f"lines over {width} cells: {too_long[:3]}"
    tables = table_rows(text, report)
    assert tables, "no layer table"
    names = [visible(r["name"]) or "(model)" for r in report.layers]  # the root module
    for header, rows in tables:
        shown = [row[0] for row in rows]
        assert len(set(shown)) == len(set(names)), "two layers read the same"
        for name, cell in zip(names, shown, strict=True):
            assert cell == name or (cell.startswith("…") and name.endswith(cell[1:]))
        for row in rows:
            assert not any("…" in cell for cell in row[1:]), f"a cut cell in {row}"
        for key, head in (("act_var", "act var"), ("grad_var", "grad var")):
            if re.search(rf"(^|\s){head}(\s|$)", header):
                for r, row in zip(report.layers, rows, strict=True):
                    assert r.get(key) is None or fmt(r[key]) in row[1:], (r["name"], key, row)


def assert_snippets_once(text: str, report: Report) -> None:
    """Each distinct snippet's code printed exactly once; the other findings point at it."""
    shared = number_snippets(sorted(report.findings, key=lambda f: -f.severity), True)
    assert SNIPPET_A in shared and SNIPPET_B in shared
    for code, n in shared.items():
        uses = sum(f.fix_snippet == code for f in report.findings)
        assert text.count(f"snippet [{n}] ({uses} findings use it):") == 1
        assert text.count(f"snippet: see [{n}] above") == uses - 1
    stripped = [line.strip() for line in text.splitlines()]
    assert stripped.count('layer = model.get_submodule("x")') == 1
    assert stripped.count("p.grad.mul_(0.5)") == 1
    # a comment wrapped to the width is still a comment on every line
    assert all(line.startswith("#") for line in stripped if "more comment lines" in line)


@pytest.mark.parametrize("width", [*WIDTHS, None])
def test_long_names_fit(long_names_report: Report, width: int | None) -> None:
    report = with_shared_snippets(long_names_report)
    text = render(report, width)
    assert_fits(text, report, width or RenderOptions().width)
    assert_snippets_once(text, report)
    if width == 80:  # shortened from the left, apart, and what was left out is said
        words = text.split()
        assert "…h.0.attention_output_projection" in words
        assert "…h.10.attention_output_projection" in words
        assert "left out at 80 columns:" in text and "-v" in text


@pytest.mark.parametrize("width", WIDTHS)
def test_verbose_stacks_every_column(long_names_report: Report, width: int) -> None:
    text = render(long_names_report, width, verbose=True)
    assert_fits(text, long_names_report, width)
    assert "left out at" not in text
    headers = " ".join(h for h, _ in table_rows(text, long_names_report))
    for column in layer_columns(long_names_report.layers):
        assert column.header in headers or column.apart in headers, column.label
    if width == 80:
        assert "Layers, continued" in text


def test_quiet_has_no_table(long_names_report: Report) -> None:
    text = render(with_shared_snippets(long_names_report), 80, quiet=True)
    assert "Layers" not in text and "left out at" not in text and "snippet" not in text
    assert max(map(cell_len, text.splitlines())) <= 80


def test_json_keeps_every_snippet(long_names_report: Report) -> None:
    report = with_shared_snippets(long_names_report)
    data = json.loads(render(report, 80, "json"))
    assert [f["fix_snippet"] for f in data["findings"]] == [f.fix_snippet for f in report.findings]


def test_markdown_and_github_do_not_print_snippets(long_names_report: Report) -> None:
    # one line per finding (github) and a table row per finding (markdown): the snippets
    # are in the text, JSON and SARIF reports
    report = with_shared_snippets(long_names_report)
    for fmt_ in ("markdown", "github"):
        text = render(report, 80, fmt_)
        assert "nn.init.ones_(layer.weight)" not in text and "p.grad.mul_" not in text


def test_cli_through_a_pipe(cli, long_names_file: Path) -> None:
    res = cli("scan", f"{long_names_file}:long_names", "--input-shape", "32x16")
    assert res.code in (0, 1), res.err
    lines = res.out.splitlines()
    width = max(map(cell_len, lines))
    assert width <= 140 and "Layers (forward order)" in res.out
    rows = [line.split() for line in lines if line.startswith("transformer.")]
    assert rows and not any("…" in cell for row in rows for cell in row)


def test_shorten_left_keeps_the_end() -> None:
    assert shorten_left("transformer.h.0.ln_1", 10) == "…h.0.ln_1"
    assert shorten_left("transformer.h.0.ln_1", 20) == "transformer.h.0.ln_1"
    assert shorten_left("transformer.h.0.ln_1", 10, snap=False) == "….h.0.ln_1"
    assert cell_len(shorten_left("模型.层.ln_1", 6)) <= 6  # wide characters count double


def test_ln_1_and_ln_2_stay_apart() -> None:
    names = [f"transformer.h.{i}.ln_{j}" for i in (0, 1, 11) for j in (1, 2)]
    assert shorten_names(names, 10) == [
        "…h.0.ln_1",
        "…h.0.ln_2",
        "…h.1.ln_1",
        "…h.1.ln_2",
        "…h.11.ln_1",
        "…h.11.ln_2",
    ]
    assert shorten_names(names, 7) is None  # …1.ln_1 for both h.1 and h.11
    assert name_width(names, 7) == NAME_FLOOR  # names are not cut below it


def test_names_differing_in_the_middle_stay_apart() -> None:
    # torchvision ViT: the end is shared, the block number is in the middle
    names = [
        f"encoder.layers.encoder_layer_{i}.self_attention{tail}"
        for i in range(12)
        for tail in ("", ".out_proj")
    ]
    width = name_width(names, 24)
    short = shorten_names(names, width)
    assert short is not None and len(set(short)) == len(names)
    assert all(cell_len(s) <= width for s in short)
    assert shorten_names(names, 12) is None  # at 12 cells they cannot be told apart


@given(
    st.lists(
        st.lists(
            st.sampled_from(["h", "0", "1", "11", "ln_1", "ln_2", "attn", "mlp"]),
            min_size=1,
            max_size=6,
        ),
        min_size=1,
        max_size=30,
    ),
    st.integers(1, 40),
)
def test_chosen_name_width_never_merges_names(parts: list[list[str]], room: int) -> None:
    names = [".".join(p) for p in parts]
    width = name_width(names, room)
    short = shorten_names(names, width)
    assert short is not None and len(set(short)) == len(set(names))
    for name, s in zip(names, short, strict=True):
        assert cell_len(s) <= max(width, 1)
        assert s == name or (s.startswith("…") and name.endswith(s[1:]))


def test_bars_apart_from_their_numbers_are_labelled() -> None:
    layers = tuple(
        {
            "name": f"block.{i}.layer",
            "kind": "Linear",
            "units": 8,
            "act_var": 10.0**-i,
            "grad_var": 10.0**i,
            "weight_norm": 1.0,
        }
        for i in range(4)
    )
    report = Report(run={"model": "m", "checks": []}, layers=layers, findings=())
    text = render(report, 44, verbose=True)
    assert "Layers, continued" in text
    assert "act log" in text or "grad log" in text


# ---- real models: each library optional, one scan per module ---------------------------
@pytest.fixture(scope="module")
def resnet50_report() -> Report:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    return nnhealth.scan(model, torch.randn(2, 3, 32, 32))


@pytest.fixture(scope="module")
def vit_report() -> Report:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    # vit_b_16's names and depth, a small hidden size
    model = torchvision.models.VisionTransformer(
        image_size=32,
        patch_size=16,
        num_layers=12,
        num_heads=2,
        hidden_dim=32,
        mlp_dim=64,
        num_classes=10,
    )
    return nnhealth.scan(model, torch.randn(2, 3, 32, 32))


@pytest.fixture(scope="module")
def gpt2_report() -> Report:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    # GPT-2 small's names and 12 blocks, a small width and vocabulary
    config = transformers.GPT2Config(
        n_embd=32, n_head=2, vocab_size=512, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    return nnhealth.scan(model, torch.randint(0, 512, (2, 16)))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("which", ["resnet50_report", "vit_report", "gpt2_report"])
def test_stock_models_fit(request: pytest.FixtureRequest, which: str, width: int) -> None:
    report = with_shared_snippets(request.getfixturevalue(which))
    assert len(report.layers) >= 18  # many layers: each of them gets a row
    for verbose in (False, True):
        text = render(report, width, verbose=verbose)
        assert_fits(text, report, width)
        assert_snippets_once(text, report)
