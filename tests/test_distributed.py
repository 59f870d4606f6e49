"""A scan across ranks (torch.distributed, gloo, 2 CPU processes) against one process on
the whole batch: the same statistics to float tolerance, the same findings, the same
lambda_max within its bound; failures end every rank with one line; sharded
parameters are refused.

Ranks are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment of ``python -m nnhealth scan``); one test goes through torchrun itself.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from nnhealth import distributed
from nnhealth.loading.batch import Batch
from nnhealth.loading.loss import LossResolver

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)

MODELS = textwrap.dedent(
    """
    import os, time
    import torch
    from torch import nn

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.b1 = nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1)
            self.b2 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8, 10)

        def forward(self, x):
            x = torch.relu(self.b1(self.c1(x)))
            x = torch.relu(self.b2(self.c2(x)))
            return self.fc(x.mean((2, 3)))

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            return self.head(self.enc(x).mean(1))

    def mlp():
        torch.manual_seed(0)
        # the middle layer starts dead for some units: a finding both scans must agree on
        net = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(),
                            nn.Linear(32, 3))
        with torch.no_grad():
            net[2].bias[:6] = -20.0
        return net

    def cnn():
        torch.manual_seed(0)
        return CNN()

    def encoder():
        torch.manual_seed(0)
        return Encoder()

    class Raises(nn.Module):
        # rank 1 raises between two BatchNorms: rank 0 is then waiting in the second
        # one's all_reduce, inside its forward
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3)
            self.n1 = nn.BatchNorm1d(12)
            self.n2 = nn.BatchNorm1d(3)

        def forward(self, x):
            x = self.n1(x)
            if os.environ.get("RANK") == "1":
                raise ValueError("rank one's examples broke it")
            return self.n2(self.fc(x))

    class Sleeps(Raises):
        def forward(self, x):
            if os.environ.get("RANK") == "1":
                time.sleep(float(os.environ["SLEEP"]))
            return self.fc(x)

    def raises():
        return Raises()

    def unseeded():
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))

    def resnet():
        import torchvision

        torch.manual_seed(0)
        return torchvision.models.resnet18(num_classes=10)

    def sleeps():
        return Sleeps()
    """
)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dist")
    (d / "distmodels.py").write_text(MODELS)
    g = torch.Generator().manual_seed(1)
    torch.save(
        {
            "inputs": torch.randn(8, 12, generator=g),
            "targets": torch.randint(0, 3, (8,), generator=g),
        },
        d / "mlp.pt",
    )
    torch.save(
        {
            "inputs": torch.randn(8, 3, 8, 8, generator=g),
            "targets": torch.randint(0, 10, (8,), generator=g),
        },
        d / "cnn.pt",
    )
    # no targets: each rank's seeded random labels must be its slice of the whole's
    torch.save({"inputs": torch.randn(6, 5, 16, generator=g)}, d / "encoder.pt")
    torch.save(
        {
            "inputs": torch.randn(8, 3, 32, 32, generator=g),
            "targets": torch.randint(0, 10, (8,), generator=g),
        },
        d / "resnet.pt",
    )
    return d


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(work: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(work), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _ranks(work: Path, world: int, args: list[str], timeout: float = 240, **extra: str):
    """Start ``world`` ranks of ``python -m nnhealth scan ARGS`` as torchrun would; their
    (exit code, stdout, stderr), rank 0 first."""
    port = str(_port())
    procs = []
    for rank in range(world):
        env = _env(
            work,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            **extra,
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "nnhealth", "scan", *args],
                cwd=work,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def _run(work: Path, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=work, env=_env(work), capture_output=True, check=False, text=True, timeout=240
    )


def _single(work: Path, args: list[str]):
    p = _run(work, [sys.executable, "-m", "nnhealth", "scan", *args])
    return p.returncode, p.stdout, p.stderr


def _close(a: float | None, b: float | None, rtol: float, atol: float) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b))


# statistics whose value is a float: compared to rtol 1e-4 (float32 sums in another
# order), with an absolute floor for those that are zero in exact arithmetic (a conv
# bias before BatchNorm has a gradient of rounding only, so its trust ratio is noise)
NOISE = {"bias_trust_ratio", "trust_ratio", "act_mean", "grad_mean"}


def _compare_layers(multi: dict, single: dict) -> None:
    assert [r["name"] for r in multi["layers"]] == [r["name"] for r in single["layers"]]
    for a, b in zip(multi["layers"], single["layers"], strict=True):
        for key, value in b.items():
            if key in NOISE or not isinstance(value, float):
                if not isinstance(value, float):
                    assert a[key] == value, (b["name"], key)
                continue
            assert _close(a[key], value, 1e-4, 1e-7), (b["name"], key, a[key], value)


def _compare(multi: dict, single: dict) -> None:
    _compare_layers(multi, single)
    found = sorted((f["code"], f["layer"], f["severity"]) for f in multi["findings"])
    assert found == sorted((f["code"], f["layer"], f["severity"]) for f in single["findings"])
    assert math.isclose(multi["run"]["loss_value"], single["run"]["loss_value"], rel_tol=1e-5)
    assert multi["run"]["batch"]["examples"] == single["run"]["batch"]["examples"]
    assert multi["run"]["batch"]["ranks"] == 2
    cm, cs = multi["curvature"], single["curvature"]
    assert cm["ranks"] == 2
    # both certified: each within its bound of an eigenvalue, the same one
    gap = abs(cm["top_eigenvalues"][0] - cs["top_eigenvalues"][0])
    assert gap <= cm["bounds"][0] + cs["bounds"][0] + 1e-6 * abs(cs["top_eigenvalues"][0])


@pytest.mark.parametrize(
    ("factory", "data", "extra"),
    [
        ("mlp", "mlp.pt", []),
        ("cnn", "cnn.pt", []),  # BatchNorm in train mode: normalized over the whole batch
        ("encoder", "encoder.pt", ["--hessian-top", "2"]),
        ("resnet", "resnet.pt", []),  # a stock architecture (skipped without torchvision)
    ],
)
def test_two_ranks_scan_as_one_process_on_the_whole_batch(work, factory, data, extra):
    if factory == "resnet":
        pytest.importorskip("torchvision")
    args = [f"distmodels:{factory}", "--data", data, "--format", "json", "--hessian", *extra]
    runs = _ranks(work, 2, args)
    code, stdout, _ = _single(work, args)
    assert [r[0] for r in runs] == [code, code], [r[2] for r in runs]
    assert runs[1][1] == ""  # rank 1 writes nothing
    multi, single = json.loads(runs[0][1]), json.loads(stdout)
    _compare(multi, single)
    if factory == "mlp":  # the finding both must see
        assert any(f["code"] == "NH101" for f in single["findings"])
    if factory == "encoder":  # no targets: each rank's random labels are its slice
        assert "random" in single["run"]["loss"]


BLOCKS = textwrap.dedent(
    """
    import nnhealth.curvature.blocks as blocks
    blocks.GRAPH_FLOOR = 0
    blocks.PEAK_FACTOR = 10**12  # every graph over its allowance: blocks of one example
    """
)


@pytest.mark.parametrize(("factory", "data"), [("mlp", "mlp.pt"), ("encoder", "encoder.pt")])
def test_ranks_taking_products_in_blocks_scan_as_one_process(work, tmp_path, factory, data):
    """Each rank rebuilds its shard's graph one example at a time for every product
    (the sum over ranks is still one all_reduce per product): the same lambda_max as
    one process keeping the whole batch's graph."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKS)
    path = os.pathsep.join([str(tmp_path), str(work)])
    args = [f"distmodels:{factory}", "--data", data, "--format", "json", "--hessian"]
    runs = _ranks(work, 2, args, NNHEALTH_DIST_TIMEOUT="60", PYTHONPATH=path)
    code, stdout, _ = _single(work, args)
    assert [r[0] for r in runs] == [code, code], [r[2] for r in runs]
    multi, single = json.loads(runs[0][1]), json.loads(stdout)
    shard = multi["run"]["batch"]["examples"] // 2
    assert multi["curvature"]["blocks"] == shard and single["curvature"]["blocks"] == 1
    _compare(multi, single)


def test_hessian_sub_batch_across_ranks_is_the_first_n_of_every_shard(work):
    whole = torch.load(work / "mlp.pt")
    rows = [0, 1, 4, 5]  # the first 2 of each rank's shard of 4
    torch.save({k: v[rows] for k, v in whole.items()}, work / "mlp_firsts.pt")
    base = ["distmodels:mlp", "--format", "json", "--hessian"]
    runs = _ranks(work, 2, [*base, "--data", "mlp.pt", "--hessian-batch", "2"])
    code, stdout, _ = _single(work, [*base, "--data", "mlp_firsts.pt"])
    assert code in (0, 1) and runs[0][0] == code, runs[0][2]
    cm, cs = json.loads(runs[0][1])["curvature"], json.loads(stdout)["curvature"]
    assert cm["examples"] == 4 and cs["examples"] == 4
    gap = abs(cm["top_eigenvalues"][0] - cs["top_eigenvalues"][0])
    assert gap <= cm["bounds"][0] + cs["bounds"][0]


def test_sub_batches_on_unequal_shards_are_equal_parts(work):
    """5 examples on 2 ranks (shards of 2 and 3): --hessian-batch 2 is examples 0, 1 and
    2, 3, each rank's part weighted alike, as one process on those 4; 3 is refused by
    both ranks (the smallest shard has 2)."""
    whole = torch.load(work / "mlp.pt")
    torch.save({k: v[:5] for k, v in whole.items()}, work / "five.pt")
    torch.save({k: v[:4] for k, v in whole.items()}, work / "four.pt")
    base = ["distmodels:mlp", "--format", "json", "--hessian", "--hessian-tol", "1e-6"]
    runs = _ranks(work, 2, [*base, "--data", "five.pt", "--hessian-batch", "2"])
    code, stdout, _ = _single(work, [*base, "--data", "four.pt"])
    assert runs[0][0] == code, runs[0][2]
    cm, cs = json.loads(runs[0][1])["curvature"], json.loads(stdout)["curvature"]
    assert cm["examples"] == 4
    gap = abs(cm["top_eigenvalues"][0] - cs["top_eigenvalues"][0])
    assert gap <= cm["bounds"][0] + cs["bounds"][0]
    refused = _ranks(work, 2, [*base, "--data", "five.pt", "--hessian-batch", "3"])
    for rc, _, stderr in refused:
        assert rc == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert "the smallest rank's shard has 2 examples" in stderr


SMALL_MEMORY = textwrap.dedent(
    """
    import os
    if os.environ.get("RANK") == "1":  # this rank alone sees little free memory
        import nnhealth.memory
        nnhealth.memory.available = lambda: 200_000
    """
)


def test_ranks_choose_the_same_lanczos_whatever_their_free_memory(work, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SMALL_MEMORY)
    path = os.pathsep.join([str(tmp_path), str(work)])
    runs = _ranks(
        work,
        2,
        ["distmodels:mlp", "--data", "mlp.pt", "--format", "json", "--hessian"],
        NNHEALTH_DIST_TIMEOUT="30",
        PYTHONPATH=path,
    )
    assert runs[0][0] == runs[1][0] and runs[0][0] in (0, 1), [r[2] for r in runs]
    assert json.loads(runs[0][1])["curvature"]["lanczos"] == "three-term"


def test_a_failing_rank_ends_every_rank_with_one_line(work, tmp_path):
    start = time.monotonic()
    runs = _ranks(work, 2, ["distmodels:raises", "--input-shape", "4x12"])
    assert time.monotonic() - start < 120
    assert [r[0] for r in runs] == [2, 2]
    for _, stdout, stderr in runs:
        assert stdout == ""
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, stderr
        assert "Traceback" not in stderr
    assert "rank 1/2" in runs[1][2] and "rank one's examples broke it" in runs[1][2]
    assert "rank 0/2: stopped, another rank failed" in runs[0][2]


def test_a_rank_that_stops_answering_times_out_with_one_line(work):
    start = time.monotonic()
    runs = _ranks(
        work,
        2,
        ["distmodels:sleeps", "--input-shape", "4x12"],
        NNHEALTH_DIST_TIMEOUT="3",
        SLEEP="20",
    )
    # rank 0 gave up after its timeout, not after rank 1 woke
    assert runs[0][0] == 2
    lines = [ln for ln in runs[0][2].splitlines() if ln.strip()]
    assert len(lines) == 1 and "rank 0/2: stopped" in lines[0], runs[0][2]
    assert time.monotonic() - start < 90


def test_torchrun_runs_the_module(work):
    out = _run(
        work,
        [
            sys.executable,
            "-m",
            "torch.distributed.run",  # the torchrun command
            "--nproc_per_node=2",
            "--master_port",
            str(_port()),
            "-m",
            "nnhealth",
            "scan",
            "distmodels:mlp",
            "--data",
            "mlp.pt",
            "--format",
            "json",
        ],
    )
    report = json.loads(out.stdout)
    assert report["run"]["batch"]["ranks"] == 2
    assert any(f["code"] == "NH101" for f in report["findings"])


def test_a_factory_with_random_weights_gets_rank_0s_on_every_rank(work):
    runs = _ranks(work, 2, ["distmodels:unseeded", "--input-shape", "4x12", "--format", "json"])
    assert [r[0] for r in runs] == [0, 0] or [r[0] for r in runs] == [1, 1], runs[0][2]
    notes = json.loads(runs[0][1])["notes"]
    assert any("every rank scanned rank 0's" in n for n in notes)


def test_bad_timeout_is_one_line(work):
    runs = _ranks(
        work, 2, ["distmodels:mlp", "--input-shape", "4x12"], NNHEALTH_DIST_TIMEOUT="soon"
    )
    for code, _, stderr in runs:
        assert code == 2
        assert "NNHEALTH_DIST_TIMEOUT='soon'" in stderr and "Traceback" not in stderr


# ---- the pieces, in one process -------------------------------------------------


def test_pooled_moments_are_those_of_the_union():
    rng = np.random.default_rng(0)
    parts = [rng.normal(3.0, 0.01, size=n) for n in (5, 17, 1)]
    mean, m2 = distributed._pooled(
        [len(p) for p in parts], [p.mean() for p in parts], [p.var() * len(p) for p in parts]
    )
    union = np.concatenate(parts)
    assert math.isclose(mean, union.mean(), rel_tol=1e-14)
    assert math.isclose(m2 / len(union), union.var(), rel_tol=1e-10)


def test_shards_cover_the_batch_once():
    batch = Batch({"x": torch.arange(10)[:, None], "mask": torch.ones(3)}, torch.arange(10), "b")
    got = [distributed.shard(batch, distributed.Ranks(r, 3)) for r in range(3)]
    assert torch.equal(torch.cat([b.inputs["x"] for b in got]), batch.inputs["x"])
    assert torch.equal(torch.cat([b.targets for b in got]), batch.targets)
    assert all(torch.equal(b.inputs["mask"], torch.ones(3)) for b in got)  # not per example
    assert [b.part for b in got] == [(0, 3, 10), (3, 6, 10), (6, 10, 10)]
    with pytest.raises(distributed.UsageError, match="2 example"):
        distributed.shard(batch.take(0, 2, "two"), distributed.Ranks(0, 3))


@pytest.mark.parametrize("choice", ["ce", "mse", "bce"])
def test_random_targets_of_a_part_are_the_whole_batchs(choice):
    out = torch.randn(10, 4, dtype=torch.float64)
    whole = LossResolver(choice, None, seed=3)
    full = whole(out)
    pieces = []
    for start, stop in ((0, 3), (3, 10)):
        part = LossResolver(choice, None, seed=3)
        part.part = (start, stop, 10)
        pieces.append(part(out[start:stop]) * (stop - start) / 10)
    assert torch.allclose(sum(pieces), full, rtol=1e-12)


API = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    import nnhealth
    from nnhealth.errors import NnhealthError
    from distmodels import mlp

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 12, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    model = mlp()
    if sys.argv[1] == "differ":
        torch.manual_seed(rank)  # each rank its own weights, no DDP to sync them
        try:
            nnhealth.scan(torch.nn.Sequential(torch.nn.Linear(12, 3)), (x, y))
            print("scanned")
        except NnhealthError as exc:
            print(f"refused: {exc}")
    elif sys.argv[1] == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        part = slice(rank * 4, rank * 4 + 4)  # each rank's own batch
        report = nnhealth.scan(wrapped, (x[part], y[part]), hessian=True)
        same = all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        untouched = same and wrapped.training and all(p.grad is None for p in model.parameters())
        print(json.dumps({"report": report.to_dict(), "untouched": untouched}))
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
        try:
            nnhealth.scan(model, (x, y))
            print("scanned")
        except NnhealthError as exc:
            print(f"refused: {exc}")
    dist.destroy_process_group()
    """
)


def _api_ranks(work: Path, mode: str) -> list[str]:
    (work / "api_rank.py").write_text(API)
    port = str(_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "api_rank.py", mode],
            cwd=work,
            env=_env(
                work,
                RANK=str(r),
                LOCAL_RANK=str(r),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    return [o for o, _ in outs]


def test_scan_on_every_rank_of_a_ddp_job_is_the_whole_batchs(work, monkeypatch):
    import nnhealth

    monkeypatch.syspath_prepend(str(work))
    from distmodels import mlp  # type: ignore[import-not-found]

    outs = [json.loads(o) for o in _api_ranks(work, "ddp")]
    assert all(o["untouched"] for o in outs)  # the DDP model as it was found
    assert outs[0]["report"] == outs[1]["report"] | {"run": outs[0]["report"]["run"]}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 12, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    single = nnhealth.scan(mlp(), (x, y), hessian=True).to_dict()
    _compare(outs[0]["report"], single)


def test_ranks_with_different_weights_are_refused_with_one_line(work):
    outs = _api_ranks(work, "differ")
    for rank, out in enumerate(outs):
        lines = out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"refused: rank {rank}/2: "), out
        assert "rank(s) [1] differ from rank 0's" in lines[0]


def test_fully_sharded_parameters_are_refused_with_one_line(work):
    pytest.importorskip("torch.distributed.fsdp")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no fully_shard")
    outs = _api_ranks(work, "fsdp")
    for rank, out in enumerate(outs):
        lines = out.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"refused: rank {rank}/2: "), out
        assert "sharded across ranks" in lines[0] and "DTensor" in lines[0]
