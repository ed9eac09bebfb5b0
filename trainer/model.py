"""The recipe's model: built by timm with a head for the data's classes, its names checked before any
work, and each phase's initial weights (an earlier phase's best, timm's pretrained weights offline, or a
file) found, checked against the model and loaded. Weights only: resuming is `trainer.launch`'s."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import timm
import torch
from accelerate.utils import set_seed
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors.torch import load_file

from trainer.inference import classifier_path
from trainer.recipe import Phase, Recipe, RecipeError
from trainer.run_folder import checkpoint_weights, phase_checkpoint
from trainer.transfer import ensure_head


class InitError(RecipeError):
    """Initial weights cannot be found or do not fit the model; the message says how to provide them."""


def create_model(recipe: Recipe, num_classes: int) -> torch.nn.Module:
    """The recipe's timm model with a head for `num_classes`, randomly initialised from the recipe's seed."""
    set_seed(recipe.seed)
    return timm.create_model(
        recipe.model.arch,
        num_classes=num_classes,
        drop_rate=recipe.model.drop_rate,
        drop_path_rate=recipe.model.drop_path_rate,
    )


def configure_device(device: torch.device) -> None:
    """GPU settings for training: cuDNN picks the fastest convolution algorithm per input shape (measured
    on the first batch of each shape), and float32 matmuls and convolutions use TF32 tensor cores (10-bit
    mantissa inputs, fp32 accumulation; what bf16/fp16 autocast leaves in fp32 goes faster too). Nothing
    on the CPU. Process-wide, like every torch.backends switch. cuDNN's choice is timed, so two processes
    may pick different algorithms: a resumed GPU run can differ from an uninterrupted one in the last bits."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    # torch 2.14 has two APIs for this. The newer `torch.backends.cuda.matmul.fp32_precision = "tf32"` makes
    # `torch.get_float32_matmul_precision()` raise ("mix of the legacy and new APIs"), and inductor's
    # autotuning cache calls it; "high" sets the same TF32 matmuls (fp32_precision reads "tf32") and warns of nothing.
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.conv.fp32_precision = "tf32"


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


# -- initial weights -------------------------------------------------------------------------------


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
