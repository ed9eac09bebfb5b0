"""Scoring saved weights, the work of `python -m trainer eval`: a run's best checkpoint (model and EMA) or
an exported bundle, on the val, train or test split, through training's own DALI eval loader, as an eval.json
record (`trainer.metrics.eval_report`), and that record as a readable table."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loaders.sources import DataError
from trainer import inference
from trainer.class_names import display_names
from trainer.data import load_splits
from trainer.launch import create_accelerator
from trainer.loop import autocast_for, build_eval_loader, resolve_precision
from trainer.metrics import eval_report, evaluate, most_confused
from trainer.model import create_model
from trainer.recipe import Phase, Recipe, RecipeError, apply_overrides
from trainer.run_folder import (
    RESOLVED_RECIPE,
    RUN_INFO,
    checkpoint_weight_sets,
    last_phase_checkpoint,
    load_run,
    read_recipe,
)
from trainer.transfer import ensure_head

SPLITS = ("val", "train", "test")
PER_CLASS_ROWS = 30  # more classes than this: the table shows the lowest-accuracy ones (the JSON has all)


@dataclass
class Target:
    """What to score and how: the recipe supplies the data, the eval transform and the precision."""

    recipe: Recipe
    phase: Phase  # its eval settings, batch size and precision are used
    phase_name: str  # the phase the weights come from
    classes: list[str]
    model: torch.nn.Module
    weights: dict[str, dict[str, torch.Tensor]]  # "model" and, when there is one, "ema"
    described: str


def run_target(run_dir: Path, data: str | None) -> Target:
    """The best checkpoint of the run's last phase that left one: its model weights and its EMA's."""
    recipe, info = load_run(run_dir, data)
    index, ckpt = last_phase_checkpoint(run_dir, recipe)
    classes = list(info["classes"])
    model = create_model(recipe, len(classes))
    for phase in recipe.phases[: index + 1]:  # the heads the run gave the model, phase by phase
        ensure_head(model, phase.head, len(classes), phase.head_dropout)
    phase = recipe.phases[index]
    return Target(recipe, phase, phase.name, classes, model, checkpoint_weight_sets(ckpt), f"best checkpoint of phase {phase.name}: {ckpt}")


def bundle_target(bundle_dir: Path, data: str | None) -> Target:
    """A bundle's one set of weights, with the eval transform its config.json records. The data come from
    --data, else from the run folder the bundle sits in (runs/<run>/bundle)."""
    try:
        bundle = inference.load_bundle(bundle_dir)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise RecipeError(f"cannot load bundle {bundle_dir}: {err}") from None
    config = bundle.config
    run_dir = bundle_dir.resolve().parent
    # The run's recipe, when there is one, also gives the split (val_fraction, seed) and loader settings.
    base = read_recipe(run_dir) if (run_dir / RESOLVED_RECIPE).is_file() else Recipe(name="bundle", phases=(Phase(),))
    path = data or base.data.path
    if not path:
        raise RecipeError(f"bundle {bundle_dir} does not say where its data are: pass --data PATH")
    recipe = apply_overrides(base, [f"data.path={path}"])
    size_px = int(config["input_size"][1])
    phase = dataclasses.replace(recipe.phases[-1], eval_res_px=size_px, eval_crop_fraction=float(config["crop_fraction"]))
    recipe = dataclasses.replace(
        recipe, data=dataclasses.replace(recipe.data, mean=tuple(config["mean"]), std=tuple(config["std"])), phases=(phase,)
    )
    phase_name = config.get("metrics", {}).get("phase", phase.name)
    return Target(recipe, phase, phase_name, bundle.classes, bundle.model, {"model": bundle.model.state_dict()}, f"bundle {bundle_dir}")


def evaluate_saved(path: str | Path, data: str | None = None, split: str = "val", tta: str = "none") -> dict[str, Any]:
    """The eval.json record of the weights at `path` (a run folder or a bundle) on `split`, on every
    process; with several processes each sample is counted once. `tta="flip"`: each batch is scored as
    the mean of the softmax of its images and of their mirrors (`inference.class_probs`); the record's
    "tta" says which."""
    path = Path(path)
    if split not in SPLITS:
        raise RecipeError(f"split must be one of {SPLITS}, got {split!r}")
    if tta not in inference.TTA_MODES:
        raise RecipeError(f"--tta must be one of {inference.TTA_MODES}, got {tta!r}")
    if not path.is_dir():
        raise RecipeError(f"{path} is not a folder: pass a run folder or a bundle folder")
    if (path / RUN_INFO).is_file():
        target = run_target(path, data)
    elif (path / inference.CONFIG_FILE).is_file():
        target = bundle_target(path, data)
    else:
        raise RecipeError(f"{path} is neither a run folder (with {RUN_INFO}) nor a bundle (with {inference.CONFIG_FILE} and {inference.WEIGHTS_FILE})")
    splits = load_splits(target.recipe)
    source = {"val": splits.val, "train": splits.train, "test": splits.test}[split]
    if source is None:
        raise RecipeError(
            f"{path} has no test split: {target.recipe.data.path} has no test/ folder (nor a Hugging Face test split "
            f"beside a validation one) and data.test_fraction is {target.recipe.data.test_fraction}; pass --data PATH "
            "to a dataset with a test/ folder of the same classes, or train with one"
        )
    if list(source.classes) != target.classes:
        raise DataError(
            f"the classes of {target.recipe.data.path} ({len(source.classes)}: {', '.join(list(source.classes)[:5])}, ...) "
            f"are not those the weights were trained on ({len(target.classes)}: {', '.join(target.classes[:5])}, ...)"
        )

    accelerator = create_accelerator()
    autocast = autocast_for(resolve_precision(target.phase.precision, accelerator.device), accelerator.device)
    loader = build_eval_loader(target.recipe, target.phase, source, accelerator)
    model = target.model.to(accelerator.device)
    if target.recipe.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    scores = {}
    for name, state in target.weights.items():
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise RecipeError(f"the {name} weights of {target.described} do not fit {target.recipe.model.arch}: {err}") from None
        # The loader's batch tensor is flipped inside the wrapper; its output is the log of the mean probabilities.
        scored = model if tta == "none" else inference.WithTTA(model, tta)
        scores[name] = evaluate(scored, loader, accelerator, autocast, num_classes=len(target.classes))
    record = eval_report(
        phase=target.phase_name, split=split, classes=target.classes, weights=target.described, model=scores["model"], ema=scores.get("ema")
    )
    record["tta"] = tta
    return record


def format_report(record: dict[str, Any]) -> str:
    """The eval record as a table: overall scores (model and EMA side by side), per-class accuracy and
    the most confused pairs."""
    blocks = [("model", record["model"])] + ([("ema", record["ema"])] if record["ema"] is not None else [])
    header = "".join(f"{name:>10}" for name, _ in blocks)
    lines = [
        f"{record['weights']}",
        f"phase {record['phase']}, split {record['split']}: {record['samples']} images, {len(record['classes'])} classes",
        *(["test-time augmentation: flip (mean of the softmax of each image and its mirror)"] if record.get("tta", "none") != "none" else []),
        "",
        f"{'':<22}{header}",
    ]
    for key, label in (
        ("top1", "top-1"), ("top5", "top-5"), ("loss", "loss"),
        ("precision_macro", "precision (macro)"), ("recall_macro", "recall (macro)"), ("f1_macro", "F1 (macro)"),
        ("precision_weighted", "precision (weighted)"), ("recall_weighted", "recall (weighted)"), ("f1_weighted", "F1 (weighted)"),
    ):
        lines.append(f"{label:<22}" + "".join(f"{scores[key]:>10.4f}" for _, scores in blocks))
    classes = record["classes"]
    named = dict(zip(classes, display_names(classes)))  # ImageNet synsets: "tench", with the folder in a last column
    folders = any(named[c] != c for c in classes)
    per_class = record["model"]["per_class"]
    shown = classes
    title = "accuracy per class"
    if len(classes) > PER_CLASS_ROWS:
        shown = sorted(classes, key=lambda c: (per_class[c]["accuracy"], c))[:PER_CLASS_ROWS]
        title += f" (the {PER_CLASS_ROWS} lowest of {len(classes)}, by the model's; all are in the JSON)"
    width = max(22, max(len(named[c]) for c in shown) + 2)
    lines += ["", title, f"{'class':<{width}}" + header + f"{'images':>10}" + ("  folder" if folders else "")]
    for name in shown:
        lines.append(f"{named[name]:<{width}}" + "".join(f"{s['per_class'][name]['accuracy']:>10.4f}" for _, s in blocks)
                     + f"{per_class[name]['support']:>10}" + (f"  {name}" if folders else ""))
    for name, scores in blocks:
        pairs = most_confused(scores["confusion"], [named[c] for c in classes])
        lines += ["", f"most confused ({name}): true -> predicted, images"]
        lines += [f"  {t} -> {p}: {n}" for t, p, n in pairs] or ["  none: every image got its own class"]
    return "\n".join(lines)
