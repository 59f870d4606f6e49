"""Weight-level checks (NH301, NH501, NH601) against brute force on small cases."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BasicBlock, he_mlp
from torch import nn

import nnhealth
from nnhealth.capture import weights as wstats
from nnhealth.capture.groups import near_duplicate_groups


def brute_force_groups(rows: np.ndarray, rtol: float) -> set[frozenset[int]]:
    """Connected components of the pairwise 'within rtol' relation, size >= 2."""
    n = len(rows)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(n), 2):
        limit = rtol * max(np.linalg.norm(rows[i]), np.linalg.norm(rows[j]))
        if np.linalg.norm(rows[i] - rows[j]) <= limit:
            parent[find(i)] = find(j)
    comps: dict[int, set[int]] = {}
    for i in range(n):
        comps.setdefault(find(i), set()).add(i)
    return {frozenset(c) for c in comps.values() if len(c) > 1}


@pytest.mark.parametrize("seed", range(6))
def test_groups_match_pairwise_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((60, 7)).astype(np.float32)
    # planted: exact copies, copies within tolerance, a zero pair, and a near miss
    rows[10] = rows[3]
    rows[11] = rows[3]
    rows[20] = rows[5] * (1 + 3e-7)
    rows[30] = 0.0
    rows[31] = 0.0
    rows[40] = rows[6] + 1e-3  # well outside rtol: not a duplicate
    got = {frozenset(g) for g in near_duplicate_groups(rows, 1e-6, seed=seed)}
    assert got == brute_force_groups(rows.astype(np.float64), 1e-6)
    assert frozenset({3, 10, 11}) in got and frozenset({30, 31}) in got
    assert not any(40 in g for g in got)


def test_groups_of_many_rows_match_all_pairs() -> None:
    """800 rows on a coarse grid (many exact copies and many rows alone in their
    projection window, set aside before the loop) plus near copies, against every pair
    (numpy, vectorized: a row's group is the set of rows within rtol of it)."""
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 30, (800, 2)).astype(np.float64) + rng.random((800, 2)) * (
        rng.random((800, 1)) < 0.5
    )
    rows[700:710] = rows[0] * (1 + 1e-8)
    norms = np.linalg.norm(rows, axis=1)
    dist = np.linalg.norm(rows[:, None] - rows[None], axis=2)
    close = dist <= 1e-6 * np.maximum(norms[:, None], norms[None])
    # exact copies and copies within 1e-8: the relation is an equivalence here
    expected = {frozenset(np.flatnonzero(c)) for c in close if c.sum() > 1}
    got = {frozenset(g) for g in near_duplicate_groups(rows, 1e-6)}
    assert got == expected and len(got) > 10


def test_groups_exact_only_with_zero_tolerance() -> None:
    rows = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0 + 1e-12], [3.0, 4.0]])
    assert near_duplicate_groups(rows, 0.0) == [[0, 1]]
    assert near_duplicate_groups(rows, 1e-9) == [[0, 1, 2]]
    assert near_duplicate_groups(rows[:1], 1e-6) == []


def test_random_init_never_groups() -> None:
    layer = nn.Linear(64, 4096)
    assert near_duplicate_groups(layer.weight.detach().numpy(), 1e-6) == []


def test_weight_stats_against_direct_computation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16),
        nn.Tanh(),
        nn.Linear(16, 3),
    )
    report = nnhealth.scan(model, torch.randn(4, 3, 6, 6))
    w = {r["name"]: r for r in report.layers if "init_var" in r}
    conv = model[0].weight.detach().double()
    assert w["0"]["init_var"] == pytest.approx(float(conv.var(unbiased=False)), rel=1e-9)
    assert (w["0"]["fan_in"], w["0"]["fan_out"]) == (27, 72)
    assert w["0"]["init_rule"].startswith("not judged")  # BatchNorm follows
    lin = model[4].weight.detach().double()
    assert w["4"]["init_rule"].startswith("Xavier")  # tanh follows
    assert w["4"]["init_ratio"] == pytest.approx(
        float(lin.var(unbiased=False)) / (2 / (128 + 16)), rel=1e-9
    )
    assert w["6"]["init_rule"].startswith("LeCun")  # the output: linear
    head = model[6].weight.detach().double()
    assert w["6"]["init_ratio"] == pytest.approx(float(head.var(unbiased=False)) * 16, rel=1e-9)


def test_followed_by_without_a_pass_and_from_a_state_dict() -> None:
    model = nn.Sequential(
        nn.Linear(4, 4), nn.Dropout(), nn.ReLU(), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)
    )
    by_module = {w.module: w for w in wstats.from_model(model, (), None)}
    assert [by_module[m].followed_by for m in ("0", "3", "5")] == ["relu", "norm", "none"]
    assert by_module["5"].is_output and not by_module["0"].is_output
    state = {w.module: w for w in wstats.from_state_dict(model.state_dict(), None)}
    assert [state[m].followed_by for m in ("0", "3", "5")] == [None, "norm", None]
    assert state["5"].is_output


def test_trust_ratio_and_relative_update_against_direct_norms() -> None:
    model = he_mlp([16, 32, 32, 4])
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    report = nnhealth.scan(model, (x, y), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    rows = {r["name"]: r for r in report.layers if "trust_ratio" in r}
    for (name, p), g in zip(model.named_parameters(), grads, strict=True):
        module, kind = name.rsplit(".", 1)
        ratio = float(p.detach().double().norm() / g.double().norm())
        if kind == "weight":
            assert rows[module]["trust_ratio"] == pytest.approx(ratio, rel=1e-5)
            assert rows[module]["relative_update"] == pytest.approx(0.1 / ratio, rel=1e-5)
            assert rows[module]["grad_norm"] == pytest.approx(float(g.double().norm()), rel=1e-5)
        else:
            assert rows[module]["bias_trust_ratio"] is None  # zero biases: no ratio


def test_lr_findings() -> None:
    model = he_mlp([16, 32, 32, 4])
    batch = (torch.randn(64, 16), torch.randint(0, 4, (64,)))
    assert nnhealth.scan(model, batch, select=["NH301"], lr=1e-3).findings == ()
    big = nnhealth.scan(model, batch, select=["NH301"], lr=1e3).findings
    assert big and all(f.severity == nnhealth.Severity.ERROR for f in big)
    assert "divergence risk" in big[0].message and big[0].evidence["relative_update"] >= 1
    tiny = nnhealth.scan(model, batch, select=["NH301"], lr=1e-9).findings
    assert tiny and "frozen" in tiny[0].message


def _resnet_like() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        BasicBlock(16),
        BasicBlock(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    for m in model.modules():  # torchvision's ResNet init
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def test_no_finding_on_torchvision_style_resnet() -> None:
    report = nnhealth.scan(
        _resnet_like(), (torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,)))
    )
    assert report.findings == (), [f.message for f in report.findings]
    assert not report.errors


def test_state_dict_end_to_end(cli, tmp_path: Path) -> None:
    model = he_mlp([32, 64, 64, 64, 4])
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
    torch.save(model.state_dict(), tmp_path / "ckpt.pt")
    res = cli("scan", tmp_path / "ckpt.pt", "--format", "json")
    assert res.code == 1, res.err
    report = json.loads(res.out)
    codes = {(f["code"], f["layer"]) for f in report["findings"]}
    assert ("NH501", "2") in codes
    assert {s["code"] for s in report["skipped"]} == {
        "NH101",
        "NH102",
        "NH103",
        "NH201",
        "NH202",
        "NH301",
    }
    assert any("--arch" in s["reason"] for s in report["skipped"])
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["2"]["effective_width"] == 1 and rows["0"]["effective_width"] == 64
    assert "unknown" in rows["0"]["init_rule"]


def test_arch_turns_a_state_dict_into_a_full_scan(cli, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "arch.py").write_text(
        "from torch import nn\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))\n"
    )
    monkeypatch.chdir(tmp_path)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].bias.fill_(-50.0)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    res = cli(
        "scan", "w.pt", "--arch", "arch.py:build", "--input-shape", "32x8", "--format", "json"
    )
    report = json.loads(res.out)
    assert res.code == 1 and report["skipped"] == []
    assert any(f["code"] == "NH101" for f in report["findings"])
    assert report["run"]["model_format"] == "entry point"
