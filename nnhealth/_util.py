"""Small helpers shared across stages."""

from __future__ import annotations

import re
from typing import Any, Protocol

from nnhealth.errors import NnhealthError


class Progress(Protocol):
    """Where a long stage reports: a message, and (done, total) when it has steps."""

    def __call__(self, message: str, steps: tuple[int, int] | None = None) -> None: ...


# pkg.module:factory or path/file.py:factory (the form; whether a file of that name
# exists decides, where it is read)
ENTRY_POINT = re.compile(r"[^:]+:[A-Za-z_][\w.]*")


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type name)."""
    # an nnhealth error keeps its option references: the message it ends up in renders them
    text = exc.message if isinstance(exc, NnhealthError) else str(exc)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def out_of_memory(exc: BaseException) -> bool:
    """An allocation failure: MemoryError, torch.OutOfMemoryError, or the RuntimeError
    the CPU allocator raises ("can't allocate memory")."""
    import sys

    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    if isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in text or "out of memory" in text.lower()
    )


def escaped(exc: BaseException) -> str:
    """What user code did, for a message: ``raised ValueError: bad shape``, or
    ``called sys.exit(0)`` (a SystemExit from user code is a failure, not an exit)."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    return f"raised {type(exc).__name__}: {first_line(exc)}"


def tensors_in(obj: Any) -> list:
    """Every tensor in a tensor / tuple / list / dict structure, depth first."""
    import torch

    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in tensors_in(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in tensors_in(item)]
    return []


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words (for 'is a FIFO, not a regular file')."""
    import stat

    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: Any, what: str, error: type[Exception]) -> None:
    """Raise ``error`` unless ``path`` is a regular file (following symlinks). Checked
    before opening: reading a FIFO blocks for ever, /dev/zero never ends."""
    import os
    import stat

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except OSError as exc:
        raise error(f"{path}: cannot read the {what} ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise error(
            f"{path}: is {file_kind(mode)}, not a regular file; save the {what} to a file and give its path"
        ) from None
