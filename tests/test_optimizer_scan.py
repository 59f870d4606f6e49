"""The optimizer-aware scan against ground truth (issue 14, "NH301 per optimizer" and
"Done when"): the relative update NH301 reports is the real torch.optim step's; an
Adam-trained Lightning-style checkpoint is read, judged on the preconditioned sharpness
and on Adam's update, through the CLI and the Python API alike; the scan leaves the
model and the optimizer's state as found; --what-if trains with the same optimizer."""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnhealth

FACTORY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).double()
"""
WEIGHTS = ("0.weight", "2.weight", "4.weight")


def make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)
    ).double()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
    return x, torch.randn(16, 3, generator=gen, dtype=torch.float64)


def train(model: nn.Module, opt, sched=None, steps: int = 4) -> None:
    for i in range(steps):
        x, y = batch(10 + i)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        if sched is not None:
            sched.step()
    opt.zero_grad(set_to_none=True)


def true_relative_updates(model: nn.Module, opt, data) -> dict[str, float]:
    """||w_after - w_before|| / ||w_before|| of ``opt``'s real step (on copies) with the
    batch gradient of the mean MSE loss."""
    twin = copy.deepcopy(model)
    live = dict(model.named_parameters())
    accepted = inspect.signature(type(opt)).parameters
    kw = {k: v for k, v in opt.param_groups[0].items() if k in accepted and k != "params"}
    other = type(opt)(twin.parameters(), **kw)
    state = copy.deepcopy(opt.state_dict())
    other.load_state_dict(state)
    F.mse_loss(twin(data[0]), data[1]).backward()
    before = {n: p.detach().clone() for n, p in twin.named_parameters()}
    other.step()
    out = {}
    for n, p in twin.named_parameters():
        if n in WEIGHTS:
            assert torch.equal(before[n], live[n].detach())
            out[n] = float((p.detach() - before[n]).norm() / before[n].norm())
    return out


def reported_updates(report) -> dict[str, float]:
    rows = {r["name"]: r for r in report.layers}
    return {f"{m}.weight": rows[m]["relative_update"] for m in ("0", "2", "4")}


OPTIMIZERS = {
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "sgd-nesterov-wd": (
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
    ),
    "adam": (torch.optim.Adam, {"lr": 1e-2, "betas": (0.9, 0.99)}),
    "adam-wd": (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 0.05}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3}),
    "rmsprop-momentum-centered": (
        torch.optim.RMSprop,
        {"lr": 1e-3, "momentum": 0.9, "centered": True},
    ),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_relative_update_is_the_real_step(name: str) -> None:
    cls, kw = OPTIMIZERS[name]
    model = make()
    opt = cls(model.parameters(), **kw)
    train(model, opt)
    data = batch()
    report = nnhealth.scan(model, data, optimizer=opt, loss_fn=F.mse_loss, select=["NH301"])
    assert report.run["optimizer"]["state"] is True
    truth = true_relative_updates(model, opt, data)
    got = reported_updates(report)
    for n in WEIGHTS:
        assert got[n] == pytest.approx(truth[n], rel=1e-6), n


def test_relative_update_without_state_is_the_first_step() -> None:
    """No state: Adam's first step is lr * g / (|g| + eps), lr per coordinate: its norm
    is lr * sqrt(n) within eps / min|g| (here 5e-4 at most)."""
    model, data = make(), batch()
    report = nnhealth.scan(
        model, data, optimizer="adam", lr=1e-3, loss_fn=F.mse_loss, select=["NH301"]
    )
    got = reported_updates(report)
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    truth = true_relative_updates(model, fresh, data)
    grads = torch.autograd.grad(
        F.mse_loss(model(data[0]), data[1]), [p for _, p in model.named_parameters()]
    )
    for (n, p), g in zip(model.named_parameters(), grads, strict=True):
        if n not in WEIGHTS:
            continue
        assert got[n] == pytest.approx(truth[n], rel=1e-6)
        tol = float(1e-8 / g.abs().min())
        assert tol < 1e-3
        assert got[n] == pytest.approx(1e-3 * p.numel() ** 0.5 / float(p.detach().norm()), rel=tol)


def _nearly_fitted() -> tuple[nn.Module, tuple]:
    """Targets 1e-6 off the model's own outputs: lr * ||grad w|| / ||w|| is ~1e-9."""
    model, (x, _) = make(), batch()
    with torch.no_grad():
        y = model(x) + 1e-6
    return model, (x, y)


def test_adam_at_1e_3_is_not_frozen_where_sgd_is() -> None:
    model, data = _nearly_fitted()
    sgd = nnhealth.scan(model, data, lr=1e-3, loss_fn=F.mse_loss, select=["NH301"])
    frozen = [f for f in sgd.findings if f.kind == "frozen"]
    assert frozen and "SGD" in frozen[0].message
    adam = nnhealth.scan(
        model, data, optimizer="adam", lr=1e-3, loss_fn=F.mse_loss, select=["NH301"]
    )
    assert not [f for f in adam.findings if f.kind == "frozen"]
    assert all(u > 1e-4 for u in reported_updates(adam).values())


# --- the "Done when": an Adam-trained Lightning checkpoint -----------------------------------

BETAS = (0.9, 0.995)


def _adam_trained() -> tuple[nn.Module, torch.optim.Adam, object]:
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=0.02, betas=BETAS, eps=1e-8)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train(model, opt, sched, steps=5)
    return model, opt, sched


def _write_ckpt(path: Path, model, opt, sched, lr: float | None = None) -> None:
    osd, ssd = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    if lr is not None:  # the same run with another rate now
        osd["param_groups"][0]["lr"] = lr
        ssd["_last_lr"] = [lr]
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizer_states": [osd],
            "lr_schedulers": [ssd],
            "epoch": 1,
            "global_step": 5,
            "pytorch-lightning_version": "2.4.0",
        },
        path,
    )


@pytest.fixture
def ckpt(tmp_path: Path, monkeypatch) -> tuple[Path, nn.Module, torch.optim.Adam, object]:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "factory.py").write_text(FACTORY)
    torch.save(batch(), tmp_path / "batch.pt")
    model, opt, sched = _adam_trained()
    _write_ckpt(tmp_path / "model.ckpt", model, opt, sched)
    return tmp_path, model, opt, sched


def _cli_scan(cli, *args: str):
    res = cli("scan", *args, "--data", "batch.pt", "--hessian", "--format", "json")
    assert res.code in (0, 1), res.err
    return json.loads(res.out)


def _entry(cli, ckpt_name: str = "model.ckpt", *more: str):
    return _cli_scan(cli, "factory.py:make", "--weights", ckpt_name, *more)


def test_the_checkpoint_reports_adam_from_the_file(cli, ckpt) -> None:
    _, model, opt, sched = ckpt
    report = _entry(cli)
    run = report["run"]["optimizer"]
    assert run["kind"] == "adam" and run["state"] is True and run["step"] == 5
    assert run["lr"] == pytest.approx(sched.get_last_lr()[0]) == pytest.approx(0.005)
    assert run["betas"] == list(BETAS)
    assert report["run"]["lr"] == pytest.approx(0.005)
    notes = " | ".join(report["notes"])
    assert "Lightning optimizer_states[0]" in notes and "StepLR" in notes, notes
    c = report["curvature"]
    assert c["operator"] == "preconditioned" and "saved exp_avg_sq" in c["preconditioner"]
    assert c["limit_factor"] == pytest.approx(38.0)
    assert c["lr_limit"] == pytest.approx(38.0 / c["top_eigenvalues"][0])
    # NH301 on Adam's update from the saved state
    rows = {r["name"]: r for r in report["layers"]}
    truth = true_relative_updates(model, opt, batch())
    for n in WEIGHTS:
        assert rows[n.split(".")[0]]["relative_update"] == pytest.approx(truth[n], rel=1e-6)
    # the --arch form reads the same
    arch = _cli_scan(cli, "model.ckpt", "--arch", "factory.py:make")
    assert arch["run"]["optimizer"] == report["run"]["optimizer"]
    assert arch["curvature"]["top_eigenvalues"] == pytest.approx(c["top_eigenvalues"])


def _nh401(report: dict) -> list[dict]:
    return [f for f in report["findings"] if f["code"] == "NH401"]


def test_the_saved_lr_is_judged_against_adams_limit(cli, ckpt) -> None:
    tmp, model, opt, sched = ckpt
    limit = _entry(cli)["curvature"]["lr_limit"]
    _write_ckpt(tmp / "high.ckpt", model, opt, sched, lr=2 * limit)
    _write_ckpt(tmp / "low.ckpt", model, opt, sched, lr=0.3 * limit)
    high = _entry(cli, "high.ckpt")
    (err,) = _nh401(high)
    assert err["severity"] == "error" and "Adam" in err["message"], err["message"]
    assert err["evidence"]["lr"] == pytest.approx(2 * limit)
    assert high["curvature"]["lr_limit"] == pytest.approx(limit, rel=1e-9)
    low = _entry(cli, "low.ckpt")
    assert not [f for f in _nh401(low) if f["severity"] in ("error", "warning")]


def test_optimizer_sgd_ignores_the_adam_state(cli, ckpt) -> None:
    report = _entry(cli, "model.ckpt", "--optimizer", "sgd")
    run = report["run"]["optimizer"]
    assert run["kind"] == "sgd" and run["state"] is False
    assert run["lr"] == pytest.approx(0.005)  # the file's lr still is used
    assert any("is not used" in n and "Adam" in n for n in report["notes"]), report["notes"]
    c = report["curvature"]
    assert c["operator"] == "hessian" and c["limit_factor"] == 2.0
    lam = c["top_eigenvalues"][0]
    rows = {r["name"]: r for r in report["layers"]}
    row = rows["0"]
    assert row["relative_update"] == pytest.approx(0.005 * row["grad_norm"] / row["weight_norm"])
    assert lam > 0


def _one_line(res) -> str:
    assert res.code == 2, (res.code, res.out, res.err)
    lines = [ln for ln in res.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.err, res.err
    return lines[0]


def test_a_mismatched_optimizer_state_is_one_line(cli, ckpt) -> None:
    tmp = ckpt[0]
    other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = torch.optim.Adam(other.parameters())
    train(other, opt, steps=1)
    torch.save(opt.state_dict(), tmp / "other.pt")
    line = _one_line(
        cli("scan", "factory.py:make", "--data", "batch.pt", "--optimizer-state", "other.pt")
    )
    assert "does not fit the model" in line


def test_one_beta_is_one_line(cli, ckpt) -> None:
    line = _one_line(cli("scan", "factory.py:make", "--data", "batch.pt", "--betas", "0.5"))
    assert "--betas" in line


def assert_as_found(model: nn.Module, weights: dict, opt, state: dict) -> None:
    """The weights, no .grad, every state tensor (torch.equal) and the step as before."""
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]) and p.grad is None
    assert set(opt.state) == set(state)
    for p, s in opt.state.items():
        assert set(s) == set(state[p])
        for k, v in s.items():
            assert torch.equal(v, state[p][k]), k


def test_the_api_with_a_live_adam_gives_the_files_numbers(cli, ckpt) -> None:
    _, model, opt, _ = ckpt
    from_file = _entry(cli)
    state = {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    live = nnhealth.scan(model, batch(), optimizer=opt, hessian=True)
    assert live.curvature["top_eigenvalues"] == pytest.approx(
        from_file["curvature"]["top_eigenvalues"], rel=1e-9
    )
    assert live.curvature["lr_limit"] == pytest.approx(from_file["curvature"]["lr_limit"])
    mine = {r["name"]: r["relative_update"] for r in live.layers if "relative_update" in r}
    theirs = {
        r["name"]: r["relative_update"] for r in from_file["layers"] if "relative_update" in r
    }
    assert len(mine) == 3
    assert mine == pytest.approx(theirs, rel=1e-9)
    assert_as_found(model, weights, opt, state)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)


@pytest.mark.skipif(
    importlib.util.find_spec("lightning") is None,
    reason="lightning is not installed (not a test dependency): the hand-written dict above "
    "has the keys trainer.save_checkpoint writes",
)
def test_a_real_lightning_checkpoint(cli, tmp_path: Path, monkeypatch) -> None:
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make()

        def training_step(self, b, _):
            return F.mse_loss(self.model(b[0]), b[1])

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=0.02, betas=BETAS)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)]

    monkeypatch.chdir(tmp_path)
    (tmp_path / "factory.py").write_text(FACTORY)
    torch.save(batch(), tmp_path / "batch.pt")
    data = torch.utils.data.TensorDataset(*batch(3))
    trainer = L.Trainer(
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,  # it prints to stdout, where the report is read
        enable_progress_bar=False,
    )
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=16))
    trainer.save_checkpoint(tmp_path / "real.ckpt")
    report = _entry(cli, "real.ckpt")
    assert report["run"]["optimizer"]["kind"] == "adam"
    assert report["run"]["optimizer"]["betas"] == list(BETAS)
    assert report["curvature"]["operator"] == "preconditioned"


# --- --what-if trains with the scan's optimizer ---------------------------------------------


def lower_lr_entry(report, steps: str, lr: float) -> dict:
    """NH401's "lower lr" fix, tried with ``steps`` of the scan's optimizer from ``lr``
    (which raised the loss) to the suggested rate: half the limit for Adam, the effective
    step 1/lambda_max, (1-beta)/lambda_max, for momentum."""
    (entry,) = [e for e in report.what_if if e["code"] == "NH401"]
    c = report.curvature
    rate = c["suggested_lr"]
    if c["optimizer"] == "Adam":
        assert rate == pytest.approx(c["lr_limit"] / 2)
    else:
        assert rate == pytest.approx((1 - 0.9) / c["top_eigenvalues"][0])
    assert entry["fix"] == f"lr {lr:g} -> {rate:.3g}"
    assert entry["after"].startswith(f"{steps} steps: lr {lr:g} changes the loss by +")
    assert f"lr {rate:.3g} by " in entry["after"], entry
    return entry


def test_what_if_lowers_the_lr_with_adam_steps() -> None:
    model, opt, _ = _adam_trained()
    data = batch()
    limit = nnhealth.scan(model, data, optimizer=opt, hessian=True).curvature["lr_limit"]
    for group in opt.param_groups:
        group["lr"] = 3 * limit
    report = nnhealth.scan(model, data, optimizer=opt, hessian=True, what_if=True)
    (err,) = [f for f in report.findings if f.code == "NH401"]
    assert err.severity is nnhealth.Severity.ERROR
    entry = lower_lr_entry(report, "30 Adam", 3 * limit)
    assert "(loss falls)" in entry["after"] and entry["resolved"], entry


def _momentum_what_if():
    model, data = make(), batch()
    kw = {"optimizer": "momentum", "momentum": 0.9, "hessian": True}
    limit = nnhealth.scan(model, data, **kw).curvature["lr_limit"]
    report = nnhealth.scan(model, data, lr=3 * limit, what_if=True, **kw)
    return report, lower_lr_entry(report, "30 SGD with momentum 0.9", 3 * limit)


def test_what_if_lowers_the_lr_with_momentum_steps() -> None:
    report, entry = _momentum_what_if()
    assert report.run["optimizer"]["name"] == "SGD with momentum 0.9"
    assert entry["before_loss_change"] > 0


def test_the_momentum_rate_suggested_lowers_the_loss() -> None:
    _, entry = _momentum_what_if()
    assert "(loss falls)" in entry["after"] and entry["resolved"], entry


@pytest.mark.parametrize("kind", ["momentum", "nesterov"])
def test_a_momentum_optimizer_over_an_adam_state_assumes_0_9(kind: str) -> None:
    model, opt, _ = _adam_trained()
    plain = nnhealth.scan(model, batch(), optimizer=kind, select=["NH301"])
    over = nnhealth.scan(
        model, batch(), optimizer=kind, optimizer_state=opt.state_dict(), select=["NH301"]
    )
    assert over.run["optimizer"]["momentum"] == plain.run["optimizer"]["momentum"] == 0.9


# --- optimizers over part of the model (a fine-tune), group lrs, half precision --------


def _head_only(names: bool) -> tuple[nn.Module, dict]:
    """Adam over the last Linear only (a frozen-backbone fine-tune), its state_dict with
    or without param_names (older torch, or an optimizer built from a bare list)."""
    model = make()
    opt = torch.optim.Adam(model[4].parameters(), lr=1e-3)
    train(model, opt)
    state = opt.state_dict()
    if names:
        for group in state["param_groups"]:
            group["param_names"] = ["4.weight", "4.bias"]
    return model, state


def test_a_checkpoint_whose_optimizer_covers_part_of_the_model_is_scanned(cli, ckpt) -> None:
    """Found beside the weights, a state that fits no full order is a note, not exit 2
    (the state_dict does not record which parameters were frozen); given on purpose
    with --optimizer-state it is refused with one line."""
    tmp = ckpt[0]
    model, state = _head_only(names=False)
    torch.save({"model": model.state_dict(), "optimizer": state}, tmp / "head.pt")
    report = _cli_scan(cli, "factory.py:make", "--weights", "head.pt")
    assert any(n.startswith("optimizer state not used:") for n in report["notes"])
    assert report["run"]["optimizer"]["kind"] == "sgd"
    torch.save(state, tmp / "head_state.pt")
    line = _one_line(
        cli("scan", "factory.py:make", "--data", "batch.pt", "--optimizer-state", "head_state.pt")
    )
    assert "does not fit the model" in line


def test_parameters_outside_the_optimizer_are_not_judged() -> None:
    """The preconditioned Hessian is the head's alone (dense truth, D from the saved
    exp_avg_sq as Adam's next step builds it); the backbone gets no relative update."""
    model, state = _head_only(names=True)
    data = batch()
    report = nnhealth.scan(
        model,
        data,
        loss_fn=F.mse_loss,
        optimizer_state=state,
        hessian=True,
        hessian_tol=1e-8,
        lr=1e-3,
    )
    assert any("not in the optimizer" in n for n in report.notes)
    rows = {r["name"]: r for r in report.layers}
    assert rows["0"].get("relative_update") is None and rows["2"].get("relative_update") is None
    assert rows["4"]["relative_update"] > 0
    head = [model[4].weight, model[4].bias]

    def loss(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = model[3](model[2](model[1](model[0](data[0]))))
        return F.mse_loss(h @ w.T + b, data[1])

    blocks = torch.autograd.functional.hessian(loss, tuple(p.detach() for p in head))
    sizes = [p.numel() for p in head]
    h = torch.cat(
        [
            torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(2)], 1)
            for i in range(2)
        ]
    )
    grads = torch.autograd.grad(loss(*head), head)
    scale = []
    for i, (g, saved) in enumerate(zip(grads, state["state"].values(), strict=True)):
        t = float(saved["step"]) + 1
        v = 0.999 * saved["exp_avg_sq"] + 0.001 * g * g
        scale.append((1 / ((v / (1 - 0.999**t)).sqrt() + 1e-8)).reshape(-1))
        assert head[i].shape == saved["exp_avg_sq"].shape
    d = torch.cat(scale).sqrt()
    truth = float(torch.linalg.eigvalsh(d[:, None] * h * d[None, :]).max())
    assert report.curvature["top_eigenvalues"][0] == pytest.approx(truth, rel=1e-6)


def test_a_first_group_at_lr_0_does_not_change_the_limit() -> None:
    """A frozen backbone as param group 0 (lr 0): the same lambda and limit whichever
    order the groups are in (the reference rate is the largest group's)."""
    limits = []
    for order in ((0, 1), (1, 0)):
        model = make()
        groups = [
            {
                "params": [p for n, p in model.named_parameters() if not n.startswith("4.")],
                "lr": 0.0,
            },
            {"params": list(model[4].parameters()), "lr": 1e-2},
        ]
        opt = torch.optim.SGD([groups[i] for i in order], lr=1e-2)
        report = nnhealth.scan(
            model, batch(), loss_fn=F.mse_loss, optimizer=opt, hessian=True, hessian_tol=1e-8
        )
        assert report.run["lr"] == pytest.approx(1e-2)
        limits.append(report.curvature["lr_limit"])
    assert limits[0] == pytest.approx(limits[1], rel=1e-6)


def test_a_bfloat16_models_update_is_not_rounded_away() -> None:
    """Adam's step on a bfloat16 model is measured on a float32 copy: its relative
    update matches the float32 model's within bfloat16's own rounding of the weights
    and gradients (3e-2), where a bfloat16 step loses most of it."""
    model = make().float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = batch()
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(x.float()), y.float()).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    wide = nnhealth.scan(model, (x.float(), y.float()), loss_fn=F.mse_loss, optimizer=opt)
    half = copy.deepcopy(model).to(torch.bfloat16)
    state = opt.state_dict()
    narrow = nnhealth.scan(
        half, (x.float(), y.float()), loss_fn=F.mse_loss, optimizer_state=state, lr=1e-3
    )
    a, b = reported_updates(wide), reported_updates(narrow)
    for name in a:
        assert b[name] == pytest.approx(a[name], rel=3e-2), name


def test_targets_outside_0_1_keep_mse_for_a_sigmoid_output() -> None:
    model = nn.Sequential(nn.Linear(6, 1), nn.Sigmoid())
    x = torch.randn(16, 6)
    report = nnhealth.scan(model, (x, 5 * torch.rand(16, 1)))
    assert report.run["loss"].startswith("mse")
    report = nnhealth.scan(model, (x, torch.rand(16, 1)))
    assert report.run["loss"].startswith("binary cross-entropy on the sigmoid")
