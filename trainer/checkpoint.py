"""Checkpoints: TrainState, the registered parts, and an atomic save through accelerate that keeps the
last checkpoint and the best k.

Layout: <run>/<phase>/checkpoints/step_<global step>/ holds what `Accelerator.save_state` writes
(model, optimizer, RNG states per process, and our registered parts) plus `trainer_state.json`,
written last. The folder is built as `.tmp-step_<n>` and renamed when complete (`trainer.atomic`), so
a checkpoint folder without the `.tmp-` prefix is always whole. Finding and reading checkpoints is
`trainer.run_folder`'s.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError

from trainer import atomic
from trainer.run_folder import (
    STATE_FILE,
    checkpoint_name,
    complete_checkpoints,
    newest_checkpoint,
    rank_score,
    read_state,
)

DISK_FULL_BYTES = 1 << 20  # less free than this after a failed write: the disk filled up


@dataclass
class TrainState:
    """Where training is: phase, epoch and batch of the next step, updates done, best scores."""

    phase_index: int = 0
    phase_name: str = ""
    epoch: int = 0  # the epoch in progress (or next to start)
    batch: int = 0  # batches of `epoch` already trained on
    step: int = 0  # optimizer updates done in this phase
    total_step: int = 0  # optimizer updates across all phases (the W&B step)
    best_top1: float = -1.0
    best_source: str = ""  # "model" or "ema"
    best_epoch: int = -1
    last_val: dict[str, float] = field(default_factory=dict)
    epoch_loss_sum: float = 0.0  # summed train loss of `epoch` up to `batch`, all processes
    epoch_correct: float = 0.0  # train top-1 hits of `epoch` up to `batch`, all processes
    early_best: float = -1e30  # early stopping: best score so far (higher is better)
    early_bad_epochs: int = 0  # epochs since it improved
    stopped_early: bool = False
    skipped_steps: int = 0  # updates dropped for a non-finite loss in this phase
    nonfinite_streak: int = 0  # of those, how many in a row up to now

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def position(self) -> tuple[int, int, int]:
        return (self.phase_index, self.epoch, self.batch)

    def begin_phase(self, phase_index: int, phase_name: str) -> None:
        """Start phase `phase_index` afresh: every field back to its default, except what spans phases
        (`total_step`, the W&B step, and `last_val`, the scores of the weights the phase starts from)."""
        for f in fields(self):
            if f.name not in ("total_step", "last_val"):
                setattr(self, f.name, f.default if f.default_factory is MISSING else f.default_factory())
        self.phase_index, self.phase_name = phase_index, phase_name


class Resumable:
    """The parts `save_state` does not know: registered once with `register_for_checkpointing`.

    accelerate keeps registered objects for the Accelerator's life, but each phase has its own EMA
    and loader; this holder points at the current ones, so one registration serves every phase.
    """

    def __init__(self) -> None:
        self.parts: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.parts) - set(state)
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)}; it was written by a different recipe")
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


class StorageError(Exception):
    """A checkpoint could not be written (disk full, read-only, I/O error); the previous one is intact."""


def free_space(path: Path) -> str:
    """Free space on the filesystem holding `path` (or its nearest existing parent), for messages."""
    for candidate in (Path(path), *Path(path).parents):
        try:
            return f"{shutil.disk_usage(candidate).free / 2**20:.1f} MiB free on {candidate}"
        except OSError:
            continue
    return "free space unknown"


def _first_failure(accelerator, failure: str) -> str:
    """The first process's error message, on every process ("" = none failed): all stop together
    instead of one raising while the others wait for it in the next collective."""
    if accelerator.num_processes == 1:
        return failure
    return next((f for f in gather_object([failure]) if f), "")


def _write_error(err: Exception, folder: Path) -> str:
    """A failed write as a person reads it. torch's zip writer ("unexpected pos 576 vs 534") and
    safetensors ("os error 28") report a full disk without an errno: it is named when the disk is full."""
    said = " ".join(str(err).split())[:300]
    try:
        full = shutil.disk_usage(folder).free < DISK_FULL_BYTES
    except OSError:
        full = False
    if "No space left on device" in said or not (full or "os error 28" in said):
        return said
    return f"No space left on device ({said})"


def save_checkpoint(accelerator, checkpoints_dir: Path, state: TrainState, val_top1: float | None, keep_best_k: int,
                    rank_score: float | None = None) -> Path:
    """Write a complete checkpoint or none: every process writes its part into a temporary folder,
    then the main process adds trainer_state.json and renames the folder into place. Older
    checkpoints are pruned only after that rename. A write error on any process (a full disk, a
    read-only filesystem) removes the temporary folder and raises StorageError on every process.
    `rank_score` (default: `val_top1`) ranks the checkpoint among the phase's best: the phase's
    early_stop_metric when that is val_macro_f1 or val_balanced_accuracy (`run_folder.rank_score`)."""
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / checkpoint_name(state.total_step)
    tmp = atomic.staging_path(final)  # every process writes into it: the same name on all of them
    failure = ""
    if accelerator.is_main_process:
        try:
            checkpoints_dir.mkdir(parents=True, exist_ok=True)
            atomic.remove_leftovers(checkpoints_dir)  # of a run killed mid-write or mid-delete
            # The last checkpoint's size is what this one needs: fail before writing a byte when it
            # cannot fit (torch.save reports a full disk only as a RuntimeError, without errno).
            previous = complete_checkpoints(checkpoints_dir)
            needed_bytes = sum(f.stat().st_size for f in previous[-1].iterdir()) if previous else 0
            if needed_bytes > shutil.disk_usage(checkpoints_dir).free:
                failure = f"No space left on device (it needs about {needed_bytes / 2**20:.1f} MiB)"
        except OSError as err:
            failure = f"{err.strerror or err} ({err.filename or checkpoints_dir})"
    accelerator.wait_for_everyone()
    try:
        if not failure:
            with torch_save_without_crc32():
                accelerator.save_state(str(tmp))
    except OSError as err:
        failure = f"{err.strerror or err} ({err.filename or tmp})"
    except (RuntimeError, SafetensorError) as err:  # torch.save's zip writer and safetensors: no errno
        failure = f"{_write_error(err, checkpoints_dir)} (writing {tmp})"
    failure = _first_failure(accelerator, failure)
    if accelerator.is_main_process and not failure:
        try:
            (tmp / STATE_FILE).write_text(json.dumps({**state.state_dict(), "val_top1": val_top1, "rank_score": val_top1 if rank_score is None else rank_score}, indent=2))
            # Durable: accelerate writes its files without fsync. A folder already at `final` is the
            # same step saved twice (an epoch end on a checkpoint_every_steps boundary): replaced.
            atomic.swap_in(tmp, final, durable=True)
        except OSError as err:
            failure = f"{err.strerror or err} ({err.filename or tmp})"
    failure = _first_failure(accelerator, failure)
    if failure:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space it took; never picked up anyway
        previous = newest_checkpoint(checkpoints_dir.parent.parent)  # the one --resume auto picks, of any phase
        raise StorageError(
            f"cannot write checkpoint {final}: {failure}; {free_space(checkpoints_dir)}. "
            + (f"The previous checkpoint {previous} is intact: " if previous else "No earlier checkpoint of this run exists: ")
            + "free some space (or make the folder writable) and continue with --resume auto"
        )
    if accelerator.is_main_process:
        prune(checkpoints_dir, keep_best_k)  # only now: the new checkpoint is complete
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def torch_save_without_crc32():
    """torch.save without the CRC-32 of every record it writes. torch.load never checks them (a flipped
    byte in a saved tensor loads silently: tests/unit/test_checkpoint.py), and computing them is CPU
    work on every byte: 0.12-0.14 s of the 0.18-0.21 s that torch.save took for the quickstart's AdamW
    state (90 MB) here when the page cache took the bytes at memory speed (0.03 s of 0.23-0.25 s when the
    writes themselves were slow). A checkpoint is whole or absent by its atomic rename, not by its CRCs
    (which `unzip -t` now reports as wrong)."""
    computed = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(computed)


def prune(checkpoints_dir: Path, keep_best_k: int) -> list[Path]:
    """Keep the newest checkpoint and the `keep_best_k` best by `rank_score` (val top-1 unless the phase
    stops on a class-averaged metric); remove the rest."""
    found = [(p, read_state(p)) for p in complete_checkpoints(checkpoints_dir)]
    if not found:
        return []
    newest = max(found, key=lambda item: item[1]["total_step"])[0]
    scored = [item for item in found if rank_score(item[1]) is not None]
    scored.sort(key=lambda item: (rank_score(item[1]), item[1]["total_step"]), reverse=True)
    keep = {newest} | {p for p, _ in scored[:keep_best_k]}
    removed = []
    for path, _ in found:
        if path not in keep:
            atomic.remove(path)
            removed.append(path)
    return removed
