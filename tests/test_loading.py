"""Every way to give a model, including the refusal to unpickle code without --trust."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import he_mlp, listing, one_line_error
from torch import nn

MYNET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

def build():
    torch.manual_seed(0)
    return Net()

def build_with_batch():
    torch.manual_seed(0)
    return Net(), (torch.randn(32, 16), torch.randint(0, 4, (32,)))
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's directory: mynet.py (a custom class), a pickled Net, a batch; cwd there."""
    (tmp_path / "mynet.py").write_text(MYNET)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mynet

    torch.save(mynet.build(), tmp_path / "custom.pt")
    torch.save((torch.randn(32, 16), torch.randint(0, 4, (32,))), tmp_path / "batch.pt")
    del sys.modules["mynet"]
    for cache in tmp_path.rglob("__pycache__"):
        for f in cache.iterdir():
            f.unlink()
        cache.rmdir()
    return tmp_path


def test_custom_class_refused_without_trust(cli, project: Path) -> None:
    before = listing(project)
    line = one_line_error(cli("scan", "custom.pt", "--data", "batch.pt"))
    assert "mynet.Net" in line and "--trust" in line and "NNHEALTH_TRUST" in line
    assert listing(project) == before


def test_custom_class_loads_with_trust_and_env(cli, project: Path, monkeypatch) -> None:
    before = listing(project)
    res = cli("scan", "custom.pt", "--data", "batch.pt", "--trust", "--format", "json")
    assert res.code in (0, 1), res.err
    report = json.loads(res.out)
    assert report["run"]["model_format"] == "torch.save module (trusted (--trust))"
    assert report["run"]["model_class"] == "Net"
    monkeypatch.setenv("NNHEALTH_TRUST", "1")
    assert cli("scan", "custom.pt", "--data", "batch.pt", "-q").code in (0, 1)
    assert listing(project) == before  # no __pycache__ or anything else beside user files


def test_torch_nn_module_loads_without_trust(cli, tmp_path: Path) -> None:
    model = nn.Sequential(
        nn.Linear(8, 8),
        nn.LayerNorm(8),
        nn.GELU(),
        nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1),
        nn.Linear(8, 3),
    )
    torch.save(model, tmp_path / "m.pt")
    torch.save(torch.randn(4, 5, 8), tmp_path / "x.pt")
    res = cli("scan", tmp_path / "m.pt", "--data", tmp_path / "x.pt", "--format", "json")
    assert res.code in (0, 1), res.err
    report = json.loads(res.out)
    assert report["run"]["model_format"] == "torch.save module (torch.nn classes, allowlisted)"
    assert any(layer["kind"] == "relu" for layer in report["layers"])  # inside the encoder layer


def test_transformer_with_gelu_loads_without_trust(cli, tmp_path: Path) -> None:
    """TransformerEncoderLayer(activation="gelu") pickles torch._C._nn.gelu."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, activation="gelu", batch_first=True)
    torch.save(nn.Sequential(layer, nn.Linear(8, 3)), tmp_path / "m.pt")
    res = cli("scan", tmp_path / "m.pt", "--input-shape", "4x5x8", "-q")
    assert res.code == 0, res.err


def test_legacy_pickled_module_needs_trust(cli, tmp_path: Path) -> None:
    torch.save(he_mlp([4, 8, 2]), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    torch.save(torch.randn(16, 4), tmp_path / "x.pt")
    line = one_line_error(cli("scan", tmp_path / "old.pt", "--data", tmp_path / "x.pt"))
    assert "--trust" in line
    res = cli("scan", tmp_path / "old.pt", "--data", tmp_path / "x.pt", "--trust", "-q")
    assert res.code == 0, res.err


@pytest.mark.parametrize("kind", ["state_dict", "lightning", "safetensors"])
def test_bare_weights_run_weight_checks_and_skip_the_rest(cli, tmp_path: Path, kind: str) -> None:
    model = he_mlp([8, 16, 4])
    with torch.no_grad():
        model[0].weight[1, 1] = float("nan")
    path = tmp_path / "weights.bin"
    if kind == "state_dict":
        torch.save(model.state_dict(), path)
    elif kind == "lightning":
        torch.save(
            {
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "epoch": 3,
                "pytorch-lightning_version": "2.4.0",
            },
            path,
        )
    else:
        from safetensors.torch import save_file

        save_file(model.state_dict(), str(path))
    res = cli("scan", path, "--format", "json")
    assert res.code == 1, res.err
    report = json.loads(res.out)
    codes = [f["code"] for f in report["findings"]]
    assert codes == ["NH001"]
    assert "0.weight" in report["findings"][0]["message"]
    skipped = {s["code"]: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"NH101", "NH102", "NH103", "NH201", "NH202", "NH301"}
    assert all("--arch" in r for r in skipped.values())
    assert report["run"]["batch"] is None


def test_torchscript_gives_weights_and_gradients_only(cli, tmp_path: Path) -> None:
    model = he_mlp([8, 16, 4])
    torch.jit.script(model).save(str(tmp_path / "ts.pt"))
    res = cli("scan", tmp_path / "ts.pt", "--input-shape", "32x8", "--format", "json", "--trust")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    assert report["run"]["model_format"] == "TorchScript"
    assert {s["code"] for s in report["skipped"]} == {"NH101", "NH102", "NH201", "NH202"}
    assert "TorchScript" in report["skipped"][0]["reason"]
    assert any(row.get("trust_ratio") for row in report["layers"])  # NH301 ran: it has gradients
    grads = [row["weight_grad_norm"] for row in report["layers"]]
    assert grads and all(g is not None and g > 0 for g in grads)


def test_entry_point_file_with_example_batch(cli, project: Path) -> None:
    before = listing(project)
    res = cli("scan", "mynet.py:build_with_batch", "--format", "json")
    assert res.code in (0, 1), res.err
    report = json.loads(res.out)
    assert report["run"]["model_format"] == "entry point"
    assert report["run"]["batch"]["shape"] == [32, 16]
    assert [layer["name"] for layer in report["layers"]] == ["fc1", "(root):relu", "fc2"]
    assert listing(project) == before


def test_entry_point_module_with_input_shape_and_weights(cli, project: Path) -> None:
    pkg = project / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(MYNET)
    import importlib

    sys.modules.pop("mypkg", None)
    trained = importlib.import_module("mypkg.models").build()
    with torch.no_grad():
        trained.fc1.bias.fill_(-100.0)  # every hidden unit dead
    torch.save(
        {"state_dict": {f"model.{k}": v for k, v in trained.state_dict().items()}},
        project / "trained.ckpt",
    )
    for name in [m for m in sys.modules if m.startswith("mypkg")]:
        del sys.modules[name]
    res = cli(
        "scan", "mypkg.models:build", "--input-shape", "64x16", "--weights", "trained.ckpt", "-q"
    )
    assert res.code == 1, res.err
    assert "NH101" in res.out and "100% of units dead" in res.out
    res = cli("scan", "mypkg.models:build", "--input-shape", "64x16", "-q")
    assert res.code == 0, res.out


def test_weights_that_do_not_fit(cli, project: Path) -> None:
    torch.save(he_mlp([3, 3]).state_dict(), project / "wrong.pt")
    line = one_line_error(
        cli("scan", "mynet.py:build", "--input-shape", "8x16", "--weights", "wrong.pt")
    )
    assert "does not fit the model" in line and "missing keys" in line


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("mynet.py:nope", "has no attribute 'nope'"),
        ("missing.py:build", "no such file"),
        ("no_such_pkg.mod:build", "ModuleNotFoundError"),
    ],
)
def test_entry_point_errors(cli, project: Path, spec: str, needle: str) -> None:
    assert needle in one_line_error(cli("scan", spec, "--input-shape", "8x16"))


def test_factory_that_raises(cli, project: Path) -> None:
    (project / "broken.py").write_text("def build():\n    raise ValueError('bad config')\n")
    line = one_line_error(cli("scan", "broken.py:build", "--input-shape", "8x16"))
    assert "factory raised ValueError: bad config" in line


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"", "not a model format"),
        (b"hello world, not a model", "not a model format"),
        (b"PK\x03\x04" + b"\x00" * 100, "truncated or corrupt"),
    ],
    ids=["empty", "text", "zip-header-only"],
)
def test_unreadable_model_files(cli, tmp_path: Path, content: bytes, needle: str) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    assert needle in one_line_error(cli("scan", path, "--input-shape", "4x4"))
    assert path.read_bytes() == content


def test_truncated_and_bitflipped_torch_save(cli, tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(he_mlp([64, 64, 4]), good)
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in one_line_error(cli("scan", cut, "--input-shape", "4x64"))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the tensor data: the zip CRC no longer matches
    bad = tmp_path / "flip.pt"
    bad.write_bytes(bytes(flipped))
    assert "checksum" in one_line_error(cli("scan", bad, "--input-shape", "4x64"))


def test_numpy_file_as_model(cli, tmp_path: Path) -> None:
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((2, 2)))
    assert "did you mean --data" in one_line_error(cli("scan", tmp_path / "x.npy"))


def test_missing_file_and_directory(cli, tmp_path: Path) -> None:
    assert "no such file" in one_line_error(cli("scan", tmp_path / "nope.pt"))
    assert "is a directory" in one_line_error(cli("scan", tmp_path))


def test_format_detected_from_contents_not_extension(cli, tmp_path: Path) -> None:
    model = he_mlp([4, 8, 2])
    torch.jit.script(model).save(str(tmp_path / "model.weights"))
    torch.save(model.state_dict(), tmp_path / "model.ts")
    res = json.loads(
        cli(
            "scan",
            tmp_path / "model.weights",
            "--input-shape",
            "8x4",
            "--format",
            "json",
            "--trust",
        ).out
    )
    assert res["run"]["model_format"] == "TorchScript"
    res = json.loads(cli("scan", tmp_path / "model.ts", "--format", "json").out)
    assert res["run"]["model_format"] == "state_dict"


def test_allowlist_holds_only_torch_nn(tmp_path: Path) -> None:
    from nnhealth.loading.model import nn_allowlist

    allow = nn_allowlist()
    assert "torch.nn.modules.linear.Linear" in allow
    assert "torch.nn.modules.activation.MultiheadAttention" in allow
    assert all(
        k.startswith(
            ("torch.nn.modules.", "torch.nn.functional.", "torch._C._nn.", "torch.nn.utils.")
        )
        for k in allow
    )
    assert not any("os." in k or "subprocess" in k or "builtins" in k for k in allow)


def test_no_code_runs_from_a_malicious_pickle_without_trust(cli, tmp_path: Path) -> None:
    """A pickle whose __reduce__ would run a command is refused before anything runs."""
    marker = tmp_path / "pwned"
    payload = textwrap.dedent(
        f"""
        import os, torch
        class Evil:
            def __reduce__(self):
                return (os.system, ("touch {marker}",))
        torch.save({{"w": torch.zeros(2), "x": Evil()}}, r"{tmp_path / "evil.pt"}")
        """
    )
    import subprocess

    subprocess.run([sys.executable, "-c", payload], check=True)
    line = one_line_error(cli("scan", tmp_path / "evil.pt"))
    assert "--trust" in line and ("system" in line or "posix" in line)
    assert not marker.exists()


def test_a_pickle_that_calls_a_module_class_is_refused(cli, tmp_path: Path) -> None:
    """Allowlisted classes may be re-created (NEWOBJ), never called with the file's
    arguments: Linear(20000, 20000) would allocate 1.6 GB from a 1 KB file."""
    payload = textwrap.dedent(
        f"""
        import torch
        from torch import nn
        class Bomb:
            def __reduce__(self):
                return (nn.Linear, (20000, 20000))
        torch.save({{"model": Bomb()}}, r"{tmp_path / "bomb.pt"}")
        """
    )
    import subprocess

    subprocess.run([sys.executable, "-c", payload], check=True)
    line = one_line_error(cli("scan", tmp_path / "bomb.pt"))
    assert "calls torch.nn.modules.linear.Linear" in line and "--trust" in line


def test_genuine_saves_call_nothing(tmp_path: Path) -> None:
    import zipfile

    from nnhealth.loading import limits
    from nnhealth.loading.model import _allowlisted

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.TransformerEncoderLayer(8, 2, 16),
        nn.Linear(4, 2),
    )
    torch.save(model, tmp_path / "m.pt")
    with zipfile.ZipFile(tmp_path / "m.pt") as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    facts = limits.PickleFacts()
    limits.walk_pickle(data, facts)
    assert _allowlisted(facts.calls) == []


def test_weight_norm_and_spectral_norm_load_without_trust(cli, tmp_path: Path) -> None:
    import warnings

    with warnings.catch_warnings():  # the old hook-based API is deprecated, still common
        warnings.simplefilter("ignore")
        model = nn.Sequential(
            nn.utils.weight_norm(nn.Linear(8, 16)),
            nn.ReLU(),
            nn.utils.spectral_norm(nn.Linear(16, 3)),
        )
    torch.save(model, tmp_path / "m.pt")
    res = cli("scan", tmp_path / "m.pt", "--input-shape", "32x8", "--format", "json")
    assert res.code in (0, 1), res.err
    assert (
        json.loads(res.out)["run"]["model_format"]
        == "torch.save module (torch.nn classes, allowlisted)"
    )


def test_torchscript_layers_get_the_weight_checks(cli, tmp_path: Path) -> None:
    model = he_mlp([8, 32, 32, 2])
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
    torch.jit.script(model).save(str(tmp_path / "ts.pt"))
    res = cli(
        "scan",
        tmp_path / "ts.pt",
        "--input-shape",
        "32x8",
        "--select",
        "NH501,NH601",
        "--format",
        "json",
        "--trust",
    )
    report = json.loads(res.out)
    assert res.code == 1 and ("NH501", "2") in {(f["code"], f["layer"]) for f in report["findings"]}


def test_a_safetensors_header_of_384_bytes_is_not_taken_for_a_pickle(tmp_path: Path) -> None:
    """A header length of 0x180 starts the file with 0x80 0x01, as a pickle does."""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from nnhealth.loading import detect

    for pad in range(0, 400, 7):  # some header length lands on 128, 384 or 640
        path = tmp_path / f"w{pad}.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata={"x": "y" * pad})
        length = int.from_bytes(path.read_bytes()[:8], "little")
        assert detect.sniff(path) == detect.SAFETENSORS, length
