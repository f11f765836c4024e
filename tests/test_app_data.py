import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from cfcam_gpu.app.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    bundled_images,
    denormalize,
    display_images,
    expand_paths,
    preprocess,
)


@pytest.fixture(scope="module")
def photos():
    return bundled_images()


def test_bundled_images_are_real_rgb_photos(photos):
    import skimage.data

    names = [name for name, _ in photos]
    assert names[0] == "chelsea"
    assert {"chelsea", "coffee", "astronaut", "rocket", "china", "flower"} <= set(names)
    assert len(names) == len(set(names))
    for name, image in photos:
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, name
        assert image.std() > 20, name  # a photo, not a flat or synthetic image
    np.testing.assert_array_equal(photos[0][1], skimage.data.chelsea())


def test_preprocess_matches_torchvision_resize_and_normalize(photos):
    images = [image for _, image in photos[:3]]
    x = preprocess(images, size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32
    for i, image in enumerate(images):
        chw = torch.from_numpy(image).permute(2, 0, 1)
        # torchvision's uint8 resize (its own kernel, rounded to uint8)
        expected_u8 = TF.resize(chw, [224, 224], antialias=True)
        display = display_images([image])[0]
        assert (display * 255 - expected_u8.float()).abs().max() <= 1.0
        # torchvision's float pipeline: ToDtype(scale) -> Resize -> Normalize
        expected = TF.normalize(
            TF.resize(TF.to_dtype(chw, torch.float32, scale=True), [224, 224], antialias=True),
            IMAGENET_MEAN,
            IMAGENET_STD,
        )
        torch.testing.assert_close(x[i], expected, atol=1e-5, rtol=1e-5)


def test_preprocess_close_to_pil_bilinear(photos):
    image = photos[0][1]
    pil = np.asarray(Image.fromarray(image).resize((224, 224), Image.BILINEAR)).astype(np.float64)
    ours = display_images([image])[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(ours - pil).mean() < 1.0


def test_display_images_inputs_agree(photos):
    image = photos[1][1]
    chw = torch.from_numpy(image).permute(2, 0, 1)
    from_array = display_images([image], size=100)
    from_tensor = display_images([chw], size=(100, 100))
    from_batch = display_images(torch.stack([chw, chw]), size=(100, 100))
    torch.testing.assert_close(from_array, from_tensor)
    torch.testing.assert_close(from_batch, torch.cat([from_array, from_array]))
    assert from_array.min() >= 0 and from_array.max() <= 1


def test_denormalize_inverts_preprocess(photos):
    images = [image for _, image in photos[:2]]
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    x = preprocess(images, size=(64, 80), mean=mean, std=std)
    torch.testing.assert_close(denormalize(x, mean, std), display_images(images, size=(64, 80)))


def test_preprocess_errors():
    with pytest.raises(ValueError, match=r"images\[0\].*uint8.*float64"):
        preprocess([np.zeros((8, 8, 3))])
    with pytest.raises(ValueError, match=r"images\[1\].*\(8, 8\)"):
        preprocess([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(ValueError, match="size"):
        preprocess([np.zeros((8, 8, 3), np.uint8)], size=(0, 4))
    with pytest.raises(ValueError, match="std"):
        preprocess([np.zeros((8, 8, 3), np.uint8)], std=(1, 0, 1))
    with pytest.raises(ValueError, match="at least one"):
        preprocess([])
    with pytest.raises(TypeError, match=r"images\[0\].*list"):
        preprocess([[1, 2, 3]])


def write_image(path, height, width, seed):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return image


def test_expand_paths_folder_and_txt(tmp_path):
    root = tmp_path / "imgs"
    for name in ["b.png", "a.JPG", "sub/c.webp", "sub/deeper/d.tiff", "z.bmp"]:
        write_image(root / name, 4, 4, 0)
    (root / "notes.txt").write_text("not an image list inside a folder")
    (root / "sub" / "e.gif").write_bytes(b"gif")  # not an accepted extension

    expected = [root / "a.JPG", root / "b.png", root / "sub/c.webp", root / "sub/deeper/d.tiff", root / "z.bmp"]
    assert expand_paths(root) == expected
    assert expand_paths([str(root)]) == expected

    listing = tmp_path / "list.txt"
    listing.write_text(f"# comment\n\nimgs/b.png\n{root / 'sub'}\n  imgs/missing.png  \nimgs/b.png\n")
    assert expand_paths(listing) == [
        root / "b.png",
        root / "sub/c.webp",
        root / "sub/deeper/d.tiff",
        root / "missing.png",  # kept: the Dataset reports it
    ]
    # explicit files are kept in argument order, duplicates dropped
    assert expand_paths([root / "z.bmp", root, root / "a.JPG"]) == [root / "z.bmp"] + [
        p for p in expected if p != root / "z.bmp"
    ]
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        expand_paths(tmp_path / "nothing_here")


def test_dataset_reports_bad_files_and_loads_good_ones(tmp_path):
    good = {
        "a.png": write_image(tmp_path / "a.png", 50, 70, 1),
        "b.bmp": write_image(tmp_path / "b.bmp", 30, 20, 2),
        "c.tif": write_image(tmp_path / "c.tif", 40, 40, 3),
    }
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (tmp_path / "empty.png").write_bytes(b"")
    paths = expand_paths(tmp_path) + [tmp_path / "gone.png"]

    dataset = ImageFolderDataset(paths, size=(32, 48), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert len(dataset) == 6
    bad = dataset[paths.index(tmp_path / "corrupt.jpg")]
    assert not bad.ok and bad.image is None and bad.error

    batches = list(DataLoader(dataset, batch_size=4, collate_fn=dataset.collate, num_workers=2))
    images = torch.cat([b.images for b in batches])
    displays = torch.cat([b.displays for b in batches])
    loaded = [p for b in batches for p in b.paths]
    failures = dict(f for b in batches for f in b.failures)

    assert loaded == [tmp_path / "a.png", tmp_path / "b.bmp", tmp_path / "c.tif"]
    assert set(failures) == {tmp_path / "corrupt.jpg", tmp_path / "empty.png", tmp_path / "gone.png"}
    assert all(message and ".cpp" not in message for message in failures.values())
    assert "truncated" in failures[tmp_path / "corrupt.jpg"]
    assert "No such file" in failures[tmp_path / "gone.png"]
    assert torch.cat([b.indices for b in batches]).tolist() == [paths.index(p) for p in loaded]
    assert images.shape == (3, 3, 32, 48) and images.dtype == torch.float32
    assert displays.shape == (3, 3, 32, 48) and displays.dtype == torch.uint8
    for k, name in enumerate(good):
        expected = display_images([good[name]], size=(32, 48))[0]
        assert (displays[k].float() / 255 - expected).abs().max() <= 0.5 / 255 + 1e-6
        torch.testing.assert_close(
            images[k], preprocess([good[name]], size=(32, 48))[0], atol=1e-5, rtol=1e-5
        )


def test_collate_all_bad(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    dataset = ImageFolderDataset([tmp_path / "x.png"], size=16)
    batch = dataset.collate([dataset[0]])
    assert batch.images.shape == (0, 3, 16, 16) and batch.displays.dtype == torch.uint8
    assert batch.paths == [] and batch.failures[0][0] == tmp_path / "x.png"


def test_dataset_decodes_16_bit_png(tmp_path):
    gray16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    sample = ImageFolderDataset([tmp_path / "g16.png"], size=64)[0]
    assert sample.ok, sample.error
    expected = np.round(gray16 / 65535 * 255)
    assert np.abs(sample.display[0].numpy() - expected).max() <= 1
