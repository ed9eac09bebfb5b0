"""Inference, the one implementation: load a bundle, eval preprocessing, predict (softmax top-k, optional
flip test-time augmentation), Grad-CAM for convolutional and transformer models.

Used by `python -m trainer predict`, the tests and the Space. It imports only the standard library,
numpy, torch, timm, safetensors and PIL, never `trainer` or `loaders`: `export` copies this file
into every bundle, so a bundle (and the Space built on it) runs without this repository.

Preprocessing is the trainer's eval transform (timm's): the shorter side resized to
floor(H / crop_fraction) with antialiased bilinear interpolation, a centred H×W crop, /255,
then (x - mean) / std per channel.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


@dataclass
class Bundle:
    """A loaded bundle: the model in eval mode, its config.json, and in label order the classes (the
    dataset's folder names) and the names shown for them ("tench" for ImageNet's n01440764)."""

    model: torch.nn.Module
    config: dict
    classes: list[str]
    path: Path
    names: list[str] | None = None  # None: the folder names

    def __post_init__(self) -> None:
        if self.names is None:
            self.names = list(self.classes)


# -- the model -------------------------------------------------------------------------------------


def classifier_path(model: torch.nn.Module) -> str:
    """Where timm keeps the model's classifier ("fc", "head.fc", "classifier", ...); for a model with two
    (DeiT's distilled "head" and "head_dist") the first."""
    path = model.pretrained_cfg.get("classifier", "fc") if hasattr(model, "pretrained_cfg") else "fc"
    return path[0] if isinstance(path, list | tuple) else path


def make_head(in_features: int, num_classes: int, spec: str, dropout: float) -> torch.nn.Module:
    """"linear" → Linear; "mlp:512" → Linear(in, 512), ReLU, Dropout, Linear(512, classes)."""
    if spec == "linear":
        return torch.nn.Sequential(torch.nn.Dropout(dropout), torch.nn.Linear(in_features, num_classes)) if dropout else torch.nn.Linear(in_features, num_classes)
    if spec.startswith("mlp:"):
        hidden = int(spec.split(":", 1)[1])
        return torch.nn.Sequential(
            torch.nn.Linear(in_features, hidden),
            torch.nn.ReLU(inplace=True),
            torch.nn.Dropout(dropout),
            torch.nn.Linear(hidden, num_classes),
        )
    raise ValueError(f'head must be "", "linear" or "mlp:<hidden units>", got {spec!r}')


def build_model(config: dict) -> torch.nn.Module:
    """The bundle's architecture with random weights: timm's model for `num_classes`, and the custom
    head of `config["head"]` in place of timm's classifier when there is one. Eval mode."""
    model = timm.create_model(config["architecture"], num_classes=int(config["num_classes"]), pretrained=False)
    spec = config.get("head") or ""
    if spec:
        path = classifier_path(model)
        current = model.get_submodule(path)
        in_features = next(m for m in current.modules() if isinstance(m, torch.nn.Linear)).in_features
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, make_head(in_features, int(config["num_classes"]), spec, float(config.get("head_dropout", 0.0))))
    return model.eval()


def load_bundle(path: str | Path, device: str = "cpu") -> Bundle:
    """Read a bundle folder (model.safetensors + config.json) into an eval-mode model on `device`."""
    path = Path(path).expanduser()
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise FileNotFoundError(f"{path} is not a bundle: {needed.name} is missing (write one with python -m trainer export RUN_DIR)")
    config = json.loads(config_file.read_text())
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{config_file} has format_version {config['format_version']}; this inference.py reads up to {FORMAT_VERSION}")
    model = build_model(config)
    model.load_state_dict(load_file(str(weights_file)), strict=True)
    model.to(device)
    classes = list(config["classes"])
    names = list(config.get("display_names") or classes)  # bundles written before display names: the folder names
    if len(names) != len(classes):
        raise ValueError(f"{config_file} has {len(names)} display_names for {len(classes)} classes")
    return Bundle(model=model, config=config, classes=classes, path=path, names=names)


# -- preprocessing ---------------------------------------------------------------------------------


def center_crop(image: Image.Image, config: dict) -> Image.Image:
    """The RGB centre crop the model sees: shorter side to floor(H / crop_fraction), bilinear with
    antialiasing (PIL's resize filters over the whole footprint when shrinking), then H×W from the middle."""
    _, height, width = config["input_size"]
    image = image.convert("RGB")
    shorter = math.floor(min(height, width) / float(config.get("crop_fraction", 1.0)))
    w, h = image.size
    scale = shorter / min(w, h)
    new_w, new_h = (shorter, max(1, round(h * scale))) if w <= h else (max(1, round(w * scale)), shorter)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    left, top = round((new_w - width) / 2), round((new_h - height) / 2)
    return image.crop((left, top, left + width, top + height))


def _normalize(crop: Image.Image, config: dict) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(config["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(config["std"], dtype=torch.float32).view(3, 1, 1)
    return (pixels - mean) / std


def preprocess(image: Image.Image, config: dict) -> torch.Tensor:
    """One image as the model's input, shape (3, H, W), float32, normalised."""
    return _normalize(center_crop(image, config), config)


# -- prediction ------------------------------------------------------------------------------------


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


TTA_MODES = ("none", "flip")


def class_probs(model: torch.nn.Module, batch: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Softmax probabilities (float32) of `model` on a normalised (N, 3, H, W) batch. With `tta="flip"`,
    the mean of the softmax of each image and of its horizontal mirror (probabilities are averaged, not
    logits), the two in one forward pass."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    if tta == "none":
        return torch.softmax(model(batch).float(), dim=1)
    both = torch.softmax(model(torch.cat([batch, batch.flip(3)])).float(), dim=1)
    return 0.5 * (both[: len(batch)] + both[len(batch) :])


class WithTTA(torch.nn.Module):
    """`model` under test-time augmentation, as logits for code that scores logits (top-k, cross-entropy):
    the log of `class_probs`, so a softmax of the output gives back the averaged probabilities."""

    def __init__(self, model: torch.nn.Module, tta: str):
        super().__init__()
        self.model, self.tta = model, tta

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return class_probs(self.model, batch, self.tta).clamp_min(torch.finfo(torch.float32).tiny).log()


@torch.no_grad()
def predict(bundle: Bundle, images: list[Image.Image], topk: int = 5, tta: str = "none") -> list[list[tuple[str, float]]]:
    """Per image, the `topk` most probable classes as (display name, softmax probability), best first;
    `bundle.classes[bundle.names.index(name)]` is the class's folder name. `tta="flip"`: the
    probabilities are the mean over the image and its mirror (`class_probs`)."""
    if not images:
        return []
    batch = torch.stack([preprocess(image, bundle.config) for image in images]).to(_device(bundle.model))
    probs = class_probs(bundle.model, batch, tta).cpu()
    k = max(1, min(topk, probs.shape[1]))
    values, indices = probs.topk(k, dim=1)
    return [[(bundle.names[i], float(p)) for p, i in zip(vs.tolist(), ix.tolist())] for vs, ix in zip(values, indices)]


# -- Grad-CAM --------------------------------------------------------------------------------------


def _token_target(model: torch.nn.Module) -> str | None:
    """For a ViT-like model (timm's `blocks` and `num_prefix_tokens`: ViT, DeiT, BEiT, EVA, ...), the first
    norm of the last block: its patch tokens still reach the class token through that block's attention.
    (The last block's output would not do: after it, only the class token goes on to the head, so the
    gradient at every patch token is zero.)"""
    blocks = getattr(model, "blocks", None)
    if not hasattr(model, "num_prefix_tokens") or not isinstance(blocks, torch.nn.Sequential | torch.nn.ModuleList) or not len(blocks):
        return None
    last = f"blocks.{len(blocks) - 1}"
    return f"{last}.norm1" if isinstance(getattr(blocks[-1], "norm1", None), torch.nn.Module) else last


def _target_layer(model: torch.nn.Module, batch: torch.Tensor) -> tuple[str, str]:
    """(module name, layout) of the feature map Grad-CAM weighs. Layout "tokens" (B, prefix + h*w, C) for
    ViT-like models (`_token_target`); else the last module, in forward order, whose output is a 4-D
    feature map larger than 1×1 and that is not part of the classifier, "NHWC" for models timm marks so
    (Swin: its stages, windows already merged back) and "NCHW" otherwise: the final stage for
    ResNets/ConvNeXts/EfficientNets at their usual sizes (an earlier stage when the input is so small that
    the last one is 1×1)."""
    token = _token_target(model)
    if token is not None:
        return token, "tokens"
    layout = "NHWC" if str(getattr(model, "output_fmt", "NCHW")) == "NHWC" else "NCHW"
    head = classifier_path(model)
    fired: list[tuple[str, int, int]] = []
    hooks = []
    for name, module in model.named_modules():
        if not name or name == head or name.startswith(head + "."):
            continue

        def record(_module, _inputs, output, name=name):
            if isinstance(output, torch.Tensor):
                area = 0
                if output.dim() == 4:
                    area = output.shape[1] * output.shape[2] if layout == "NHWC" else output.shape[2] * output.shape[3]
                fired.append((name, output.dim(), area))

        hooks.append(module.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    maps = [i for i, (_, dim, area) in enumerate(fired) if dim == 4 and area > 1]
    if not maps:
        raise NotImplementedError("Grad-CAM needs a feature map larger than 1x1; this model (or input size) has none")
    last = maps[-1]
    if layout == "NCHW" and any(dim == 3 for _, dim, _ in fired[last + 1:]):
        raise NotImplementedError("Grad-CAM here works on feature maps and ViT-style token sequences; this model ends in token sequences of another kind")
    return fired[last][0], layout


def _as_nchw(tensor: torch.Tensor, layout: str, model: torch.nn.Module, input_hw: tuple[int, int]) -> torch.Tensor:
    """The captured features (or their gradients) as (B, C, h, w). Tokens: the prefix tokens (class,
    distillation, registers: timm's `num_prefix_tokens`) dropped, the rest laid out row by row on the patch
    grid, h = H / patch height and w = W / patch width (timm's patch embedding flattens rows first)."""
    if layout == "NHWC":
        return tensor.permute(0, 3, 1, 2)
    if layout == "NCHW":
        return tensor
    patches = tensor[:, int(model.num_prefix_tokens) :, :]
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is not None:
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
        grid_h, grid_w = input_hw[0] // patch_h, input_hw[1] // patch_w
    else:  # no patch size to read: a square grid
        grid_h = grid_w = math.isqrt(patches.shape[1])
    if grid_h * grid_w != patches.shape[1]:
        raise NotImplementedError(f"Grad-CAM: {patches.shape[1]} patch tokens do not form the {grid_h}x{grid_w} grid of a {input_hw[0]}x{input_hw[1]} input")
    return patches.reshape(patches.shape[0], grid_h, grid_w, patches.shape[2]).permute(0, 3, 1, 2)


def _jet(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map: 0 → dark blue, 0.5 → green/yellow, 1 → dark red; (H, W) → (H, W, 3) in [0, 1]."""
    v = values[..., None]
    return np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0], np.float32)), 0.0, 1.0)


def gradcam(bundle: Bundle, image: Image.Image, class_index: int | None = None) -> tuple[np.ndarray, Image.Image]:
    """Grad-CAM (Selvaraju et al. 2017) for `class_index` (default: the predicted class), on the image
    itself (no test-time augmentation), for CNNs (ResNet, ConvNeXt, EfficientNet, ...), Swin and ViT-like
    models (ViT, DeiT: patch tokens on their grid, see `_target_layer`).
    Returns the heatmap (H×W float32 in [0, 1] at the crop size) and the RGB crop with the heatmap
    blended in at 0.5 through a jet-like colour map."""
    model, config = bundle.model, bundle.config
    crop = center_crop(image, config)
    batch = _normalize(crop, config).unsqueeze(0).to(_device(model))
    name, layout = _target_layer(model, batch)
    target = model.get_submodule(name)
    captured: dict[str, torch.Tensor] = {}

    def keep(_module, _inputs, output):
        captured["features"] = output
        output.retain_grad()

    hook = target.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            logits = model(batch.requires_grad_(True))
            index = int(logits[0].argmax()) if class_index is None else int(class_index)
            if not 0 <= index < logits.shape[1]:
                raise ValueError(f"class_index {index} is outside 0..{logits.shape[1] - 1}")
            model.zero_grad(set_to_none=True)
            logits[0, index].backward()
        features, grads = captured["features"].detach(), captured["features"].grad.detach()
        features, grads = (_as_nchw(t, layout, model, tuple(batch.shape[-2:])) for t in (features, grads))
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)  # leave no gradients on the shared model
    weights = grads.mean(dim=(2, 3), keepdim=True)  # each channel's importance: its mean gradient
    cam = torch.relu((weights * features).sum(dim=1, keepdim=True)).float()
    height, width = crop.size[1], crop.size[0]
    cam = torch.nn.functional.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)[0, 0].cpu()
    low, high = float(cam.min()), float(cam.max())
    heat = ((cam - low) / (high - low) if high > low else torch.zeros_like(cam)).numpy().astype(np.float32)
    blended = 0.5 * (np.asarray(crop, dtype=np.float32) / 255.0) + 0.5 * _jet(heat)
    overlay = Image.fromarray(np.clip(blended * 255.0 + 0.5, 0, 255).astype(np.uint8))
    return heat, overlay
