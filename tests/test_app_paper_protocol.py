"""``cfcam evaluate --protocol paper|both|default`` end to end through ``cli.main`` on a tiny seeded random
CNN (32 x 32 inputs) and three small images: the files, their keys and value ranges, CF-CAM's robustness
under large gradient noise, and no paper files with the default protocol."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cfcam_gpu.app import evaluate
from cfcam_gpu.app.cli import main
from cfcam_gpu.app.models import ModelInfo

SCALARS = ("average_drop", "average_drop_clipped", "increase_in_confidence", "average_increase",
           "deletion_auc", "insertion_auc")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _tiny_model():
    """A seeded random CNN whose top-1 probabilities are far from uniform (~0.75 of 5 classes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()
    with torch.no_grad():
        model[-1].weight.mul_(30)
    return model


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """evaluate's load_model replaced by a tiny CNN (its own mean / std); a folder of 3 images."""
    seen = {}

    def load_model(args, device):
        info = ModelInfo(name="tiny", default_layer="2", input_size=(32, 32), mean=MEAN, std=STD,
                         class_names=[f"c{i}" for i in range(5)])
        seen["info"] = info
        return _tiny_model().to(device), info, args.layer or "2", None  # (model, info, layer, reshape)

    monkeypatch.setattr(evaluate, "load_model", load_model)
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"im{k}.png")
    return folder


def _run(folder, out, protocol, methods="cfcam,gradcam,scorecam"):
    return main(["evaluate", str(folder), "--methods", methods, "--steps", "5", "--sigmas", "1",
                 "--out", str(out), "--quiet", "--device", "cpu", "--protocol", protocol])


def _in_range(stat, values, low, high):
    """Every per-image value and the mean in [low, high]; the 95% interval (Student t, 3 images: it may
    leave the range) around the mean."""
    return (all(low <= v <= high for v in values) and low <= stat["mean"] <= high
            and stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1] and math.isclose(
                stat["mean"], sum(values) / len(values), rel_tol=1e-9, abs_tol=1e-12))


def test_paper_protocol_files_keys_and_ranges(tiny, tmp_path):
    out = tmp_path / "eval"
    assert _run(tiny, out, "paper") == 0
    assert not (out / "metrics.json").exists()  # the paper protocol alone
    doc = json.loads((out / "paper_metrics.json").read_text())
    assert doc["n_images"] == 3 and doc["steps"] == 5 and doc["levels"] == [float(v) for v in range(1, 11)]
    assert sorted(doc["names"]) == ["im0", "im1", "im2"] and all(0 <= t < 5 for t in doc["targets"])
    assert list(doc["methods"]) == ["cfcam", "gradcam", "scorecam"]
    for name, m in doc["methods"].items():
        s, per = m["summary"], m["per_image"]
        assert all(len(per[k]) == 3 for k in SCALARS)
        assert _in_range(s["average_drop_clipped"], per["average_drop_clipped"], 0, 100)
        assert _in_range(s["average_drop"], per["average_drop"], -math.inf, 100)  # unclipped: may be < 0
        assert all(max(d, 0) == pytest.approx(c) for d, c in zip(per["average_drop"], per["average_drop_clipped"]))
        assert _in_range(s["increase_in_confidence"], per["increase_in_confidence"], 0, 100)
        assert all(v in (0.0, 100.0) for v in per["increase_in_confidence"])
        assert all((d < 0) == (i == 100) for d, i in zip(per["average_drop"], per["increase_in_confidence"]))
        assert _in_range(s["average_increase"], per["average_increase"], -1, 1)
        assert _in_range(s["deletion_auc"], per["deletion_auc"], 0, 1)
        assert _in_range(s["insertion_auc"], per["insertion_auc"], 0, 1)
        if name == "scorecam":
            assert s["robustness"] is None and per["robustness"] is None
            continue
        assert list(s["robustness"]) == [str(float(v)) for v in range(1, 11)]
        for level in s["robustness"].values():
            assert -1 - 1e-6 <= level["ssim"]["mean"] <= 1 + 1e-6 and level["mse"]["mean"] >= 0  # float32 SSIM
    # CF-CAM's weights see the noise: at level 10 its maps change (not SSIM = 1 on every image)
    cf = doc["methods"]["cfcam"]["per_image"]["robustness"]["10.0"]
    assert min(cf["ssim"]) < 0.99 and max(cf["mse"]) > 1e-4
    md = (out / "paper_metrics.md").read_text()
    assert "| cfcam |" in md and "n/a (gradient-free)" in md and "Insertion AUC" in md


def test_both_writes_both_and_is_seeded(tiny, tmp_path):
    out = tmp_path / "eval"
    assert _run(tiny, out, "both", methods="gradcam,randomcam") == 0
    assert (out / "metrics.json").exists() and (out / "paper_metrics.json").exists()
    first = json.loads((out / "paper_metrics.json").read_text())
    assert first["methods"]["randomcam"]["per_image"]["robustness"] is None  # its map ignores the gradients
    # the paper files are not replaced without --overwrite (a usage error, exit code 2)
    assert main(["evaluate", str(tiny), "--methods", "gradcam", "--steps", "5", "--out", str(out), "--quiet",
                 "--device", "cpu", "--protocol", "paper"]) == 2
    torch.manual_seed(1)  # randomcam's weights come from --seed, not from the global state
    assert main(["evaluate", str(tiny), "--methods", "gradcam,randomcam", "--steps", "5", "--out", str(out),
                 "--quiet", "--device", "cpu", "--protocol", "paper", "--overwrite"]) == 0
    again = json.loads((out / "paper_metrics.json").read_text())
    for name in ("gradcam", "randomcam"):
        assert again["methods"][name]["per_image"] == first["methods"][name]["per_image"]


def test_default_protocol_writes_no_paper_files(tiny, tmp_path):
    out = tmp_path / "eval"
    assert _run(tiny, out, "default", methods="gradcam") == 0
    assert (out / "metrics.json").exists()
    assert not (out / "paper_metrics.json").exists() and not (out / "paper_metrics.md").exists()


def test_refused_under_torchrun(tmp_path):
    from types import SimpleNamespace

    from cfcam_gpu.app import paper_protocol
    from cfcam_gpu.app.options import CLIError

    args = SimpleNamespace(protocol="paper", overwrite=False)
    with pytest.raises(CLIError, match="--protocol: 'paper' runs in one process"):
        paper_protocol.evaluate(args, SimpleNamespace(distributed=True, world_size=2), None, None, "2", None, [],
                                ["gradcam"], "cpu", 8, tmp_path, print)
    assert not list(tmp_path.iterdir())
