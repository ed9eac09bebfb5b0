"""The untouched test split: scored once, at the end of a run, with the weights the run hands on (the best
checkpoint of its last phase, model or EMA as `export` picks them), through val's own eval loader; the
scores become the `test` section of that phase's eval.json and the test/ keys of the W&B run's summary.

Nothing reads them back: best checkpoints, early stopping, the plateau schedule and phase chaining all
read val, and the test split is first touched here, after the last phase.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.loop import autocast_for, build_eval_loader, resolve_precision
from trainer.metrics import evaluate, scores_report
from trainer.recipe import Recipe
from trainer.run_folder import EVAL_FILE, checkpoint_weights, last_phase_checkpoint, read_json
from trainer.tracking import log_test_scores, write_eval_json


def score_test(accelerator, recipe: Recipe, run_dir: Path, model: torch.nn.Module, test_source) -> dict[str, Any]:
    """Every process: load the run's final best weights into `model` (the run's own, its training over),
    score `test_source` with the eval transform of the phase they come from, each image counted once;
    the main process adds the `test` section to that phase's eval.json (and, with W&B on, test/top1 and the
    rest to the W&B run's summary). Returns the section."""
    index, ckpt = last_phase_checkpoint(run_dir, recipe)
    phase = recipe.phases[index]
    weights, source, described = checkpoint_weights(ckpt)
    model.load_state_dict(weights, strict=True)
    autocast = autocast_for(resolve_precision(phase.precision, accelerator.device), accelerator.device)
    loader = build_eval_loader(recipe, phase, test_source, accelerator)
    classes = list(test_source.classes)
    scores = evaluate(model, loader, accelerator, autocast, num_classes=len(classes))
    section = {"split": "test", "samples": scores["samples"], "weights": described, "source": source, **scores_report(scores, classes)}
    if accelerator.is_main_process:
        path = run_dir / phase.name / EVAL_FILE
        record = read_json(path) if path.is_file() else {"phase": phase.name, "classes": classes}
        write_eval_json(path, {**record, "test": section})
        if recipe.logging.wandb:
            log_test_scores(accelerator, section)
    accelerator.print(
        f"test split ({section['samples']} images, {source} weights of phase {phase.name}, scored once): "
        f"top-1 {section['top1']:.4f}  top-5 {section['top5']:.4f}  (in {run_dir / phase.name / EVAL_FILE})"
    )
    accelerator.free_memory()
    return section
