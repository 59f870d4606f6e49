"""Output formats: one small class per format behind one interface."""

from __future__ import annotations

import enum

from nnhealth.formatters.base import Formatter, RenderOptions
from nnhealth.formatters.json import JsonFormatter
from nnhealth.formatters.text import TextFormatter


class Format(str, enum.Enum):
    text = "text"
    json = "json"


FORMATTERS: dict[Format, type[Formatter]] = {
    Format.text: TextFormatter,
    Format.json: JsonFormatter,
}


def get_formatter(fmt: Format | str, options: RenderOptions | None = None) -> Formatter:
    return FORMATTERS[Format(fmt)](options or RenderOptions())


__all__ = ["FORMATTERS", "Format", "Formatter", "RenderOptions", "get_formatter"]
