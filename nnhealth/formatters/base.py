from __future__ import annotations

from dataclasses import dataclass

from nnhealth.findings import Report


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
