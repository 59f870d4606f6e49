"""Hostile and odd inputs at the command line: nothing runs without --trust, nothing is
overwritten, every escape from user code and every odd value ends in one line, exit 2.

The loaders' own hostile files (TorchScript, pickles that call classes, zip bombs,
stride-0 tensors, huge .npy headers) are in test_hostile_loading.py; their fuzzing in
test_fuzz_loaders.py; escaping names in reports in test_injection.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ROOT, he_mlp, listing, one_line_error

import nnhealth
from nnhealth.errors import NnhealthError

# a factory module whose code leaves a marker file when it runs at all
BUILD = """
from pathlib import Path
import torch
from torch import nn

Path(__file__).with_name("MARKER").write_text("ran")

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
"""


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cloned repository: a plain state_dict, a batch and code under tools/."""
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "build.py").write_text(BUILD)
    (tmp_path / "pkgx").mkdir()
    (tmp_path / "pkgx" / "__init__.py").write_text("")
    (tmp_path / "pkgx" / "models.py").write_text(BUILD)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    torch.save((torch.randn(16, 8), torch.randint(0, 4, (16,))), tmp_path / "batch.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NNHEALTH_TRUST", raising=False)
    for key in list(os.environ):
        if key.startswith("NNHEALTH_"):
            monkeypatch.delenv(key)
    yield tmp_path
    for name in [n for n in sys.modules if n == "pkgx" or n.startswith("pkgx.")]:
        del sys.modules[name]


def pyproject(directory: Path, body: str) -> None:
    (directory / "pyproject.toml").write_text('[project]\nname = "x"\n[tool.nnhealth]\n' + body)


# --- a repository's config must not name code -----------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        'arch = "tools/build.py:build"\n',
        'arch = "pkgx.models:build"\n',
        'model = "tools/build.py:build"\ndata = "batch.pt"\n',
        'model = "pkgx.models:build"\ndata = "batch.pt"\n',
    ],
)
def test_config_naming_code_is_refused_without_trust(cli, repo: Path, body: str) -> None:
    pyproject(repo, body)
    args = ["scan"] if body.startswith("model") else ["scan", "model.pt", "--data", "batch.pt"]
    line = one_line_error(cli(*args))
    assert "is code to import" in line and "--trust" in line and "pyproject.toml" in line
    assert not (repo / "tools" / "MARKER").exists() and not (repo / "pkgx" / "MARKER").exists()


def test_config_code_runs_with_trust_and_from_the_command_line(cli, repo: Path) -> None:
    pyproject(repo, 'arch = "tools/build.py:build"\n')
    res = cli("scan", "model.pt", "--data", "batch.pt", "--trust", "-q")
    assert res.code in (0, 1), res.err
    assert (repo / "tools" / "MARKER").exists()
    (repo / "tools" / "MARKER").unlink()
    (repo / "pyproject.toml").unlink()
    res = cli("scan", "model.pt", "--arch", "tools/build.py:build", "--data", "batch.pt", "-q")
    assert res.code in (0, 1), res.err  # the user typed it: their choice
    assert (repo / "tools" / "MARKER").exists()


def test_config_model_file_is_still_read_from_the_config(cli, repo: Path) -> None:
    # a file path is data, not code: allowed (and a file wins over the entry-point form)
    pyproject(repo, 'model = "model.pt"\n')
    res = cli("scan", "--format", "json")
    assert res.code in (0, 1), res.err
    assert json.loads(res.out)["run"]["model_format"] == "state_dict"


@pytest.mark.parametrize("key", ["output", "write-baseline"])
@pytest.mark.parametrize("where", ["../outside.json", "/tmp/nnhealth-outside.json", "link/x.json"])
def test_config_output_stays_inside_its_tree(cli, repo: Path, key: str, where: str) -> None:
    outside = repo.parent / "elsewhere"
    outside.mkdir(exist_ok=True)
    (repo / "link").symlink_to(outside)
    pyproject(repo, f'model = "model.pt"\n{key} = "{where}"\n')
    before = listing(repo.parent)
    line = one_line_error(cli("scan"))
    assert "outside the config file's directory" in line and key in line
    assert listing(repo.parent) == before
    assert not Path("/tmp/nnhealth-outside.json").exists()


@pytest.mark.parametrize("key", ["output", "write-baseline"])
def test_config_path_with_a_colon_stays_in_the_configs_tree(
    cli, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    # "rep:ort.json" looks like module:attr; it is a file, relative to the config file
    pyproject(repo, f'model = "model.pt"\n{key} = "rep:ort.json"\nformat = "json"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli("scan", "--config", repo / "pyproject.toml").code in (0, 1)
    assert (repo / "rep:ort.json").is_file() and listing(elsewhere) == set()


def test_config_output_inside_its_tree_is_written(cli, repo: Path) -> None:
    (repo / "reports").mkdir()
    pyproject(repo, 'model = "model.pt"\noutput = "reports/r.json"\nformat = "json"\n')
    assert cli("scan").code in (0, 1)
    assert json.loads((repo / "reports" / "r.json").read_text())["schema_version"] == 1


# --- -o never overwrites the code an entry point resolves to ----------------------------


@pytest.mark.parametrize("target", ["pkgx/models.py", "pkgx/__init__.py"])
def test_output_onto_a_module_entry_points_source_is_refused(cli, repo: Path, target: str) -> None:
    before = (repo / target).read_text()
    line = one_line_error(
        cli("scan", "pkgx.models:build", "--input-shape", "4x8", "-o", target, "--format", "json")
    )
    assert "refusing to overwrite" in line
    assert (repo / target).read_text() == before


def test_output_onto_any_imported_source_is_refused(cli, repo: Path) -> None:
    # the factory imports a helper module: the report may not land on it either
    (repo / "helper.py").write_text("X = 1\n")
    (repo / "fac.py").write_text(
        "import helper\nfrom torch import nn\n\ndef build():\n    return nn.Linear(8, 4)\n"
    )
    line = one_line_error(cli("scan", "fac.py:build", "--input-shape", "4x8", "-o", "helper.py"))
    assert "refusing to overwrite" in line
    assert (repo / "helper.py").read_text() == "X = 1\n"
    sys.modules.pop("helper", None)


# --- escapes from user code -------------------------------------------------------------

FACTORIES = """
import sys
import torch
from torch import nn


class Boom(BaseException):
    pass


class ExitInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        sys.exit(0)


class RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        raise ValueError("backward is broken")


class Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(self.lin(x))


class NoCopy(nn.Sequential):
    def __deepcopy__(self, memo):
        raise TypeError("cannot deepcopy this module")


def batch():
    torch.manual_seed(0)
    return torch.randn(16, 8), torch.randint(0, 4, (16,))


def exit_in_loss():
    return nn.Linear(8, 4), batch(), lambda out, y: sys.exit(0)


def boom_in_loss():
    def loss(out, y):
        raise Boom("not an Exception")
    return nn.Linear(8, 4), batch(), loss


def exit_in_backward():
    return Wrap(ExitInBackward), batch()


def raise_in_backward():
    return Wrap(RaiseInBackward), batch()


def exit_in_forward():
    class M(nn.Linear):
        def forward(self, x):
            sys.exit(3)
    return M(8, 4), batch()


def exit_in_factory():
    sys.exit(0)


def printing():
    print("hello from the factory")
    return nn.Linear(8, 4), batch()


def no_copy():
    torch.manual_seed(0)
    m = NoCopy(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        m[0].bias[:12] = -50.0  # 75% dead: an NH101 error whose fixes --what-if tries
    return m, batch()
"""


@pytest.fixture
def factories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "facs.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(
    ("factory", "needle"),
    [
        ("exit_in_loss", "loss function <lambda> called sys.exit(0)"),
        ("boom_in_loss", "raised Boom: not an Exception"),
        ("exit_in_backward", "backward pass failed: called sys.exit(0)"),
        ("raise_in_backward", "backward pass failed: raised ValueError: backward is broken"),
        ("exit_in_forward", "called sys.exit(3)"),
        ("exit_in_factory", "the factory called sys.exit(0)"),
    ],
)
def test_escapes_from_user_code_are_one_line_exit_2(
    cli, factories: Path, factory: str, needle: str
) -> None:
    for fmt in ("text", "json"):
        line = one_line_error(cli("scan", f"facs.py:{factory}", "--format", fmt))
        assert needle in line, line
        assert "internal error" not in line


def test_escape_leaves_an_in_memory_model_as_found() -> None:
    model = he_mlp([8, 16, 4])
    model.eval()
    model[0].weight.requires_grad_(False)
    model[2].weight.grad = torch.ones_like(model[2].weight)
    batch = (torch.randn(16, 8), torch.randint(0, 4, (16,)))
    with pytest.raises(NnhealthError, match=r"called sys.exit\(0\)"):
        nnhealth.scan(model, batch, lambda out, y: sys.exit(0))
    assert not model.training and not model[0].weight.requires_grad
    assert torch.equal(model[2].weight.grad, torch.ones_like(model[2].weight))
    assert model[0].weight.grad is None


def test_user_code_printing_keeps_json_on_stdout_clean(factories: Path) -> None:
    # a real process: the fd-level redirection is what catches os.write(1, ...) and C code
    (factories / "loud.py").write_text(
        textwrap.dedent(
            """
            import os
            import torch
            from torch import nn

            class Loud(nn.Linear):
                def forward(self, x):
                    print("print from forward")
                    os.write(1, b"raw write to fd 1\\n")
                    return super().forward(x)

            def build():
                import atexit
                atexit.register(print, "print at exit")  # after the report is written
                print("print from the factory")
                torch.manual_seed(0)
                return Loud(8, 4), (torch.randn(16, 8), torch.randint(0, 4, (16,)))
            """
        )
    )
    for fmt in ("json", "sarif"):
        res = subprocess.run(  # noqa: PLW1510 (the exit code is asserted)
            [sys.executable, "-m", "nnhealth", "scan", "loud.py:build", "--format", fmt],
            capture_output=True,
            text=True,
            cwd=factories,
            timeout=120,
        )
        assert res.returncode in (0, 1), res.stderr
        json.loads(res.stdout)  # the report alone
        for text in (
            "print from forward",
            "raw write to fd 1",
            "print from the factory",
            "print at exit",
        ):
            assert text in res.stderr and text not in res.stdout


def test_what_if_on_a_model_that_cannot_be_copied(cli, factories: Path) -> None:
    res = cli("scan", "facs.py:no_copy", "--what-if", "--format", "json")
    assert res.code == 1, res.err
    entries = json.loads(res.out)["what_if"]
    assert entries and all(not e["applied"] for e in entries)
    assert all("cannot be copied" in e["note"] for e in entries)


# --- odd option values --------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "m.pt"
    torch.save(he_mlp([8, 16, 4]), path)
    return path


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--baseline-tolerance", "nan"], "--baseline-tolerance"),
        (["--baseline-tolerance", "-1"], "--baseline-tolerance"),
        (["--what-if-budget", "nan"], "--what-if-budget"),
        (["--what-if-budget", "-1"], "--what-if-budget"),
        (["--what-if-budget", "inf"], "--what-if-budget"),
        (["--select", ""], "--select names no check"),
        (["--select", " , "], "--select names no check"),
        (["--seed", str(2**64)], "--seed"),
        (["--seed", str(2**63)], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--lr", "nan"], "--lr"),
        (["--hessian-tol", "nan"], "--hessian-tol"),
        (["--hessian", "--hessian-trace", "99999999999999999999"], "--hessian-trace"),
        (["--hessian-budget", "1000001"], "--hessian-budget"),
    ],
)
def test_odd_option_values_are_refused(cli, small: Path, args: list[str], needle: str) -> None:
    line = one_line_error(cli("scan", small, "--input-shape", "4x8", *args))
    assert needle in line and "internal error" not in line


def test_largest_seed_works(cli, small: Path) -> None:
    res = cli("scan", small, "--input-shape", "4x8", "--seed", str(2**63 - 1), "-q")
    assert res.code in (0, 1), res.err


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"seed": 2**64}, "^seed "),
        ({"seed": True}, "^seed "),
        ({"lr": float("nan")}, "^lr "),
        ({"select": []}, "^select "),
        ({"hessian_budget": 0}, "^hessian_budget "),
    ],
)
def test_python_api_refuses_the_same_values(kwargs: dict, needle: str) -> None:
    """The same refusals as the CLI's, naming the option by its keyword."""
    batch = (torch.randn(4, 8), torch.randint(0, 4, (4,)))
    with pytest.raises(NnhealthError, match=needle):
        nnhealth.scan(he_mlp([8, 16, 4]), batch, **kwargs)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("select = []\n", "names no check"),
        ("seed = 18446744073709551616\n", "seed"),
        ("what-if-budget = nan\n", "what-if-budget"),
        ("baseline-tolerance = nan\n", "baseline-tolerance"),
        ("tool = 1\n", None),  # not a table of ours: no config, the scan runs
    ],
)
def test_config_refuses_the_same_values(cli, small: Path, body: str, needle: str | None) -> None:
    directory = small.parent
    if body.startswith("tool"):
        (directory / "pyproject.toml").write_text(body)
    else:
        pyproject(directory, body)
    os.chdir(directory)
    res = cli("scan", small, "--input-shape", "4x8", "-q")
    if needle is None:
        assert res.code in (0, 1), res.err
    else:
        assert needle in one_line_error(res)


# --- odd files: FIFOs, devices, deep nesting, wrong types ----------------------------


def test_fifo_and_device_as_config_or_baseline_are_refused_at_once(cli, small: Path) -> None:
    fifo = small.parent / "fifo"
    os.mkfifo(fifo)  # opening it for reading would block for ever
    for args in (
        ["--config", fifo],
        ["--config", "/dev/zero"],
        ["--baseline", fifo],
        ["--baseline", "/dev/zero"],
    ):
        line = one_line_error(cli("scan", small, "--input-shape", "4x8", *args))
        assert "not a regular file" in line


def test_fifo_named_like_the_config_is_refused(cli, small: Path, monkeypatch) -> None:
    os.mkfifo(small.parent / "nnhealth.toml")
    monkeypatch.chdir(small.parent)
    assert "not a regular file" in one_line_error(cli("scan", small, "--input-shape", "4x8"))


def test_deeply_nested_config_and_baseline(cli, small: Path, monkeypatch) -> None:
    monkeypatch.chdir(small.parent)
    (small.parent / "deep.toml").write_text("a = " + "[" * 50000 + "]" * 50000 + "\n")
    line = one_line_error(cli("scan", small, "--input-shape", "4x8", "--config", "deep.toml"))
    assert "nested too deeply" in line
    (small.parent / "deep.json").write_text("[" * 200000 + "]" * 200000)
    line = one_line_error(cli("scan", small, "--input-shape", "4x8", "--baseline", "deep.json"))
    assert "nested too deeply" in line


@pytest.mark.parametrize("field", ["code", "check", "layer", "message"])
def test_baseline_with_wrong_types_is_refused(cli, small: Path, field: str) -> None:
    base = small.parent / "base.json"
    entry = {"key": "NH101:0", "code": "NH101", "severity": "error", "score": 0.5}
    entry[field] = ["NH101"]
    base.write_text(json.dumps({"nnhealth_baseline": 1, "findings": [entry]}))
    line = one_line_error(cli("scan", small, "--input-shape", "4x8", "--baseline", base))
    assert f"findings[0].{field}" in line


def test_report_to_a_full_device_is_one_line(small: Path) -> None:
    with open("/dev/full", "w") as full:
        res = subprocess.run(  # noqa: PLW1510 (the exit code is asserted)
            [sys.executable, "-m", "nnhealth", "scan", str(small), "--input-shape", "4x8"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write the report" in lines[0], res.stderr


def test_allocation_failure_is_one_line(cli, small: Path, monkeypatch) -> None:
    from nnhealth import runner

    def out_of_memory(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 21474836480 bytes. Error code 12"
        )

    monkeypatch.setattr(runner, "run", out_of_memory)
    line = one_line_error(cli("scan", small, "--input-shape", "4x8"))
    assert line.startswith("nnhealth: error: out of memory") and "smaller batch" in line
    monkeypatch.setattr(runner, "run", lambda *a, **k: (_ for _ in ()).throw(MemoryError()))
    assert "out of memory" in one_line_error(cli("scan", small, "--input-shape", "4x8"))


def test_readme_no_longer_calls_torchscript_safe() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "cannot call arbitrary Python" not in readme
    assert "TorchScript" in readme and "--trust" in readme


def test_error_line_shows_control_characters_from_names(cli, tmp_path: Path) -> None:
    model = torch.nn.Sequential()
    model.add_module("\x1b[2J\rfake", torch.nn.Linear(8, 4))
    path = tmp_path / "evil\x1b[31m.pt"
    torch.save(model, path)
    line = one_line_error(cli("scan", path, "--input-shape", "4x5"))  # does not fit: raises
    assert "\x1b" not in line and "\r" not in line
    assert "\\x1b[2J\\rfake" in line
    path.write_bytes(b"not a model")
    line = one_line_error(cli("scan", path, "--input-shape", "4x5"))
    assert "\x1b" not in line and "evil\\x1b[31m.pt" in line


def test_config_decoy_file_named_like_an_entry_point_does_not_import(
    cli, repo: Path, monkeypatch
) -> None:
    """A file called 'tools.build:build' beside the config made the value look like a
    file, while a scan from a subdirectory imported sub/tools/build.py."""
    pyproject(repo, 'arch = "tools.build:build"\n')
    (repo / "tools.build:build").write_text("decoy")
    sub = repo / "sub"
    (sub / "tools").mkdir(parents=True)
    (sub / "tools" / "__init__.py").write_text("")
    (sub / "tools" / "build.py").write_text(BUILD)
    torch.save(torch.load(repo / "model.pt"), sub / "w.pt")
    monkeypatch.chdir(sub)
    res = cli("scan", "w.pt", "--input-shape", "4x8", "-q")
    assert res.code == 2 and not (sub / "tools" / "MARKER").exists(), res.err
    sys.modules.pop("tools", None)
    sys.modules.pop("tools.build", None)


@pytest.mark.parametrize("where", [".git/hooks/pre-commit", "tools/build.py", "run.sh"])
def test_config_output_may_not_land_on_code(cli, repo: Path, where: str) -> None:
    (repo / ".git" / "hooks").mkdir(parents=True)
    pyproject(repo, f'model = "model.pt"\noutput = "{where}"\n')
    before = (repo / "tools" / "build.py").read_text()
    assert "code or repository metadata" in one_line_error(cli("scan"))
    assert (repo / "tools" / "build.py").read_text() == before
    assert not (repo / ".git" / "hooks" / "pre-commit").exists()


def test_output_to_dev_null_is_allowed(cli, small: Path) -> None:
    assert cli("scan", small, "--input-shape", "4x8", "-o", "/dev/null").code in (0, 1)


def test_out_of_memory_in_the_forward_says_so(cli, factories: Path) -> None:
    (factories / "hungry.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "class Hungry(nn.Linear):\n"
        "    def forward(self, x):\n"
        "        raise RuntimeError(\"DefaultCPUAllocator: can't allocate memory: you tried "
        'to allocate 68719476736 bytes")\n\n'
        "def build():\n    return Hungry(8, 4)\n"
    )
    line = one_line_error(cli("scan", "hungry.py:build", "--input-shape", "4x8"))
    assert "out of memory in the forward pass" in line and "smaller batch" in line
