"""Launching a training run: `run(recipe)` reads the command line, `train()` opens the run folder, starts
the Accelerator and trains the phases in order, fresh or resumed."""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object

from loaders.dali import dali_device_id, preflight_decode, resolve_decode_device
from loaders.sources import DataError, imbalance_hint, label_balance
from loaders.survey import Survey
from trainer.atomic import remove_leftovers, write_text_atomic
from trainer.checkpoint import Resumable, StorageError, TrainState, free_space
from trainer.command_line import parse_args
from trainer.data import Splits, data_checksum, load_splits, phase_splits, report_bad_files
from trainer.holdout import score_test
from trainer.hub import push_in_background
from trainer.loop import Diverged, train_phase
from trainer.machines import check_shared_run_folder, local_run_folder
from trainer.model import check_initial_weights, check_names, create_model, initialize
from trainer.optim import class_weights
from trainer.preemption import Preempted, StopSignals
from trainer.recipe import CLASS_AVERAGED_METRICS, Recipe, RecipeError, resolve_recipe
from trainer.run_folder import (
    CHECKPOINTS_DIR,
    RESOLVED_RECIPE,
    RUN_INFO,
    STATE_FILE,
    newest_checkpoint,
    read_json,
    read_state,
)
from trainer.tracking import RunLog, start_trackers, throughput_summary, trackers_ready
from trainer.transfer import ensure_head, parameter_counts

# Exit codes (besides 0): each says whether a checkpoint was written and what to do next.
EXIT_BAD_INPUT = 2  # a recipe, argument or dataset problem found before any work
EXIT_DIVERGED = 3  # max_nonfinite_steps non-finite losses in a row; the last good state was saved
EXIT_STORAGE = 4  # a checkpoint or log could not be written; the previous checkpoint is intact
# 130 (SIGINT) and 143 (SIGTERM): preempted; a checkpoint of the step reached was written
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES}


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
        if (path / STATE_FILE).is_file():  # a checkpoint folder: <run>/<phase>/checkpoints/<ckpt>
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


def run(recipe: Recipe, argv: list[str] | None = None, survey: Survey | None = None) -> Path:
    """Train `recipe` with the command line's overrides; returns the run folder. `survey`: the dataset's
    listing, started before the imports (`trainer.run`)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        recipe = resolve_recipe(recipe, args.set, args.data)
        return train(recipe, run_dir=args.run_dir, resume=args.resume, survey=survey)
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
    finally:
        if argv is None:  # the process's own command line: it ends when this returns
            # What the run built, on every way out, as `trainer.run` froze what the imports built: the
            # interpreter's last sweep at exit skips it (1.5 s of a one-epoch quickstart's exit, with both).
            gc.freeze()


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


def train(recipe: Recipe, run_dir: str | None = None, resume: str | None = None, survey: Survey | None = None) -> Path:
    """Train `recipe` in a new run folder, or continue one (`resume`: "auto", a run folder or a
    checkpoint); returns the run folder. `survey`: the dataset's listing, when one was started earlier."""
    check_names(recipe)
    # The processes first: they share out the structure check of the files (trainer/data.py).
    accelerator = create_accelerator(log_with="wandb" if recipe.logging.wandb else None)
    splits = load_splits(recipe, survey)
    num_classes = len(splits.train.classes)
    # Every process must agree on the folder (timestamps differ by a second across processes).
    found = [_find_run_dir(recipe, run_dir, resume) if accelerator.is_main_process else None]
    broadcast_object_list(found)
    run_path, resume_from = local_run_folder(Path(found[0][0]), found[0][1], run_dir, resume)
    if resume_from is None and (run_path / RUN_INFO).exists() and not resume:
        raise RecipeError(f"{run_path} already holds a run; pass --resume auto to continue it, or another --run-dir")
    if run_path.exists() and not run_path.is_dir():
        raise RecipeError(f"--run-dir {run_path} is a file, not a folder")
    # Initial weights of the phases still to start: found and fitting, before the run folder exists.
    check_initial_weights(recipe, num_classes, read_state(resume_from)["phase_index"] + 1 if resume_from else 0)
    # Every process sees the run folder (one filesystem on every machine), or a clear stop before any work.
    processes = check_shared_run_folder(accelerator, run_path)
    info = RunInfo(run_path, accelerator, recipe, splits)
    info.update(processes=processes)
    accelerator.print(f"run folder: {run_path}")
    if info.record["class_balance"]["hint"]:
        accelerator.print(f"hint: {info.record['class_balance']['hint']}")
    report_bad_files(splits, recipe, run_path, accelerator)
    if recipe.logging.wandb:
        config = {**recipe.to_dict(), "git": info.record["git"], "num_processes": accelerator.num_processes}
        start_trackers(accelerator, project=recipe.logging.project, run_name=run_path.name, run_id=info.record["wandb_id"], run_dir=run_path, config=config)

    log = RunLog(run_path, accelerator)
    start_phase = resume_point(accelerator, log, resume_from) if resume_from is not None else 0
    if resume_from is None and resume:  # killed before its first checkpoint: start over, dropping the records of the steps it lost
        log.rewind(0, 0, 0)
    model = create_model(recipe, num_classes=num_classes)
    # data.decode_mode "auto" becomes "roi" or "full" here, once, by a trial decode before any training.
    recipe = decide_decode_mode(recipe, splits, accelerator)
    # SIGTERM/SIGINT from here on: finish the step, checkpoint, exit 143/130 (trainer/preemption.py).
    signals = StopSignals().install()
    resumable = Resumable()
    accelerator.register_for_checkpointing(resumable)
    state = TrainState()
    try:
        for index, phase in enumerate(recipe.phases):
            if index < start_phase:  # done before the resume: only its head shape matters now
                ensure_head(model, phase.head, num_classes, phase.head_dropout)
                continue
            resuming = resume_from is not None and index == start_phase
            if not resuming:  # resume restores the weights; init is for fresh phases only
                accelerator.print(f"[{phase.name}] init: {initialize(model, recipe, phase, run_path)}")
            ensure_head(model, phase.head, num_classes, phase.head_dropout)
            data, subset_counts = phase_splits(splits, recipe, index, run_path, accelerator)
            params = parameter_counts(model, phase)  # before training: freezing as the phase starts
            state = train_phase(
                accelerator, recipe, index, model, data, run_path, state, resumable, log,
                resume_from=resume_from if resuming else None, signals=signals,
            )
            info.phase_done(phase.name, state, model, subset_counts, params=params, loss_weights=phase_loss_weights(recipe, data))
    finally:
        log.curves.wait()  # the last curves.png is on disk before the run returns (or raises)
    signals.uninstall()
    if splits.test is not None and len(splits.test):  # after the last phase: nothing that selects weights can see it
        score_test(accelerator, recipe, run_path, model, splits.test)
    elif splits.test is not None:
        accelerator.print("test split: no images (each class too small for data.test_fraction to take one); not scored")
    trackers_ready()
    accelerator.end_training()
    summary_lines, summary = throughput_summary(log.history())
    for line in summary_lines:
        accelerator.print(line)
    info.update(throughput=summary)
    accelerator.print(f"done. run folder: {run_path}")
    if recipe.push.space and accelerator.is_main_process:
        # Training is over and saved; the upload runs beside this process's exit work and is waited for
        # (huggingface_hub's thread pools refuse work once the interpreter shuts down). Failures never
        # raise: they are printed and written to push.json, and the bundle stays local.
        push_in_background(run_path, recipe.push.space, recipe.push.model_repo or None, recipe.push.private, report=accelerator.print).join()
    return run_path


def decide_decode_mode(recipe: Recipe, splits: Splits, accelerator) -> Recipe:
    """The recipe with data.decode_mode "auto" decided once for the run: the main process runs the trial
    decode (`loaders.dali.preflight_decode`, a child process on the GPU, nothing on the CPU) and every
    process takes its answer, so all ranks build the same graph. Says why when it ran a trial."""
    if recipe.data.decode_mode != "auto":
        return recipe
    device = accelerator.device
    decided = [None]
    if accelerator.is_main_process:
        device_id = dali_device_id(device)
        decided = [preflight_decode(splits.train, recipe.data.decode_device, device_id, sizes=splits.train.sizes)]
    broadcast_object_list(decided)
    mode, why = decided[0]
    if resolve_decode_device(recipe.data.decode_device) != "cpu":
        accelerator.print(why)
    return replace(recipe, data=replace(recipe.data, decode_mode=mode))


def resume_point(accelerator, log: RunLog, resume_from: Path) -> int:
    """The phase to resume in; the run's logs are rewound to the checkpoint, and a checkpoint written
    by another number of processes is noted."""
    saved = read_state(resume_from)
    log.rewind(saved["phase_index"], saved["epoch"], saved["total_step"])
    if accelerator.is_main_process:
        # A kill while a checkpoint was written or pruned leaves a `.tmp-` folder; the next write into
        # that phase's folder removes it, but an earlier phase's folder is never written again.
        for checkpoints_dir in log.history_path.parent.glob(f"*/{CHECKPOINTS_DIR}"):
            remove_leftovers(checkpoints_dir)
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
    return saved["phase_index"]


class RunInfo:
    """run.json: what the run is (commit, processes, data, classes) and how each phase ended; the main
    process writes it when the run starts (with recipe.json), after each phase, and at the end."""

    def __init__(self, run_path: Path, accelerator, recipe: Recipe, splits: Splits) -> None:
        self.path, self.accelerator = run_path / RUN_INFO, accelerator
        record = read_json(self.path) if self.path.exists() else {}
        # Every process must train on the same files, sizes and findings (the shards assume it).
        data_checksums = gather_object([data_checksum(splits)])
        record.update(
            recipe=recipe.name,
            run_name=run_path.name,
            wandb_id=record.get("wandb_id") or uuid.uuid4().hex[:12],
            git=git_commit(Path(sys.argv[0]).resolve().parent if sys.argv[0] else Path.cwd()),
            distributed_type=accelerator.distributed_type.value,
            num_processes=accelerator.num_processes,
            device=str(accelerator.device),
            data=recipe.data.path,
            train_images=len(splits.train),
            val_images=len(splits.val),
            test_images=len(splits.test) if splits.test is not None else 0,
            classes=list(splits.train.classes),
            data_checksums=data_checksums,
            class_balance=run_class_balance(recipe, splits),
        )
        record.setdefault("phases", {})
        self.record = record
        # wall_s: the run's wall-clock seconds up to its last finished phase, summed over sessions (resumes add theirs).
        self.session_start_s, self.wall_before_s = time.time(), float(record.get("wall_s", 0.0))
        if accelerator.is_main_process:
            run_path.mkdir(parents=True, exist_ok=True)
            write_text_atomic(run_path / RESOLVED_RECIPE, recipe.to_json())
        self.update()
        accelerator.wait_for_everyone()
        if len(set(data_checksums)) != 1:
            raise RuntimeError(f"the screened data differ across processes: {data_checksums}")

    def update(self, **fields) -> None:
        self.record.update(fields)
        if self.accelerator.is_main_process:
            write_text_atomic(self.path, json.dumps(self.record, indent=2))

    def phase_done(self, name: str, state: TrainState, model: torch.nn.Module, subset_counts: dict,
                   params: dict | None = None, loss_weights: dict | None = None) -> None:
        """The phase's results, with a checksum of the weights from every process: DDP must leave them identical."""
        checksums = gather_object([parameter_checksum(model)])
        if self.accelerator.is_main_process:
            self.record["phases"][name] = {
                "best_top1": state.best_top1,
                "best_source": state.best_source,
                "best_epoch": state.best_epoch,
                "last_val": state.last_val,
                "steps": state.step,
                "param_checksums": checksums,
                "subset_class_counts": subset_counts,
                "stopped_early": state.stopped_early,
                "params": params,  # total, trainable, frozen (trainer.transfer.parameter_counts)
            }
            if loss_weights is not None:
                self.record["phases"][name]["loss_weights"] = loss_weights
            self.update(wall_s=self.wall_before_s + time.time() - self.session_start_s)
        if len(set(checksums)) != 1:
            raise RuntimeError(f"weights differ across processes after phase {name}: {checksums}")


def run_class_balance(recipe: Recipe, splits: Splits) -> dict:
    """run.json's class_balance: images per class and the largest/smallest ratio of train and val, the hint
    when unbalanced (naming only the remedies the recipe does not use yet), data.balance, and with
    data.balance="loss" the weights from the train counts."""
    classes = list(splits.train.classes)
    train, val = label_balance(splits.train.labels, classes), label_balance(splits.val.labels, classes)
    class_averaged = all(phase.early_stop_metric in CLASS_AVERAGED_METRICS for phase in recipe.phases)
    hint = imbalance_hint(train, val, balance=recipe.data.balance, class_averaged=class_averaged)
    record = {"train": train, "val": val, "hint": hint, "balance": recipe.data.balance}
    if recipe.data.balance == "loss":
        record["loss_weights"] = class_weight_table(splits.train.labels, classes)
        record["loss_weights_formula"] = "n / (k * count_c): n train images, k classes with images, count_c images of class c"
    return record


def class_weight_table(labels, classes: list[str]) -> dict[str, float]:
    """data.balance="loss"'s weight per class name (trainer.optim.class_weights of the label counts)."""
    weights = class_weights(np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes)))
    return {name: float(w) for name, w in zip(classes, weights)}


def phase_loss_weights(recipe: Recipe, data: Splits) -> dict[str, float] | None:
    """The weights a phase trained with (its own train images: a subset's counts when it has one)."""
    return class_weight_table(data.train.labels, list(data.train.classes)) if recipe.data.balance == "loss" else None


def parameter_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
