"""The run folder: the names of what training leaves behind, and how to read it back.

```
<run>/recipe.json  run.json  bad_files.json  history.jsonl  steps.jsonl  curves.png  push.json
<run>/<phase>/subset.json  eval.json  checkpoints/step_<N>/{model.safetensors, ..., trainer_state.json}
<run>/bundle/  report/  wandb/
```

Training writes these (`trainer.run`, `loop`, `checkpoint`, `tracking`); `export`, `evaluation`, `report`,
`compare`, `hub` and `lr_find` read them through this module. It imports no torch: `compare` and the
command line read runs without loading torch or DALI, and only the readers of weights load torch, when
they are called.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trainer.atomic import TMP_PREFIX
from trainer.recipe import Recipe, RecipeError, apply_overrides, recipe_from_dict

RESOLVED_RECIPE = "recipe.json"  # the recipe after --set, also the W&B run config
RUN_INFO = "run.json"  # git commit, processes, classes, per-phase results, wall_s, throughput
BAD_FILES = "bad_files.json"  # what the check before training skipped, converted and kept
HISTORY = "history.jsonl"  # one record per epoch
STEPS = "steps.jsonl"  # one record every log_every_steps updates, and each skipped update
CURVES = "curves.png"
PUSH_RECORD = "push.json"  # the outcome of a push at the end of training
BUNDLE_DIR = "bundle"
REPORT_DIR = "report"
SUBSET_FILE = "subset.json"  # <run>/<phase>/: the stratified subset's indices
EVAL_FILE = "eval.json"  # <run>/<phase>/: the phase's final weights scored on val
CHECKPOINTS_DIR = "checkpoints"  # <run>/<phase>/checkpoints/step_<N>/
STATE_FILE = "trainer_state.json"  # written last into a checkpoint: a folder holding it is complete
MODEL_FILE = "model.safetensors"  # accelerate's name for the model's weights in a checkpoint
# accelerate's file for the first object registered for checkpointing, our `Resumable`: the EMA, the
# TrainState, the loader position (and a plateau schedule's counters).
PARTS_FILE = "custom_checkpoint_0.pkl"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# -- records ---------------------------------------------------------------------------------------


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file; RecipeError (exit status 2 on the command line) naming the file when it cannot be read."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as err:
        raise RecipeError(f"cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise RecipeError(f"{path} is not valid JSON: {err}") from None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """history.jsonl or steps.jsonl; [] when missing. A line cut by a kill mid-write is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_recipe(run_dir: Path) -> Recipe:
    try:
        return recipe_from_dict(read_json(run_dir / RESOLVED_RECIPE))
    except TypeError as err:
        raise RecipeError(f"{run_dir / RESOLVED_RECIPE} does not describe a recipe: {err}") from None


def load_run(run_dir: str | os.PathLike, data: str | None = None) -> tuple[Recipe, dict[str, Any]]:
    """The run's resolved recipe (data.path replaced by `data` when given) and run.json."""
    run_dir = Path(run_dir)
    missing = [name for name in (RUN_INFO, RESOLVED_RECIPE) if not (run_dir / name).is_file()]
    if not run_dir.is_dir() or missing:
        why = "it does not exist" if not run_dir.is_dir() else f"{' and '.join(missing)} missing"
        raise RecipeError(f"{run_dir} is not a run folder: {why} (a run folder is what training writes under runs/)")
    recipe = read_recipe(run_dir)
    if data:
        recipe = apply_overrides(recipe, [f"data.path={data}"])
    return recipe, read_json(run_dir / RUN_INFO)


# -- checkpoints -----------------------------------------------------------------------------------


def read_state(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's trainer_state.json: the TrainState it holds, and its val_top1."""
    return json.loads((Path(checkpoint_dir) / STATE_FILE).read_text())


def complete_checkpoints(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders of one phase, oldest first (temporary folders never count)."""
    if not Path(checkpoints_dir).is_dir():
        return []
    return sorted(
        p for p in Path(checkpoints_dir).iterdir()
        if p.is_dir() and not p.name.startswith(TMP_PREFIX) and (p / STATE_FILE).is_file()
    )


def newest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The most advanced complete checkpoint of any phase of the run, or None."""
    best: tuple[tuple[int, int], Path] | None = None
    for phase_dir in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        for ckpt in complete_checkpoints(phase_dir / CHECKPOINTS_DIR):
            state = read_state(ckpt)
            key = (state["phase_index"], state["total_step"])
            if best is None or key > best[0]:
                best = (key, ckpt)
    return best[1] if best else None


def rank_score(state: dict[str, Any]) -> float | None:
    """What ranks a checkpoint among its phase's best: its `rank_score` (the better of model and EMA by
    the phase's val_macro_f1 or val_balanced_accuracy when it stops on one, else by top-1), or, in a
    checkpoint written before that key, its val top-1. None for a checkpoint taken mid-epoch."""
    return state.get("rank_score", state.get("val_top1"))


def best_checkpoint(checkpoints_dir: str | os.PathLike) -> Path | None:
    scored = [(read_state(p), p) for p in complete_checkpoints(checkpoints_dir)]
    scored = [(rank_score(s), s["total_step"], p) for s, p in scored if rank_score(s) is not None]
    return max(scored)[2] if scored else None


def phase_checkpoint(phase_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a phase hands on: its best by val top-1, else its newest complete one, else None."""
    checkpoints = Path(phase_dir) / CHECKPOINTS_DIR
    best = best_checkpoint(checkpoints)
    if best is not None:
        return best
    found = complete_checkpoints(checkpoints)
    return max(found, key=lambda p: read_state(p)["total_step"]) if found else None


def last_phase_checkpoint(run_dir: Path, recipe: Recipe) -> tuple[int, Path]:
    """(phase index, checkpoint) of the last phase that left one: the weights a run ends with, as
    `export` and `eval` read them."""
    for index in reversed(range(len(recipe.phases))):
        ckpt = phase_checkpoint(run_dir / recipe.phases[index].name)
        if ckpt is not None:
            return index, ckpt
    raise RecipeError(f"{run_dir} has no complete checkpoint in any phase ({', '.join(p.name for p in recipe.phases)}); train first")


# -- weights ---------------------------------------------------------------------------------------


def _ema_weights(ckpt: Path) -> dict | None:
    import torch  # only here: the rest of this module reads JSON

    parts = torch.load(ckpt / PARTS_FILE, map_location="cpu", weights_only=False) if (ckpt / PARTS_FILE).is_file() else {}
    if "ema" not in parts:
        return None
    return {k.removeprefix("module."): v for k, v in parts["ema"].items()}  # ModelEmaV3 keeps its copy under `module.`


def checkpoint_weight_sets(checkpoint_dir: str | os.PathLike) -> dict[str, dict]:
    """A checkpoint's model weights and, when it saved an EMA, the EMA's: {"model": ..., "ema": ...}."""
    from safetensors.torch import load_file

    ckpt = Path(checkpoint_dir)
    weights = {"model": load_file(str(ckpt / MODEL_FILE))}
    ema = _ema_weights(ckpt)
    if ema is not None:
        weights["ema"] = ema
    return weights


def checkpoint_weights(checkpoint_dir: str | os.PathLike) -> tuple[dict, str, str]:
    """The better weights of a checkpoint: (state dict, "ema" or "model", a description). The EMA's
    when its val top-1 at that checkpoint beat the model's and it was saved, else the model's (by the
    phase's macro F1 or balanced accuracy instead of top-1 when it stops on one: `last_val["rank_by"]`)."""
    from safetensors.torch import load_file

    ckpt = Path(checkpoint_dir)
    scores = read_state(ckpt).get("last_val", {})
    key = scores.get("rank_by", "top1")
    if scores.get(f"ema_{key}") is not None and scores[f"ema_{key}"] > scores.get(key, -1):
        ema, named = _ema_weights(ckpt), "top-1" if key == "top1" else key.replace("_", " ")
        if ema is not None:
            return ema, "ema", f"EMA weights of {ckpt} (EMA {named} {scores[f'ema_{key}']:.4f} > model {scores[key]:.4f})"
    return load_file(str(ckpt / MODEL_FILE)), "model", f"weights of {ckpt}"
