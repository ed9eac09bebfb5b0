"""Colour jitter and RandAugment in the DALI train pipeline: off by default, driven by our draws, exact on resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from loaders import IMAGENET_MEAN, IMAGENET_STD, order
from loaders.dali import (
    TrainAugment,
    TrainLoader,
    _brightness_contrast,
    augment_draws,
    jitter_factors,
    rand_augment_ops,
)
from loaders.sources import image_folder_splits, scan_image_folder

MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None] * 255
STD = torch.tensor(IMAGENET_STD)[:, None, None] * 255
# crop_mirror_normalize of a uint8 image can only land between these (black and white pixels).
LOWEST = float(((0 - MEAN) / STD).min())
HIGHEST = float(((255 - MEAN) / STD).max())
SEED = 11


def _loader(source, aug: TrainAugment, **kw) -> TrainLoader:
    args = dict(batch_size=8, seed=SEED, res_px_for_epoch=lambda e: 32, decode_device="cpu", num_threads=1, augment=aug)
    args.update(kw)
    return TrainLoader(source, **args)


def _epoch(loader: TrainLoader, epoch: int = 0) -> torch.Tensor:
    return torch.cat([x for x, _ in loader.epoch_batches(epoch)])


def _rows(source, aug: TrainAugment, *, batch_size: int = 8, epoch: int = 0) -> np.ndarray:
    """The draws of each output image of `epoch`, in output order."""
    ids = order.train_order(len(source), seed=SEED, epoch=epoch, rank=0, world_size=1, batch_size=batch_size)
    return augment_draws(len(source), seed=SEED, epoch=epoch, aug=aug)[ids]


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """Normalised NCHW back to 0..255 values."""
    return images * STD + MEAN


def _assert_sane(images: torch.Tensor) -> None:
    assert torch.isfinite(images).all()
    assert LOWEST - 1e-4 <= float(images.min()) and float(images.max()) <= HIGHEST + 1e-4


@pytest.fixture(scope="module")
def train(tiny_imagenet):
    return image_folder_splits(tiny_imagenet)[0]


@pytest.fixture(scope="module")
def plain(train) -> torch.Tensor:
    return _epoch(_loader(train, TrainAugment()))


def test_off_by_default_and_existing_draws_unchanged(train, plain):
    aug = TrainAugment()
    assert aug.color_jitter == 0 and aug.rand_augment_layers == 0
    base = order.augment_uniforms(96, seed=SEED, epoch=0, count=5)
    plain_draws = augment_draws(96, seed=SEED, epoch=0, aug=aug)
    assert plain_draws.shape == (96, 5 + 18) and np.array_equal(plain_draws[:, :5], base)  # + 9 more crop tries
    # Turning augmentations on inserts their columns: the crop and flip draws of a seed stay as they were.
    both = augment_draws(96, seed=SEED, epoch=0, aug=TrainAugment(color_jitter=0.4, rand_augment_layers=2))
    assert both.shape == (96, 5 + 3 + 4 + 18) and np.array_equal(both[:, :5], base)
    assert np.array_equal(both[:, -18:], plain_draws[:, -18:])
    # Zero strength or zero layers means no op in the graph at all (the magnitude alone changes nothing).
    off = TrainAugment(color_jitter=0.0, rand_augment_layers=0, rand_augment_magnitude=30)
    assert torch.equal(_epoch(_loader(train, off)), plain)


def test_color_jitter_changes_pixels_and_keeps_the_mean_in_bounds(train, plain):
    strength = 0.4
    jittered = _epoch(_loader(train, TrainAugment(color_jitter=strength)))
    _assert_sane(jittered)
    changed = (jittered != plain).flatten(1).any(1)
    assert changed.all()
    # Same crops (jitter has its own draws), so the ratio of mean greys is the brightness factor, pulled
    # towards 1 where these saturated test colours clip: within [1 - s, 1 + s] either way.
    grey = torch.tensor([0.299, 0.587, 0.114])
    ratio = torch.einsum("nchw,c->n", _pixels(jittered), grey) / torch.einsum("nchw,c->n", _pixels(plain), grey)
    assert float(ratio.min()) > 1 - strength - 0.02 and float(ratio.max()) < 1 + strength + 0.02
    brightness, _, _ = jitter_factors(_rows(train, TrainAugment(color_jitter=strength))[:, 5:8].T, strength)
    assert np.corrcoef(ratio.numpy(), brightness)[0, 1] > 0.9


def test_color_jitter_matches_torchvision_with_our_factors(tmp_path):
    """On colours that never clip, ours equals torchvision's adjust_brightness → contrast → saturation."""
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(8):
            coarse = Image.fromarray(rng.uniform(100, 150, (4, 4, 3)).astype(np.uint8))
            coarse.resize((48, 48), Image.BICUBIC).save(tmp_path / c / f"{i}.png")
    source = scan_image_folder(tmp_path)
    strength = 0.4
    plain = _epoch(_loader(source, TrainAugment(), batch_size=16))
    ours = _pixels(_epoch(_loader(source, TrainAugment(color_jitter=strength), batch_size=16)))
    factors = jitter_factors(_rows(source, TrainAugment(color_jitter=strength), batch_size=16)[:, 5:8].T, strength)
    reference = []
    for image, (b, c, s) in zip(_pixels(plain) / 255, zip(*factors)):
        image = TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, float(b)), float(c)), float(s))
        reference.append(image * 255)
    error = (ours - torch.stack(reference)).abs()
    assert float(error.max()) < 1.0, "more than uint8 rounding away from torchvision"
    assert float((ours - _pixels(plain)).abs().mean()) > 5  # and the jitter is really there


def test_gpu_contrast_formula_matches_the_cpu_op():
    """The arithmetic path that mixed decoding takes (centre on the GPU) equals fn.brightness_contrast here."""
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (int(h), 20, 3), dtype=np.uint8) for h in rng.integers(10, 30, size=8)]
    factors = [rng.uniform(0.5, 1.5, size=2).astype(np.float32) for _ in range(8)]

    @pipeline_def(batch_size=8, num_threads=1, device_id=None)
    def both_paths():
        x, f = fn.external_source(
            source=lambda: (images, factors), num_outputs=2, batch=True, layout=["HWC", ""], dtype=[types.UINT8, types.FLOAT]
        )
        return tuple(_brightness_contrast(x, f[0], f[1], centre_as_argument=path) for path in (True, False))

    pipe = both_paths()
    op, arithmetic = pipe.run()
    for a, b in zip(op, arithmetic):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_rand_augment_applies_the_op_our_draws_pick(train, plain):
    aug = TrainAugment(rand_augment_layers=1, rand_augment_magnitude=9)
    augmented = _epoch(_loader(train, aug))
    _assert_sane(augmented)
    ops = rand_augment_ops()
    picked = np.minimum(np.floor(_rows(train, aug)[:, 5] * len(ops)), len(ops) - 1).astype(int)
    identity = picked == [op.name for op in ops].index("identity")
    changed = (augmented != plain).flatten(1).any(1).numpy()
    assert identity.any() and not changed[identity].any()  # the same crop, untouched
    assert changed[~identity].mean() > 0.8  # a few ops can be no-ops on some images (auto_contrast)


def test_resume_with_both_augmentations_is_bit_identical(train, plain):
    aug = TrainAugment(color_jitter=0.4, rand_augment_layers=2, rand_augment_magnitude=9)
    straight = _loader(train, aug)
    reference = [b for e in range(2) for b in straight.epoch_batches(e)]
    assert not torch.equal(torch.cat([x for x, _ in reference[:12]]), plain)
    resumed = _loader(train, aug)
    resumed.load_state_dict({"epoch": 0, "batch": 7, "seed": SEED, "num_samples": 96, "world_size": 1})
    tail = [b for e in range(2) for b in resumed.epoch_batches(e)]
    assert len(tail) == len(reference) - 7
    for (x, y), (rx, ry) in zip(tail, reference[7:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
        _assert_sane(x)
    # seek() is the same position by another door.
    sought = _loader(train, aug)
    sought.seek(1, 3)
    assert torch.equal(next(sought.epoch_batches(1))[0], reference[12 + 3][0])


@pytest.mark.parametrize(
    "bad", [dict(color_jitter=-0.1), dict(rand_augment_layers=-1), dict(rand_augment_magnitude=31)]
)
def test_bad_settings_are_clear_errors(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainAugment(**bad)
