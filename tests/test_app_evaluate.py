"""evaluate.py end to end: the demo on 2 bundled photos, image folders with a corrupt file, usage errors,
and wiring into a parent CLI through add_arguments / run."""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
from PIL import Image

from cfcam_gpu.app import evaluate

SCALARS = ("average_drop", "increase_in_confidence", "average_drop_threshold",
           "increase_in_confidence_threshold", "deletion_auc", "insertion_auc")
FILES = ("metrics.json", "metrics.md", "per_image.json", "curves.npz", "deletion_insertion.png",
         "robustness.png", "comparison.png")


def _finite_stat(stat):
    return (math.isfinite(stat["mean"]) and len(stat["ci95"]) == 2
            and all(v is not None and math.isfinite(v) for v in stat["ci95"])
            and stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1])


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "eval"
    code = evaluate.main(["--demo", "--max-images", "2", "--methods", "cfcam,gradcam,gradcam++",
                          "--steps", "3", "--sigmas", "0.5,1", "--out", str(out), "--quiet"])
    assert code == 0
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    summary = json.loads((out / "metrics.json").read_text())
    assert list(summary) == ["cfcam", "gradcam", "gradcam++"]
    for method, entry in summary.items():
        for key in SCALARS:
            assert _finite_stat(entry[key]), (method, key)
        assert set(entry["robustness"]) == {"0.5", "1"}
        for sigma in entry["robustness"].values():
            assert _finite_stat(sigma["ssim"]) and _finite_stat(sigma["mse"])
        assert entry["n_images"] == 2 and entry["seconds_per_image"] > 0
        assert 0 <= entry["deletion_auc"]["mean"] <= 1 and 0 <= entry["insertion_auc"]["mean"] <= 1
    per_image = json.loads((out / "per_image.json").read_text())
    assert per_image["images"] == ["chelsea", "coffee"]
    assert per_image["classes"] == ["Egyptian cat", "espresso"]
    assert per_image["clusters"]["cfcam"]["n_clusters"] and len(per_image["methods"]["gradcam"]["deletion_auc"]) == 2
    curves = np.load(out / "curves.npz")
    assert curves["gradcam__deletion"].shape == (2, 4) and np.isfinite(curves["gradcam__insertion"]).all()
    md = (out / "metrics.md").read_text()
    assert "| CF-CAM |" in md and "Grad-CAM++" in md and "percentile-bootstrap" in md and "±" not in md
    grid = np.asarray(Image.open(out / "comparison.png"))
    assert grid.shape[0] > 2 * 224 and grid.shape[1] > 4 * 224  # 2 rows; input + 3 methods


def test_paths_with_a_corrupt_file_and_gradient_free_method(tmp_path, photos):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("chelsea", "coffee"):
        Image.fromarray(photos[name][:160, :160]).save(folder / f"{name}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "eval"
    code = evaluate.main([str(folder), "--model", "resnet18", "--layer", "layer4", "--methods",
                          "layercam,ablationcam", "--steps", "2", "--sigmas", "0.25", "--out", str(out), "--quiet",
                          "--device", "cpu"])
    assert code == 1  # one unreadable file, the rest evaluated
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["ablationcam"]["robustness"] is None and summary["layercam"]["robustness"]["0.25"]
    assert summary["ablationcam"]["n_images"] == 2
    assert "n/a (gradient-free)" in (out / "metrics.md").read_text()


@pytest.mark.parametrize("argv,message", [
    (["--demo", "--methods", "gradcam,magic"], "--methods"),
    ([], "PATH"),
    (["--demo", "--steps", "0"], "--steps"),
    (["--demo", "--sigmas", "a,b"], "--sigmas"),
    (["nowhere/at/all"], "PATH"),
])
def test_usage_errors(tmp_path, capsys, argv, message):
    assert evaluate.main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_wires_into_a_parent_cli(tmp_path):
    parser = argparse.ArgumentParser(prog="cfcam")
    sub = parser.add_subparsers(dest="command", required=True)
    evaluate.add_arguments(sub.add_parser("evaluate"))
    args = parser.parse_args(["evaluate", "--demo", "--max-images", "1", "--methods", "hirescam", "--steps", "1",
                              "--sigmas", "0.1", "--out", str(tmp_path / "o"), "--quiet", "--grid-images", "1"])
    assert evaluate.run(args) == 0
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["hirescam"]["n_images"] == 1


def test_a_used_output_folder_needs_overwrite_and_skipped_images_are_recorded(tmp_path, photos, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photos["chelsea"][:96, :96]).save(folder / "chelsea.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "eval"
    args = [str(folder), "--model", "resnet18", "--methods", "gradcam", "--steps", "1", "--sigmas", "0.5",
            "--device", "cpu", "--grid-images", "1", "--quiet", "--out", str(out)]
    assert evaluate.main(args) == 1
    per_image = json.loads((out / "per_image.json").read_text())
    assert per_image["images"] == ["chelsea"]
    ((path, error),) = [(row["path"], row["error"]) for row in per_image["skipped"]]
    assert path.endswith("broken.jpg") and error.startswith("not a readable image")
    capsys.readouterr()
    before = (out / "metrics.json").stat().st_mtime_ns
    assert evaluate.main(args) == 2  # DIR already holds an evaluation: refused, left as it was
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "metrics.json").stat().st_mtime_ns == before
    (out / "robustness.png").unlink()  # a stale file of the first run must not survive --overwrite...
    (out / "comparison.png").write_bytes(b"stale")
    assert evaluate.main([*args, "--overwrite"]) == 1
    assert (out / "metrics.json").stat().st_mtime_ns != before
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG" and (out / "robustness.png").is_file()


def test_every_registry_method_is_accepted_and_robustness_is_na_without_layer_gradients(tmp_path, photos):
    from cfcam_gpu.methods import METHODS

    from cfcam_gpu.app.scores import robustness_free

    assert evaluate.parse_methods(",".join(METHODS)) == list(METHODS)
    free = {name for name in METHODS if robustness_free(name)}
    assert {"scorecam", "ablationcam", "eigencam", "kpcacam", "fullgrad"} <= free
    assert not free & {"cfcam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigengradcam"}
    assert {name: robustness_free(name) for name in ("fem", "randomcam", "shapleycam", "sess")} == {
        "fem": "gradient-free", "randomcam": "gradient-free",
        "shapleycam": "not a function of the layer's gradients alone",
        "sess": "not a function of the layer's gradients alone"}
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photos["chelsea"][:96, :96]).save(folder / "chelsea.png")
    out = tmp_path / "eval"
    code = evaluate.main([str(folder), "--model", "resnet18", "--methods", "eigencam,fullgrad,eigengradcam",
                          "--steps", "1", "--sigmas", "0.5", "--device", "cpu", "--grid-images", "1", "--quiet",
                          "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["eigencam"]["robustness"] is None and summary["fullgrad"]["robustness"] is None
    assert summary["eigengradcam"]["robustness"]["0.5"]
    assert all(math.isfinite(summary["fullgrad"][k]["mean"]) for k in SCALARS)
    md = (out / "metrics.md").read_text()
    assert "| Eigen-CAM | n/a (gradient-free)" in md and "| FullGrad | n/a (no target-layer gradients)" in md


def test_smoothing_flags_change_the_maps_and_are_recorded(tmp_path, photos):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photos["chelsea"][:96, :96]).save(folder / "chelsea.png")
    curves = {}
    for flag in ("", "--aug-smooth", "--eigen-smooth"):
        out = tmp_path / ("eval" + flag)
        argv = [str(folder), "--model", "resnet18", "--methods", "gradcam", "--steps", "4", "--sigmas", "0.5",
                "--device", "cpu", "--grid-images", "1", "--quiet", "--out", str(out)] + ([flag] if flag else [])
        assert evaluate.main(argv) == 0
        curves[flag] = np.load(out / "curves.npz")["gradcam__deletion"]
        if flag:
            assert flag in (out / "metrics.md").read_text()
    assert not np.allclose(curves[""], curves["--aug-smooth"])
    assert not np.allclose(curves[""], curves["--eigen-smooth"])


@pytest.mark.parametrize("aug,eigen", [(False, False), (True, False), (False, True), (True, True)])
def test_robustness_perturbs_the_map_that_was_asked_for(aug, eigen):
    """score_methods' robustness perturbs smoothed_map_fn's map, whose clean map is the engine's
    (smoothed) map; a share of a batch (torchrun) gets the whole batch's values, aug copies included."""
    import torch
    import torchvision

    from cfcam_gpu.app.scores import _robustness, features, score_methods, smoothed_map_fn
    from cfcam_gpu.methods import build_method

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(3, 3, 48, 48)
    acts, grads, tgt, _ = features(model, "layer3", x)
    engine = build_method("gradcam++", model, "layer3")
    fn, a, g, copies = smoothed_map_fn(engine, model, "layer3", x, tgt, acts, grads, aug, eigen)
    assert copies == (6 if aug else 1) and a.shape[0] == 3 * copies
    want = engine(x, tgt, aug_smooth=aug, eigen_smooth=eigen).cams
    torch.testing.assert_close(fn(a, g).cams, want, rtol=0, atol=1e-5)
    if not (aug or eigen):
        torch.testing.assert_close(want, build_method("gradcam++", model, "layer3")(x, tgt).cams)
    gen = torch.Generator().manual_seed(0)  # score_methods' seed
    whole = _robustness(fn, a, g, (0.5,), gen, (48, 48), [0, 1, 2], 3, copies)[0.5]
    fn2, a2, g2, _ = smoothed_map_fn(engine, model, "layer3", x[1:], tgt[1:], acts[1:], grads[1:], aug, eigen)
    share = _robustness(fn2, a2, g2, (0.5,), gen.manual_seed(0), (48, 48), [1, 2], 3, copies)[0.5]
    torch.testing.assert_close(share.mse, whole.mse[1:], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(share.ssim, whole.ssim[1:], rtol=1e-4, atol=1e-7)
    scored = score_methods(model, "layer3", x, ["gradcam++"], (0.5,) * 3, (0.2,) * 3, [0, 1, 2], 3, steps=1,
                           sigmas=(0.5,), aug_smooth=aug, eigen_smooth=eigen)["per_image"]["gradcam++"]
    np.testing.assert_allclose(scored["robustness"][0.5]["mse"], whole.mse.numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(scored["robustness"][0.5]["ssim"], whole.ssim.numpy(), rtol=1e-5, atol=1e-9)


def test_randomcam_share_of_a_batch_gets_its_one_process_weights():
    """evaluate's randomcam weights come from the seed and the global batch, whatever the global random
    state: a torchrun share of a batch gets the maps of the one-process run, another seed other maps."""
    import torch
    import torchvision

    from cfcam_gpu.app.scores import score_methods

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = torch.randn(5, 3, 32, 32)

    def cams(images, positions, seed=0):
        torch.manual_seed(len(positions))  # the global state must not matter
        return score_methods(model, "layer3", images, ["randomcam"], (0.5,) * 3, (0.2,) * 3, positions, 5,
                             steps=1, sigmas=(), batch_size=3, seed=seed)["cams"]["randomcam"]

    whole = cams(x, [0, 1, 2, 3, 4])
    torch.testing.assert_close(cams(x[[1, 2, 4]], [1, 2, 4]), whole[[1, 2, 4]], rtol=0, atol=1e-6)
    assert not torch.equal(cams(x, [0, 1, 2, 3, 4], seed=1), whole)
    assert whole.amax((1, 2)).gt(0).any()


def test_intervals_stay_within_each_quantity_range():
    from cfcam_gpu.app import report

    ones = [1.0] * 7 + [0.1]  # SSIM-like values near 1: a t interval exceeds 1
    result = {"targets": [0] * 8, "seconds": {"m": {"cam": 1.0}}, "per_image": {"m": {
        "average_drop": [0.0] * 7 + [100.0], "increase_in_confidence": [0.0] * 7 + [100.0],
        "average_drop_threshold": [0.0] * 7 + [100.0], "increase_in_confidence_threshold": [100.0] * 7 + [0.0],
        "deletion_auc": [0.0] * 7 + [1.0], "insertion_auc": ones,
        "robustness": {0.5: {"ssim": ones, "mse": [0.0] * 7 + [0.3]}}}}}
    entry = report.summarize(result, ["m"])["m"]
    bounds = {"average_drop": (0, 100), "increase_in_confidence": (0, 100), "average_drop_threshold": (0, 100),
              "increase_in_confidence_threshold": (0, 100), "deletion_auc": (0, 1), "insertion_auc": (0, 1)}
    stats = [(entry[k], b) for k, b in bounds.items()]
    stats += [(entry["robustness"]["0.5"]["ssim"], (-1, 1)), (entry["robustness"]["0.5"]["mse"], (0, math.inf))]
    for stat, (low, high) in stats:
        assert low <= stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1] <= high, stat
    assert report.summarize(result, ["m"]) == report.summarize(result, ["m"])  # seeded


def test_road_is_optional_and_reported_per_method(tmp_path, photos, monkeypatch):
    import cfcam_gpu.road as road_module

    real_road, calls = road_module.road, []

    def quick_road(*args, **kwargs):  # ROAD makes 18 imputations per image: keep the test short
        calls.append(kwargs)
        return real_road(*args, **kwargs, iterations=2, percentiles=(30, 70))

    monkeypatch.setattr(road_module, "road", quick_road)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("chelsea", "coffee"):
        Image.fromarray(photos[name][:96, :96]).save(folder / f"{name}.png")
    base = [str(folder), "--model", "resnet18", "--methods", "gradcam,eigencam", "--steps", "1", "--sigmas", "0.5",
            "--device", "cpu", "--grid-images", "1", "--quiet", "--batch-size", "1"]
    assert evaluate.main([*base, "--out", str(tmp_path / "plain")]) == 0 and not calls  # off by default
    assert "road_combined" not in json.loads((tmp_path / "plain" / "metrics.json").read_text())["gradcam"]
    assert evaluate.main([*base, "--metrics", "road", "--out", str(tmp_path / "road")]) == 0
    assert len(calls) == 4 and all(c["noise"] == 0.01 for c in calls)  # 2 methods x 2 batches
    summary = json.loads((tmp_path / "road" / "metrics.json").read_text())
    per_image = json.loads((tmp_path / "road" / "per_image.json").read_text())
    for method in ("gradcam", "eigencam"):
        for key in ("road_combined", "road_morf", "road_lerf"):
            assert _finite_stat(summary[method][key]), (method, key)
            assert len(per_image["methods"][method][key]) == 2
        values = per_image["methods"][method]
        assert summary[method]["road_combined"]["mean"] == pytest.approx(
            np.mean(np.subtract(values["road_lerf"], values["road_morf"]) / 2))
    md = (tmp_path / "road" / "metrics.md").read_text()
    assert "| Method | ROAD combined ↑ | MoRF ↓ | LeRF ↑ |" in md and "--metrics road" in md
    assert evaluate.main([*base, "--metrics", "roads", "--out", str(tmp_path / "bad")]) == 2


def test_road_of_a_share_of_a_batch_equals_the_whole_batch_value():
    """Under torchrun a rank holds some rows of a global batch: each gets its one-process ROAD value."""
    import torch
    import torchvision

    from cfcam_gpu.app.scores import _road

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    x, cams, tgt = torch.randn(3, 3, 32, 32), torch.rand(3, 4, 4), torch.tensor([0, 3, 1])
    whole = _road(model, x, cams, tgt, [0, 1, 2], 3, seed=4, batch=2, batch_size=8)
    share = _road(model, x[1:], cams[1:], tgt[1:], [1, 2], 3, seed=4, batch=2, batch_size=8)
    for key, values in share.items():
        assert values == pytest.approx(whole[key][1:], abs=1e-5), key
    other = _road(model, x, cams, tgt, [0, 1, 2], 3, seed=4, batch=3, batch_size=8)
    assert other["road_combined"] != whole["road_combined"]  # the noise depends on the batch


def test_a_vision_transformer_is_evaluated_at_its_default_layer_with_the_token_reshape(tmp_path, photos):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(photos["chelsea"][:96, :96]).save(folder / "chelsea.png")
    out = tmp_path / "eval"
    assert evaluate.main([str(folder), "--model", "timm:vit_tiny_patch16_224", "--methods", "gradcam,cfcam",
                          "--steps", "1", "--sigmas", "0.5", "--device", "cpu", "--grid-images", "1", "--quiet",
                          "--out", str(out)]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert all(_finite_stat(summary[m]["deletion_auc"]) for m in ("gradcam", "cfcam"))
    assert summary["gradcam"]["robustness"]["0.5"]["ssim"]["mean"] is not None
    assert "blocks.-1.norm1" in (out / "metrics.md").read_text()
