"""Hostile model, weights and batch files: each is refused with one line (exit 2) before
it can run code, write a file or allocate what the file merely declares.

Every file is built here, in tmp_path. Sizes that would be gigabytes are declared, never
allocated: the loaders must refuse before reading them (several tests bound free memory
with a monkeypatched ``nnhealth.memory.available`` so a limit bites at small sizes).
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import resource
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WritesOnLoad, he_mlp, listing, one_line_error
from torch import nn

from nnhealth import memory
from nnhealth.errors import DataError, LoadError, NnhealthError, UsageError
from nnhealth.loading import limits
from nnhealth.loading.batch import Batch, load_batch, prepare, synthetic
from nnhealth.loading.model import load_model, read_weights

MiB = 2**20
GiB = 2**30


def scripted(module: nn.Module) -> torch.jit.ScriptModule:
    """torch.jit.script, whose deprecation warnings (torch 2.13 and 2.14 word them
    differently) are not the test's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


def refused(error: type[NnhealthError], fn, *args, **kwargs) -> str:
    """The one-line message of the NnhealthError ``fn`` must raise, after the file's path
    (so that words in tmp_path's name cannot satisfy an assertion)."""
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    text = str(info.value)
    assert "\n" not in text and text, text
    if text.startswith("/"):
        path, _, text = text.partition(": ")
        assert Path(path).name and text, info.value
    return text


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@pytest.fixture
def free(monkeypatch: pytest.MonkeyPatch):
    """``free(n)``: pretend this process may allocate only n more bytes."""

    def set_free(nbytes: int | None) -> None:
        monkeypatch.setattr(memory, "available", lambda: nbytes)

    return set_free


# --- helpers that build hostile files -------------------------------------------------------


def torch_members(obj) -> list[tuple[zipfile.ZipInfo, bytes]]:
    """The members of ``torch.save(obj)``, as torch lays them out."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zf:
        return [(info, zf.read(info)) for info in zf.infolist()]


def write_zip(path: Path, members) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


def legacy_prefix() -> bytes:
    """The first three pickles of a legacy torch.save: magic number, protocol, sys info."""
    buf = io.BytesIO()
    torch.save(torch.zeros(1), buf, _use_new_zipfile_serialization=False)
    stream = io.BytesIO(buf.getvalue())
    for _ in range(3):
        for _ in pickletools.genops(stream):
            pass
    return buf.getvalue()[: stream.tell()]


def legacy_file(path: Path, object_pickle: bytes, keys: list[str] | None = None) -> Path:
    path.write_bytes(legacy_prefix() + object_pickle + pickle.dumps(keys or [], protocol=2))
    return path


class CallsLinear:
    """Unpickles as Linear(100000, 100000): 40 GB of weights from a 1 KB file."""

    def __reduce__(self):
        return (nn.Linear, (100000, 100000))


def set_declared_size(path: Path, member: str, size: int) -> None:
    """Make the zip's local header and central directory declare ``size`` uncompressed
    bytes for ``member`` (a lie the readers would only find out by inflating)."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(member).header_offset
    assert data[local : local + 4] == b"PK\x03\x04"
    struct.pack_into("<I", data, local + 22, size)
    name = member.encode()
    central = 0
    while True:
        central = data.index(b"PK\x01\x02", central)
        (name_len,) = struct.unpack_from("<H", data, central + 28)
        if data[central + 46 : central + 46 + name_len] == name:
            struct.pack_into("<I", data, central + 24, size)
            break
        central += 4
    path.write_bytes(bytes(data))


def deflated_torch_save(path: Path, nbytes: int) -> Path:
    """torch.save of a float32 zeros tensor of ``nbytes`` whose data/0 member is DEFLATE
    compressed (torch.load inflates it: miniz reads compressed members)."""
    numel = nbytes // 4
    members = torch_members({"w": torch.zeros(3)})
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in members:
            if info.filename.endswith("/data/0"):
                deflated = zipfile.ZipInfo(info.filename, date_time=info.date_time)
                deflated.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(deflated, "w") as out:
                    chunk = bytes(min(nbytes, 16 * MiB))
                    for start in range(0, nbytes, len(chunk)):
                        out.write(chunk[: min(len(chunk), nbytes - start)])
            elif info.filename.endswith("/data.pkl"):
                # the storage's element count (BININT1 3) and the size tuple (3,)
                data = data.replace(b"K\x03t", b"J" + struct.pack("<i", numel) + b"t")
                data = data.replace(b"K\x03\x85", b"J" + struct.pack("<i", numel) + b"\x85")
                zf.writestr(info, data)
            else:
                zf.writestr(info, data)
    return path


# --- 1. TorchScript is code ------------------------------------------------------------------


def test_torchscript_is_refused_without_trust_before_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "written-by-torchscript"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted(WritesOnLoad(str(marker))).save(str(tmp_path / "ts.pt"))
    assert not marker.exists()
    before = listing(tmp_path)
    line = refused(LoadError, load_model, str(tmp_path / "ts.pt"))
    assert "TorchScript" in line and "torch.from_file" in line
    assert "rerun with trust (or NNHEALTH_TRUST=1)" in line and "entry point" in line
    assert not marker.exists() and listing(tmp_path) == before
    # the danger is real: trusted, loading it writes the file (8 bytes: 2 float32)
    loaded = load_model(str(tmp_path / "ts.pt"), trust=True)
    assert loaded.format == "TorchScript" and marker.stat().st_size == 8


def test_torchscript_refusal_at_the_command_line(cli, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted(he_mlp([4, 8, 2])).save(str(tmp_path / "ts.pt"))
    line = one_line_error(cli("scan", tmp_path / "ts.pt", "--input-shape", "8x4"))
    assert "TorchScript" in line and "--trust" in line
    res = cli("scan", tmp_path / "ts.pt", "--input-shape", "8x4", "--trust", "-q")
    assert res.code == 0, res.err


# --- 2. a pickle that calls an allowlisted class, however it hides --------------------------


def test_decoy_pickle_member_does_not_hide_the_call(tmp_path: Path) -> None:
    """A benign archive/aadata.pkl before the real data.pkl (the old check read the first
    member ending in data.pkl); then two members both named archive/data.pkl (zipfile's
    lookup by name returns the last, torch's reader may take the first)."""
    rss = max_rss()
    members = torch_members({"w": torch.zeros(2)})
    data_pkl = next(info.filename for info, _ in members if info.filename.endswith("/data.pkl"))
    bomb = pickle.dumps({"model": CallsLinear()}, protocol=2)
    crafted = []
    for info, data in members:
        if info.filename == data_pkl:
            crafted += [(data_pkl.replace("data.pkl", "aadata.pkl"), data), (data_pkl, bomb)]
        else:
            crafted.append((info, data))
    write_zip(tmp_path / "decoy.pt", crafted)
    line = refused(LoadError, load_model, str(tmp_path / "decoy.pt"))
    assert "calls torch.nn.modules.linear.Linear" in line and "rerun with trust " in line
    with pytest.warns(UserWarning, match="Duplicate name"):
        write_zip(tmp_path / "twice.pt", [(data_pkl, bomb), *members])
    line = refused(LoadError, load_model, str(tmp_path / "twice.pt"))
    assert "calls torch.nn.modules.linear.Linear" in line
    assert max_rss() - rss < 200 * MiB


def test_protocol_4_stack_global_call_is_refused(tmp_path: Path) -> None:
    """Protocol 4 names the class with STACK_GLOBAL (module and name pushed as strings)."""
    payload = pickle.dumps({"model": CallsLinear()}, protocol=4)
    assert any(op.name == "STACK_GLOBAL" for op, _, _ in pickletools.genops(payload))
    members = [
        (info, payload if info.filename.endswith("/data.pkl") else data)
        for info, data in torch_members({"w": torch.zeros(2)})
    ]
    write_zip(tmp_path / "p4.pt", members)
    line = refused(LoadError, load_model, str(tmp_path / "p4.pt"))
    assert "calls torch.nn.modules.linear.Linear" in line


def test_legacy_format_call_is_refused(tmp_path: Path) -> None:
    """Legacy (non-zip) files: the grant-and-retry loop would have allowlisted Linear."""
    rss = max_rss()
    path = legacy_file(tmp_path / "old.pt", pickle.dumps({"model": CallsLinear()}, protocol=2))
    line = refused(LoadError, load_model, str(path))
    assert "calls torch.nn.modules.linear.Linear" in line and "rerun with trust " in line
    # torch.save's own legacy writer pickles the class as a persistent id: also seen
    buf = io.BytesIO()
    torch.save({"model": CallsLinear()}, buf, _use_new_zipfile_serialization=False)
    (tmp_path / "old2.pt").write_bytes(buf.getvalue())
    assert "calls torch.nn.modules.linear.Linear" in refused(
        LoadError, load_model, str(tmp_path / "old2.pt")
    )
    assert max_rss() - rss < 200 * MiB


def test_legacy_pickle_length_field_of_2_to_the_62(tmp_path: Path) -> None:
    """BINBYTES8 declaring 2^62 bytes: the walk must not ask the file for that many
    (a file object's read(n) allocates n bytes first)."""
    payload = b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"abc."
    path = legacy_file(tmp_path / "old.pt", payload)
    rss = max_rss()
    line = refused(LoadError, load_model, str(path))
    assert line.startswith("cannot read this torch.save file (its pickle is malformed: ")
    assert "4611686018427387904 bytes" in line
    assert max_rss() - rss < 100 * MiB


def test_a_pickle_calling_an_activation_function_is_refused(tmp_path: Path) -> None:
    """F.relu on a stride-0 view would allocate its full size: functions are not called."""

    class CallsRelu:
        def __reduce__(self):
            return (torch.nn.functional.relu, (torch.zeros(1).expand(10, 10),))

    torch.save({"model": CallsRelu()}, tmp_path / "f.pt")
    assert "calls torch.nn.functional.relu" in refused(
        LoadError, load_model, str(tmp_path / "f.pt")
    )


@pytest.mark.parametrize(
    "callee,args,needle",
    [
        (bytearray, (10**11,), "bytearray(100000000000)"),
        (torch.FloatTensor, (100000, 100000), "torch.FloatTensor(100000, 100000)"),
        (torch.storage.UntypedStorage, (10**12,), "UntypedStorage(1000000000000)"),
    ],
    ids=["bytearray", "tensor-class", "storage-class"],
)
def test_calls_that_allocate_from_numbers_in_the_file(
    tmp_path: Path, callee, args, needle: str
) -> None:
    """torch's own weights_only allowlist lets a pickle call these with any size."""

    class Allocates:
        def __reduce__(self):
            return (callee, args)

    rss = max_rss()
    torch.save({"inputs": torch.zeros(2, 2), "x": Allocates()}, tmp_path / "b.pt")
    line = refused(DataError, load_batch, str(tmp_path / "b.pt"))
    assert needle in line and "torch.save never does" in line
    torch.save({"w": torch.zeros(2), "x": Allocates()}, tmp_path / "w.pt")
    assert needle in refused(LoadError, read_weights, tmp_path / "w.pt")
    assert needle in refused(LoadError, load_model, str(tmp_path / "w.pt"))
    assert max_rss() - rss < 200 * MiB


def test_a_call_hidden_in_rebuild_from_type_is_seen(tmp_path: Path) -> None:
    """_rebuild_from_type_v2(func, type, args, state) calls func(*args) for the unpickler."""

    class Indirect:
        def __reduce__(self):
            return (torch._tensor._rebuild_from_type_v2, (bytearray, torch.Tensor, (10**11,), {}))

    torch.save({"inputs": torch.zeros(2, 2), "x": Indirect()}, tmp_path / "b.pt")
    assert "bytearray(100000000000)" in refused(DataError, load_batch, str(tmp_path / "b.pt"))


def test_genuine_files_with_every_rebuild_still_load(tmp_path: Path) -> None:
    """bytearray, bytes, sets, complex, Size, device, qtensors, parameters: what torch.save
    itself writes is never mistaken for a crafted call."""
    obj = {
        "inputs": torch.randn(4, 3),
        "labels": torch.tensor([0, 1, 0, 1]),
    }
    torch.save(obj, tmp_path / "b.pt")
    assert load_batch(str(tmp_path / "b.pt")).shape == [4, 3]
    with warnings.catch_warnings():  # quantized tensors are deprecated, still saved
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint8)
    weights = {
        "q": quantized,
        "w": nn.Parameter(torch.randn(3, 3)),
        "meta_data": torch.tensor([1.0]),
    }
    extras = {
        "b": bytearray(b"abc"),
        "s": {1, 2},
        "c": 1 + 2j,
        "size": torch.Size([2, 3]),
        "dev": torch.device("cpu"),
        "bytes": b"xyz",
        "epoch": 3,
    }
    for legacy in (False, True):
        torch.save(
            {"state_dict": weights, **extras},
            tmp_path / "w.pt",
            _use_new_zipfile_serialization=not legacy,
        )
        assert set(read_weights(tmp_path / "w.pt")) == {"q", "w", "meta_data"}
        facts = limits.torch_pickles(tmp_path / "w.pt", "w.pt", LoadError, trusted=False, hint="")
        assert facts.suspicious == [] and len(facts.storages) == 3
        # the storages' declared bytes: 4 quint8, 9 and 1 float32
        assert sorted(facts.storages.values()) == [4, 4, 36]


# --- 3. tiny files that declare gigabytes -----------------------------------------------------


def test_zip_bomb_torch_save_is_refused_before_inflating(tmp_path: Path, free) -> None:
    """32 MiB of zeros deflate to 32 KiB; torch.load would inflate them (miniz reads
    compressed members). Free memory bounded to 16 MiB: refused before testzip/torch.load."""
    path = deflated_torch_save(tmp_path / "bomb.pt", 32 * MiB)
    assert path.stat().st_size < 100_000
    free(None)  # unknown free memory: below the 256 MiB floor, a small compressed save loads
    assert read_weights(path)["w"].shape == (8 * MiB,)
    free(16 * MiB)
    for fn, error in (
        (lambda: load_model(str(path)), LoadError),
        (lambda: read_weights(path), LoadError),
        (lambda: load_batch(str(path)), DataError),
    ):
        line = refused(error, fn)
        assert "reading its members needs 32 MiB" in line and "16 MiB of free memory" in line


def test_zip_bomb_at_real_size_is_refused_by_its_ratio(tmp_path: Path) -> None:
    """A few-KB archive declaring 3.9 GB: refused by the inflation ratio whatever the
    free memory, before anything inflates (time and memory stay small)."""
    rss = max_rss()
    path = deflated_torch_save(tmp_path / "bomb.pt", 1 * MiB)
    member = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("/data/0"))
    set_declared_size(path, member, 3_900_000_000)
    for fn, error in (
        (lambda: load_model(str(path)), LoadError),
        (lambda: load_batch(str(path)), DataError),
    ):
        line = refused(error, fn)
        assert "inflates to 3.63 GiB" in line and "zip bomb" in line and "archive/data/0" in line
    # np.savez_compressed: the same for .npz
    np.savez_compressed(tmp_path / "b.npz", inputs=np.zeros((256, 1024), dtype=np.float32))
    set_declared_size(tmp_path / "b.npz", "inputs.npy", 3_900_000_000)
    assert "zip bomb" in refused(DataError, load_batch, str(tmp_path / "b.npz"))
    assert max_rss() - rss < 200 * MiB


def test_npz_member_declaring_more_than_it_holds(tmp_path: Path, free) -> None:
    path = tmp_path / "b.npz"
    with zipfile.ZipFile(path, "w") as zf, zf.open("inputs.npy", "w") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)}
        )
        fh.write(bytes(64))
    line = refused(DataError, load_batch, str(path))
    assert "member 'inputs.npy' declares 7.28 TiB of array data but holds 64 bytes" in line
    # compressed, honest, but more than free memory
    np.savez_compressed(path, inputs=np.zeros((1024, 1024), dtype=np.float32))
    free(2 * MiB)
    assert "reading its members needs 4 MiB" in refused(DataError, load_batch, str(path))
    free(None)
    assert load_batch(str(path)).shape == [1024, 1024]


def test_npy_header_declaring_a_trillion_elements(tmp_path: Path, free) -> None:
    """Today: numpy allocates the declared array first (MemoryError)."""
    path = tmp_path / "x.npy"
    with path.open("wb") as fh:
        np.lib.format.write_array_header_2_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)}
        )
        fh.write(bytes(400))
    line = refused(DataError, load_batch, str(path))
    assert "declares 3.64 TiB of array data but the file holds 400 bytes" in line
    np.save(path, np.zeros((512, 1024), dtype=np.float32))
    free(1 * MiB)
    assert "the array needs 2 MiB" in refused(DataError, load_batch, str(path))


def test_legacy_torch_save_declaring_more_storage_than_it_holds(tmp_path: Path) -> None:
    """The legacy format allocates each storage from the pickled element count."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(10)}, buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    stream = io.BytesIO(data)
    for _ in range(4):
        for _ in pickletools.genops(stream):
            pass
    object_end = stream.tell()
    head = data[:object_end]
    # the storage id ends with numel 10 (BININT1) and no view: declare 10**11 floats
    assert head.count(b"K\nNt") == 1
    crafted = head.replace(b"K\nNt", b"\x8a\x05" + (10**11).to_bytes(5, "little") + b"Nt")
    (tmp_path / "old.pt").write_bytes(crafted + data[object_end:])
    rss = max_rss()
    for fn, error in (
        (lambda: load_model(str(tmp_path / "old.pt")), LoadError),
        (lambda: read_weights(tmp_path / "old.pt"), LoadError),
        (lambda: load_batch(str(tmp_path / "old.pt")), DataError),
    ):
        assert "declares 373 GiB of tensor data" in refused(error, fn)
    assert max_rss() - rss < 200 * MiB
    (tmp_path / "good.pt").write_bytes(data)  # the genuine file still loads
    assert read_weights(tmp_path / "good.pt")["w"].shape == (10,)


def test_negative_storage_size_does_not_offset_a_huge_one(tmp_path: Path) -> None:
    """Two storages declaring -10^12 and +10^12 elements: the sum is not 0. Checked with
    --trust too: trusting the code is not trusting the sizes."""
    buf = io.BytesIO()
    torch.save(
        {"a": torch.zeros(10), "b": torch.zeros(10)}, buf, _use_new_zipfile_serialization=False
    )
    data = buf.getvalue()
    assert data.count(b"K\nNt") == 2
    crafted = data.replace(
        b"K\nNt", b"\x8a\x06" + (-(10**12)).to_bytes(6, "little", signed=True) + b"Nt", 1
    )
    crafted = crafted.replace(b"K\nNt", b"\x8a\x06" + (10**12).to_bytes(6, "little") + b"Nt", 1)
    (tmp_path / "old.pt").write_bytes(crafted)
    for trust in (False, True):
        line = refused(LoadError, load_model, str(tmp_path / "old.pt"), trust=trust)
        assert "declares 3.64 TiB of tensor data" in line


def test_astronomical_sizes_in_a_pickle_cost_no_time(tmp_path: Path) -> None:
    """A call with 100000 sizes of 2^63: their exact product would take minutes."""

    class Huge:
        def __reduce__(self):
            return (torch.FloatTensor, tuple([2**63 - 1] * 100000))

    torch.save({"inputs": Huge()}, tmp_path / "b.pt")
    start = time.perf_counter()
    line = refused(DataError, load_batch, str(tmp_path / "b.pt"))
    assert "torch.FloatTensor(9223372036854775807, " in line and "more than 2^70 bytes" in line
    assert time.perf_counter() - start < 2


def test_stride_zero_state_dict_is_refused_when_it_cannot_fit(tmp_path: Path, free) -> None:
    """torch.save keeps strides: 2 KB on disk, a 20000x20000 float32 view (1.49 GiB)."""
    torch.save({"w": torch.zeros(1).expand(20000, 20000), "b": torch.zeros(3)}, tmp_path / "s.pt")
    assert (tmp_path / "s.pt").stat().st_size < 4000
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)["w"]
    assert loaded.stride() == (0, 0) and loaded.untyped_storage().nbytes() == 4
    free(1 * GiB)
    for fn in (lambda: load_model(str(tmp_path / "s.pt")), lambda: read_weights(tmp_path / "s.pt")):
        line = refused(LoadError, fn)
        assert "'w' is a 20000x20000 view of 4 bytes of storage" in line and "1.49 GiB" in line
    # a pickled module whose weight is such a view
    lin = nn.Linear(1, 1)
    lin.weight = nn.Parameter(torch.zeros(1).expand(20000, 20000))
    torch.save(nn.Sequential(lin), tmp_path / "m.pt")
    line = refused(LoadError, load_model, str(tmp_path / "m.pt"))
    assert "parameter or buffer '0.weight'" in line
    # and a batch
    torch.save((torch.zeros(1).expand(20000, 20000), torch.zeros(20000)), tmp_path / "b.pt")
    assert "'inputs' is a 20000x20000 view" in refused(
        DataError, load_batch, str(tmp_path / "b.pt")
    )


def test_stride_zero_beyond_the_inflation_limit_is_refused_even_with_memory_free(
    tmp_path: Path, free
) -> None:
    """With 64 GiB free it would fit, but a 2 KB file declaring 1.49 GiB is the zip-bomb
    ratio (the weight checks materialize it more than once: 3.8 GB RSS measured)."""
    free(64 * GiB)
    torch.save({"w": torch.zeros(1).expand(20000, 20000), "b": torch.zeros(3)}, tmp_path / "s.pt")
    for fn in (lambda: load_model(str(tmp_path / "s.pt")), lambda: read_weights(tmp_path / "s.pt")):
        line = refused(LoadError, fn)
        assert "expands to 1.49 GiB more, beyond 100x its size" in line
    torch.save((torch.zeros(1).expand(20000, 20000), torch.zeros(2)), tmp_path / "b.pt")
    assert "beyond 100x its size" in refused(DataError, load_batch, str(tmp_path / "b.pt"))
    # under the 256 MiB floor any ratio loads: 4000x4000 (61 MiB) from 4 bytes
    torch.save({"w": torch.zeros(1).expand(4000, 4000)}, tmp_path / "ok.pt")
    assert read_weights(tmp_path / "ok.pt")["w"].shape == (4000, 4000)


def test_small_expanded_and_shared_tensors_still_load(tmp_path: Path, free) -> None:
    free(64 * MiB)
    shared = torch.randn(64, 64)
    state = {"a": shared, "tied": shared, "row": torch.randn(64).expand(32, 64), "t": shared.t()}
    torch.save(state, tmp_path / "s.pt")
    assert set(load_model(str(tmp_path / "s.pt")).state) == {"a", "tied", "row", "t"}
    torch.save((torch.randn(8).expand(16, 8), torch.zeros(16, dtype=torch.long)), tmp_path / "b.pt")
    assert load_batch(str(tmp_path / "b.pt")).shape == [16, 8]


def test_synthetic_batch_is_capped_by_bytes_against_free_memory(free) -> None:
    """46340x46340 is 2.1e9 values: under the old element cap, 34 GiB for the pass."""
    free(16 * GiB)
    rss = max_rss()
    line = refused(UsageError, synthetic, (46340, 46340), 0, None)
    assert "2,147,395,600 float32 values are 8 GiB" in line
    assert f"about {4}x its input (32 GiB)" in line and "16 GiB of free memory" in line
    # token ids are int64: twice the bytes of the same shape as floats
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    free(3 * MiB)
    # 131,072 values: float32 is 512 KiB (2 MiB for the pass), int64 twice that
    assert synthetic((256, 512), 0, None).inputs.dtype == torch.float32
    with pytest.raises(UsageError, match=r"131,072 int64 values are 1 MiB"):
        synthetic((256, 512), 0, emb)
    free(None)  # unknown: only the element cap
    assert synthetic((4, 4), 0, emb).inputs.dtype == torch.int64
    assert max_rss() - rss < 200 * MiB


def test_pickled_module_skeletons_that_would_crash_the_scan(tmp_path: Path) -> None:
    """A module that contains itself, one nested 150 deep (torch recurses per level), and
    one whose _modules holds a tensor: refused at load, not an internal error later."""
    cyclic = he_mlp([4, 8, 2])
    cyclic._modules["1"] = cyclic
    torch.save(cyclic, tmp_path / "cycle.pt")
    assert "contains itself" in refused(LoadError, load_model, str(tmp_path / "cycle.pt"))
    deep: nn.Module = nn.Linear(4, 4)
    for _ in range(150):
        deep = nn.Sequential(deep)
    torch.save(deep, tmp_path / "deep.pt")
    assert "nested more than 100 levels" in refused(
        LoadError, load_model, str(tmp_path / "deep.pt")
    )
    odd = he_mlp([4, 8, 2])
    odd._modules["1"] = torch.zeros(2)
    torch.save(odd, tmp_path / "odd.pt")
    line = refused(LoadError, load_model, str(tmp_path / "odd.pt"))
    assert "a Sequential module whose _modules is malformed" in line
    # shared (not cyclic) submodules are fine
    shared = nn.Linear(4, 4)
    torch.save(nn.Sequential(shared, nn.ReLU(), shared), tmp_path / "shared.pt")
    assert isinstance(load_model(str(tmp_path / "shared.pt")).model, nn.Sequential)


def test_small_expanded_buffer_in_a_module_scans(cli, tmp_path: Path) -> None:
    """Made contiguous at load: the scan writes buffers back, which torch refuses on a
    stride-0 view (an internal error before)."""
    model = he_mlp([4, 8, 2])
    model[0].register_buffer("scale", torch.ones(1).expand(8, 4))
    model[2].weight = nn.Parameter(torch.randn(2, 1).expand(2, 8))
    torch.save(model, tmp_path / "m.pt")
    loaded = load_model(str(tmp_path / "m.pt"))
    assert loaded.model[0].scale.stride() == (4, 1) and loaded.model[2].weight.is_contiguous()
    assert "2 expanded (stride-0) parameters or buffers made contiguous" in loaded.notes
    res = cli("scan", tmp_path / "m.pt", "--input-shape", "16x4", "-q")
    assert res.code in (0, 1), res.err


# --- 3e. FIFOs and devices ---------------------------------------------------------------------


def _run_isolated(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with a timeout: a FIFO opened by mistake
    would block for ever, /dev/zero would be read until memory runs out."""
    return subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_fifo_and_devices_are_refused_without_being_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    code = f"""
from pathlib import Path
from nnhealth.errors import NnhealthError
from nnhealth.loading.model import load_model, read_weights
from nnhealth.loading.batch import load_batch
for target in ({str(fifo)!r}, "/dev/zero", "/dev/null"):
    for fn in (load_model, lambda p: read_weights(Path(p)), load_batch):
        try:
            fn(target)
            print("LOADED", target)
        except NnhealthError as exc:
            assert "\\n" not in str(exc)
            print(str(exc))
"""
    res = _run_isolated(code, tmp_path)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 9 and not any(line.startswith("LOADED") for line in lines), lines
    assert all("not a regular file" in line for line in lines), lines
    assert sum("a FIFO (named pipe)" in line for line in lines) == 3
    assert sum("a character device" in line for line in lines) == 6


def test_fifo_at_the_command_line(cli, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    torch.save(he_mlp([4, 2]), tmp_path / "m.pt")
    # regular_file refuses before anything opens the FIFO: this returns, it cannot hang
    assert "not a regular file" in one_line_error(cli("scan", fifo, "--input-shape", "2x4"))
    line = one_line_error(cli("scan", tmp_path / "m.pt", "--data", fifo))
    assert "is a FIFO (named pipe), not a regular file; save the batch to a file" in line
    line = one_line_error(cli("scan", tmp_path / "m.pt", "--data", "/dev/zero"))
    assert "character device" in line


# --- 4. deeply nested headers and pickles -------------------------------------------------------


def test_safetensors_header_nested_100000_deep(tmp_path: Path) -> None:
    header = ('{"a":' + "[" * 100000 + "]" * 100000 + "}").encode()
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    for fn, error in (
        (lambda: load_model(str(path)), LoadError),
        (lambda: read_weights(path), LoadError),
    ):
        assert "nested too deeply" in refused(error, fn)
    assert "not a batch format" in refused(DataError, load_batch, str(path))


def _nested_pickle(depth: int, wrap_in_dict: bool) -> bytes:
    """torch.save's pickle of zeros(2, 3) inside ``depth`` one-element lists, built by
    hand (the pickler itself would recurse): EMPTY_LIST x depth, the tensor, APPEND x depth."""
    body = next(
        data
        for info, data in torch_members(torch.zeros(2, 3))
        if info.filename.endswith("data.pkl")
    )
    assert body[:2] == b"\x80\x02" and body[-1:] == b"."
    nested = b"]" * depth + body[2:-1] + b"a" * depth
    if wrap_in_dict:  # {"inputs": [[[...]]]}
        nested = b"}X\x06\x00\x00\x00inputs" + nested + b"s"
    return b"\x80\x02" + nested + b"."


def _with_pickle(path: Path, payload: bytes) -> Path:
    members = [
        (info, payload if info.filename.endswith("/data.pkl") else data)
        for info, data in torch_members(torch.zeros(2, 3))
    ]
    return write_zip(path, members)


def test_batch_pickle_nested_100000_deep(tmp_path: Path) -> None:
    """torch.load builds [[[...]]] 100000 deep without recursion; reading it must not
    recurse either: one-element lists unwrap in a loop, other structures are refused."""
    path = _with_pickle(tmp_path / "deep.pt", _nested_pickle(100000, wrap_in_dict=False))
    batch = load_batch(str(path))
    assert batch.shape == [2, 3] and batch.targets is None
    for trust in (False, True):  # as a model: a list, with or without --trust
        line = refused(LoadError, load_model, str(path), trust=trust)
        assert line == "holds a list, not a model or a state_dict"
    path = _with_pickle(tmp_path / "deep2.pt", _nested_pickle(100000, wrap_in_dict=True))
    line = refused(DataError, load_batch, str(path))
    assert line.endswith(
        "the batch inputs are nested more than 16 levels deep; give a tensor, (inputs, targets) or a dict of tensors"
    )
    deep: list = [torch.zeros(2)]
    for _ in range(40):
        deep = [deep, deep]  # 2**40 leaves through the memo: tiny file, no recursion allowed
    line = refused(
        DataError, load_batch, str(_saved(tmp_path / "d2.pt", (torch.zeros(2, 3), deep)))
    )
    assert line.endswith("targets are a list, expected a tensor")


def _saved(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


# --- 5. layouts nnhealth cannot compute on -----------------------------------------------------


@pytest.mark.parametrize(
    "make,role,needle",
    [
        (lambda x, y: (x.to_sparse(), y), "inputs", "sparse COO tensor"),
        (lambda x, y: (x.to_sparse_csr(), y), "inputs", "sparse CSR tensor"),
        (lambda x, y: (x, y.to_sparse()), "targets", "sparse COO tensor"),
        (lambda x, y: (torch.empty(6, 4, device="meta"), y), "inputs", "meta device"),
        (lambda x, y: (x, torch.empty(6, dtype=torch.long, device="meta")), "targets", "meta"),
        (
            lambda x, y: (torch.quantize_per_tensor(x, 0.1, 0, torch.quint8), y),
            "inputs",
            "quantized (torch.quint8)",
        ),
        (
            lambda x, y: (torch.nested.nested_tensor([torch.randn(2, 4), torch.randn(3, 4)]), y),
            "inputs",
            "nested (ragged) tensor",
        ),
    ],
    ids=["coo", "csr", "coo-targets", "meta", "meta-targets", "quantized", "nested"],
)
def test_odd_layouts_in_a_batch_are_one_line(
    cli, tmp_path: Path, make, role: str, needle: str
) -> None:
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    with warnings.catch_warnings():  # sparse CSR and nested tensors are "beta"
        warnings.simplefilter("ignore")
        obj = make(x, y)
    torch.save(obj, tmp_path / "b.pt")
    torch.save(he_mlp([4, 8, 3]), tmp_path / "m.pt")
    line = one_line_error(cli("scan", tmp_path / "m.pt", "--data", tmp_path / "b.pt"))
    assert f"the batch {role} hold a {needle}" in line or (needle in line and role in line), line
    # the same from Python, on an in-memory batch
    import nnhealth

    with pytest.raises(DataError, match=needle.split(" (")[0]):
        nnhealth.scan(he_mlp([4, 8, 3]), obj)


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda w: w.to_sparse(), "is a sparse COO tensor"),
        (lambda w: w.to_sparse_csr(), "is a sparse CSR tensor"),
        (lambda w: torch.empty_like(w, device="meta"), "is a tensor on the meta device"),
    ],
    ids=["coo", "csr", "meta"],
)
def test_odd_layouts_in_weights_are_one_line(tmp_path: Path, make, needle: str) -> None:
    """The weight checks would crash on them (internal errors before)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(
            {"0.weight": make(torch.randn(8, 4)), "0.bias": torch.zeros(8)}, tmp_path / "w.pt"
        )
    assert f"tensor '0.weight' {needle}" in refused(LoadError, load_model, str(tmp_path / "w.pt"))
    assert needle in refused(LoadError, read_weights, tmp_path / "w.pt")
    torch.save(he_mlp([4, 8, 2]).to("meta"), tmp_path / "m.pt")  # built under device("meta")
    line = refused(LoadError, load_model, str(tmp_path / "m.pt"))
    assert line.startswith("parameter or buffer '0.weight' is a tensor on the meta device")


# --- 6. casts that overflow -----------------------------------------------------------------------


def test_float64_batch_that_overflows_float32(cli, tmp_path: Path) -> None:
    x = torch.randn(8, 4, dtype=torch.float64)
    x[0, 0], x[3, 1] = 1e300, -1e300
    torch.save(x, tmp_path / "b.pt")
    torch.save(he_mlp([4, 8, 3]), tmp_path / "m.pt")
    line = one_line_error(cli("scan", tmp_path / "m.pt", "--data", tmp_path / "b.pt"))
    assert "2 of 32 batch inputs values overflow" in line
    assert "from torch.float64 to the model's torch.float32" in line and "1e+300" in line
    assert "rescale or normalize the inputs" in line


def test_float32_batch_that_overflows_a_half_model() -> None:
    batch = Batch(inputs=torch.full((4, 3), 1e5), targets=torch.full((4, 2), 7e4), source="b")
    with pytest.raises(DataError, match=r"12 of 12 batch inputs values overflow .* torch.float16"):
        prepare(batch, torch.float16, torch.device("cpu"))
    batch = Batch(inputs=torch.ones(4, 3), targets=torch.full((4, 2), 7e4), source="b")
    with pytest.raises(DataError, match=r"8 of 8 batch targets values .* holds up to 6.55e\+04"):
        prepare(batch, torch.float16, torch.device("cpu"))
    # float8 (no isfinite kernel of its own): 1e5 is beyond e5m2's 57344
    with pytest.raises(DataError, match=r"12 of 12 batch inputs .* torch.float8_e5m2"):
        prepare(Batch(torch.full((4, 3), 1e5), None, "b"), torch.float8_e5m2, torch.device("cpu"))
    # bfloat16 has float32's range: the same values fit
    ok = prepare(batch, torch.bfloat16, torch.device("cpu"))
    assert ok.inputs.dtype == torch.bfloat16
    # float64 values within range are cast without complaint
    fine = Batch(inputs=torch.full((2, 2), 1e30, dtype=torch.float64), targets=None, source="b")
    assert prepare(fine, torch.float32, torch.device("cpu")).inputs.dtype == torch.float32


def test_in_memory_scan_of_an_overflowing_batch() -> None:
    import nnhealth

    with pytest.raises(DataError, match="overflow"):
        nnhealth.scan(he_mlp([4, 8, 3]), torch.full((8, 4), 1e300, dtype=torch.float64))


def test_rnn_num_layers_from_the_file_is_capped(tmp_path: Path) -> None:
    """RNNBase.__setstate__ loops over num_layers (quadratically) when _all_weights is in
    an old layout: 3 KB with 3,000,000 layers never finished loading."""
    lstm = nn.LSTM(1, 1)
    lstm.num_layers = 3_000_000
    lstm._all_weights = [[0]]
    torch.save(lstm, tmp_path / "lstm.pt")
    start = time.perf_counter()
    line = refused(LoadError, load_model, str(tmp_path / "lstm.pt"))
    assert "num_layers=3000000 (at most 1000)" in line and "rerun with trust " in line
    assert time.perf_counter() - start < 5
    torch.save(nn.LSTM(4, 8, num_layers=3), tmp_path / "ok.pt")
    assert load_model(str(tmp_path / "ok.pt")).model.num_layers == 3


def test_rebuild_that_materializes_a_view_is_bounded_by_the_file_size(tmp_path: Path) -> None:
    """_rebuild_device_tensor_from_cpu_tensor is on torch's weights-only allowlist: it
    copies a stride-0 view at full size while loading (15 GB RSS from 2 KB)."""

    class Rebuild:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t

        def __reduce__(self):
            return (
                torch._utils._rebuild_device_tensor_from_cpu_tensor,
                (self.t, torch.float64, "cpu", False),
            )

    view = torch.zeros(1).expand(30000, 30000)
    torch.save({"w": Rebuild(view), "b": torch.zeros(3)}, tmp_path / "v.pt")
    for fn in (lambda: load_model(str(tmp_path / "v.pt")), lambda: read_weights(tmp_path / "v.pt")):
        assert "beyond 100x its size" in refused(LoadError, fn)
