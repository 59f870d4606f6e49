"""The check interface: one class per check, its docstring is its documentation.

A check declares what it needs from the pass (``weights``, ``activations``,
``gradients``), its thresholds as named options with defaults and reasons, and a pure
``run(capture, options) -> list[Finding]``. ``nnhealth explain CODE`` prints the
docstring and the options; a check without the required docstring sections is refused
at class creation.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from nnhealth.capture.stats import Capture
from nnhealth.findings import Finding, Number, Severity
from nnhealth.plan import Request

REQUIRED_SECTIONS = ("What it detects", "Why it matters", "Example", "How to fix")
NEEDS = frozenset({"weights", "activations", "gradients", "curvature"})


@dataclass(frozen=True)
class Option:
    """A named threshold: its default and the reason for that default."""

    name: str
    default: float | int | None  # None: unset unless the scan supplies it (e.g. --lr)
    doc: str

    @property
    def bounds(self) -> tuple[float, float | None]:
        """Valid values: fractions in [0, 1], every other threshold >= 0."""
        return (0.0, 1.0) if "fraction" in self.name else (0.0, None)


class Check:
    code: ClassVar[str]
    name: ClassVar[str]
    summary: ClassVar[str]
    needs: ClassVar[frozenset[str]]
    # data the check also looks at when the pass has it (NH001: gradients), not required
    uses: ClassVar[frozenset[str]] = frozenset()
    options: ClassVar[tuple[Option, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not re.fullmatch(r"NH\d{3}", cls.code):
            raise TypeError(f"{cls.__name__}: code {cls.code!r} is not of the form NH123")
        if not re.fullmatch(r"[a-z]+(-[a-z]+)*", cls.name):
            raise TypeError(f"{cls.__name__}: name {cls.name!r} is not kebab-case")
        doc = inspect.getdoc(cls) or ""
        missing = [s for s in REQUIRED_SECTIONS if f"{s}:" not in doc]
        if missing:
            raise TypeError(f"{cls.__name__}: docstring lacks sections {missing}")
        if not (cls.needs | cls.uses) <= NEEDS:
            raise TypeError(f"{cls.__name__}: unknown needs {set(cls.needs | cls.uses) - NEEDS}")

    @classmethod
    def doc(cls) -> str:
        return inspect.getdoc(cls) or ""

    @classmethod
    def defaults(cls) -> dict[str, float | int]:
        return {o.name: o.default for o in cls.options}

    @classmethod
    def resolve_options(cls, overrides: dict[str, Any] | None) -> dict[str, Any]:
        opts = cls.defaults()
        for key, value in (overrides or {}).items():
            if key not in opts:
                known = ", ".join(opts) or "none"
                raise ValueError(f"{cls.name}: unknown option {key!r} (known: {known})")
            if value is None and opts[key] is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                # ValueError: config and --option errors are all reported as bad values
                raise ValueError(f"{cls.name}.{key}: expected a number, got {value!r}")  # noqa: TRY004
            opts[key] = value
        return opts

    @classmethod
    def request(cls, options: dict[str, Any]) -> Request:
        """What the pass must produce for this check beyond its ``needs``."""
        return Request()

    def run(self, capture: Capture, options: dict[str, Any]) -> list[Finding]:
        raise NotImplementedError

    def metrics(self, capture: Capture, options: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Per-layer numbers for the report's layer table, keyed by module name."""
        return {}

    def finding(
        self,
        severity: Severity,
        layer: str | None,
        message: str,
        evidence: dict[str, Number],
        fix: str,
        snippet: str | None = None,
        kind: str = "",
    ) -> Finding:
        return Finding(
            kind=kind,
            code=self.code,
            check=self.name,
            severity=severity,
            layer=layer,
            message=message,
            evidence=evidence,
            fix=fix,
            fix_snippet=snippet,
        )


def pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.01 or x == 0 else f"{100 * x:.2g}%"


def num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"
