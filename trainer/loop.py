"""The training loop: one phase, top to bottom. Model, optimizer, schedule, EMA, eval, checkpoints."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import set_seed
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from loaders.dali import EvalLoader, TrainAugment, TrainLoader
from loaders.hf import HFDatasetSource
from loaders.sources import ImageFolderSource
from trainer.checkpoint import Resumable, TrainState, checkpoint_name, read_state, save_checkpoint
from trainer.curves import redraw_curves
from trainer.metrics import eval_report, evaluate, sample_indices, sample_predictions
from trainer.preemption import Preempted, StopSignals, agreed_max
from trainer.recipe import Phase, Recipe
from trainer.tracking import EVAL_FILE, RunLog, log_phase_eval, write_eval_json
from trainer.transfer import (
    apply_freeze,
    build_optimizer_groups,
    freeze_batchnorm_stats,
    frozen_group_count,
    stage_groups,
)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 on a CUDA GPU that supports it, fp32 otherwise (bf16 on this CPU is 11-15x slower)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def autocast_for(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Splits:
    """Train and val sources: anything with `read(i)`, `labels`, `classes` and `subset()`."""

    train: ImageFolderSource | HFDatasetSource
    val: ImageFolderSource | HFDatasetSource


def build_loaders(recipe: Recipe, phase: Phase, phase_index: int, data: Splits, accelerator) -> tuple[TrainLoader, EvalLoader]:
    """This process's train and eval loaders for `phase` (DALI; GPU decoding when there is a GPU)."""
    device = accelerator.device
    world = accelerator.num_processes
    loader_args = dict(
        decode_device=recipe.data.decode_device,
        device_id=device.index if device.type == "cuda" else None,
        num_threads=recipe.data.loader_threads,
        channels_last=recipe.model.channels_last,
    )
    loader = TrainLoader(
        data.train,
        batch_size=phase.batch_size_per_device,
        seed=recipe.seed * 1000 + phase_index,
        rank=accelerator.process_index,  # global rank, not local: correct across nodes
        world_size=world,
        res_px_for_epoch=phase.res_px_at,  # progressive resizing: a pure function of the epoch
        augment=TrainAugment(
            crop_scale=phase.crop_scale,
            crop_ratio=phase.crop_ratio,
            hflip_prob=phase.hflip_prob,
            mean=recipe.data.mean,
            std=recipe.data.std,
            color_jitter=phase.color_jitter,
            rand_augment_layers=phase.rand_augment_layers,
            rand_augment_magnitude=phase.rand_augment_magnitude,
        ),
        batch_multiple=phase.grad_accum_steps,
        **loader_args,
    )
    return loader, build_eval_loader(recipe, phase, data.val, accelerator)


def build_eval_loader(recipe: Recipe, phase: Phase, source, accelerator) -> EvalLoader:
    """This process's share of `source` with `phase`'s eval transform; also what `python -m trainer eval`
    uses, so its numbers match training's val."""
    device = accelerator.device
    return EvalLoader(
        source,
        batch_size=phase.batch_size_per_device,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        res_px=phase.eval_res_px,
        crop_fraction=phase.eval_crop_fraction,
        mean=recipe.data.mean,
        std=recipe.data.std,
        decode_device=recipe.data.decode_device,
        device_id=device.index if device.type == "cuda" else None,
        num_threads=recipe.data.loader_threads,
        channels_last=recipe.model.channels_last,
    )


def build_optimizer(model: torch.nn.Module, phase: Phase, lr: float, updates_per_epoch: int):
    """timm's optimizer (no weight decay on norms and biases; backbone LR multiplier or layer decay)
    and its scheduler. Stepped per update, the LR is a pure function of the update count."""
    optimizer = build_optimizer_groups(model, phase, lr)
    common = dict(
        decay_epochs=phase.decay_epochs,
        decay_rate=phase.decay_rate,
        warmup_epochs=phase.warmup_epochs,
        warmup_lr=lr * 0.01,
        min_lr=lr * phase.min_lr_ratio,
        # Warmup first, then the schedule over the remaining epochs: the peak LR is reached at the
        # end of warmup (timm's default starts the decay under the warmup instead).
        num_epochs=phase.epochs - phase.warmup_epochs,
        warmup_prefix=True,
    )
    if phase.schedule == "plateau":
        scheduler = PlateauLR(
            optimizer, lr, warmup_updates=round(phase.warmup_epochs * updates_per_epoch), warmup_lr=lr * 0.01,
            decay_rate=phase.decay_rate, patience_epochs=phase.plateau_patience_epochs, min_lr=lr * phase.min_lr_ratio,
        )
        return optimizer, scheduler
    sched = phase.schedule
    if sched == "onecycle":
        # OneCycle's shape on timm's cosine: rise from lr/25 over 30% of the phase (unless warmup is
        # set), then cosine down to lr/25e4. Linear rise; momentum is not cycled.
        warmup = phase.warmup_epochs or 0.3 * phase.epochs
        common.update(warmup_epochs=warmup, warmup_lr=lr / 25, min_lr=lr / 25e4, num_epochs=phase.epochs - warmup)
        sched = "cosine"
    scheduler, _ = create_scheduler_v2(optimizer, sched=sched, step_on_epochs=False, updates_per_epoch=updates_per_epoch, **common)
    return optimizer, scheduler


class PlateauLR:
    """Linear warmup, then the LR times `decay_rate` whenever val top-1 has not improved for more than
    `patience_epochs` epochs. Written here because timm's PlateauLRScheduler is deprecated and does
    not checkpoint its patience counters (resume would restart them)."""

    def __init__(self, optimizer, lr: float, *, warmup_updates: int, warmup_lr: float, decay_rate: float, patience_epochs: int, min_lr: float) -> None:
        self.optimizer, self.lr, self.warmup_updates, self.warmup_lr = optimizer, lr, warmup_updates, warmup_lr
        self.decay_rate, self.patience_epochs, self.min_lr = decay_rate, patience_epochs, min_lr
        self.best, self.bad_epochs, self.cuts = -math.inf, 0, 0

    def step_update(self, step: int) -> None:
        if step < self.warmup_updates:
            value = self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_updates
        else:
            value = max(self.lr * self.decay_rate**self.cuts, self.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = value * group.get("lr_scale", 1.0)  # honour backbone multipliers, as timm does

    def epoch_end(self, metric: float) -> None:
        if metric > self.best:
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience_epochs:
                self.cuts, self.bad_epochs = self.cuts + 1, 0

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs, "cuts": self.cuts}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.bad_epochs, self.cuts = state["best"], state["bad_epochs"], state["cuts"]


def build_criterion(phase: Phase, num_classes: int):
    """(mixup or None, loss): timm's Mixup/CutMix makes soft targets, which need a soft-target loss."""
    mixup = None
    if phase.mixup_alpha or phase.cutmix_alpha:
        mixup = Mixup(
            mixup_alpha=phase.mixup_alpha,
            cutmix_alpha=phase.cutmix_alpha,
            prob=phase.mixup_prob,
            switch_prob=phase.mixup_switch_prob,
            label_smoothing=phase.label_smoothing,
            num_classes=num_classes,
        )
    if phase.bce_loss:
        # With mixup the targets already carry the smoothing; timm's RSB recipes threshold at 0.2.
        loss = BinaryCrossEntropy(target_threshold=0.2) if mixup else BinaryCrossEntropy(smoothing=phase.label_smoothing)
    elif mixup:
        loss = SoftTargetCrossEntropy()
    else:
        loss = torch.nn.CrossEntropyLoss(label_smoothing=phase.label_smoothing)
    return mixup, loss


CURVES_EVERY_S = 30.0  # curves.png is redrawn at an epoch's end at most this often (and at a phase's end)


class Diverged(Exception):
    """`max_nonfinite_steps` updates in a row had a non-finite loss; the last good state was saved."""


def step_time_percentiles_ms(batch_seconds: list[float]) -> dict[str, float]:
    """p50/p90/p99 of the wall time per batch (data wait included), in ms."""
    if not batch_seconds:
        return {"step_ms_p50": 0.0, "step_ms_p90": 0.0, "step_ms_p99": 0.0}
    p50, p90, p99 = torch.tensor(batch_seconds, dtype=torch.float64).quantile(torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"step_ms_p50": p50 * 1e3, "step_ms_p90": p90 * 1e3, "step_ms_p99": p99 * 1e3}


def early_stop_score(metric: str, val: dict, ema_val: dict | None) -> float:
    """Higher is better for every metric (val_loss is negated)."""
    ema_top1 = ema_val["top1"] if ema_val else -math.inf
    return {
        "val_top1": val["top1"],
        "ema_val_top1": ema_top1,
        "best_top1": max(val["top1"], ema_top1),
        "val_loss": -val["loss"],
    }[metric]


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
    phase: Phase = recipe.phases[phase_index]
    device = accelerator.device
    world = accelerator.num_processes
    precision = resolve_precision(phase.precision, device)
    global_batch = phase.batch_size_per_device * world * phase.grad_accum_steps
    lr = phase.lr_per_256 * global_batch / 256
    set_seed(recipe.seed + phase_index)  # dropout / drop-path draws; restored exactly on resume

    if make_loaders is not None:  # a seam for benchmarks: any loader with TrainLoader's interface
        loader, val_loader = make_loaders(phase, accelerator)
    else:
        loader, val_loader = build_loaders(recipe, phase, phase_index, data, accelerator)
    updates_per_epoch = loader.batches_per_epoch // phase.grad_accum_steps

    if recipe.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw_model = model.to(device)
    optimizer, scheduler = build_optimizer(raw_model, phase, lr, updates_per_epoch)
    ema = ModelEmaV3(raw_model, decay=phase.ema_decay, use_warmup=phase.ema_warmup) if phase.ema_decay > 0 else None
    # Freezing is a function of the epoch; set it before DDP wraps the model (DDP syncs only the
    # parameters that are trainable when it wraps).
    start_epoch = read_state(resume_from)["epoch"] if resume_from is not None else 0
    frozen = apply_freeze(raw_model, phase, start_epoch)
    model, optimizer = accelerator.prepare(raw_model, optimizer)

    resumable.parts = {"train_state": state, "loader": loader}
    if ema is not None:
        resumable.parts["ema"] = ema
    if isinstance(scheduler, PlateauLR):  # the only schedule with state beyond the update count
        resumable.parts["scheduler"] = scheduler
    if resume_from is not None:
        # Everything: weights, optimizer, RNGs, EMA, TrainState, loader position.
        accelerator.load_state(str(resume_from))
        # The same numbers, unless the loader moved its position to another process count (its load_state_dict).
        state.step, state.batch = (loader.epoch * loader.batches_per_epoch + loader.batch) // phase.grad_accum_steps, loader.batch
    else:
        state.phase_index, state.phase_name = phase_index, phase.name
        state.epoch = state.batch = state.step = 0
        state.best_top1, state.best_source, state.best_epoch = -1.0, "", -1
        state.epoch_loss_sum = 0.0
        state.early_best, state.early_bad_epochs, state.stopped_early = -1e30, 0, False
        state.skipped_steps = state.nonfinite_streak = 0
    scheduler.step_update(state.step)

    mixup, criterion = build_criterion(phase, raw_model.num_classes)
    # timm's RandomErasing on the normalised batch, per sample (its draws come from the restored RNGs).
    eraser = RandomErasing(phase.random_erasing, mode="pixel", device=str(device)) if phase.random_erasing else None
    autocast = autocast_for(precision, device)
    checkpoints_dir = run_dir / phase.name / "checkpoints"
    accum = phase.grad_accum_steps
    signals = signals or StopSignals()  # not installed: never set (benchmarks, in-process callers)
    curves_drawn_at = -math.inf
    # BatchNorm running statistics move in the forward pass, before the loss can be checked: kept
    # from the start of each update so a skipped (non-finite) update leaves no trace in them.
    buffers = [b for b in raw_model.buffers() if b.is_floating_point()]
    good_buffers = [b.detach().clone() for b in buffers]

    def checkpoint(val_top1: float | None) -> Path:
        # Fold the epoch's running loss into the saved state, on every run alike, so a resumed run
        # adds up its losses in the same order as one that never stopped.
        total = accelerator.reduce(loss_sum.clone(), reduction="sum")
        loss_sum.zero_()
        if accelerator.is_main_process:
            loss_sum.add_(total)
        state.epoch_loss_sum = float(total)
        return save_checkpoint(accelerator, checkpoints_dir, state, val_top1, phase.keep_best_k)

    val = ema_val = None  # the last epoch's scores: eval.json reuses them at the phase end
    for epoch in range(state.epoch, phase.epochs):
        if state.stopped_early:
            break
        if phase.unfreeze_at and frozen_group_count(phase, len(stage_groups(raw_model)), epoch) != frozen:
            frozen = apply_freeze(raw_model, phase, epoch)
            # DDP registered the old set of trainable parameters: wrap again (the optimizer and its
            # state are kept; frozen parameters were in it all along).
            accelerator.free_memory()
            model, optimizer = accelerator.prepare(raw_model, optimizer.optimizer)
            accelerator.print(f"[{phase.name} {epoch + 1}/{phase.epochs}] unfroze a stage: {frozen} stage groups still frozen")
        model.train()
        if phase.freeze_bn_stats:
            freeze_batchnorm_stats(raw_model)
        # The epoch's summed loss so far: from the checkpoint on the main process, zero elsewhere.
        loss_sum = torch.tensor(state.epoch_loss_sum if accelerator.is_main_process else 0.0, dtype=torch.float64, device=device)
        images_seen = 0
        skipped_in_epoch = 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        # Throughput: time blocked waiting for the loader, and wall time per batch (wait included).
        # The per-update `.item()` below syncs the GPU, so compute time is not counted as waiting.
        wait_s, batch_seconds = 0.0, []
        started = batch_done = time.perf_counter()
        bad_loss = torch.zeros((), dtype=torch.bool, device=device)
        bar = tqdm(
            total=loader.batches_per_epoch,
            initial=loader.batch if loader.epoch == epoch else 0,
            desc=f"{phase.name} {epoch + 1}/{phase.epochs}",
            unit="batch",
            disable=not (accelerator.is_main_process and recipe.logging.progress_bar),
            mininterval=1.0,
        )
        for images, labels in loader.epoch_batches(epoch):
            arrived = time.perf_counter()
            wait_s += arrived - batch_done
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            if eraser is not None:
                images = eraser(images)
            update_now = loader.batch % accum == 0
            # Only the last micro-batch of an accumulation group all-reduces gradients.
            with contextlib.nullcontext() if update_now else accelerator.no_sync(model):
                with autocast:
                    logits = model(images)
                    loss = criterion(logits, targets)
                accelerator.backward(loss / accum)
            finite = torch.isfinite(loss.detach())
            bad_loss |= ~finite
            loss_sum += torch.where(finite, loss.detach().double(), 0.0) * labels.shape[0]
            images_seen += labels.shape[0] * world
            bar.update(1)
            if not update_now:
                batch_done = time.perf_counter()
                batch_seconds.append(batch_done - arrived)
                continue
            # One small all-reduce decides for every process, so all skip or stop on the same update:
            # [stop signal, non-finite loss on any rank]. Reading the loss flag is the step's one sync point.
            stop_signal, skip = agreed_max(accelerator, [signals.requested, int(bad_loss)])
            bad_loss.zero_()
            if skip:
                # Drop this update: no optimizer step, no EMA update, BatchNorm statistics put back.
                optimizer.zero_grad(set_to_none=True)
                torch._foreach_copy_(buffers, good_buffers)
                state.skipped_steps += 1
                state.nonfinite_streak += 1
                skipped_in_epoch += 1
            else:
                if phase.clip_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), phase.clip_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.nonfinite_streak = 0
                if ema is not None:
                    ema.update(raw_model, step=state.step + 1)
                torch._foreach_copy_(good_buffers, buffers)
            # A skipped update still takes its place in the schedule: the LR stays a function of the batch.
            state.step += 1
            state.total_step += 1
            state.batch = loader.batch
            scheduler.step_update(state.step)
            if skip:
                accelerator.print(
                    f"[{phase.name} {epoch + 1}/{phase.epochs}] step {state.step}: non-finite loss, update skipped "
                    f"({state.nonfinite_streak} in a row, {state.skipped_steps} in this phase)"
                )
                log.step({"phase": phase.name, "epoch": epoch, "step": state.step, "total_step": state.total_step, "skipped": "non-finite loss"})
                if state.nonfinite_streak >= phase.max_nonfinite_steps:
                    saved = checkpoint(None)
                    raise Diverged(
                        f"phase {phase.name!r}: {state.nonfinite_streak} updates in a row had a non-finite loss (NaN or inf). "
                        f"The last good weights are saved in {saved}. Lower phases.{phase_index}.lr_per_256, set "
                        f"phases.{phase_index}.clip_grad_norm, or use precision=fp32, then resume with --resume auto"
                    )

            if state.step % recipe.logging.log_every_steps == 0:
                loss_value = loss.item()  # a sync point: only every log_every_steps
                elapsed = time.perf_counter() - started
                lr_now = optimizer.param_groups[0]["lr"]
                bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{images_seen / max(elapsed, 1e-9):.0f}")
                record = {"phase": phase.name, "epoch": epoch, "step": state.step, "total_step": state.total_step, "loss": loss_value, "lr": lr_now}
                log.step(record)
                accelerator.log({"train/loss": loss_value, "train/lr": lr_now, "epoch": epoch + loader.batch / loader.batches_per_epoch}, step=state.total_step)
            if phase.checkpoint_every_steps and state.step % phase.checkpoint_every_steps == 0 and loader.batch < loader.batches_per_epoch:
                checkpoint(None)
            if stop_signal and loader.batch < loader.batches_per_epoch:  # at the epoch's end: after its checkpoint
                bar.close()
                just_saved = phase.checkpoint_every_steps and state.step % phase.checkpoint_every_steps == 0
                raise Preempted(stop_signal, checkpoints_dir / checkpoint_name(state.total_step) if just_saved else checkpoint(None))
            batch_done = time.perf_counter()
            batch_seconds.append(batch_done - arrived)
        bar.close()
        train_seconds = time.perf_counter() - started

        # Epoch end: evaluate model and EMA, record, checkpoint.
        state.epoch, state.batch = epoch + 1, 0
        train_loss = float(accelerator.reduce(loss_sum.clone(), reduction="sum")) / (loader.batches_per_epoch * phase.batch_size_per_device * world)
        val = evaluate(model, val_loader, accelerator, autocast)
        ema_val = evaluate(ema.module, val_loader, accelerator, autocast) if ema is not None else None
        for source, scores in (("model", val), ("ema", ema_val)):
            if scores is not None and scores["top1"] > state.best_top1:
                state.best_top1, state.best_source, state.best_epoch = scores["top1"], source, epoch
        record = {
            "phase_index": phase_index,
            "phase": phase.name,
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "val_samples": val["samples"],
            "ema_val_top1": ema_val["top1"] if ema_val else None,
            "ema_val_top5": ema_val["top5"] if ema_val else None,
            "lr": optimizer.param_groups[0]["lr"],
            "res_px": int(images.shape[-1]),  # what the model saw in this epoch's last batch
            "images_per_s": images_seen / max(train_seconds, 1e-9),
            "data_wait_share": wait_s / max(train_seconds, 1e-9),
            **step_time_percentiles_ms(batch_seconds),
            "skipped_steps": skipped_in_epoch,
            "total_step": state.total_step,
        }
        if device.type == "cuda":
            record["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        state.last_val = {"top1": val["top1"], "top5": val["top5"], "ema_top1": ema_val["top1"] if ema_val else None}
        if isinstance(scheduler, PlateauLR):
            scheduler.epoch_end(val["top1"])
            scheduler.step_update(state.step)
        score = early_stop_score(phase.early_stop_metric, val, ema_val)
        if score > state.early_best:
            state.early_best, state.early_bad_epochs = score, 0
        else:
            state.early_bad_epochs += 1
        state.stopped_early = bool(phase.early_stop_patience and state.early_bad_epochs >= phase.early_stop_patience)
        record["early_stopped"] = state.stopped_early
        log.epoch(record)
        # curves.png, redrawn from history.jsonl (a plotting error is printed, never raised). A redraw
        # costs ~1 s of this 2-core CPU: with epochs shorter than CURVES_EVERY_S it waits for the next
        # one, except at the phase's last epoch.
        redraw_due = time.monotonic() - curves_drawn_at >= CURVES_EVERY_S or epoch + 1 == phase.epochs or state.stopped_early
        if accelerator.is_main_process and redraw_due:
            redraw_curves(run_dir)
            curves_drawn_at = time.monotonic()
        scalars = {
            "train/epoch_loss": train_loss,
            "train/images_per_s": record["images_per_s"],
            "system/images_per_s": record["images_per_s"],
            "system/data_wait_share": record["data_wait_share"],
            "system/step_ms_p50": record["step_ms_p50"],
            "system/step_ms_p90": record["step_ms_p90"],
            "system/skipped_steps": skipped_in_epoch,
            "val/loss": val["loss"],
            "val/top1": val["top1"],
            "val/top5": val["top5"],
            "epoch": epoch + 1,
        }
        if ema_val:
            scalars.update({"ema_val/top1": ema_val["top1"], "ema_val/top5": ema_val["top5"]})
        if "gpu_mem_gib" in record:
            scalars["system/gpu_mem_gib"] = record["gpu_mem_gib"]
        accelerator.log(scalars, step=state.total_step)
        accelerator.print(
            f"[{phase.name} {epoch + 1}/{phase.epochs}] train_loss {train_loss:.4f}  val_top1 {val['top1']:.4f}"
            + (f"  ema_val_top1 {ema_val['top1']:.4f}" if ema_val else "")
            + f"  {record['images_per_s']:.0f} img/s"
        )
        loss_sum.zero_()
        state.epoch_loss_sum = 0.0
        best_of_epoch = max(val["top1"], ema_val["top1"] if ema_val else -math.inf)
        saved = checkpoint(best_of_epoch)
        if state.stopped_early:
            accelerator.print(f"[{phase.name}] early stop: {phase.early_stop_metric} did not improve for {phase.early_stop_patience} epochs")
        # A signal during evaluation or the checkpoint just written (or at the epoch's last step): that
        # checkpoint will do. Every process asks, so the all-reduce inside is matched on all of them.
        stop_signal = signals.should_stop(accelerator)
        if stop_signal:
            raise Preempted(stop_signal, saved)

    # Phase end: eval.json (and W&B's confusion matrix and predictions) for the weights as they are now.
    # The last epoch's scores describe them; a process resumed after the last epoch has none: score once.
    if val is None:
        val = evaluate(model, val_loader, accelerator, autocast)
        ema_val = evaluate(ema.module, val_loader, accelerator, autocast) if ema is not None else None
    if accelerator.is_main_process:
        record_phase_eval(accelerator, recipe, phase, run_dir, data.val, raw_model, ema, val, ema_val, autocast, state)
    accelerator.free_memory()
    return state


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
