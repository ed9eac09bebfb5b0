"""Sources, sample order, and the real DALI CPU pipelines; the embedded digits; the loader position moved
to another process count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import (
    write_image_folder,
)
from PIL import Image

from loaders import order
from loaders.dali import EvalLoader, TrainAugment, TrainLoader
from loaders.digits import digits_folder
from loaders.sources import DataError, image_folder_sources, image_folder_splits, scan_image_folder, stratified_split


def test_train_val_layout(tiny_imagenet):
    train, val = image_folder_splits(tiny_imagenet)
    assert len(train) == 96 and len(val) == 24
    assert train.classes == val.classes == ("n01440764", "n01443537", "n01484850")
    assert train.class_counts() == {"n01440764": 32, "n01443537": 32, "n01484850": 32}


def test_single_folder_is_split_stratified_and_seeded(tmp_path):
    root = write_image_folder(tmp_path, {"all": 10})
    train, val = image_folder_splits(root / "all", val_fraction=0.2, seed=1)
    assert val.class_counts() == {c: 2 for c in train.classes}
    assert set(train.files).isdisjoint(val.files) and len(train) + len(val) == 30
    again = image_folder_splits(root / "all", val_fraction=0.2, seed=1)[1]
    other = image_folder_splits(root / "all", val_fraction=0.2, seed=2)[1]
    assert again.files == val.files and other.files != val.files


def test_stratified_split_proportions():
    labels = np.repeat(np.arange(4), [100, 50, 10, 3])
    train_idx, val_idx = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[val_idx]).tolist() == [20, 10, 2, 1]
    assert len(np.intersect1d(train_idx, val_idx)) == 0


def test_empty_class_and_val_only_class_are_clear_errors(tmp_path):
    root = write_image_folder(tmp_path, {"train": 2, "val": 1})
    (root / "train" / "n09999999").mkdir()
    with pytest.raises(DataError, match="empty class folders.*n09999999"):
        scan_image_folder(root / "train")
    (root / "train" / "n09999999").rmdir()
    (root / "val" / "n08888888").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "n08888888" / "x.JPEG")
    with pytest.raises(DataError, match="train does not have.*n08888888"):
        image_folder_splits(root)


def test_train_order_is_a_pure_function_sharded_by_rank():
    args = dict(seed=3, epoch=5, world_size=2, batch_size=4)
    a0, a1 = (order.train_order(103, rank=r, **args) for r in (0, 1))
    assert np.array_equal(a0, order.train_order(103, rank=0, **args))
    assert len(a0) == len(a1) == 48  # 51 per rank, 12 whole batches of 4
    assert len(np.intersect1d(a0, a1)) == 0
    assert not np.array_equal(a0, order.train_order(103, rank=0, **{**args, "epoch": 6}))
    assert not np.array_equal(a0, order.train_order(103, rank=0, **{**args, "seed": 4}))


@pytest.mark.parametrize(("n", "world", "batch"), [(24, 2, 5), (7, 2, 4), (10, 3, 3), (1, 2, 8)])
def test_eval_order_counts_every_sample_once(n, world, batch):
    shards = [order.eval_order(n, rank=r, world_size=world, batch_size=batch) for r in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) % batch == 0  # same batch count: no hang
    real = np.concatenate([s[s >= 0] for s in shards])
    assert sorted(real.tolist()) == list(range(n))


def _loader(source, **kw) -> TrainLoader:
    args = dict(batch_size=8, seed=11, res_px_for_epoch=lambda e: 32, decode_device="cpu", num_threads=1)
    args.update(kw)
    return TrainLoader(source, **args)


def test_train_batches_shapes_labels_and_resolution_schedule(tiny_imagenet):
    train, _ = image_folder_splits(tiny_imagenet)
    loader = _loader(train, res_px_for_epoch=lambda e: 32 + 8 * e)
    assert loader.batches_per_epoch == 12
    for epoch in range(3):
        batches = list(loader.epoch_batches(epoch))
        assert len(batches) == 12
        images, labels = batches[0]
        assert images.shape == (8, 3, 32 + 8 * epoch, 32 + 8 * epoch) and images.dtype == torch.float32
        assert labels.dtype == torch.int64
        seen = torch.cat([b[1] for b in batches])
        expected = train.labels[order.train_order(96, seed=11, epoch=epoch, rank=0, world_size=1, batch_size=8)]
        assert seen.tolist() == expected.tolist()
        # Normalised with ImageNet mean/std: values centre near 0, not in 0..255.
        assert -3 < float(images.mean()) < 3 and float(images.abs().max()) < 5


def test_resume_mid_epoch_gives_identical_pixels(tiny_imagenet):
    train, _ = image_folder_splits(tiny_imagenet)
    straight = _loader(train)
    reference = [b for e in range(2) for b in straight.epoch_batches(e)]
    resumed = _loader(train)
    state = {"epoch": 0, "batch": 7, "seed": 11, "num_samples": 96, "world_size": 1}
    resumed.load_state_dict(state)
    tail = [b for e in range(2) for b in resumed.epoch_batches(e)]
    assert len(tail) == len(reference) - 7
    for (x, y), (rx, ry) in zip(tail, reference[7:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_position_in_state_dict_points_at_next_batch(tiny_imagenet):
    train, _ = image_folder_splits(tiny_imagenet)
    loader = _loader(train)
    it = loader.epoch_batches(0)
    next(it), next(it)
    assert loader.state_dict()["batch"] == 2
    with pytest.raises(ValueError, match="Resume with the same data and seed"):
        _loader(train, seed=12).load_state_dict(loader.state_dict())


def test_full_crop_and_forced_flip_match_a_flipped_resize(tmp_path):
    """crop_scale (1,1), ratio (1,1) on square images is the whole image; hflip_prob 1 always flips."""
    root = tmp_path / "sq"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            pixels = np.kron(rng.integers(0, 255, (8, 8, 3)), np.ones((8, 8, 1))).astype(np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")  # lossless: decoders agree exactly
    source = scan_image_folder(root)
    aug = TrainAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_prob=1.0)
    train = _loader(source, batch_size=8, augment=aug, res_px_for_epoch=lambda e: 64)
    evaluate = EvalLoader(source, batch_size=8, res_px=64, crop_fraction=1.0, decode_device="cpu", num_threads=1)
    (x, y), = list(train.epoch_batches(0))
    (ex, ey), = list(evaluate)
    ids = order.train_order(8, seed=11, epoch=0, rank=0, world_size=1, batch_size=8)
    for row, sample in enumerate(ids):
        assert torch.allclose(x[row], ex[sample].flip(-1), atol=1e-4)


def test_eval_matches_a_pil_reference(tmp_path):
    rng = np.random.default_rng(1)
    (tmp_path / "a").mkdir()
    for i in range(8):  # smooth images of varied shapes: resamplers agree on them
        w, h = (int(v) for v in rng.integers(40, 120, size=2))
        coarse = Image.fromarray(rng.integers(0, 255, (5, 5, 3)).astype(np.uint8))
        coarse.resize((w, h), Image.BICUBIC).save(tmp_path / "a" / f"{i}.png")
    val = scan_image_folder(tmp_path)
    loader = EvalLoader(val, batch_size=8, res_px=32, crop_fraction=0.875, decode_device="cpu", num_threads=1)
    images, labels = next(iter(loader))
    assert labels.tolist() == [0] * 8
    mean = np.array([0.485, 0.456, 0.406]) * 255
    std = np.array([0.229, 0.224, 0.225]) * 255
    for row in range(8):
        pil = Image.open(val.files[row]).convert("RGB")
        short = int(32 / 0.875)
        w, h = pil.size
        scale = short / min(w, h)
        pil = pil.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR)
        resized = np.asarray(pil, np.float32)
        ours = images[row].permute(1, 2, 0).numpy()
        # A centre offset of x.5 px rounds either way (DALI rounds half up, torchvision to even).
        (dy, dx) = ((resized.shape[0] - 32) / 2, (resized.shape[1] - 32) / 2)
        error = min(
            np.abs(ours - (resized[t : t + 32, s : s + 32] - mean) / std).mean()
            for t in {math.floor(dy), math.ceil(dy)}
            for s in {math.floor(dx), math.ceil(dx)}
        )
        assert error < 0.05, f"image {row}: mean abs error {error:.3f} against PIL"
        off_centre = np.abs(ours - (resized[:32, :32] - mean) / std).mean()
        if dy >= 2 or dx >= 2:
            assert error < 0.5 * off_centre


def test_eval_loader_pads_with_minus_one_labels(tiny_imagenet):
    _, val = image_folder_splits(tiny_imagenet)
    shards = [
        EvalLoader(val, batch_size=5, rank=r, world_size=2, res_px=32, decode_device="cpu", num_threads=1)
        for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 3
    labels = [torch.cat([y for _, y in s]) for s in shards]
    real = torch.cat([y[y >= 0] for y in labels])
    assert len(real) == 24
    assert sorted(real.tolist()) == sorted(val.labels.tolist())
    # Two passes give the same batches (the pipeline is reused across epochs).
    again = torch.cat([y for _, y in shards[0]])
    assert torch.equal(again, labels[0])


def test_decode_device_auto_is_cpu_without_cuda_and_mixed_needs_a_gpu():
    from loaders.dali import resolve_decode_device

    assert not torch.cuda.is_available()
    assert resolve_decode_device("auto") == "cpu"
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_decode_device("mixed")


def test_channels_last_output_is_a_free_view(tiny_imagenet):
    train, _ = image_folder_splits(tiny_imagenet)
    images, _ = next(_loader(train, channels_last=True).epoch_batches(0))
    assert images.shape == (8, 3, 32, 32)
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_crop_windows_follow_torchvision_random_resized_crop():
    """Aspect within bounds, inside the image, mean area like torchvision's sampler (rejection, not
    clamping), and the centred fallback for images no try fits."""
    from loaders.dali import crop_windows

    rng = np.random.default_rng(0)
    aug = TrainAugment()
    draws = rng.random((20000, 5 + 18)).astype(np.float32)
    height, width = np.full(20000, 350), np.full(20000, 400)
    x0, y0, w, h = crop_windows(draws, height, width, aug).T.astype(np.float64)
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x0 + w <= width + 1e-3).all() and (y0 + h <= height + 1e-3).all()
    assert ((w / h >= 0.75 - 1e-4) & (w / h <= 4 / 3 + 1e-4)).all()
    assert 0.45 < float((w * h / (height * width)).mean()) < 0.50  # torchvision: ~0.47 here
    # A 1000x50 strip: no try fits, so the largest centred 4:3 crop.
    (fx, fy, fw, fh), = crop_windows(draws[:1], np.array([50]), np.array([1000]), aug)
    assert (fw, fh) == pytest.approx((50 * 4 / 3, 50)) and fx == pytest.approx((1000 - fw) / 2)


def test_encoded_size_reads_headers(tmp_path):
    from loaders.headers import read_header

    def encoded_size(data):  # (height, width) as stored, from the header alone
        header = read_header(data)
        return header.height, header.width

    for suffix, size in ((".jpg", (37, 81)), (".png", (64, 20)), (".webp", (10, 12))):
        path = tmp_path / f"x{suffix}"
        Image.new("RGB", (size[1], size[0]), (9, 99, 199)).save(path)
        assert encoded_size(np.fromfile(path, dtype=np.uint8)) == size
    progressive = tmp_path / "p.jpg"
    Image.new("RGB", (300, 200)).save(progressive, progressive=True)
    assert encoded_size(np.fromfile(progressive, dtype=np.uint8)) == (200, 300)


def test_loader_position_moves_to_another_process_count_without_losing_samples(tiny_imagenet):
    train, _ = image_folder_splits(tiny_imagenet)
    loader = lambda world, **kw: TrainLoader(train, batch_size=8, seed=3, world_size=world, decode_device="cpu", **kw)  # noqa: E731
    two = loader(2)
    two.seek(1, 2)  # both ranks trained 2 batches of epoch 1: 32 images
    one = loader(1)
    one.load_state_dict(two.state_dict())
    assert (one.epoch, one.batch) == (1, 4)
    trained = {int(i) for rank in (0, 1) for i in order.train_order(96, seed=3, epoch=1, rank=rank, world_size=2, batch_size=8)[:16]}
    rest = order.train_order(96, seed=3, epoch=1, rank=0, world_size=1, batch_size=8)[32:]
    assert trained.isdisjoint(rest.tolist()) and len(trained) + len(rest) == 96  # each image once in the epoch
    # 56 images on 1 process: 2 processes accumulating 2 batches per update go on after 32 of them
    # (3 batches of 16 would end mid-update; an image may be seen again, none is skipped).
    one.seek(1, 7)
    again = loader(2, rank=1, batch_multiple=2)
    again.load_state_dict(one.state_dict())
    assert (again.epoch, again.batch) == (1, 2)
    assert loader(1).state_dict()["batch_size"] == 8  # what a later resume converts from


def test_digits_are_written_once_as_a_jpeg_image_folder(tmp_path):
    folder = digits_folder(tmp_path)
    files = sorted(folder.rglob("*.jpg"))
    assert len(files) == 1797 and sorted(p.name for p in folder.iterdir()) == [str(d) for d in range(10)]
    stamp = files[0].stat().st_mtime_ns
    assert digits_folder(tmp_path) == folder and files[0].stat().st_mtime_ns == stamp  # cached
    train, val = image_folder_splits(folder, val_fraction=0.2, seed=0)
    assert (len(train), len(val)) == (1438, 359)
    assert all(135 <= n <= 150 for n in train.class_counts().values())  # 80% of ~180 per class
    # data.test_fraction: a stratified test split taken from the training images, val unchanged.
    smaller, same_val, test = image_folder_sources(folder, val_fraction=0.2, test_fraction=0.1, seed=0)
    assert same_val.files == val.files and len(smaller) + len(test) == 1438
    assert set(test.files) <= set(train.files) and all(17 <= n <= 19 for n in test.class_counts().values())
