"""The zoo: stock torchvision, timm and transformers models built from their configs with
their own default init (no downloads), at small input sizes.

Each library is an optional test dependency (the ``zoo`` extra, installed in CI): its
tests are skipped with the reason when it does not import. Models are built once per
session and shared: a scan leaves a model exactly as it found it, so sharing is safe (and
``test_zoo_models_are_left_as_found`` checks it). ``benchmarks/zoo.py`` loads this file
for its table, so the benchmark measures the models the tests judge.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

IMAGE = (4, 3, 32, 32)  # batch of 4 small images, 10 classes
TOKENS = (4, 16)  # batch of 4 sequences of 16 token ids
VOCAB = 100


def library(name: str) -> Any:
    """The optional library, or a skip with why it is missing (torchvision raises a
    RuntimeError, not an ImportError, beside a torch it was not built for)."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - any failure to import means "not here"
        pytest.skip(
            f"{name} does not import here ({type(exc).__name__}: {exc}); "
            "install the zoo extra: pip install -e '.[zoo]'"
        )


def images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(IMAGE[0], 3, size, size, generator=gen)
    return x, torch.randint(0, 10, (IMAGE[0],), generator=gen)


def token_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, TOKENS, generator=torch.Generator().manual_seed(0))


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: getattr(library("torchvision.models"), name)(num_classes=10, **kw)


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    return lambda: library("timm").create_model(name, pretrained=False, num_classes=10, **kw)


def _tv_vit() -> nn.Module:
    models = library("torchvision.models")
    return models.VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=4,
        num_heads=4,
        hidden_dim=64,
        mlp_dim=128,
        num_classes=10,
    )


def _hf(model: str, config: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        tf = library("transformers")
        tf.logging.set_verbosity_error()
        return getattr(tf, model)(getattr(tf, config)(**kw))

    return build


_GPT2 = {
    "n_layer": 2,
    "n_embd": 64,
    "n_head": 2,
    "vocab_size": VOCAB,
    "n_positions": 32,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
_BERT = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "vocab_size": VOCAB,
    "max_position_embeddings": 32,
    "num_labels": 3,
}
_LLAMA = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 32,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


@dataclass(frozen=True)
class ZooModel:
    name: str  # "library/model"
    build: Callable[[], nn.Module]
    batch: Callable[[], Any]

    @property
    def library(self) -> str:
        return self.name.split("/")[0]


def _text_classes() -> tuple[torch.Tensor, torch.Tensor]:
    return token_ids(), torch.randint(
        0, 3, (TOKENS[0],), generator=torch.Generator().manual_seed(1)
    )


CATALOG = [
    ZooModel("torchvision/resnet18", _tv("resnet18"), images),
    ZooModel("torchvision/resnet50", _tv("resnet50"), images),
    ZooModel("torchvision/convnext_tiny", _tv("convnext_tiny"), images),
    ZooModel("torchvision/mobilenet_v3_small", _tv("mobilenet_v3_small"), images),
    ZooModel("torchvision/efficientnet_b0", _tv("efficientnet_b0"), images),
    ZooModel("torchvision/vit", _tv_vit, images),
    ZooModel(
        "timm/vit_tiny", _timm("vit_tiny_patch16_224", img_size=64, depth=4), lambda: images(64)
    ),
    ZooModel("timm/convnext_atto", _timm("convnext_atto"), lambda: images(64)),
    ZooModel("timm/efficientnet_b0", _timm("efficientnet_b0"), lambda: images(64)),
    ZooModel("timm/resnet26d", _timm("resnet26d"), lambda: images(64)),
    ZooModel("timm/regnetx_002", _timm("regnetx_002"), lambda: images(64)),
    # squeeze-excitation after a zero-initialized last BatchNorm of each block
    ZooModel("timm/seresnet18", _timm("seresnet18"), lambda: images(64)),
    ZooModel("transformers/gpt2", _hf("GPT2LMHeadModel", "GPT2Config", **_GPT2), token_ids),
    ZooModel(
        "transformers/bert",
        _hf("BertForSequenceClassification", "BertConfig", **_BERT),
        _text_classes,
    ),
    ZooModel("transformers/llama", _hf("LlamaForCausalLM", "LlamaConfig", **_LLAMA), token_ids),
]
BY_NAME = {m.name: m for m in CATALOG}
_BUILT: dict[str, nn.Module] = {}


def built(name: str) -> nn.Module:
    """The catalog model ``name``, built once per session with seed 0."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = BY_NAME[name].build()
    return _BUILT[name]


def fresh(name: str) -> nn.Module:
    """A new copy of ``name`` to break on purpose (the shared one stays healthy)."""
    torch.manual_seed(0)
    return BY_NAME[name].build()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes ``zoo_name`` runs once per catalog model."""
    if "zoo_name" in metafunc.fixturenames:
        metafunc.parametrize("zoo_name", [m.name for m in CATALOG])


@pytest.fixture
def zoo() -> Callable[[str], tuple[nn.Module, Any]]:
    """``zoo(name)`` -> (the shared model, its batch)."""
    return lambda name: (built(name), BY_NAME[name].batch())


@pytest.fixture
def zoo_fresh() -> Callable[[str], tuple[nn.Module, Any]]:
    """``zoo_fresh(name)`` -> (a new copy to break on purpose, its batch)."""
    return lambda name: (fresh(name), BY_NAME[name].batch())


@pytest.fixture
def lib() -> Callable[[str], Any]:
    """``lib(name)``: import an optional library or skip with the reason."""
    return library
