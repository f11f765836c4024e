import os

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from cfcam_gpu.app.data import bundled_images, display_images
from cfcam_gpu.app.viz import contact_sheet, jet_lut, overlay, save_overlays, save_png, to_uint8_image


@pytest.fixture(scope="module")
def photos():
    return [image for _, image in bundled_images()[:3]]


def random_cams(batch, height, width, seed=0):
    """(B, h, w) min-max normalised random maps, exactly 0 and 1 somewhere."""
    cams = torch.rand(batch, height, width, generator=torch.Generator().manual_seed(seed))
    low = cams.amin(dim=(1, 2), keepdim=True)
    high = cams.amax(dim=(1, 2), keepdim=True)
    return (cams - low) / (high - low)


def opencv_overlay(image_rgb_u8, cam, alpha):
    """The seed's per-image recipe in OpenCV: resize, applyColorMap, addWeighted (RGB in, RGB out)."""
    height, width = image_rgb_u8.shape[:2]
    up = cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.uint8(255 * up), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(heat, alpha, image_rgb_u8[:, :, ::-1], 1 - alpha, 0)
    return blended[:, :, ::-1]


def test_jet_lut_equals_opencv_exactly():
    ours = jet_lut()
    assert ours.shape == (256, 3) and ours.dtype == torch.uint8
    levels = np.arange(256, dtype=np.uint8)[:, None]
    opencv_rgb = cv2.applyColorMap(levels, cv2.COLORMAP_JET)[:, 0, ::-1]
    np.testing.assert_array_equal(ours.numpy(), opencv_rgb)


@pytest.mark.parametrize(
    "size, cam_size",
    [((224, 224), (7, 7)), ((224, 300), (7, 9)), ((100, 90), (14, 14)), ((50, 60), (100, 120))],
)
def test_overlay_equals_opencv_per_image(photos, size, cam_size):
    images = display_images(photos, size=size)
    images = (images * 255).round() / 255  # what an 8-bit image holds
    cams = random_cams(len(photos), *cam_size)
    ours = overlay(images, cams, alpha=0.4)
    assert ours.shape == (3, 3, *size) and ours.dtype == torch.float32 and ours.is_contiguous()
    for i in range(len(photos)):
        image_u8 = to_uint8_image(images[i])
        expected = opencv_overlay(image_u8, cams[i].numpy(), 0.4).astype(np.float64)
        diff = np.abs(ours[i].permute(1, 2, 0).numpy() * 255 - expected)
        # addWeighted rounds to uint8 (< 0.5 apart); float32 resize can flip the
        # JET index of a rare pixel by one (one LUT step <= 4 levels, times alpha).
        assert (diff > 0.5 + 1e-3).mean() < 1e-3
        assert diff.max() <= 0.4 * 4 + 0.5 + 1e-3


def test_overlay_blend_endpoints_and_dtype():
    images = torch.rand(2, 3, 8, 10, dtype=torch.float64)
    cams = torch.zeros(2, 1, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(overlay(images, cams, alpha=0.0), images)
    heat = overlay(images, cams, alpha=1.0)
    assert heat.dtype == torch.float64
    dark_blue = torch.tensor([0, 0, 128], dtype=torch.float64) / 255  # JET at 0
    torch.testing.assert_close(heat, dark_blue.view(1, 3, 1, 1).expand_as(heat))
    red = overlay(images, torch.ones(2, 4, 5), alpha=1.0)
    torch.testing.assert_close(red[:, :, 0, 0], torch.tensor([[128 / 255, 0, 0]] * 2, dtype=torch.float64))
    uint8 = overlay((images * 255).round().to(torch.uint8), cams, alpha=0.5)
    assert uint8.dtype == torch.float32 and 0 <= uint8.min() and uint8.max() <= 1


def test_overlay_errors():
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="cams: expected batch size 2.*got 3"):
        overlay(images, torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match=r"images: expected a \(B, 3, H, W\).*\(3, 8, 8\)"):
        overlay(images[0], torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match=r"cams: expected a \(B, h, w\)"):
        overlay(images, torch.rand(2, 2, 4, 4))
    with pytest.raises(ValueError, match="alpha"):
        overlay(images, torch.rand(2, 4, 4), alpha=1.5)


def test_save_png_roundtrip_and_atomic(tmp_path):
    image = torch.rand(3, 20, 30)
    path = save_png(image, tmp_path / "out" / "a.png")
    assert path == tmp_path / "out" / "a.png"
    written = np.asarray(Image.open(path))
    np.testing.assert_array_equal(written, to_uint8_image(image))
    np.testing.assert_array_equal(written, (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

    # overwrite in place; a failing write leaves the old file and no temporary
    save_png(np.zeros((5, 6, 3), np.uint8), path)
    assert np.asarray(Image.open(path)).shape == (5, 6, 3)
    with pytest.raises(ValueError):
        save_png(np.zeros((5, 6, 4), np.uint8), path)
    with pytest.raises(KeyError, match="disk full"):
        _fail_inside_save(path)
    assert np.asarray(Image.open(path)).shape == (5, 6, 3)
    assert sorted(os.listdir(path.parent)) == ["a.png"]


def _fail_inside_save(path):
    """Make PIL fail mid-write, after the temporary file was created."""
    original = Image.Image.save

    def broken(self, fp, *args, **kwargs):
        fp.write(b"partial")
        raise KeyError("disk full")

    Image.Image.save = broken
    try:
        save_png(np.ones((5, 6, 3), np.uint8), path)
    finally:
        Image.Image.save = original


def test_save_overlays(tmp_path):
    overlays = torch.rand(3, 3, 12, 16)
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    assert save_overlays(overlays, paths) == paths
    for overlay_i, path in zip(overlays, paths):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), to_uint8_image(overlay_i))
    with pytest.raises(ValueError, match="expected 3 paths.*got 2"):
        save_overlays(overlays, paths[:2])


def test_contact_sheet_layout_and_labels():
    tiles = torch.zeros(5, 3, 20, 30)
    for i in range(5):
        tiles[i, i % 3] = 1.0  # pure red / green / blue tiles
    labels = ["cat 0.79", "espresso", "", "x" * 100, "ok"]
    sheet = contact_sheet(tiles, labels, ncols=3)
    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[2] == 3
    pad = 4
    cell_w = 30 + pad
    assert sheet.shape[1] == 3 * cell_w + pad
    cell_h = (sheet.shape[0] - pad) // 2
    assert sheet.shape[0] == 2 * cell_h + pad
    for i in range(5):
        x, y = pad + (i % 3) * cell_w, pad + (i // 3) * cell_h
        np.testing.assert_array_equal(sheet[y : y + 20, x : x + 30], to_uint8_image(tiles[i]))
        band = sheet[y + 20 : y + cell_h - pad // 2, x : x + 30]
        has_text = (band < 128).any()
        assert has_text == bool(labels[i]), i
    # the over-long label (tile 3: row 1, column 0) is cut at the tile's edge
    y = pad + cell_h
    assert (sheet[y + 20 : y + cell_h, pad + 30 : pad + cell_w] == 255).all()
    assert contact_sheet(tiles[:4], ["a"] * 4).shape[1] == 2 * cell_w + pad  # default: ceil(sqrt(B)) columns
    with pytest.raises(ValueError, match="labels: expected 5"):
        contact_sheet(tiles, ["a"])


def test_contact_sheet_labels_draw_accents_and_mark_what_the_font_lacks():
    from cfcam_gpu.app.viz import renderable

    tiles = torch.full((1, 3, 40, 120), 0.5)

    def sheet(label):
        return contact_sheet(tiles, [label])

    tofu = sheet("\uffff")  # a character no font draws
    assert not np.array_equal(sheet("é"), tofu) and not np.array_equal(sheet("é"), sheet("e"))
    assert renderable("café 猫") == "café ?"  # DejaVu Sans has é, not the CJK ideograph
    assert np.array_equal(sheet("猫"), sheet("?"))  # shown as '?', not as an empty box
