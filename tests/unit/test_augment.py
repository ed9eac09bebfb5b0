"""Colour jitter, RandAugment and the photo augmentations (rotation, vertical flip, hue, blur, noise, AutoAugment,
TrivialAugment) in the DALI train pipeline: off by default, driven by our draws, exact on resume."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as F2
from accelerate import Accelerator
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from loaders import IMAGENET_MEAN, IMAGENET_STD, order
from loaders.dali import (
    TrainAugment,
    TrainLoader,
    _brightness_contrast,
    _rand_augment,
    augment_draws,
    draw_columns,
    imagenet_policy_stages,
    jitter_factors,
    rand_augment_ops,
    trivial_augment_ops,
)
from loaders.sources import image_folder_splits, scan_image_folder
from trainer.data import Splits
from trainer.loop import build_loaders
from trainer.recipe import Data, Phase, Recipe, RecipeError

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


# -- the photo augmentations: rotation, vertical flip, hue, blur, noise, AutoAugment / TrivialAugment ------

EVERY_PHOTO_AUGMENTATION = dict(
    color_jitter=0.4, hue=0.1, rotate_deg=15, vflip_prob=0.5, blur_prob=0.5, noise_std=0.05, auto_augment="imagenet"
)


@pytest.fixture(scope="module")
def smooth(tmp_path_factory):
    """16 smooth images whose colours stay inside 100..150, so no op here clips them."""
    root = tmp_path_factory.mktemp("smooth")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(8):
            coarse = Image.fromarray(rng.uniform(100, 150, (4, 4, 3)).astype(np.uint8))
            coarse.resize((48, 48), Image.BICUBIC).save(root / c / f"{i}.png")
    return scan_image_folder(root)


@pytest.fixture(scope="module")
def smooth_plain(smooth) -> torch.Tensor:
    """The plain pixels (0..255, exact integers) of `smooth` at 48 px, not mirrored."""
    return _smooth_epoch(smooth, TrainAugment())[0].round()


def _smooth_epoch(smooth, aug: TrainAugment) -> tuple[torch.Tensor, np.ndarray]:
    """`aug`'s pixels of `smooth` at 48 px, and each output's draws. Without the horizontal flip, which
    comes last: a mirrored rotation is the mirrored image's rotation the other way."""
    aug = dataclasses.replace(aug, hflip_prob=0.0)
    pixels = _pixels(_epoch(_loader(smooth, aug, batch_size=16, res_px_for_epoch=lambda e: 48)))
    return pixels, _rows(smooth, aug, batch_size=16)


def test_photo_augmentations_off_leave_draws_and_pixels_as_they_were(train, plain):
    aug = TrainAugment()
    assert (aug.hue, aug.rotate_deg, aug.vflip_prob, aug.blur_prob, aug.noise_std, aug.auto_augment) == (0, 0, 0, 0, 0, "")
    # Each one switched on adds its own columns after jitter and RandAugment's: theirs and the crops' stay.
    before = augment_draws(96, seed=SEED, epoch=0, aug=TrainAugment(color_jitter=0.4, rand_augment_layers=2))
    photo = dict(EVERY_PHOTO_AUGMENTATION, auto_augment="", rand_augment_layers=2)
    every = augment_draws(96, seed=SEED, epoch=0, aug=TrainAugment(**photo))
    assert every.shape == (96, 5 + 3 + 4 + 1 + 1 + 1 + 2 + 3 + 18)
    assert np.array_equal(every[:, :12], before[:, :12]) and np.array_equal(every[:, -18:], before[:, -18:])
    policy = augment_draws(96, seed=SEED, epoch=0, aug=TrainAugment(auto_augment="trivial"))
    assert policy.shape == (96, 5 + 3 + 18) and np.array_equal(policy[:, :5], before[:, :5])
    # Zero means no op in the graph: the settings that only shape an op (blur_sigma) change nothing alone.
    off = TrainAugment(hue=0.0, rotate_deg=0.0, vflip_prob=0.0, blur_prob=0.0, blur_sigma=(3.0, 5.0), noise_std=0.0)
    assert torch.equal(_epoch(_loader(train, off)), plain)


def test_vflip_flips_the_samples_our_draws_pick(train, plain):
    aug = TrainAugment(vflip_prob=0.5)
    flipped = _epoch(_loader(train, aug))
    chosen = torch.from_numpy(_rows(train, aug)[:, draw_columns(aug)["vflip"]] < 0.5)
    assert 0.3 < chosen.float().mean() < 0.7
    assert torch.equal(flipped[chosen], F2.vflip(plain[chosen])) and torch.equal(flipped[~chosen], plain[~chosen])


def test_rotation_matches_torchvisions_rotate(smooth, smooth_plain):
    """Nearest-neighbour, corners grey 128, counter-clockwise for a positive angle, as F2.rotate (and
    torchvision's RandomRotation). Where the two round a half-pixel position differently a pixel comes
    from its neighbour (none did on DALI 2.4: the pixels are equal)."""
    aug = TrainAugment(rotate_deg=30)
    ours, rows = _smooth_epoch(smooth, aug)
    angles = (rows[:, draw_columns(aug)["rotate"]] * 2 - 1) * 30
    assert angles.min() < -10 and angles.max() > 10
    nearest, grey = F2.InterpolationMode.NEAREST, [128.0] * 3
    for image, angle, result in zip(smooth_plain.to(torch.uint8), angles, ours):
        error = (result - F2.rotate(image, float(angle), interpolation=nearest, fill=grey).float()).abs().amax(0)
        assert (error == 0).float().mean() > 0.99 and float(error.mean()) < 0.1, f"{angle:+.1f} degrees"
        if abs(angle) > 5:  # and the direction is the one we say: the other one does not fit
            opposite = F2.rotate(image, -float(angle), interpolation=nearest, fill=grey).float()
            assert float((result - opposite).abs().amax(0).mean()) > 5


def test_hue_matches_torchvisions_adjust_hue_alone_and_after_the_jitter(smooth, smooth_plain):
    strength, hue = 0.4, 0.3
    aug = TrainAugment(hue=hue)
    ours, rows = _smooth_epoch(smooth, aug)
    shifts = (rows[:, draw_columns(aug)["hue"]] * 2 - 1) * hue
    reference = torch.stack([F2.adjust_hue(x / 255, float(h)) * 255 for x, h in zip(smooth_plain, shifts)])
    assert float((ours - reference).abs().max()) < 0.05  # float throughout: no rounding on either side
    assert float((ours - smooth_plain).abs().mean()) > 3  # and the shift is really there
    # Inside the colour jitter: torchvision's ColorJitter order, brightness, contrast, saturation, hue.
    aug = TrainAugment(color_jitter=strength, hue=hue)
    ours, rows = _smooth_epoch(smooth, aug)
    factors = jitter_factors(rows[:, 5:8].T, strength)
    shifts = (rows[:, draw_columns(aug)["hue"]] * 2 - 1) * hue
    reference = []
    for image, b, c, s, h in zip(smooth_plain / 255, *factors, shifts):
        image = F2.adjust_saturation(F2.adjust_contrast(F2.adjust_brightness(image, float(b)), float(c)), float(s))
        reference.append(F2.adjust_hue(image, float(h)) * 255)
    # Brightness-contrast rounds to uint8 (test_color_jitter_matches_torchvision_with_our_factors: < 1 level);
    # the hue, read from differences of channels, can double that rounding.
    error = (ours - torch.stack(reference)).abs()
    assert float(error.max()) < 2.5 and float(error.mean()) < 0.3, "more than uint8 rounding away from torchvision"


def test_blur_matches_torchvisions_gaussian_blur_on_the_samples_our_draws_pick(smooth, smooth_plain):
    aug = TrainAugment(blur_prob=0.5, blur_sigma=(0.5, 2.5))
    ours, rows = _smooth_epoch(smooth, aug)
    first = draw_columns(aug)["blur"]
    chosen = rows[:, first] < 0.5
    assert 0 < chosen.sum() < len(chosen)
    for image, blurred, u, result in zip(smooth_plain.to(torch.uint8), chosen, rows[:, first + 1], ours):
        if not blurred:
            assert torch.equal(result.round(), image.float())
            continue
        sigma = 0.5 + float(u) * 2.0
        window = 2 * math.ceil(3 * sigma) + 1
        reference = F2.gaussian_blur(image, [window, window], [sigma, sigma]).float()
        assert float((result - reference).abs().max()) <= 1, f"sigma {sigma:.2f}"
        assert float((result - image.float()).abs().max()) >= 1


def test_noise_has_the_asked_spread_differs_per_sample_and_per_epoch(smooth, smooth_plain):
    std = 0.05
    aug = TrainAugment(noise_std=std)
    ours, _ = _smooth_epoch(smooth, aug)
    noise = ours - smooth_plain  # the colours stay inside 100..150: nothing clipped
    assert noise.std(dim=(1, 2, 3)).sub(255 * std).abs().max() < 0.05 * 255 * std
    assert noise.mean(dim=(1, 2, 3)).abs().max() < 1.0
    flat = noise.flatten(1)
    assert abs(float(torch.corrcoef(flat[:2])[0, 1])) < 0.05  # two samples' noise: unrelated
    neighbours = torch.corrcoef(torch.stack([noise[:, :, :, :-1].flatten(), noise[:, :, :, 1:].flatten()]))[0, 1]
    assert abs(float(neighbours)) < 0.05  # white: neighbouring pixels unrelated
    later = _pixels(next(_loader(smooth, aug, batch_size=16, res_px_for_epoch=lambda e: 48).epoch_batches(1))[0])
    assert not torch.allclose(later, ours)  # another epoch, other noise (and crops)


@pytest.mark.parametrize("policy", ["imagenet", "trivial"])
def test_auto_augment_applies_what_our_draws_pick(train, plain, policy):
    aug = TrainAugment(auto_augment=policy)
    augmented = _epoch(_loader(train, aug))
    _assert_sane(augmented)
    rows = _rows(train, aug)[:, draw_columns(aug)["auto_augment"] :]
    if policy == "trivial":
        ops = trivial_augment_ops()
        untouched = np.minimum(np.floor(rows[:, 0] * len(ops)), len(ops) - 1) == [op.name for op in ops].index("identity")
    else:
        table, _, _, chance, _ = imagenet_policy_stages()
        sub = np.minimum(np.floor(rows[:, 0] * len(table.sub_policies)), len(table.sub_policies) - 1).astype(int)
        untouched = (rows[:, 1:3] >= chance[sub]).all(axis=1)  # neither stage of the sub-policy runs
    changed = (augmented != plain).flatten(1).any(1).numpy()
    assert untouched.any() and not changed[untouched].any()
    assert changed[~untouched].mean() > 0.7  # some ops leave some images as they were (a 0-degree rotation)


def test_resume_with_every_photo_augmentation_is_bit_identical(train, plain):
    aug = TrainAugment(**EVERY_PHOTO_AUGMENTATION)
    straight = _loader(train, aug)
    reference = [b for e in range(2) for b in straight.epoch_batches(e)]
    assert (torch.cat([x for x, _ in reference[:12]]) != plain).flatten(1).any(1).all()
    resumed = _loader(train, aug)
    resumed.load_state_dict({"epoch": 0, "batch": 7, "seed": SEED, "num_samples": 96, "world_size": 1})
    tail = [b for e in range(2) for b in resumed.epoch_batches(e)]
    assert len(tail) == len(reference) - 7
    for (x, y), (rx, ry) in zip(tail, reference[7:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
        _assert_sane(x)


def test_a_samples_augmentation_does_not_depend_on_the_number_of_processes(train):
    aug = TrainAugment(**dict(EVERY_PHOTO_AUGMENTATION, auto_augment=""))
    alone = _epoch(_loader(train, aug))
    alone_ids = order.train_order(96, seed=SEED, epoch=0, rank=0, world_size=1, batch_size=8)
    second = _epoch(_loader(train, aug, rank=1, world_size=2))
    second_ids = order.train_order(96, seed=SEED, epoch=0, rank=1, world_size=2, batch_size=8)
    where = {int(i): k for k, i in enumerate(alone_ids)}
    assert torch.equal(second, alone[[where[int(i)] for i in second_ids]])


@pytest.mark.parametrize(
    "bad",
    [
        dict(hue=0.6), dict(rotate_deg=-5), dict(rotate_deg=200), dict(vflip_prob=1.5), dict(blur_prob=-0.1),
        dict(blur_sigma=(0.0, 1.0)), dict(blur_sigma=(2.0, 1.0)), dict(noise_std=-0.1), dict(noise_std=2.0),
        dict(auto_augment="rand"), dict(auto_augment="trivial", rand_augment_layers=2),
    ],
)
def test_bad_photo_settings_are_clear_errors_in_the_loader_and_the_recipe(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainAugment(**bad)
    with pytest.raises(RecipeError, match=f"phase 'main': .*{next(iter(bad))}"):
        Phase(**bad)


def test_the_phase_hands_every_photo_setting_to_the_loader(train, tiny_imagenet):
    phase = Phase(batch_size_per_device=8, **EVERY_PHOTO_AUGMENTATION, blur_sigma=(0.3, 1.5))
    recipe = Recipe(name="photo", phases=(phase,), data=Data(path=str(tiny_imagenet), decode_device="cpu"))
    val = image_folder_splits(tiny_imagenet)[1]
    loader, _ = build_loaders(recipe, phase, 0, Splits(train, val), Accelerator(cpu=True))
    for name in [*EVERY_PHOTO_AUGMENTATION, "blur_sigma"]:
        assert getattr(loader.augment, name) == getattr(phase, name), name
