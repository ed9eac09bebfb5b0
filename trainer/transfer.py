"""Transfer learning: heads, freezing by stage, and LR groups (initial weights are `trainer.model`'s).

Stages come from timm's own `group_matcher(coarse=True)`: stem, then each stage, then the head
(the parameters no stage claims). Freezing "stages:k" freezes the stem and the first k stages;
"backbone" freezes everything but the head. Unfreezing goes from the top down, one group per
epoch listed in `unfreeze_at`, so the freezing of an epoch is a pure function of the epoch.
"""

from __future__ import annotations

import inspect

import torch
from timm.models import group_parameters
from timm.optim import create_optimizer_v2, get_optimizer_class
from timm.optim._param_groups import param_groups_weight_decay

from trainer.inference import classifier_path, make_head
from trainer.recipe import Phase

# -- heads (make_head and classifier_path live in trainer/inference.py, which bundles carry) --------


def _get(model: torch.nn.Module, path: str) -> torch.nn.Module:
    return model.get_submodule(path)


def _set(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def _in_features(head: torch.nn.Module) -> int:
    first = next(m for m in head.modules() if isinstance(m, torch.nn.Linear))
    return first.in_features


def _head_signature(head: torch.nn.Module) -> tuple:
    return tuple((type(m).__name__, getattr(m, "in_features", None), getattr(m, "out_features", None), getattr(m, "p", None)) for m in head.modules() if not isinstance(m, torch.nn.Sequential))


def ensure_head(model: torch.nn.Module, spec: str, num_classes: int, dropout: float = 0.0) -> bool:
    """Give `model` the head `spec` asks for; an identical head is kept (and its trained weights with it).
    Returns whether the head was replaced."""
    if not spec:
        return False
    path = classifier_path(model)
    current = _get(model, path)
    wanted = make_head(_in_features(current), num_classes, spec, dropout)
    if _head_signature(current) == _head_signature(wanted):
        return False
    _set(model, path, wanted.to(next(current.parameters()).device))
    return True


# -- freezing and LR groups ------------------------------------------------------------------------


def stage_groups(model: torch.nn.Module) -> list[list[str]]:
    """Parameter names by stage, bottom (stem) to top (head), from timm's coarse group matcher."""
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [names for _, names in sorted(groups.items())]


def frozen_group_count(phase: Phase, num_groups: int, epoch: int) -> int:
    """How many groups from the bottom are frozen in `epoch` of `phase`."""
    if not phase.freeze:
        base = 0
    elif phase.freeze == "backbone":
        base = num_groups - 1
    else:  # "stages:k": the stem and the first k stages
        base = min(num_groups - 1, 1 + int(phase.freeze.split(":", 1)[1]))
    unfrozen = sum(1 for e in phase.unfreeze_at if e <= epoch)
    return max(0, base - unfrozen)


def apply_freeze(model: torch.nn.Module, phase: Phase, epoch: int) -> int:
    """Set requires_grad for `epoch`; returns the number of frozen groups."""
    groups = stage_groups(model)
    frozen = frozen_group_count(phase, len(groups), epoch)
    frozen_names = {n for g in groups[:frozen] for n in g}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen_names)
    return frozen


def parameter_counts(model: torch.nn.Module, phase: Phase) -> dict[str, int]:
    """Parameters of `model` as `phase` trains it, without touching requires_grad: total, trainable and
    frozen in its first epoch, and with an unfreeze schedule the trainable ones of its last epoch too."""
    groups = stage_groups(model)
    sizes = {name: p.numel() for name, p in model.named_parameters()}

    def frozen_in(epoch: int) -> int:
        return sum(sizes[n] for g in groups[: frozen_group_count(phase, len(groups), epoch)] for n in g)

    total, frozen = sum(sizes.values()), frozen_in(0)
    counts = {"total": total, "trainable": total - frozen, "frozen": frozen}
    if phase.unfreeze_at:
        counts["trainable_last_epoch"] = total - frozen_in(phase.epochs - 1)
    return counts


def build_optimizer_groups(model: torch.nn.Module, phase: Phase, lr: float):
    """timm's optimizer over every parameter (frozen ones too, so unfreezing needs no new optimizer):
    no weight decay on norms and biases; a lower LR on the backbone by `backbone_lr_mult` (as
    `lr_scale`, which timm's schedulers honour) or by timm's layer-wise decay."""
    for param in model.parameters():
        param.requires_grad_(True)
    common = {"opt": phase.optimizer, "lr": lr, "weight_decay": phase.weight_decay, "momentum": phase.momentum}
    if fused_on_cpu(model, phase.optimizer):
        common["fused"] = True
    if phase.layer_decay:
        return create_optimizer_v2(model, layer_decay=phase.layer_decay, **common)
    if phase.backbone_lr_mult == 1.0:
        return create_optimizer_v2(model, **common)
    head = set(stage_groups(model)[-1])
    groups = []
    for group in param_groups_weight_decay(model, phase.weight_decay):
        named = dict(model.named_parameters())
        ids = {id(p) for p in group["params"]}
        for in_head in (False, True):
            params = [p for n, p in named.items() if id(p) in ids and (n in head) == in_head]
            if params:
                groups.append({**group, "params": params, "lr_scale": 1.0 if in_head else phase.backbone_lr_mult})
    return create_optimizer_v2(groups, **common)


def fused_on_cpu(model: torch.nn.Module, optimizer: str) -> bool:
    """Whether to ask torch for its fused kernel: the model's weights are on the CPU and timm's class for
    `optimizer` takes `fused` (torch's SGD, Adam, AdamW, Adagrad). torch uses its per-tensor loop there by
    default; the fused kernel makes one vectorised, multi-threaded pass (a ResNet-18 AdamW step: about 11
    against 140 ms on 2 cores). On GPUs torch's own default (foreach) stays."""
    if next(model.parameters()).device.type != "cpu":
        return False
    return "fused" in inspect.signature(get_optimizer_class(optimizer)).parameters


def freeze_batchnorm_stats(model: torch.nn.Module) -> None:
    """Put every BatchNorm in eval mode: running statistics stay those of the initial weights."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
