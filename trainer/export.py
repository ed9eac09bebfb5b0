"""`export(run_dir)`: a run folder becomes a bundle (model.safetensors, config.json, model card, inference.py, examples).

Which weights: the checkpoint the last phase that left any hands on (its best by val top-1, else its
newest), and within it the EMA's weights when the EMA scored better there, as `init="phase:..."`
reads them (`trainer.run_folder.checkpoint_weights`). The bundle is built in a temporary folder
beside its destination and renamed into place (`trainer.atomic`), so a failed export leaves no half bundle.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file

from trainer import atomic, inference, onnx_model
from trainer.class_names import display_names, imagenet_descriptions
from trainer.data import load_splits
from trainer.recipe import Recipe, RecipeError
from trainer.run_folder import (
    BUNDLE_DIR,
    HISTORY,
    checkpoint_weights,
    last_phase_checkpoint,
    load_run,
    read_jsonl,
    read_state,
)

EXAMPLES_PER_CLASS = 3
EXAMPLES_TOTAL = 100  # ImageNet's 1,000 classes would otherwise add 3,000 photos to the bundle and the Space


class BundleError(RecipeError):
    """A run cannot be exported, or a bundle or image cannot be read; the message says why."""


def _effective_head(recipe: Recipe, last: int) -> tuple[str, float]:
    """The head the model has after phase `last`: heads carry over, a later non-empty `head` replaces it."""
    spec, dropout = "", 0.0
    for phase in recipe.phases[: last + 1]:
        if phase.head:
            spec, dropout = phase.head, phase.head_dropout
    return spec, dropout


def _metrics(run_dir: Path, info: dict, recipe: Recipe, index: int, ckpt: Path, source: str) -> dict[str, Any]:
    saved = read_state(ckpt)
    phase = recipe.phases[index]
    epoch = saved["epoch"] - 1  # last_val belongs to the last finished epoch (saved["epoch"] is the next or current one)
    last_val = saved.get("last_val") or {}
    record = next(
        (r for r in read_jsonl(run_dir / HISTORY) if r.get("phase") == phase.name and r.get("epoch") == epoch),
        {},
    )
    if source == "ema":
        top1, top5 = last_val.get("ema_top1"), record.get("ema_val_top5")
    else:
        top1, top5 = last_val.get("top1"), last_val.get("top5", record.get("val_top5"))
    keep = ("best_top1", "best_source", "best_epoch", "last_val", "steps", "stopped_early", "params")
    phases = {name: {k: v for k, v in done.items() if k in keep} for name, done in info.get("phases", {}).items()}
    return {"top1": top1, "top5": top5, "source": source, "phase": phase.name, "epoch": epoch, "phases": phases}


def _weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 (integer buffers such as BatchNorm's counters as they are), contiguous, unshared."""
    return {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous().clone() for k, v in state.items()}


def _safe_name(name: str) -> str:
    cleaned = re.sub(r"[^\w.\- ]+", "_", str(name)).strip(" .")
    return cleaned or "class"


def _write_examples(recipe: Recipe, classes: list[str], folder: Path) -> tuple[int, str]:
    """Val images as the trainer's val split holds them: up to EXAMPLES_PER_CLASS per class, fewer when
    there are many classes (EXAMPLES_TOTAL at most, one each for the first classes beyond that).
    Returns (images written, note); the note says why there are none when the data are gone."""
    try:
        val = load_splits(recipe).val
    except (RecipeError, ValueError, OSError) as err:  # DataError is a ValueError
        return 0, f"no example images: the run's data ({recipe.data.path}) cannot be read here ({err})"
    per_class = max(1, min(EXAMPLES_PER_CLASS, EXAMPLES_TOTAL // max(1, len(classes))))
    names: dict[int, str] = {}
    for label, name in enumerate(classes[:EXAMPLES_TOTAL]):
        safe = _safe_name(name)
        names[label] = safe if safe not in names.values() else f"{safe}-{label}"
    written = 0
    seen: dict[int, int] = {}
    for i, label in enumerate(val.labels.tolist()):
        if label not in names or seen.get(label, 0) >= per_class:
            continue
        data = bytes(val.read(i))
        target = folder / names[label] / f"{seen.get(label, 0)}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        if data[:3] == b"\xff\xd8\xff":
            target.write_bytes(data)
        else:
            try:
                Image.open(io.BytesIO(data)).convert("RGB").save(target, format="JPEG", quality=95)
            except OSError:
                continue
        seen[label] = seen.get(label, 0) + 1
        written += 1
    return written, ""


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def parameter_table(phases: dict[str, dict], recipe: Recipe) -> str:
    """The card's parameters per phase (trainable and frozen as each phase started), or "" for a run
    trained before run.json recorded them."""
    rows = [
        f"| {phase.name} | {done['params']['total']:,} | {done['params']['trainable']:,} | {done['params']['frozen']:,} |"
        for phase in recipe.phases if (done := phases.get(phase.name)) and done.get("params")
    ]
    if not rows:
        return ""
    return "\n## Parameters per phase\n\n| phase | total | trainable | frozen |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


def _onnx_section(config: dict) -> str:
    if "onnx" not in config:
        return ""
    done = config["onnx"]
    return (f"\n`model.onnx` (opset {done['opset']}, input `{done['input']['name']}` of shape (batch, 3, {config['input_size'][1]}, "
            f"{config['input_size'][2]}) float32 NCHW, output `{done['output']['name']}`) runs with ONNX Runtime in any language; "
            f"preprocess as `preprocessing` in config.json says. Checked at export on {done['checked_on']}: at most "
            f"{done['max_abs_diff']:.2g} from PyTorch on a logit.\n")


def model_card(config: dict, info: dict, recipe: Recipe, examples: int, note: str) -> str:
    """README.md of the bundle: a Hub model card with timm's YAML header."""
    metrics = config["metrics"]
    classes = config["classes"]
    named = [f"{n} (`{c}`)" if n != c else f"`{c}`" for c, n in zip(classes, config.get("display_names", classes))]
    shown = ", ".join(named[:20]) + (f" and {len(classes) - 20} more" if len(classes) > 20 else "")
    git = info.get("git", {})
    rows = []
    for phase in recipe.phases:
        done = metrics["phases"].get(phase.name)
        if done is None:
            rows.append(f"| {phase.name} | {phase.epochs} | not finished | | | | |")
            continue
        last = done.get("last_val") or {}
        rows.append(
            f"| {phase.name} | {phase.epochs} | {_fmt(done.get('best_top1'))} | {done.get('best_source') or '-'} | "
            f"{done.get('best_epoch', -1) + 1} | {_fmt(last.get('top1'))} / {_fmt(last.get('ema_top1'))} | "
            f"{'yes' if done.get('stopped_early') else 'no'} |"
        )
    head = config["head"] or "timm's own classifier"
    size = config["input_size"][1]
    plain_timm = (
        "\nWith timm alone (the head is timm's own, and config.json carries timm's `pretrained_cfg`):\n\n"
        "```python\nimport timm\n\n"
        "model = timm.create_model(\"local-dir:.\", pretrained=True).eval()  # or \"hf-hub:USER/NAME\" once pushed\n"
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))\n```\n"
        if not config["head"] else
        f"\nThe head is this project's `{config['head']}` head, not timm's classifier: load it with `inference.py` "
        "(`build_model` puts that head on timm's model), not with timm alone.\n"
    )
    example_line = (
        f"`examples/` holds {examples} validation images (up to {EXAMPLES_PER_CLASS} per class, {EXAMPLES_TOTAL} in all)."
        if examples else (note or "No example images.")
    )
    return f"""---
library_name: timm
tags:
- image-classification
- timm
pipeline_tag: image-classification
---

# {recipe.name}: `{config['architecture']}` image classifier, {config['num_classes']} classes

A `{config['architecture']}` ([timm](https://github.com/huggingface/pytorch-image-models)) trained with
the recipe `{recipe.name}` ({len(recipe.phases)} phase{'s' if len(recipe.phases) > 1 else ''}: {', '.join(p.name for p in recipe.phases)}).
Head: {head}. These are the {'EMA (exponential moving average) ' if metrics['source'] == 'ema' else ''}weights of the
best checkpoint of phase `{metrics['phase']}` (epoch {metrics['epoch'] + 1}): val top-1 **{_fmt(metrics['top1'])}**,
top-5 {_fmt(metrics['top5'])}.

Code commit: `{config['commit']}`{' (with uncommitted changes)' if git.get('dirty') else ''}.

## Data

`{info.get('data', recipe.data.path)}`: {info.get('train_images', '?')} training and {info.get('val_images', '?')}
validation images, {config['num_classes']} classes: {shown}.
{example_line}

## Metrics per phase (validation set)

| phase | epochs | best top-1 | from | best epoch | last top-1 (model / EMA) | stopped early |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
{parameter_table(metrics["phases"], recipe)}
## How to use

Preprocessing: resize the shorter side to floor({size} / {config['crop_fraction']}) px (bilinear, antialiased),
centre-crop {size}×{size}, scale to [0, 1], normalise with mean {config['mean']} and std {config['std']}.
`inference.py` (needs only torch, timm, safetensors, numpy and Pillow) does exactly this:

```python
from PIL import Image
from inference import load_bundle, predict, gradcam

bundle = load_bundle(".")                      # this folder
print(predict(bundle, [Image.open("photo.jpg")], topk=5))  # [[(class name, probability), ...]]
heatmap, overlay = gradcam(bundle, Image.open("photo.jpg"))  # where the model looked
```

From a checkout of the training repository: `python -m trainer predict BUNDLE photo.jpg [--gradcam cam.png] [--tta flip] [--json]`.
{plain_timm}{_onnx_section(config)}
## Limitations

- It knows only these {config['num_classes']} classes: every image gets one of them, however unrelated it is.
- The accuracy above comes from {info.get('val_images', 'the')} validation images drawn like the training data; on
  photos from elsewhere (other cameras, lighting, backgrounds) expect less. Small validation sets give noisy figures.
- Trained and evaluated at {size}×{size} px; other input sizes are resized to that and may lose detail.
- Not evaluated for fairness or safety; check it on your own data before relying on it.
"""


def preprocessing(config: dict) -> dict:
    """The eval transform (`inference.preprocess`) spelled out for users outside Python: what config.json
    says under "preprocessing", step by step, with the rounding of every size and offset."""
    _, height, width = config["input_size"]
    shorter = math.floor(min(height, width) / float(config["crop_fraction"]))
    return {
        "steps": [
            "decode the image and convert it to RGB (8 bits per channel; EXIF orientation is not applied)",
            f"resize so that the shorter side is {shorter} px and the longer side round(longer * {shorter} / shorter) px, "
            "bilinear with antialiasing (Pillow's Image.resize with BILINEAR; skipped when the size is already right)",
            f"centre-crop {width}x{height} px: left = round((resized width - {width}) / 2), top = round((resized height - {height}) / 2)",
            "divide by 255 (float32, values in [0, 1])",
            "per channel, subtract mean and divide by std (R, G, B order)",
            "lay out as NCHW: (batch, 3, height, width)",
        ],
        "color": "RGB",
        "resize_shorter_side_px": shorter,
        "interpolation": "bilinear, antialiased",
        "center_crop_px": [height, width],
        "scale": 1 / 255,
        "mean": config["mean"],
        "std": config["std"],
        "channel_order": "RGB",
        "input_layout": "NCHW",
        "dtype": "float32",
    }


def export(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, onnx: bool = False) -> Path:
    """Write the bundle of `run_dir` to `out` (default RUN_DIR/bundle) and return its path.
    An existing bundle there is replaced; any other non-empty folder is refused. `onnx`: also
    model.onnx, checked against PyTorch with onnxruntime (`trainer.onnx_model`); the export fails when
    they differ by more than `onnx_model.TOLERANCE` on a logit."""
    run_dir = Path(run_dir)
    recipe, info = load_run(run_dir)
    out = Path(out) if out is not None else run_dir / BUNDLE_DIR
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / inference.CONFIG_FILE).is_file())):
        raise BundleError(f"{out} exists and is not a bundle; choose another --out")

    index, ckpt = last_phase_checkpoint(run_dir, recipe)
    phase = recipe.phases[index]
    state, source, _ = checkpoint_weights(ckpt)
    head, head_dropout = _effective_head(recipe, index)
    classes = list(info["classes"])
    descriptions = imagenet_descriptions(classes)
    config = {
        "architecture": recipe.model.arch,
        "num_classes": len(classes),
        "classes": classes,
        # What people see ("tench" for ImageNet's n01440764; the folder names otherwise); inference.py reads it.
        "display_names": display_names(classes),
        "head": head,
        "head_dropout": head_dropout,
        "input_size": [3, phase.eval_res_px, phase.eval_res_px],
        "mean": list(recipe.data.mean),
        "std": list(recipe.data.std),
        "interpolation": "bilinear",
        "crop_fraction": phase.eval_crop_fraction,
        "metrics": _metrics(run_dir, info, recipe, index, ckpt, source),
        "recipe": recipe.name,
        "commit": info.get("git", {}).get("commit", "unknown"),
        "format_version": inference.FORMAT_VERSION,
    }
    # timm's convention (save_for_hf, its Hub configs): label_names are the classes' unique ids (the
    # synsets for ImageNet), label_descriptions maps each to its words ("tench, Tinca tinca").
    config["label_names"] = classes
    if descriptions:
        config["label_descriptions"] = descriptions
    # The same facts in timm's own layout, which timm reads before any other key: with timm's classifier
    # the bundle then loads as timm.create_model("hf-hub:USER/NAME" or "local-dir:BUNDLE", pretrained=True).
    config["pretrained_cfg"] = {
        "num_classes": len(classes),
        "label_names": classes,
        "input_size": config["input_size"],
        "mean": config["mean"],
        "std": config["std"],
        "interpolation": "bilinear",
        "crop_pct": phase.eval_crop_fraction,
        "crop_mode": "center",
        **({"label_descriptions": descriptions} if descriptions else {}),
    }
    config["preprocessing"] = preprocessing(config)
    weights = _weights(state)
    try:  # the bundle must load as inference.py will load it
        inference.build_model(config).load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise BundleError(f"the weights of {ckpt} do not fit {config['architecture']} with head {head or 'timm default'!r}: {err}") from None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic.staging_path(out, private=True)  # two exports of one run (report, push) may overlap
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(weights, str(tmp / inference.WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / inference.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(Path(inference.__file__), tmp / "inference.py")
        examples, note = _write_examples(recipe, classes, tmp / "examples")
        if note:
            print(f"export: {note}", file=sys.stderr)
        if onnx:
            config["onnx"] = onnx_model.write_onnx(tmp)
            diff = config["onnx"]["max_abs_diff"]
            print(f"export: model.onnx differs from PyTorch by at most {diff:.3g} on a logit ({config['onnx']['checked_on']})", file=sys.stderr)
            if not diff <= onnx_model.TOLERANCE:  # also NaN
                raise BundleError(f"model.onnx differs from the PyTorch model by {diff:.3g} on a logit (tolerance {onnx_model.TOLERANCE}); "
                                  "no bundle written. Export without --onnx, or report the architecture")
            (tmp / inference.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(config, info, recipe, examples, note))
        return atomic.swap_in(tmp, out)  # a re-export: the previous bundle is replaced only now
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
