"""Colour jitter and RandAugment in the DALI train pipeline: off by default, driven by our draws, exact on resume."""

from __future__ import annotations

import math

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
    _rand_augment,
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


# What torchvision's RandAugment does with each op at a (signed) magnitude: its `_apply_op`, on a uint8
# CHW tensor of height h and width w, nearest-neighbour warps filled with grey 128.
def _torchvision_op(name: str, m: float, image: torch.Tensor) -> torch.Tensor:
    h, w = image.shape[-2:]
    nearest, grey = TF.InterpolationMode.NEAREST, [128.0] * 3
    warp = dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, 0.0], interpolation=nearest, fill=grey)
    return {
        "translate_x": lambda: TF.affine(image, **{**warp, "translate": [m * w, 0]}),
        "translate_y": lambda: TF.affine(image, **{**warp, "translate": [0, m * h]}),
        "shear_x": lambda: TF.affine(image, **{**warp, "shear": [math.degrees(math.atan(m)), 0.0]}, center=[0, 0]),
        "shear_y": lambda: TF.affine(image, **{**warp, "shear": [0.0, math.degrees(math.atan(m))]}, center=[0, 0]),
        "rotate": lambda: TF.rotate(image, m, interpolation=nearest, fill=grey),
        "brightness": lambda: TF.adjust_brightness(image, 1 + m),
        "contrast": lambda: TF.adjust_contrast(image, 1 + m),
        "color": lambda: TF.adjust_saturation(image, 1 + m),
        "sharpness": lambda: TF.adjust_sharpness(image, 1 + m),
        "posterize": lambda: TF.posterize(image, int(round(m))),
        "solarize": lambda: image if m > 255 else TF.solarize(image, m),
        "equalize": lambda: TF.equalize(image),
        "auto_contrast": lambda: TF.autocontrast(image),
        "identity": lambda: image,
    }[name]()


def _test_card(height: int = 160, width: int = 224) -> np.ndarray:
    """Smooth gradients in three directions, a red block and a small patch of noise: every op changes it
    in a way that shows (sharpness on the patch), and where nearest-neighbour sampling rounds a
    half-pixel position the other way only edges and the patch notice."""
    y, x = np.mgrid[0:height, 0:width]
    card = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1)
    card[40:80, 60:120] = [250, 30, 30]
    card[100:124, 150:174] = np.random.default_rng(0).integers(0, 256, (24, 24, 3))
    return card.astype(np.uint8)


@pytest.mark.parametrize("magnitude_bin", [9, 20])
def test_rand_augment_ops_match_torchvisions_functions(magnitude_bin):
    """Each op of our RandAugment, picked and signed by our draws, against torchvision's function at the
    same magnitude: same direction, centre, fill and strength. Where the implementations differ by
    design it is named: DALI's shears lean the other way for the same sign (one distribution, as every
    sign is drawn symmetric), its sharpness filters the 1-pixel border that PIL leaves alone, and its
    equalize follows OpenCV's formula rather than PIL's."""
    card = _test_card()
    height, width = card.shape[:2]
    ops = rand_augment_ops()
    cases = [(k, negate) for k, op in enumerate(ops) for negate in ((False, True) if op.randomly_negate else (False,))]
    draws = [np.array([(k + 0.5) / len(ops), 0.25 if negate else 0.75], np.float32) for k, negate in cases]

    @pipeline_def(batch_size=len(cases), num_threads=1, device_id=None, enable_conditionals=True)
    def augmented():
        images, rows, size = fn.external_source(
            source=lambda: ([card] * len(cases), draws, [np.array([height, width], np.float32)] * len(cases)),
            num_outputs=3, batch=True, layout=["HWC", "", ""], dtype=[types.UINT8, types.FLOAT, types.FLOAT],
        )
        return _rand_augment(images, rows, 0, layers=1, magnitude=magnitude_bin, size=size)

    pipe = augmented()
    pipe.build()
    outputs = pipe.run()[0]
    image = torch.from_numpy(card).permute(2, 0, 1)
    checked = set()
    for (k, negate), ours in zip(cases, outputs):
        op, ours = ops[k], np.asarray(ours).astype(int)
        lo, hi = op.mag_range or (0, 0)
        m = (lo + (hi - lo) * magnitude_bin / 30) * (-1 if negate else 1)
        if op.name in ("shear_x", "shear_y"):
            m = -m
        reference = _torchvision_op(op.name, m, image).permute(1, 2, 0).numpy().astype(int)
        error = np.abs(ours - reference)
        where = f"{op.name} at magnitude {m:+.3f}"
        if op.name in ("translate_x", "translate_y", "shear_x", "shear_y", "rotate"):
            # Nearest-neighbour sampling: a pixel one over, where the two round a position differently.
            assert (error.max(axis=-1) <= 3).mean() > 0.99, where
        elif op.name == "sharpness":
            assert error[1:-1, 1:-1].max() <= 2, where
        elif op.name == "equalize":  # OpenCV's lookup table against PIL's: a few grey levels apart
            assert error.mean() < 3 and error.max() <= 20, where
        else:
            assert error.max() <= 2, where
        if op.randomly_negate:  # and the sign is the one we say: the other one does not fit
            opposite = _torchvision_op(op.name, -m, image).permute(1, 2, 0).numpy().astype(int)
            assert np.abs(ours - opposite).max() > 10, f"{where}: the opposite magnitude fits as well"
        checked.add(op.name)
    assert checked == {op.name for op in ops}


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
