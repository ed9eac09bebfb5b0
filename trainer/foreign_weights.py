"""Weights from another implementation of a timm architecture: its state dict mapped onto timm's key
names by position, when the tensors match in order and shape, and written as a safetensors file that
`model.pretrained_file` takes (`python -m trainer import-weights`).

Ports of a published network (EfficientNet in lukemelas' layout, TF conversions, ...) name their
tensors their own way but keep the layers in the order of the paper, as timm does; a match of every
shape, in order, is what makes the mapping trustworthy. BatchNorm's `num_batches_tracked` counters
are left out of the matching on both sides (some ports drop them, and their scalar shape matches
anything); the file carries timm's with the value 0, unused while BatchNorm has a momentum.

Shapes alone cannot tell a BatchNorm's weight from its bias (or running mean from variance), so where
both names end in one of torch's own leaf names (`STANDARD_LEAVES`) the leaves must agree too. A torch
file keeps the order its writer registered the layers in; a .safetensors file is read in its storage
order, which safetensors' writer sorts by dtype and name: such a file maps only when that order is the
architecture's, and is otherwise refused at the first place they part.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from trainer.atomic import write_atomic
from trainer.recipe import RecipeError

COUNTER_SUFFIX = "num_batches_tracked"  # BatchNorm's update counter: a buffer, not a learned value
STANDARD_LEAVES = ("weight", "bias", "running_mean", "running_var")  # torch's names: same-shaped, told apart by name
NESTED_KEYS = ("state_dict", "model", "model_state_dict", "module")  # where training scripts put the weights


class ForeignWeightsError(RecipeError):
    """The file cannot be read or does not map onto the architecture; the message says where and why."""


def read_foreign_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The named tensors of a .safetensors file or a torch file (.pth/.pt/.bin, read with
    weights_only=True: no code runs), in the file's order. A checkpoint that nests the weights under
    "state_dict" or "model" is unwrapped; non-tensor entries (epoch numbers, configs) are dropped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ForeignWeightsError(f"weights file {path} does not exist")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip each raise their own type for a damaged or unsafe file
        raise ForeignWeightsError(
            f"weights file {path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
            "import-weights reads .safetensors and torch .pth/.pt/.bin files holding tensors (weights_only)"
        ) from None
    while isinstance(state, dict) and not any(torch.is_tensor(v) for v in state.values()):
        nested = next((state[k] for k in NESTED_KEYS if isinstance(state.get(k), dict)), None)
        if nested is None:
            break
        state = nested
    tensors = {str(k): v for k, v in state.items() if torch.is_tensor(v)} if isinstance(state, dict) else {}
    if not tensors:
        raise ForeignWeightsError(f"weights file {path} holds no state dict (name -> tensor)")
    return tensors


def timm_shapes(arch: str) -> dict[str, torch.Size]:
    """timm's state dict for `arch` (1000 classes, as ImageNet weights have), as names and shapes; built
    on the meta device: no memory, no initialisation."""
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models() lists them"
        raise ForeignWeightsError(f"--arch {arch!r} is not a timm model{hint}") from None
    return {k: v.shape for k, v in model.state_dict().items()}


def _learned(names: list[str]) -> list[str]:
    return [k for k in names if not k.endswith(COUNTER_SUFFIX)]


def map_onto(foreign: dict[str, torch.Tensor], arch: str, source: str = "the file") -> dict[str, torch.Tensor]:
    """`foreign`'s tensors under timm's names for `arch`, matched by position; ForeignWeightsError naming
    the first position where the two part (index, both names, both shapes) when they do not match."""
    shapes = timm_shapes(arch)
    ours, theirs = _learned(list(shapes)), _learned(list(foreign))
    for index, (own, other) in enumerate(zip(ours, theirs)):
        own_leaf, other_leaf = own.rpartition(".")[2], other.rpartition(".")[2]
        swapped = own_leaf != other_leaf and own_leaf in STANDARD_LEAVES and other_leaf in STANDARD_LEAVES
        if shapes[own] != foreign[other].shape or swapped:
            raise ForeignWeightsError(
                f"{source} does not match timm's {arch} at tensor {index} (counting without {COUNTER_SUFFIX}): "
                f"{arch} has {own} {tuple(shapes[own])}, {source} has {other} {tuple(foreign[other].shape)}; "
                "the two are different architectures (or ordered differently): check --arch"
            )
    if len(ours) != len(theirs):
        index = min(len(ours), len(theirs))
        extra = f"{arch} has {ours[index]} {tuple(shapes[ours[index]])}, {source} has no more" if len(ours) > len(theirs) else \
            f"{source} has {theirs[index]} {tuple(foreign[theirs[index]].shape)}, {arch} has no more"
        raise ForeignWeightsError(
            f"{source} does not match timm's {arch} at tensor {index} (counting without {COUNTER_SUFFIX}): {extra} "
            f"({len(theirs)} tensors against {len(ours)}); check --arch"
        )
    # Copies: safetensors refuses tensors that share memory, and a slice of a bigger buffer would save it whole.
    mapped = {own: foreign[other].detach().clone().contiguous() for own, other in zip(ours, theirs)}
    for name in shapes:
        if name.endswith(COUNTER_SUFFIX):
            mapped[name] = torch.zeros((), dtype=torch.int64)
    return {name: mapped[name] for name in shapes}  # timm's order


def import_weights(path: str | Path, arch: str, out: str | Path) -> str:
    """Map the weights in `path` onto timm's `arch` and write them to `out` (.safetensors, atomically).
    Returns a one-line summary."""
    out = Path(out).expanduser()
    if out.suffix != ".safetensors":
        raise ForeignWeightsError(f"--out {out} must end in .safetensors (the format model.pretrained_file reads)")
    foreign = read_foreign_state(path)
    mapped = map_onto(foreign, arch, source=Path(path).name)
    write_atomic(out, lambda tmp: save_file(mapped, str(tmp), metadata={"format": "pt", "arch": arch, "source": Path(path).name}))
    learned = len(_learned(list(mapped)))
    return (f"{out}: {learned} tensors of {Path(path).name} under timm's {arch} names "
            f"(+{len(mapped) - learned} BatchNorm counters); use it with --set model.arch={arch} --set model.pretrained_file={out}")
