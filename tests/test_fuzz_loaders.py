"""Property-based fuzzing of the loaders: random bytes, truncations, bit flips and
corrupted zip members of real small files (torch.save of a module, a state_dict and a
batch, in both formats; .npz; .npy; safetensors; a TorchScript archive that writes a file
when it loads).

Whatever the bytes, ``load_model`` (without --trust), ``read_weights`` and ``load_batch``
either load or raise an ``NnhealthError`` with a one-line message; they write nothing,
and memory stays bounded (free memory is pretended to be ``LIMIT``, so anything a file
declares beyond it must be refused before it is allocated).

``NNHEALTH_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_loaders.py`` runs a longer campaign.
"""

from __future__ import annotations

import functools
import io
import os
import resource
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import WritesOnLoad
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from nnhealth import memory
from nnhealth.errors import NnhealthError
from nnhealth.loading.batch import load_batch
from nnhealth.loading.model import load_model, read_weights

EXAMPLES = int(os.environ.get("NNHEALTH_FUZZ_EXAMPLES", "25"))
LIMIT = 256 * 2**20  # the free memory the loaders are told they have
RSS_GROWTH = 400 * 2**20  # what one example may add to the process's peak memory

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=EXAMPLES <= 25,  # the short run is the same every time: no flaky CI
    database=None,
)


def _saved(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


@functools.cache
def seeds() -> dict[str, bytes]:
    """Real small files, built once: name -> bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    npz, npy = io.BytesIO(), io.BytesIO()
    np.savez(npz, inputs=x.numpy(), labels=y.numpy())
    np.save(npy, x.numpy())
    from safetensors.torch import save

    ts = io.BytesIO()
    with warnings.catch_warnings():  # torch.jit's deprecation notes differ by version
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(WritesOnLoad("MARKER")), ts)
    return {
        "module.pt": _saved(model),
        "state.pt": _saved(model.state_dict()),
        "state-legacy.pt": _saved(model.state_dict(), _use_new_zipfile_serialization=False),
        "batch.pt": _saved((x, y)),
        "batch-legacy.pt": _saved({"inputs": x, "labels": y}, _use_new_zipfile_serialization=False),
        "batch.npz": npz.getvalue(),
        "batch.npy": npy.getvalue(),
        "state.safetensors": save(model.state_dict()),
        "script.pt": ts.getvalue(),
    }


SEED_NAMES = sorted(seeds())
ZIP_SEEDS = [n for n in SEED_NAMES if seeds()[n][:4] == b"PK\x03\x04"]


# --- mutations ------------------------------------------------------------------------------


@st.composite
def byte_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """A truncation, bit flips, an overwritten or inserted run, or a deleted slice."""
    n = len(data)
    kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, max(n - 1, 0)))]
    if kind == "flip":
        out = bytearray(data)
        for pos, bit in draw(
            st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 7)), min_size=1, max_size=8)
        ):
            out[pos] ^= 1 << bit
        return bytes(out)
    pos = draw(st.integers(0, n))
    if kind == "delete":
        return data[:pos] + data[pos + draw(st.integers(1, 64)) :]
    chunk = draw(
        st.one_of(
            st.binary(min_size=1, max_size=32),
            # numbers a size field might hold: huge, negative, zero, boundary
            st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1]).map(
                lambda v: struct.pack("<Q", v)
            ),
        )
    )
    if kind == "insert":
        return data[:pos] + chunk + data[pos:]
    return data[:pos] + chunk + data[pos + len(chunk) :]


@st.composite
def zip_member_mutation(draw: st.DrawFn, data: bytes) -> bytes:
    """Mutate one member of a real zip and re-zip it with valid CRCs, so the damage gets
    past the checksum check into the pickle, the .npy header or the tensor data; or
    make a member's directory entry declare another size."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = [(info, zf.read(info)) for info in zf.infolist()]
    index = draw(st.integers(0, len(members) - 1))
    info, content = members[index]
    out = io.BytesIO()
    if draw(st.booleans()) and content:
        members[index] = (info, draw(byte_mutation(content)))
    else:  # a duplicate or renamed member
        name = draw(st.sampled_from([info.filename, info.filename + "x", "archive/data.pkl"]))
        members.insert(index, (name, draw(byte_mutation(content or b"\x00"))))
    compress = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # duplicate names
        with zipfile.ZipFile(out, "w", compression=compress) as zf:
            for member, payload in members:
                name = member.filename if isinstance(member, zipfile.ZipInfo) else member
                zf.writestr(name, payload)
    result = out.getvalue()
    if draw(st.booleans()):  # a central directory entry that lies about the size
        pos = result.rfind(b"PK\x01\x02")
        size = draw(st.sampled_from([0, 1, 2**20, 2**31 - 1, 2**32 - 1]))
        result = result[: pos + 24] + struct.pack("<I", size) + result[pos + 28 :]
    return result


# --- the property ---------------------------------------------------------------------------


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


LOADERS: list[tuple[str, Callable[[str], object]]] = [
    ("load_model", lambda p: load_model(p, trust=False)),
    ("read_weights", lambda p: read_weights(Path(p))),
    ("load_batch", load_batch),
]


def check_loaders(content: bytes, name: str = "file.pt") -> None:
    """Every loader on ``content``: a load, or a one-line NnhealthError; nothing written
    beside the file, no marker, memory bounded."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(memory, "available", lambda: LIMIT),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # torch's deprecation notes on odd but valid files
        directory = Path(tmp)
        path = directory / name
        path.write_bytes(content)
        before = sorted(os.listdir(directory))
        rss = _rss()
        cwd = os.getcwd()
        os.chdir(directory)  # a TorchScript marker would appear here
        try:
            for loader_name, loader in LOADERS:
                try:
                    loader(str(path))
                except NnhealthError as exc:
                    text = str(exc)
                    assert text and "\n" not in text, (loader_name, text)
                except BaseException as exc:
                    raise AssertionError(
                        f"{loader_name} raised {type(exc).__name__}: {exc}"
                    ) from exc
        finally:
            os.chdir(cwd)
        assert sorted(os.listdir(directory)) == before, "a loader wrote a file"
        assert not (directory / "MARKER").exists()
        assert _rss() - rss < RSS_GROWTH, f"peak memory grew by {(_rss() - rss) / 2**20:.0f} MiB"


@FUZZ
@given(data=st.data(), name=st.sampled_from(SEED_NAMES))
def test_mutated_real_files(data: st.DataObject, name: str) -> None:
    seed = seeds()[name]
    check_loaders(data.draw(byte_mutation(seed), label="mutated"), name)


@FUZZ
@given(data=st.data(), name=st.sampled_from(ZIP_SEEDS))
def test_corrupted_zip_members(data: st.DataObject, name: str) -> None:
    seed = seeds()[name]
    check_loaders(data.draw(zip_member_mutation(seed), label="rezipped"), name)


# prefixes that route random bytes to each parser
PREFIXES = [
    b"",
    b"PK\x03\x04",
    b"\x80\x02",
    b"\x93NUMPY\x01\x00",
    b"\x10\x00\x00\x00\x00\x00\x00\x00{",
]


@FUZZ
@given(prefix=st.sampled_from(PREFIXES), tail=st.binary(max_size=512))
def test_random_bytes(prefix: bytes, tail: bytes) -> None:
    check_loaders(prefix + tail)


@pytest.mark.parametrize("name", SEED_NAMES)
def test_unmutated_seeds_load_where_they_should(name: str) -> None:
    """The seeds themselves: each loads with the loader it is meant for (so the fuzzing
    starts from files that work), and none writes the marker without --trust."""
    check_loaders(seeds()[name], name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(seeds()[name])
        if name.startswith("batch"):
            assert load_batch(str(path)).shape == [6, 4]
        elif name.startswith("state"):
            assert set(read_weights(path)) == {"0.weight", "0.bias", "2.weight", "2.bias"}
        elif name == "module.pt":
            assert isinstance(load_model(str(path)).model, nn.Sequential)
        else:
            with pytest.raises(NnhealthError, match="TorchScript"):
                load_model(str(path))


@settings(FUZZ, max_examples=max(EXAMPLES // 3, 6))
@given(data=st.data(), name=st.sampled_from(SEED_NAMES))
def test_mutated_files_through_the_command_line(data: st.DataObject, name: str) -> None:
    """The whole scan on a mutated file, as model and as batch: exit 0 or 1 with a
    report, or exit 2 with one line on stderr that is never an internal error."""
    import contextlib

    from nnhealth.cli import main

    content = data.draw(byte_mutation(seeds()[name]), label="mutated")
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(memory, "available", lambda: LIMIT),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        path = Path(tmp) / name
        path.write_bytes(content)
        torch.save(nn.Linear(4, 3), Path(tmp) / "good.pt")
        before = sorted(os.listdir(tmp))
        for args in (
            ["scan", str(path), "--input-shape", "6x4", "--format", "json"],
            ["scan", str(Path(tmp) / "good.pt"), "--data", str(path), "--format", "json"],
        ):
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(args)
            if code == 2:
                lines = err.getvalue().strip().splitlines()
                assert len(lines) == 1 and "internal error" not in lines[0], err.getvalue()
                assert "Traceback" not in err.getvalue()
            else:
                assert code in (0, 1), (code, err.getvalue())
        assert sorted(os.listdir(tmp)) == before
