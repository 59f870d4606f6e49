"""Settings from [tool.nnhealth] in pyproject.toml, nnhealth.toml, --config, NNHEALTH_*.

Precedence: command-line flags, then NNHEALTH_* environment variables, then the config
file, then the defaults. The file is ``--config FILE`` when given, else the nearest
directory (from the current one upwards) holding an ``nnhealth.toml`` (which wins) or a
``pyproject.toml`` with a ``[tool.nnhealth]`` table. Every error names its place:
``pyproject.toml: tool.nnhealth.checks.dead-relu.warn_fraction: expected a number in
[0, 1], got 'high'``. No torch here.
"""

from __future__ import annotations

import fnmatch
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnhealth._util import ENTRY_POINT, regular_file
from nnhealth.errors import UsageError
from nnhealth.findings import Severity

# config key -> (scan parameter, kind); kinds are checked by _coerce
KEYS: dict[str, tuple[str, str]] = {
    "model": ("model", "str"),
    "data": ("data", "str"),
    "input-shape": ("input_shape", "str"),
    "weights": ("weights", "str"),
    "arch": ("arch", "str"),
    "lr": ("lr", "positive"),
    "loss": ("loss", "choice:auto,ce,mse,bce"),
    "mode": ("mode", "choice:train,eval"),
    "select": ("select", "list"),
    "ignore": ("ignore", "list"),
    "format": ("fmt", "choice:text,json,sarif,github,junit,markdown"),
    "output": ("output", "str"),
    "fail-on": ("fail_on", "choice:error,warning,info"),
    "exit-zero": ("exit_zero", "bool"),
    "baseline": ("baseline", "str"),
    "baseline-tolerance": ("baseline_tolerance", "nonnegative"),
    "device": ("device", "choice:cpu,cuda"),
    "seed": ("seed", "count:seed"),
    "quiet": ("quiet", "bool"),
    "verbose": ("verbose", "bool"),
    "hessian": ("hessian", "bool"),
    "hessian-top": ("hessian_top", "count1"),
    "hessian-min": ("hessian_min", "bool"),
    "hessian-trace": ("hessian_trace", "count"),
    "hessian-tol": ("hessian_tol", "unit"),
    "hessian-budget": ("hessian_budget", "count1"),
    "what-if": ("what_if", "bool"),
    "what-if-budget": ("what_if_budget", "nonnegative"),
    "write-baseline": ("write_baseline", "str"),
}
MAX_SEED = 2**63 - 1  # as runner.MAX_SEED (no torch here)
TABLES = ("checks", "per-layer-ignores")
# paths in a config file are relative to the file's directory, not the current one
PATH_KEYS = {"model", "data", "weights", "arch", "output", "baseline", "write-baseline"}


def _from_config_dir(directory: Path, value: str) -> str:
    """``value`` relative to ``directory``: a path, or the .py file of file.py:factory.
    Module entry points (pkg.module:factory) are left alone."""
    path, colon, attr = value.rpartition(":") if ":" in value else (value, "", "")
    if colon and not path.endswith(".py"):
        return value
    if Path(path).is_absolute():
        return value
    return str(directory / path) + (colon + attr)


# never from a file: a repository must not be able to turn on unpickling for its users
NOT_IN_FILES = {"trust": "pass --trust or set NNHEALTH_TRUST=1 instead"}
# keys whose value can name code to import (an entry point): from a file only with
# --trust, or a cloned repository would run its own code for whoever scans in it
CODE_KEYS = ("model", "arch")
# keys naming files nnhealth writes: from a file, only inside the file's directory tree
WRITE_KEYS = ("output", "write-baseline")


def names_code(value: str, directory: Path) -> bool:
    """Whether a model/arch value is an entry point (pkg.module:factory, file.py:factory)
    rather than a file to read (an existing file wins, as on the command line; resolve
    then makes the value that file's absolute path, so that the loader, which looks
    from the current directory, sees the same file and not a module)."""
    return bool(ENTRY_POINT.fullmatch(value)) and not (directory / value).exists()


# what a report written over it could turn into code: git hooks, Python sources and
# path files, executables
_CODE_SUFFIXES = (".py", ".pyc", ".pth", ".so", ".sh", ".bash", ".ps1", ".bat")


def _inside(directory: Path, value: str, where: str) -> None:
    target = (directory / value).resolve()
    try:
        inner = target.relative_to(directory.resolve())
    except ValueError:
        raise UsageError(
            f"{where}: {value!r} is outside the config file's directory; a config file may "
            "only write inside its own tree (give the path with -o or --write-baseline)"
        ) from None
    if (
        ".git" in inner.parts
        or target.suffix.lower() in _CODE_SUFFIXES
        or (target.is_file() and os.access(target, os.X_OK))
    ):
        raise UsageError(
            f"{where}: {value!r} is code or repository metadata (a .git file, a script, an "
            "executable); a config file may not write there (give the path with -o or "
            "--write-baseline)"
        )


@dataclass
class Settings:
    values: dict[str, Any] = field(default_factory=dict)  # scan parameter -> value
    check_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    severities: dict[str, Severity] = field(default_factory=dict)  # check code -> severity
    layer_ignores: list[tuple[str, frozenset[str]]] = field(default_factory=list)
    source: Path | None = None


def _coerce(kind: str, value: Any, where: str, from_env: bool) -> Any:
    def bad(expected: str) -> UsageError:
        return UsageError(f"{where}: expected {expected}, got {value!r}")

    if from_env and kind not in ("str", "list") and not kind.startswith("choice"):
        text = str(value).strip().lower()
        if kind == "bool":
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise bad("true or false")
        try:
            value = int(text) if kind.startswith("count") else float(text)
        except ValueError:
            raise bad("a number") from None
    if kind == "str":
        if not isinstance(value, str) or not value:
            raise bad("a string")
        return value
    if kind == "list":
        if from_env or isinstance(value, str):
            value = [v.strip() for v in str(value).split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of check codes or names")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind.startswith("choice:"):
        choices = kind.split(":", 1)[1].split(",")
        if value not in choices:
            raise bad("one of " + ", ".join(choices))
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad("a number")
    if kind.startswith("count"):
        low = 1 if kind == "count1" else 0
        kind = kind.removeprefix("count:")
        if not isinstance(value, int) or value < low:
            raise bad(f"an integer >= {low}")
        if kind == "seed" and value > MAX_SEED:
            raise bad("an integer in [0, 2**63 - 1]")
        return value
    ranges = {
        "positive": (0, None, "a number > 0"),
        "nonnegative": (0, None, "a number >= 0"),
        "unit": (0, 1, "a number in (0, 1)"),
    }
    low, high, text = ranges[kind]
    ok = (value > low if kind != "nonnegative" else value >= low) and (high is None or value < high)
    if not ok or not math.isfinite(value):
        raise bad(text)
    return float(value)


def find_config(start: Path) -> tuple[Path, dict[str, Any], str] | None:
    """(file, its nnhealth table, the table's dotted prefix) of the nearest config."""
    for directory in [start, *start.parents]:
        own = directory / "nnhealth.toml"
        if own.exists():
            return own, _load(own), ""
        project = directory / "pyproject.toml"
        if project.exists():
            tool = _load(project).get("tool")
            table = tool.get("nnhealth") if isinstance(tool, dict) else None
            if table is not None:
                return project, table, "tool.nnhealth"
    return None


MAX_CONFIG_BYTES = 16 * 2**20  # far beyond any real pyproject.toml; read whole into memory


def _load(path: Path) -> dict[str, Any]:
    regular_file(path, "config file", UsageError)  # a FIFO would block, /dev/zero never end
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise UsageError(
                f"{path}: {path.stat().st_size:,} bytes is too large for a config file "
                f"(at most {MAX_CONFIG_BYTES:,})"
            )
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML ({exc})") from None
    except RecursionError:
        raise UsageError(f"{path}: invalid TOML (nested too deeply to read)") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: invalid TOML (not UTF-8: {exc.reason})") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None


def read_config(path: Path) -> tuple[dict[str, Any], str]:
    """An explicit --config FILE: a pyproject.toml ([tool.nnhealth]) or an nnhealth.toml."""
    if not path.exists():
        raise UsageError(f"--config {path}: no such file")
    data = _load(path)
    if "tool" in data and isinstance(data["tool"], dict) and "nnhealth" in data["tool"]:
        return data["tool"]["nnhealth"], "tool.nnhealth"
    if path.name == "pyproject.toml":
        raise UsageError(f"--config {path}: has no [tool.nnhealth] table")
    return data, ""


def resolve(
    explicit: set[str],
    config_path: Path | None,
    cwd: Path | None = None,
    environ: dict[str, str] | None = None,
    *,
    trust: bool = False,
) -> Settings:
    """Settings for every scan parameter not given on the command line (``explicit``).

    A file may not name code to import (``model``/``arch`` as an entry point) unless
    ``trust``, nor write outside its own directory tree."""
    environ = os.environ if environ is None else environ
    settings = Settings()
    if config_path is not None:
        table, prefix = read_config(config_path)
        settings.source = config_path
    else:
        found = find_config(cwd or Path.cwd())
        table, prefix = ({}, "")
        if found is not None:
            settings.source, table, prefix = found
    if not isinstance(table, dict):
        raise UsageError(f"{settings.source}: {prefix or 'the file'} must be a table")

    def place(*parts: str) -> str:
        dotted = ".".join(p for p in (prefix, *parts) if p)
        return f"{settings.source.name if settings.source else 'config'}: {dotted}"

    for key, value in table.items():
        if key in NOT_IN_FILES:
            raise UsageError(f"{place(key)}: not allowed in a config file; {NOT_IN_FILES[key]}")
        if key in TABLES:
            continue
        if key not in KEYS:
            raise UsageError(f"{place(key)}: unknown key (known: {', '.join([*KEYS, *TABLES])})")
        param, kind = KEYS[key]
        coerced = _coerce(kind, value, place(key), from_env=False)
        if settings.source is not None:
            directory = settings.source.parent
            if key in CODE_KEYS and ENTRY_POINT.fullmatch(coerced):
                if names_code(coerced, directory):
                    if not trust:
                        raise UsageError(
                            f"{place(key)}: {coerced!r} is code to import, and a config file "
                            "may not run code for whoever scans here; pass it on the command "
                            "line, or add --trust (NNHEALTH_TRUST=1) if you trust this "
                            "repository"
                        )
                else:  # a file named like an entry point: that file, wherever one scans
                    coerced = str((directory / coerced).resolve())
            if key in WRITE_KEYS:
                _inside(directory, coerced, place(key))
        if key in PATH_KEYS and settings.source is not None:
            coerced = _from_config_dir(settings.source.parent, coerced)
        if key in ("select", "ignore"):
            _check_codes(coerced, place(key))
        if param not in explicit:
            settings.values[param] = coerced
    for key, (param, kind) in KEYS.items():
        env = "NNHEALTH_" + key.upper().replace("-", "_")
        if env in environ and param not in explicit:
            settings.values[param] = _coerce(kind, environ[env], env, from_env=True)
            if key in ("select", "ignore"):
                _check_codes(settings.values[param], env)
    _checks_table(table.get("checks", {}), place, settings)
    _ignores_table(table.get("per-layer-ignores", {}), place, settings)
    return settings


def _check_codes(codes: list[str], where: str) -> None:
    from nnhealth.analyzers import select_checks

    if not codes:
        raise UsageError(f"{where}: names no check (an empty list); leave it out instead")

    try:
        select_checks(codes, None)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _checks_table(table: Any, place, settings: Settings) -> None:
    from nnhealth.analyzers import lookup

    if not isinstance(table, dict):
        raise UsageError(f"{place('checks')}: expected a table of checks")
    for name, opts in table.items():
        check = lookup(name)
        if check is None:
            raise UsageError(f"{place('checks', name)}: unknown check (see `nnhealth checks`)")
        if not isinstance(opts, dict):
            raise UsageError(f"{place('checks', name)}: expected a table of options")
        overrides = {}
        for key, value in opts.items():
            where = place("checks", name, key)
            if key == "severity":
                try:
                    settings.severities[check.code] = Severity.parse(value)
                except ValueError:
                    raise UsageError(
                        f"{where}: expected error, warning or info, got {value!r}"
                    ) from None
                continue
            option = next((o for o in check.options if o.name == key), None)
            if option is None:
                known = ", ".join([o.name for o in check.options] + ["severity"])
                raise UsageError(f"{where}: unknown option (known: {known})")
            low, high = option.bounds
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < low
                or (high is not None and value > high)
            ):
                span = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g}"
                raise UsageError(
                    f"{where}: expected a number {'in ' if high else ''}{span}, got {value!r}"
                )
            overrides[key] = value
        settings.check_options.setdefault(check.code, {}).update(overrides)


def _ignores_table(table: Any, place, settings: Settings) -> None:
    from nnhealth.analyzers import select_checks

    if not isinstance(table, dict):
        raise UsageError(f"{place('per-layer-ignores')}: expected a table of glob = [codes]")
    for pattern, codes in table.items():
        where = place("per-layer-ignores", pattern)
        if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
            raise UsageError(f"{where}: expected a list of check codes or names")
        try:
            chosen = select_checks(codes, None)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
        settings.layer_ignores.append((pattern, frozenset(c.code for c in chosen)))


def layer_ignored(layer: str | None, code: str, ignores: list[tuple[str, frozenset[str]]]) -> bool:
    return layer is not None and any(
        code in codes and fnmatch.fnmatchcase(layer, pattern) for pattern, codes in ignores
    )
