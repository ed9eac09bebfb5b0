"""The LR range test (Leslie Smith / fastai): a recipe phase's own model, loader, optimizer and loss under an exponentially rising LR."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from trainer.atomic import write_atomic
from trainer.data import load_splits
from trainer.loop import set_up_phase
from trainer.model import create_model, initialize
from trainer.recipe import Recipe, RecipeError
from trainer.transfer import ensure_head, freeze_batchnorm_stats

SMOOTHING_BETA = 0.98  # fastai's: an exponential average over ~50 steps
DIVERGENCE_FACTOR = 4.0  # stop once the smoothed loss is this many times its best
SKIP_START = 10  # points the suggestion ignores at the start (fastai's skip_start)


@dataclass
class LRFindResult:
    recipe: str
    phase_index: int
    phase_name: str
    global_batch: int  # images per update in the test: per device x processes x accumulation
    precision: str
    start_lr: float
    end_lr: float
    steps: int  # asked for; len(lrs) is how many ran
    stop_reason: str  # "end_lr reached", "diverged" or "loss not finite"
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)  # where the starting weights came from
    suggested_index: int | None = None  # the point of steepest descent; None when fewer than two ran
    suggested_lr: float | None = None

    @property
    def suggested_lr_per_256(self) -> float | None:
        """The suggestion in the recipe's unit: the trainer sets lr = lr_per_256 x global batch / 256."""
        return None if self.suggested_lr is None else self.suggested_lr * 256 / self.global_batch

    @property
    def set_line(self) -> str | None:
        """The override that trains this phase at the suggested LR."""
        value = self.suggested_lr_per_256
        return None if value is None else f"--set phases.{self.phase_index}.lr_per_256={value:.3g}"

    def to_dict(self) -> dict:
        out = asdict(self)
        series = [{"lr": lr, "loss": loss, "smoothed": s} for lr, loss, s in zip(out.pop("lrs"), out.pop("losses"), out.pop("smoothed"))]
        out.update(suggested_lr_per_256=self.suggested_lr_per_256, set_line=self.set_line, series=series)
        return out


def lr_at(step: int, steps: int, start_lr: float, end_lr: float) -> float:
    """Exponential from start_lr at step 0 to exactly end_lr at step steps - 1."""
    return start_lr * (end_lr / start_lr) ** (step / max(steps - 1, 1))


def range_test(train_step: Callable[[float], float], *, steps: int, start_lr: float, end_lr: float,
               progress: Callable[[int], object] | None = None) -> tuple[list[float], list[float], list[float], str]:
    """Leslie Smith's range test around `train_step(lr)`, which makes one update at `lr` and returns its
    loss: the LR rises exponentially from `start_lr` to `end_lr` over `steps` updates, and the test stops
    at a loss that is not finite or once the smoothed loss is DIVERGENCE_FACTOR times its best.
    Returns (lrs, losses, smoothed losses, stop reason)."""
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    average, best = 0.0, math.inf
    for update in range(steps):
        lr = lr_at(update, steps, start_lr, end_lr)
        loss = train_step(lr)
        if progress is not None:
            progress(1)
        if not math.isfinite(loss):
            return lrs, losses, smoothed, "loss not finite"
        average = SMOOTHING_BETA * average + (1 - SMOOTHING_BETA) * loss
        smoothed.append(average / (1 - SMOOTHING_BETA ** (update + 1)))  # bias correction: no ramp from 0
        lrs.append(lr)
        losses.append(loss)
        best = min(best, smoothed[-1])
        if smoothed[-1] > DIVERGENCE_FACTOR * best:
            return lrs, losses, smoothed, "diverged"
    return lrs, losses, smoothed, "end_lr reached"


def steepest_descent(lrs: list[float], smoothed: list[float]) -> int | None:
    """Index of the most negative slope of the smoothed loss against log10(lr); None below two points.

    The first points are left out (fastai skips 10; a third of a short test): there the bias-corrected
    average rests on a handful of losses, so batch-to-batch noise would pass for the steepest descent.
    """
    if len(lrs) < 2:
        return None
    slopes = np.gradient(np.asarray(smoothed, dtype=np.float64), np.log10(np.asarray(lrs, dtype=np.float64)))
    skip = min(SKIP_START, len(lrs) // 3)
    return skip + int(np.argmin(slopes[skip:]))


def starting_weights(model: torch.nn.Module, recipe: Recipe, phase_index: int, num_classes: int) -> list[str]:
    """Bring a fresh model to where training would start phase `phase_index`, as far as that needs no
    run: each phase's init from timm's pretrained weights or a file, and its head. What earlier phases
    would have trained, and an init from their checkpoints ("phase:<name>"), needs a run: skipped."""
    notes = []
    if phase_index > 0:
        notes.append(f"phases before {recipe.phases[phase_index].name!r} are not trained here: the test starts from their initial weights")
    for phase in recipe.phases[: phase_index + 1]:
        if phase.init.startswith("phase:"):
            notes.append(f"[{phase.name}] init {phase.init!r} skipped: it reads a training run's checkpoint")
        elif phase.init:
            # The run folder is only read for "phase:" inits, skipped above: none is needed here.
            notes.append(f"[{phase.name}] init: {initialize(model, recipe, phase, run_path=Path())}")
        ensure_head(model, phase.head, num_classes, phase.head_dropout)
    return notes


def lr_find(recipe: Recipe, phase_index: int, *, steps: int = 100, start_lr: float = 1e-7, end_lr: float = 10.0) -> LRFindResult:
    """Train a fresh copy of the recipe's model on `phase_index`'s data for up to `steps` updates, the LR
    rising exponentially from `start_lr` to `end_lr`; stops early when the smoothed loss diverges.

    Writes nothing: no run folder, checkpoint or tracker. Runs in one process, on the GPU if there is one.
    """
    if steps < 2:
        raise ValueError(f"steps must be >= 2, got {steps}")
    if not 0 < start_lr < end_lr:
        raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr} and {end_lr}")
    phase = recipe.phases[phase_index]
    splits = load_splits(recipe)
    # No log_with and no project_dir: the Accelerator only picks the device.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if accelerator.num_processes != 1:
        # Every process would write the same plot; one process is all the test needs.
        raise RecipeError("lr-find runs in one process: start it with python -m trainer, not accelerate launch")
    num_classes = len(splits.train.classes)
    model = create_model(recipe, num_classes=num_classes)
    weights = starting_weights(model, recipe, phase_index, num_classes)
    # The phase as training builds it (loaders, the recipe's optimizer with its weight-decay exclusions,
    # the first epoch's frozen stages, the loss and batch augmentation) with no EMA; the LR is set below.
    parts = set_up_phase(accelerator, recipe, phase_index, model, splits, lr=start_lr, with_ema=False)
    device, accum = accelerator.device, phase.grad_accum_steps
    global_batch = phase.batch_size_per_device * accelerator.num_processes * accum
    loader, model, optimizer = parts.loader, parts.model, parts.optimizer

    model.train()
    if phase.freeze_bn_stats:
        freeze_batchnorm_stats(parts.raw_model)
    # An epoch shorter than the test: carry on into the next one, as training would.
    batches = (batch for epoch in itertools.count() for batch in loader.epoch_batches(epoch))

    def train_step(lr: float) -> float:
        """One update at `lr` (over `accum` micro-batches, clipped as the phase clips): its mean loss."""
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # timm's layer-decay scale, if any
        losses = []
        for _ in range(accum):
            images, labels = next(batches)
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if parts.mixup is not None:
                images, labels = parts.mixup(images, labels)
            if parts.eraser is not None:
                images = parts.eraser(images)
            with parts.autocast:
                loss = parts.criterion(model(images), labels)
            accelerator.backward(loss / accum)
            losses.append(loss.item())  # a sync point every step: the stop test needs it anyway
        if phase.clip_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), phase.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(losses) / accum

    bar = tqdm(total=steps, desc=f"lr-find {phase.name}", unit="step", disable=not recipe.logging.progress_bar, mininterval=1.0)
    lrs, losses, smoothed, stop_reason = range_test(train_step, steps=steps, start_lr=start_lr, end_lr=end_lr, progress=bar.update)
    bar.close()
    accelerator.free_memory()
    result = LRFindResult(
        recipe=recipe.name, phase_index=phase_index, phase_name=phase.name, global_batch=global_batch,
        precision=parts.precision, start_lr=start_lr, end_lr=end_lr, steps=steps, stop_reason=stop_reason,
        lrs=lrs, losses=losses, smoothed=smoothed, weights=weights,
    )
    result.suggested_index = steepest_descent(result.lrs, result.smoothed)
    if result.suggested_index is not None:
        result.suggested_lr = result.lrs[result.suggested_index]
    return result


def save_plot(result: LRFindResult, path: Path) -> None:
    """Loss (faint) and smoothed loss against the LR on a log axis, the suggestion marked."""
    # The Agg canvas on a bare Figure: files only, no display needed, and no global pyplot/backend state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="tab:blue", linewidth=2, label=f"smoothed (beta {SMOOTHING_BETA})")
    if result.suggested_index is not None:
        ax.plot([result.suggested_lr], [result.smoothed[result.suggested_index]], "o", color="tab:red",
                label=f"steepest descent: lr {result.suggested_lr:.3g} (lr_per_256 {result.suggested_lr_per_256:.3g})")
    ax.set_xscale("log")
    if result.lrs:
        # Up to the smoothed curve's top (at most ~4x its best): a raw blow-up would squash the curve flat.
        low = min(min(result.losses), min(result.smoothed))
        ax.set_ylim(max(0.0, low - 0.1 * abs(low)), 1.1 * max(result.smoothed))
    ax.set_xlabel(f"learning rate (global batch {result.global_batch})")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test: {result.recipe}, phase {result.phase_index} '{result.phase_name}' ({result.stop_reason})")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png"))


def save_result(result: LRFindResult, plot_path: Path) -> Path:
    """The plot at `plot_path` and the series as JSON beside it (same stem); returns the JSON path."""
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    save_plot(result, plot_path)
    json_path = plot_path.with_suffix(".json")
    write_atomic(json_path, lambda tmp: tmp.write_text(json.dumps(result.to_dict(), indent=2)))
    return json_path
