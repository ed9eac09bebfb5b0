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


def ema_decay_for(phase: Phase, updates: int) -> float:
    """The EMA's decay for a phase of `updates` optimizer updates: `ema_decay`, or with `ema_horizon` the
    decay whose averaging window (1 / (1 - decay) updates) is that fraction of the phase, at most
    `ema_decay`: 0.999 on a phase of 30 updates would leave the EMA at the weights it started from."""
    if not phase.ema_horizon:
        return phase.ema_decay
    window = max(1.0, phase.ema_horizon * updates)
    return min(phase.ema_decay, 1.0 - 1.0 / window)


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


def class_weights(counts) -> torch.Tensor:
    """`data.balance="loss"`'s weight per class from the train counts: w_c = n / (k * count_c), n images in
    k classes (those with images). Normalised so that the weights averaged over the training images are 1
    (sum_c count_c w_c = n): the loss keeps its scale on the train distribution, and so does the LR that
    suits it, while a class with a tenth of the images weighs ten times as much per image. A class
    without images gets 0."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    present = int((counts > 0).sum())
    weights = torch.where(counts > 0, counts.sum() / (max(present, 1) * counts.clamp(min=1)), 0.0)
    return weights.float()


class WeightedCrossEntropy(torch.nn.Module):
    """Cross-entropy with class weights for hard labels (with label smoothing) and soft targets (Mixup/CutMix)
    alike: torch's `cross_entropy(weight=...)` per sample, -sum_c w_c y_c log p_c with y the (smoothed or
    mixed) target, averaged over the batch. torch's own mean divides hard-label batches by the sum of their
    targets' weights but soft-target batches by their size; dividing both by the size keeps a Mixup batch
    and a plain one on one scale."""

    def __init__(self, weight: torch.Tensor, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(
            logits, targets, weight=self.weight, label_smoothing=self.label_smoothing, reduction="none"
        ).mean()


def build_criterion(phase: Phase, num_classes: int, weights: torch.Tensor | None = None):
    """(mixup or None, loss): timm's Mixup/CutMix makes soft targets, which need a soft-target loss.
    `weights` (`class_weights`, data.balance="loss"): class-weighted CE, or BCE with each class's term
    (its column) times its weight."""
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
        loss = (BinaryCrossEntropy(target_threshold=0.2, weight=weights) if mixup
                else BinaryCrossEntropy(smoothing=phase.label_smoothing, weight=weights))
    elif weights is not None:
        # With mixup the targets already carry the smoothing.
        loss = WeightedCrossEntropy(weights, 0.0 if mixup else phase.label_smoothing)
    elif mixup:
        loss = SoftTargetCrossEntropy()
    else:
        loss = torch.nn.CrossEntropyLoss(label_smoothing=phase.label_smoothing)
    return mixup, loss


# -- updates that can be dropped -------------------------------------------------------------------


def host_counters(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` keeps per-step state the device cannot put back: Python numbers in its state,
    or tensors on another device than their parameters' (timm's Lamb counts steps in a CPU tensor in
    its param groups; torch's Adam in CPU tensors unless `capturable`)."""
    for group in optimizer.param_groups:
        device = group["params"][0].device if group["params"] else None
        for key, value in group.items():
            if torch.is_tensor(value) and key != "params" and value.device != device:
                return True
    for param, state in optimizer.state.items():
        for value in state.values():
            if not torch.is_tensor(value) or value.device != param.device:
                return True
    return False


def capture_steps_on_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """torch's Adam family counts steps in CPU tensors unless `capturable`: on a GPU, make it count on
    the device, so a dropped update can put the count back without reading anything on the host.
    Elsewhere off (a GPU run's checkpoint resumed on the CPU brings `capturable` with its param groups)."""
    for group in optimizer.param_groups:
        if "capturable" in group and not group.get("fused"):
            group["capturable"] = device.type == "cuda"
            for p in group["params"] if device.type == "cuda" else ():
                step = optimizer.state.get(p, {}).get("step")
                if torch.is_tensor(step) and step.device != p.device:
                    optimizer.state[p]["step"] = step.to(p.device)


class GuardedUpdate:
    """The end of an optimizer update that a bad batch may drop: the optimizer step, the EMA update and
    the BatchNorm running statistics (which moved in the forward pass, before the loss could be checked).

    `skip` is either a Python bool, decided on the host after reading the flags (free on the CPU, where
    nothing runs ahead), or a 0-d bool tensor on the device, decided there without a host read: then
    everything the step changes (parameters, optimizer state) is copied aside first and put back with
    `torch.where` when the flag is set, the EMA moves by a weight that is 0 on a dropped update, and the
    BatchNorm statistics come back from the copy kept at the last good update. That costs one copy of
    the parameters and the optimizer state in memory and bandwidth: cheap on a GPU, ~20 % of a step on a
    2-core CPU, hence the host bool there. Works for any optimizer whose per-step state lives in tensors
    on the device (torch's, with `capture_steps_on_device`; timm's Lion, SGD variants ...); the loop
    checks `host_counters` after the first update and decides on the host for the others.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, ema) -> None:
        self.optimizer, self.model, self.ema = optimizer, model, ema
        self.buffers = list(model.buffers())  # BatchNorm's running mean and variance, and its batch count
        self.good_buffers = [b.detach().clone() for b in self.buffers]
        self._tensors: list[torch.Tensor] = []
        self._backups: list[torch.Tensor] = []
        self._checked_at, self._host_counters = -1, True

    def needs_host(self) -> bool:
        """Whether this update must be decided on the host: a parameter is about to get optimizer state
        for the first time (the first update, a stage just unfrozen), which the device cannot undo, or the
        optimizer keeps per-step state off the device (`host_counters`, checked whenever its state grows)."""
        state = self.optimizer.state
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if any(p.grad is not None and p not in state for p in params):
            return True
        if self._checked_at != len(state):
            self._checked_at, self._host_counters = len(state), host_counters(self.optimizer)
        return self._host_counters

    def _stepped(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tensors = [p for g in self.optimizer.param_groups for p in g["params"]]
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        tensors += [v for g in self.optimizer.param_groups for k, v in g.items() if k != "params" and torch.is_tensor(v)]
        if len(tensors) != len(self._tensors) or any(a is not b for a, b in zip(tensors, self._tensors)):
            self._tensors, self._backups = tensors, [t.detach().clone() for t in tensors]
        return self._tensors, self._backups

    @torch.no_grad()
    def step(self, skip: bool | torch.Tensor, ema_step: int) -> None:
        """Step the optimizer and the EMA unless `skip`; BatchNorm statistics put back if `skip`.
        Gradients are left for the caller to clear."""
        if not torch.is_tensor(skip):
            if skip:
                torch._foreach_copy_(self.buffers, self.good_buffers)
                return
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model, step=ema_step)
            torch._foreach_copy_(self.good_buffers, self.buffers)
            return
        tensors, backups = self._stepped()
        torch._foreach_copy_(backups, tensors)
        self.optimizer.step()
        for tensor, backup in zip(tensors, backups):
            torch.where(skip, backup, tensor, out=tensor)
        for buffer, good in zip(self.buffers, self.good_buffers):
            torch.where(skip, good, buffer, out=buffer)
        torch._foreach_copy_(self.good_buffers, self.buffers)
        if self.ema is not None:
            # ModelEmaV3.apply_update_ with its weight on the device: 0 on a dropped update (the model's
            # values are the restored ones then, so nothing moves). ema += weight * (model - ema) as three
            # foreach ops: `_foreach_lerp_` with a tensor weight reads the weight on the host.
            weight = (~skip).to(torch.float32) * (1.0 - self.ema.get_decay(ema_step))
            ema_values, model_values = [], []
            for ema_v, model_v in zip(self.ema.module.state_dict().values(), self.model.state_dict().values()):
                if ema_v.is_floating_point():
                    ema_values.append(ema_v)
                    model_values.append(model_v)
                else:
                    ema_v.copy_(model_v)
            steps = torch._foreach_sub(model_values, ema_values)
            torch._foreach_mul_(steps, weight)
            torch._foreach_add_(ema_values, steps)
