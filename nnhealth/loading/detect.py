"""Tell a file's format from its contents, never its extension."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

from nnhealth.errors import LoadError
from nnhealth.loading import limits

TORCH_PICKLE = "torch.save"
TORCHSCRIPT = "torchscript"
EXPORT = "torch.export"
SAFETENSORS = "safetensors"
NPY = "npy"
NPZ = "npz"
ZIP_OTHER = "zip"
TRUNCATED_ZIP = "truncated zip"
CORRUPT_ZIP = "corrupt zip"
BAD_SAFETENSORS = "malformed safetensors"
UNKNOWN = "unknown"
_MAX_HEADER = 100 * 2**20  # safetensors caps its JSON header at 100 MB


def sniff(path: Path, error: type[Exception] = LoadError) -> str:
    """The format of the (regular) file at ``path``. Raises ``error`` for a zip whose
    declared sizes do not fit (a zip bomb), before anything inflates."""
    with path.open("rb") as fh:
        head = fh.read(16)
    if not head:
        return UNKNOWN
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _sniff_zip(path, error)
    if head.startswith(b"\x93NUMPY"):
        return NPY
    # safetensors first: a header of 128, 384, 640... bytes starts with 0x80 0x01..0x05,
    # as a pickle does; a legacy torch.save pickle has its magic number where the "{" is
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= _MAX_HEADER:
        return _sniff_safetensors(path, head)
    if head[:1] == b"\x80" and head[1:2] and head[1] <= 5:
        return TORCH_PICKLE  # legacy (non-zip) torch.save: a pickle stream
    if len(head) >= 9 and head[8:9] == b"{":
        return _sniff_safetensors(path, head)
    return UNKNOWN


def _sniff_zip(path: Path, error: type[Exception]) -> str:
    """A zip archive's format, from its member names, once its sizes and CRCs check."""
    try:
        if not zipfile.is_zipfile(path):
            return TRUNCATED_ZIP
        zf = zipfile.ZipFile(path)
    except Exception:  # noqa: BLE001 (any failure to parse the directory: unreadable)
        return TRUNCATED_ZIP
    with zf:
        names = zf.namelist()
        limits.check_zip(zf, path.stat().st_size, str(path), error)
        try:
            # torch.load does not check the zip CRCs: a flipped bit in the tensor data
            # would load silently as wrong weights. testzip reads every member once
            # (check_zip bounded how much that inflates).
            if zf.testzip() is not None:
                return CORRUPT_ZIP
        except Exception:  # noqa: BLE001 (bad deflate data, unknown method, encryption...)
            return TRUNCATED_ZIP
    return _zip_kind(names)


def _zip_kind(names: list[str]) -> str:
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return TORCHSCRIPT
    if any("serialized_exported_program" in n or n.endswith("archive_format") for n in names):
        return EXPORT
    if any(n.endswith("data.pkl") for n in names):
        return TORCH_PICKLE
    if names and all(n.endswith(".npy") for n in names):
        return NPZ
    return ZIP_OTHER


def _sniff_safetensors(path: Path, head: bytes) -> str:
    """An 8-byte header length, then that much JSON: safetensors (or nothing known)."""
    (n,) = struct.unpack("<Q", head[:8])
    if not 0 < n <= min(path.stat().st_size - 8, _MAX_HEADER):
        return UNKNOWN  # a length read from the file: never trust it before checking
    try:
        with path.open("rb") as fh:
            fh.seek(8)
            json.loads(fh.read(n))
        return SAFETENSORS
    except RecursionError:  # {"a":[[[[...]]]]} nested deeper than Python's stack
        return BAD_SAFETENSORS
    except (ValueError, OSError):
        return UNKNOWN


DESCRIPTIONS = {
    TORCH_PICKLE: "torch.save file",
    TORCHSCRIPT: "TorchScript archive",
    EXPORT: "torch.export archive",
    SAFETENSORS: "safetensors file",
    NPY: "NumPy .npy array",
    NPZ: "NumPy .npz archive",
    BAD_SAFETENSORS: "safetensors file with a malformed header",
}


def malformed_safetensors(where: str) -> str:
    return (
        f"{where}: a safetensors file whose JSON header is nested too deeply to read (a "
        "malformed or hostile header; real ones are 3 levels deep); save the weights again"
    )
