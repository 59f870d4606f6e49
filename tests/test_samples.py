"""The shipped sample models: each loads without --trust and shows its pathology,
and the committed files are exactly what the seeded script makes."""

from __future__ import annotations

import json

import make_samples
import pytest
import torch

EXPECTED = {
    # name: {code: (severity, layer or None)} -- every finding the scan must report
    "healthy_relu_mlp": {},
    "cnn_bn": {},
    "tanh_vanishing": {"NH201": ("error", None), "NH202": ("error", None), "NH601": ("error", "0")},
    "tanh_saturated": {
        "NH102": ("error", "1"),
        "NH202": ("error", None),
        "NH601": ("error", "0"),
    },
    "sigmoid_large": {"NH102": ("error", "1"), "NH601": ("error", "0")},
    "relu_dead_bias": {"NH101": ("error", "3")},
    "zero_init_mlp": {
        "NH101": ("error", "1"),
        "NH201": ("error", None),
        "NH202": ("error", None),
        "NH501": ("error", "0"),
        "NH601": ("error", "0"),
    },
    "nan_weight": {"NH001": ("error", "2")},
    "duplicated_units": {"NH501": ("warning", "2")},
    "xavier_deep_relu": {
        "NH601": ("warning", "0"),
        "NH201": ("warning", None),
        "NH202": ("warning", None),
        "NH101": ("warning", "19"),
    },
    "norm_spread_bn": {"NH301": ("warning", None)},
}


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
