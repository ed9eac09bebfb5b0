"""What a phase optimises with: timm's optimizer and LR schedule (stepped per update, so the LR is a
pure function of the update count), the plateau schedule written here, and the loss with timm's
Mixup/CutMix."""

from __future__ import annotations

import math

import torch
from timm.data import Mixup
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler import create_scheduler_v2

from trainer.recipe import Phase
from trainer.transfer import build_optimizer_groups


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
