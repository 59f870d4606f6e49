"""Expected failures: the tool could not do its job. Each maps to exit code 2.

The message is one line for the user: what went wrong, where, and what to do.

A message names a scan option with ``flag("input_shape")`` rather than a command-line
spelling: ``str(exc)`` (the Python API) shows the keyword, ``input_shape``; the CLI
renders the same message with ``exc.render(cli_names)``, ``--input-shape``. The library
never writes a CLI flag itself.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

_MARK = re.compile(r"\x02([a-z_]+)\x03")


def flag(name: str) -> str:
    """A reference to the scan option ``name`` (its ``ScanOptions``/keyword name), to be
    rendered by whoever shows the message (keyword for the API, flag for the CLI)."""
    return f"\x02{name}\x03"


def render_flags(text: str, names: Mapping[str, str] | Callable[[str], str] | None = None) -> str:
    """``text`` with each ``flag(name)`` replaced by ``names[name]`` (default: ``name``)."""

    def one(match: re.Match[str]) -> str:
        key = match.group(1)
        if names is None:
            return key
        if callable(names):
            return names(key)
        return names.get(key, key)

    return _MARK.sub(one, text)


def report_text(text: str) -> str:
    """``text`` for the report (a note, a skip reason, a what-if note): option references
    spelled as command-line flags, as the report's other text spells them."""
    from nnhealth.options import FLAGS

    return render_flags(text, FLAGS)


class NnhealthError(Exception):
    """Base class: the subclass names the stage that failed."""

    def __init__(self, message: str) -> None:
        super().__init__(render_flags(message))  # args and repr: the API's spelling
        self.message = message  # with the option references, for whoever renders it

    def __str__(self) -> str:
        return render_flags(self.message)

    def render(self, names: Mapping[str, str] | Callable[[str], str]) -> str:
        """The message with option references spelled by ``names`` (CLI flags)."""
        return render_flags(self.message, names)


class UsageError(NnhealthError):
    """Bad arguments or option values."""


class LoadError(NnhealthError):
    """The model could not be read, or reading it would be unsafe."""


class DataError(NnhealthError):
    """The batch could not be read, or does not fit the model or the loss."""


class CaptureError(NnhealthError):
    """The model raised during the instrumented forward/backward pass."""
