"""DALI pipelines for training and evaluation, and the iterators that hand their batches to torch.

One pipeline per loader, fed by a batch-mode `fn.external_source` callable. The callable maps DALI's
iteration counter to (epoch, batch) and from there, through `loaders.order`, to sample indices,
augmentation draws and the epoch's resolution. All randomness is drawn in numpy from
(seed, epoch, sample index) and passed into the graph, so DALI holds no state worth saving: resume
rebuilds the pipeline at (epoch, batch) and produces the same pixels as a run that never stopped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from loaders import order
from loaders.sources import ImageFolderSource

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Uniform draws per sample: crop area, crop log-aspect, crop x, crop y, flip.
_DRAWS = 5


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
    """Random-resized-crop, flip and normalisation for training (timm/torchvision defaults)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _normalize_args(mean, std) -> dict:
    return dict(mean=[255.0 * m for m in mean], std=[255.0 * s for s in std], dtype=types.FLOAT)


def _build_train_pipeline(callback, *, batch_size, num_threads, device_id, decode_device, aug, channels_last):
    pipe = Pipeline(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=2,
        exec_dynamic=True,
    )
    with pipe:
        jpegs, labels, draws, size = fn.external_source(
            source=callback,
            num_outputs=4,
            batch=True,
            batch_info=True,
            dtype=[types.UINT8, types.INT64, types.FLOAT, types.FLOAT],
        )
        # Random-resized-crop computed in the graph from the image's header size and our draws
        # (one attempt with clamping instead of torchvision's ten tries).
        shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT)
        height, width = shape[0], shape[1]
        lo, hi = aug.crop_scale
        area = height * width * (lo + draws[0] * (hi - lo))
        log_lo, log_hi = math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])
        ratio = dmath.exp(log_lo + draws[1] * (log_hi - log_lo))
        crop_w = dmath.min(dmath.sqrt(area * ratio), width)
        crop_h = dmath.min(dmath.sqrt(area / ratio), height)
        anchor = fn.stack(draws[2] * (width - crop_w), draws[3] * (height - crop_h))
        extent = fn.stack(crop_w, crop_h)
        # ROI decoding: only the crop is decoded (on the GPU with "mixed").
        images = fn.decoders.image_slice(
            jpegs,
            anchor,
            extent,
            device=decode_device,
            output_type=types.RGB,
            normalized_anchor=False,
            normalized_shape=False,
        )
        images = fn.resize(images, size=size, interp_type=types.INTERP_LINEAR, antialias=True)
        flip = fn.cast(draws[4] < aug.hflip_prob, dtype=types.INT32)
        images = fn.crop_mirror_normalize(
            images,
            mirror=flip,
            output_layout="HWC" if channels_last else "CHW",
            **_normalize_args(aug.mean, aug.std),
        )
        if decode_device == "mixed":
            labels = labels.gpu()
        pipe.set_outputs(images, labels)
    return pipe


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
        images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
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


class TrainLoader:
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
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(source)} training images over {world_size} process(es) do not fill one batch of "
                f"{batch_size}; lower batch_size_per_device"
            )
        self.epoch = 0
        self.batch = 0  # index of the next batch to hand out within self.epoch
        self._iterator = None
        self._cache_epoch = None

    # -- position, for checkpoints -------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "num_samples": len(self.source),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed or state["num_samples"] != len(self.source):
            raise ValueError(
                f"checkpoint was written for seed {state['seed']} and {state['num_samples']} training "
                f"images; this run has seed {self.seed} and {len(self.source)}. Resume with the same data and seed."
            )
        self.seek(state["epoch"], state["batch"])

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
            draws = order.augment_uniforms(len(self.source), seed=self.seed, epoch=epoch, count=_DRAWS)
            self._cache = (indices, draws)
            self._cache_epoch = epoch
        return self._cache

    def _position(self, iteration: int) -> tuple[int, int]:
        flat = self._start[0] * self.batches_per_epoch + self._start[1] + iteration
        return divmod(flat, self.batches_per_epoch)

    def _feed(self, info):
        epoch, batch = self._position(info.iteration)
        indices, draws = self._epoch_tables(epoch)
        chosen = indices[batch * self.batch_size : (batch + 1) * self.batch_size]
        res_px = float(self.res_px_for_epoch(epoch))
        size = np.array([res_px, res_px], dtype=np.float32)
        return (
            [self.source.read(i) for i in chosen],
            [np.array(self.source.labels[i], dtype=np.int64) for i in chosen],
            [draws[i] for i in chosen],
            [size] * len(chosen),
        )

    def _start_pipeline(self) -> None:
        self._start = (self.epoch, self.batch)
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
        if self._iterator is None:
            self._start_pipeline()
        while self.batch < self.batches_per_epoch:
            out = next(self._iterator)[0]
            # Advance before yielding so a checkpoint taken inside the step points at the next batch.
            self.batch += 1
            yield _to_nchw(out["images"], self.channels_last), out["labels"].view(-1)
        # The pipeline runs on into the next epoch: its first batches are already being prepared.
        self.epoch, self.batch = epoch + 1, 0

    def res_px(self, epoch: int) -> int:
        return int(self.res_px_for_epoch(epoch))


class EvalLoader:
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

    def _feed(self, info):
        # The iteration counter runs on across passes; each pass is num_batches long.
        batch = info.iteration % self.num_batches
        chosen = self.indices[batch * self.batch_size : (batch + 1) * self.batch_size]
        # Padding decodes sample 0 again (cheap, keeps the batch full) and is labelled -1.
        return (
            [self.source.read(max(i, 0)) for i in chosen],
            [np.array(self.source.labels[i] if i >= 0 else -1, dtype=np.int64) for i in chosen],
        )

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._iterator is None:
            pipe = _build_eval_pipeline(self._feed, **self._pipe_args)
            self._iterator = DALIGenericIterator(pipe, ["images", "labels"], auto_reset=False)
        for _ in range(self.num_batches):
            out = next(self._iterator)[0]
            yield _to_nchw(out["images"], self.channels_last), out["labels"].view(-1)
