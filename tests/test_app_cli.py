"""The command line: ``cfcam explain`` run in-process through ``main([...])`` (which returns the exit code),
plus one subprocess run of ``python -m cfcam_gpu explain --demo`` with the real pretrained model.

Most tests use a random torchvision ResNet18 (fast to build, no weights needed) on small PNGs cut from the
bundled photos; the demo test checks the real EfficientNet-Lite0 end to end.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cfcam_gpu.app import cli
from cfcam_gpu.app.cli import main
from cfcam_gpu.app.data import bundled_images
from cfcam_gpu.app.outputs import output_names
from helpers import manifest, write_png

FAST = ["--model", "resnet18", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return dict(bundled_images())



@pytest.fixture
def three_images(tmp_path, photos) -> Path:
    folder = tmp_path / "images"
    for name in ("chelsea", "coffee", "rocket"):
        write_png(folder / f"{name}.png", photos[name])
    return folder


# ---------------------------------------------------------------------------------------------------
# The demo, with the real model, through the module entry point.

@pytest.mark.slow
def test_python_m_demo_end_to_end(tmp_path, photos):
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-m", "cfcam_gpu", "explain", "--demo", "--out", str(out),
                           "--json", "--workers", "0", "--batch-size", "5"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # stdout holds only the JSON summary
    n = len(photos)
    assert summary["n_images"] == summary["n_ok"] == n and summary["n_failed"] == 0
    assert summary["model"] == "efficientnet_lite0" and summary["layer"] == "blocks.6"
    assert summary["method"] == "cfcam" and summary["device"] == "cpu"
    assert summary["images_per_s"] > 0 and Path(summary["out"]) == out.resolve()

    rows = manifest(out)
    assert [row["path"] for row in rows] == [f"bundled:{name}" for name in photos]
    chelsea = rows[0]
    assert 281 <= chelsea["predicted"] <= 285, chelsea  # a cat class ("Egyptian cat")
    assert "cat" in chelsea["predicted_name"].lower()
    assert rows[1]["predicted_name"] == "espresso"
    for row, name in zip(rows, photos):
        assert row["status"] == "ok" and row["error"] is None
        assert row["files"] == {"overlay": f"{name}_cfcam.png", "cam": f"{name}_cfcam.npy"}
        assert row["target"] == row["predicted"] and 0 < row["probability"] <= 1
        assert row["n_clusters"] >= 0 and 0 <= row["noise_channels"] <= 1280 and row["eps"] >= 0
        cam = np.load(out / row["files"]["cam"])
        assert cam.shape == (7, 7) and cam.dtype == np.float32
        assert cam.min() >= 0 and cam.max() <= 1
        assert row["blank"] == (cam.max() == 0)
        with Image.open(out / row["files"]["overlay"]) as png:  # the photo's own size
            assert png.size == (photos[name].shape[1], photos[name].shape[0]) and png.mode == "RGB"
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 3 * 224 and sheet.height > 3 * 224  # 4 x 3 tiles for 10 photos
    assert json.loads((out / "run.json").read_text())["layer"] == "blocks.6"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------
# Folders, failures, output layout.

def test_folder_run_writes_outputs_and_json_summary(three_images, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["explain", str(three_images), "--out", str(out), "--batch-size", "2", "--json", *FAST])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_images"] == 3 and summary["n_ok"] == 3 and summary["layer"] == "layer4"
    for key in ("seconds", "images_per_s", "out", "model", "layer", "method", "device"):
        assert key in summary
    rows = manifest(out)
    assert [Path(r["path"]).name for r in rows] == ["chelsea.png", "coffee.png", "rocket.png"]
    for row in rows:
        stem = Path(row["path"]).stem
        assert row["files"] == {"overlay": f"{stem}_cfcam.png", "cam": f"{stem}_cfcam.npy"}
        assert np.load(out / row["files"]["cam"]).shape == (7, 7)
        assert row["predicted_name"] and isinstance(row["n_clusters"], int)
    assert (out / "contact_sheet.png").is_file()


def test_gradcam_method_and_fixed_target(three_images, tmp_path):
    out = tmp_path / "out"
    assert main(["explain", str(three_images / "chelsea.png"), "--out", str(out), "--method", "gradcam",
                 "--target", "281", *FAST]) == 0
    (row,) = manifest(out)
    assert row["files"] == {"overlay": "chelsea_gradcam.png", "cam": "chelsea_gradcam.npy"}
    assert row["target"] == 281 and row["target_name"] == "tabby"
    assert row["n_clusters"] is None and row["noise_channels"] is None and row["eps"] is None


@pytest.mark.parametrize("method, shape", [("segeigencam", (7, 7)), ("refinecam", (224, 224))])
def test_drop_in_methods_on_the_command_line(three_images, tmp_path, method, shape):
    """Methods added for the pytorch-grad-cam drop-in are reachable by --method and give a map in [0, 1]
    (refinecam at the model's input size, the others at the layer's)."""
    out = tmp_path / "out"
    assert main(["explain", str(three_images / "chelsea.png"), "--out", str(out), "--method", method,
                 "--target", "281", *FAST]) == 0
    (row,) = manifest(out)
    assert row["status"] == "ok" and row["target"] == 281
    assert row["files"] == {"overlay": f"chelsea_{method}.png", "cam": f"chelsea_{method}.npy"}
    cam = np.load(out / row["files"]["cam"])
    assert cam.shape == shape and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() == pytest.approx(1) and cam.std() > 0.01


def test_randomcam_maps_are_seeded_by_seed_and_batch(three_images, tmp_path):
    """--method randomcam draws its weights from --seed and the batch, whatever the process's random state:
    the same command gives the same maps, another --seed others; a map is all zeros or peaks at 1."""
    def maps(name, *extra):
        torch.manual_seed(len(name))  # the global state must not matter
        out = tmp_path / name
        assert main(["explain", str(three_images), "--out", str(out), "--method", "randomcam", "--batch-size",
                     "2", *extra, *FAST]) == 0
        rows = manifest(out)
        assert [r["status"] for r in rows] == ["ok"] * 3
        return [np.load(out / r["files"]["cam"]) for r in sorted(rows, key=lambda r: r["path"])]

    first, again, other = maps("a"), maps("bb"), maps("c", "--seed", "1")
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))
    for cam in first + other:
        assert cam.min() >= 0 and cam.max() in (0, 1)


def test_corrupt_file_is_reported_and_the_rest_explained(three_images, tmp_path, capsys):
    (three_images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    # batch size 2: "broken.jpg" shares its batch with "chelsea.png"
    code = main(["explain", str(three_images), "--out", str(out), "--batch-size", "2", *FAST])
    assert code == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "Traceback" not in err
    rows = {Path(r["path"]).name: r for r in manifest(out)}
    assert set(rows) == {"broken.jpg", "chelsea.png", "coffee.png", "rocket.png"}
    assert rows["broken.jpg"]["status"] == "error" and rows["broken.jpg"]["error"]
    for name in ("chelsea", "coffee", "rocket"):
        assert rows[f"{name}.png"]["status"] == "ok"
        assert (out / f"{name}_cfcam.png").is_file() and (out / f"{name}_cfcam.npy").is_file()


def test_a_failing_image_does_not_sink_its_batch(three_images, tmp_path, monkeypatch, capsys):
    """When the engine raises for a batch (say a NaN in one image), its images are retried one by one."""
    Image.new("RGB", (64, 64), (255, 255, 255)).save(three_images / "blank.png")

    from cfcam_gpu.engine import CFCAM
    from cfcam_gpu.methods import METHODS

    class PickyCFCAM(CFCAM):
        def __call__(self, images, targets=None, **options):
            flat = images.flatten(2).std(dim=2).amax(dim=1) < 1e-6  # a one-colour image
            if bool(flat.any()):
                raise ValueError(f"activations: expected finite values, got NaN or inf in image index "
                                 f"{int(flat.nonzero()[0])}")
            return super().__call__(images, targets, **options)

    monkeypatch.setitem(METHODS, "cfcam", PickyCFCAM)
    out = tmp_path / "out"
    assert main(["explain", str(three_images), "--out", str(out), "--batch-size", "4", *FAST]) == 1
    assert "blank.png" in capsys.readouterr().err
    rows = {Path(r["path"]).name: r for r in manifest(out)}
    assert rows["blank.png"]["status"] == "error" and "finite" in rows["blank.png"]["error"]
    assert all(rows[f"{n}.png"]["status"] == "ok" for n in ("chelsea", "coffee", "rocket"))
    assert not (out / "blank_cfcam.png").exists()


def test_duplicate_stems_get_a_deterministic_hash(tmp_path, photos):
    write_png(tmp_path / "data" / "a" / "cat.png", photos["chelsea"])
    write_png(tmp_path / "data" / "b" / "Cat.png", photos["chelsea"][:, ::-1])
    write_png(tmp_path / "data" / "coffee.png", photos["coffee"])
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "data"), "--out", str(out), *FAST]) == 0
    rows = {r["path"]: r for r in manifest(out)}  # relative to the input folder
    sha = {rel: hashlib.sha1(rel.encode()).hexdigest()[:8] for rel in ("a/cat.png", "b/Cat.png")}
    assert rows["a/cat.png"]["files"]["overlay"] == f"cat_{sha['a/cat.png']}_cfcam.png"
    assert rows["b/Cat.png"]["files"]["overlay"] == f"Cat_{sha['b/Cat.png']}_cfcam.png"
    assert rows["coffee.png"]["files"]["overlay"] == "coffee_cfcam.png"  # unique stems stay as they are
    for row in rows.values():
        assert (out / row["files"]["overlay"]).is_file() and (out / row["files"]["cam"]).is_file()


def test_output_names_unit():
    keys = ["/x/a/cat.png", "/x/b/cat.jpg", "/x/dog.png", "/y/dog.png"]
    names = output_names(keys, [Path(k).stem for k in keys])
    assert names[0] != names[1] and names[2] != names[3]
    assert names[0].startswith("cat_") and names[2].startswith("dog_")
    assert names == output_names(keys, [Path(k).stem for k in keys])  # deterministic
    # the hash depends on the path below the shared folder, not on where the data set lives
    moved = output_names(["/elsewhere" + k for k in keys], [Path(k).stem for k in keys])
    assert moved == names
    assert output_names(["/a/x.png"], ["x"]) == ["x"]


# ---------------------------------------------------------------------------------------------------
# Resume / overwrite.

def test_resume_recomputes_only_what_is_missing(three_images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["explain", str(three_images), "--out", str(out), "--batch-size", "3", *FAST]
    assert main(args) == 0
    rows = manifest(out)
    assert len(rows) == 3
    # Simulate an interruption: rocket's row was half written and its .npy never made it.
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])
    (out / "rocket_cfcam.npy").unlink()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("c*_cfcam.*")}

    explained = []

    from cfcam_gpu.engine import CFCAM
    from cfcam_gpu.methods import METHODS

    class CountingCFCAM(CFCAM):
        def __call__(self, images, targets=None, **options):
            explained.append(images.shape[0])
            return super().__call__(images, targets, **options)

    monkeypatch.setitem(METHODS, "cfcam", CountingCFCAM)
    assert main(args) == 2  # neither --resume nor --overwrite: refuses
    assert main([*args, "--resume"]) == 0
    assert explained == [1]  # only rocket
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("c*_cfcam.*")} == mtimes
    assert (out / "rocket_cfcam.npy").is_file()
    rows = manifest(out)
    assert sorted(Path(r["path"]).name for r in rows) == ["chelsea.png", "coffee.png", "rocket.png"]
    assert all(r["status"] == "ok" for r in rows)

    explained.clear()
    assert main([*args, "--resume"]) == 0 and explained == []  # nothing left to do
    assert main([*args, "--overwrite"]) == 0 and explained == [3]
    assert len(manifest(out)) == 3


def test_resume_refuses_other_settings(three_images, tmp_path, capsys):
    out = tmp_path / "out"
    image = str(three_images / "coffee.png")
    assert main(["explain", image, "--out", str(out), *FAST]) == 0
    assert main(["explain", image, "--out", str(out), "--resume", "--method", "gradcam", *FAST]) == 2
    assert "method" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Models and weights.

@pytest.fixture(scope="module")
def resnet50_two_class(tmp_path_factory) -> Path:
    """The seed's setting: a fine-tuned 2-class ResNet50 state dict (random here), saved as best_model.pth."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=2)
    path = tmp_path_factory.mktemp("weights") / "best_model.pth"
    torch.save(model.state_dict(), path)
    return path


def test_seed_resnet50_two_classes(resnet50_two_class, three_images, tmp_path):
    out = tmp_path / "out"
    code = main(["explain", str(three_images / "chelsea.png"), str(three_images / "coffee.png"),
                 "--model", "resnet50", "--num-classes", "2", "--weights", str(resnet50_two_class),
                 "--layer", "layer4", "--out", str(out), "--workers", "0", "--quiet"])
    assert code == 0
    rows = manifest(out)
    assert len(rows) == 2
    for row in rows:
        assert row["status"] == "ok" and row["predicted"] in (0, 1)
        assert row["predicted_name"] == f"class_{row['predicted']}"
        cam = np.load(out / row["files"]["cam"])
        assert cam.shape == (7, 7) and cam.dtype == np.float32 and 0 <= cam.min() <= cam.max() <= 1
    assert json.loads((out / "run.json").read_text())["layer"] == "layer4"


def test_mismatched_weights_name_the_keys(resnet50_two_class, three_images, tmp_path, capsys):
    image = str(three_images / "chelsea.png")
    # 2-class weights into the 1000-class model: the classifier's shapes differ
    code = main(["explain", image, "--model", "resnet50", "--weights", str(resnet50_two_class),
                 "--out", str(tmp_path / "a"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "fc.weight" in err and "num_classes" in err and "Traceback" not in err
    # ResNet50 weights into a ResNet18: missing / unexpected keys are named
    code = main(["explain", image, "--model", "resnet18", "--num-classes", "2",
                 "--weights", str(resnet50_two_class), "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "unexpected keys" in err and "layer1.0.conv3.weight" in err
    assert not (tmp_path / "a").exists()  # the model is checked before the output folder is touched


def test_missing_weights_file(three_images, tmp_path, capsys):
    code = main(["explain", str(three_images), "--weights", str(tmp_path / "nope.pth"),
                 "--out", str(tmp_path / "out"), *FAST])
    assert code == 2 and "nope.pth" in capsys.readouterr().err


def test_unknown_model_lists_choices(three_images, tmp_path, capsys):
    code = main(["explain", str(three_images), "--out", str(tmp_path / "out"), "--quiet",
                 "--model", "resnet5O"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("cfcam: error: --model:") and "'resnet50'" in err
    assert err.count("\n") == 1  # one line, no traceback


def test_unknown_layer_lists_children(three_images, tmp_path, capsys):
    code = main(["explain", str(three_images), "--out", str(tmp_path / "out"), "--layer", "layer9", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "--layer" in err and "'layer4'" in err and "'fc'" in err
    assert err.count("\n") == 1


def test_layer_without_feature_map_is_a_usage_error(three_images, tmp_path, capsys):
    code = main(["explain", str(three_images), "--out", str(tmp_path / "out"), "--layer", "fc", *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "--layer" in err and "Traceback" not in err


def test_torchscript_model_is_refused_clearly(three_images, tmp_path, capsys):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3))
    path = tmp_path / "net.pt"
    torch.jit.script(net).save(str(path))
    code = main(["explain", str(three_images), "--model", str(path), "--out", str(tmp_path / "out"),
                 *FAST[2:]])
    err = capsys.readouterr().err
    assert code == 2 and "TorchScript" in err and "state_dict" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------
# Inputs and options.

def test_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    code = main(["explain", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), *FAST])
    assert code == 2 and "no images found" in capsys.readouterr().err


def test_missing_path_and_no_input(tmp_path, capsys):
    assert main(["explain", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), *FAST]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["explain", "--out", str(tmp_path / "out"), *FAST]) == 2
    assert "--demo" in capsys.readouterr().err


def test_txt_list_input(three_images, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("# two of them\nimages/coffee.png\nimages/rocket.png\n")
    out = tmp_path / "out"
    assert main(["explain", str(listing), "--out", str(out), *FAST]) == 0
    assert [Path(r["path"]).name for r in manifest(out)] == ["coffee.png", "rocket.png"]


@pytest.mark.parametrize("target", ["cat", "-1", "1000", "1.5"])
def test_bad_target(three_images, tmp_path, capsys, target):
    code = main(["explain", str(three_images), "--out", str(tmp_path / "out"), "--target", target, *FAST])
    assert code == 2 and "--target" in capsys.readouterr().err


def test_unwritable_output_folder(three_images, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    code = main(["explain", str(three_images), "--out", str(blocker / "out"), *FAST])
    assert code == 2 and "--out" in capsys.readouterr().err
    assert main(["explain", str(three_images), "--out", str(blocker), *FAST]) == 2


def test_bad_device_and_batch_size(three_images, tmp_path, capsys):
    assert main(["explain", str(three_images), "--out", str(tmp_path / "o"), "--device", "tpu", *FAST]) == 2
    assert main(["explain", str(three_images), "--out", str(tmp_path / "o"), "--batch-size", "0", *FAST]) == 2
    if not torch.cuda.is_available():
        assert main(["explain", str(three_images), "--out", str(tmp_path / "o"), "--device", "cuda",
                     *FAST]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_usage_errors_and_help_return_codes(capsys):
    assert main([]) == 2
    assert main(["explain", "--resume", "--overwrite", "x"]) == 2  # mutually exclusive
    assert main(["explain", "--help"]) == 0
    assert "--num-classes" in capsys.readouterr().out


def test_subcommands_are_registered_from_a_table(monkeypatch, capsys):
    assert "explain" in cli.SUBCOMMANDS

    def add_arguments(parser):
        parser.add_argument("--k", type=int, default=3)

    def run(args):
        print(f"k={args.k}")
        return 5

    monkeypatch.setitem(cli.SUBCOMMANDS, "evaluate", cli.Subcommand("evaluate things", add_arguments, run))
    assert main(["evaluate", "--k", "7"]) == 5
    assert capsys.readouterr().out == "k=7\n"


def test_speed_options_reach_the_engine(three_images, tmp_path, monkeypatch, capsys):
    """--amp bf16 --channels-last --compile: the run succeeds, the engine got the options (torch.compile
    is swapped for its eager backend here, to keep the test fast), and --resume refuses another --amp."""
    import cfcam_gpu.engine as engine_mod

    real_compile, compiled = torch.compile, []

    def eager_compile(model, **kwargs):
        compiled.append(kwargs)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(engine_mod.torch, "compile", eager_compile)
    seen = []
    real_init = engine_mod.CFCAM.__init__

    def spy_init(self, *args, **kwargs):
        seen.append(kwargs)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(engine_mod.CFCAM, "__init__", spy_init)
    out = tmp_path / "out"
    image = str(three_images / "chelsea.png")
    assert main(["explain", image, "--out", str(out), "--amp", "bf16", "--channels-last", "--compile", *FAST]) == 0
    assert seen == [{"amp": "bfloat16", "channels_last": True, "compile": True}] and compiled == [{}]
    (row,) = manifest(out)
    cam = np.load(out / row["files"]["cam"])
    assert cam.shape == (7, 7) and np.isfinite(cam).all() and cam.max() == pytest.approx(1.0)
    assert main(["explain", image, "--out", str(out), "--resume", *FAST]) == 2
    assert "amp" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# What a new user meets.

def test_help_names_the_real_default_layer(capsys):
    assert main(["explain", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "'blocks.6' for efficientnet_lite0" in text and "'bn2' for efficientnet_lite0" not in text


@pytest.fixture(scope="module")
def pickled_model(tmp_path_factory) -> Path:
    """What torch.save(model) writes: the whole pickled module, not a state dict."""
    import torchvision

    path = tmp_path_factory.mktemp("whole") / "model.pth"
    torch.save(torchvision.models.resnet18(num_classes=2), path)
    return path


def test_weights_that_are_a_pickled_model_say_so_in_one_line(pickled_model, three_images, tmp_path, capsys):
    code = main(["explain", str(three_images), "--model", "resnet18", "--num-classes", "2",
                 "--weights", str(pickled_model), "--out", str(tmp_path / "out"), *FAST[2:]])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "pickled model" in err and "state_dict()" in err and "\x1b" not in err
    assert "weights_only" not in err


def test_weights_that_are_random_bytes_are_not_a_state_dict(three_images, tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 16)
    code = main(["explain", str(three_images), "--weights", str(junk), "--out", str(tmp_path / "out"), *FAST])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "not a PyTorch state dict" in err and "weights_only" not in err and "\x1b" not in err


def test_dangling_symlinks_in_a_folder_are_reported_not_dropped(three_images, tmp_path, capsys):
    (three_images / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (three_images / "loop.jpg").symlink_to(three_images / "loop.jpg")
    out = tmp_path / "out"
    assert main(["explain", str(three_images), "--out", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    rows = {Path(r["path"]).name: r for r in manifest(out)}
    assert rows["gone.jpg"]["status"] == "error" and "broken symbolic link" in rows["gone.jpg"]["error"]
    assert rows["loop.jpg"]["status"] == "error" and "symbolic link loop" in rows["loop.jpg"]["error"]
    assert "gone.jpg" in err and "loop.jpg" in err
    assert sum(r["status"] == "ok" for r in rows.values()) == 3


def test_a_file_that_is_not_an_image_says_so(three_images, tmp_path):
    (three_images / "notes.jpg").write_text("a text file with the wrong extension")
    out = tmp_path / "out"
    assert main(["explain", str(three_images), "--out", str(out), *FAST]) == 1
    row = next(r for r in manifest(out) if r["path"].endswith("notes.jpg"))
    assert row["status"] == "error" and row["error"].startswith("not a readable image (")
    assert "decode_avif" not in row["error"] and "gif" not in row["error"].lower()


def test_manifest_rows_are_in_input_order_within_a_batch(tmp_path, photos):
    folder = tmp_path / "data"
    write_png(folder / "a.png", photos["chelsea"])
    (folder / "b.jpg").write_bytes(b"not a jpeg")  # fails between two good images of one batch
    write_png(folder / "c.png", photos["coffee"])
    out = tmp_path / "out"
    assert main(["explain", str(folder), "--out", str(out), "--batch-size", "3", *FAST]) == 1
    assert [Path(r["path"]).name for r in manifest(out)] == ["a.png", "b.jpg", "c.png"]


def test_overlays_keep_the_original_size_and_the_sheet_its_thumbnails(tmp_path, photos):
    folder = tmp_path / "data"
    folder.mkdir()
    Image.fromarray(photos["chelsea"]).resize((151, 100), Image.BILINEAR).save(folder / "wide.png")
    Image.fromarray(photos["coffee"]).resize((80, 120), Image.BILINEAR).save(folder / "tall.png")
    out = tmp_path / "out"
    assert main(["explain", str(folder), "--out", str(out), *FAST]) == 0
    sizes = {}
    for row in manifest(out):
        with Image.open(out / row["files"]["overlay"]) as png:
            sizes[Path(row["path"]).name] = png.size
        assert row["cam_shape"] == [7, 7]
    assert sizes == {"wide.png": (151, 100), "tall.png": (80, 120)}  # not squashed to 224 x 224
    with Image.open(out / "contact_sheet.png") as sheet:  # 2 tiles of 224 x 224 side by side
        assert sheet.width == 2 * (224 + 4) + 4


def test_usage_errors_come_before_the_weights_are_read(three_images, tmp_path, capsys, monkeypatch):
    """A bad --out, PATH or --layer is reported without reading --weights (which can be a large file)."""
    import cfcam_gpu.app.models as models

    def no_reading(*args, **kwargs):
        raise AssertionError("the weights file was read")

    monkeypatch.setattr(models, "load_weights", no_reading)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    common = ["--model", "resnet18", "--weights", str(weights), "--workers", "0", "--quiet"]
    cases = [([str(three_images), "--out", str(blocker / "out")], "--out"),
             ([str(tmp_path / "missing"), "--out", str(tmp_path / "o")], "PATH"),
             ([str(three_images), "--out", str(tmp_path / "o"), "--layer", "layer9"], "--layer")]
    for argv, option in cases:
        assert main(["explain", *argv, *common]) == 2
        assert capsys.readouterr().err.startswith(f"cfcam: error: {option}")
        assert main(["evaluate", *argv, *common[:4], "--quiet"]) == 2
        assert capsys.readouterr().err.startswith(f"cfcam: error: {option}")


# ---------------------------------------------------------------------------------------------------
# Every registry method, smoothing, transformers.

def test_method_choices_come_from_the_registry_at_run_time(monkeypatch, capsys):
    import cfcam_gpu.methods as methods_mod
    from cfcam_gpu.methods import METHODS

    assert main(["explain", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert all(name in text for name in METHODS)
    monkeypatch.setitem(methods_mod.METHODS, "newcam", METHODS["gradcam"])  # a method merged later
    args = cli.build_parser().parse_args(["explain", "x.png", "--method", "newcam"])
    assert args.method == "newcam"


def test_fullgrad_maps_at_the_input_size(three_images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["explain", str(three_images / "chelsea.png"), "--out", str(out), "--method", "fullgrad",
                 *FAST]) == 0
    (row,) = manifest(out)
    cam = np.load(out / row["files"]["cam"])
    assert row["files"]["cam"] == "chelsea_fullgrad.npy" and cam.shape == (224, 224) == tuple(row["cam_shape"])
    assert np.isfinite(cam).all() and cam.max() == pytest.approx(1.0)
    assert np.asarray(Image.open(out / row["files"]["overlay"])).shape == (96, 96, 3)
    assert json.loads((out / "run.json").read_text())["layer"] is None
    assert (out / "contact_sheet.png").is_file()
    assert main(["explain", str(three_images / "chelsea.png"), "--out", str(tmp_path / "o2"), "--method",
                 "fullgrad", "--layer", "layer4", *FAST]) == 2
    assert "--layer" in capsys.readouterr().err


def test_smoothing_flags_reach_the_engine_and_are_recorded(three_images, tmp_path, capsys):
    image = str(three_images / "chelsea.png")
    plain, eigen, aug = tmp_path / "plain", tmp_path / "eigen", tmp_path / "aug"
    assert main(["explain", image, "--out", str(plain), "--method", "gradcam", *FAST]) == 0
    assert main(["explain", image, "--out", str(eigen), "--method", "gradcam", "--eigen-smooth", *FAST]) == 0
    assert main(["explain", image, "--out", str(aug), "--method", "gradcam", "--aug-smooth", *FAST]) == 0
    cams = {d.name: np.load(d / manifest(d)[0]["files"]["cam"]) for d in (plain, eigen, aug)}
    assert cams["plain"].shape == cams["eigen"].shape == (7, 7) and cams["aug"].shape == (224, 224)
    assert not np.allclose(cams["plain"], cams["eigen"])
    config = json.loads((eigen / "run.json").read_text())
    assert config["eigen_smooth"] is True and config["aug_smooth"] is False
    assert main(["explain", image, "--out", str(eigen), "--resume", "--method", "gradcam", *FAST]) == 2
    assert "eigen_smooth" in capsys.readouterr().err


@pytest.mark.parametrize("model,layer", [("timm:vit_tiny_patch16_224", "blocks.-1.norm1"),
                                         ("timm:swin_tiny_patch4_window7_224", "layers.-1")])
def test_transformers_get_their_default_layer_and_token_reshape(three_images, tmp_path, model, layer):
    out = tmp_path / "out"
    images = [str(three_images / "chelsea.png"), str(three_images / "coffee.png")]
    # random weights from --seed: with seed 0 the random ViT's Grad-CAM of one photo is all zero
    assert main(["explain", *images, "--out", str(out), "--model", model, "--method", "gradcam",
                 "--workers", "0", "--quiet", "--device", "cpu", "--seed", "1"]) == 0
    assert json.loads((out / "run.json").read_text())["layer"] == layer
    for row in manifest(out):
        cam = np.load(out / row["files"]["cam"])
        assert cam.shape == (7, 7) if "swin" in model else cam.shape == (14, 14)
        assert np.isfinite(cam).all() and not row["blank"] and cam.max() == pytest.approx(1.0)


def test_a_layer_named_on_a_transformer_gets_the_reshape_and_token_models_need_a_layer(three_images, tmp_path,
                                                                                     capsys, monkeypatch):
    image = str(three_images / "chelsea.png")
    out = tmp_path / "named"
    assert main(["explain", image, "--out", str(out), "--model", "timm:vit_tiny_patch16_224", "--layer",
                 "blocks.5.norm1", "--method", "gradcam", "--workers", "0", "--quiet", "--device", "cpu"]) == 0
    (row,) = manifest(out)
    assert np.load(out / row["files"]["cam"]).shape == (14, 14) and not row["blank"]
    # a token model of a family without a preset: no silent blank map at the patch embedding
    import cfcam_gpu.reshape as reshape_mod

    def unknown(model):
        raise ValueError("model: no default target layer")

    monkeypatch.setattr(reshape_mod, "default_target", unknown)
    assert main(["explain", image, "--out", str(tmp_path / "o2"), "--model", "timm:vit_tiny_patch16_224",
                 "--workers", "0", "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--layer" in err and "(B, C, h, w)" in err


@pytest.mark.parametrize("model, shape", [("timm:swin_tiny_patch4_window7_224", (56, 56)),
                                          ("timm:vit_tiny_patch16_224", (14, 14))])
def test_a_transformer_layer_that_outputs_maps_is_not_reshaped_as_tokens(three_images, tmp_path, model, shape):
    # patch_embed.proj is a convolution, (B, C, h, w): Swin's stages are (B, h, w, C), ViT's blocks (B, N, D)
    out = tmp_path / "proj"
    assert main(["explain", str(three_images / "chelsea.png"), "--out", str(out), "--model", model,
                 "--layer", "patch_embed.proj", "--method", "gradcam", "--workers", "0", "--quiet", "--device",
                 "cpu", "--seed", "1"]) == 0
    (row,) = manifest(out)
    cam = np.load(out / row["files"]["cam"])
    assert cam.shape == shape and np.isfinite(cam).all() and not row["blank"]


def test_contact_sheet_names_keep_method_names_with_underscores():
    from cfcam_gpu.app.results import output_name

    row = {"files": {"overlay": "my_cat_cfcam_exclude_dead.png"}}
    assert output_name(row, "cfcam_exclude_dead") == "my_cat"
    assert output_name({"files": {"overlay": "a_b_cfcam.png"}}, "cfcam") == "a_b"
