"""Output formats: one small class per format behind one interface."""

from __future__ import annotations

from nnhealth.formatters.base import Formatter, RenderOptions
from nnhealth.formatters.github import GithubFormatter
from nnhealth.formatters.html import HtmlFormatter
from nnhealth.formatters.json import JsonFormatter
from nnhealth.formatters.junit import JunitFormatter
from nnhealth.formatters.markdown import MarkdownFormatter
from nnhealth.formatters.sarif import SarifFormatter
from nnhealth.formatters.text import TextFormatter
from nnhealth.options import Format  # the --format choices, declared with the options

FORMATTERS: dict[Format, type[Formatter]] = {
    Format.text: TextFormatter,
    Format.json: JsonFormatter,
    Format.sarif: SarifFormatter,
    Format.github: GithubFormatter,
    Format.junit: JunitFormatter,
    Format.markdown: MarkdownFormatter,
    Format.html: HtmlFormatter,
}


def get_formatter(fmt: Format | str, options: RenderOptions | None = None) -> Formatter:
    return FORMATTERS[Format(fmt)](options or RenderOptions())


__all__ = ["FORMATTERS", "Format", "Formatter", "RenderOptions", "get_formatter"]
