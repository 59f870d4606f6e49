"""The shipped sample models: each loads without --trust and shows its pathology,
and the committed files are exactly what the seeded script makes."""

from __future__ import annotations

import json

import make_samples
import pytest
import torch
from conftest import SAMPLE_FINDINGS as EXPECTED


def test_every_sample_is_covered() -> None:
    assert set(EXPECTED) == set(make_samples.SAMPLES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_scan(cli, sample, name: str) -> None:
    model, data = sample(name)
    res = cli("scan", model, "--data", data, "--format", "json")
    report = json.loads(res.out)
    errors = any(sev == "error" for sev, _ in EXPECTED[name].values())
    assert res.code == (1 if errors else 0), res.err
    found: dict[str, list] = {}
    for f in report["findings"]:
        found.setdefault(f["code"], []).append((f["severity"], f["layer"]))
    assert set(found) == set(EXPECTED[name]), report["findings"]
    for code, expected in EXPECTED[name].items():
        assert expected in found[code], (code, found[code])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_committed_files_match_the_script(sample, name: str) -> None:
    model_path, batch_path = sample(name)
    model, (x, y) = make_samples.build(name)
    saved = torch.load(model_path, weights_only=False)
    assert type(saved) is type(model)
    for (k1, v1), (k2, v2) in zip(
        saved.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert (
            k1 == k2
            and torch.equal(v1, v2)
            or (torch.isnan(v1).any() and torch.equal(v1.nan_to_num(), v2.nan_to_num()))
        )
    sx, sy = torch.load(batch_path, weights_only=True)
    assert torch.equal(sx, x) and torch.equal(sy, y)
