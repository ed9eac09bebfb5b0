"""`run(recipe)`: the command line, the run folder, the Accelerator, and the phases in order (fresh or resumed)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object, set_seed

from loaders.digits import resolve_data_path
from loaders.hf import PREFIX as HF_PREFIX
from loaders.hf import hf_splits
from loaders.sources import DataError, image_folder_splits, stratified_split
from trainer.checkpoint import (
    Resumable,
    TrainState,
    checkpoint_weights,
    newest_checkpoint,
    phase_checkpoint,
    read_state,
)
from trainer.loop import Splits, train_phase
from trainer.recipe import Phase, Recipe, RecipeError, apply_overrides
from trainer.tracking import RunLog, start_trackers
from trainer.transfer import InitError, ensure_head, load_weights, pretrained_file, read_state_file

RUN_INFO = "run.json"
RESOLVED_RECIPE = "recipe.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the recipe in this file.",
        epilog="Example: accelerate launch recipes/quickstart.py --set phases.0.epochs=2",
    )
    parser.add_argument("--data", help="dataset folder (overrides data.path)")
    parser.add_argument("--run-dir", help="run folder (default: <runs_root>/<name>-<timestamp>)")
    parser.add_argument(
        "--resume",
        help='"auto": continue the newest complete checkpoint of --run-dir (or of the newest run of this '
        "recipe); or a run folder or checkpoint folder",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field, e.g. phases.0.epochs=2 (repeatable)")
    return parser.parse_args(argv)


def resolve_recipe(recipe: Recipe, args: argparse.Namespace) -> Recipe:
    overrides = list(args.set)
    if args.data:
        overrides.append(f"data.path={args.data}")
    return apply_overrides(recipe, overrides)


def git_commit(where: Path) -> dict[str, object]:
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", "-C", str(where), *cmd], capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"commit": commit or "unknown", "dirty": dirty}


def _find_run_dir(recipe: Recipe, run_dir: str | None, resume: str | None) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from or None)."""
    if resume and resume != "auto":
        path = Path(resume)
        if (path / "trainer_state.json").is_file():  # a checkpoint folder: <run>/<phase>/checkpoints/<ckpt>
            return path.parent.parent.parent, path
        found = newest_checkpoint(path)
        if found is None:
            raise RecipeError(f"--resume {resume}: no complete checkpoint in that folder")
        return path, found
    if run_dir:
        path = Path(run_dir)
    elif resume == "auto":
        runs = sorted(Path(recipe.runs_root).glob(f"{recipe.logging.run_name or recipe.name}-*/{RUN_INFO}"))
        path = runs[-1].parent if runs else None
    else:
        path = None
    if path is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = Path(recipe.runs_root) / f"{recipe.logging.run_name or recipe.name}-{stamp}"
    return path, newest_checkpoint(path) if resume == "auto" else None


def run(recipe: Recipe, argv: list[str] | None = None) -> Path:
    """Train `recipe` with the command line's overrides; returns the run folder."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        recipe = resolve_recipe(recipe, args)
        return train(recipe, run_dir=args.run_dir, resume=args.resume)
    except (RecipeError, DataError) as err:
        # Stops before any work: a clear line and exit status 2, no traceback.
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def load_splits(recipe: Recipe) -> Splits:
    """The recipe's train and val sources (an ImageFolder, or `builtin:digits`)."""
    if not recipe.data.path:
        raise RecipeError("no data: pass --data PATH (an ImageFolder) or set data.path in the recipe")
    if recipe.data.path.startswith(HF_PREFIX):
        train_src, val_src = hf_splits(recipe.data.path, recipe.data.val_fraction, recipe.seed)
    else:
        train_src, val_src = image_folder_splits(resolve_data_path(recipe.data.path), recipe.data.val_fraction, recipe.seed)
    return Splits(train=train_src, val=val_src)


def phase_splits(splits: Splits, recipe: Recipe, index: int, run_path: Path, accelerator) -> tuple[Splits, dict]:
    """The phase's training data: all of it, or a stratified `subset` of each class. The chosen
    indices are cached in <run>/<phase>/subset.json and read back by every process, so all ranks
    and every resume use the same list."""
    phase = recipe.phases[index]
    if phase.subset >= 1.0:
        return splits, {}
    cache = run_path / phase.name / "subset.json"
    if accelerator.is_main_process and not cache.exists():
        _, chosen = stratified_split(splits.train.labels, phase.subset, seed=recipe.seed + 7919 * (index + 1))
        chosen_src = splits.train.subset(chosen)
        record = {"fraction": phase.subset, "indices": chosen.tolist(), "class_counts": chosen_src.class_counts()}
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(cache)
    accelerator.wait_for_everyone()
    record = json.loads(cache.read_text())
    subset = splits.train.subset(record["indices"])
    counts = record["class_counts"]
    accelerator.print(
        f"[{phase.name}] subset {phase.subset:.0%}: {len(subset)} of {len(splits.train)} training images, "
        f"{min(counts.values())}-{max(counts.values())} per class (list in {cache})"
    )
    return Splits(train=subset, val=splits.val), counts


def initialize(model: torch.nn.Module, recipe: Recipe, phase: Phase, run_path: Path) -> str:
    """Load the phase's initial weights (weights only; a head of another class count stays new)."""
    init = phase.init
    if not init:
        return "weights carried over"
    if init.startswith("phase:"):
        source = init[len("phase:"):]
        ckpt = phase_checkpoint(run_path / source)
        if ckpt is None:
            raise InitError(f"phase {phase.name!r}: init {init!r} but phase {source!r} left no checkpoint in {run_path / source}")
        state, _, what = checkpoint_weights(ckpt)
    elif init == "pretrained":
        path = pretrained_file(recipe.model.arch, recipe.model.pretrained_file)
        state, what = read_state_file(path), f"pretrained {recipe.model.arch} from {path}"
    else:
        state, what = read_state_file(Path(init)), f"weights from {init}"
    skipped = load_weights(model, state, what)
    return what + (f" (new head: {', '.join(skipped)})" if skipped else "")


def create_model(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    """The recipe's timm model with a head for `num_classes`, randomly initialised from the recipe's seed."""
    set_seed(recipe.seed)
    return timm.create_model(
        recipe.model.arch,
        num_classes=num_classes,
        drop_rate=recipe.model.drop_rate,
        drop_path_rate=recipe.model.drop_path_rate,
    )


def train(recipe: Recipe, run_dir: str | None = None, resume: str | None = None) -> Path:
    splits = load_splits(recipe)
    train_src, val_src = splits.train, splits.val

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with="wandb" if recipe.logging.wandb else None)
    if accelerator.device.type == "cpu":
        # `accelerate launch` sets OMP_NUM_THREADS=1, which on a CPU-only run leaves cores idle
        # (the quickstart ran 1.7x slower): share this machine's cores among its processes instead.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_processes))
    # Every process must agree on the folder (timestamps differ by a second across processes).
    found = [_find_run_dir(recipe, run_dir, resume) if accelerator.is_main_process else None]
    broadcast_object_list(found)
    run_path, resume_from = found[0]
    run_path = Path(run_path)

    info_path = run_path / RUN_INFO
    if resume_from is None and info_path.exists() and not resume:
        raise RecipeError(f"{run_path} already holds a run; pass --resume auto to continue it, or another --run-dir")
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info.update(
        recipe=recipe.name,
        run_name=run_path.name,
        wandb_id=info.get("wandb_id") or uuid.uuid4().hex[:12],
        git=git_commit(Path(sys.argv[0]).resolve().parent if sys.argv[0] else Path.cwd()),
        distributed_type=accelerator.distributed_type.value,
        num_processes=accelerator.num_processes,
        device=str(accelerator.device),
        data=recipe.data.path,
        train_images=len(train_src),
        val_images=len(val_src),
        classes=list(train_src.classes),
    )
    info.setdefault("phases", {})
    if accelerator.is_main_process:
        run_path.mkdir(parents=True, exist_ok=True)
        (run_path / RESOLVED_RECIPE).write_text(recipe.to_json())
        info_path.write_text(json.dumps(info, indent=2))
    accelerator.wait_for_everyone()
    accelerator.print(f"run folder: {run_path}")

    if recipe.logging.wandb:
        config = {**recipe.to_dict(), "git": info["git"], "num_processes": accelerator.num_processes}
        start_trackers(accelerator, project=recipe.logging.project, run_name=run_path.name, run_id=info["wandb_id"], run_dir=run_path, config=config)

    log = RunLog(run_path, enabled=accelerator.is_main_process)
    state = TrainState()
    start_phase = 0
    if resume_from is not None:
        saved = read_state(resume_from)
        start_phase = saved["phase_index"]
        log.rewind(saved["phase_index"], saved["epoch"], saved["total_step"])
        accelerator.print(f"resuming from {resume_from} (phase {saved['phase_name']}, epoch {saved['epoch']}, step {saved['step']})")

    model = create_model(recipe, num_classes=len(train_src.classes))
    resumable = Resumable()
    accelerator.register_for_checkpointing(resumable)
    num_classes = len(train_src.classes)
    for index, phase in enumerate(recipe.phases):
        if index < start_phase:  # done before the resume: only its head shape matters now
            ensure_head(model, phase.head, num_classes, phase.head_dropout)
            continue
        resuming = resume_from is not None and index == start_phase
        if not resuming:  # resume restores the weights; init is for fresh phases only
            accelerator.print(f"[{phase.name}] init: {initialize(model, recipe, phase, run_path)}")
        ensure_head(model, phase.head, num_classes, phase.head_dropout)
        data, subset_counts = phase_splits(splits, recipe, index, run_path, accelerator)
        state = train_phase(
            accelerator, recipe, index, model, data, run_path, state, resumable, log,
            resume_from=resume_from if resuming else None,
        )
        # A checksum of the weights on every process: DDP must leave them identical.
        checksum = parameter_checksum(model)
        checksums = gather_object([checksum])
        if accelerator.is_main_process:
            info["phases"][phase.name] = {
                "best_top1": state.best_top1,
                "best_source": state.best_source,
                "best_epoch": state.best_epoch,
                "last_val": state.last_val,
                "steps": state.step,
                "param_checksums": checksums,
                "subset_class_counts": subset_counts,
                "stopped_early": state.stopped_early,
            }
            info_path.write_text(json.dumps(info, indent=2))
        if len(set(checksums)) != 1:
            raise RuntimeError(f"weights differ across processes after phase {phase.name}: {checksums}")
    accelerator.end_training()
    accelerator.print(f"done. run folder: {run_path}")
    if recipe.push.space and accelerator.is_main_process:
        from trainer.hub import push_in_background  # huggingface_hub only when pushing

        # Training is over and saved; the upload runs beside this process's exit work and is waited for
        # (huggingface_hub's thread pools refuse work once the interpreter shuts down). Failures never
        # raise: they are printed and written to push.json, and the bundle stays local.
        push_in_background(run_path, recipe.push.space, recipe.push.model_repo or None, recipe.push.private, report=accelerator.print).join()
    return run_path


def parameter_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
