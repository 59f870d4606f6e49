"""Reading the optimizer a checkpoint was trained with (issue 14): Lightning .ckpt dicts,
torch.save training dicts, Hugging Face Trainer folders and bare optimizer state_dicts,
each written here by real torch.optim optimizers trained a few steps; bound to the
model's parameters and compared with the optimizer's own state."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from nnhealth.errors import LoadError
from nnhealth.loading.model import load_model, read_checkpoint, read_weights
from nnhealth.loading.training_state import (
    _HF_PATTERNS,
    SavedOptimizer,
    _hf_decay_rule,
    bind,
    classify,
    find_saved_optimizer,
    read_optimizer_state,
    scheduler_name,
)

FACTORY = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
"""


def small_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


def train(model: nn.Module, opt: torch.optim.Optimizer, sched=None, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        x = torch.randn(8, 6, generator=gen)
        model(x).pow(2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()


def listing(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text and text, text
    return text


def assert_same_state(bound, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Every state entry equals the optimizer's own for the same parameter object."""
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(bound.state) == len(opt.state) > 0
    for param, own in opt.state.items():
        mine = bound.state[names[id(param)]]
        assert set(mine) == set(own)
        for key, value in own.items():
            if key == "step":
                assert mine[key] == float(value)
            elif isinstance(value, torch.Tensor):
                assert torch.equal(mine[key], value), key
            else:
                assert mine[key] == value


OPTIMIZERS: list[tuple[str, Callable, dict]] = [
    ("sgd", lambda p: torch.optim.SGD(p, lr=0.05), {"momentum": 0, "nesterov": False}),
    ("momentum", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), {"momentum": 0.9}),
    (
        "nesterov",
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, nesterov=True),
        {"momentum": 0.8, "nesterov": True},
    ),
    (
        "adam",
        lambda p: torch.optim.Adam(p, lr=3e-3, betas=(0.8, 0.99), eps=1e-7),
        {"betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": 0},
    ),
    (
        "adamw",
        lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=0.05, amsgrad=True),
        {"weight_decay": 0.05, "amsgrad": True, "betas": (0.9, 0.999)},
    ),
    (
        "rmsprop",
        lambda p: torch.optim.RMSprop(p, lr=1e-3, alpha=0.9, centered=True, momentum=0.5),
        {"alpha": 0.9, "centered": True, "momentum": 0.5},
    ),
]


@pytest.mark.parametrize(("kind", "make", "hyper"), OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_bare_state_dict_gives_class_hyper_parameters_and_state(
    tmp_path: Path, kind: str, make: Callable, hyper: dict
) -> None:
    model = small_model()
    opt = make(model.parameters())
    train(model, opt)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    bound = bind(read_optimizer_state(tmp_path / "opt.pt"), model)
    assert bound.kind == kind, bound.class_guess
    assert ("no per-parameter state" in " ".join(bound.notes)) == (kind == "sgd")
    for key, value in hyper.items():
        assert bound.hyper[key] == value, key
    assert bound.lr == opt.param_groups[0]["lr"]
    assert "no scheduler" in bound.lr_source
    assert set(bound.param_lr) == {n for n, _ in model.named_parameters()}
    if kind == "sgd":  # plain SGD keeps no state
        assert bound.state == {} and bound.step is None
    else:
        assert_same_state(bound, model, opt)
    if kind in ("adam", "adamw", "rmsprop"):
        assert bound.step == 3


def test_binding_changes_neither_the_model_nor_the_saved_tensors(tmp_path: Path) -> None:
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, opt)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    saved = read_optimizer_state(tmp_path / "opt.pt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved_before = {
        (pid, k): v.clone()
        for pid, entry in saved.state_dict["state"].items()
        for k, v in entry.items()
    }
    bound = bind(saved, model)
    bound.state["0.weight"]["step"] = -1.0  # the bound copy is its own dict
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for (pid, k), v in saved_before.items():
        assert torch.equal(saved.state_dict["state"][pid][k], v)
    assert saved.state_dict["state"][0]["step"].item() == 3


def test_classify_lars_lamb_and_unrecognized_groups() -> None:
    timm_lars = {
        "lr": 1.0, "momentum": 0.9, "dampening": 0, "weight_decay": 1e-4, "nesterov": False,
        "trust_coeff": 0.001, "trust_clip": False, "eps": 1e-8, "always_adapt": False,
        "foreach": None, "params": [0],
    }  # fmt: skip
    bolts_lars = {"lr": 0.1, "momentum": 0.9, "dampening": 0, "weight_decay": 0,
                  "nesterov": False, "trust_coefficient": 0.001, "eps": 1e-8, "params": [0]}  # fmt: skip
    timm_lamb = {
        "lr": 1e-3, "bias_correction": True, "betas": (0.9, 0.999), "eps": 1e-6,
        "weight_decay": 0.01, "grad_averaging": True, "max_grad_norm": 1.0,
        "trust_clip": False, "always_adapt": False, "params": [0],
    }  # fmt: skip
    torch_optimizer_lamb = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0,
                            "clamp_value": 10, "adam": False, "debias": False, "params": [0]}  # fmt: skip
    assert classify(timm_lars)[0] == "lars" and "trust_coeff" in classify(timm_lars)[1]
    assert classify(bolts_lars)[0] == "lars"
    assert classify(timm_lamb)[0] == "lamb" and "timm" in classify(timm_lamb)[1]
    assert classify(torch_optimizer_lamb)[0] == "lamb"
    # SGD's keys without dampening (Muon), Adam's plus other hyper-parameters (AdaBelief)
    muon = {"lr": 0.02, "momentum": 0.95, "nesterov": True, "weight_decay": 0.1,
            "ns_steps": 5, "eps": 1e-7, "params": [0]}  # fmt: skip
    adabelief = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-16, "weight_decay": 0,
                 "amsgrad": False, "rectify": True, "degenerated_to_sgd": True, "params": [0]}  # fmt: skip
    for group in (muon, adabelief):
        kind, guess = classify(group)
        assert kind is None and "not an optimizer nnhealth models" in guess
    p = [nn.Parameter(torch.zeros(2))]
    for cls in ("Adagrad", "Adadelta", "Adamax", "NAdam", "RAdam", "ASGD", "Rprop"):
        group = getattr(torch.optim, cls)(p).state_dict()["param_groups"][0]
        kind, guess = classify(group)
        assert kind is None, cls
        assert "lr" in guess and "params" not in guess


def test_adam_without_the_decoupled_key_is_guessed_and_says_so() -> None:
    p = [nn.Parameter(torch.zeros(2))]
    for cls, wd, kind in (("Adam", 0.0, "adam"), ("AdamW", 0.01, "adamw")):
        group = dict(getattr(torch.optim, cls)(p, weight_decay=wd).state_dict()["param_groups"][0])
        assert classify(group)[0] == kind
        del group["decoupled_weight_decay"]  # what torch < 2.6 writes
        guessed, why = classify(group)
        assert guessed == kind and "no decoupled_weight_decay key" in why
    # labels and scheduler keys in a group do not hide the class
    group = dict(torch.optim.SGD(p, lr=0.1, momentum=0.9).state_dict()["param_groups"][0])
    group.update(name="decoder", initial_lr=0.1)
    assert classify(group)[0] == "momentum"


@pytest.mark.parametrize("which", ["StepLR", "LambdaLR"])
def test_lr_after_the_scheduler(tmp_path: Path, which: str) -> None:
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if which == "StepLR":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        expected = 0.1 * 0.5  # after 3 steps: one decay (epochs 0-1, then 2-3)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
        expected = 0.1 / 4
    train(model, opt, sched)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, tmp_path / "c.pt")
    saved = read_optimizer_state(tmp_path / "c.pt")
    assert scheduler_name(saved.scheduler) == which
    bound = bind(saved, model)
    assert bound.lr == pytest.approx(expected, rel=1e-12)
    assert bound.lr == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
    assert which in bound.lr_source and "_last_lr" in bound.lr_source
    assert bound.notes == []


def test_scheduler_last_lr_wins_over_a_stale_group_lr(tmp_path: Path) -> None:
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    train(model, opt, sched, steps=2)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 1e-3  # e.g. saved before the scheduler wrote it
    saved = SavedOptimizer(sd, sched.state_dict(), "x")
    bound = bind(saved, model)
    assert bound.lr == pytest.approx(1e-5)
    assert any("differs from the scheduler's _last_lr" in n for n in bound.notes)
    assert "scheduler _last_lr" in bound.lr_source


def test_lightning_ckpt_by_hand_through_load_model(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "net.py").write_text(FACTORY)
    model = small_model()  # the factory's model: same seed, same architecture
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, betas=(0.85, 0.995))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    train(model, opt, sched)
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "optimizer_states": [opt.state_dict()],
        "lr_schedulers": [sched.state_dict()],
        "epoch": 0,
        "global_step": 3,
        "pytorch-lightning_version": "2.4.0",
    }
    torch.save(ckpt, tmp_path / "model.ckpt")
    monkeypatch.chdir(tmp_path)
    loaded = load_model("net.py:build", weights="model.ckpt")
    assert loaded.optimizer is not None
    assert "Lightning optimizer_states[0]" in loaded.optimizer.where
    bound = bind(loaded.optimizer, loaded.model)
    assert bound.kind == "adam" and bound.hyper["betas"] == (0.85, 0.995)
    assert bound.lr == pytest.approx(3e-4 * 0.9**3, rel=1e-12)
    assert "LambdaLR" in bound.lr_source and bound.step == 3
    # the loaded model's parameters are other objects: compare by name
    mine = dict(loaded.model.named_parameters())
    assert all(torch.equal(mine[n], p) for n, p in model.named_parameters())
    assert_same_state(bound, model, opt)
    # the same file read as --optimizer-state
    assert read_optimizer_state(tmp_path / "model.ckpt").where.endswith("optimizer_states[0])")


@pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None, reason="lightning is not installed"
)
def test_real_lightning_checkpoint(tmp_path: Path) -> None:  # pragma: no cover (no lightning here)
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = small_model()

        def training_step(self, batch, _):
            return self.model(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=2e-3)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(32, 6)), 8)
    module = Module()
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "real.ckpt")
    bound = bind(read_optimizer_state(tmp_path / "real.ckpt"), module.model)
    assert bound.kind == "adamw" and bound.lr == pytest.approx(2e-3) and bound.step == 3


def test_torch_save_training_dict(tmp_path: Path) -> None:
    model = small_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, sched)
    blob = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": 3}  # fmt: skip
    torch.save(blob, tmp_path / "train.pt")
    saved = read_optimizer_state(tmp_path / "train.pt")
    assert saved.where.endswith("(optimizer)") and saved.scheduler is not None
    bound = bind(saved, model)
    assert bound.kind == "nesterov" and bound.lr == pytest.approx(0.2 * 0.5**3)
    assert_same_state(bound, model, opt)
    # MODEL given as that file: a state_dict, with the optimizer kept beside it
    loaded = load_model(str(tmp_path / "train.pt"))
    assert loaded.model is None and loaded.optimizer is not None
    assert loaded.optimizer.state_dict["param_groups"][0]["nesterov"] is True
    # a pickled nn module under "model" keeps it too
    torch.save({"model": model, "optim": opt.state_dict()}, tmp_path / "module.pt")
    loaded = load_model(str(tmp_path / "module.pt"))
    assert isinstance(loaded.model, nn.Sequential) and loaded.optimizer is not None
    # and the weights-only path
    state, optimizer = read_checkpoint(tmp_path / "train.pt", [])
    assert set(state) == set(model.state_dict()) and optimizer is not None
    # a checkpoint without one
    torch.save({"model": model.state_dict(), "optim": "adam"}, tmp_path / "plain.pt")
    assert read_checkpoint(tmp_path / "plain.pt", [])[1] is None
    assert load_model(str(tmp_path / "plain.pt")).optimizer is None


def hf_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The two param groups Hugging Face Trainer builds (its create_optimizer): with
    transformers' own decay rule when it is installed, else the same rule written out."""
    try:
        from transformers import Trainer

        decay = set(Trainer.get_decay_parameter_names(None, model))
    except ImportError:
        norms = {f"{m}.{n}" for m, mod in model.named_modules() if isinstance(mod, nn.LayerNorm)
                 for n, _ in mod.named_parameters()}  # fmt: skip
        decay = {n for n, _ in model.named_parameters() if "bias" not in n and n not in norms}
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n in decay and p.requires_grad], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay and p.requires_grad], "weight_decay": 0.0},
    ]  # fmt: skip


def write_hf_folder(folder: Path, model: nn.Module, opt, sched) -> None:
    folder.mkdir()
    try:
        from safetensors.torch import save_file

        # with the metadata transformers' save_pretrained writes
        save_file(model.state_dict(), str(folder / "model.safetensors"), metadata={"format": "pt"})
    except ImportError:
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    torch.save(opt.state_dict(), folder / "optimizer.pt")
    torch.save(sched.state_dict(), folder / "scheduler.pt")
    (folder / "trainer_state.json").write_text("{}")


def test_hugging_face_trainer_folder(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "net.py").write_text(FACTORY)
    model = small_model()
    opt = torch.optim.AdamW(hf_groups(model, 0.01), lr=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))
    train(model, opt, sched)
    write_hf_folder(tmp_path / "checkpoint-3", model, opt, sched)
    saved = read_optimizer_state(tmp_path / "checkpoint-3")
    assert saved.where.endswith("optimizer.pt") and saved.scheduler is not None
    bound = bind(saved, model)
    assert bound.kind == "adamw" and bound.lr == pytest.approx(5e-4 * 0.4)
    assert any("Hugging Face Trainer" in n for n in bound.notes)
    assert bound.param_hyper["0.weight"]["weight_decay"] == 0.01
    assert bound.param_hyper["0.bias"]["weight_decay"] == 0.0
    assert bound.param_hyper["1.weight"]["weight_decay"] == 0.0  # LayerNorm
    assert_same_state(bound, model, opt)
    # --weights FOLDER: weights and optimizer
    monkeypatch.chdir(tmp_path)
    loaded = load_model("net.py:build", weights="checkpoint-3")
    assert loaded.optimizer is not None
    mine = dict(loaded.model.named_parameters())
    assert all(torch.equal(mine[n], p) for n, p in model.named_parameters())
    assert bind(loaded.optimizer, loaded.model).kind == "adamw"


class GainNet(nn.Module):
    """A decayed vector (``gain``) between matrices: only the Trainer's split fits it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 16)
        self.gain = nn.Parameter(torch.ones(16))
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.inp(x) * self.gain)))


def test_trainer_split_with_a_decayed_vector() -> None:
    model = GainNet()
    opt = torch.optim.AdamW(hf_groups(model, 0.1), lr=1e-3)
    assert len(opt.param_groups[0]["params"]) == 3  # inp.weight, gain, out.weight
    train(model, opt)
    bound = bind(SavedOptimizer(opt.state_dict(), None, "x"), model)
    assert any("Hugging Face Trainer" in n for n in bound.notes)
    assert bound.param_hyper["gain"]["weight_decay"] == 0.1
    assert bound.param_hyper["norm.weight"]["weight_decay"] == 0.0
    assert_same_state(bound, model, opt)


def test_trainer_decay_rule_matches_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    for model in (transformers.BertForSequenceClassification(config), GainNet()):
        theirs = set(transformers.Trainer.get_decay_parameter_names(None, model))
        assert _hf_decay_rule(model, _HF_PATTERNS[0]) == theirs
    model = transformers.BertForSequenceClassification(config)
    opt = torch.optim.AdamW(hf_groups(model, 0.01), lr=1e-3)
    ids = torch.randint(0, 50, (4, 8))
    model(input_ids=ids, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    opt.step()
    assert_same_state(bind(SavedOptimizer(opt.state_dict(), None, "x"), model), model, opt)


def test_param_names_with_a_wrapper_prefix_and_a_frozen_parameter() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = small_model()

    wrapper = Wrapper()
    wrapper.model[0].weight.requires_grad_(False)
    trainable = [(n, p) for n, p in wrapper.named_parameters() if p.requires_grad]
    opt = torch.optim.Adam(trainable, lr=1e-3)
    train(wrapper.model, opt)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"][0] == "model.0.bias"
    bound = bind(SavedOptimizer(sd, None, "x"), wrapper.model)
    assert "0.weight" not in bound.param_lr and "0.weight" not in bound.state
    assert any("param_names" in n for n in bound.notes)
    assert_same_state(bound, wrapper.model, opt)
    # the same without names: the trainable parameters in order
    for group in sd["param_groups"]:
        del group["param_names"]
    bound = bind(SavedOptimizer(sd, None, "x"), wrapper.model)
    assert "0.weight" not in bound.state
    assert_same_state(bound, wrapper.model, opt)


def test_a_different_model_is_refused_with_one_line() -> None:
    model = small_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    train(model, opt)
    saved = SavedOptimizer(opt.state_dict(), None, "ckpt.pt (optimizer)")
    torch.manual_seed(0)
    # same parameter count, other shapes
    other = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 3))
    with pytest.raises(LoadError) as exc:
        bind(saved, other)
    text = one_line(exc)
    assert "holds 6 parameters, the model 6" in text
    assert "(16, 6)" in text and "(12, 6)" in text
    assert "without the state" in text
    with pytest.raises(LoadError) as exc:
        bind(saved, nn.Linear(6, 3))
    assert "holds 6 parameters, the model 2 (2 trainable)" in one_line(exc)


def test_malformed_optimizer_states_are_refused() -> None:
    good = torch.optim.SGD(small_model().parameters(), lr=0.1).state_dict()
    cases = {
        "params": {"state": {}, "param_groups": [{"lr": 0.1, "params": ["a"]}]},
        "lr": {"state": {}, "param_groups": [{"lr": "fast", "params": [0]}]},
        "not a dict": {"state": [], "param_groups": good["param_groups"]},
        "parameter id": {"state": {99: {}}, "param_groups": good["param_groups"]},
        "twice": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 0]}]},
        "non-empty list": {"state": {}, "param_groups": []},
    }
    for needle, sd in cases.items():
        with pytest.raises(LoadError) as exc:
            find_saved_optimizer({"model": {}, "optimizer": sd}, "c.pt")
        assert needle in one_line(exc)
    assert find_saved_optimizer({"model": {}}, "c.pt") is None
    assert find_saved_optimizer(torch.zeros(2), "c.pt") is None


def test_a_malformed_optimizer_beside_the_weights_does_not_stop_the_scan(tmp_path: Path) -> None:
    model = small_model()
    # e.g. FSDP's optim_state_dict: parameters named, not numbered
    fsdp_like = {"state": {"0.weight": {}}, "param_groups": [{"lr": 0.1, "params": ["0.weight"]}]}
    torch.save({"model": model.state_dict(), "optimizer": fsdp_like}, tmp_path / "c.pt")
    loaded = load_model(str(tmp_path / "c.pt"))
    assert loaded.optimizer is None and set(loaded.state) == set(model.state_dict())
    assert any(
        "optimizer state not used" in n and "params is not a list of ints" in n
        for n in loaded.notes
    )
    notes: list[str] = []
    state, optimizer = read_checkpoint(tmp_path / "c.pt", notes)
    assert optimizer is None and len(notes) == 1 and set(state) == set(model.state_dict())
    with pytest.raises(LoadError) as exc:  # asked for by name: an error
        read_optimizer_state(tmp_path / "c.pt")
    assert "params is not a list of ints" in one_line(exc)
    assert find_saved_optimizer(torch.zeros(2), "c.pt") is None


def flip_tensor_byte(data: bytes) -> bytes:
    """A torch.save zip with one byte of its first tensor's data flipped."""
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        info = next(i for i in zf.infolist() if "/data/" in i.filename)
    at = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[at + 26 : at + 30])
    start = at + 30 + name_len + extra_len
    flipped = bytearray(data)
    flipped[start] ^= 0xFF
    return bytes(flipped)


class Writes:
    """Unpickling this would create a file: weights_only must never get that far."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bad_files_are_refused_and_nothing_is_written(tmp_path: Path) -> None:
    model = small_model()
    opt = torch.optim.Adam(model.parameters())
    train(model, opt)
    torch.save(opt.state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.pt").write_bytes(flip_tensor_byte(data))
    marker = tmp_path / "marker"
    blob = {"optimizer": opt.state_dict(), "x": Writes(str(marker))}
    torch.save(blob, tmp_path / "code.pt")
    torch.save(blob, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with (tmp_path / "plain.pkl").open("wb") as fh:
        pickle.dump(Writes(str(marker)), fh, protocol=2)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "text.pt").write_text("hello")
    before = listing(tmp_path)
    for name, needle in (
        ("missing.pt", "no such"),
        ("truncated.pt", "truncated or corrupt"),
        ("corrupt.pt", "corrupt"),
        ("code.pt", "holds more than tensors and numbers"),
        ("legacy.pt", "holds more than tensors and numbers"),
        ("plain.pkl", "truncated or corrupt"),
        ("weights.pt", "no optimizer state in it"),
        ("text.pt", "not a torch.save file"),
    ):
        with pytest.raises(LoadError) as exc:
            read_optimizer_state(tmp_path / name)
        assert needle in one_line(exc), name
    assert listing(tmp_path) == before and not marker.exists()
    assert bind(read_optimizer_state(tmp_path / "good.pt"), model).kind == "adam"
    # an optimizer state given where weights go
    for load in (
        lambda: load_model(str(tmp_path / "good.pt")),
        lambda: read_weights(tmp_path / "good.pt"),
    ):
        with pytest.raises(LoadError) as exc:
            load()
        assert "an optimizer state_dict, not model weights; give it as optimizer_state" in one_line(
            exc
        )


def test_directories_that_are_not_trainer_folders(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError) as exc:
        read_weights(tmp_path / "empty")
    assert "is a directory without model.safetensors or pytorch_model.bin" in one_line(exc)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(LoadError) as exc:
        read_weights(sharded)
    assert "sharded checkpoints are not read" in one_line(exc)
    with pytest.raises(LoadError) as exc:
        read_optimizer_state(tmp_path / "empty")
    assert "without optimizer.pt" in one_line(exc)
    # a save_pretrained folder: weights, no optimizer
    model = small_model()
    (tmp_path / "pretrained").mkdir()
    torch.save(model.state_dict(), tmp_path / "pretrained" / "pytorch_model.bin")
    state, optimizer = read_checkpoint(tmp_path / "pretrained", [])
    assert optimizer is None and set(state) == set(model.state_dict())
    # a broken scheduler.pt in a Trainer folder
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (tmp_path / "pretrained" / "optimizer.pt").write_bytes(b"")
    torch.save(opt.state_dict(), tmp_path / "pretrained" / "optimizer.pt")
    torch.save(torch.zeros(2), tmp_path / "pretrained" / "scheduler.pt")
    with pytest.raises(LoadError) as exc:
        read_optimizer_state(tmp_path / "pretrained")
    assert "holds no scheduler state_dict" in one_line(exc)
    assert os.path.exists(tmp_path / "pretrained" / "scheduler.pt")
