"""The training loop: one phase, top to bottom.

`train_phase` builds the phase (`set_up_phase`: loaders, model, optimizer, schedule, EMA and loss, the
LR finder's set-up too), restores or begins its `TrainState`, then runs the epochs: per batch a forward
and backward pass (`PhaseRun.train_batch`), per optimizer update the skip and stop decisions, the step,
the EMA, the logs and the checkpoints (`PhaseRun.finish_update`), per epoch the evaluation of model and
EMA, one record for history.jsonl, W&B and the console, early stopping and a checkpoint
(`PhaseRun.end_epoch`). At the phase's end the main process writes the phase's eval.json.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from timm.data.random_erasing import RandomErasing
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from loaders.dali import EvalLoader, TrainAugment, TrainLoader, dali_device_id
from trainer.checkpoint import Resumable, TrainState, save_checkpoint
from trainer.data import Splits
from trainer.metrics import eval_report, evaluate, sample_indices, sample_predictions
from trainer.model import configure_device
from trainer.optim import (
    GuardedUpdate,
    PlateauLR,
    build_criterion,
    build_optimizer,
    capture_steps_on_device,
    class_weights,
    ema_decay_for,
)
from trainer.preemption import Preempted, StopSignals
from trainer.recipe import CLASS_AVERAGED_METRICS, Phase, Recipe
from trainer.run_folder import CHECKPOINTS_DIR, EVAL_FILE, checkpoint_name, read_state
from trainer.tracking import RunLog, log_phase_eval, write_eval_json
from trainer.transfer import apply_freeze, freeze_batchnorm_stats, frozen_group_count, stage_groups

COMPILE_BACKEND_ENV = "TRAINER_COMPILE_BACKEND"  # torch.compile's backend when model.compile is on (default inductor)
CURVES_EVERY_S = 30.0  # curves.png is redrawn at an epoch's end at most this often (and at a phase's end)


class Diverged(Exception):
    """`max_nonfinite_steps` updates in a row had a non-finite loss; the last good state was saved."""


def resolve_precision(precision: str, device: torch.device, capability: tuple[int, int] | None = None) -> str:
    """"auto": bf16 on a CUDA GPU of compute capability >= 8.0 (Ampere on), fp16 with a loss scaler on
    older GPUs, fp32 on the CPU (bf16 on this CPU is 11-15x slower). `capability` defaults to the device's."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "fp32"
    major, _ = capability if capability is not None else torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


def autocast_for(precision: str, device: torch.device):
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def skip_on_device(device: torch.device) -> bool:
    """Whether a dropped update is decided on the device (`GuardedUpdate`) rather than by reading its flag
    on the host. On the CPU a host read waits for nothing (the ops have already run) while the device-side
    path copies the parameters and optimizer state every update, so it is for accelerators only."""
    return device.type != "cpu"


def compile_wanted(recipe: Recipe, device: torch.device) -> bool:
    """model.compile: "on", or "auto" on a CUDA GPU."""
    return recipe.model.compile == "on" or (recipe.model.compile == "auto" and device.type == "cuda")


# -- the phase's set-up ----------------------------------------------------------------------------


def _loader_args(recipe: Recipe, accelerator) -> dict:
    device = accelerator.device
    return dict(
        rank=accelerator.process_index,  # global rank, not local: correct across nodes
        world_size=accelerator.num_processes,
        decode_device=recipe.data.decode_device,
        device_id=dali_device_id(device),
        num_threads=recipe.data.loader_threads,
        channels_last=recipe.model.channels_last,
        prefetch_depth=recipe.data.prefetch_depth,
    )


def build_loaders(recipe: Recipe, phase: Phase, phase_index: int, data: Splits, accelerator) -> tuple[TrainLoader, EvalLoader]:
    """This process's train and eval loaders for `phase` (DALI; GPU decoding when there is a GPU)."""
    augment = TrainAugment(
        crop_scale=phase.crop_scale,
        crop_ratio=phase.crop_ratio,
        hflip_prob=phase.hflip_prob,
        mean=recipe.data.mean,
        std=recipe.data.std,
        color_jitter=phase.color_jitter,
        rand_augment_layers=phase.rand_augment_layers,
        rand_augment_magnitude=phase.rand_augment_magnitude,
        hue=phase.hue,
        rotate_deg=phase.rotate_deg,
        vflip_prob=phase.vflip_prob,
        blur_prob=phase.blur_prob,
        blur_sigma=phase.blur_sigma,
        noise_std=phase.noise_std,
        auto_augment=phase.auto_augment,
    )
    loader = TrainLoader(
        data.train,
        batch_size=phase.batch_size_per_device,
        seed=recipe.seed * 1000 + phase_index,
        res_px_for_epoch=phase.res_px_at,  # progressive resizing: a pure function of the epoch
        augment=augment,
        batch_multiple=phase.grad_accum_steps,
        # "auto" was decided once for the run by trainer.launch (a trial decode); a loader built
        # elsewhere (doctor) decides it itself.
        decode_mode=recipe.data.decode_mode,
        balance=recipe.data.balance,
        **_loader_args(recipe, accelerator),
    )
    return loader, build_eval_loader(recipe, phase, data.val, accelerator)


def build_eval_loader(recipe: Recipe, phase: Phase, source, accelerator) -> EvalLoader:
    """This process's share of `source` with `phase`'s eval transform; also what `python -m trainer eval`
    uses, so its numbers match training's val."""
    return EvalLoader(
        source,
        batch_size=phase.batch_size_per_device,
        res_px=phase.eval_res_px,
        crop_fraction=phase.eval_crop_fraction,
        mean=recipe.data.mean,
        std=recipe.data.std,
        **_loader_args(recipe, accelerator),
    )


@dataclass
class PhaseParts:
    """Everything a phase trains with."""

    loader: TrainLoader
    val_loader: EvalLoader
    raw_model: torch.nn.Module  # the module itself: EMA, freezing, BatchNorm buffers and checkpoints use it
    model: torch.nn.Module  # as accelerate prepared it (DDP on several processes): the forward pass uses it
    optimizer: torch.optim.Optimizer
    scheduler: object  # timm's scheduler or PlateauLR: step_update(update count)
    ema: ModelEmaV3 | None
    mixup: object | None  # timm's Mixup/CutMix
    criterion: torch.nn.Module
    eraser: RandomErasing | None
    precision: str
    autocast: object
    frozen: int  # stage groups frozen now
    scaler: torch.amp.GradScaler | None = None  # fp16 only: the loss scale and its growth counter
    compiled: bool = False  # parts.model compiled in place (torch.compile): state_dict keys unchanged

    def checkpointed(self, state: TrainState) -> dict:
        """The parts a checkpoint holds beside the weights, optimizer and RNGs (`Resumable`)."""
        parts = {"train_state": state, "loader": self.loader}
        if self.ema is not None:
            parts["ema"] = self.ema
        if isinstance(self.scheduler, PlateauLR):  # the only schedule with state beyond the update count
            parts["scheduler"] = self.scheduler
        if self.scaler is not None:
            parts["scaler"] = self.scaler
        return parts

    def prepare(self, accelerator, optimizer: torch.optim.Optimizer) -> None:
        """Wrap the model for the processes (DDP) and, when asked, compile the wrapped model in place
        (`Module.compile`, as accelerate does it: after DDP, so DDP's graph splitting at its buckets
        applies). In place, the weights keep their names: no `_orig_mod.` in checkpoints or bundles."""
        self.model, self.optimizer = accelerator.prepare(self.raw_model, optimizer)
        if self.compiled:
            # COMPILE_BACKEND_ENV is for tests: inductor takes ~5 min to build a small model's C++ kernels on
            # a 2-core CPU, "aot_eager" seconds (the same graph capture, without the code generation).
            # dynamic=False: a new resolution (progressive resizing, eval) gets kernels specialised to it.
            # Left to "automatic dynamic", the second shape is recompiled with symbolic sizes (less fused,
            # more guards).
            self.model.compile(backend=os.environ.get(COMPILE_BACKEND_ENV, "inductor"), dynamic=False)


def set_up_phase(accelerator, recipe: Recipe, phase_index: int, model: torch.nn.Module, data: Splits, *,
                 lr: float | None = None, start_epoch: int = 0, with_ema: bool = True,
                 make_loaders: Callable | None = None) -> PhaseParts:
    """Build phase `phase_index` around `model`: loaders, optimizer and schedule at `lr` (default: the
    phase's lr_per_256 scaled to the global batch), EMA, the freezing of `start_epoch`, loss and batch
    augmentation. `make_loaders(phase, accelerator)` replaces the DALI loaders (a seam for benchmarks)."""
    phase = recipe.phases[phase_index]
    device = accelerator.device
    global_batch = phase.batch_size_per_device * accelerator.num_processes * phase.grad_accum_steps
    lr = phase.lr_per_256 * global_batch / 256 if lr is None else lr
    set_seed(recipe.seed + phase_index)  # dropout / drop-path draws; restored exactly on resume
    if make_loaders is not None:
        loader, val_loader = make_loaders(phase, accelerator)
    else:
        loader, val_loader = build_loaders(recipe, phase, phase_index, data, accelerator)
    configure_device(device)
    if recipe.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model.to(device)
    optimizer, scheduler = build_optimizer(raw_model, phase, lr, loader.batches_per_epoch // phase.grad_accum_steps)
    capture_steps_on_device(optimizer, device)
    # The EMA starts as a copy of the phase's initial weights (the earlier phase's best in a chain).
    updates = loader.batches_per_epoch // phase.grad_accum_steps * phase.epochs
    ema = ModelEmaV3(raw_model, decay=ema_decay_for(phase, updates), use_warmup=phase.ema_warmup) if with_ema and phase.ema_decay > 0 else None
    # Freezing is a function of the epoch; set it before DDP wraps the model (DDP syncs only the
    # parameters that are trainable when it wraps).
    frozen = apply_freeze(raw_model, phase, start_epoch)
    weights = None
    if recipe.data.balance == "loss":  # from this phase's train images (its subset, when it has one)
        weights = class_weights(np.bincount(data.train.labels, minlength=raw_model.num_classes)).to(device)
    mixup, criterion = build_criterion(phase, raw_model.num_classes, weights)
    # timm's RandomErasing on the normalised batch, per sample (its draws come from the restored RNGs).
    eraser = RandomErasing(phase.random_erasing, mode="pixel", device=str(device)) if phase.random_erasing else None
    precision = resolve_precision(phase.precision, device)
    # fp16's range needs a loss scale; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    parts = PhaseParts(loader, val_loader, raw_model, raw_model, optimizer, scheduler, ema, mixup, criterion, eraser,
                       precision, autocast_for(precision, device), frozen, scaler, compile_wanted(recipe, device))
    parts.prepare(accelerator, optimizer)
    return parts


# -- the loop --------------------------------------------------------------------------------------


def train_phase(
    accelerator,
    recipe: Recipe,
    phase_index: int,
    model: torch.nn.Module,
    data: Splits,
    run_dir: Path,
    state: TrainState,
    resumable: Resumable,
    log: RunLog,
    resume_from: Path | None = None,
    make_loaders: Callable | None = None,
    signals: StopSignals | None = None,
) -> TrainState:
    """Train phase `phase_index` from its start, or from `resume_from` (one of its checkpoints); returns
    the TrainState at its end. Raises Preempted on a stop signal and Diverged on non-finite losses, each
    after writing a checkpoint."""
    phase = recipe.phases[phase_index]
    start_epoch = read_state(resume_from)["epoch"] if resume_from is not None else 0
    parts = set_up_phase(accelerator, recipe, phase_index, model, data, start_epoch=start_epoch, make_loaders=make_loaders)
    resumable.parts = parts.checkpointed(state)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))  # everything: weights, optimizer, RNGs, EMA, TrainState, loader position
        capture_steps_on_device(parts.optimizer.optimizer, accelerator.device)  # the checkpoint's may be a CPU run's
        # The same numbers, unless the loader moved its position to another process count (its load_state_dict).
        loader = parts.loader
        state.step, state.batch = (loader.epoch * loader.batches_per_epoch + loader.batch) // phase.grad_accum_steps, loader.batch
    else:
        state.begin_phase(phase_index, phase.name)
    parts.scheduler.step_update(state.step)

    # `signals` not installed (benchmarks, in-process callers): never set.
    run = PhaseRun(accelerator, recipe, phase_index, parts, state, log, run_dir, data.val, signals or StopSignals())
    scores = None  # the last epoch's (model, EMA) val scores: eval.json reuses them at the phase end
    for epoch in range(state.epoch, phase.epochs):
        if state.stopped_early:
            break
        run.begin_epoch(epoch)
        for images, labels in parts.loader.epoch_batches(epoch):
            loss = run.train_batch(images, labels)
            if parts.loader.batch % phase.grad_accum_steps == 0:  # the last micro-batch of an update
                run.finish_update(epoch, loss)
            run.tally.batch_done()
        scores = run.end_epoch(epoch)
    run.finish_phase(scores)
    return state


@dataclass
class EpochTally:
    """The epoch in progress: its summed train loss (on the device, read only at the epoch's end and at
    checkpoints), the non-finite flag of the current update, images, skipped updates, and time."""

    loss_sum: torch.Tensor
    bad_loss: torch.Tensor
    correct: torch.Tensor  # train top-1 hits so far (on the device, like loss_sum): the label with the larger Mixup weight
    images_seen: int = 0
    skipped: int = 0
    res_px: int = 0  # what the model saw in the latest batch
    wait_s: float = 0.0  # blocked waiting for the loader
    batch_seconds: list[float] = field(default_factory=list)  # wall time per batch, data wait included
    started: float = field(default_factory=time.perf_counter)
    arrived: float = 0.0  # when the current batch came from the loader
    done: float = field(init=False)  # when the previous batch was done with

    def __post_init__(self) -> None:
        self.done = self.started

    def batch_arrived(self) -> None:
        self.arrived = time.perf_counter()
        self.wait_s += self.arrived - self.done

    def batch_done(self) -> None:
        self.done = time.perf_counter()
        self.batch_seconds.append(self.done - self.arrived)


class PhaseRun:
    """A phase in progress: what `train_phase` calls per batch, per update and per epoch."""

    def __init__(self, accelerator, recipe: Recipe, phase_index: int, parts: PhaseParts, state: TrainState,
                 log: RunLog, run_dir: Path, val_source, signals: StopSignals) -> None:
        self.accelerator, self.recipe, self.phase_index = accelerator, recipe, phase_index
        self.phase: Phase = recipe.phases[phase_index]
        self.parts, self.state, self.log, self.run_dir, self.signals = parts, state, log, run_dir, signals
        self.val_source = val_source  # eval.json's class names, W&B's sample predictions
        self.checkpoints_dir = run_dir / self.phase.name / CHECKPOINTS_DIR
        # The optimizer step, the EMA and the BatchNorm statistics of an update, dropped when its flags
        # say so; on an accelerator without reading the flags on the host (see `finish_update`).
        self.guard = GuardedUpdate(parts.optimizer.optimizer, parts.raw_model, parts.ema)
        self.skip_on_device = skip_on_device(accelerator.device)
        device = accelerator.device
        # The device's own account of non-finite updates in a row (the host's, state.nonfinite_streak,
        # catches up at each read), and whether it reached max_nonfinite_steps: from then on every update
        # is dropped, so the weights stay the last good ones until the host reads it and stops.
        self.streak = torch.full((), state.nonfinite_streak, dtype=torch.int64, device=device)
        self.diverged = torch.zeros((), dtype=torch.bool, device=device)
        # Updates whose flags the host has not read yet: (step, total_step, flags on the device).
        self.pending: list[tuple[int, int, torch.Tensor]] = []
        self.tally: EpochTally | None = None
        self.bar = None

    def begin_epoch(self, epoch: int) -> None:
        accelerator, parts, phase = self.accelerator, self.parts, self.phase
        if phase.unfreeze_at and frozen_group_count(phase, len(stage_groups(parts.raw_model)), epoch) != parts.frozen:
            parts.frozen = apply_freeze(parts.raw_model, phase, epoch)
            # DDP registered the old set of trainable parameters: wrap again (the optimizer and its
            # state are kept; frozen parameters were in it all along).
            accelerator.free_memory()
            parts.prepare(accelerator, parts.optimizer.optimizer)
            accelerator.print(f"[{phase.name} {epoch + 1}/{phase.epochs}] unfroze a stage: {parts.frozen} stage groups still frozen")
        parts.model.train()
        if phase.freeze_bn_stats:
            freeze_batchnorm_stats(parts.raw_model)
        device = accelerator.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # The epoch's summed loss so far: from the checkpoint on the main process, zero elsewhere.
        self.tally = EpochTally(
            loss_sum=torch.tensor(self.state.epoch_loss_sum if accelerator.is_main_process else 0.0, dtype=torch.float64, device=device),
            bad_loss=torch.zeros((), dtype=torch.bool, device=device),
            correct=torch.tensor(self.state.epoch_correct if accelerator.is_main_process else 0.0, dtype=torch.float64, device=device),
        )
        loader = parts.loader
        self.bar = tqdm(
            total=loader.batches_per_epoch,
            initial=loader.batch if loader.epoch == epoch else 0,
            desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
            unit="batch",
            disable=not (accelerator.is_main_process and self.recipe.logging.progress_bar),
            mininterval=1.0,
        )

    def train_batch(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one (micro-)batch; its loss joins the epoch's sum when it is finite."""
        accelerator, parts, tally = self.accelerator, self.parts, self.tally
        tally.batch_arrived()
        images = images.to(accelerator.device, non_blocking=True)
        labels = labels.to(accelerator.device, non_blocking=True)
        targets = labels
        if parts.mixup is not None:
            images, targets = parts.mixup(images, labels)
        if parts.eraser is not None:
            images = parts.eraser(images)
        accum = self.phase.grad_accum_steps
        # Only the last micro-batch of an accumulation group all-reduces gradients.
        last_micro_batch = parts.loader.batch % accum == 0
        with contextlib.nullcontext() if last_micro_batch else accelerator.no_sync(parts.model):
            with parts.autocast:
                logits = parts.model(images)
                loss = parts.criterion(logits, targets)
            accelerator.backward((loss if parts.scaler is None else parts.scaler.scale(loss)) / accum)
        finite = torch.isfinite(loss.detach())
        tally.bad_loss |= ~finite
        tally.loss_sum += torch.where(finite, loss.detach().double(), 0.0) * labels.shape[0]
        # train_top1 from the batch as trained: under Mixup/CutMix the class with the larger weight (no host read).
        truth = targets.argmax(dim=1) if targets.ndim == 2 else targets
        tally.correct += (logits.detach().argmax(dim=1) == truth).sum()
        tally.images_seen += labels.shape[0] * accelerator.num_processes
        tally.res_px = int(images.shape[-1])
        self.bar.update(1)
        return loss

    def finish_update(self, epoch: int, loss: torch.Tensor) -> None:
        """The end of an optimizer update: step or drop it, then the schedule, the logs and the
        checkpoints; raise Diverged after too many non-finite losses in a row, Preempted on a signal.

        The update's flags are [stop signal, non-finite loss, fp16 gradient overflow], the maximum over
        processes (one small all-reduce, queued on the device like DDP's). On an accelerator the host
        does not read them per update: the drop happens on the device (`GuardedUpdate`), and the host
        reads the flags of the updates since its last read every log_every_steps updates, at
        checkpoints and at the epoch's end (`read_flags`: skipped-step records under their own step
        numbers, Diverged, the agreed stop). Every rank reads after the same updates, so all stop after
        the same one: a signal stops a multi-process run up to log_every_steps updates after it came (a
        single process stops after the update in progress). On the CPU the flags are read every
        update: nothing runs ahead there, so the read waits for nothing."""
        accelerator, parts, state, phase, loader, tally = self.accelerator, self.parts, self.state, self.phase, self.parts.loader, self.tally
        device, several = accelerator.device, accelerator.num_processes > 1
        overflow = torch.zeros((), dtype=torch.int64, device=device)
        if parts.scaler is not None:
            # Gradients back to their true scale (before clipping); the scaler notes inf/NaN in them, on the device.
            parts.scaler.unscale_(parts.optimizer.optimizer)
            overflow = (sum(parts.scaler._found_inf_per_device(parts.optimizer.optimizer).values()) > 0).to(torch.int64)
        flags = torch.stack([
            torch.full((), self.signals.requested if several else 0, dtype=torch.int64, device=device),
            tally.bad_loss.to(torch.int64),
            overflow,
        ])
        if several:  # the result stays on the device: NCCL queues the collective, the host goes on
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        tally.bad_loss.zero_()
        if self.skip_on_device and not self.guard.needs_host():
            bad = flags[1] > 0
            skip = bad | (flags[2] > 0) | self.diverged
            self.streak = torch.where(bad, self.streak + 1, 0)
            self.diverged |= self.streak >= phase.max_nonfinite_steps
        else:
            flags = flags.tolist()  # the host read: free on the CPU; on a GPU only before state appears
            skip = bool(flags[1] or flags[2])
        if phase.clip_grad_norm > 0 and skip is not True:
            accelerator.clip_grad_norm_(parts.model.parameters(), phase.clip_grad_norm)
        # Drop this update if `skip`: no optimizer step, no EMA update, BatchNorm statistics put back.
        self.guard.step(skip, ema_step=state.step + 1)
        parts.optimizer.zero_grad(set_to_none=True)
        if parts.scaler is not None:
            parts.scaler.update()  # halves the scale after an overflow, on the device
        # A skipped update still takes its place in the schedule: the LR stays a function of the batch.
        state.step += 1
        state.total_step += 1
        state.batch = loader.batch
        parts.scheduler.step_update(state.step)
        self.pending.append((state.step, state.total_step, flags))
        log_now = state.step % self.recipe.logging.log_every_steps == 0
        mid_epoch = loader.batch < loader.batches_per_epoch  # at an epoch's end, end_epoch checkpoints
        saved_now = bool(phase.checkpoint_every_steps) and state.step % phase.checkpoint_every_steps == 0
        stop_signal = 0 if several else self.signals.requested  # one process: its own flag, a host int
        if not torch.is_tensor(flags) or log_now or saved_now or not mid_epoch or stop_signal:
            stop_signal = max(stop_signal, self.read_flags(epoch))  # before any checkpoint: it saves the counts
        if log_now:
            loss_value = loss.item()  # a sync point: only every log_every_steps
            lr_now = parts.optimizer.param_groups[0]["lr"]
            elapsed = time.perf_counter() - tally.started
            self.bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{tally.images_seen / max(elapsed, 1e-9):.0f}")
            where = {"phase": phase.name, "epoch": epoch, "step": state.step, "total_step": state.total_step}
            self.log.step({**where, "loss": loss_value, "lr": lr_now}, epoch_progress=epoch + loader.batch / loader.batches_per_epoch)
        if saved_now and mid_epoch:
            self.checkpoint(None)
        if stop_signal and mid_epoch:
            self.bar.close()
            saved = self.checkpoints_dir / checkpoint_name(state.total_step) if saved_now else self.checkpoint(None)
            raise Preempted(stop_signal, saved, state.total_step)

    def read_flags(self, epoch: int) -> int:
        """Read the flags of the updates since the last read, in one transfer (the sync point on an
        accelerator); count and report the skipped ones under their own step numbers; raise Diverged
        when max_nonfinite_steps in a row had a non-finite loss. Returns the agreed stop signal.

        An fp16 overflow (finite loss, inf/NaN gradients) is dropped like a non-finite loss (the scaler
        then lowers its scale) but is the scaler's business: not counted as skipped, not reported, and,
        the loss being finite, it ends a run of non-finite losses instead of adding to it."""
        accelerator, state, phase, tally = self.accelerator, self.state, self.phase, self.tally
        pending, self.pending = self.pending, []
        on_device = [flags for _, _, flags in pending if torch.is_tensor(flags)]
        values = iter(torch.stack(on_device).tolist() if on_device else ())
        stop_signal, diverged_at = 0, None
        for step, total_step, flags in pending:
            signal, bad, _overflow = next(values) if torch.is_tensor(flags) else flags
            stop_signal = max(stop_signal, signal)
            where = {"phase": phase.name, "epoch": epoch, "step": step, "total_step": total_step}
            if diverged_at is not None:  # dropped on the device since the limit was reached
                state.skipped_steps += 1
                tally.skipped += 1
                self.log.step({**where, "skipped": "non-finite loss" if bad else "diverged"})
            elif bad:
                state.skipped_steps += 1
                state.nonfinite_streak += 1
                tally.skipped += 1
                accelerator.print(
                    f"[{phase.name} {epoch + 1}/{phase.epochs}] step {step}: non-finite loss, update skipped "
                    f"({state.nonfinite_streak} in a row, {state.skipped_steps} in this phase)"
                )
                self.log.step({**where, "skipped": "non-finite loss"})
                if state.nonfinite_streak >= phase.max_nonfinite_steps:
                    diverged_at = step
            else:
                state.nonfinite_streak = 0
        self.streak.fill_(state.nonfinite_streak)
        if diverged_at is not None:
            saved = self.checkpoint(None)
            late = f" (from update {diverged_at} on, every update was dropped)" if diverged_at != state.step else ""
            raise Diverged(
                f"phase {phase.name!r}: {state.nonfinite_streak} updates in a row had a non-finite loss (NaN or inf). "
                f"The last good weights are saved in {saved}{late}. Lower phases.{self.phase_index}.lr_per_256, set "
                f"phases.{self.phase_index}.clip_grad_norm, or use precision=fp32, then resume with --resume auto"
            )
        return stop_signal

    def end_epoch(self, epoch: int) -> tuple[dict, dict | None]:
        """Evaluate model and EMA, record the epoch, decide early stopping, checkpoint; returns the
        (model, EMA) val scores. Raises Preempted when a signal came during the epoch's end."""
        accelerator, parts, state, phase, tally = self.accelerator, self.parts, self.state, self.phase, self.tally
        self.bar.close()
        train_seconds = time.perf_counter() - tally.started
        state.epoch, state.batch = epoch + 1, 0
        samples = parts.loader.batches_per_epoch * phase.batch_size_per_device * accelerator.num_processes
        train_loss = float(accelerator.reduce(tally.loss_sum.clone(), reduction="sum")) / samples
        train_top1 = float(accelerator.reduce(tally.correct.clone(), reduction="sum")) / samples
        val = evaluate(parts.model, parts.val_loader, accelerator, parts.autocast)
        ema_val = evaluate(parts.ema.module, parts.val_loader, accelerator, parts.autocast) if evaluates_ema(phase, epoch, parts.ema) else None
        for source, scores in (("model", val), ("ema", ema_val)):
            if scores is not None and scores["top1"] > state.best_top1:
                state.best_top1, state.best_source, state.best_epoch = scores["top1"], source, epoch
        record = {
            "phase_index": self.phase_index,
            "phase": phase.name,
            "epoch": epoch,
            "train_loss": train_loss,
            "train_top1": train_top1,
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "val_samples": val["samples"],
            "ema_val_top1": ema_val["top1"] if ema_val else None,
            "ema_val_top5": ema_val["top5"] if ema_val else None,
            "val_macro_f1": val["macro_f1"],
            "val_balanced_accuracy": val["balanced_accuracy"],
            "ema_val_macro_f1": ema_val["macro_f1"] if ema_val else None,
            "ema_val_balanced_accuracy": ema_val["balanced_accuracy"] if ema_val else None,
            "lr": parts.optimizer.param_groups[0]["lr"],
            "res_px": tally.res_px,
            "images_per_s": tally.images_seen / max(train_seconds, 1e-9),
            "data_wait_share": tally.wait_s / max(train_seconds, 1e-9),
            **step_time_percentiles_ms(tally.batch_seconds),
            "skipped_steps": tally.skipped,
            "total_step": state.total_step,
        }
        if accelerator.device.type == "cuda":
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
        state.last_val = {"top1": val["top1"], "top5": val["top5"], "ema_top1": ema_val["top1"] if ema_val else None}
        rank_by = rank_metric(phase.early_stop_metric)
        if rank_by != "top1":  # "best" (checkpoint ranking, model or EMA) follows the phase's class-averaged metric
            state.last_val.update(rank_by=rank_by, **{rank_by: val[rank_by], f"ema_{rank_by}": ema_val[rank_by] if ema_val else None})
        if isinstance(parts.scheduler, PlateauLR):
            parts.scheduler.epoch_end(val["top1"])
            parts.scheduler.step_update(state.step)
        score = early_stop_score(phase.early_stop_metric, val, ema_val)
        if score > state.early_best:
            state.early_best, state.early_bad_epochs = score, 0
        else:
            state.early_bad_epochs += 1
        state.stopped_early = stops_early(phase, epoch, state.early_bad_epochs)
        record["early_stopped"] = state.stopped_early
        self.log.epoch(record, phase.epochs)
        # curves.png, redrawn from history.jsonl beside the checkpoint write (a plotting error is printed,
        # never raised). A redraw costs 0.3-1 s of a 2-core CPU: with epochs shorter than CURVES_EVERY_S
        # it waits for a later one (the clock is the run's, so a new phase does not force one), except
        # at the run's end.
        run_ends = self.phase_index == len(self.recipe.phases) - 1 and (epoch + 1 == phase.epochs or state.stopped_early)
        if accelerator.is_main_process and (self.log.curves.due(CURVES_EVERY_S) or run_ends):
            self.log.curves.start()
        tally.loss_sum.zero_()
        tally.correct.zero_()
        state.epoch_loss_sum = state.epoch_correct = 0.0
        saved = self.checkpoint(max(val["top1"], ema_val["top1"] if ema_val else -math.inf),
                                max(val[rank_by], ema_val[rank_by] if ema_val else -math.inf))
        if state.stopped_early:
            accelerator.print(f"[{phase.name}] early stop: {phase.early_stop_metric} did not improve for {phase.early_stop_patience} epochs")
        # A signal during evaluation or the checkpoint just written (or at the epoch's last step): that
        # checkpoint will do. Every process asks, so the all-reduce inside is matched on all of them.
        stop_signal = self.signals.should_stop(accelerator)
        if stop_signal:
            raise Preempted(stop_signal, saved, state.total_step)
        return val, ema_val

    def checkpoint(self, val_top1: float | None, rank_score: float | None = None) -> Path:
        # Fold the epoch's running loss into the saved state, on every run alike, so a resumed run
        # adds up its losses in the same order as one that never stopped.
        accelerator, tally = self.accelerator, self.tally
        total = accelerator.reduce(tally.loss_sum.clone(), reduction="sum")
        tally.loss_sum.zero_()
        if accelerator.is_main_process:
            tally.loss_sum.add_(total)
        self.state.epoch_loss_sum = float(total)
        correct = accelerator.reduce(tally.correct.clone(), reduction="sum")  # train_top1's hits, folded the same way
        tally.correct.zero_()
        if accelerator.is_main_process:
            tally.correct.add_(correct)
        self.state.epoch_correct = float(correct)
        return save_checkpoint(accelerator, self.checkpoints_dir, self.state, val_top1, self.phase.keep_best_k, rank_score)

    def finish_phase(self, scores: tuple[dict, dict | None] | None) -> None:
        """eval.json (and W&B's confusion matrix and predictions) for the weights as they are now. The
        last epoch's scores describe them; a process resumed after the last epoch has none: score once."""
        accelerator, parts = self.accelerator, self.parts
        if scores is None:
            val = evaluate(parts.model, parts.val_loader, accelerator, parts.autocast)
            ema_val = evaluate(parts.ema.module, parts.val_loader, accelerator, parts.autocast) if parts.ema is not None else None
            scores = val, ema_val
        if accelerator.is_main_process:
            record_phase_eval(accelerator, self.recipe, self.phase, self.run_dir, self.val_source, parts.raw_model,
                              parts.ema, *scores, parts.autocast, self.state)
        accelerator.free_memory()


def step_time_percentiles_ms(batch_seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99 of the wall time per batch (data wait included), in ms."""
    if not batch_seconds:
        return {"step_ms_p50": 0.0, "step_ms_p90": 0.0, "step_ms_p99": 0.0}
    p50, p90, p99 = torch.tensor(batch_seconds, dtype=torch.float64).quantile(torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"step_ms_p50": p50 * 1e3, "step_ms_p90": p90 * 1e3, "step_ms_p99": p99 * 1e3}


def stops_early(phase: Phase, epoch: int, bad_epochs: int) -> bool:
    """Whether the phase ends after `epoch` (0-based) with `bad_epochs` epochs in a row without
    improvement: `early_stop_patience` of them, and not before `early_stop_after` of the phase's epochs
    have run (a pure function of the epoch and the counter, which resume restores)."""
    if not phase.early_stop_patience or bad_epochs < phase.early_stop_patience:
        return False
    return epoch + 1 >= math.ceil(phase.early_stop_after * phase.epochs)


def evaluates_ema(phase: Phase, epoch: int, ema: ModelEmaV3 | None) -> bool:
    """Whether epoch `epoch` (0-based) evaluates the EMA: every epoch, or from `ema_eval_after` of the
    phase on, and always at its last."""
    return ema is not None and (epoch + 1 >= math.ceil(phase.ema_eval_after * phase.epochs) or epoch + 1 == phase.epochs)


def early_stop_score(metric: str, val: dict, ema_val: dict | None) -> float:
    """Higher is better for every metric (val_loss is negated)."""
    ema_top1 = ema_val["top1"] if ema_val else -math.inf
    return {
        "val_top1": val["top1"],
        "ema_val_top1": ema_top1,
        "best_top1": max(val["top1"], ema_top1),
        "val_loss": -val["loss"],
        "val_macro_f1": val.get("macro_f1", -math.inf),
        "val_balanced_accuracy": val.get("balanced_accuracy", -math.inf),
    }[metric]


def rank_metric(early_stop_metric: str) -> str:
    """What ranks a phase's checkpoints ("best") and picks model or EMA weights: the class-averaged score
    the phase stops on (`macro_f1`, `balanced_accuracy`), else top-1."""
    return early_stop_metric.removeprefix("val_") if early_stop_metric in CLASS_AVERAGED_METRICS else "top1"


def record_phase_eval(accelerator, recipe: Recipe, phase: Phase, run_dir: Path, val_source, raw_model: torch.nn.Module,
                      ema: ModelEmaV3 | None, val: dict, ema_val: dict | None, autocast, state: TrainState) -> None:
    """Main process, at a phase's end: <run>/<phase>/eval.json from the phase's final scores and, with
    W&B, the confusion matrices, per-class accuracy and a table of sample predictions (from the better
    of model and EMA, the weights export would pick)."""
    report = eval_report(
        phase=phase.name, split="val", classes=list(val_source.classes),
        weights=f"final weights of phase {phase.name} (epoch {state.epoch}, update {state.step})", model=val, ema=ema_val,
    )
    write_eval_json(run_dir / phase.name / EVAL_FILE, report)
    if not recipe.logging.wandb:
        return
    use_ema = ema_val is not None and ema_val["top1"] > val["top1"]
    preprocess = {
        "input_size": [3, phase.eval_res_px, phase.eval_res_px],
        "crop_fraction": phase.eval_crop_fraction,
        "mean": list(recipe.data.mean),
        "std": list(recipe.data.std),
    }
    shown = sample_predictions(ema.module if use_ema else raw_model, val_source, sample_indices(val_source.labels), preprocess, autocast)
    log_phase_eval(accelerator, report, shown, "ema" if use_ema else "model", step=state.total_step)
