"""The options schema: each option declared once (nnhealth.options.OPTIONS), and the
command line, the config file, NNHEALTH_* and the Python API all derived from it."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
from conftest import he_mlp, one_line_error

import nnhealth
from nnhealth import config, pipeline
from nnhealth.cli import app
from nnhealth.errors import NnhealthError, UsageError, flag
from nnhealth.options import (
    BY_NAME,
    DEFAULTS,
    FLAGS,
    KEYS,
    OPTIONS,
    Choice,
    Codes,
    File,
    Flag,
    Integer,
    Number,
    Option,
    ScanOptions,
    Scope,
)

# the contract (../shared/DESIGN.md): flags, config key and variable of every option;
# changing one of these breaks users' scripts and CI configs
CONTRACT = {
    "model": (("MODEL",), "model", "NNHEALTH_MODEL"),
    "data": (("--data",), "data", "NNHEALTH_DATA"),
    "input_shape": (("--input-shape",), "input-shape", "NNHEALTH_INPUT_SHAPE"),
    "weights": (("--weights",), "weights", "NNHEALTH_WEIGHTS"),
    "arch": (("--arch",), "arch", "NNHEALTH_ARCH"),
    "lr": (("--lr",), "lr", "NNHEALTH_LR"),
    "optimizer": (("--optimizer",), "optimizer", "NNHEALTH_OPTIMIZER"),
    "momentum": (("--momentum",), "momentum", "NNHEALTH_MOMENTUM"),
    "betas": (("--betas",), "betas", "NNHEALTH_BETAS"),
    "eps": (("--eps",), "eps", "NNHEALTH_EPS"),
    "weight_decay": (("--weight-decay",), "weight-decay", "NNHEALTH_WEIGHT_DECAY"),
    "optimizer_state": (("--optimizer-state",), "optimizer-state", "NNHEALTH_OPTIMIZER_STATE"),
    "hessian": (("--hessian", "--no-hessian"), "hessian", "NNHEALTH_HESSIAN"),
    "hessian_top": (("--hessian-top",), "hessian-top", "NNHEALTH_HESSIAN_TOP"),
    "hessian_min": (("--hessian-min",), "hessian-min", "NNHEALTH_HESSIAN_MIN"),
    "hessian_trace": (("--hessian-trace",), "hessian-trace", "NNHEALTH_HESSIAN_TRACE"),
    "hessian_tol": (("--hessian-tol",), "hessian-tol", "NNHEALTH_HESSIAN_TOL"),
    "hessian_budget": (("--hessian-budget",), "hessian-budget", "NNHEALTH_HESSIAN_BUDGET"),
    "hessian_batch": (("--hessian-batch",), "hessian-batch", "NNHEALTH_HESSIAN_BATCH"),
    "hessian_batches": (("--hessian-batches",), "hessian-batches", "NNHEALTH_HESSIAN_BATCHES"),
    "loss": (("--loss",), "loss", "NNHEALTH_LOSS"),
    "mode": (("--mode",), "mode", "NNHEALTH_MODE"),
    "select": (("--select",), "select", "NNHEALTH_SELECT"),
    "ignore": (("--ignore",), "ignore", "NNHEALTH_IGNORE"),
    "fmt": (("--format",), "format", "NNHEALTH_FORMAT"),
    "output": (("--output", "-o"), "output", "NNHEALTH_OUTPUT"),
    "fail_on": (("--fail-on",), "fail-on", "NNHEALTH_FAIL_ON"),
    "exit_zero": (("--exit-zero",), "exit-zero", "NNHEALTH_EXIT_ZERO"),
    "baseline": (("--baseline",), "baseline", "NNHEALTH_BASELINE"),
    "write_baseline": (("--write-baseline",), "write-baseline", "NNHEALTH_WRITE_BASELINE"),
    "baseline_tolerance": (
        ("--baseline-tolerance",),
        "baseline-tolerance",
        "NNHEALTH_BASELINE_TOLERANCE",
    ),
    "what_if": (("--what-if",), "what-if", "NNHEALTH_WHAT_IF"),
    "what_if_budget": (("--what-if-budget",), "what-if-budget", "NNHEALTH_WHAT_IF_BUDGET"),
    "trust": (("--trust",), None, "NNHEALTH_TRUST"),
    "device": (("--device",), "device", "NNHEALTH_DEVICE"),
    "seed": (("--seed",), "seed", "NNHEALTH_SEED"),
    "quiet": (("--quiet", "-q"), "quiet", "NNHEALTH_QUIET"),
    "verbose": (("--verbose", "-v"), "verbose", "NNHEALTH_VERBOSE"),
    "debug": (("--debug",), None, "NNHEALTH_DEBUG"),
    "config": (("--config",), None, None),
}
BY_ID = {"ids": [o.name for o in OPTIONS]}


def _scan_command():
    return typer.main.get_command(app).commands["scan"]


def _plain(value: Any) -> Any:
    return getattr(value, "value", value)


def test_the_schema_is_the_contract() -> None:
    spelled = {
        o.name: (
            tuple(f for spelling in o.flags for f in spelling.split("/")) or ("MODEL",),
            o.key,
            o.env,
        )
        for o in OPTIONS
    }
    assert spelled == CONTRACT


@pytest.mark.parametrize("option", OPTIONS, **BY_ID)
def test_every_option_is_a_flag_with_the_schema_default(option: Option) -> None:
    params = {p.name: p for p in _scan_command().params}
    param = params[option.name]
    assert _plain(param.default) == DEFAULTS[option.name]
    if option.argument:
        assert param.param_type_name == "argument"
    else:
        declared = {f for spelling in option.flags for f in spelling.split("/")}
        assert {*param.opts, *param.secondary_opts} == declared
    assert set(params) == set(BY_NAME)  # nothing on the command line outside the schema


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.key], ids=list(KEYS))
def test_every_key_and_variable_reads_the_default_back(option: Option) -> None:
    """A file's key and an NNHEALTH_* variable per option, named by one rule, each
    reading the option's default as written there to the same value."""
    assert option.env == "NNHEALTH_" + option.key.upper().replace("-", "_")
    default = DEFAULTS[option.name]
    if default is None:
        return  # nothing to write: the option is simply left out
    as_text = str(default).lower() if isinstance(default, bool) else str(default)
    assert option.read(default, "file", text=False) == default
    assert option.read(as_text, option.env, text=True) == default


def test_library_defaults_are_the_schema_defaults() -> None:
    scan_scope = {o.name for o in OPTIONS if o.scope == Scope.SCAN}
    made = ScanOptions()
    assert {n: getattr(made, n) for n in scan_scope} == {n: DEFAULTS[n] for n in scan_scope}
    for function in (nnhealth.scan, pipeline.run):
        keywords = {
            name: p.default
            for name, p in inspect.signature(function).parameters.items()
            if name in BY_NAME and p.kind is p.KEYWORD_ONLY
        }
        assert keywords and keywords == {n: DEFAULTS[n] for n in keywords}, function
    pipeline_scope = {o.name for o in OPTIONS if o.scope == Scope.PIPELINE}
    assert pipeline_scope <= set(inspect.signature(pipeline.run).parameters)
    assert pipeline_scope | scan_scope - {"device"} <= set(
        inspect.signature(nnhealth.scan).parameters
    )


def test_help_lists_every_flag_with_its_help_and_default(cli) -> None:
    text = " ".join(cli("scan", "--help").out.split())
    for option in OPTIONS:
        assert " ".join(option.help.split()) in text, option.name
        for spelling in option.flags:
            assert spelling.replace("/", " / ") in text
        default = DEFAULTS[option.name]
        if option.show_default and default not in (None, False):
            assert f"{option.flags[0]} " in text and f"[default: {default}]" in text


def test_messages_name_options_by_keyword_or_flag() -> None:
    assert set(BY_NAME) | {"no_hessian", "format"} <= set(FLAGS)
    exc = UsageError(f"give {flag('input_shape')} or {flag('no_hessian')} or {flag('fmt')}")
    assert str(exc) == "give input_shape or no_hessian or fmt"
    assert exc.render(FLAGS) == "give --input-shape or --no-hessian or --format"
    assert UsageError(flag("model")).render(FLAGS) == "MODEL"


# ---- one refusal per bad value, wherever it comes from ---------------------------


def _bad(option: Option) -> Any:
    """A value of the option's type that its check refuses."""
    kind = option.kind
    if isinstance(kind, Integer):
        return kind.low - 1
    if isinstance(kind, Number):
        return kind.low - 1.0
    if isinstance(kind, Choice):
        return "nope"
    if isinstance(kind, Codes):
        return []
    if isinstance(kind, Flag):
        return "maybe"
    return ""


def _as_text(option: Option, value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def _as_toml(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    return "[]" if value == [] else repr(value)


def _same_refusal(option: Option, line: str) -> None:
    """The line refuses the bad value the way the schema words it."""
    if isinstance(option.kind, Choice):
        assert all(c.value in line for c in option.kind.choices), line
    else:
        assert option.kind.problem(_bad(option)) in line, line


@pytest.fixture
def small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    torch.save(he_mlp([8, 16, 4]), tmp_path / "m.pt")
    monkeypatch.chdir(tmp_path)
    for option in OPTIONS:
        if option.env:
            monkeypatch.delenv(option.env, raising=False)
    return tmp_path / "m.pt"


ON_THE_COMMAND_LINE = [
    o for o in OPTIONS if not isinstance(o.kind, (Flag, File))
]  # a flag takes no value; typer turns '' into the path '.'


@pytest.mark.parametrize("option", ON_THE_COMMAND_LINE, ids=[o.name for o in ON_THE_COMMAND_LINE])
def test_a_bad_flag_value_is_refused_naming_the_flag(cli, small: Path, option: Option) -> None:
    text = _as_text(option, _bad(option))
    if option.argument:
        args = ["scan", text, "--input-shape", "4x8"]
    else:
        args = ["scan", small, "--input-shape", "4x8", option.flags[0], text]
    line = one_line_error(cli(*args))
    _same_refusal(option, line)
    assert FLAGS[option.name] in line


@pytest.mark.parametrize("option", list(KEYS.values()), ids=list(KEYS))
def test_a_bad_file_value_is_refused_naming_the_key(cli, small: Path, option: Option) -> None:
    (small.parent / "nnhealth.toml").write_text(f"{option.key} = {_as_toml(_bad(option))}\n")
    line = one_line_error(cli("scan", small, "--input-shape", "4x8"))
    _same_refusal(option, line)
    assert f"nnhealth.toml: {option.key}: " in line


@pytest.mark.parametrize("option", list(KEYS.values()), ids=list(KEYS))
def test_a_bad_variable_is_refused_naming_it(cli, small: Path, monkeypatch, option: Option) -> None:
    monkeypatch.setenv(option.env, _as_text(option, _bad(option)))
    args = {"model": [small], "input_shape": ["--input-shape", "4x8"]}
    args.pop(option.name, None)  # given on the command line, the variable is not read
    line = one_line_error(cli("scan", *args.get("model", []), *args.get("input_shape", [])))
    _same_refusal(option, line)
    assert f"{option.env}: " in line


IN_THE_API = [
    o
    for name, p in inspect.signature(nnhealth.scan).parameters.items()
    if p.kind is p.KEYWORD_ONLY and (o := BY_NAME.get(name)) is not None
]


@pytest.mark.parametrize("option", IN_THE_API, ids=[o.name for o in IN_THE_API])
def test_a_bad_keyword_is_refused_naming_the_keyword(option: Option) -> None:
    batch = (torch.randn(4, 8), torch.randint(0, 4, (4,)))
    with pytest.raises(UsageError) as info:
        nnhealth.scan(he_mlp([8, 16, 4]), batch, **{option.name: _bad(option)})
    _same_refusal(option, str(info.value))
    assert str(info.value).startswith(f"{option.name} ")
    assert "--" not in str(info.value)


def test_scan_options_refuse_what_the_command_line_refuses() -> None:
    from nnhealth.options import validate

    validate(ScanOptions())
    for option in (o for o in OPTIONS if o.scope == Scope.SCAN):
        with pytest.raises(NnhealthError, match=f"^{option.name} "):
            validate(ScanOptions(**{option.name: _bad(option)}))
    with pytest.raises(UsageError, match="expected a number"):
        validate(ScanOptions(lr=True))
    with pytest.raises(UsageError, match="expected a number"):
        validate(ScanOptions(hessian_tol=math.nan))


def test_options_that_exclude_each_other(cli, small: Path) -> None:
    line = one_line_error(cli("scan", small, "--input-shape", "4x8", "--data", "x.pt"))
    assert line.endswith("give either --data or --input-shape, not both")
    line = one_line_error(cli("scan", small, "--arch", "m.py:f", "--weights", "w.pt"))
    assert "give either --arch (MODEL is the weights) or --weights" in line


def test_options_a_file_may_not_set(cli, small: Path) -> None:
    for key, hint in (
        ("trust", "pass --trust or set NNHEALTH_TRUST=1 instead"),
        ("debug", "pass --debug or set NNHEALTH_DEBUG=1 instead"),
        ("config", "pass --config instead"),
    ):
        (small.parent / "nnhealth.toml").write_text(f'{key} = "x"\n')
        line = one_line_error(cli("scan", small, "--input-shape", "4x8"))
        assert line.endswith(f"nnhealth.toml: {key}: not allowed in a config file; {hint}")


def test_config_resolves_nothing_when_nothing_is_set(tmp_path: Path) -> None:
    found = config.resolve(set(), None, cwd=tmp_path, environ={})
    assert found.values == {} and found.source is None
