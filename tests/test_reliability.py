"""Runs, files and failures (docs/reliability.md): the lock on DIR, manifest rows that name files outside
DIR, the pixel limit, concurrent engines on one model, the manifest's order and relative paths, names
with line breaks, a full disk, signals, TIFF bit depths, callable targets with aug_smooth, seeded random
weights, fake PNGs and empty batches.

The command line runs in-process (``main([...])`` returns the exit code) on 1-3 small PNGs cut from the
bundled photos, with a random torchvision ResNet18.
"""
from __future__ import annotations

import errno
import functools
import json
import os
import signal
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cfcam_gpu import GradCAM
from cfcam_gpu.app import outputs
from cfcam_gpu.app.cli import main
from cfcam_gpu.app.data import ImageFolderDataset, bundled_images
from helpers import manifest
from helpers import write_png as _write_png

write_png = functools.partial(_write_png, size=64)  # small photos: fast runs

FAST = ["--model", "resnet18", "--workers", "0", "--quiet"]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return dict(bundled_images())



@pytest.fixture
def images(tmp_path, photos) -> Path:
    folder = tmp_path / "images"
    for name in ("chelsea", "coffee", "rocket"):
        write_png(folder / f"{name}.png", photos[name])
    return folder


class Counting:
    """Patches METHODS[method] so that the images each engine call explains are counted."""

    def __init__(self, monkeypatch, method="gradcam"):
        from cfcam_gpu.methods import METHODS

        self.calls: list[int] = []
        base, calls = METHODS[method], self.calls

        class Counted(base):
            def __call__(self, images, targets=None, **options):
                calls.append(images.shape[0])
                return super().__call__(images, targets, **options)

        monkeypatch.setitem(METHODS, method, Counted)


# ---------------------------------------------------------------------------------------------------
# 1. One run at a time per DIR.

def test_a_second_run_into_a_dir_in_use_is_refused(images, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["explain", str(images / "chelsea.png"), "--out", str(out), "--method", "gradcam", *FAST]
    with outputs.output_lock(out):  # another run holds DIR
        assert main(args) == 2
    err = capsys.readouterr().err
    assert "in use by another cfcam run" in err and "Traceback" not in err
    assert not (out / outputs.MANIFEST).exists()
    # a lock file a killed run left behind (nobody holds it) does not block
    assert (out / outputs.LOCK).is_file()
    assert main(args) == 0 and len(manifest(out)) == 1
    with outputs.output_lock(out):  # released at the end of the run
        pass


def test_the_lock_is_released_when_the_holder_dies(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    code = ("import os, sys; from pathlib import Path; from cfcam_gpu.app import outputs; "
            "outputs.output_lock(Path(sys.argv[1])).__enter__(); os._exit(9)")  # killed: no clean-up
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    assert subprocess.run([sys.executable, "-c", code, str(out)], env=env).returncode == 9
    with outputs.output_lock(out):
        pass


# ---------------------------------------------------------------------------------------------------
# 8. Rows name files inside DIR, or are redone.

def test_rows_naming_files_outside_dir_are_dropped_and_redone(images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["explain", str(images / "chelsea.png"), str(images / "coffee.png"), "--out", str(out),
            "--method", "gradcam", *FAST]
    assert main(args) == 0
    outside = tmp_path / "outside.png"
    outside.write_bytes((out / "chelsea_gradcam.png").read_bytes())
    np.save(tmp_path / "outside.npy", np.zeros((2, 2), np.float32))
    rows = manifest(out)
    rows[0]["files"] = {"overlay": "../outside.png", "cam": str(tmp_path / "outside.npy")}
    rows[1]["files"] = {"overlay": "..", "cam": "."}
    (out / outputs.MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in rows))
    counting = Counting(monkeypatch)
    assert main([*args, "--resume"]) == 0
    assert counting.calls == [2]  # both redone
    assert [r["files"]["overlay"] for r in manifest(out)] == ["chelsea_gradcam.png", "coffee_gradcam.png"]

    rows = manifest(out)
    rows[0]["files"] = {"overlay": "..", "cam": "../outside.npy"}
    (out / outputs.MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*args, "--overwrite"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert outside.is_file() and (tmp_path / "outside.npy").is_file()  # never deleted


def test_inside_names_unit():
    good = ["a.png", "x_cfcam.npy", "..a.png"]
    bad = ["", ".", "..", "../a.png", "/tmp/a.png", "sub/a.png", "sub\\a.png", "a\x00.png", 3, None]
    assert [outputs.is_plain_name(n) for n in good] == [True] * len(good)
    assert [outputs.is_plain_name(n) for n in bad] == [False] * len(bad)


# ---------------------------------------------------------------------------------------------------
# 3. The pixel limit.

def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height 8-bit gray pixels, with one tiny IDAT: a few hundred
    bytes that would decode to width * height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
                     + chunk(b"IEND", b""))
    return path


def test_images_above_the_pixel_limit_are_error_rows(images, tmp_path, capsys):
    from cfcam_gpu.app.data import DEFAULT_MAX_PIXELS

    bomb = _png_header_only(images / "bomb.png", 12000, 12000)
    dataset = ImageFolderDataset([bomb, images / "chelsea.png"], size=32)
    sample = dataset[0]
    assert not sample.ok and sample.error == (f"too large: 12000 x 12000 = 144000000 pixels, above the limit of "
                                              f"{DEFAULT_MAX_PIXELS} (--max-pixels)")
    huge = ImageFolderDataset([_png_header_only(images / "huge.png", 40000, 40000)])[0]  # above PIL's own limit
    assert not huge.ok and huge.error.startswith("too large: ")
    assert dataset[1].ok
    assert not ImageFolderDataset([images / "chelsea.png"], size=32, max_pixels=64 * 64 - 1)[0].ok
    assert ImageFolderDataset([images / "chelsea.png"], size=32, max_pixels=64 * 64)[0].ok
    with pytest.raises(ValueError, match="max_pixels: expected a positive int, got 0"):
        ImageFolderDataset([bomb], max_pixels=0)

    out = tmp_path / "out"
    assert main(["explain", str(images / "coffee.png"), str(images / "chelsea.png"), "--out", str(out),
                 "--method", "gradcam", "--max-pixels", "4000", *FAST]) == 1
    rows = manifest(out)
    assert [r["status"] for r in rows] == ["error", "error"]
    assert rows[0]["error"].startswith("too large: 64 x 64 = 4096 pixels, above the limit of 4000")
    assert main(["explain", str(images / "coffee.png"), "--out", str(tmp_path / "o2"), "--max-pixels", "0",
                 *FAST]) == 2
    assert "--max-pixels: expected a positive int, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# 2. Engines on one model from several threads.

class _Slow(nn.Module):
    """Sleeps in its forward (releasing the GIL), so that threads interleave inside a model pass."""

    def forward(self, x):
        time.sleep(0.002)
        return x


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), _Slow(),
                         nn.Conv2d(8, 8, 3, padding=1), _Slow(), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


@pytest.mark.parametrize("train", [True, False])
def test_two_engines_on_one_model_in_two_threads_equal_the_sequential_calls(train):
    model = _small_net().train(train)
    model[6].eval()  # a frozen BatchNorm inside: its own mode is restored too
    modes = [m.training for m in model.modules()]
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = [torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    engines = [GradCAM(model, "4"), GradCAM(model, "4")]
    expected = [engines[i](inputs[i]).cams for i in range(2)]
    got: list[list] = [[], []]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(i):
        try:
            barrier.wait()
            for _ in range(8):
                got[i].append(engines[i](inputs[i]).cams)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(2):
        for cams in got[i]:
            torch.testing.assert_close(cams, expected[i], rtol=0, atol=0)
    assert [m.training for m in model.modules()] == modes
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, buffers[key], rtol=0, atol=0)
    assert all(not m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------------
# 6 and 7. The manifest: input order after --resume, paths relative to the input folder.

def test_resume_keeps_input_order_and_paths_are_relative(images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert main(["explain", str(images), "--out", str(out), "--method", "gradcam", "--batch-size", "3",
                 *FAST]) == 0
    rows = manifest(out)
    assert [r["path"] for r in rows] == ["chelsea.png", "coffee.png", "rocket.png"]
    (out / outputs.MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in (rows[0], rows[2])))
    moved = images.rename(tmp_path / "moved")  # the input folder moves; DIR stays
    counting = Counting(monkeypatch)
    assert main(["explain", str(moved), "--out", str(out), "--method", "gradcam", "--resume", *FAST]) == 0
    assert counting.calls == [1]  # only coffee
    assert [r["path"] for r in manifest(out)] == ["chelsea.png", "coffee.png", "rocket.png"]

    # nested folders and several PATHs: relative to the deepest folder holding them all
    (moved / "sub").mkdir()
    (moved / "coffee.png").rename(moved / "sub" / "coffee.png")
    out2 = tmp_path / "out2"
    assert main(["explain", str(moved / "sub"), str(moved / "chelsea.png"), "--out", str(out2), "--method",
                 "gradcam", *FAST]) == 0
    assert [r["path"] for r in manifest(out2)] == ["sub/coffee.png", "chelsea.png"]


def test_input_keys_unit(tmp_path):
    from cfcam_gpu.app.inputs import input_keys

    a, b = tmp_path / "data" / "a.png", tmp_path / "data" / "x" / "b.png"
    b.parent.mkdir(parents=True)
    assert input_keys([tmp_path / "data"], [a, b]) == ["a.png", "x/b.png"]
    assert input_keys([b], [b]) == ["b.png"]
    assert input_keys([a, b], [a, b]) == ["a.png", "x/b.png"]


# ---------------------------------------------------------------------------------------------------
# 4. Line breaks and control characters in names.

def test_a_line_break_in_a_file_name_does_not_break_the_contact_sheet(images, tmp_path, capsys):
    from cfcam_gpu.app.viz import contact_sheet, renderable

    assert renderable("a\nb\tc\rd\x00e") == "a?b?c?d?e"
    assert renderable("café x") == "café x"
    sheet = contact_sheet([np.zeros((8, 40, 3), np.uint8)] * 2, ["one\ntwo", "x\r\ny"])
    assert sheet.dtype == np.uint8
    from cfcam_gpu.app.report import comparison_grid  # cfcam evaluate's comparison.png

    grid = comparison_grid(torch.rand(1, 3, 8, 40), {"gradcam": torch.rand(1, 2, 2)}, ["a\nb"], ["cat"], [0.5], 1)
    assert grid.shape[2] == 3

    (images / "chelsea.png").rename(images / "a\nb.png")
    out = tmp_path / "out"
    assert main(["explain", str(images / "a\nb.png"), "--out", str(out), "--method", "gradcam", *FAST]) == 0
    assert (out / "contact_sheet.png").is_file() and "Traceback" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# 5. A full disk: its own exit status.

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_stops_with_its_own_status(images, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    monkeypatch.setattr(outputs, "write_file", _no_space)
    code = main(["explain", str(images), "--out", str(out), "--method", "gradcam", "--batch-size", "1", *FAST])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
    assert manifest(out) == []  # nothing recorded as done


def test_a_full_disk_at_the_contact_sheet(images, tmp_path, monkeypatch, capsys):
    from cfcam_gpu.app import viz

    save_png = viz.save_png
    monkeypatch.setattr(viz, "save_png", lambda image, path: _no_space() if Path(path).name
                        == outputs.CONTACT_SHEET else save_png(image, path))
    out = tmp_path / "out"
    code = main(["explain", str(images / "coffee.png"), "--out", str(out), "--method", "gradcam", *FAST])
    err = capsys.readouterr().err
    assert code == 3 and "contact_sheet.png" in err and "Traceback" not in err
    assert [r["status"] for r in manifest(out)] == ["ok"]  # the images are done


# ---------------------------------------------------------------------------------------------------
# 11. Signals: SIGTERM as Ctrl-C, quiet workers, written batches recorded.

def test_sigterm_stops_like_ctrl_c(images, tmp_path, monkeypatch, capsys):
    from cfcam_gpu.methods import METHODS

    base = METHODS["gradcam"]

    class Terminated(base):
        def __call__(self, images, targets=None, **options):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs before this returns
            raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setitem(METHODS, "gradcam", Terminated)
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    code = main(["explain", str(images), "--out", str(out), "--method", "gradcam", "--batch-size", "1", *FAST])
    assert code == 143
    assert capsys.readouterr().err.strip().endswith("cfcam: terminated")
    assert signal.getsignal(signal.SIGTERM) is previous  # restored
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_workers_ignore_ctrl_c_and_sigterm(tmp_path):
    from cfcam_gpu.app.options import make_loader, quiet_worker

    dataset = ImageFolderDataset([tmp_path / "a.png"])
    assert make_loader(dataset, 1, 2, torch.device("cpu")).worker_init_fn is quiet_worker
    assert make_loader(dataset, 1, 0, torch.device("cpu")).worker_init_fn is None

    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        quiet_worker(0)
        assert signal.getsignal(signal.SIGINT) is signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def test_a_batch_written_before_ctrl_c_is_recorded(tmp_path, monkeypatch):
    write_file = outputs.write_file

    def slow(path, array):
        time.sleep(0.3)
        write_file(path, array)

    monkeypatch.setattr(outputs, "write_file", slow)
    path = tmp_path / "manifest.jsonl"
    with pytest.raises(KeyboardInterrupt):
        with outputs.BatchWriter(path) as writer:
            writer.submit([{"path": "a.png", "status": "ok", "files": {"cam": "a.npy"}}],
                          [(tmp_path / "a.npy", np.zeros(2, np.float32))])
            raise KeyboardInterrupt  # while a.npy is being written
    assert (tmp_path / "a.npy").is_file()
    assert [json.loads(line)["path"] for line in path.read_text().splitlines()] == ["a.png"]
    assert writer.counts == {"ok": 1, "error": 0}


# ---------------------------------------------------------------------------------------------------
# 9. TIFF bit depths.

def test_tiff_bit_depths(tmp_path):
    gray16 = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.tif")
    Image.fromarray(gray16.astype(np.float32) / 65535).save(tmp_path / "f32.tif")
    Image.fromarray((gray16 >> 8).astype(np.uint8)).save(tmp_path / "g8.tif")
    dataset = ImageFolderDataset([tmp_path / "g16.tif", tmp_path / "f32.tif", tmp_path / "g8.tif"], size=32,
                                 keep_original=True)
    g16, f32, g8 = dataset[0], dataset[1], dataset[2]
    expected = np.rint(gray16 / 65535 * 255)  # float64; the decoder rounds in float32
    assert g16.ok and np.abs(g16.original.numpy() - np.stack([expected] * 3)).max() <= 1
    assert g8.ok and np.array_equal(g8.original[0].numpy(), (gray16 >> 8).astype(np.uint8))
    assert not f32.ok and f32.error == ("not a readable image (32-bit floating-point pixels have no defined "
                                        "white level; convert the file to 8- or 16-bit)")
    # a 16-bit PNG of the same pixels decodes to the same image
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    png = ImageFolderDataset([tmp_path / "g16.png"], size=32, keep_original=True)[0]
    assert np.array_equal(png.original.numpy(), g16.original.numpy())


# ---------------------------------------------------------------------------------------------------
# 10 and 12. Callable targets with aug_smooth, empty batches, fake PNGs, seeded random weights.

def test_aug_smooth_with_one_batch_callable_target():
    model = _small_net().eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    cam = GradCAM(model, "4")
    by_callable = cam(x, lambda output: output[:, 3], aug_smooth=True)
    by_index = cam(x, 3, aug_smooth=True)
    torch.testing.assert_close(by_callable.cams, by_index.cams)
    assert by_callable.cams.shape == (2, 12, 12)


def test_an_empty_batch_is_refused_clearly_whatever_the_targets():
    from cfcam_gpu.targets import class_indices

    cam = GradCAM(_small_net().eval(), "4")
    for targets in ([], None, np.zeros(0, np.int64), 3):
        with pytest.raises(ValueError, match=r"images: expected at least one image \(B >= 1\), got shape "
                                             r"\(0, 3, 12, 12\)"):
            cam(torch.zeros(0, 3, 12, 12), targets)
    assert class_indices([], 0, "cpu").dtype == torch.int64  # no indices for no images


def test_a_fake_png_says_so_without_decoder_noise(tmp_path, capfd):
    (tmp_path / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    sample = ImageFolderDataset([tmp_path / "fake.png"])[0]
    assert not sample.ok and sample.error.startswith("not a readable image (")
    assert "Internal error" not in sample.error
    assert "libpng" not in capfd.readouterr().err


def test_random_weights_are_seeded_and_recorded(images, tmp_path, capsys):
    import argparse

    from cfcam_gpu.app.options import load_model

    def weights(seed):
        args = argparse.Namespace(model="resnet18", weights=None, num_classes=3, layer=None, seed=seed)
        return load_model(args, torch.device("cpu"))[0].state_dict()

    state = torch.random.get_rng_state()
    a, b, c = weights(0), weights(0), weights(1)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["fc.weight"], c["fc.weight"])

    out = tmp_path / "out"
    args = ["explain", str(images / "coffee.png"), "--out", str(out), "--method", "gradcam", *FAST]
    assert main(args) == 0
    assert json.loads((out / outputs.RUN_CONFIG).read_text())["seed"] == 0
    assert main([*args, "--resume", "--seed", "1"]) == 2
    assert "seed 0 -> 1" in capsys.readouterr().err
