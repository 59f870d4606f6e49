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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nnhealth._util import ENTRY_POINT, regular_file
from nnhealth.errors import UsageError, flag
from nnhealth.findings import Severity
from nnhealth.options import BY_NAME, KEYS, OPTIONS, Codes, Flag, Option, Role

# tables in [tool.nnhealth] besides the options' keys (nnhealth.options.KEYS)
TABLES = ("checks", "per-layer-ignores")


def _from_config_dir(directory: Path, value: str) -> str:
    """``value`` relative to ``directory``: a path, or the .py file of file.py:factory.
    Module entry points (pkg.module:factory) are left alone."""
    path, colon, attr = value.rpartition(":") if ":" in value else (value, "", "")
    if colon and not path.endswith(".py"):
        return value
    if Path(path).is_absolute():
        return value
    return str(directory / path) + (colon + attr)


def names_code(value: str, directory: Path) -> bool:
    """Whether a model/arch value is an entry point (pkg.module:factory, file.py:factory)
    rather than a file to read (an existing file wins, as on the command line; resolve
    then makes the value that file's absolute path, so that the loader, which looks
    from the current directory, sees the same file and not a module)."""
    return bool(ENTRY_POINT.fullmatch(value)) and not (directory / value).exists()


# what a report written over it could turn into code: git hooks, Python sources and
# path files, executables
_CODE_SUFFIXES = (".py", ".pyc", ".pth", ".so", ".sh", ".bash", ".ps1", ".bat")


_WRITE_FLAGS = " or ".join(flag(o.name) for o in OPTIONS if o.role is Role.WRITE)


def _inside(directory: Path, value: str, where: str) -> None:
    target = (directory / value).resolve()
    try:
        inner = target.relative_to(directory.resolve())
    except ValueError:
        raise UsageError(
            f"{where}: {value!r} is outside the config file's directory; a config file may "
            f"only write inside its own tree (give the path with {_WRITE_FLAGS})"
        ) from None
    if (
        ".git" in inner.parts
        or target.suffix.lower() in _CODE_SUFFIXES
        or (target.is_file() and os.access(target, os.X_OK))
    ):
        raise UsageError(
            f"{where}: {value!r} is code or repository metadata (a .git file, a script, an "
            f"executable); a config file may not write there (give the path with {_WRITE_FLAGS})"
        )


@dataclass
class Settings:
    values: dict[str, Any] = field(default_factory=dict)  # scan parameter -> value
    check_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    severities: dict[str, Severity] = field(default_factory=dict)  # check code -> severity
    layer_ignores: list[tuple[str, frozenset[str]]] = field(default_factory=list)
    source: Path | None = None


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
        raise UsageError(f"{flag('config')} {path}: no such file")
    data = _load(path)
    if "tool" in data and isinstance(data["tool"], dict) and "nnhealth" in data["tool"]:
        return data["tool"]["nnhealth"], "tool.nnhealth"
    if path.name == "pyproject.toml":
        raise UsageError(f"{flag('config')} {path}: has no [tool.nnhealth] table")
    return data, ""


def resolve(
    explicit: set[str],
    config_path: Path | None,
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    trust: bool = False,
) -> Settings:
    """Settings for every scan parameter not given on the command line (``explicit``).

    A file may not name code to import (``model``/``arch`` as an entry point) unless
    ``trust``, nor write outside its own directory tree."""
    environ = os.environ if environ is None else environ
    settings = Settings()
    table, prefix = _table(config_path, cwd, settings)

    def place(*parts: str) -> str:
        dotted = ".".join(p for p in (prefix, *parts) if p)
        return f"{settings.source.name if settings.source else 'config'}: {dotted}"

    for key, value in table.items():
        if key not in TABLES:
            option = _option(key, place(key))
            value = _from_file(option, value, place(key), settings.source, trust)
            if option.name not in explicit:
                settings.values[option.name] = value
    for option in KEYS.values():  # the variables beat the file
        if option.env in environ and option.name not in explicit:
            value = option.read(environ[option.env], option.env, text=True)
            if isinstance(option.kind, Codes):
                _check_codes(value, option.env)
            settings.values[option.name] = value
    _checks_table(table.get("checks", {}), place, settings)
    _ignores_table(table.get("per-layer-ignores", {}), place, settings)
    return settings


def _table(config_path: Path | None, cwd: Path | None, settings: Settings) -> tuple[dict, str]:
    """The [tool.nnhealth] table (or nnhealth.toml) and its dotted prefix; records its
    file in ``settings.source``."""
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
    return table, prefix


def _option(key: str, where: str) -> Option:
    """The option a file's ``key`` sets; refused when there is none or files may not set it
    (trust: a repository must not be able to turn on unpickling for its users)."""
    option = KEYS.get(key)
    if option is not None:
        return option
    other = BY_NAME.get(key.replace("-", "_"))
    if other is not None and other.key is None:
        also = f" or set {other.env}=1" if other.env and isinstance(other.kind, Flag) else ""
        raise UsageError(
            f"{where}: not allowed in a config file; pass {flag(other.name)}{also} instead"
        )
    raise UsageError(f"{where}: unknown key (known: {', '.join([*KEYS, *TABLES])})")


def _from_file(option: Option, value: Any, where: str, source: Path | None, trust: bool) -> Any:
    """A file's value for ``option``: checked, and paths taken from the file's directory.
    An entry point (code to import) only with ``trust``, or a cloned repository would run
    its own code for whoever scans in it; files written only inside the file's tree."""
    value = option.read(value, where, text=False)
    if isinstance(option.kind, Codes):
        _check_codes(value, where)
    if source is None or option.role is None:
        return value
    directory = source.parent
    if option.role is Role.CODE and ENTRY_POINT.fullmatch(value):
        if not names_code(value, directory):  # a file named like an entry point: that file
            value = str((directory / value).resolve())
        elif not trust:
            raise UsageError(
                f"{where}: {value!r} is code to import, and a config file may not run code "
                f"for whoever scans here; pass it on the command line, or add "
                f"{flag('trust')} ({BY_NAME['trust'].env}=1) if you trust this repository"
            )
    if option.role is Role.WRITE:
        _inside(directory, value, where)
    if option.role is Role.CODE:
        return _from_config_dir(directory, value)
    # a file to read or write: always from the file's directory, a colon included
    # ("rep:ort.txt" is a file name, not an entry point)
    return value if Path(value).is_absolute() else str(directory / value)


def _check_codes(codes: list[str], where: str) -> None:
    from nnhealth.analyzers import select_checks

    try:
        select_checks(codes, None)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


def _checks_table(table: Any, place, settings: Settings) -> None:
    """[tool.nnhealth.checks.NAME]: per-check thresholds and severity."""
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
            if key != "severity":
                overrides[key] = _threshold(check, key, value, where)
                continue
            try:
                settings.severities[check.code] = Severity.parse(value)
            except ValueError:
                raise UsageError(
                    f"{where}: expected error, warning or info, got {value!r}"
                ) from None
        settings.check_options.setdefault(check.code, {}).update(overrides)


def _threshold(check: Any, key: str, value: Any, where: str) -> Any:
    """``value`` for the option ``key`` of ``check``, within its bounds."""
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
        raise UsageError(f"{where}: expected a number {'in ' if high else ''}{span}, got {value!r}")
    return value


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
