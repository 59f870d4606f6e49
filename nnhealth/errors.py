"""Expected failures: the tool could not do its job. Each maps to exit code 2.

The message is one line for the user: what went wrong, where, and what to do.
"""

from __future__ import annotations


class NnhealthError(Exception):
    """Base class: the subclass names the stage that failed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(NnhealthError):
    """Bad arguments or option values."""


class LoadError(NnhealthError):
    """The model could not be read, or reading it would be unsafe."""


class DataError(NnhealthError):
    """The batch could not be read, or does not fit the model or the loss."""


class CaptureError(NnhealthError):
    """The model raised during the instrumented forward/backward pass."""
