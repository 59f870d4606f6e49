"""Scans given no batch: one inferred from the model's first layer (said in the header),
the forgotten batch dimension in --input-shape, and a .py MODEL without :factory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, strict_json
from torch import nn

import nnhealth
from nnhealth.errors import UsageError
from nnhealth.loading import infer
from nnhealth.loading.batch import inferred

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def _save(tmp_path: Path, model: nn.Module, name: str = "m.pt") -> Path:
    torch.manual_seed(0)
    torch.save(model, tmp_path / name)
    return tmp_path / name


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def json_scan(cli, *args) -> tuple[int, dict]:
    res = cli("scan", *args, "--format", "json")
    assert res.code in (0, 1), (res.code, res.err)
    return res.code, strict_json(res.out)


# ---- a batch inferred from the first layer ------------------------------------------


def test_mlp_without_a_batch(cli, tmp_path: Path) -> None:
    path = _save(tmp_path, mlp())
    _, report = json_scan(cli, path)
    batch = report["run"]["batch"]
    assert batch["shape"] == [16, 784]
    assert batch["source"] == "inferred from 0: Linear(784, 64, …) → 16x784 unit Gaussian, seed 0"
    text = cli("scan", path)
    assert text.code in (0, 1)
    header = text.out.split("\n\n")[0]
    assert "batch  inferred from 0: Linear(784, 64, …) → 16x784 unit Gaussian, seed 0" in header
    assert "no batch given: inferred from the first layer" in text.out
    assert "give --data or --input-shape" in text.out.replace("\n", " ")


def test_cnn_without_a_batch(cli, tmp_path: Path) -> None:
    _, report = json_scan(cli, _save(tmp_path, cnn()), "--seed", "3")
    batch = report["run"]["batch"]
    # 8 examples: 8 x 3x64x64 is the values budget; 64 per spatial dim is the default
    assert batch["shape"] == [8, 3, 64, 64]
    assert batch["source"] == ("inferred from 0: Conv2d(3, 8, …) → 8x3x64x64 unit Gaussian, seed 3")
    assert any("64 per spatial dim (nnhealth's default)" in n for n in report["notes"])


def test_cnn_with_a_fixed_flatten_gets_the_size_it_runs_at(cli, tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    _, report = json_scan(cli, _save(tmp_path, model))
    assert report["run"]["batch"]["shape"] == [16, 1, 28, 28]
    assert any("28 per spatial dim (the first of 64, 16, 28" in n for n in report["notes"])


def test_embedding_model_gets_token_ids(cli, tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(8 * 32, 5))
    _, report = json_scan(cli, _save(tmp_path, model))
    batch = report["run"]["batch"]
    assert batch["shape"] == [16, 32]
    assert (
        batch["source"] == "inferred from 0: Embedding(50, 8) → 16x32 token ids in [0, 50), seed 0"
    )
    ids = inferred(model, 0).inputs
    assert ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < 50
    assert int(ids.max()) > 40  # the whole vocabulary range is drawn, not a corner of it


class _Config:
    n_positions = 12


class TinyLM(nn.Module):
    """A language model with a Hugging Face style config: 12 positions at most."""

    def __init__(self) -> None:
        super().__init__()
        self.config = _Config()
        self.wte = nn.Embedding(30, 8)
        self.wpe = nn.Embedding(12, 8)
        self.head = nn.Linear(8, 30)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.wte(ids) + self.wpe(pos))


def test_token_length_respects_the_models_positions() -> None:
    layer = infer.input_layer(TinyLM())
    assert (layer.name, layer.shape, layer.ids_below) == ("wte", (12,), 30)
    assert "12 tokens (n_positions=12)" in layer.defaults
    batch = inferred(TinyLM(), 0)
    assert batch.shape == [16, 12]
    TinyLM()(batch.inputs)  # the model runs on it


class HeadFirst(nn.Module):
    """Registers its head before its body: registration order is not call order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(5, 2)
        self.body = nn.Conv1d(4, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(-1))


def test_the_first_layer_is_the_first_to_receive_the_input() -> None:
    model = HeadFirst()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer = infer.input_layer(model)
    assert (layer.name, layer.shape, layer.examples) == ("body", (4, 256), 16)
    assert layer.how.startswith("found by a forward pre-hook")
    # the user's model: same tensors, on the CPU, no hook left behind
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(not m._forward_pre_hooks for m in model.modules())
    report = nnhealth.scan(model, select=["NH201"])
    assert report.run["batch"]["shape"] == [16, 4, 256]


class DataDependent(nn.Module):
    """Reads a value in forward: meta tensors have none, so the probe cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().max()) > 1e6:
            x = x / 1e6
        return self.fc(x)


def test_registration_order_when_the_probe_cannot_run() -> None:
    layer = infer.input_layer(DataDependent())
    assert (layer.name, layer.shape) == ("fc", (6,))
    assert layer.how.startswith("the first in registration order")
    report = nnhealth.scan(DataDependent(), select=["NH201"])
    assert report.run["batch"]["shape"] == [16, 6]
    assert any("registration order" in n for n in report.notes)


@pytest.mark.parametrize(
    "model,needle",
    [
        (nn.Sequential(nn.Bilinear(4, 4, 2)), "Bilinear takes an input nnhealth cannot guess"),
        (nn.Sequential(nn.LSTM(4, 8)), "LSTM takes [time, batch, features] (batch_first=False)"),
        (nn.Sequential(nn.ReLU()), "the model has no layer with parameters"),
    ],
    ids=["bilinear", "lstm-time-first", "no-parameters"],
)
def test_no_inferable_first_layer_is_one_line(cli, tmp_path: Path, model, needle) -> None:
    line = one_line_error(cli("scan", _save(tmp_path, model)))
    assert line.startswith("nnhealth: error: no batch, and none can be inferred from the model")
    assert needle in line
    assert "give --data FILE (.pt/.npz/.npy) or --input-shape" in line


def test_no_inferable_first_layer_from_python() -> None:
    with pytest.raises(UsageError) as info:
        nnhealth.scan(nn.Sequential(nn.LazyLinear(3)))
    text = str(info.value)
    assert "LazyLinear is lazy" in text and "give data FILE" in text and "input_shape" in text


def test_a_state_dict_needs_no_batch(cli, tmp_path: Path) -> None:
    torch.save(mlp().state_dict(), tmp_path / "sd.pt")
    _, report = json_scan(cli, tmp_path / "sd.pt")
    assert report["run"]["batch"] is None  # weight checks only: nothing to infer from
    assert not any("inferred" in n for n in report["notes"])


def test_a_lstm_with_batch_first_gets_sequences() -> None:
    layer = infer.input_layer(nn.LSTM(4, 8, batch_first=True))
    assert (layer.label, layer.shape) == ("(root)", (32, 4))


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision is not installed")
def test_torchvision_resnet18_and_a_fixed_size_vit() -> None:
    import torchvision.models as tvm

    resnet = tvm.resnet18(num_classes=4)
    layer = infer.input_layer(resnet)
    assert (layer.name, layer.shape, layer.examples) == ("conv1", (3, 64, 64), 8)
    with torch.no_grad():  # stride 32 leaves 2x2 before the pooling: it runs
        assert resnet.eval()(torch.zeros(2, *layer.shape)).shape == (2, 4)
    vit = tvm.VisionTransformer(
        image_size=48, patch_size=16, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    layer = infer.input_layer(vit)
    assert (layer.name, layer.shape) == ("conv_proj", (3, 48, 48))
    assert "48x48 from the model's image_size" in layer.defaults
    with torch.no_grad():
        vit(torch.zeros(2, *layer.shape))
    with pytest.raises(AssertionError):  # the default size would not do for this one
        vit(torch.zeros(2, 3, 64, 64))


# ---- the forgotten batch dimension ---------------------------------------------------


def test_forgotten_batch_dimension_conv(cli, tmp_path: Path) -> None:
    path = _save(tmp_path, cnn())
    _, report = json_scan(cli, path, "--input-shape", "3x32x32")
    batch = report["run"]["batch"]
    assert batch["shape"] == [16, 3, 32, 32]
    assert batch["source"] == (
        "synthetic 16x3x32x32: --input-shape 3x32x32 read as one example of 0: Conv2d(3, 8, …)"
    )
    header = cli("scan", path, "--input-shape", "3x32x32").out.split("\n\n")[0]
    assert "--input-shape 3x32x32 read as one example" in header


def test_forgotten_batch_dimension_linear(cli, tmp_path: Path) -> None:
    _, report = json_scan(cli, _save(tmp_path, mlp()), "--input-shape", "784")
    assert report["run"]["batch"]["shape"] == [16, 784]
    assert "--input-shape 784 read as one example of 0" in report["run"]["batch"]["source"]


def test_a_batch_dimension_given_is_kept(cli, tmp_path: Path) -> None:
    _, report = json_scan(cli, _save(tmp_path, mlp()), "--input-shape", "4x784")
    assert report["run"]["batch"] == {**report["run"]["batch"], "shape": [4, 784]}
    assert report["run"]["batch"]["source"] == "synthetic 4x784"


@pytest.mark.parametrize(
    "model,shape,needle",
    [
        (cnn, "4x32x32", "layer '0' [Conv2d(in_channels=3)] on input of shape [4, 32, 32]"),
        (mlp, "783", "layer '0' [Linear(in_features=784)] on input of shape [783]"),
    ],
    ids=["conv-channels", "linear-features"],
)
def test_a_shape_that_is_not_one_example_keeps_its_error(cli, tmp_path, model, shape, needle):
    line = one_line_error(cli("scan", _save(tmp_path, model()), "--input-shape", shape))
    assert needle in line and "--input-shape" in line


# ---- a .py MODEL without :factory ----------------------------------------------------

MODELS_PY = """
import torch
from torch import nn
from torch.nn import Module as Base

open(__file__ + ".ran", "w").close()  # would show that the file was executed


class Net(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.fc = nn.Linear(4, width)

    def forward(self, x):
        return self.fc(x)


class Wide(Net):
    pass


class Needy(Base):
    def __init__(self, depth, *, act="relu"):
        super().__init__()


class Helper:
    pass


def make_model():
    return Net()


def build(cfg):
    return Net(cfg.width)


def _private():
    return Net()
"""


def test_a_python_file_without_factory_lists_its_callables(cli, tmp_path: Path) -> None:
    path = tmp_path / "models.py"
    path.write_text(MODELS_PY)
    line = one_line_error(cli("scan", path))
    assert line == (
        f"nnhealth: error: {path}: Python source, not a saved model; name the factory to "
        f"call as {path}:NAME, one of Net(width=64), Wide(), make_model()"
    )
    assert not Path(f"{path}.ran").exists()  # listed from its syntax tree, never run
    res = cli("scan", f"{path}:make_model", "--input-shape", "8x4", "--format", "json")
    assert res.code in (0, 1), res.err  # the name it suggests works


def test_a_python_file_with_no_callable_factory(cli, tmp_path: Path) -> None:
    path = tmp_path / "train.py"
    path.write_text("def build(cfg):\n    return None\n\nx = 1\n")
    line = one_line_error(cli("scan", path))
    assert "train.py: Python source, not a saved model, and it defines no function" in line
    assert "(found build(cfg), which need arguments)" in line


def test_text_that_is_not_python_keeps_its_error(cli, tmp_path: Path) -> None:
    path = tmp_path / "notes.py"
    path.write_text("this is not ( python\n")
    assert "not a model format" in one_line_error(cli("scan", path))


def test_inference_does_not_run_the_users_hooks() -> None:
    """The first-layer probe runs a meta-device copy: a hook the user put on the model
    (collecting activations into a list) must see only the real scan's tensors."""
    import nnhealth

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    seen: list[torch.Tensor] = []
    handle = model[0].register_forward_hook(lambda m, i, o: seen.append(o))
    pre = model[0].register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    nnhealth.scan(model)
    handle.remove()
    pre.remove()
    assert seen and all(t.device.type != "meta" for t in seen)
