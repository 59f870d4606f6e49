"""Property-based fuzzing of the config parser and the NNHEALTH_* variables: whatever a
repository's pyproject.toml / nnhealth.toml holds, reading it ends in Settings or in one
UsageError line; it never imports code without trust, never points output outside its
tree, and writes nothing.

A bounded number of examples keeps the suite fast; NNHEALTH_FUZZ_EXAMPLES=2000 runs
longer.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nnhealth import config
from nnhealth.errors import UsageError
from nnhealth.options import KEYS as OPTION_KEYS
from nnhealth.options import Role

EXAMPLES = int(os.environ.get("NNHEALTH_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize="NNHEALTH_FUZZ_EXAMPLES" not in os.environ,  # CI: the same cases each run
)

KEYS = [*OPTION_KEYS, "trust", "debug", *config.TABLES, "unknown-key"]
ATOMS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        [
            "model.pt",
            "tools/build.py:build",
            "pkg.mod:factory",
            "../../etc/passwd",
            "/tmp/x.json",
            "NH101",
            "dead-relu",
            "",
            "json",
            "warning",
            "x" * 300,
            "\x1b[2J",
        ]
    ),
    st.text(max_size=20),
)
VALUES = st.recursive(
    ATOMS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(["dead-relu", "NH101", "warn_fraction", "x"]), inner, max_size=3
        ),
    ),
    max_leaves=8,
)


def toml_value(value) -> str:
    """A TOML rendering of ``value`` (hypothesis gives Python values; tomllib reads them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return (
            '"'
            + "".join(
                c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in value
            )
            + '"'
        )
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + "}"


def check_settings(found: config.Settings, root: Path) -> None:
    for option in OPTION_KEYS.values():
        value = found.values.get(option.name)
        if option.role is Role.CODE and isinstance(value, str):
            assert not config.names_code(value, root), value
        if option.role is Role.WRITE and isinstance(value, str):
            (root / value).resolve().relative_to(root.resolve())  # raises if outside


def read(text: str | bytes, environ: dict[str, str] | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "repo"
        root.mkdir()
        path = root / "nnhealth.toml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        before = sorted(Path(tmp).rglob("*"))
        try:
            found = config.resolve(set(), None, cwd=root, environ=environ or {})
        except UsageError as exc:
            assert "\n" not in str(exc) and str(exc), repr(str(exc))
        else:
            check_settings(found, root)
        assert sorted(Path(tmp).rglob("*")) == before  # nothing written


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6))
def test_any_table_is_settings_or_one_line(table: dict) -> None:
    read("".join(f'"{k}" = {toml_value(v)}\n' for k, v in table.items()))


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_are_settings_or_one_line(data: bytes) -> None:
    read(data)


@FUZZ
@given(st.dictionaries(st.sampled_from([*OPTION_KEYS]), st.text(max_size=30), max_size=4))
def test_any_environment_is_settings_or_one_line(env: dict[str, str]) -> None:
    read("", {OPTION_KEYS[k].env: v for k, v in env.items()})


def test_fuzz_strategies_reach_the_refusals() -> None:
    """The generators above can produce each refusal the properties rely on."""
    for body, needle in (
        ('arch = "tools/build.py:build"\n', "is code to import"),
        ('output = "../../etc/passwd"\n', "outside the config file's directory"),
        ("trust = true\n", "not allowed in a config file"),
        ("seed = 1180591620717411303424\n", None),  # 2**70: beyond TOML's own 64 bits
    ):
        read(body)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "nnhealth.toml").write_text(body)
            try:
                config.resolve(set(), None, cwd=Path(tmp), environ={})
                raise AssertionError(f"accepted {body!r}")
            except UsageError as exc:
                assert needle is None or needle in str(exc), str(exc)
