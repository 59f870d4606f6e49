"""One pipeline (nnhealth.pipeline.run) behind `nnhealth scan` and nnhealth.scan: the
same model, batch and options give the same findings, what-if and baseline comparison."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import he_mlp, one_line_error, strict_json

import nnhealth
from nnhealth import pipeline
from nnhealth.errors import UsageError
from nnhealth.loading.model import LoadedModel
from nnhealth.options import ScanOptions

# what the scan found; "run" differs by design (file vs in-memory model, seconds)
SAME = ("findings", "errors", "skipped", "layers", "curvature", "what_if", "baseline", "summary")


def sick(dead: int) -> torch.nn.Sequential:
    """Layer 3 (the second ReLU) has ``dead`` of 64 units dead."""
    model = he_mlp([32, 64, 64, 64, 4])
    with torch.no_grad():
        model[2].bias[:dead] = -50.0
    return model


@pytest.fixture
def scene(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A model, its batch, and a baseline written from a healthier version of it."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(1)
    torch.save((torch.randn(64, 32), torch.randint(0, 4, (64,))), tmp_path / "batch.pt")
    torch.save(sick(8), tmp_path / "before.pt")
    torch.save(sick(40), tmp_path / "model.pt")
    res = cli("scan", "before.pt", "--data", "batch.pt", "--write-baseline", "base.json", "-q")
    assert res.code == 0, res.err
    return {"model": tmp_path / "model.pt", "batch": tmp_path / "batch.pt"}


def api_report(scene: dict[str, Path], **options) -> dict:
    model = torch.load(scene["model"], weights_only=False)
    batch = torch.load(scene["batch"])
    return strict_json(nnhealth.scan(model, batch, **options).to_json())


def test_cli_and_api_give_the_same_report(cli, scene: dict[str, Path]) -> None:
    res = cli(
        "scan",
        "model.pt",
        "--data",
        "batch.pt",
        "--what-if",
        "--baseline",
        "base.json",
        "--baseline-tolerance",
        "0.2",
        "--seed",
        "3",
        "--lr",
        "0.05",
        "--ignore",
        "NH601",
        "--format",
        "json",
    )
    assert res.code == 1, res.err
    from_cli = strict_json(res.out)
    from_api = api_report(
        scene,
        what_if=True,
        baseline="base.json",
        baseline_tolerance=0.2,
        seed=3,
        lr=0.05,
        ignore=["NH601"],
    )
    assert {k: from_cli[k] for k in SAME} == {k: from_api[k] for k in SAME}
    # the comparison is not empty: the dead layer got worse, and a fix was tried
    assert from_cli["baseline"]["worse"] == ["NH101:3"]
    assert from_cli["baseline"]["tolerance"] == 0.2
    assert any(w["applied"] for w in from_cli["what_if"])
    assert from_cli["run"]["seed"] == from_api["run"]["seed"] == 3


def test_a_config_file_gives_what_the_flags_give(cli, scene: dict[str, Path]) -> None:
    (scene["model"].parent / "nnhealth.toml").write_text(
        'model = "model.pt"\ndata = "batch.pt"\nwhat-if = true\nbaseline = "base.json"\n'
        'format = "json"\nselect = ["NH101"]\n'
    )
    from_file = strict_json(cli("scan").out)
    # a config file's paths are taken from its directory
    base = scene["model"].parent / "base.json"
    from_api = api_report(scene, what_if=True, baseline=base, select=["NH101"])
    assert {k: from_file[k] for k in SAME} == {k: from_api[k] for k in SAME}
    assert from_file["what_if"] and from_file["baseline"]["file"] == str(base)


def test_bad_pipeline_values_are_refused_before_the_scan(scene: dict[str, Path]) -> None:
    loaded = LoadedModel(model=None, format="state_dict", source="x")  # would fail the scan
    for kwargs, needle in (
        ({"what_if_budget": -1.0}, "what_if_budget -1.0: expected a finite number >= 0"),
        (
            {"baseline_tolerance": float("nan")},
            "baseline_tolerance nan: expected a finite number >= 0",
        ),
        ({"baseline": ""}, "baseline '': expected a non-empty string"),
    ):
        with pytest.raises(UsageError, match=f"^{needle}"):
            pipeline.run(loaded, None, ScanOptions(), **kwargs)


def test_what_if_needs_a_model_and_a_batch(cli, tmp_path: Path) -> None:
    torch.save(he_mlp([4, 4]).state_dict(), tmp_path / "sd.pt")
    line = one_line_error(cli("scan", tmp_path / "sd.pt", "--what-if"))
    assert line.endswith("--what-if needs a model and a batch (not a bare state_dict)")
    from nnhealth.loading.model import load_model

    with pytest.raises(UsageError) as info:
        pipeline.run(load_model(str(tmp_path / "sd.pt")), None, ScanOptions(), what_if=True)
    assert str(info.value).startswith("what_if needs a model and a batch")


def test_a_baseline_is_read_before_the_scan(cli, scene: dict[str, Path]) -> None:
    (scene["model"].parent / "broken.json").write_text(json.dumps({"findings": 3}))
    with pytest.raises(UsageError, match="broken.json"):
        pipeline.run(
            LoadedModel(model=None, format="state_dict", source="x"),
            None,
            ScanOptions(),
            baseline="broken.json",
        )
