"""The registry of checks: codes and names, docs, selection and options. Each check's
good and bad cases are in tests/checks/, run by test_check_cases.py."""

from __future__ import annotations

import pytest

from nnhealth.analyzers import REGISTRY, lookup, select_checks
from nnhealth.analyzers.base import REQUIRED_SECTIONS, Check

STABLE = {  # a code keeps its name forever; new checks add codes
    "NH001": "nonfinite",
    "NH101": "dead-relu",
    "NH102": "saturation",
    "NH201": "activation-variance",
    "NH202": "gradient-variance",
    "NH301": "norm-ratio",
    "NH401": "curvature",
    "NH501": "symmetry",
    "NH601": "init-scale",
}


def test_codes_and_names_unique_and_stable() -> None:
    codes = [c.code for c in REGISTRY]
    names = [c.name for c in REGISTRY]
    assert len(set(codes)) == len(codes) and len(set(names)) == len(names)
    assert STABLE.items() <= dict(zip(codes, names, strict=True)).items()


@pytest.mark.parametrize("check", REGISTRY, ids=[c.code for c in REGISTRY])
def test_docstring_sections_and_options(check: type[Check]) -> None:
    doc = check.doc()
    for section in REQUIRED_SECTIONS:
        assert f"{section}:" in doc
    for opt in check.options:
        assert opt.doc and (opt.default is None or isinstance(opt.default, (int, float)))


def test_check_without_docs_is_refused() -> None:
    with pytest.raises(TypeError, match="docstring lacks"):

        class Undocumented(Check):
            """Nothing."""

            code, name, summary, needs = "NH999", "undocumented", "", frozenset()


def test_selection_by_code_prefix_and_name() -> None:
    prefix = [c.code for c in select_checks(["NH1"], None)]
    assert {"NH101", "NH102"} <= set(prefix) and all(c.startswith("NH1") for c in prefix)
    assert prefix == [c.code for c in REGISTRY if c.code.startswith("NH1")]  # registry order
    left = [c.code for c in select_checks(None, ["NH2", "nonfinite", "NH3", "NH5"])]
    assert {"NH101", "NH102", "NH401", "NH601"} <= set(left)
    assert not [c for c in left if c[:3] in ("NH2", "NH3", "NH5") or c == "NH001"]
    assert [c.code for c in select_checks(["dead-relu", "NH001"], None)] == ["NH001", "NH101"]
    with pytest.raises(ValueError, match="unknown check 'NH9'"):
        select_checks(["NH9"], None)


def test_option_overrides_are_validated() -> None:
    check = lookup("dead-relu")
    assert check.resolve_options({"warn_fraction": 0.3})["warn_fraction"] == 0.3
    with pytest.raises(ValueError, match="unknown option"):
        check.resolve_options({"nope": 1})
    with pytest.raises(ValueError, match="expected a number"):
        check.resolve_options({"warn_fraction": "high"})
