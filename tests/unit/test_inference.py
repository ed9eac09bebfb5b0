"""trainer/inference.py beyond the trained bundle (tests/end_to_end/test_export.py has that): flip
test-time augmentation, and Grad-CAM on tiny random-weight models of every family a bundle may hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from trainer.inference import Bundle, WithTTA, class_probs, gradcam, predict, preprocess

# (arch, timm kwargs, input px): transformers cut down to a few blocks and 64 px; EfficientNet at 128 px,
# where its last feature map is 4×4 (2×2 at 64 px is too coarse to say which corner lit up).
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 64, "depth": 2}, 64),
    "deit": ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 2}, 64),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4, "embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)}, 64),
    "convnext": ("convnext_atto", {}, 64),
    "efficientnet": ("efficientnet_b0", {}, 128),
}


def config_for(size_px: int) -> dict:
    return {"input_size": [3, size_px, size_px], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_fraction": 1.0}


def lit_image(size_px: int, lit: bool = True) -> Image.Image:
    """Grey, with the top-right quadrant white when `lit`. Its mirror image (a transposed grid) is the
    bottom-left quadrant, so a map laid out column-first lights the wrong corner."""
    pixels = np.full((size_px, size_px, 3), 96, np.uint8)
    if lit:
        pixels[: size_px // 2, size_px // 2 :] = 255
    return Image.fromarray(pixels)


def patch_detector(family: str) -> Bundle:
    """The family's model with random weights, except that class 0's logit is the projection of the pooled
    features on the direction the lit quadrant moves them: a model whose class-0 answer depends on the patch."""
    arch, kwargs, size_px = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=3, **kwargs).eval()
    config = config_for(size_px)
    batch = torch.stack([preprocess(lit_image(size_px, lit), config) for lit in (True, False)])
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(batch), pre_logits=True)
        direction = pooled[0] - pooled[1]
        heads = model.get_classifier()
        for head in heads if isinstance(heads, tuple) else (heads,):  # DeiT: the class and distillation heads
            head.weight.zero_()
            head.bias.zero_()
            head.weight[0] = direction / direction.norm()
    return Bundle(model=model, config=config, classes=["patch", "b", "c"], path=Path("."))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradcam_lights_the_patch_the_model_looks_at(family):
    bundle = patch_detector(family)
    size_px = bundle.config["input_size"][1]
    image = lit_image(size_px)
    heat, overlay = gradcam(bundle, image, class_index=0)
    assert heat.shape == (size_px, size_px) and heat.dtype == np.float32
    assert overlay.size == (size_px, size_px) and overlay.mode == "RGB"
    assert heat.min() == pytest.approx(0.0) and heat.max() == pytest.approx(1.0)
    half = size_px // 2
    quadrants = {"top-right": heat[:half, half:], "bottom-left": heat[half:, :half], "top-left": heat[:half, :half], "bottom-right": heat[half:, half:]}
    means = {name: float(q.mean()) for name, q in quadrants.items()}
    assert max(means, key=means.get) == "top-right", means
    assert means["top-right"] > means["bottom-left"] + 0.3, means  # a transposed grid would swap these two


def test_gradcam_of_a_transformer_is_not_the_class_token():
    """The class and distillation tokens are dropped: moving the patch moves the map (the prefix tokens
    would put a fixed bright cell in the top-left corner of a map that included them)."""
    bundle = patch_detector("deit")
    pixels = np.full((64, 64, 3), 96, np.uint8)
    pixels[48:, :16] = 255  # one patch, bottom-left
    heat, _ = gradcam(bundle, Image.fromarray(pixels), class_index=0)
    assert np.unravel_index(heat.argmax(), heat.shape)[0] >= 40 and np.unravel_index(heat.argmax(), heat.shape)[1] < 24


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4).eval()
    config = config_for(32)
    bundle = Bundle(model=model, config=config, classes=list("abcd"), path=Path("."))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))  # not symmetric
    mirror = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    plain = dict(predict(bundle, [image], topk=4)[0])
    mirrored = dict(predict(bundle, [mirror], topk=4)[0])
    flipped = dict(predict(bundle, [image], topk=4, tta="flip")[0])
    assert plain != pytest.approx(mirrored)  # the mirror is another input: the test means something
    for name in bundle.classes:
        assert flipped[name] == pytest.approx(0.5 * (plain[name] + mirrored[name]), abs=1e-6)
    assert sum(flipped.values()) == pytest.approx(1.0, abs=1e-6)
    # The same in a batch, and the logits eval scores: their softmax is the averaged probabilities.
    batch = torch.stack([preprocess(image, config), preprocess(mirror, config)])
    with torch.no_grad():
        probs = class_probs(model, batch, "flip")
        logits = WithTTA(model, "flip")(batch)
    assert torch.allclose(probs[0], probs[1], atol=1e-6)  # an image and its mirror: the same average
    assert torch.allclose(torch.softmax(logits, dim=1), probs, atol=1e-6)
    with pytest.raises(ValueError, match="tta must be one of"):
        predict(bundle, [image], tta="rotate")
