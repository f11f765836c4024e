"""``torchrun --nproc-per-node 2 -m cfcam_gpu evaluate`` (CPU, gloo) against the one-process run of the same
command: metrics.json equal within 1e-6 (means, CIs, n_images), per-image values in the same order, files
written by rank 0 alone. ResNet18 with a seeded state dict on 5 small PNGs (one broken: exit code 1)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from PIL import Image

from cfcam_gpu.app import evaluate
from cfcam_gpu.app.data import bundled_images
from helpers import subprocess_env

IMAGES = {"a.png": "chelsea", "b.png": "coffee", "c.png": "rocket", "e.png": "astronaut"}


def _close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k != "seconds_per_image":
                _close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (path, a, b)  # float32 forwards of batches of 3 vs 2
    else:
        assert a == b, (path, a, b)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo")
def test_torchrun_evaluate_matches_one_process(tmp_path):
    photos = dict(bundled_images())
    folder = tmp_path / "data"
    folder.mkdir()
    for rel, name in IMAGES.items():
        Image.fromarray(photos[name]).resize((48, 48), Image.BILINEAR).save(folder / rel)
    (folder / "d.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # rank 1's shard
    torch.manual_seed(0)
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "w.pth")
    args = [str(folder), "--model", "resnet18", "--weights", str(tmp_path / "w.pth"), "--device", "cpu",
            "--methods", "gradcam,cfcam", "--steps", "5", "--sigmas", "0.5", "--grid-images", "2",
            "--batch-size", "3", "--quiet"]
    assert evaluate.main([*args, "--out", str(tmp_path / "one")]) == 1  # d.png is broken

    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "cfcam_gpu", "evaluate", *args, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1 or "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode != 0, proc.stderr  # the broken file (rank 1's) fails the job, as in one process
    assert proc.stderr.count("skipped") == 1, proc.stderr  # printed once, by rank 0
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    ref = json.loads((one / "metrics.json").read_text())
    got = json.loads((two / "metrics.json").read_text())
    assert list(got) == ["gradcam", "cfcam"] and got["cfcam"]["n_images"] == 4
    _close(got, ref)
    per_one = json.loads((one / "per_image.json").read_text())
    per_two = json.loads((two / "per_image.json").read_text())
    for key in ("images", "targets", "classes", "clusters"):
        assert per_two[key] == per_one[key], key
    _close(per_two["methods"], per_one["methods"])
    def strip(md):
        return [line for line in md.splitlines() if not line.startswith("Seconds") and "s / image" not in line]
    md_one, md_two = strip((one / "metrics.md").read_text()), strip((two / "metrics.md").read_text())
    assert [line.rsplit("|", 2)[0] for line in md_two] == [line.rsplit("|", 2)[0] for line in md_one]  # less s / image
