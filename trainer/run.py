"""`run(recipe)`: the command line, the run folder, the Accelerator, and the phases in order (fresh or resumed)."""

from __future__ import annotations

import argparse
import difflib
import errno
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed

from loaders.checks import screen_splits, screening_lines, screening_record
from loaders.digits import resolve_data_path
from loaders.hf import PREFIX as HF_PREFIX
from loaders.hf import hf_splits
from loaders.sources import DataError, image_folder_splits, stratified_split
from trainer.checkpoint import (
    Resumable,
    StorageError,
    TrainState,
    checkpoint_weights,
    free_space,
    newest_checkpoint,
    phase_checkpoint,
    read_state,
)
from trainer.loop import Diverged, Splits, train_phase
from trainer.preemption import Preempted, StopSignals
from trainer.recipe import Phase, Recipe, RecipeError, apply_overrides
from trainer.tracking import RunLog, start_trackers, throughput_summary, write_text_atomic
from trainer.transfer import (
    InitError,
    check_kept_head,
    ensure_head,
    fitting_weights,
    load_weights,
    pretrained_file,
    read_state_file,
)

RUN_INFO = "run.json"
RESOLVED_RECIPE = "recipe.json"
BAD_FILES = "bad_files.json"  # what the data check before training skipped, converted and kept
# Exit codes (besides 0): each says whether a checkpoint was written and what to do next.
EXIT_BAD_INPUT = 2  # a recipe, argument or dataset problem found before any work
EXIT_DIVERGED = 3  # max_nonfinite_steps non-finite losses in a row; the last good state was saved
EXIT_STORAGE = 4  # a checkpoint or log could not be written; the previous checkpoint is intact
# 130 (SIGINT) and 143 (SIGTERM): preempted; a checkpoint of the step reached was written
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES}


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
        raise SystemExit(EXIT_BAD_INPUT) from None
    except Preempted as err:
        print(f"preempted: {err}", file=sys.stderr, flush=True)
        raise SystemExit(err.exit_code) from None
    except Diverged as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_DIVERGED) from None
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STORAGE) from None
    except OSError as err:
        if err.errno not in STORAGE_ERRNOS:
            raise
        # A log or record write (history.jsonl, run.json, ...): checkpoints are written atomically,
        # so the newest complete one is still there for --resume auto.
        where = err.filename or "the run folder"
        print(f"error: cannot write {where}: {err.strerror}; {free_space(Path(where).parent)}. "
              "Free some space (or make the folder writable) and continue with --resume auto", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STORAGE) from None


def load_splits(recipe: Recipe) -> Splits:
    """The recipe's train and val sources (an ImageFolder, or `builtin:digits`)."""
    if not recipe.data.path:
        raise RecipeError("no data: pass --data PATH (an ImageFolder) or set data.path in the recipe")
    if recipe.data.path.startswith(HF_PREFIX):
        train_src, val_src = hf_splits(recipe.data.path, recipe.data.val_fraction, recipe.seed)
    else:
        train_src, val_src = image_folder_splits(resolve_data_path(recipe.data.path), recipe.data.val_fraction, recipe.seed)
    # Files the decoder would fail on are found here, by a header check (no decode), on every process
    # alike: what is skipped is a function of the files' bytes, so all ranks and every resume agree.
    train_src, val_src = screen_splits(train_src, val_src, recipe.data.bad_files)
    return Splits(train=train_src, val=val_src)


def report_bad_files(splits: Splits, recipe: Recipe, run_path: Path, accelerator) -> None:
    """What the check before training skipped and what the decoder will convert: printed, and listed
    in <run>/bad_files.json (files a loader replaces later, mid-run, are logged as they are found)."""
    record = screening_record(splits.train, splits.val, recipe.data.bad_files)
    path = run_path / BAD_FILES
    if accelerator.is_main_process:
        write_text_atomic(path, json.dumps(record, indent=2))
    for line in screening_lines(record, str(path)):
        accelerator.print(line)


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
        write_text_atomic(cache, json.dumps(record))
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
    """Load the phase's initial weights (weights only). A head of another class count stays new, except
    that a weights file must fit a head the phase keeps (`check_kept_head`)."""
    if not phase.init:
        return "weights carried over"
    state, what = initial_state(recipe, phase, run_path)
    if is_weights_file(phase.init):
        check_kept_head(model, state, phase, what)
    skipped = load_weights(model, state, what)
    return what + (f" (new head: {', '.join(skipped)})" if skipped else "")


def is_weights_file(init: str) -> bool:
    return bool(init) and init != "pretrained" and not init.startswith("phase:")


def initial_state(recipe: Recipe, phase: Phase, run_path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights `phase.init` names (not ""), and a description of where they come from."""
    init = phase.init
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
    return state, what


def check_names(recipe: Recipe) -> None:
    """model.arch and every phase's optimizer are names timm knows: a typo stops here, before any
    data is read, instead of after the run folder is made."""
    arch = recipe.model.arch
    if ":" not in arch and not timm.is_model(arch):  # "hf-hub:..." and "local-dir:..." are timm's to resolve
        close = difflib.get_close_matches(arch.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
        raise RecipeError(
            f"model.arch {arch!r} is not a timm model" + (f" (close: {', '.join(close)})" if close else "")
            + "; list them with: python -c \"import timm; print(timm.list_models('resnet*'))\""
        )
    optimizers = timm.optim.list_optimizers()
    for phase in recipe.phases:
        name = phase.optimizer.lower().split("_")[-1]  # as timm parses it: "lookahead_adamw" is adamw
        if name not in optimizers:
            close = difflib.get_close_matches(name, optimizers, n=5, cutoff=0.6)
            raise RecipeError(
                f"phase {phase.name!r}: optimizer {phase.optimizer!r} is not a timm optimizer"
                + (f" (close: {', '.join(close)})" if close else "") + "; e.g. sgd, momentum, adamw, lamb, lion"
            )


def check_initial_weights(recipe: Recipe, num_classes: int, fresh_from: int) -> None:
    """Every phase from `fresh_from` on that starts from pretrained weights or a file finds them, and
    they fit the model as that phase will see it (its head too, when it keeps it). On a model on the
    meta device: shapes only, no memory and no time spent initialising."""
    if not any(is_weights_file(p.init) or p.init == "pretrained" for p in recipe.phases[fresh_from:]):
        return
    with torch.device("meta"):
        model = timm.create_model(recipe.model.arch, num_classes=num_classes)
    for index, phase in enumerate(recipe.phases):
        if index >= fresh_from and (is_weights_file(phase.init) or phase.init == "pretrained"):
            state, what = initial_state(recipe, phase, Path())  # the run folder is read only by "phase:" inits
            if is_weights_file(phase.init):
                check_kept_head(model, state, phase, what)
            fitting_weights(model, state, what)
        with torch.device("meta"):
            ensure_head(model, phase.head, num_classes, phase.head_dropout)


def create_model(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    """The recipe's timm model with a head for `num_classes`, randomly initialised from the recipe's seed."""
    set_seed(recipe.seed)
    return timm.create_model(
        recipe.model.arch,
        num_classes=num_classes,
        drop_rate=recipe.model.drop_rate,
        drop_path_rate=recipe.model.drop_path_rate,
    )


# How long a process waits in a collective (all-reduce, barrier) for the others before it fails. A dead
# process on the same machine is noticed at once (its sockets close, torchrun stops the rest), but one
# that hangs or whose machine drops off the network would hold every other process for gloo's default
# of 30 minutes. 10 minutes is NCCL's default and far above the longest wait of a healthy run (the main
# process writing a checkpoint or its W&B start-up); IMGCLS_COLLECTIVE_TIMEOUT_S changes it.
COLLECTIVE_TIMEOUT_S = 600.0


def create_accelerator(log_with: str | None = None) -> Accelerator:
    """The Accelerator of a training run (and of `python -m trainer eval`): CUDA when there is a GPU."""
    timeout_s = float(os.environ.get("IMGCLS_COLLECTIVE_TIMEOUT_S", COLLECTIVE_TIMEOUT_S))
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        log_with=log_with,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
    )
    if accelerator.device.type == "cpu":
        # `accelerate launch` sets OMP_NUM_THREADS=1, which on a CPU-only run leaves cores idle
        # (the quickstart ran 1.7x slower): share this machine's cores among its processes instead.
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local_processes))
    return accelerator


def train(recipe: Recipe, run_dir: str | None = None, resume: str | None = None) -> Path:
    check_names(recipe)
    splits = load_splits(recipe)
    train_src, val_src = splits.train, splits.val

    accelerator = create_accelerator(log_with="wandb" if recipe.logging.wandb else None)
    # Every process must agree on the folder (timestamps differ by a second across processes).
    found = [_find_run_dir(recipe, run_dir, resume) if accelerator.is_main_process else None]
    broadcast_object_list(found)
    run_path, resume_from = found[0]
    run_path = Path(run_path)

    info_path = run_path / RUN_INFO
    if resume_from is None and info_path.exists() and not resume:
        raise RecipeError(f"{run_path} already holds a run; pass --resume auto to continue it, or another --run-dir")
    if run_path.exists() and not run_path.is_dir():
        raise RecipeError(f"--run-dir {run_path} is a file, not a folder")
    # Initial weights of the phases still to start: found and fitting, before the run folder exists.
    check_initial_weights(recipe, len(train_src.classes), read_state(resume_from)["phase_index"] + 1 if resume_from else 0)
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
    # wall_s: the run's wall-clock seconds up to its last finished phase, summed over sessions (resumes add theirs).
    session_start_s, wall_before_s = time.time(), float(info.get("wall_s", 0.0))
    if accelerator.is_main_process:
        run_path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_path / RESOLVED_RECIPE, recipe.to_json())
        write_text_atomic(info_path, json.dumps(info, indent=2))
    accelerator.wait_for_everyone()
    accelerator.print(f"run folder: {run_path}")
    report_bad_files(splits, recipe, run_path, accelerator)

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
        written_by = len(list(Path(resume_from).glob("random_states_*.pkl")))  # accelerate saves one per process
        if written_by and written_by != accelerator.num_processes:
            # The loader keeps the samples already trained on in this epoch and goes on after them
            # (loaders/dali.py, TrainLoader.load_state_dict); what cannot be kept is said here.
            accelerator.print(
                f"note: checkpoint was written by {written_by} processes, resuming on {accelerator.num_processes}: "
                "the global batch and the LR scaled from it change, and so does the sample order of the rest of "
                "this epoch; exactness across process counts is not guaranteed"
            )
    elif resume:  # killed before its first checkpoint: start over, dropping the records of the steps it lost
        log.rewind(0, 0, 0)

    model = create_model(recipe, num_classes=len(train_src.classes))
    # SIGTERM/SIGINT from here on: finish the step, checkpoint, exit 143/130 (trainer/preemption.py).
    signals = StopSignals().install()
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
            resume_from=resume_from if resuming else None, signals=signals,
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
            info["wall_s"] = wall_before_s + time.time() - session_start_s
            write_text_atomic(info_path, json.dumps(info, indent=2))
        if len(set(checksums)) != 1:
            raise RuntimeError(f"weights differ across processes after phase {phase.name}: {checksums}")
    signals.uninstall()
    accelerator.end_training()
    summary_lines, summary = throughput_summary(log.history())
    for line in summary_lines:
        accelerator.print(line)
    if accelerator.is_main_process:
        info["throughput"] = summary
        write_text_atomic(info_path, json.dumps(info, indent=2))
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
