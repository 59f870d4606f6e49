from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from nnhealth.findings import Finding, Report

# the characters Python's repr writes by name
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(text: object, keep: str = "") -> str:
    """``text`` with every character that is not printable written out as Python's repr
    writes it (``\\x1b``, ``\\r``, ``\\u202e``, ``\\ud800``), except those in ``keep``.

    Layer names, kinds, paths and the messages that embed them come from the scanned
    file, a stranger's checkpoint. Non-printable here is ``str.isprintable``'s sense:
    Unicode's "Other" and "Separator" categories but the ASCII space, so C0 controls
    (ESC, BEL, CR, backspace, NUL), DEL, C1 (0x80-0x9f, CSI 0x9b among them), bidi
    overrides and isolates (U+202A-U+202E, U+2066-U+2069, the "trojan source" trick),
    zero-width and line/paragraph separators, lone surrogates and the noncharacters
    XML 1.0 cannot hold. None of them reaches a terminal, an XML file or a CI log raw,
    and the reader sees that they were there. Printable text, every ordinary name
    (``features.3``, ``encoder.layers.0:relu``, ``block.relu#2``) and backslashes are
    left as they are.
    """
    s = str(text)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() or c in keep else _escape(c) for c in s)


def _escape(c: str) -> str:
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def number_snippets(findings: Iterable[Finding], shared_only: bool = False) -> dict[str, int]:
    """Each distinct fix snippet of ``findings`` numbered 1, 2, ... in the order given
    (with ``shared_only``, only those more than one finding carries): a human report
    prints each snippet once and points the other findings at its number."""
    order = [f.fix_snippet for f in findings if f.fix_snippet]
    counts = Counter(order)
    kept = dict.fromkeys(s for s in order if counts[s] > 1 or not shared_only)
    return {s: i for i, s in enumerate(kept, 1)}


@dataclass(frozen=True)
class RenderOptions:
    color: bool = False
    width: int = 120
    verbose: bool = False
    quiet: bool = False
    fail_on: str = "error"  # the exit-code threshold, for formats that mark failures


class Formatter:
    """Turns a Report into text. Never prints."""

    name: str = ""

    def __init__(self, options: RenderOptions) -> None:
        self.options = options

    def render(self, report: Report) -> str:
        raise NotImplementedError
