"""The check interface: one class per check, and everything about the check in it.

A check declares what it needs from the pass (``needs``: ``weights``, ``activations``,
``gradients``, ``curvature``; ``request`` for more), its thresholds as named options
with defaults and reasons, and a pure ``run(capture, options) -> list[Finding]``.
Beside it, the check owns:

- ``metrics(capture, options)``: its columns of the report's layer table;
- ``fixes(finding, ctx)``: what ``--what-if`` can apply to a copy of the model;
- ``score(finding)``: the number a baseline compares (larger is worse);
- ``label(finding)``: the finding's metric in a few words, before/after a fix;
- its docstring: what ``nnhealth explain CODE`` prints.

A check without one of these (or without the docstring's sections) is refused at class
creation: a check with no fix or no score says so by returning ``[]`` or ``None``.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from nnhealth.analyzers._fixes import Fix, FixContext
from nnhealth.capture.stats import Capture
from nnhealth.findings import Finding, Number, Severity
from nnhealth.plan import Request

REQUIRED_SECTIONS = ("What it detects", "Why it matters", "Example", "How to fix")
# "modules": which module (and its type) each parameter belongs to, known unless the
# input is a bare state_dict
NEEDS = frozenset({"weights", "modules", "activations", "gradients", "curvature"})
# what every check defines itself (the base class only declares them)
REQUIRED_ATTRIBUTES = ("code", "name", "summary", "needs")
REQUIRED_METHODS = ("run", "metrics", "fixes", "score", "label")


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
        absent = [a for a in REQUIRED_ATTRIBUTES if not hasattr(cls, a)]
        if absent:
            raise TypeError(f"{cls.__name__}: lacks {absent}")
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
        inherited = [m for m in REQUIRED_METHODS if defined_in(cls, m) is Check]
        if inherited:
            raise TypeError(
                f"{cls.__name__}: does not define {inherited} (a check with no fix, score or "
                "metrics returns [], None or {} and says why)"
            )

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
        """Columns of the report's layer table: ``{key: {column: value}}``, keyed by the
        site name for a nonlinearity's row and by the module name for a layer's."""
        raise NotImplementedError

    def fixes(self, finding: Finding, ctx: FixContext) -> list[Fix]:
        """The fixes of ``finding`` that ``--what-if`` can apply to a copy of the model."""
        raise NotImplementedError

    def score(self, finding: Finding) -> float | None:
        """The finding's size for baselines: larger is worse; None when there is none."""
        raise NotImplementedError

    def label(self, finding: Finding) -> str:
        """The finding's metric in a few words (``--what-if`` before/after a fix)."""
        raise NotImplementedError

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


def defined_in(cls: type, attribute: str) -> type | None:
    """The class of ``cls``'s MRO that defines ``attribute``."""
    return next((k for k in cls.__mro__ if attribute in vars(k)), None)


def deviation(value: Any, healthy: float = 1.0) -> float | None:
    """Orders of magnitude away from ``healthy`` (0 is infinitely far), for scores."""
    if value is None:
        return None
    if value == 0:
        return math.inf
    return abs(math.log10(abs(value) / healthy))


def pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x >= 0.01 or x == 0 else f"{100 * x:.2g}%"


def num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"
