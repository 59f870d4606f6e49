"""nnhealth.Monitor in a plain training loop.

Ground truth: the same training without the monitor (weights equal exactly: the
monitor reads, never alters), the scan of the same batch (a capture step's statistics
are the scan's, to 1e-6 relative: the same recorder on the same forward and backward),
and statistics computed by hand from the step's tensors (dead fraction, gradient norm).
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nnhealth
from nnhealth.errors import UsageError
from nnhealth.history import SCHEMA, read


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3)
    )


def data(n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(model, steps, lr, monitor=None, batch=None, lr_at=None):
    """Full-batch SGD; the monitor (if any) around each step's forward and backward."""
    x, y = batch or data()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    if monitor is not None:
        monitor.optimizer = opt
    for step in range(steps):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
        with monitor.step((x, y)) if monitor is not None else _nothing():
            loss = F.cross_entropy(model(x), y)
            if monitor is not None:
                monitor.observe(loss)
            opt.zero_grad()
            loss.backward()
        opt.step()
        if monitor is not None and monitor.should_stop:
            break
    return opt


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def quiet_monitor(model, **kw) -> nnhealth.Monitor:
    kw.setdefault("on_finding", "warn")
    return nnhealth.Monitor(model, **kw)


def test_training_with_the_monitor_is_training_without_it() -> None:
    plain, watched = mlp(), mlp()
    train(plain, 25, 0.1)
    monitor = quiet_monitor(watched, every=5, hessian_every=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnhealth.NnhealthWarning)
        train(watched, 25, 0.1, monitor)
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [line["step"] for line in monitor.lines] == [0, 5, 10, 15, 20]
    assert [line["curvature"] is not None for line in monitor.lines] == [
        True,
        False,
        True,
        False,
        True,
    ]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in watched.modules())
    assert watched.training


def test_hooks_are_attached_on_capture_steps_only() -> None:
    model = mlp()
    monitor = quiet_monitor(model, every=3)
    x, y = data()
    attached = []
    for _ in range(6):
        with monitor.step((x, y)):
            attached.append(len(model[0]._forward_hooks) > 0)
            F.cross_entropy(model(x), y).backward()
    assert attached == [True, False, False, True, False, False]
    assert not model[0]._forward_hooks


def test_a_capture_step_sees_what_a_scan_of_its_batch_sees() -> None:
    """The statistics of step 0 are the scan's on the same batch (the same loss); the
    dead fraction and gradient norms are also checked against the step's own tensors."""
    model = mlp()
    x, y = data()
    with torch.no_grad():
        model[2].bias[:8] = -50.0  # 8 of 32 units of the second ReLU dead on every input
    reference = nnhealth.scan(copy.deepcopy(model), (x, y), lr=0.1).to_dict()
    monitor = quiet_monitor(model, every=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnhealth.NnhealthWarning)
        train(model, 1, 0.1, monitor)
    line = monitor.lines[0]
    rows = {r["name"]: r for r in reference["layers"]}
    for row in line["layers"]:
        expected = rows[row["name"]]
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isclose(value, expected[key], rel_tol=1e-6, abs_tol=1e-12), key
    dead = next(r for r in line["layers"] if r["name"] == "3")
    assert dead["dead_fraction"] == 8 / 32
    assert line["loss"] == pytest.approx(reference["run"]["loss_value"], rel=1e-6)
    assert {f["code"] for f in line["findings"]} >= {"NH101"}


def test_grad_norms_are_those_of_the_users_backward() -> None:
    model = mlp()
    x, y = data()
    monitor = quiet_monitor(model, every=1, checks=["norm-ratio"])
    with monitor.step((x, y)):
        loss = F.cross_entropy(model(x), y) * 3.0  # the user's own loss, not the scan's
        loss.backward()
    weight = model[0].weight.grad.double().norm().item()
    row = next(r for r in monitor.lines[0]["layers"] if r["name"] == "0")
    assert row["grad_norm"] == pytest.approx(weight, rel=1e-9)


def test_the_batch_can_come_from_the_models_call() -> None:
    """No batch given: the model's call is the batch (its size, and its inputs for the
    Hessian step, whose loss is then ``loss_fn(output)``: no targets are known)."""
    model = mlp()
    x, _ = data(48)

    def energy(out):
        return out.square().mean()

    monitor = quiet_monitor(model, every=1, hessian_every=1, loss_fn=energy)
    with monitor.step():
        energy(model(x)).backward()
    line = monitor.lines[0]
    assert line["examples"] == 48
    reference = nnhealth.scan(model, x, energy, hessian=True).curvature
    assert line["curvature"]["lambda_max"] == pytest.approx(
        reference["top_eigenvalues"][0], abs=2 * reference["bounds"][0]
    )


def test_edge_of_stability_is_flagged_at_the_crossing_step(tmp_path: Path) -> None:
    """Full-batch GD at lr 1: lambda_max climbs (progressive sharpening) from 1.07 to
    2.8 by step 20, past 2/lr = 2. The history names the step and the ratio."""
    model = mlp()
    log = tmp_path / "run.jsonl"
    monitor = quiet_monitor(model, every=10, hessian_every=10, log=log, on_finding="stop")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", nnhealth.NnhealthWarning)
        train(model, 40, 1.0, monitor)
    assert monitor.should_stop
    step, finding = monitor.findings[0]
    assert (step, finding.code, finding.kind) == (20, "NH401", "history")
    curvature = [line["curvature"] for line in monitor.lines]
    assert curvature[1]["ratio"] < 1 <= curvature[2]["ratio"]  # crossed between 10 and 20
    assert finding.evidence["ratio"] == curvature[2]["ratio"]
    assert finding.evidence["ratio"] == pytest.approx(1.0 * curvature[2]["lambda_max"] / 2)
    assert "step 20" in finding.message and "progressive sharpening" in finding.message
    assert any("step 20: NH401" in str(w.message) for w in caught)
    assert [line["step"] for line in read(log)] == [0, 10, 20]  # stopped after step 20


def test_units_dying_are_flagged_with_the_step_they_died() -> None:
    model = mlp()
    monitor = quiet_monitor(model, every=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnhealth.NnhealthWarning)
        train(model, 41, 4.0, monitor)
    dead = [f for f in monitor.verdicts() if f.code == "NH101"]
    assert len(dead) == 1 and dead[0].layer == "3"
    fractions = [
        next(r["dead_fraction"] for r in line["layers"] if r["name"] == "3")
        for line in monitor.lines
    ]
    died = next(
        line["step"] for line, f in zip(monitor.lines, fractions) if f - fractions[0] >= 0.1
    )
    assert dead[0].evidence["died_at_step"] == died
    assert dead[0].evidence["last_fraction"] == fractions[-1] >= 0.5
    assert dead[0].severity == nnhealth.Severity.ERROR


def test_a_non_finite_loss_between_captures_is_recorded_once(tmp_path: Path) -> None:
    model = mlp()
    log = tmp_path / "run.jsonl"
    monitor = quiet_monitor(model, every=100, log=log, on_finding="raise")
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(nnhealth.TrainingHealthError) as raised:
        for step in range(10):
            with monitor.step((x, y)):
                loss = F.cross_entropy(model(x), y)
                monitor.observe(loss)
                opt.zero_grad()
                loss.backward()
            opt.step()
            if step == 5:
                with torch.no_grad():
                    model[2].weight[0, 0] = float("nan")
    assert raised.value.step == 6
    assert raised.value.finding.code == "NH001"
    assert raised.value.finding.layer == "2"
    lines = read(log)
    assert [line["step"] for line in lines] == [0, 6]
    assert lines[1]["nonfinite"] == {"loss": "nan", "layer": "2"}


def test_the_monitor_refuses_to_write_into_a_file_that_is_not_a_history(tmp_path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("my notes\n")
    with pytest.raises(UsageError, match="not an nnhealth history"):
        nnhealth.Monitor(mlp(), log=other)
    assert other.read_text() == "my notes\n"
    with pytest.raises(UsageError, match="directory"):
        nnhealth.Monitor(mlp(), log=tmp_path)


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"every": 0}, "every=0"),
        ({"hessian_every": -1}, "hessian_every=-1"),
        ({"on_finding": "explode"}, "on_finding='explode'"),
        ({"fail_on": "fatal"}, "fail_on"),
    ],
)
def test_bad_keywords_are_one_line_errors(keywords, message) -> None:
    with pytest.raises(UsageError, match=message) as raised:
        nnhealth.Monitor(mlp(), **keywords)
    assert "\n" not in str(raised.value)


def test_observe_outside_a_step_is_refused() -> None:
    monitor = nnhealth.Monitor(mlp())
    with pytest.raises(UsageError, match="inside"):
        monitor.observe(torch.tensor(1.0))


def test_a_step_that_raises_leaves_no_hooks_and_no_line() -> None:
    model = mlp()
    monitor = nnhealth.Monitor(model, every=1)
    with pytest.raises(ValueError, match="the user's"), monitor.step(data()):
        model(data()[0])
        raise ValueError("the user's loop broke")
    assert not monitor.lines
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_history_lines_are_the_documented_schema(tmp_path: Path) -> None:
    log = tmp_path / "h.jsonl"
    model = mlp()
    monitor = quiet_monitor(model, every=2, log=log)
    train(model, 3, 0.1, monitor)
    lines = [json.loads(raw) for raw in log.read_text().splitlines()]
    assert lines == monitor.lines
    first = lines[0]
    assert first["schema"] == SCHEMA
    assert set(first) == {
        "schema",
        "step",
        "epoch",
        "time",
        "loss",
        "lr",
        "optimizer",
        "examples",
        "layers",
        "curvature",
        "findings",
    }
    assert first["lr"] == 0.1 and first["optimizer"] == "SGD" and first["examples"] == 128
    # appending to its own history is allowed: a second run continues the file
    again = quiet_monitor(mlp(), every=2, log=log)
    train(again.model, 1, 0.1, again)
    assert len(read(log)) == 3


def test_hessian_steps_judge_adam_by_its_live_state() -> None:
    """With Adam, a Hessian step measures the preconditioned sharpness from the
    optimizer's state at that step: what nnhealth.scan gives on the same batch, with the
    same optimizer, at the same moment (within the two certified bounds)."""
    model = mlp()
    x, y = data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = quiet_monitor(model, optimizer=opt, every=10, hessian_every=2)
    for step in range(3):
        with monitor.step((x, y)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
        if step == 2:
            reference = nnhealth.scan(model, (x, y), optimizer=opt, hessian=True).curvature
        opt.step()
    line = monitor.lines[-1]
    assert line["step"] == 2 and line["curvature"]["operator"] == "preconditioned"
    assert line["optimizer"] == "Adam" and line["lr"] == 1e-3
    gap = abs(line["curvature"]["lambda_max"] - reference["top_eigenvalues"][0])
    assert gap <= line["curvature"]["bound"] + reference["bounds"][0]
    assert line["curvature"]["lr_limit"] == pytest.approx(reference["lr_limit"], rel=1e-2)


def test_a_ddp_model_is_watched_through_its_module(tmp_path) -> None:
    """One gloo rank (world 1): the monitor watches DDP's module, whose layer names the
    history keeps as the plain model's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        model = mlp()
        wrapped = DistributedDataParallel(model)
        monitor = quiet_monitor(wrapped, every=1)
        assert monitor.model is model
        x, y = data()
        with monitor.step((x, y)):
            F.cross_entropy(wrapped(x), y).backward()
    finally:
        dist.destroy_process_group()
    names = [row["name"] for row in monitor.lines[0]["layers"]]
    assert names[:3] == ["0", "1", "2"]
    assert monitor.lines[0]["layers"][0]["grad_norm"] == pytest.approx(
        model[0].weight.grad.double().norm().item(), rel=1e-9
    )


def test_an_analysis_that_fails_warns_and_training_goes_on(monkeypatch) -> None:
    """A capture step whose analysis raises (here: a broken runner) is a warning naming
    the step; the loop and its later steps are untouched."""
    from nnhealth import runner

    def broken(*args, **kwargs):
        raise RuntimeError("analysis broke")

    model = mlp()
    monitor = nnhealth.Monitor(model, every=2)
    monkeypatch.setattr(runner, "run", broken)
    with pytest.warns(nnhealth.NnhealthWarning, match="step 0 not analysed: internal error"):
        train(model, 3, 0.1, monitor)
    assert monitor.lines == [] and monitor.steps == 3
    assert all(not m._forward_hooks for m in model.modules())


def test_a_backward_outside_the_step_is_not_read_as_the_steps_gradient() -> None:
    model = mlp()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = quiet_monitor(model, every=1)
    opt.zero_grad(set_to_none=False)  # zeros in .grad: a stale value to be read
    with monitor.step((x, y)):
        loss = F.cross_entropy(model(x), y)
    loss.backward()  # after the with block
    report = monitor.reports[0]
    assert any("did not run inside monitor.step" in n for n in report.notes)
    assert all("grad_norm" not in r or r["grad_norm"] is None for r in monitor.lines[0]["layers"])


def test_a_batch_nnhealth_cannot_read_is_taken_from_the_models_call() -> None:
    model = mlp()
    x, y = data(40)
    monitor = nnhealth.Monitor(model, every=1)
    warned = pytest.warns(nnhealth.NnhealthWarning, match="taken from the model's call")
    with warned, monitor.step([x, y, "not a tensor"]):
        F.cross_entropy(model(x), y).backward()
    assert monitor.lines[0]["examples"] == 40


def test_a_log_in_a_missing_directory_is_refused_at_construction(tmp_path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        nnhealth.Monitor(mlp(), log=tmp_path / "no" / "such" / "h.jsonl")


def test_bad_checks_and_options_are_refused_at_construction() -> None:
    with pytest.raises(nnhealth.errors.NnhealthError, match="NH999"):
        nnhealth.Monitor(mlp(), checks=["NH999"])


def test_a_warning_that_becomes_an_error_is_told_again(monkeypatch) -> None:
    """fail_on="warning": lambda_max within half the limit (a warning), then past it
    (an error): both are told."""
    from nnhealth import history

    steps = iter([0.6, 1.5])
    model = mlp()
    monitor = quiet_monitor(model, every=1, fail_on="warning")
    monkeypatch.setattr(history, "verdicts", lambda lines, options=None: [_eos(next(steps))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", nnhealth.NnhealthWarning)
        train(model, 2, 0.01, monitor)
    told = [str(w.message) for w in caught if "stability" in str(w.message)]
    assert len(told) == 2 and "warning" in told[0] and "error" in told[1]


def _eos(ratio: float):
    from nnhealth.findings import Finding, Severity

    severity = Severity.ERROR if ratio >= 1 else Severity.WARNING
    return Finding(
        "NH401",
        "curvature",
        severity,
        None,
        f"the stability limit, {ratio}",
        {},
        "",
        kind="history",
    )
