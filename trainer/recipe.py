"""Recipes: frozen dataclasses describing a training run, and `--set key=value` overrides checked against them."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from loaders import AUTO_AUGMENT_POLICIES, IMAGENET_MEAN, IMAGENET_STD
from loaders.screening import BAD_FILE_POLICIES

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODE_DEVICES = ("auto", "cpu", "mixed")
DECODE_MODES = ("auto", "roi", "full")
BALANCE_MODES = ("", "sampler", "loss")
COMPILE_MODES = ("auto", "on", "off")
MAX_PREFETCH_DEPTH = 16
INT_MAX = 2**31 - 1  # DALI, numpy seeds and torch take many of these as 32-bit integers
MAX_RES_PX = 8192  # 8192² RGB is 200 MB a sample: a larger resolution is a typo, not a run
MAX_HEAD_HIDDEN = 65536


class RecipeError(ValueError):
    """A recipe or an override is wrong; the message names the key and what would be valid."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RecipeError(message)


def _shown(value: Any) -> str:
    """`value` for an error message: repr (one line, whatever the input holds), cut when long."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_problem(value: Any, typ: Any) -> str | None:
    """Why `value` does not fit the field type `typ` (None when it does). Run before the range rules,
    so a recipe file's `epochs="2"` or a NaN rate stops here with the field's name, not deep in training."""
    if typing.get_origin(typ) is tuple:
        args = typing.get_args(typ)
        if not isinstance(value, tuple):
            return f"must be a tuple, got {_shown(value)}"
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(items) != len(value):
            return f"takes {len(items)} values, got {_shown(value)}"
        return next((problem for v, t in zip(value, items) if (problem := _type_problem(v, t))), None)
    if dataclasses.is_dataclass(typ):
        return None if isinstance(value, typ) else f"must be a {typ.__name__}, got {_shown(value)}"
    if typ is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {_shown(value)}"
    if typ is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer, got {_shown(value)}"
        return None if abs(value) <= INT_MAX else f"must be at most {INT_MAX} in size, got {_shown(value)}"
    if typ is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"must be a number, got {_shown(value)}"
        return None if math.isfinite(value) else f"must be a finite number, got {value}"
    if typ is str:
        if not isinstance(value, str):
            return f"must be a string, got {_shown(value)}"
        return None if "\x00" not in value else f"must not contain a NUL character, got {_shown(value)}"
    return None


def _check_fields(obj: Any, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        problem = _type_problem(getattr(obj, f.name), hints[f.name])
        _check(problem is None, f"{prefix}{f.name} {problem}")


def _is_folder_name(name: str) -> bool:
    """Phase and run names become folders under the run: printable, no separators, not "." or ".."."""
    return bool(name) and name not in (".", "..") and name.isprintable() and not any(c in name for c in "/\\")


@dataclass(frozen=True)
class Model:
    arch: str = "resnet50"  # any timm.create_model name
    drop_rate: float = 0.0  # dropout before the classifier
    drop_path_rate: float = 0.0  # stochastic depth
    channels_last: bool = False  # NHWC memory format: faster convolutions on GPUs with tensor cores
    pretrained_file: str = ""  # local weights for init="pretrained"; else the Hugging Face cache (never downloads)
    compile: str = "auto"  # torch.compile: "auto" = on with CUDA, off on the CPU; "on"; "off"

    def __post_init__(self) -> None:
        _check_fields(self, "model.")
        _check(self.compile in COMPILE_MODES, f"model.compile must be one of {COMPILE_MODES}, got {_shown(self.compile)}")
        _check(bool(self.arch.strip()), "model.arch must name a timm model, e.g. resnet50")
        _check(0.0 <= self.drop_rate < 1.0, f"model.drop_rate must be in [0, 1), got {self.drop_rate}")
        _check(0.0 <= self.drop_path_rate < 1.0, f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


@dataclass(frozen=True)
class Data:
    path: str = ""  # an ImageFolder (root/train + root/val, or one folder split below); "builtin:digits"; "hf:..."
    val_fraction: float = 0.2  # used only when there is no val/ folder: seeded stratified split
    # An untouched test split, scored once at the run's end: the share of each class taken from the training
    # images (seeded, stratified, disjoint from val) when the data have no test/ folder (or HF test split of
    # their own). 0 = no test split, unless the data have one.
    test_fraction: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    decode_device: str = "auto"  # "mixed" = nvJPEG on the GPU; "auto" picks it when CUDA is there
    loader_threads: int = 2  # DALI CPU worker threads per process
    # How training images are decoded: "roi" = only the random crop's window (least work); "full" = the
    # whole image, then crop and resize in one op; "auto" = "roi" unless a trial decode of one batch in a
    # child process crashes or fails before training, then "full" (it prints why).
    decode_mode: str = "auto"
    prefetch_depth: int = 2  # batches DALI prepares ahead of the one being trained on
    # Files the decoder would fail on (empty, truncated, not an image, ...), found by a header check before
    # training: "skip" = train without them, listed in <run>/bad_files.json; "stop" = exit 2 with the list.
    # Greyscale, CMYK, 16-bit, palette and alpha images are converted to RGB either way.
    bad_files: str = "skip"
    # Unbalanced classes: "" = train on the data as it is; "sampler" = each epoch's order drawn with
    # replacement, every class equally likely; "loss" = cross-entropy (or BCE) with class weights
    # n / (k * count_c) from the train counts (run.json lists them).
    balance: str = ""

    def __post_init__(self) -> None:
        _check_fields(self, "data.")
        _check(self.balance in BALANCE_MODES, f"data.balance must be one of {BALANCE_MODES}, got {_shown(self.balance)}")
        _check(0.0 < self.val_fraction < 1.0, f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        _check(0.0 <= self.test_fraction < 1.0 and self.val_fraction + self.test_fraction < 1.0,
               f"data.test_fraction must be in [0, 1) and leave training images beside data.val_fraction "
               f"({self.val_fraction}), got {self.test_fraction}")
        _check(self.decode_device in DECODE_DEVICES, f"data.decode_device must be one of {DECODE_DEVICES}, got {self.decode_device!r}")
        _check(self.loader_threads >= 1, f"data.loader_threads must be >= 1, got {self.loader_threads}")
        _check(self.decode_mode in DECODE_MODES, f"data.decode_mode must be one of {DECODE_MODES}, got {_shown(self.decode_mode)}")
        _check(1 <= self.prefetch_depth <= MAX_PREFETCH_DEPTH, f"data.prefetch_depth must be in 1..{MAX_PREFETCH_DEPTH}, got {self.prefetch_depth}")
        _check(self.bad_files in BAD_FILE_POLICIES, f"data.bad_files must be one of {BAD_FILE_POLICIES}, got {self.bad_files!r}")
        _check(all(s > 0 for s in self.std), f"data.std must be positive, got {self.std}")


SCHEDULES = ("cosine", "step", "onecycle", "plateau", "tanh", "poly")
EARLY_STOP_METRICS = ("val_top1", "ema_val_top1", "best_top1", "val_loss", "val_macro_f1", "val_balanced_accuracy")
# early_stop_metric values that also rank a phase's checkpoints ("best"): top-1 otherwise.
CLASS_AVERAGED_METRICS = ("val_macro_f1", "val_balanced_accuracy")


@dataclass(frozen=True)
class Phase:
    name: str = "main"
    epochs: int = 10
    batch_size_per_device: int = 64
    # -- where the weights come from and what trains --
    init: str = ""  # "" = keep the current weights; "phase:<name>" = that phase's best (EMA if it scored
    #                 better); "pretrained" = timm's weights for model.arch, offline; or a .safetensors path
    subset: float = 1.0  # fraction of each training class to use (stratified, seeded)
    head: str = ""  # "" = keep; "linear" or "mlp:<hidden>" = a new head (kept if already that shape)
    head_dropout: float = 0.0
    freeze: str = ""  # "" = nothing; "backbone" = all but the head; "stages:k" = the stem and first k stages
    unfreeze_at: tuple[int, ...] = ()  # epochs at which the top frozen stage becomes trainable
    backbone_lr_mult: float = 1.0  # LR of everything but the head, relative to the head's
    layer_decay: float = 0.0  # timm layer-wise LR decay (e.g. 0.75); 0 = off
    freeze_bn_stats: bool = False  # BatchNorm running statistics stay those of the initial weights
    optimizer: str = "adamw"  # timm.optim.create_optimizer_v2 name: sgd, adamw, lamb, lion, ...
    lr_per_256: float = 1e-3  # peak LR for 256 images; scaled by the global batch (Goyal et al.)
    momentum: float = 0.9  # for SGD-like optimizers
    weight_decay: float = 0.05  # not applied to norms and biases
    schedule: str = "cosine"  # cosine, step, tanh, poly (timm); onecycle (warmup from lr/25, cosine to lr/25e4); plateau
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.01  # final LR as a fraction of the peak
    decay_epochs: float = 30.0  # step schedule: epochs between decays
    decay_rate: float = 0.1  # step schedule: factor at each decay
    plateau_patience_epochs: int = 2  # plateau schedule: epochs without val top-1 gain before LR x decay_rate
    early_stop_patience: int = 0  # stop the phase after this many epochs without improvement; 0 = off
    # val_top1, ema_val_top1, best_top1 (model or EMA), val_loss, val_macro_f1, val_balanced_accuracy (the
    # model's; these two also rank the phase's checkpoints, by the better of model and EMA, instead of
    # top-1: for unbalanced val sets, which top-1 flatters)
    early_stop_metric: str = "best_top1"
    # Early stopping may end the phase only once this fraction of its epochs has run: a stop before the
    # schedule has brought the LR down keeps weights trained at a high LR. 0 = from the first epoch on.
    early_stop_after: float = 0.0
    label_smoothing: float = 0.0
    bce_loss: bool = False  # binary cross-entropy per class (timm), as in ResNet-strikes-back
    mixup_alpha: float = 0.0  # timm Mixup; 0 = off
    cutmix_alpha: float = 0.0  # timm CutMix; 0 = off
    mixup_prob: float = 1.0  # chance a batch is mixed at all
    mixup_switch_prob: float = 0.5  # with both on: chance of CutMix instead of Mixup
    random_erasing: float = 0.0  # timm RandomErasing probability, on the normalised batch
    rand_augment_layers: int = 0  # DALI RandAugment: ops per image; 0 = off
    rand_augment_magnitude: int = 9  # DALI RandAugment magnitude (0-30)
    color_jitter: float = 0.0  # brightness/contrast/saturation strength (timm's 0.4 convention); 0 = off
    # Photo augmentations, each off by default and drawn from (seed, epoch, sample) like the ones above:
    hue: float = 0.0  # colour jitter's hue: shift uniform in ±hue of the hue circle (torchvision's 0-0.5 convention)
    rotate_deg: float = 0.0  # rotation by an angle uniform in ±rotate_deg degrees (nearest-neighbour, grey corners)
    vflip_prob: float = 0.0  # vertical flip (for images with no "up": leaves, skin, cells)
    blur_prob: float = 0.0  # chance of a Gaussian blur, sigma uniform in blur_sigma
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # px, torchvision's GaussianBlur default range
    noise_std: float = 0.0  # Gaussian noise on the 0-1 pixel scale (torchvision's GaussianNoise): x 255 grey levels
    auto_augment: str = ""  # "imagenet" = AutoAugment's ImageNet policy, "trivial" = TrivialAugment-Wide (DALI's); not with rand_augment_layers
    ema_decay: float = 0.0  # 0 turns EMA off; 0.9998 is timm's ImageNet default
    ema_warmup: bool = False  # timm's EMA warmup: decay ramps up from 0 (helps short runs)
    # > 0: the EMA's decay follows the phase's length: it averages over about this fraction of the phase's
    # updates (decay = 1 - 1 / (ema_horizon x updates)), at most ema_decay. 0.999 averages over ~1000
    # updates, more than a small folder's phase has; 0 = ema_decay as given.
    ema_horizon: float = 0.0
    # The EMA is evaluated on val (and can be "best" or stop the phase) only once this fraction of the
    # phase's epochs has run, and always at its last epoch. Each evaluation is a full val pass, and an
    # EMA with a short horizon differs from the model's weights only late in the phase: on a small
    # folder with a val set larger than the train set, evaluation is most of the phase's time. 0 = every epoch.
    ema_eval_after: float = 0.0
    res_px: int = 224  # train crop size (at the start of a ramp)
    res_px_end: int = 0  # progressive resizing: the size at the end of the ramp; 0 = fixed res_px
    res_ramp_epochs: tuple[int, int] = (0, 0)  # ramp linearly between these epochs (ffcv-style)
    res_step_px: int = 32  # ramped sizes are rounded to a multiple of this
    eval_res_px: int = 224
    eval_crop_fraction: float = 0.875  # resize shorter side to eval_res_px / this, then centre-crop
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)  # random-resized-crop aspect range
    hflip_prob: float = 0.5
    precision: str = "auto"  # auto = bf16 on GPUs of compute capability >= 8.0, fp16 with a loss scaler on older ones, fp32 on CPU
    grad_accum_steps: int = 1
    clip_grad_norm: float = 0.0  # 0 turns clipping off
    max_nonfinite_steps: int = 5  # a NaN/inf loss skips its update; this many in a row stop the run (exit 3)
    checkpoint_every_steps: int = 0  # 0 = only at each epoch end
    keep_best_k: int = 1  # besides the newest checkpoint, keep the k best by val top-1 (model or EMA)

    def res_px_at(self, epoch: int) -> int:
        """Training resolution of `epoch`: a pure function, so resume and every rank agree."""
        if not self.res_px_end:
            return self.res_px
        start, end = self.res_ramp_epochs
        if epoch <= start:
            return self.res_px
        if epoch >= end:
            return self.res_px_end
        exact = self.res_px + (self.res_px_end - self.res_px) * (epoch - start) / (end - start)
        return int(round(exact / self.res_step_px)) * self.res_step_px

    def __post_init__(self) -> None:
        p = f"phase {_shown(self.name)}"
        _check_fields(self, f"{p}: ")
        _check(0 < self.subset <= 1, f"{p}: subset must be in (0, 1], got {self.subset}")
        # ASCII digits only: "mlp:²" passes str.isdigit() but not int()
        hidden = re.fullmatch(r"mlp:([0-9]{1,9})", self.head)
        _check(self.head in ("", "linear") or (hidden is not None and 1 <= int(hidden[1]) <= MAX_HEAD_HIDDEN), f'{p}: head must be "", "linear" or "mlp:<hidden units, 1-{MAX_HEAD_HIDDEN}>", got {_shown(self.head)}')
        _check(0 <= self.head_dropout < 1, f"{p}: head_dropout must be in [0, 1), got {self.head_dropout}")
        _check(self.freeze in ("", "backbone") or re.fullmatch(r"stages:[0-9]{1,9}", self.freeze) is not None, f'{p}: freeze must be "", "backbone" or "stages:<k>", got {_shown(self.freeze)}')
        _check(all(e >= 0 for e in self.unfreeze_at), f"{p}: unfreeze_at epochs must be >= 0")
        _check(self.backbone_lr_mult > 0, f"{p}: backbone_lr_mult must be positive, got {self.backbone_lr_mult}")
        _check(0 <= self.layer_decay < 1, f"{p}: layer_decay must be in [0, 1), got {self.layer_decay}")
        _check(not (self.layer_decay and self.backbone_lr_mult != 1.0), f"{p}: use layer_decay or backbone_lr_mult, not both")
        _check(self.schedule in SCHEDULES, f"{p}: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(self.early_stop_metric in EARLY_STOP_METRICS, f"{p}: early_stop_metric must be one of {EARLY_STOP_METRICS}")
        _check(self.early_stop_patience >= 0, f"{p}: early_stop_patience must be >= 0")
        _check(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, f"{p}: mixup_alpha and cutmix_alpha must be >= 0")
        _check(0 <= self.mixup_prob <= 1 and 0 <= self.mixup_switch_prob <= 1, f"{p}: mixup_prob and mixup_switch_prob must be in [0, 1]")
        _check(not (self.mixup_alpha or self.cutmix_alpha) or self.batch_size_per_device % 2 == 0, f"{p}: Mixup/CutMix need an even batch_size_per_device, got {self.batch_size_per_device}")
        _check(0 <= self.random_erasing <= 1, f"{p}: random_erasing must be in [0, 1], got {self.random_erasing}")
        _check(self.rand_augment_layers >= 0 and 0 <= self.rand_augment_magnitude <= 30, f"{p}: rand_augment_layers >= 0 and rand_augment_magnitude in 0..30")
        _check(self.color_jitter >= 0, f"{p}: color_jitter must be >= 0")
        _check(0 <= self.hue <= 0.5, f"{p}: hue must be in [0, 0.5] (a fraction of the hue circle, as torchvision's ColorJitter), got {self.hue}")
        _check(0 <= self.rotate_deg <= 180, f"{p}: rotate_deg must be in [0, 180] degrees (15 is the usual choice), got {self.rotate_deg}")
        _check(0 <= self.vflip_prob <= 1 and 0 <= self.blur_prob <= 1, f"{p}: vflip_prob and blur_prob must be in [0, 1], got {self.vflip_prob} and {self.blur_prob}")
        _check(0 < self.blur_sigma[0] <= self.blur_sigma[1] <= 20, f"{p}: blur_sigma must be (lo, hi) px with 0 < lo <= hi <= 20, got {self.blur_sigma}")
        _check(0 <= self.noise_std <= 1, f"{p}: noise_std must be in [0, 1] (of the 0-1 pixel range; 0.02-0.1 is typical), got {self.noise_std}")
        _check(self.auto_augment in AUTO_AUGMENT_POLICIES, f"{p}: auto_augment must be one of {AUTO_AUGMENT_POLICIES}, got {_shown(self.auto_augment)}")
        _check(not (self.auto_augment and self.rand_augment_layers), f"{p}: auto_augment and rand_augment_layers are two policies for one slot: set rand_augment_layers=0 or auto_augment=\"\"")
        _check(self.res_px_end == 0 or self.res_px_end >= 8, f"{p}: res_px_end must be 0 (off) or >= 8")
        _check(0 <= self.res_ramp_epochs[0] <= self.res_ramp_epochs[1], f"{p}: res_ramp_epochs must be (start, end) with 0 <= start <= end")
        _check(self.res_step_px >= 1, f"{p}: res_step_px must be >= 1, got {self.res_step_px}")
        # A step above the ramp's smaller size rounds its sizes down to 0 px.
        _check(not self.res_px_end or self.res_step_px <= min(self.res_px, self.res_px_end), f"{p}: res_step_px must be at most the smaller of res_px and res_px_end ({min(self.res_px, self.res_px_end)}), got {self.res_step_px}")
        _check(_is_folder_name(self.name), f"{p}: name must be a folder name (not empty, '.' or '..', no '/' or '\\')")
        _check(self.epochs >= 1, f"{p}: epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size_per_device >= 1, f"{p}: batch_size_per_device must be >= 1, got {self.batch_size_per_device}")
        _check(self.lr_per_256 > 0, f"{p}: lr_per_256 must be positive, got {self.lr_per_256}")
        _check(self.weight_decay >= 0, f"{p}: weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.momentum >= 0, f"{p}: momentum must be >= 0, got {self.momentum}")
        _check(self.decay_epochs > 0 and self.decay_rate > 0, f"{p}: decay_epochs and decay_rate must be positive, got {self.decay_epochs} and {self.decay_rate}")
        _check(self.plateau_patience_epochs >= 0, f"{p}: plateau_patience_epochs must be >= 0, got {self.plateau_patience_epochs}")
        _check(0 <= self.warmup_epochs < self.epochs, f"{p}: warmup_epochs must be >= 0 and below epochs ({self.epochs}), got {self.warmup_epochs}")
        _check(0 <= self.min_lr_ratio <= 1, f"{p}: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _check(0 <= self.label_smoothing < 1, f"{p}: label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(0 <= self.ema_decay < 1, f"{p}: ema_decay must be in [0, 1), got {self.ema_decay}")
        _check(0 <= self.ema_horizon <= 1, f"{p}: ema_horizon must be in [0, 1] (a fraction of the phase's updates), got {self.ema_horizon}")
        _check(0 <= self.ema_eval_after <= 1, f"{p}: ema_eval_after must be in [0, 1] (a fraction of the phase's epochs), got {self.ema_eval_after}")
        _check(not self.ema_eval_after or self.ema_decay > 0, f"{p}: ema_eval_after needs the EMA on: set ema_decay")
        _check(not self.early_stop_patience or self.ema_eval_after <= self.early_stop_after,
               f"{p}: early stopping may end the phase before the EMA is evaluated: set ema_eval_after "
               f"({self.ema_eval_after}) <= early_stop_after ({self.early_stop_after})")
        _check(not self.ema_horizon or self.ema_decay > 0, f"{p}: ema_horizon needs the EMA on: set ema_decay (its upper bound, e.g. 0.9998)")
        _check(0 <= self.early_stop_after <= 1, f"{p}: early_stop_after must be in [0, 1] (a fraction of the phase's epochs), got {self.early_stop_after}")
        _check(self.res_px >= 8 and self.eval_res_px >= 8, f"{p}: res_px and eval_res_px must be >= 8, got {self.res_px} and {self.eval_res_px}")
        _check(max(self.res_px, self.res_px_end, self.eval_res_px) <= MAX_RES_PX, f"{p}: res_px, res_px_end and eval_res_px must be <= {MAX_RES_PX}, got {self.res_px}, {self.res_px_end} and {self.eval_res_px}")
        _check(0 < self.eval_crop_fraction <= 1, f"{p}: eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction}")
        _check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, f"{p}: crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        _check(0 < self.crop_ratio[0] <= self.crop_ratio[1], f"{p}: crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")
        _check(0 <= self.hflip_prob <= 1, f"{p}: hflip_prob must be in [0, 1], got {self.hflip_prob}")
        _check(self.precision in PRECISIONS, f"{p}: precision must be one of {PRECISIONS}, got {self.precision!r}")
        _check(self.grad_accum_steps >= 1, f"{p}: grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        _check(self.clip_grad_norm >= 0, f"{p}: clip_grad_norm must be >= 0, got {self.clip_grad_norm}")
        _check(self.max_nonfinite_steps >= 1, f"{p}: max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        _check(self.checkpoint_every_steps >= 0, f"{p}: checkpoint_every_steps must be >= 0")
        _check(self.keep_best_k >= 0, f"{p}: keep_best_k must be >= 0, got {self.keep_best_k}")


@dataclass(frozen=True)
class Logging:
    project: str = "imgcls"  # W&B project
    run_name: str = ""  # W&B run name and run folder name; default <recipe name>-<timestamp>
    wandb: bool = True  # offline automatically when no W&B credentials are found
    log_every_steps: int = 10  # per-step loss/LR to W&B and steps.jsonl
    progress_bar: bool = True

    def __post_init__(self) -> None:
        _check_fields(self, "logging.")
        _check(not self.run_name or _is_folder_name(self.run_name), f"logging.run_name must be a folder name (no '/' or '\\', not '.' or '..'), got {_shown(self.run_name)}")
        _check(self.log_every_steps >= 1, f"logging.log_every_steps must be >= 1, got {self.log_every_steps}")


@dataclass(frozen=True)
class Push:
    """Push the run to a Hugging Face Space when training ends, in the background (never blocks or fails training)."""

    space: str = ""  # USER/NAME of the Space; "" = do not push
    model_repo: str = ""  # USER/NAME of a model repo for the bundle; "" = the Space carries the bundle
    private: bool = False

    def __post_init__(self) -> None:
        _check_fields(self, "push.")
        for name in ("space", "model_repo"):
            value = getattr(self, name)
            _check(not value or re.fullmatch(r"[^/\s]+/[^/\s]+", value) is not None, f"push.{name} must be USER/NAME, got {_shown(value)}")


@dataclass(frozen=True)
class Recipe:
    name: str
    phases: tuple[Phase, ...]
    model: Model = field(default_factory=Model)
    data: Data = field(default_factory=Data)
    seed: int = 0
    logging: Logging = field(default_factory=Logging)
    runs_root: str = "runs"  # run folders go to <runs_root>/<run_name>
    push: Push = field(default_factory=Push)

    def __post_init__(self) -> None:
        _check_fields(self, "")
        _check(_is_folder_name(self.name), f"recipe name must be a folder name (not empty, '.' or '..', no '/' or '\\'), got {_shown(self.name)}")
        _check(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _check(len(self.phases) >= 1, "a recipe needs at least one phase")
        names = [p.name for p in self.phases]
        _check(len(set(names)) == len(names), f"phase names must be unique, got {names}")
        for index, phase in enumerate(self.phases):
            if phase.init.startswith("phase:"):
                source = phase.init[len("phase:"):]
                _check(source in names[:index], f"phase {phase.name!r}: init {phase.init!r} must name an earlier phase, one of {names[:index]}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise RecipeError(f"{where}: unknown keys {unknown}; valid keys: {', '.join(valid)}")
    values = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            value = _from_dict(typ, value, f"{where}.{name}")
        elif typing.get_origin(typ) is tuple:
            args = typing.get_args(typ)
            if args and dataclasses.is_dataclass(args[0]):  # phases
                value = tuple(_from_dict(args[0], item, f"{where}.{name}.{i}") for i, item in enumerate(value))
            else:  # JSON lists back to tuples: (0.08, 1.0), unfreeze_at
                value = tuple(value)
        values[name] = value
    return cls(**values)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """The inverse of `Recipe.to_dict()` (e.g. a run's recipe.json): tuples come back from JSON lists,
    validation runs again, and keys this version does not know are an error."""
    return _from_dict(Recipe, data, "recipe")


# -- overrides -------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_scalar(text: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(typ) if a is not type(None)]
        if text.strip().lower() in ("none", "null"):
            return None
        return _parse_scalar(text, options[0], key)
    if origin is tuple:
        args = typing.get_args(typ)
        parts = [s.strip() for s in text.strip().strip("()[]").split(",") if s.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_scalar(s, args[0], key) for s in parts)
        if len(parts) != len(args):
            raise RecipeError(f"{key} takes {len(args)} comma-separated values, got {_shown(text)}")
        return tuple(_parse_scalar(s, a, key) for s, a in zip(parts, args))
    text = text.strip()
    if typ is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise RecipeError(f"{key} takes true or false, got {_shown(text)}")
    if typ is int:
        # ASCII digits only (int() also takes "1_000" and other scripts' digits); the size limit is
        # checked by the field's validation, which names the range.
        if re.fullmatch(r"[+-]?[0-9]{1,4000}", text) is None:
            raise RecipeError(f"{key} takes an integer, got {_shown(text)}")
        return int(text)
    if typ is float:
        try:
            value = float(text)
        except ValueError:
            raise RecipeError(f"{key} takes a number, got {_shown(text)}") from None
        if not math.isfinite(value):  # "nan" would slip past every `x > 0` rule: comparisons with NaN are False
            raise RecipeError(f"{key} takes a finite number, got {_shown(text)}")
        return value
    if typ is str:
        return text
    raise RecipeError(f"{key} cannot be set from the command line")


def _suggest(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; valid keys: {', '.join(valid)}"


def _collect(node: Any, path: list[str], text: str, full_key: str, changes: dict) -> None:
    """Check one override against the recipe's fields and parse its value into `changes` (a tree)."""
    head, rest = path[0], path[1:]
    if isinstance(node, tuple) and node and all(dataclasses.is_dataclass(item) for item in node):  # phases: by index or by name
        names = [getattr(p, "name", None) for p in node]
        if re.fullmatch(r"-?[0-9]{1,9}", head) and -len(node) <= int(head) < len(node):
            index = int(head) % len(node)
        elif head in names:
            index = names.index(head)
        else:
            raise RecipeError(
                f"unknown phase {_shown(head)} in {_shown(full_key)}; phases are indexes 0..{len(node) - 1} or names {names}"
            )
        if not rest:
            raise RecipeError(f"{full_key!r} names a whole phase; set one of its fields, e.g. {full_key}.epochs=2")
        _collect(node[index], rest, text, full_key, changes.setdefault(index, {}))
        return
    if not dataclasses.is_dataclass(node):
        raise RecipeError(f"{_shown(full_key)} goes below a plain value")
    valid = [f.name for f in dataclasses.fields(node)]
    if head not in valid:
        where = full_key[: len(full_key) - len(".".join(path))].rstrip(".") or "the recipe"
        raise RecipeError(f"unknown key {_shown(head)} in {_shown(full_key)} under {where}{_suggest(head, valid)}")
    current = getattr(node, head)
    if rest:
        _collect(current, rest, text, full_key, changes.setdefault(head, {}))
        return
    if dataclasses.is_dataclass(current) or (isinstance(current, tuple) and current and dataclasses.is_dataclass(current[0])):
        sub = [f.name for f in dataclasses.fields(current if dataclasses.is_dataclass(current) else current[0])]
        raise RecipeError(f"{full_key!r} is a section; set one of its keys: {', '.join(sub)}")
    changes[head] = _parse_scalar(text, _field_types(type(node))[head], full_key)


def _apply(node: Any, changes: dict) -> Any:
    """Rebuild `node` with all its changes at once, so validation sees the final combination
    (`epochs=1` together with `warmup_epochs=0` is fine even if `epochs=1` alone is not)."""
    if isinstance(node, tuple):
        return tuple(_apply(item, changes[i]) if i in changes else item for i, item in enumerate(node))
    updates = {
        name: _apply(getattr(node, name), value) if isinstance(value, dict) else value
        for name, value in changes.items()
    }
    return dataclasses.replace(node, **updates)


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply `key=value` strings (`phases.0.epochs=2`, `phases.main.lr_per_256=0.5`, `model.arch=resnet18`)."""
    changes: dict = {}
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not key=value, e.g. --set phases.0.epochs=2")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key:
            raise RecipeError(f"override {item!r} has no key")
        _collect(recipe, key.split("."), text, key, changes)
    return _apply(recipe, changes)  # every field checks itself: a wrong value is a RecipeError naming it


def resolve_recipe(recipe: Recipe, sets: list[str], data: str | None = None) -> Recipe:
    """The recipe as a command line asks for it: its `--set KEY=VALUE` overrides and `--data PATH`."""
    return apply_overrides(recipe, [*sets, *([f"data.path={data}"] if data else [])])
