"""Batch formats (never unpickling code) and the automatic loss choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import he_mlp
from torch import nn

from nnhealth.errors import DataError, UsageError
from nnhealth.loading.batch import load_batch, parse_shape, prepare, synthetic
from nnhealth.loading.loss import LossResolver


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    torch.save(he_mlp([6, 32, 3]), tmp_path / "m.pt")
    return tmp_path / "m.pt"


def scan_json(cli, *args) -> dict:
    res = cli("scan", *args, "--format", "json")
    assert res.code in (0, 1), res.err
    return json.loads(res.out)


def test_pt_tensor_tuple_and_dict(cli, tmp_path: Path, model_file: Path) -> None:
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    for name, obj in [("t.pt", x), ("tt.pt", (x, y)), ("d.pt", {"inputs": x, "labels": y})]:
        torch.save(obj, tmp_path / name)
        report = scan_json(cli, model_file, "--data", tmp_path / name)
        assert report["run"]["batch"]["shape"] == [20, 6]
        has_targets = name != "t.pt"
        assert report["run"]["loss"] == (
            "cross-entropy"
            if has_targets
            else "cross-entropy against seeded random labels (no targets given)"
        )
        assert (report["run"]["batch"]["targets_shape"] == [20]) == has_targets
        assert any("random class labels" in n for n in report["notes"]) != has_targets


def test_npz_and_npy(cli, tmp_path: Path, model_file: Path) -> None:
    x = np.random.default_rng(0).standard_normal((20, 6))  # float64: cast to the model's dtype
    np.savez(tmp_path / "b.npz", inputs=x, labels=np.arange(20) % 3)
    np.save(tmp_path / "b.npy", x)
    report = scan_json(cli, model_file, "--data", tmp_path / "b.npz")
    assert report["run"]["batch"]["targets_shape"] == [20]
    assert any("cast from torch.float64" in n for n in report["notes"])
    assert scan_json(cli, model_file, "--data", tmp_path / "b.npy")["run"]["batch"]["shape"] == [
        20,
        6,
    ]


def test_object_arrays_are_not_unpickled(tmp_path: Path) -> None:
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="without unpickling"):
        load_batch(str(tmp_path / "o.npy"))


def test_pickled_python_objects_in_pt_refused(tmp_path: Path) -> None:
    torch.save({"inputs": torch.zeros(2, 2), "meta": nn.ReLU()}, tmp_path / "b.pt")
    with pytest.raises(DataError, match="Python objects beyond tensors"):
        load_batch(str(tmp_path / "b.pt"))


def test_unrecognised_dict_keys(tmp_path: Path) -> None:
    torch.save({"foo": "bar", "labels": torch.zeros(2)}, tmp_path / "b.pt")
    with pytest.raises(DataError, match=r"keys \[foo, labels\].*'inputs'"):
        load_batch(str(tmp_path / "b.pt"))


class KeywordModel(nn.Module):
    """A Hugging Face style forward(input_ids, attention_mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask[..., None]
        return self.head(torch.relu(h).mean(dim=1))


def test_dict_of_keyword_arguments() -> None:
    import nnhealth

    batch = {
        "input_ids": torch.randint(0, 20, (16, 5)),
        "attention_mask": torch.ones(16, 5),
        "labels": torch.randint(0, 3, (16,)),
    }
    report = nnhealth.scan(KeywordModel(), batch)
    assert report.run["batch"]["targets_shape"] == [16] and report.run["loss"] == "cross-entropy"
    assert not report.errors


@pytest.mark.parametrize(
    "array,needle",
    [(np.array(["a", "b"]), "holds <U1 values"), (np.zeros((4, 3), dtype=">f4"), None)],
    ids=["strings", "big-endian"],
)
def test_numpy_dtypes(tmp_path: Path, array: np.ndarray, needle: str | None) -> None:
    np.save(tmp_path / "a.npy", array)
    if needle:
        with pytest.raises(DataError, match=needle):
            load_batch(str(tmp_path / "a.npy"))
    else:
        batch = load_batch(str(tmp_path / "a.npy"))
        assert batch.inputs.dtype == torch.float32 and batch.shape == [4, 3]


@pytest.mark.parametrize(
    "text,shape", [("64x3x32x32", (64, 3, 32, 32)), ("8,4", (8, 4)), ("16", (16,))]
)
def test_parse_shape(text: str, shape: tuple) -> None:
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "axb", "64x0", "64x-3", "1.5x2"])
def test_parse_shape_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_shape(text)


def test_synthetic_is_seeded_gaussian_or_token_ids() -> None:
    a, b = synthetic((500, 40), 3, None), synthetic((500, 40), 3, None)
    assert torch.equal(a.inputs, b.inputs)
    assert abs(float(a.inputs.mean())) < 0.02 and abs(float(a.inputs.std()) - 1) < 0.02
    emb = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 2))
    ids = synthetic((4, 7), 0, emb).inputs
    assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < 50


def test_nan_inputs_rejected() -> None:
    from nnhealth.loading.batch import Batch

    x = torch.randn(4, 3)
    x[1, 2] = float("nan")
    with pytest.raises(DataError, match="hold 1 NaN/Inf values of 12"):
        prepare(Batch(inputs=x, targets=None, source="b.pt"), torch.float32, torch.device("cpu"))


# ---- loss ---------------------------------------------------------------------------


def test_auto_loss_matches_torch() -> None:
    out = torch.randn(10, 4)
    y = torch.randint(0, 4, (10,))
    r = LossResolver("auto", y, 0)
    assert torch.equal(r(out), F.cross_entropy(out, y)) and r.description == "cross-entropy"
    yf = torch.randn(10, 4)
    r = LossResolver("auto", yf, 0)
    assert torch.equal(r(out), F.mse_loss(out, yf)) and r.description == "mse"
    r = LossResolver("bce", (yf > 0).float(), 0)
    assert torch.equal(r(out), F.binary_cross_entropy_with_logits(out, (yf > 0).float()))


def test_auto_loss_without_targets() -> None:
    r = LossResolver("auto", None, 0)
    r(torch.randn(10, 4))
    assert r.description == "cross-entropy against seeded random labels (no targets given)"
    assert "random class labels over 4 classes" in r.notes[0]
    r = LossResolver("auto", None, 0)
    r(torch.randn(10, 7, 16))  # a sequence of features: not logits
    assert r.description == "mse against seeded random targets (no targets given)"
    assert "random unit-Gaussian" in r.notes[0]
    # seeded: the same labels every time
    assert LossResolver("ce", None, 5)(
        torch.zeros(6, 3, requires_grad=False) + torch.arange(3.0)
    ) == LossResolver("ce", None, 5)(torch.zeros(6, 3) + torch.arange(3.0))


def test_segmentation_targets() -> None:
    out = torch.randn(2, 5, 4, 4)
    y = torch.randint(0, 5, (2, 4, 4))
    assert torch.equal(LossResolver("auto", y, 0)(out), F.cross_entropy(out, y))


@pytest.mark.parametrize(
    "out,y,needle",
    [
        (
            torch.randn(4, 3),
            torch.tensor([0, 1, 2, 7]),
            r"range over \[0, 7\] but the model outputs 3",
        ),
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), "do not fit outputs of shape"),
        (torch.randn(4, 3), torch.randn(4, 2), "do not fit outputs"),
    ],
)
def test_targets_that_do_not_fit(out, y, needle: str) -> None:
    with pytest.raises(DataError, match=needle):
        LossResolver("auto", y, 0)(out)


def test_random_targets_do_not_depend_on_the_output_dtype() -> None:
    """The finite-difference Hessian runs a float64 copy: its random MSE targets must be
    the scan's own (torch.randn draws other values in float64 from 16 values on)."""
    out = torch.randn(8, 5)
    single = LossResolver("auto", None, 3)
    double = LossResolver("auto", None, 3)
    assert torch.allclose(
        single(out.reshape(8, 5, 1)).double(), double(out.double().reshape(8, 5, 1))
    )
