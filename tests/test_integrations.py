"""The Lightning and Hugging Face adapters over nnhealth.Monitor, each run by the real
framework's trainer (skipped with the reason where the framework is not installed)."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnhealth

# Lightning's own deprecation notice on torch's pytree, not ours
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

# ---- without either framework ------------------------------------------------------


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_importing_nnhealth_imports_no_framework():
    done = _run(
        "import sys, nnhealth, nnhealth.integrations, nnhealth.monitor\n"
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers',"
        " 'accelerate') if m in sys.modules))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module, hidden, extra",
    [
        ("lightning", ("lightning", "lightning.pytorch", "pytorch_lightning"), "lightning"),
        ("huggingface", ("transformers",), "hf"),
    ],
)
def test_missing_framework_names_the_extra(module, hidden, extra):
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in hidden)
    done = _run(
        f"import sys\n{blocked}"
        "try:\n"
        f"    import nnhealth.integrations.{module}\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    assert done.returncode == 0, done.stderr
    assert f"pip install 'nnhealth[{extra}]'" in done.stdout


# ---- Lightning ---------------------------------------------------------------------


def _lightning():
    return pytest.importorskip("lightning.pytorch", reason="Lightning is not installed")


def _lightning_module(pl, *, dead: bool = False, dropout: float = 0.0, lr: float = 0.05):
    class Module(pl.LightningModule):
        """A small classifier; ``dead``: its hidden ReLUs never fire (bias -10)."""

        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(
                nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 3)
            )
            if dead:
                with torch.no_grad():
                    self.net[0].bias.fill_(-10.0)
            self.losses: list[tuple[int, int, float]] = []  # (global step, batch_idx, loss)
            self.grads: dict[int, float] = {}  # global step: first layer's weight grad norm

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.losses.append((self.trainer.global_step, batch_idx, float(loss.detach())))
            return loss

        def on_before_optimizer_step(self, optimizer):
            self.grads[self.trainer.global_step] = float(self.net[0].weight.grad.norm())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    return Module()


def _loader(n: int = 96, batch: int = 8):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    dataset = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, generator=gen)


def _fit(pl, module, callback=None, batch=8, **trainer_args):
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[] if callback is None else [callback],
        **{"max_steps": 20, **trainer_args},
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, _loader(batch=batch))
    return trainer


def _warned(caught: list, text: str) -> bool:
    return any(
        issubclass(w.category, nnhealth.NnhealthWarning) and text in str(w.message) for w in caught
    )


def _hooks(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_lightning_history_at_every_steps():
    pl = _lightning()
    from nnhealth.integrations.lightning import NnhealthCallback

    pl.seed_everything(0)
    module = _lightning_module(pl)
    callback = NnhealthCallback(every=6)
    _fit(pl, module, callback, max_steps=20)
    lines = callback.monitor.lines
    assert [line["step"] for line in lines] == [0, 6, 12, 18]
    # 12 batches an epoch
    assert [line["epoch"] for line in lines] == [0, 0, 1, 1]
    loss = {step: value for step, _, value in module.losses}
    for line in lines:
        assert line["loss"] == pytest.approx(loss[line["step"]], rel=1e-6)
        assert line["examples"] == 8
        first = next(row for row in line["layers"] if row["name"] == "net.0")
        assert first["grad_norm"] == pytest.approx(module.grads[line["step"]], rel=1e-5)
        assert {"net.0", "net.1", "net.3"} <= {row["name"] for row in line["layers"]}
    assert _hooks(module) == 0


def test_lightning_accumulation_observes_the_micro_batch_of_the_step():
    pl = _lightning()
    from nnhealth.integrations.lightning import NnhealthCallback

    pl.seed_everything(0)
    module = _lightning_module(pl)
    callback = NnhealthCallback(every=2)
    # 12 batches an epoch in steps of 5: the epoch's last step has 2 micro-batches
    _fit(pl, module, callback, max_steps=6, accumulate_grad_batches=5)
    lines = callback.monitor.lines
    assert [line["step"] for line in lines] == [0, 2, 4]
    last = {}
    for step, batch_idx, value in module.losses:
        last[step] = (batch_idx, value)  # the step's last micro-batch
    assert [last[line["step"]][0] for line in lines] == [4, 11, 9]
    for line in lines:
        assert line["loss"] == pytest.approx(last[line["step"]][1], rel=1e-6)
        first = next(row for row in line["layers"] if row["name"] == "net.0")
        assert first["grad_norm"] == pytest.approx(module.grads[line["step"]], rel=1e-5)


def test_lightning_monitor_changes_no_weight():
    pl = _lightning()
    from nnhealth.integrations.lightning import NnhealthCallback

    states = []
    for callback in (None, NnhealthCallback(every=3, hessian_every=5)):
        pl.seed_everything(0)
        module = _lightning_module(pl, dropout=0.2)
        _fit(pl, module, callback, max_steps=15)
        states.append(module.state_dict())
    assert any(line["curvature"] for line in callback.monitor.lines)
    assert states[0].keys() == states[1].keys()
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


def test_lightning_stop_ends_training_at_the_finding():
    pl = _lightning()
    from nnhealth.integrations.lightning import NnhealthCallback

    pl.seed_everything(0)
    module = _lightning_module(pl, dead=True)
    callback = NnhealthCallback(every=5, on_finding="stop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", nnhealth.NnhealthWarning)
        # 32 examples: enough values per unit to call one dead
        trainer = _fit(pl, module, callback, batch=32, max_steps=30)
    assert _warned(caught, "step 0: NH101")
    assert trainer.global_step == 1
    assert [(step, f.code) for step, f in callback.monitor.findings if f.code == "NH101"] == [
        (0, "NH101")
    ]
    healthy = _lightning_module(pl)
    callback = NnhealthCallback(every=5, on_finding="stop")
    assert _fit(pl, healthy, callback, max_steps=12).global_step == 12


def test_lightning_raise_leaves_no_hook():
    pl = _lightning()
    from nnhealth.integrations.lightning import NnhealthCallback

    pl.seed_everything(0)
    module = _lightning_module(pl, dead=True)
    callback = NnhealthCallback(every=5, on_finding="raise")
    with pytest.raises(nnhealth.TrainingHealthError, match="NH101") as caught:
        _fit(pl, module, callback, batch=32)
    assert caught.value.step == 0
    assert _hooks(module) == 0


def test_lightning_failed_step_is_abandoned():
    pl = _lightning()
    from nnhealth.integrations.lightning import NnhealthCallback

    pl.seed_everything(0)
    module = _lightning_module(pl)

    def failing(batch, batch_idx):
        raise RuntimeError("boom")

    module.training_step = failing
    callback = NnhealthCallback(every=1)
    with pytest.raises(RuntimeError, match="boom"):
        _fit(pl, module, callback)
    assert _hooks(module) == 0
    assert callback.monitor.lines == []


# ---- Hugging Face ------------------------------------------------------------------


def _transformers():
    tf = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="accelerate is not installed (the Trainer needs it)")
    return tf


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, length: int = 12) -> None:
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 50, (n, length), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _gpt2(tf):
    torch.manual_seed(0)
    config = tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16)
    config.bos_token_id = config.eos_token_id = None
    return tf.GPT2LMHeadModel(config)


def _train(tf, model, dataset, callback, tmp_path, **overrides):
    args = tf.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        **{
            "per_device_train_batch_size": 8,
            "max_steps": 10,
            "learning_rate": 1e-3,
            "report_to": [],
            "save_strategy": "no",
            "logging_strategy": "no",
            "use_cpu": True,
            "disable_tqdm": True,
            "dataloader_num_workers": 0,
            "seed": 0,
            **overrides,
        },
    )
    callbacks = [] if callback is None else [callback]
    trainer = tf.Trainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    return trainer


def _losses(model: nn.Module) -> list[float]:
    """Each call's loss, recorded by a forward hook."""
    seen: list[float] = []
    model.register_forward_hook(lambda m, args, out: seen.append(float(out["loss"].detach())))
    return seen


@pytest.mark.parametrize("accumulate", [1, 2])
def test_hf_history_at_every_steps(tmp_path, accumulate):
    tf = _transformers()
    from nnhealth.integrations.huggingface import NnhealthTrainerCallback

    model = _gpt2(tf)
    seen = _losses(model)
    callback = NnhealthTrainerCallback(every=4)
    max_steps = 9
    _train(
        tf,
        model,
        _Tokens(),
        callback,
        tmp_path,
        max_steps=max_steps,
        gradient_accumulation_steps=accumulate,
    )
    lines = callback.monitor.lines
    assert [line["step"] for line in lines] == [0, 4, 8]
    assert len(seen) == max_steps * accumulate
    per_epoch = math.ceil(len(_Tokens()) / 8 / accumulate)
    for line in lines:
        step = line["step"]
        assert line["epoch"] == step // per_epoch
        micro = seen[step * accumulate : (step + 1) * accumulate]
        # each micro-batch's loss is its share of the step's (divided by the step's tokens)
        assert line["loss"] == pytest.approx(math.fsum(micro), rel=1e-6)
        assert line["optimizer"] == "AdamW"
        names = {row["name"] for row in line["layers"]}
        assert {"transformer.h.0.mlp.c_fc", "lm_head"} <= names
    assert callback.monitor.optimizer is not None
    assert type(callback.monitor.optimizer).__module__.startswith("torch.optim")
    assert _hooks(model) == 1  # the test's own


def test_hf_monitor_changes_no_weight(tmp_path):
    tf = _transformers()
    from nnhealth.integrations.huggingface import NnhealthTrainerCallback

    states = []
    for callback in (None, NnhealthTrainerCallback(every=2, hessian_every=4)):
        model = _gpt2(tf)
        assert model.config.resid_pdrop > 0  # dropout draws: the monitor must not move them
        _train(tf, model, _Tokens(), callback, tmp_path, max_steps=6)
        states.append(model.state_dict())
    assert any(line["curvature"] for line in callback.monitor.lines)
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name


class _DeadNet(nn.Module):
    """A model the Trainer takes (keyword inputs, a dict output with its loss) whose
    hidden ReLUs never fire."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(6, 16)
        self.act = nn.ReLU()
        self.out = nn.Linear(16, 3)
        with torch.no_grad():
            self.hidden.bias.fill_(-10.0)

    def forward(self, x, labels=None):
        logits = self.out(self.act(self.hidden(x)))
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


class _Features(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=gen)
        self.y = torch.randint(0, 3, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def test_hf_stop_ends_training_at_the_finding(tmp_path):
    tf = _transformers()
    from nnhealth.integrations.huggingface import NnhealthTrainerCallback

    torch.manual_seed(0)
    model = _DeadNet()
    callback = NnhealthTrainerCallback(every=3, on_finding="stop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", nnhealth.NnhealthWarning)
        trainer = _train(
            tf, model, _Features(), callback, tmp_path, max_steps=20, per_device_train_batch_size=32
        )
    assert _warned(caught, "step 0: NH101")
    assert trainer.state.global_step == 1
    assert (0, "NH101") in [(step, f.code) for step, f in callback.monitor.findings]
    assert _hooks(model) == 0
