"""Transfer learning: initial weights (earlier phase, pretrained, file), heads, freezing by stage, LR groups.

Stages come from timm's own `group_matcher(coarse=True)`: stem, then each stage, then the head
(the parameters no stage claims). Freezing "stages:k" freezes the stem and the first k stages;
"backbone" freezes everything but the head. Unfreezing goes from the top down, one group per
epoch listed in `unfreeze_at`, so the freezing of an epoch is a pure function of the epoch.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
from timm.optim import create_optimizer_v2
from timm.optim._param_groups import param_groups_weight_decay

from trainer.inference import classifier_path, make_head
from trainer.recipe import Phase, RecipeError


class InitError(RecipeError):
    """Initial weights cannot be found or do not fit the model; the message says how to provide them."""


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


# -- initial weights -------------------------------------------------------------------------------


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> list[str]:
    """Load `state` into `model`; head tensors whose shape differs (another class count) are left as
    initialised. Anything else missing or mis-shaped is an error. Returns the skipped names."""
    loadable, skipped = fitting_weights(model, state, what)
    model.load_state_dict(loadable, strict=False)
    return skipped


def fitting_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the tensors of `state` that `load_weights` loads, the head names it skips), or InitError. Shapes
    only, so a model on the meta device checks a file before any work."""
    own = model.state_dict()
    head = classifier_path(model) + "."
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape and k.startswith(head)]
    state = {k: v for k, v in state.items() if k not in skipped}
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith(head)]
    unexpected = [k for k in state if k not in own and not k.startswith(head)]
    if missing or unexpected or wrong:
        raise InitError(
            f"{what} does not fit model {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shapes {wrong[:5]}; check model.arch"
        )
    return {k: v for k, v in state.items() if k in own}, skipped


def _class_count(shapes: dict[str, torch.Size]) -> int:
    """Classes of a head given its tensors' shapes: the output width of its last matrix ("fc.3.weight" after "fc.0.weight")."""
    order = {k: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in k.split(".")] for k, v in shapes.items() if len(v) == 2}
    return shapes[max(order, key=order.get)][0] if order else 0


def check_kept_head(model: torch.nn.Module, state: dict[str, torch.Tensor], phase: Phase, what: str) -> None:
    """A phase that keeps its head (head="") and starts from a weights file must find a head there that
    fits: `load_weights` would otherwise leave a head of another class count (or shape) randomly
    initialised without a word, and the phase would train what was meant to be a trained classifier from
    scratch. A file without a head (a bare backbone) is fine. A new head is asked for with head="linear"."""
    if phase.head:
        return
    prefix = classifier_path(model) + "."
    own = {k: v.shape for k, v in model.state_dict().items() if k.startswith(prefix)}
    theirs = {k: v.shape for k, v in state.items() if k.startswith(prefix)}
    if not theirs or own == theirs:
        return
    ours, file_classes = _class_count(own), _class_count(theirs)
    found = f"{file_classes} classes" if file_classes != ours else f"the same {ours} classes but another shape ({', '.join(f'{k} {tuple(v)}' for k, v in theirs.items())})"
    raise InitError(
        f"phase {phase.name!r}: {what} holds a head for {found}, and this phase keeps its head (head=\"\"), "
        f"which needs one for the data's {ours} classes; to train a new head, set head=\"linear\" (or \"mlp:<hidden>\") "
        f"on this phase, e.g. --set phases.{phase.name}.head=linear; or check --data and init"
    )


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise InitError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip each raise their own type for a damaged file
        raise InitError(f"weights file {path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]}); is it a .safetensors or torch .pth file?") from None
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InitError(f"weights file {path} holds no state dict (name -> tensor)")
    return state


def pretrained_file(arch: str, local_file: str = "") -> Path:
    """timm's pretrained weights for `arch`, offline: `local_file` if given, else the Hugging Face
    cache (filled earlier by any timm download). Never downloads."""
    if local_file:
        return Path(local_file).expanduser()
    cfg = timm.models.get_pretrained_cfg(arch.split(".")[0])
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if hub_id:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        for filename in ("model.safetensors", "pytorch_model.bin"):
            try:
                return Path(hf_hub_download(hub_id, filename, local_files_only=True))
            except (LocalEntryNotFoundError, FileNotFoundError, OSError):
                continue
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    raise InitError(
        f"no pretrained weights for {arch!r} on this machine (looked for {hub_id or 'a timm hub id'} in {cache}). "
        "Provide them: set model.pretrained_file=/path/to/weights.safetensors (e.g. --set model.pretrained_file=...), "
        f"or on a connected machine run python -c \"import timm; timm.create_model('{arch}', pretrained=True)\" "
        "to fill the cache and copy it here"
    )


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


def build_optimizer_groups(model: torch.nn.Module, phase: Phase, lr: float):
    """timm's optimizer over every parameter (frozen ones too, so unfreezing needs no new optimizer):
    no weight decay on norms and biases; a lower LR on the backbone by `backbone_lr_mult` (as
    `lr_scale`, which timm's schedulers honour) or by timm's layer-wise decay."""
    for param in model.parameters():
        param.requires_grad_(True)
    common = {"opt": phase.optimizer, "lr": lr, "weight_decay": phase.weight_decay, "momentum": phase.momentum}
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


def freeze_batchnorm_stats(model: torch.nn.Module) -> None:
    """Put every BatchNorm in eval mode: running statistics stay those of the initial weights."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
