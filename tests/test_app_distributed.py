"""Several processes: ``cfcam_gpu.app.distributed`` helpers, and ``torchrun --nproc-per-node 2 -m cfcam_gpu
explain`` (CPU, gloo) against a one-process run of the same command: the same files, the same manifest
rows in the same order, CAMs within 1e-5; a rank killed mid-run, then ``--resume``.

The model is a torchvision ResNet18 with a seeded state dict (--weights), on small PNGs cut from the
bundled photos. Each torchrun launch costs a few seconds of Python start-up per process.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from cfcam_gpu.app import distributed, outputs
from cfcam_gpu.app.options import CLIError
from cfcam_gpu.app.cli import main
from cfcam_gpu.app.data import bundled_images
from helpers import manifest, subprocess_env

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")

# Sorted, the inputs are a/cat, b/cat, c/china, d/broken, flower, rocket, space. The two cats (whose names
# get a hash) fall in different shards (rank 0: inputs 0, 2, 4, 6; rank 1: 1, 3, 5). The broken file is
# input 3, in rank 1's shard, and with --batch-size 3 it opens the one-process run's second batch (rows
# are in input order within a batch too).
IMAGES = {"a/cat.png": "chelsea", "b/cat.png": "coffee", "c/china.png": "china", "flower.png": "flower",
          "rocket.png": "rocket", "space.png": "astronaut"}
BROKEN = "d/broken.png"


def options(weights: Path, batch_size: int) -> list[str]:
    return ["--model", "resnet18", "--weights", str(weights), "--device", "cpu", "--workers", "0",
            "--batch-size", str(batch_size)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    photos = dict(bundled_images())
    for rel, name in IMAGES.items():
        path = root / "data" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photos[name]).resize((64, 64), Image.BILINEAR).save(path)
    (root / "data" / BROKEN).parent.mkdir()
    (root / "data" / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    torch.manual_seed(0)
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), root / "weights.pth")
    return root


@pytest.fixture(scope="module")
def reference(data) -> Path:
    """The one-process run (in this process) of the folder, batch size 3."""
    out = data / "one"
    assert main(["explain", str(data / "data"), "--out", str(out), "--quiet",
                 *options(data / "weights.pth", 3)]) == 1  # broken.png fails
    return out


# Run by torchrun instead of ``-m cfcam_gpu`` to kill one rank mid-run: the rank DIE_RANK exits at once
# (os._exit: no cleanup, as if killed) when DIE_AFTER or more of its images are committed to its manifest.
DYING_MAIN = """
import os, sys
from cfcam_gpu.app import cli, distributed, outputs

commit = outputs.BatchWriter.commit


def commit_then_die(self):
    rows = commit(self)
    if (sum(self.counts.values()) >= int(os.environ["DIE_AFTER"])
            and distributed.context().rank == int(os.environ["DIE_RANK"])):
        os._exit(1)
    return rows


outputs.BatchWriter.commit = commit_then_die
sys.exit(cli.main())
"""


def torchrun(*args: str, env: dict | None = None, nproc: int = 2, script: Path | None = None
             ) -> subprocess.CompletedProcess:
    environment = subprocess_env(**(env or {}))
    program = [str(script)] if script else ["-m", "cfcam_gpu"]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", str(nproc), *program, "explain", *args],
                          capture_output=True, text=True, env=environment, timeout=300)


TIMING_FIELDS = {"seconds", "time", "duration"}  # none today; rows are compared without them


def assert_same_run(out: Path, ref: Path, paths: set[str] | None = None) -> None:
    """``out`` holds what the one-process ``ref`` holds (restricted to the rows of ``paths`` if given)."""
    ref_rows = [r for r in manifest(ref) if paths is None or r["path"] in paths]
    rows = manifest(out)
    strip = lambda row: {k: v for k, v in row.items() if k not in TIMING_FIELDS}  # noqa: E731
    assert [strip(r) for r in rows] == [strip(r) for r in ref_rows]  # same rows, same order
    files = {f for r in ref_rows if r["status"] == "ok" for f in r["files"].values()}
    others = {"manifest.jsonl", "run.json", "contact_sheet.png", outputs.LOCK}
    assert {p.name for p in out.iterdir()} == files | others  # no per-rank manifest, no temporary file
    for row in ref_rows:
        if row["status"] == "ok":
            np.testing.assert_allclose(np.load(out / row["files"]["cam"]), np.load(ref / row["files"]["cam"]),
                                       rtol=0, atol=1e-5)
    assert json.loads((out / "run.json").read_text()) == json.loads((ref / "run.json").read_text())


# ---------------------------------------------------------------------------------------------------
# Helpers, in one process.

def test_context_from_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.context() == (0, 1, 0)
    assert distributed.context().is_main and not distributed.context().distributed
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    rank, world, local = distributed.context()
    assert (rank, world, local) == (3, 4, 1) and distributed.context().distributed
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK"):
        distributed.context()


def test_shard_is_a_disjoint_deterministic_cover():
    items = [f"img{i}" for i in range(11)]
    for world in (1, 2, 3, 8, 16):
        shards = [distributed.shard(items, rank, world) for rank in range(world)]
        assert sorted(x for s in shards for x in s) == sorted(items)  # everything, once
        assert sum(len(s) for s in shards) == len(items)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
        assert shards == [distributed.shard(items, rank, world) for rank in range(world)]
    assert distributed.shard(items, 1, 2) == items[1::2]
    with pytest.raises(ValueError):
        distributed.shard(items, 2, 2)


def test_one_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init("cpu") == (0, 1, 0) and not distributed.is_initialized()
    distributed.barrier()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    distributed.destroy()
    assert distributed.device_spec("auto") == "auto"
    two = distributed.Context(1, 2, 1)
    assert distributed.device_spec("cpu", two) == "cpu" and distributed.device_spec("cuda:0", two) == "cuda:0"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert distributed.device_spec("auto", two) == (f"cuda:{1 % gpus}" if gpus else "auto")


def test_an_error_every_rank_shares_is_printed_by_rank_0_only(tmp_path, monkeypatch, capsys):
    args = ["explain", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--quiet"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(args) == 2 and capsys.readouterr().err == ""  # fails before joining any process group
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(args) == 2 and "missing" in capsys.readouterr().err
    assert not distributed.is_initialized()


def test_resume_merges_per_rank_manifests_in_input_order(tmp_path):
    """What a killed torchrun job leaves (per-rank manifests, a temporary file) is folded in on --resume."""
    out = tmp_path / "out"
    out.mkdir()
    keys = [f"/data/{c}.png" for c in "abcd"]
    for key in keys:
        (out / f"{Path(key).stem}.npy").write_bytes(b"x")

    def row(key, status="ok"):
        return json.dumps({"path": key, "status": status, "files": {"cam": f"{Path(key).stem}.npy"}}) + "\n"

    (out / "manifest.rank0.jsonl").write_text(row(keys[2]) + row(keys[0]))
    (out / "manifest.rank1.jsonl").write_text(row(keys[3], "error") + row(keys[1])[:30])  # half a line
    (out / f".d.npy.{'0' * 32}.tmp").write_bytes(b"partial")
    with pytest.raises(CLIError, match="--resume"):
        outputs.prepare_output(out, resume=False, overwrite=False, config={}, order=keys)
    kept = outputs.prepare_output(out, resume=True, overwrite=False, config={}, order=keys)
    assert [r["path"] for r in kept] == [keys[0], keys[2]]
    assert [r["path"] for r in manifest(out)] == [keys[0], keys[2]]
    assert not list(out.glob("manifest.rank*")) and not list(out.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------------
# torchrun, 2 processes on the CPU.

@needs_gloo
def test_torchrun_two_processes_match_one_process(data, reference):
    out = data / "two"
    proc = torchrun(str(data / "data"), "--out", str(out), "--json", *options(data / "weights.pth", 3))
    assert proc.returncode != 0, proc.stderr  # broken.png failed on rank 1: every rank exits 1
    summary = json.loads(proc.stdout)  # rank 0's summary alone
    assert summary["world_size"] == 2 and summary["n_images"] == 7
    assert summary["n_ok"] == 6 and summary["n_failed"] == 1  # summed over the ranks
    assert proc.stderr.count("2 processes") == 1  # one start line, from rank 0
    assert_same_run(out, reference)
    assert [r["path"] for r in manifest(out)] == sorted([*IMAGES, BROKEN])  # relative to the input folder
    cats = {r["files"]["cam"] for r in manifest(out) if r["status"] == "ok" and r["path"].endswith("/cat.png")}
    assert len(cats) == 2 and all(name.startswith("cat_") for name in cats)  # a/cat.png, b/cat.png: hashed


@needs_gloo
def test_a_killed_rank_is_finished_by_resume(data, reference):
    good = sorted(str(data / "data" / rel) for rel in IMAGES)
    out = data / "killed"
    args = [*good, "--out", str(out), *options(data / "weights.pth", 1)]
    # Rank 1 dies (os._exit) right after committing its first image; torchrun then stops rank 0.
    script = data / "dying_main.py"
    script.write_text(DYING_MAIN)
    proc = torchrun(*args, "--quiet", env={"DIE_AFTER": "1", "DIE_RANK": "1"}, script=script)
    assert proc.returncode != 0
    assert (out / "manifest.rank1.jsonl").is_file()
    done, _, _ = outputs.gather_manifests(out)
    done = [r for r in done if r["status"] == "ok"]
    assert 1 <= len(done) < len(good), done
    mtimes = {f: (out / f).stat().st_mtime_ns for r in done for f in r["files"].values()}

    proc = torchrun(*args, "--resume", "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["n_skipped"] == len(done) and summary["n_ok"] == len(good) - len(done)
    assert {f: (out / f).stat().st_mtime_ns for f in mtimes} == mtimes  # finished images: not redone
    assert_same_run(out, reference, paths=set(IMAGES))  # manifest paths: relative to the input folder
