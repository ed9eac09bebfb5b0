"""DALI pipelines for training and evaluation, and the iterators that hand their batches to torch.

One pipeline per loader, fed by a batch-mode `fn.external_source` callable. The callable maps DALI's
iteration counter to (epoch, batch) and from there, through `loaders.order`, to sample indices,
augmentation draws and the epoch's resolution. All randomness is drawn in numpy from
(seed, epoch, sample index) and passed into the graph, so DALI holds no state worth saving: resume
rebuilds the pipeline at (epoch, batch) and produces the same pixels as a run that never stopped.
The train callable runs on the training thread, so it only slices arrays computed once per epoch
(crop windows from the sizes the check before training read) and DALI reads the files itself.
Both loaders are `loaders.recovery.DecodingStream`s: a file that fails only in the decoder is found,
replaced by a stand-in, and the pipeline restarts at the same batch.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations, auto_augment, rand_augment, trivial_augment
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin
from nvidia.dali.pipeline import Pipeline, pipeline_def
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from loaders import AUTO_AUGMENT_POLICIES, IMAGENET_MEAN, IMAGENET_STD, order
from loaders.headers import BadFile
from loaders.recovery import DecodingStream, SampleGuard
from loaders.screening import header_sizes, source_headers
from loaders.sources import DataError, ImageFolderSource

_log = logging.getLogger(__name__)

_LABEL_COLUMN = 0  # of the feed's float rows; column 1 is the path's length
_MAX_EXACT_FLOAT32 = 2**24  # labels and path lengths travel as float32: exact below this
# Uniform draws per sample: crop area, crop log-aspect, crop x, crop y, flip.
_DRAWS = 5
# Each optional augmentation draws from its own `order.augment_uniforms` stream, appended as extra
# columns after the five above: turning one on changes neither the crops nor the other's draws.
_JITTER_STREAM = 1  # brightness, contrast, saturation
_JITTER_DRAWS = 3
_RAND_AUGMENT_STREAM = 2  # per layer: which op, and the sign of its magnitude
_CROP_STREAM = 3  # crop attempts 2.._CROP_ATTEMPTS: area and log-aspect each (attempt 1 is in stream 0)
_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 times before its centre-crop fallback
_RAND_AUGMENT_BINS = 31  # magnitudes 0..30, torchvision's and DALI's RandAugment convention
# Weights of torchvision's rgb_to_grayscale (ITU-R 601-2 luma), the centre of its contrast change.
_GRAY = (0.299, 0.587, 0.114)
# Streams of the augmentations added after the four above, each on its own (see `_optional_draws`).
_HUE_STREAM = 4  # the hue shift
_ROTATE_STREAM = 5  # the angle
_VFLIP_STREAM = 6  # whether to flip
_BLUR_STREAM = 7  # whether to blur, and sigma
_NOISE_STREAM = 8  # where the sample's noise starts in the noise tables: row, column, value
_NOISE_DRAWS = 3
_AUTO_AUGMENT_STREAM = 9  # "imagenet": sub-policy, then per stage whether it runs and its sign; "trivial": op, magnitude, sign
_AUTO_AUGMENT_DRAWS = {"imagenet": 5, "trivial": 3}
_TRIVIAL_BINS = 31  # TrivialAugment-Wide's magnitude bins (torchvision's and DALI's)
# Translations as a fraction of the side, so their strength does not depend on the resolution: AutoAugment's
# ImageNet policy shifts up to 150/331 of the side as torchvision does; TrivialAugment-Wide up to 32 px of 224.
_IMAGENET_POLICY_TRANSLATE = 150 / 331
_TRIVIAL_TRANSLATE = 32 / 224
_FILL_GREY = 128  # what geometric ops fill with (the RandAugment ops' fill, timm's grey)
# Gaussian noise comes from fixed tables (DALI's random operators cannot be replayed on resume): the noise of
# pixel (y, x, c) is _NOISE_VALUES[(rows[y + y0] + cols[x + x0] + channel[c] + shift) mod 2^16], with y0, x0 and
# shift drawn per sample. 2^16 values is what fn.lookup_table holds; the row and column tables are twice
# the largest side (8192 px) long, so any offset below 8192 leaves room for any image.
_NOISE_VALUES = 1 << 16
_NOISE_MAX_SIDE_PX = 8192
_MAX_BLUR_SIGMA = 20.0  # px; a window of 2 * ceil(3 * sigma) + 1 = 121 px at most


def resolve_decode_device(device: str) -> str:
    """"auto" → "mixed" (nvJPEG on the GPU) when CUDA is available, else "cpu". Same graph either way."""
    if device == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "mixed"):
        raise ValueError(f'decode device must be "auto", "cpu" or "mixed", got {device!r}')
    if device == "mixed" and not torch.cuda.is_available():
        raise ValueError('decode device "mixed" needs a CUDA GPU; use "auto" or "cpu" on this machine')
    return device


def dali_device_id(device: torch.device) -> int | None:
    """DALI's device_id for the torch device a process trains on (None on the CPU). One process under
    accelerate gets the device "cuda" without an index (seen on an H200): that is the current device."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


DECODE_MODES = ("auto", "roi", "full")  # data.decode_mode

# nvJPEG settings for the "mixed" decoder, as NVIDIA's ResNet-50 DALI pipelines set them: buffers sized
# up front for the largest ImageNet image, so a bigger image met mid-epoch does not reallocate (a stall
# and device-memory churn on the training GPU). They mean nothing to the CPU decoder, so they are passed
# only with "mixed".
_DEVICE_MEMORY_PADDING = 211_025_920  # bytes of nvJPEG device buffers
_HOST_MEMORY_PADDING = 140_544_512  # bytes of nvJPEG pinned host buffers
_PREALLOCATE_WIDTH_HINT = 5_980  # px: the hardware JPEG decoder's (A100/H100) buffers for the widest image
_PREALLOCATE_HEIGHT_HINT = 6_430  # px: ... and the tallest
_HW_DECODER_LOAD = 0.65  # share of each batch sent to the hardware JPEG decoder; the rest goes to CUDA
# Samples in the trial decode that `preflight_decode` runs in a child process, and how long it may take
# (DALI's start-up and nvJPEG's first allocations take most of it).
_TRIAL_SAMPLES = 32
_TRIAL_TIMEOUT_S = 300


def decoder_args(decode_device: str) -> dict:
    """The image decoder's keyword arguments for `decode_device`: nvJPEG's buffer settings on "mixed" only."""
    args = dict(device=decode_device, output_type=types.RGB, adjust_orientation=False)
    if decode_device == "mixed":
        args.update(
            device_memory_padding=_DEVICE_MEMORY_PADDING,
            host_memory_padding=_HOST_MEMORY_PADDING,
            preallocate_width_hint=_PREALLOCATE_WIDTH_HINT,
            preallocate_height_hint=_PREALLOCATE_HEIGHT_HINT,
            hw_decoder_load=_HW_DECODER_LOAD,
        )
    return args


# The trial decode run by `preflight_decode`, as `python -c`: only numpy and DALI, one batch, "roi" or "full".
_TRIAL_CODE = """
import json, sys
import numpy as np
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
trial = np.load(sys.argv[1])
args = json.loads(sys.argv[2])
mode, device_id, fault = args.pop("mode"), args.pop("device_id"), args.pop("fault")
if mode == "roi" and fault == "crash":
    import os; os.abort()
if mode == "roi" and fault == "error":
    raise RuntimeError("a fault asked for by the caller")
args["output_type"] = types.RGB
samples = np.split(trial["data"], trial["ends"][:-1])
pipe = Pipeline(batch_size=len(samples), num_threads=1, device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True)
with pipe:
    encoded = fn.external_source(name="encoded", dtype=types.UINT8)
    if mode == "roi":
        window = fn.external_source(name="window", dtype=types.FLOAT)
        images = fn.decoders.image_slice(encoded, window[0:2], window[2:4], normalized_anchor=False, normalized_shape=False, **args)
    else:
        images = fn.decoders.image(encoded, **args)
    pipe.set_outputs(images)
pipe.build()
pipe.feed_input("encoded", samples)
if mode == "roi":
    pipe.feed_input("window", trial["windows"])
pipe.run()
"""


def _trial_batch(source, sizes: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Up to _TRIAL_SAMPLES readable samples of `source` and their random-resized-crop windows."""
    draws = augment_draws(len(source), seed=0, epoch=0, aug=TrainAugment())
    chosen, encoded = [], []
    for index in range(len(source)):
        if len(chosen) == _TRIAL_SAMPLES:
            break
        if sizes[index].min() <= 0:
            continue
        try:
            encoded.append(source.read(index))
        except (OSError, DataError):
            continue
        chosen.append(index)
    chosen = np.asarray(chosen, dtype=np.int64)
    return encoded, crop_windows(draws[chosen], sizes[chosen, 0], sizes[chosen, 1], TrainAugment())


def _run_trial(path: str, mode: str, decode_device: str, device_id: int | None, timeout_s: float, fault: str) -> str:
    """Decode the batch saved at `path` in a child process; "" when it passed, else what went wrong."""
    args = {k: v for k, v in decoder_args(decode_device).items() if k != "output_type"}
    args.update(mode=mode, device_id=device_id if decode_device == "mixed" else None, fault=fault)
    try:
        done = subprocess.run(
            [sys.executable, "-c", _TRIAL_CODE, path, json.dumps(args)], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return f"took over {timeout_s:g} s"
    if done.returncode == 0:
        return ""
    if done.returncode < 0:
        try:
            return f"crashed: {signal.Signals(-done.returncode).name}"
        except ValueError:
            return f"crashed: signal {-done.returncode}"
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    return f"failed, exit {done.returncode}: {lines[-1][:200] if lines else 'no message'}"


def preflight_decode(
    source,
    decode_device: str,
    device_id: int | None = None,
    *,
    sizes: np.ndarray | None = None,
    trial: bool | None = None,
    timeout_s: float = _TRIAL_TIMEOUT_S,
    fault: str = "",
) -> tuple[str, str]:
    """data.decode_mode "auto" decided: (mode, one line saying why). ROI decoding ("roi") unless a trial
    ROI decode of one batch of `source` on `decode_device` crashes, fails or hangs while a whole-image
    decode of the same batch does not: then "full". (When both fail the batch's files are at fault, not
    ROI decoding; the loader replaces such files, so it stays "roi".)

    The trials run in child processes (`python -c`) because a decoder fault can kill the process that
    meets it (a signal, not an exception). On the CPU they are skipped unless `trial=True`: libjpeg's
    ROI decoding is the path every CPU test runs. `sizes` are the samples' (height, width), read from
    their headers when not given. `fault` is for tests: "crash" makes the ROI trial's child abort (a
    signal, as a decoder fault would), "error" makes it raise.
    """
    decode_device = resolve_decode_device(decode_device)
    if trial is None:
        trial = decode_device == "mixed"
    if not trial:
        return "roi", f'decode_mode auto: "roi" (ROI decoding on the {decode_device} decoder, no trial needed)'
    sizes = header_sizes(source_headers(source)) if sizes is None else sizes
    encoded, windows = _trial_batch(source, sizes)
    if not encoded:
        return "roi", 'decode_mode auto: "roi" (no readable sample to try it on)'
    with tempfile.TemporaryDirectory(prefix="decode-trial-") as folder:
        path = os.path.join(folder, "trial.npz")
        np.savez(path, data=np.concatenate(encoded), ends=np.cumsum([len(e) for e in encoded]), windows=windows)
        roi = _run_trial(path, "roi", decode_device, device_id, timeout_s, fault)
        if not roi:
            return "roi", f'decode_mode auto: "roi" (a trial ROI decode of {len(encoded)} images on {decode_device} passed)'
        full = _run_trial(path, "full", decode_device, device_id, timeout_s, fault)
    if full:
        return "roi", (f'decode_mode auto: "roi" (a trial batch on {decode_device} fails whole-image decoding too ({full}): '
                       "its files, not ROI decoding; the loader replaces such files)")
    return "full", f'decode_mode auto: "full" (a trial ROI decode of one batch on {decode_device} {roi}; whole images decode)'


def resolve_decode_mode(mode: str, source, decode_device: str, device_id: int | None = None, sizes: np.ndarray | None = None) -> str:
    """"roi" or "full" as given; "auto" decided by `preflight_decode` (a run decides once, in trainer.launch)."""
    if mode not in DECODE_MODES:
        raise ValueError(f"decode mode must be one of {DECODE_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    mode, why = preflight_decode(source, decode_device, device_id, sizes=sizes)
    _log.info("%s", why)
    return mode


@dataclass(frozen=True)
class TrainAugment:
    """Random-resized-crop, flip, optional RandAugment and colour jitter, and normalisation for training.

    Defaults are timm/torchvision's; RandAugment and colour jitter are off unless asked for. In timm's
    order: crop, flip, RandAugment (`rand_augment_layers` ops per image from `rand_augment_ops()`, at
    `rand_augment_magnitude` of 0..30 as in torchvision, each op's sign drawn; nearest-neighbour warps
    filled with grey 128), then colour jitter (brightness, contrast and saturation each times a factor
    uniform in [max(0, 1 - s), 1 + s]: torchvision's ColorJitter(s, s, s) in that fixed order).

    The later ones, each off by default, in the graph's order: after the crop, a vertical flip with
    `vflip_prob`; a rotation by an angle uniform in ±`rotate_deg` degrees (counter-clockwise for a
    positive angle, nearest-neighbour as torchvision's RandomRotation, same size, corners filled with
    grey 128); `auto_augment` in RandAugment's place (DALI's AutoAugment "imagenet" policy or
    TrivialAugment-Wide "trivial", their op choices, chances and signs drawn here; one of the two
    policies at a time); a hue shift uniform in ±`hue` of the hue
    circle after the colour jitter (torchvision's ColorJitter hue convention, 0 to 0.5, and its HSV
    formula); a Gaussian blur with chance `blur_prob`, sigma uniform in `blur_sigma` px, window
    2 * ceil(3 sigma) + 1; Gaussian noise of standard deviation `noise_std` on the 0-1 pixel scale
    (torchvision's GaussianNoise convention: 255 * noise_std grey levels), clipped to the pixel range.
    All of it is driven by `augment_draws`, so it replays exactly on resume.
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    color_jitter: float = 0.0
    rand_augment_layers: int = 0
    rand_augment_magnitude: int = 9
    hue: float = 0.0
    rotate_deg: float = 0.0
    vflip_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_std: float = 0.0
    auto_augment: str = ""

    def __post_init__(self) -> None:
        if self.color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {self.color_jitter}")
        if self.rand_augment_layers < 0:
            raise ValueError(f"rand_augment_layers must be >= 0, got {self.rand_augment_layers}")
        if not 0 <= self.rand_augment_magnitude < _RAND_AUGMENT_BINS:
            raise ValueError(f"rand_augment_magnitude must be in 0..{_RAND_AUGMENT_BINS - 1}, got {self.rand_augment_magnitude}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5] (a fraction of the hue circle, as torchvision's ColorJitter), got {self.hue}")
        if not 0 <= self.rotate_deg <= 180:
            raise ValueError(f"rotate_deg must be in [0, 180] degrees, got {self.rotate_deg}")
        for name in ("vflip_prob", "blur_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.blur_sigma
        if not 0 < lo <= hi <= _MAX_BLUR_SIGMA:
            raise ValueError(f"blur_sigma must be (lo, hi) px with 0 < lo <= hi <= {_MAX_BLUR_SIGMA:g}, got {self.blur_sigma}")
        if not 0 <= self.noise_std <= 1:
            raise ValueError(f"noise_std must be in [0, 1] (of the 0-1 pixel range, as torchvision's GaussianNoise), got {self.noise_std}")
        if self.auto_augment not in AUTO_AUGMENT_POLICIES:
            raise ValueError(f"auto_augment must be one of {AUTO_AUGMENT_POLICIES}, got {self.auto_augment!r}")
        if self.auto_augment and self.rand_augment_layers > 0:
            raise ValueError("auto_augment and rand_augment_layers are two policies for one slot: set one of them")


def _optional_draws(aug: TrainAugment) -> list[tuple[str, int, int]]:
    """(name, draws per sample, stream) of each optional augmentation switched on, in the order of their
    columns after the first _DRAWS. One switched off has no columns, so the rows of a run without the
    later ones are what they were before those existed."""
    wanted = [
        ("jitter", _JITTER_DRAWS, _JITTER_STREAM, aug.color_jitter > 0),
        ("rand_augment", 2 * aug.rand_augment_layers, _RAND_AUGMENT_STREAM, aug.rand_augment_layers > 0),
        ("hue", 1, _HUE_STREAM, aug.hue > 0),
        ("rotate", 1, _ROTATE_STREAM, aug.rotate_deg > 0),
        ("vflip", 1, _VFLIP_STREAM, aug.vflip_prob > 0),
        ("blur", 2, _BLUR_STREAM, aug.blur_prob > 0),
        ("noise", _NOISE_DRAWS, _NOISE_STREAM, aug.noise_std > 0),
        ("auto_augment", _AUTO_AUGMENT_DRAWS.get(aug.auto_augment, 0), _AUTO_AUGMENT_STREAM, bool(aug.auto_augment)),
    ]
    return [(name, count, stream) for name, count, stream, on in wanted if on]


def draw_columns(aug: TrainAugment) -> dict[str, int]:
    """The first column of each optional augmentation's draws in a row of `augment_draws`."""
    columns, first = {}, _DRAWS
    for name, count, _ in _optional_draws(aug):
        columns[name], first = first, first + count
    return columns


def augment_draws(num_samples: int, *, seed: int, epoch: int, aug: TrainAugment) -> np.ndarray:
    """Every sample's uniforms for `epoch` as the train graph reads them: crop and flip, then each optional
    augmentation switched on (`draw_columns`), then the crop's further tries."""
    return np.concatenate(augment_draw_tables(num_samples, seed=seed, epoch=epoch, aug=aug), axis=1)


def augment_draw_tables(num_samples: int, *, seed: int, epoch: int, aug: TrainAugment) -> list[np.ndarray]:
    """`augment_draws`'s column groups, one table each, not joined: the train feed gathers a block's rows
    from each (joining and reordering the whole epoch's tables was 0.25 s of ImageNet's first batch)."""
    tables = [order.augment_uniforms(num_samples, seed=seed, epoch=epoch, count=_DRAWS)]
    for _, count, stream in _optional_draws(aug):
        tables.append(order.augment_uniforms(num_samples, seed=seed, epoch=epoch, count=count, stream=stream))
    # Last, so the columns above keep their places whatever is switched on.
    tables.append(order.augment_uniforms(num_samples, seed=seed, epoch=epoch, count=2 * (_CROP_ATTEMPTS - 1), stream=_CROP_STREAM))
    return tables


def crop_windows(draws: np.ndarray, height: np.ndarray, width: np.ndarray, aug: TrainAugment) -> np.ndarray:
    """torchvision's RandomResizedCrop windows (x0, y0, w, h) for a batch, from each sample's uniforms
    and its stored image size: up to _CROP_ATTEMPTS (area, aspect) tries, the first that fits wins;
    if none fits, the largest centred crop whose aspect lies in `crop_ratio`. Computed here rather than
    in the graph: a few vectorised numpy lines cost less than the DALI arithmetic nodes they replace."""
    extra = draws.shape[1] - 2 * (_CROP_ATTEMPTS - 1)  # the extra tries are the last columns
    area_u = np.concatenate([draws[:, :1], draws[:, extra::2]], axis=1)
    ratio_u = np.concatenate([draws[:, 1:2], draws[:, extra + 1 :: 2]], axis=1)
    h, w = height[:, None].astype(np.float64), width[:, None].astype(np.float64)
    lo, hi = aug.crop_scale
    area = h * w * (lo + area_u * (hi - lo))
    log_lo, log_hi = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
    ratio = np.exp(log_lo + ratio_u * (log_hi - log_lo))
    try_w, try_h = np.sqrt(area * ratio), np.sqrt(area / ratio)
    fits = (try_w <= w) & (try_h <= h)
    first = fits.argmax(axis=1)
    rows = np.arange(len(draws))
    found = fits[rows, first]
    # The fallback: the whole image, cut down to the nearest allowed aspect, centred.
    crop_w = np.where(found, try_w[rows, first], np.minimum(w[:, 0], h[:, 0] * aug.crop_ratio[1]))
    crop_h = np.where(found, try_h[rows, first], np.minimum(h[:, 0], w[:, 0] / aug.crop_ratio[0]))
    frac_x = np.where(found, draws[:, 2], 0.5)
    frac_y = np.where(found, draws[:, 3], 0.5)
    x0, y0 = frac_x * (w[:, 0] - crop_w), frac_y * (h[:, 0] - crop_h)
    return np.stack([x0, y0, crop_w, crop_h], axis=1).astype(np.float32)


def jitter_factors(draws, strength: float):
    """Brightness, contrast and saturation factors from a sample's three jitter uniforms (numpy or DALI nodes)."""
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return tuple(lo + u * (hi - lo) for u in draws)


def _normalize_args(mean, std) -> dict:
    return dict(mean=[255.0 * m for m in mean], std=[255.0 * s for s in std], dtype=types.FLOAT)


# DALI 2.4's suite still calls fn.experimental.filter / fn.experimental.equalize, deprecated aliases that
# warn on every graph build (DALI forces that warning on, past any filter); the same ops under their names.
@augmentation(mag_range=(0, 0.9), randomly_negate=True, mag_to_param=augmentations.sharpness_kernel, param_device="auto", name="sharpness")
def _sharpness(data, kernel):
    return fn.filter(data, kernel)


@augmentation(name="equalize")
def _equalize(data, _):
    return fn.equalize(data)


def rand_augment_ops() -> list:
    """The RandAugment op list, in the order our draws index it: DALI's default (monotonic) suite.

    translate_x, translate_y, shear_x, shear_y, rotate, brightness, contrast, color, sharpness,
    posterize, solarize, equalize, auto_contrast, identity; translations are a fraction (up to
    100/224) of the image side, so their strength does not depend on the resolution.
    """
    replace = {"sharpness": _sharpness, "equalize": _equalize}
    return [replace.get(op.name, op) for op in rand_augment.get_rand_augment_suite(use_shape=True)]


def _mean_grey(images):
    """Each image's mean luma, shape (1, 1, 1), on the images' device: the centre of torchvision's contrast."""
    rgb_mean = fn.reductions.mean(images, axis_names="HW", keep_dims=True)
    return fn.reductions.sum(rgb_mean * types.Constant(np.array(_GRAY, np.float32)), axis_names="C", keep_dims=True)


def _brightness_contrast(images, brightness, contrast, *, centre_as_argument: bool | None = None):
    """b * (m + c * (x - m)) on uint8 with m the image's mean grey: torchvision's brightness, then contrast.

    Contrast around m after brightness b is contrast around b * m of the brightened image, so the two are
    one affine map (fn.contrast's own centre is a fixed mid-grey, not torchvision's). Per-sample argument
    inputs must be CPU nodes: on the CPU the centre is one (one fast uint8 op); on the GPU it is computed
    where the pixels are, so arithmetic applies it there. `centre_as_argument` forces a path (for tests).
    """
    grey = _mean_grey(images)
    if centre_as_argument is None:
        centre_as_argument = images.device != "gpu"
    if centre_as_argument:
        return fn.brightness_contrast(
            images, brightness=brightness, contrast=contrast, contrast_center=fn.reshape(grey, shape=[])
        )
    if images.device == "gpu":
        brightness, contrast = brightness.gpu(), contrast.gpu()
    # The cast back to uint8 rounds and saturates, as the uint8 op above does.
    return fn.cast_like((grey + (images - grey) * contrast) * brightness, images)


def _color_jitter(images, draws, strength: float):
    """torchvision's ColorJitter(s, s, s) on uint8 HWC images (brightness, contrast, then saturation); float out."""
    brightness, contrast, saturation = jitter_factors([draws[_DRAWS + k] for k in range(_JITTER_DRAWS)], strength)
    images = _brightness_contrast(images, brightness, contrast)
    # DALI scales chroma in YIQ and keeps Y, the same luma as torchvision's greyscale: its blend with grey.
    # Float out, clamped once here: DALI's float-to-uint8 rounding on the CPU costs twice the op itself,
    # and crop_mirror_normalize takes float as readily.
    images = fn.saturation(images, saturation=saturation, dtype=types.FLOAT)
    return dmath.clamp(images, 0.0, 255.0)


def _rand_augment(images, draws, first: int, *, layers: int, magnitude: int, size):
    """RandAugment from DALI's own op suite, with each layer's op and magnitude sign taken from our draws.

    `nvidia.dali.auto_aug.rand_augment` draws both with `fn.random.*`, DALI's RNG, which a resumed
    pipeline cannot replay; its building blocks (the suite, `select`, `signed_bin`) take them as inputs.
    """
    suite = rand_augment_ops()
    for layer in range(layers):
        pick, sign = draws[first + 2 * layer], draws[first + 2 * layer + 1]
        # floor(u * n) in 0..n-1 (min guards a float32 product that rounds up to n).
        op = fn.cast(dmath.min(dmath.floor(pick * len(suite)), len(suite) - 1), dtype=types.INT32)
        images = select(
            suite,
            op,
            data=images,
            magnitude_bin=signed_bin(magnitude, random_sign=fn.cast(sign < 0.5, dtype=types.INT32)),
            num_magnitude_bins=_RAND_AUGMENT_BINS,
            shape=size,  # (H, W) after the resize: what translate_x/y scale by
            fill_value=128,
            # torchvision's RandAugment default; linear costs ~3x as much per geometric op on the CPU.
            interp_type=types.INTERP_NN,
        )
    return images


def _on_device_of(images, node):
    """`node` (a per-sample CPU value) where `images` are: arithmetic with GPU pixels needs GPU operands."""
    return node.gpu() if images.device == "gpu" else node


def _rotate(images, angle_draw, max_deg: float):
    """torchvision's rotate by an angle uniform in ±max_deg degrees (same size, grey corners), nearest-neighbour
    as torchvision's RandomRotation and our RandAugment: DALI's bilinear warp costs about 8x as much on the CPU."""
    angle = (angle_draw * 2.0 - 1.0) * max_deg
    return fn.rotate(images, angle=angle, keep_size=True, fill_value=_FILL_GREY, interp_type=types.INTERP_NN)


def _adjust_hue(images, shift):
    """torchvision's adjust_hue as DALI arithmetic: in HSV, the hue turned by `shift` (a fraction of the
    circle), saturation and value kept. Float out on the 0-255 scale.

    DALI's fn.hue turns the chroma plane of YIQ instead, which keeps luma rather than value and leaves
    the gamut: tens of grey levels from torchvision's on saturated colours. Written with the compact
    HSV-to-RGB formula: channel n in (5, 3, 1) is v - (v - m) * clamp(min(k, 4 - k), 0, 1) with
    k = (n + 6 h) mod 6, where v and m are the pixel's largest and smallest channel.
    """
    shift = _on_device_of(images, shift)
    r, g, b = (images[:, :, c] for c in range(3))
    v = dmath.max(dmath.max(r, g), b)
    m = dmath.min(dmath.min(r, g), b)
    chroma = v - m
    safe = dmath.max(chroma, 1e-6)  # grey pixels: any hue gives v for every channel
    is_r, is_g = v == r, v == g
    # The hue in sixths of the circle, torchvision's _rgb2hsv (red wins ties, then green).
    hue6 = is_r * ((g - b) / safe) + (1 - is_r) * (is_g * (2.0 + (b - r) / safe) + (1 - is_g) * (4.0 + (r - g) / safe))
    hue6 = hue6 + 6.0 * shift
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = n + hue6
        k = k - 6.0 * dmath.floor(k / 6.0)
        channels.append(v - chroma * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0))
    return fn.stack(*channels, axis=2, axis_name="C")


def _blur(images, apply_draw, sigma_draw, prob: float, sigma_range: tuple[float, float]):
    """torchvision's gaussian_blur with chance `prob`, sigma uniform in `sigma_range`, window 2 * ceil(3 sigma) + 1.

    A sample left sharp gets a window of one pixel (weight 1: its pixels unchanged), so no conditional is needed.
    """
    lo, hi = sigma_range
    sigma = lo + sigma_draw * (hi - lo)
    blurred = fn.cast(apply_draw < prob, dtype=types.FLOAT)
    window = fn.cast(1.0 + blurred * 2.0 * dmath.ceil(3.0 * sigma), dtype=types.INT32)
    return fn.gaussian_blur(images, sigma=sigma, window_size=window)


@functools.cache
def _noise_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The fixed tables Gaussian noise is read from: (values, row offsets, column offsets, channel offsets).
    The values are standardised to mean 0 and standard deviation 1 exactly. A pure function of nothing:
    the per-sample draws make each sample's noise its own."""
    rng = np.random.default_rng(0x401CE)
    values = rng.standard_normal(_NOISE_VALUES)
    values = ((values - values.mean()) / values.std()).astype(np.float32)
    rows, cols = rng.integers(0, _NOISE_VALUES, size=(2, 2 * _NOISE_MAX_SIDE_PX), dtype=np.int32)
    channels = np.array([0, _NOISE_VALUES // 3, 2 * _NOISE_VALUES // 3], np.int32).reshape(1, 1, 3)
    return values, rows, cols, channels


def _add_noise(images, draws, first: int, std: float, size):
    """Gaussian noise of standard deviation `std` (0-1 pixel scale) added on the 0-255 scale, then clipped.

    DALI's fn.noise.gaussian draws from its own generator, which a resumed pipeline cannot replay, and
    feeding a value per pixel would make the feed cost the image's size: each pixel's value is read
    from a fixed table of 2^16 standard normals at an index made of per-row, per-column and per-channel
    offsets and three per-sample draws (`_noise_tables`). Neighbouring pixels get unrelated values;
    about one value in 2^16 repeats across an image, which does not matter for augmentation.
    """
    values, rows, cols, channels = _noise_tables()
    start = [fn.cast(dmath.floor(draws[first + k : first + k + 1] * _NOISE_MAX_SIDE_PX), dtype=types.INT32) for k in (0, 1)]
    side = fn.cast(size, dtype=types.INT32)
    row = fn.reshape(fn.slice(types.Constant(rows), start=start[0], shape=side[0:1], axes=[0]), shape=[-1, 1, 1])
    col = fn.reshape(fn.slice(types.Constant(cols), start=start[1], shape=side[1:2], axes=[0]), shape=[1, -1, 1])
    shift = fn.cast(dmath.floor(draws[first + 2] * _NOISE_VALUES), dtype=types.INT32)
    row, col, shift = (_on_device_of(images, node) for node in (row, col, shift))
    channel = _on_device_of(images, types.Constant(channels))
    index = (row + col + channel + shift) & (_NOISE_VALUES - 1)
    noise = fn.lookup_table(index, keys=list(range(_NOISE_VALUES)), values=values.tolist(), dtype=types.FLOAT)
    return dmath.clamp(images + noise * (255.0 * std), 0.0, 255.0)


def _undeprecated(op):
    """`op` with DALI's deprecated sharpness and equalize aliases swapped for the same ops (see `_sharpness`)."""
    if op.name == "sharpness":
        return _sharpness.augmentation(mag_range=op.mag_range, randomly_negate=op.randomly_negate, mag_to_param=op.mag_to_param)
    return _equalize if op.name == "equalize" else op


def imagenet_policy_stages():
    """DALI's AutoAugment ImageNet policy as tables our draws index: (sub-policies, stages, ops per stage,
    op index, chance and magnitude bin per (sub-policy, stage)); a stage a sub-policy lacks has chance 0.
    Translations reach 150/331 of the side, as in torchvision's policy."""
    policy = auto_augment.get_image_net_policy(use_shape=True, max_translate_rel=_IMAGENET_POLICY_TRANSLATE)
    subs = policy.sub_policies
    stages = max(len(sub) for sub in subs)
    ops = [[] for _ in range(stages)]
    index = np.zeros((len(subs), stages), np.int32)
    chance = np.zeros((len(subs), stages), np.float32)  # 0: the stage never runs
    magnitude = np.zeros((len(subs), stages), np.int32)
    for i, sub in enumerate(subs):
        for stage, (op, p, mag) in enumerate(sub):
            if op not in ops[stage]:
                ops[stage].append(op)
            index[i, stage], chance[i, stage], magnitude[i, stage] = ops[stage].index(op), p, mag or 0
    ops = [[_undeprecated(op) for op in stage] for stage in ops]
    return policy, ops, index, chance, magnitude


def trivial_augment_ops() -> list:
    """TrivialAugment-Wide's 14 ops as our draws index them: DALI's suite, translations up to 32/224 of the side."""
    suite = trivial_augment.get_trivial_augment_wide_suite(use_shape=True, max_translate_rel=_TRIVIAL_TRANSLATE)
    return [_undeprecated(op) for op in suite]


def _pick(draw, n: int):
    """floor(u * n) in 0..n-1 as INT32 (min guards a float32 product that rounds up to n)."""
    return fn.cast(dmath.min(dmath.floor(draw * n), n - 1), dtype=types.INT32)


def _auto_augment(images, draws, first: int, *, policy: str, size):
    """DALI's AutoAugment ImageNet policy or TrivialAugment-Wide, with the choices `auto_augment` and
    `trivial_augment_wide` make with fn.random (which a resumed pipeline cannot replay) taken from our draws.

    "imagenet": a sub-policy uniform of 25, then each of its (up to) two stages runs with its chance, at its
    fixed magnitude bin of 11, sign drawn. "trivial": one op uniform of 14, a magnitude bin uniform of 31,
    sign drawn. Nearest-neighbour warps filled with grey 128, as in our RandAugment.
    """
    common = dict(shape=size, fill_value=_FILL_GREY, interp_type=types.INTERP_NN)
    if policy == "trivial":
        ops = trivial_augment_ops()
        magnitude = signed_bin(_pick(draws[first + 1], _TRIVIAL_BINS), random_sign=fn.cast(draws[first + 2] < 0.5, dtype=types.INT32))
        return select(ops, _pick(draws[first], len(ops)), data=images, magnitude_bin=magnitude, num_magnitude_bins=_TRIVIAL_BINS, **common)
    table, ops, index, chance, magnitude = imagenet_policy_stages()
    sub = _pick(draws[first], len(table.sub_policies))
    signs = fn.cast(draws[first + 1 + len(ops) : first + 1 + 2 * len(ops)] < 0.5, dtype=types.INT32)
    magnitudes = signed_bin(types.Constant(magnitude)[sub], random_sign=signs)
    chances, op_index = types.Constant(chance)[sub], types.Constant(index)[sub]
    for stage, stage_ops in enumerate(ops):
        if draws[first + 1 + stage] < chances[stage]:
            images = select(
                stage_ops, op_index[stage], data=images, magnitude_bin=magnitudes[stage],
                num_magnitude_bins=table.num_magnitude_bins, **common,
            )
    return images


def _build_train_pipeline(
    callback, *, batch_size, num_threads, device_id, decode_device, aug, channels_last,
    decode_mode="roi", read_files=False, prefetch_depth=2,
):
    # RandAugment picks one op per sample with `if` on a per-sample index: DALI's conditionals, which
    # need the graph traced as a pipeline_def. Left off otherwise, so the graph without it is unchanged.
    # So do the auto_augment policies.
    columns = draw_columns(aug)

    @pipeline_def(enable_conditionals=aug.rand_augment_layers > 0 or bool(aug.auto_augment))
    def graph():
        # Two arrays per batch (each feed_input costs DALI ~1 µs per sample, whatever its width): the files'
        # paths, NUL-padded to one length (or, for an in-memory source, the encoded bytes); and one float32
        # row per sample: label and path length (integers, exact in float32 below 2^24), output size, crop
        # window, then the augmentation draws.
        encoded, floats = fn.external_source(
            source=callback,
            num_outputs=2,
            batch=True,
            batch_info=True,
            dtype=[types.UINT8, types.FLOAT],
        )
        labels = fn.cast(floats[_LABEL_COLUMN], dtype=types.INT64)
        size, window, draws = floats[2:4], floats[4:8], floats[8:]
        if read_files:
            # DALI reads the files in its own threads, off the training thread.
            path = fn.slice(encoded, start=[0], shape=fn.cast(floats[1:2], dtype=types.INT32), axes=[0])
            jpegs = fn.io.file.read(path)
        else:
            jpegs = encoded
        if decode_mode == "roi":
            # ROI decoding of the random-resized-crop window computed in `_feed` (x0, y0, w, h in pixels of
            # the stored image): only the crop is decoded, on the GPU with "mixed". EXIF orientation is not
            # applied, so the window matches the stored size (torchvision's ImageFolder does not apply it either).
            images = fn.decoders.image_slice(
                jpegs, window[0:2], window[2:4], normalized_anchor=False, normalized_shape=False, **decoder_args(decode_device)
            )
            images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
        else:
            # The whole image, then the window (here (y0, x0, y1, x1): resize's ROI is in shape order)
            # cropped and resized in one op: for decoders whose ROI path fails (see `preflight_decode`).
            images = fn.decoders.image(jpegs, **decoder_args(decode_device))
            images = fn.resize(
                images, size=size, roi_start=window[0:2], roi_end=window[2:4], roi_relative=False,
                interp_type=types.INTERP_LINEAR, antialias=True,
            )
        if aug.vflip_prob > 0:
            images = fn.flip(images, horizontal=0, vertical=fn.cast(draws[columns["vflip"]] < aug.vflip_prob, dtype=types.INT32))
        if aug.rotate_deg > 0:
            images = _rotate(images, draws[columns["rotate"]], aug.rotate_deg)
        if aug.rand_augment_layers > 0:
            first = _DRAWS + (_JITTER_DRAWS if aug.color_jitter > 0 else 0)
            images = _rand_augment(
                images, draws, first, layers=aug.rand_augment_layers, magnitude=aug.rand_augment_magnitude, size=size
            )
        if aug.auto_augment:
            images = _auto_augment(images, draws, columns["auto_augment"], policy=aug.auto_augment, size=size)
        if aug.color_jitter > 0:
            images = _color_jitter(images, draws, aug.color_jitter)
        if aug.hue > 0:
            if aug.color_jitter == 0:
                images = fn.cast(images, dtype=types.FLOAT)  # the channels' differences below need signs
            images = _adjust_hue(images, (draws[columns["hue"]] * 2.0 - 1.0) * aug.hue)
        if aug.blur_prob > 0:
            first = columns["blur"]
            images = _blur(images, draws[first], draws[first + 1], aug.blur_prob, aug.blur_sigma)
        if aug.noise_std > 0:
            images = _add_noise(images, draws, columns["noise"], aug.noise_std, size)
        # The flip happens in crop_mirror_normalize, after RandAugment rather than before it as in timm:
        # the same distribution, since every geometric op's sign is drawn symmetric.
        flip = fn.cast(draws[4] < aug.hflip_prob, dtype=types.INT32)
        images = fn.crop_mirror_normalize(
            images,
            mirror=flip,
            output_layout="HWC" if channels_last else "CHW",
            **_normalize_args(aug.mean, aug.std),
        )
        if decode_device == "mixed":
            labels = labels.gpu()
        return images, labels

    return graph(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch_depth,
        exec_dynamic=True,
    )


def _build_eval_pipeline(
    callback, *, batch_size, num_threads, device_id, decode_device, res_px, crop_fraction, mean, std, channels_last, prefetch_depth=2
):
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch_depth,
        exec_dynamic=True,
    )
    with pipe:
        jpegs, labels = fn.external_source(
            source=callback, num_outputs=2, batch=True, batch_info=True, dtype=[types.UINT8, types.INT64]
        )
        images = fn.decoders.image(jpegs, **decoder_args(decode_device))
        # timm's eval transform: shorter side to res/crop_fraction, then a centre crop of res.
        images = fn.resize(
            images,
            resize_shorter=math.floor(res_px / crop_fraction),
            interp_type=types.INTERP_LINEAR,
            antialias=True,
        )
        images = fn.crop_mirror_normalize(
            images,
            crop=(res_px, res_px),
            output_layout="HWC" if channels_last else "CHW",
            **_normalize_args(mean, std),
        )
        if decode_device == "mixed":
            labels = labels.gpu()
        pipe.set_outputs(images, labels)
    return pipe


def _to_nchw(images: torch.Tensor, channels_last: bool) -> torch.Tensor:
    # NHWC from DALI viewed as NCHW is exactly torch's channels_last layout: no copy.
    return images.permute(0, 3, 1, 2) if channels_last else images


@dataclass(frozen=True)
class _EpochTables:
    """One epoch's feed for one rank, row i = the i-th sample it trains on; a batch is a slice of rows.

    The order, the stand-ins and the draws are made for the whole epoch at once; the rows' draws, crop
    windows and paths, the bulk of the work (1.5 s for ImageNet's 1.28 M rows here), block by block as
    the feed reaches them (`TrainLoader._block`): row-wise functions, so a block is the rows the whole would have,
    and the first batch does not wait for the epoch's last."""

    key: tuple[int, int]  # (epoch, number of samples marked bad when built)
    indices: np.ndarray  # the samples in order
    fed: np.ndarray  # the samples decoded: `indices`, with the stand-in in place of a bad sample
    draws: list[np.ndarray]  # `augment_draw_tables`: float32 (samples, columns) each, in sample order
    draw_rows: np.ndarray  # the row of the draws each position takes: its sample's (or, "sampler", its draw's)
    heights: np.ndarray  # the stored size of each row's decoded sample
    widths: np.ndarray
    res_px: float  # the epoch's output side
    # Feed blocks made so far, {block: (floats, paths)}: the newest few (`TrainLoader._block`).
    blocks: dict = field(default_factory=dict)


def _path_matrix(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each file's UTF-8 path as a row of one NUL-padded uint8 array, and their lengths."""
    encoded = [f.encode() for f in files]
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    matrix = np.zeros((len(encoded), int(lengths.max(initial=1))), dtype=np.uint8)
    matrix[np.arange(matrix.shape[1]) < lengths[:, None]] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    return matrix, lengths


FEED_BLOCK_ROWS = 16384  # the feed's array work is ~1 us a row: ~16 ms once per 16,384 samples, on the training thread


class TrainLoader(DecodingStream):
    """Infinite stream of training batches for one rank, positioned by (epoch, batch).

    `res_px_for_epoch` makes progressive resizing a schedule: the resolution is an input of the graph,
    so it changes at an epoch boundary without rebuilding the pipeline.

    The feed runs on the training thread (inside `next()`), so it does no per-sample work: an epoch's
    order and draws are computed at once as arrays, its labels, crop windows (from the sizes the check
    before training read, `source.sizes`) and paths as arrays of FEED_BLOCK_ROWS rows at a time, and
    each batch hands DALI slices of them, for DALI to read the files in its own threads (the bytes,
    for an in-memory source).
    `decode_mode` is "roi" (decode only the crop), "full" (decode all, then crop and resize in one op)
    or "auto" (`preflight_decode`); `prefetch_depth` is DALI's queue of batches prepared ahead.
    """

    def __init__(
        self,
        source: ImageFolderSource,
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        res_px_for_epoch: Callable[[int], int] = lambda epoch: 224,
        augment: TrainAugment = TrainAugment(),
        decode_device: str = "auto",
        device_id: int | None = None,
        num_threads: int = 2,
        channels_last: bool = False,
        batch_multiple: int = 1,
        decode_mode: str = "auto",
        prefetch_depth: int = 2,
        balance: str = "",
    ) -> None:
        self.source = source
        self.balance = balance  # "sampler": class-balanced order with replacement (order.balanced_train_order)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.res_px_for_epoch = res_px_for_epoch
        self.augment = augment
        self.decode_device = resolve_decode_device(decode_device)
        self.device_id = device_id if self.decode_device == "mixed" else None
        self.num_threads = num_threads
        self.channels_last = channels_last
        self.prefetch_depth = prefetch_depth
        if len(source.classes) >= _MAX_EXACT_FLOAT32:
            raise ValueError(f"{len(source.classes)} classes: the feed carries labels as float32, exact below {_MAX_EXACT_FLOAT32}")
        # DALI reads the files itself when there are files to read; other sources hand over bytes.
        self.read_files = isinstance(source, ImageFolderSource)
        # With gradient accumulation an epoch holds whole accumulation groups only.
        full = order.train_batches_per_epoch(len(source), world_size, batch_size)
        self.batches_per_epoch = full - full % batch_multiple
        self.batch_multiple = batch_multiple
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(source)} training images over {world_size} process(es) do not fill one batch of "
                f"{batch_size}; lower batch_size_per_device"
            )
        self.epoch = 0
        self.batch = 0  # index of the next batch to hand out within self.epoch
        self._iterator = None
        self._tables: _EpochTables | None = None
        self._sizes = source.sizes  # (height, width) per sample; read from the headers on first use if None
        self.guard = SampleGuard(source, "training", rank, device=self.decode_device, device_id=self.device_id, sizes=self._sizes)
        self.decode_mode = resolve_decode_mode(decode_mode, source, self.decode_device, self.device_id, self._sizes)
        self._last_fed = -1  # flat position (epoch * batches_per_epoch + batch) of the newest batch fed
        # Rows of a feed block (`_block`): whole batches, about FEED_BLOCK_ROWS.
        self._block_rows = batch_size * max(1, FEED_BLOCK_ROWS // batch_size)

    # -- position, for checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "num_samples": len(self.source),
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "balance": self.balance,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["num_samples"] != len(self.source):
            raise ValueError(
                f"checkpoint was written for seed {state['seed']} and {state['num_samples']} training "
                f"images; this run has seed {self.seed} and {len(self.source)}. Resume with the same data and seed."
            )
        if state.get("balance", "") != self.balance:
            raise ValueError(
                f"checkpoint was written with data.balance={state.get('balance', '')!r}, this run has {self.balance!r}: "
                "the sample order differs. Resume with the same data.balance."
            )
        batch = state["batch"]
        written = (state.get("world_size", self.world_size), state.get("batch_size", self.batch_size))
        if written != (self.world_size, self.batch_size):
            # Saved by another number of processes (or batch size). An epoch's order is one permutation
            # dealt round-robin to the ranks, so the samples trained on are its first `done`, whatever
            # the world size: go on after them (at most one new global batch of them is seen again).
            done = batch * written[0] * written[1]
            batch = min(done // (self.world_size * self.batch_size), self.batches_per_epoch - 1)
            batch -= batch % self.batch_multiple  # a whole accumulation group
        self.seek(state["epoch"], batch)

    def seek(self, epoch: int, batch: int = 0) -> None:
        """Position the stream so the next batch is `batch` of `epoch`; restarts the pipeline if needed."""
        if (epoch, batch) != (self.epoch, self.batch) or self._iterator is None:
            self._iterator = None
        self.epoch, self.batch = epoch, batch

    # -- the external-source callable ----------------------------------------------------------
    def sizes(self) -> np.ndarray:
        """(height, width) of every sample: the check's, or (unscreened source) read once from the headers,
        marking the samples whose header the decoder would fail on."""
        if self._sizes is None:
            headers = source_headers(self.source)
            for index, header in enumerate(headers):
                if isinstance(header, BadFile):
                    self.guard.mark(index, str(header))
            self._sizes = self.guard.sizes = header_sizes(headers)
        return self._sizes

    def _epoch_tables(self, epoch: int) -> _EpochTables:
        """The epoch's feed as arrays in this rank's order; rebuilt when a sample is newly marked bad."""
        sizes = self.sizes()
        stand_in = self.guard.stand_in() if self.guard.bad else None  # its search may mark more: before the key
        key = (epoch, len(self.guard.bad))
        if self._tables is not None and self._tables.key == key:
            return self._tables
        placing = dict(seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size, batch_size=self.batch_size)
        if self.balance == "sampler":
            indices, draw_rows = order.balanced_train_order(self.source.labels, **placing)
        else:
            indices = draw_rows = order.train_order(len(self.source), **placing)
        draws = augment_draw_tables(len(self.source), seed=self.seed, epoch=epoch, aug=self.augment)
        fed = indices.copy()  # the sample each position decodes: a bad sample's stand-in, with the bad sample's draws
        heights, widths = sizes[indices, 0], sizes[indices, 1]
        if stand_in is not None:
            bad = np.isin(indices, np.fromiter(self.guard.bad, dtype=np.int64))
            fed[bad] = stand_in[0]
            heights = np.where(bad, stand_in[2].height, heights)
            widths = np.where(bad, stand_in[2].width, widths)
        self._tables = _EpochTables(key, indices, fed, draws, draw_rows, heights, widths, float(self.res_px_for_epoch(epoch)))
        return self._tables

    def _block(self, tables: _EpochTables, block: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows [block * FEED_BLOCK_ROWS, ...) of the epoch's feed: float32 (n, 8 + draws) (label, length
        of the path; output (height, width); crop window, (x0, y0, w, h) for "roi" and (y0, x0, y1, x1)
        for "full"; the draws) and uint8 (n, longest path) (each file's UTF-8 path, NUL-padded; None for
        in-memory sources)."""
        if block not in tables.blocks:
            rows = slice(block * self._block_rows, (block + 1) * self._block_rows)
            fed, draw_rows = tables.fed[rows], tables.draw_rows[rows]
            draws = np.concatenate([table[draw_rows] for table in tables.draws], axis=1)
            windows = crop_windows(draws, tables.heights[rows], tables.widths[rows], self.augment)
            if self.decode_mode == "full":
                # fn.resize's ROI, (y0, x0) to (y1, x1), on the pixels image_slice would cut: it rounds the
                # window's start and end to whole pixels (measured on DALI 2.4), so both modes resize one crop.
                x0, y0, w, h = windows.astype(np.float64).T
                windows = np.floor(np.stack([y0, x0, y0 + h, x0 + w], axis=1) + 0.5)
            paths, lengths = _path_matrix([self.source.files[i] for i in fed.tolist()]) if self.read_files else (None, np.zeros(len(fed), np.int64))
            ints = np.stack([self.source.labels[fed], lengths], axis=1)
            floats = np.concatenate([ints, np.full((len(fed), 2), tables.res_px), windows, draws], axis=1, dtype=np.float32)
            while len(tables.blocks) >= 2:  # the feed moves forward: the block before the current one at most
                del tables.blocks[min(tables.blocks)]
            tables.blocks[block] = (floats, paths)
        return tables.blocks[block]

    def _position(self, iteration: int) -> tuple[int, int]:
        flat = self._start[0] * self.batches_per_epoch + self._start[1] + iteration
        return divmod(flat, self.batches_per_epoch)

    def _feed(self, info):
        epoch, batch = self._position(info.iteration)
        self._last_fed = max(self._last_fed, epoch * self.batches_per_epoch + batch)
        block, first = divmod(batch * self.batch_size, self._block_rows)
        rows = slice(first, first + self.batch_size)
        while True:
            tables = self._epoch_tables(epoch)
            floats, paths = self._block(tables, block)
            if self.read_files:
                encoded = paths[rows]
                break
            encoded = [self.guard.read_bytes(i) for i in tables.fed[block * self._block_rows :][rows].tolist()]
            if all(e is not None for e in encoded):
                break
            # A row that cannot be read now (marked bad by read_bytes): the tables put its stand-in in.
        return encoded, floats[rows]

    # -- what DecodingStream needs to recover from a decode error -------------------------------
    def _next_flat(self) -> int:
        return self.epoch * self.batches_per_epoch + self.batch

    def _batch_samples(self, flat: int) -> np.ndarray:
        epoch, batch = divmod(flat, self.batches_per_epoch)
        return self._epoch_tables(epoch).indices[batch * self.batch_size : (batch + 1) * self.batch_size]

    def _start_pipeline(self) -> None:
        self._start = (self.epoch, self.batch)
        self._last_fed = self.epoch * self.batches_per_epoch + self.batch - 1
        pipe = _build_train_pipeline(
            self._feed,
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            decode_device=self.decode_device,
            aug=self.augment,
            channels_last=self.channels_last,
            decode_mode=self.decode_mode,
            read_files=self.read_files,
            prefetch_depth=self.prefetch_depth,
        )
        self._iterator = DALIGenericIterator(pipe, ["images", "labels"], auto_reset=False)

    # -- iteration -----------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the rest of `epoch` (from the current position when resuming into it)."""
        if epoch != self.epoch:
            self.seek(epoch, 0)
        while self.batch < self.batches_per_epoch:
            out = self._next_output()
            # Advance before yielding so a checkpoint taken inside the step points at the next batch.
            self.batch += 1
            yield _to_nchw(out["images"], self.channels_last), out["labels"].view(-1)
        # The pipeline runs on into the next epoch: its first batches are already being prepared.
        self.epoch, self.batch = epoch + 1, 0


class EvalLoader(DecodingStream):
    """The eval set for one rank: each sample once across ranks, padding labelled -1."""

    def __init__(
        self,
        source: ImageFolderSource,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        res_px: int = 224,
        crop_fraction: float = 0.875,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        decode_device: str = "auto",
        device_id: int | None = None,
        num_threads: int = 2,
        channels_last: bool = False,
        prefetch_depth: int = 2,
    ) -> None:
        self.source = source
        self.batch_size = batch_size
        self.channels_last = channels_last
        self.indices = order.eval_order(len(source), rank=rank, world_size=world_size, batch_size=batch_size)
        self.num_batches = len(self.indices) // batch_size
        decode_device = resolve_decode_device(decode_device)
        self._pipe_args = dict(
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device_id if decode_device == "mixed" else None,
            decode_device=decode_device,
            res_px=res_px,
            crop_fraction=crop_fraction,
            mean=mean,
            std=std,
            channels_last=channels_last,
            prefetch_depth=prefetch_depth,
        )
        self._iterator = None
        self.guard = SampleGuard(source, "val", rank, device=decode_device, device_id=self._pipe_args["device_id"])
        self._handed_out = 0  # batches handed out so far, over all passes
        self._first_flat = 0  # the value of _handed_out when the pipeline started
        self._last_fed = -1

    def _feed(self, info):
        # The iteration counter runs on across passes; each pass is num_batches long.
        flat = self._first_flat + info.iteration
        self._last_fed = max(self._last_fed, flat)
        batch = flat % self.num_batches
        chosen = self.indices[batch * self.batch_size : (batch + 1) * self.batch_size]
        encoded, labels = [], []
        self.guard.stand_in()  # chosen before any read, as in TrainLoader
        for index in chosen:
            # Padding decodes sample 0 again (cheap, keeps the batch full) and is labelled -1, not scored;
            # so is a bad file, which decodes the stand-in instead.
            got = self.guard.read(max(index, 0))
            encoded.append(got[0] if got is not None else self.guard.stand_in()[1])
            labels.append(np.array(self.source.labels[index] if index >= 0 and got is not None else -1, dtype=np.int64))
        return encoded, labels

    def __len__(self) -> int:
        return self.num_batches

    def _start_pipeline(self) -> None:
        self._first_flat = self._handed_out
        self._last_fed = self._handed_out - 1
        pipe = _build_eval_pipeline(self._feed, **self._pipe_args)
        self._iterator = DALIGenericIterator(pipe, ["images", "labels"], auto_reset=False)

    def _next_flat(self) -> int:
        return self._handed_out

    def _batch_samples(self, flat: int) -> np.ndarray:
        batch = flat % self.num_batches
        return np.maximum(self.indices[batch * self.batch_size : (batch + 1) * self.batch_size], 0)  # padding decodes sample 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(self.num_batches):
            out = self._next_output()
            self._handed_out += 1
            yield _to_nchw(out["images"], self.channels_last), out["labels"].view(-1)
