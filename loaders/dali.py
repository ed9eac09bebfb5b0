"""DALI pipelines for training and evaluation, and the iterators that hand their batches to torch.

One pipeline per loader, fed by a batch-mode `fn.external_source` callable. The callable maps DALI's
iteration counter to (epoch, batch) and from there, through `loaders.order`, to sample indices,
augmentation draws and the epoch's resolution. All randomness is drawn in numpy from
(seed, epoch, sample index) and passed into the graph, so DALI holds no state worth saving: resume
rebuilds the pipeline at (epoch, batch) and produces the same pixels as a run that never stopped.
Both loaders are `loaders.recovery.DecodingStream`s: a file that fails only in the decoder is found,
replaced by a stand-in, and the pipeline restarts at the same batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations, rand_augment
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin
from nvidia.dali.pipeline import Pipeline, pipeline_def
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from loaders import IMAGENET_MEAN, IMAGENET_STD, order
from loaders.recovery import DecodingStream, SampleGuard
from loaders.sources import ImageFolderSource

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


def resolve_decode_device(device: str) -> str:
    """"auto" → "mixed" (nvJPEG on the GPU) when CUDA is available, else "cpu". Same graph either way."""
    if device == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "mixed"):
        raise ValueError(f'decode device must be "auto", "cpu" or "mixed", got {device!r}')
    if device == "mixed" and not torch.cuda.is_available():
        raise ValueError('decode device "mixed" needs a CUDA GPU; use "auto" or "cpu" on this machine')
    return device


@dataclass(frozen=True)
class TrainAugment:
    """Random-resized-crop, flip, optional RandAugment and colour jitter, and normalisation for training.

    Defaults are timm/torchvision's; RandAugment and colour jitter are off unless asked for. In timm's
    order: crop, flip, RandAugment (`rand_augment_layers` ops per image from `rand_augment_ops()`, at
    `rand_augment_magnitude` of 0..30 as in torchvision, each op's sign drawn; nearest-neighbour warps
    filled with grey 128), then colour jitter (brightness, contrast and saturation each times a factor
    uniform in [max(0, 1 - s), 1 + s]: torchvision's ColorJitter(s, s, s) in that fixed order).
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

    def __post_init__(self) -> None:
        if self.color_jitter < 0:
            raise ValueError(f"color_jitter must be >= 0, got {self.color_jitter}")
        if self.rand_augment_layers < 0:
            raise ValueError(f"rand_augment_layers must be >= 0, got {self.rand_augment_layers}")
        if not 0 <= self.rand_augment_magnitude < _RAND_AUGMENT_BINS:
            raise ValueError(f"rand_augment_magnitude must be in 0..{_RAND_AUGMENT_BINS - 1}, got {self.rand_augment_magnitude}")


def augment_draws(num_samples: int, *, seed: int, epoch: int, aug: TrainAugment) -> np.ndarray:
    """Every sample's uniforms for `epoch` as the train graph reads them: crop and flip, then jitter, then RandAugment."""
    tables = [order.augment_uniforms(num_samples, seed=seed, epoch=epoch, count=_DRAWS)]
    if aug.color_jitter > 0:
        tables.append(order.augment_uniforms(num_samples, seed=seed, epoch=epoch, count=_JITTER_DRAWS, stream=_JITTER_STREAM))
    if aug.rand_augment_layers > 0:
        count = 2 * aug.rand_augment_layers
        tables.append(order.augment_uniforms(num_samples, seed=seed, epoch=epoch, count=count, stream=_RAND_AUGMENT_STREAM))
    # Last, so the columns above keep their places whatever is switched on.
    tables.append(order.augment_uniforms(num_samples, seed=seed, epoch=epoch, count=2 * (_CROP_ATTEMPTS - 1), stream=_CROP_STREAM))
    return np.concatenate(tables, axis=1)


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


def _build_train_pipeline(callback, *, batch_size, num_threads, device_id, decode_device, aug, channels_last):
    # RandAugment picks one op per sample with `if` on a per-sample index: DALI's conditionals, which
    # need the graph traced as a pipeline_def. Left off otherwise, so the graph without it is unchanged.
    @pipeline_def(enable_conditionals=aug.rand_augment_layers > 0)
    def graph():
        jpegs, labels, draws, size, window = fn.external_source(
            source=callback,
            num_outputs=5,
            batch=True,
            batch_info=True,
            dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT, types.FLOAT],
        )
        # ROI decoding of the random-resized-crop window computed in `_feed` (x0, y0, w, h in pixels of
        # the stored image): only the crop is decoded, on the GPU with "mixed". EXIF orientation is not
        # applied, so the window matches the stored size (torchvision's ImageFolder does not apply it either).
        images = fn.decoders.image_slice(
            jpegs,
            window[0:2],
            window[2:4],
            device=decode_device,
            output_type=types.RGB,
            adjust_orientation=False,
            normalized_anchor=False,
            normalized_shape=False,
        )
        images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
        if aug.rand_augment_layers > 0:
            first = _DRAWS + (_JITTER_DRAWS if aug.color_jitter > 0 else 0)
            images = _rand_augment(
                images, draws, first, layers=aug.rand_augment_layers, magnitude=aug.rand_augment_magnitude, size=size
            )
        if aug.color_jitter > 0:
            images = _color_jitter(images, draws, aug.color_jitter)
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
        prefetch_queue_depth=2,
        exec_dynamic=True,
    )


def _build_eval_pipeline(callback, *, batch_size, num_threads, device_id, decode_device, res_px, crop_fraction, mean, std, channels_last):
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=2,
        exec_dynamic=True,
    )
    with pipe:
        jpegs, labels = fn.external_source(
            source=callback, num_outputs=2, batch=True, batch_info=True, dtype=[types.UINT8, types.INT64]
        )
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, adjust_orientation=False)
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


class TrainLoader(DecodingStream):
    """Infinite stream of training batches for one rank, positioned by (epoch, batch).

    `res_px_for_epoch` makes progressive resizing a schedule: the resolution is an input of the graph,
    so it changes at an epoch boundary without rebuilding the pipeline.
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
    ) -> None:
        self.source = source
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
        self._cache_epoch = None
        self.guard = SampleGuard(source, "training", rank)
        self._last_fed = -1  # flat position (epoch * batches_per_epoch + batch) of the newest batch fed

    # -- position, for checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "num_samples": len(self.source),
            "world_size": self.world_size,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["num_samples"] != len(self.source):
            raise ValueError(
                f"checkpoint was written for seed {state['seed']} and {state['num_samples']} training "
                f"images; this run has seed {self.seed} and {len(self.source)}. Resume with the same data and seed."
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
    def _epoch_tables(self, epoch: int):
        if self._cache_epoch != epoch:
            indices = order.train_order(
                len(self.source),
                seed=self.seed,
                epoch=epoch,
                rank=self.rank,
                world_size=self.world_size,
                batch_size=self.batch_size,
            )
            draws = augment_draws(len(self.source), seed=self.seed, epoch=epoch, aug=self.augment)
            self._cache = (indices, draws)
            self._cache_epoch = epoch
        return self._cache

    def _position(self, iteration: int) -> tuple[int, int]:
        flat = self._start[0] * self.batches_per_epoch + self._start[1] + iteration
        return divmod(flat, self.batches_per_epoch)

    def _feed(self, info):
        epoch, batch = self._position(info.iteration)
        self._last_fed = max(self._last_fed, epoch * self.batches_per_epoch + batch)
        indices, draws = self._epoch_tables(epoch)
        chosen = indices[batch * self.batch_size : (batch + 1) * self.batch_size]
        res_px = float(self.res_px_for_epoch(epoch))
        size = np.array([res_px, res_px], dtype=np.float32)
        encoded, labels, heights, widths = [], [], [], []
        self.guard.stand_in()  # chosen before any read: its search must not mark a sample already in the batch
        for index in chosen:
            got, label_index = self.guard.read(index), index
            if got is None:  # a bad sample: the stand-in's bytes and label, with the bad sample's draws
                label_index, *got = self.guard.stand_in()
            data, header = got
            encoded.append(data)
            labels.append(np.array(self.source.labels[label_index], dtype=np.int64))
            heights.append(header.height)
            widths.append(header.width)
        windows = crop_windows(draws[chosen], np.array(heights), np.array(widths), self.augment)
        return (
            encoded,
            labels,
            [draws[i] for i in chosen],
            [size] * len(chosen),
            list(windows),
        )

    # -- what DecodingStream needs to recover from a decode error -------------------------------
    def _next_flat(self) -> int:
        return self.epoch * self.batches_per_epoch + self.batch

    def _batch_samples(self, flat: int) -> np.ndarray:
        epoch, batch = divmod(flat, self.batches_per_epoch)
        return self._epoch_tables(epoch)[0][batch * self.batch_size : (batch + 1) * self.batch_size]

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
        )
        self._iterator = None
        self.guard = SampleGuard(source, "val", rank)
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
