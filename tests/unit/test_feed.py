"""The train loader's feed: arrays per batch (DALI reads the files), the same pixels fresh or resumed,
ROI and whole-image decoding, the "auto" pre-flight, recovery from files broken after the check, and
which decoder the suspects of a decode error are tried on."""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bad_files import encoded, photo
from conftest import CLASSES

import loaders.dali as dali
from loaders import recovery
from loaders.dali import TrainLoader, _build_train_pipeline, decoder_args, preflight_decode
from loaders.recovery import SampleGuard, decode_failures
from loaders.screening import screen
from loaders.sources import ImageFolderSource, image_folder_splits, scan_image_folder

_MIXED_ONLY = ("device_memory_padding", "host_memory_padding", "preallocate_width_hint", "preallocate_height_hint", "hw_decoder_load")


def _loader(source, **kw) -> TrainLoader:
    args = dict(batch_size=8, seed=11, res_px_for_epoch=lambda e: 32, decode_device="cpu", num_threads=1, decode_mode="roi")
    args.update(kw)
    return TrainLoader(source, **args)


def test_feed_hands_arrays_and_never_reads_a_file(tiny_imagenet, monkeypatch):
    train = screen(image_folder_splits(tiny_imagenet)[0], "train")
    assert train.sizes.shape == (len(train), 2)  # the check kept every file's size
    reads = []
    real_read = ImageFolderSource.read
    monkeypatch.setattr(ImageFolderSource, "read", lambda self, i: reads.append(i) or real_read(self, i))
    loader = _loader(train)
    loader._start = (0, 0)
    paths, floats = loader._feed(SimpleNamespace(iteration=3))
    # One array per output (DALI copies one buffer, not one per sample): NUL-padded paths for DALI's file
    # reader, and float32 rows of (label, path length, output size, crop window, draws).
    chosen = loader._epoch_tables(0).indices[24:32]
    assert paths.dtype == np.uint8 and paths.ndim == 2
    assert floats.dtype == np.float32 and floats.flags.c_contiguous and floats.shape[0] == 8
    labels, lengths = floats[:, 0].astype(np.int64), floats[:, 1].astype(np.int64)
    assert [bytes(p[:n]).decode() for p, n in zip(paths, lengths)] == [train.files[i] for i in chosen]
    assert not paths[np.arange(paths.shape[1]) >= lengths[:, None]].any()
    assert labels.tolist() == train.labels[chosen].tolist()
    assert (floats[:, 2:4] == 32).all()  # the epoch's resolution
    windows = floats[:, 4:8]  # (x0, y0, w, h) inside each stored image
    assert (windows[:, :2] >= 0).all() and (windows[:, :2] + windows[:, 2:] <= train.sizes[chosen][:, ::-1] + 1e-3).all()
    batches = list(zip(range(3), loader.epoch_batches(0)))
    assert len(batches) == 3 and reads == []  # no sample read on the training thread


@pytest.mark.parametrize("decode_mode", ["roi", "full"])
def test_feed_blocks_hold_the_rows_of_the_whole_epoch(tiny_imagenet, monkeypatch, decode_mode):
    """The crop windows and paths are made block by block (`FEED_BLOCK_ROWS`): with blocks of two batches,
    every batch of two epochs is the one a single block for the whole epoch gives."""
    train = screen(image_folder_splits(tiny_imagenet)[0], "train")
    whole = _loader(train, decode_mode=decode_mode)
    monkeypatch.setattr(dali, "FEED_BLOCK_ROWS", 16)
    blocked = _loader(train, decode_mode=decode_mode)
    assert whole._block_rows >= len(train) and blocked._block_rows == 16
    for loader in (whole, blocked):
        loader._start = (0, 0)
    for iteration in range(2 * whole.batches_per_epoch):
        (paths_a, floats_a), (paths_b, floats_b) = (loader._feed(SimpleNamespace(iteration=iteration)) for loader in (whole, blocked))
        assert np.array_equal(floats_a, floats_b)
        lengths = floats_a[:, 1].astype(np.int64)
        assert [bytes(p[:n]) for p, n in zip(paths_a, lengths)] == [bytes(p[:n]) for p, n in zip(paths_b, lengths)]
    assert len(blocked._tables.blocks) <= 2  # the blocks behind the feed are let go


def test_resumed_loader_gives_the_pixels_of_a_fresh_one(tiny_imagenet):
    """A fresh loader on the screened source (sizes from the check) and one resumed at (epoch 1, batch 2) on
    an unscreened one (sizes read from the headers on first use) give the same batches."""
    train, _ = image_folder_splits(tiny_imagenet)
    fresh = _loader(screen(train, "train"))
    straight = [b for e in range(2) for _, b in zip(range(4), fresh.epoch_batches(e))]
    resumed = _loader(train)
    resumed.load_state_dict({"epoch": 1, "batch": 2, "seed": 11, "num_samples": 96, "world_size": 1})
    tail = [b for _, b in zip(range(2), resumed.epoch_batches(1))]
    for (x, y), (rx, ry) in zip(tail, straight[6:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_roi_and_full_decoding_give_the_same_crops(tiny_imagenet):
    """"full" resizes the window image_slice would cut, from the whole image: the same pixels but where
    the antialiasing filter reaches past the window's edge (measured: 2-px borders up to 27 grey levels
    on these noise images, ≤ 1 grey level inside, mean 0.2)."""
    train, _ = image_folder_splits(tiny_imagenet)
    grey = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255  # normalised -> grey levels
    roi = [b for _, b in zip(range(4), _loader(train, res_px_for_epoch=lambda e: 40).epoch_batches(0))]
    full = [b for _, b in zip(range(4), _loader(train, res_px_for_epoch=lambda e: 40, decode_mode="full").epoch_batches(0))]
    for (x, y), (fx, fy) in zip(roi, full):
        assert x.shape == fx.shape and torch.equal(y, fy)
        diff = (x - fx).abs() * grey
        assert float(diff[:, :, 2:-2, 2:-2].max()) <= 1.001
        assert float(diff.mean(dim=(1, 2, 3)).max()) <= 1.0


def test_auto_decode_mode_falls_back_to_full_when_the_trial_fails(tmp_path):
    """The trial ROI decode runs in a child process. When it crashes (a signal), fails or overruns while
    whole images decode, the mode is "full", and the line says why; when whole images fail too (bit rot),
    the files are at fault, not ROI decoding: "roi"."""
    good = scan_image_folder(_folder(tmp_path / "good", 2))
    assert preflight_decode(good, "cpu") == ("roi", 'decode_mode auto: "roi" (ROI decoding on the cpu decoder, no trial needed)')
    mode, why = preflight_decode(good, "cpu", trial=True)
    assert mode == "roi" and "passed" in why
    mode, why = preflight_decode(good, "cpu", trial=True, fault="crash")
    assert mode == "full" and "crashed: SIGABRT" in why and "\n" not in why
    mode, why = preflight_decode(good, "cpu", trial=True, timeout_s=0.01)  # both overrun: no case against ROI
    assert mode == "roi" and "took over 0.01 s" in why
    rotten = tmp_path / "rotten" / CLASSES[0]
    rotten.mkdir(parents=True)
    for i in range(2):
        data = bytearray(encoded(photo(i), "PNG"))
        data[len(data) // 2] ^= 0xFF  # inside the IDAT chunk: the header is sound, the data are not
        (rotten / f"{i}.png").write_bytes(bytes(data))
    mode, why = preflight_decode(scan_image_folder(rotten.parent), "cpu", trial=True)
    assert mode == "roi" and "its files, not ROI decoding" in why


def _folder(root, per_class: int):
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(encoded(photo(10 * c + i), "JPEG"))
    return root


def test_files_broken_after_the_check_are_replaced_mid_run(tiny_imagenet, tmp_path, caplog):
    """Deleted, truncated or swapped for a smaller image after the check before training: DALI's read or
    decode fails (the window no longer fits), the file is replaced by the stand-in and the epoch goes on.
    (An image swapped for one that its window still fits is decoded as it is now: nothing reads it first.)"""
    root = tmp_path / "data"
    shutil.copytree(tiny_imagenet / "train", root)
    train = screen(scan_image_folder(root), "train")
    files = [train.files[i] for i in (5, 40, 70)]
    (root / files[0]).unlink()
    (root / files[1]).write_bytes((root / files[1]).read_bytes()[:200])
    (root / files[2]).write_bytes(encoded(photo(0, size=(6, 6)), "JPEG"))  # any crop window overruns it
    with caplog.at_level(logging.WARNING, logger="loaders.recovery"):
        batches = list(_loader(train).epoch_batches(0))
    assert len(batches) == 12 and all(x.shape == (8, 3, 32, 32) for x, _ in batches)
    replaced = " ".join(r.getMessage() for r in caplog.records if "bad training file replaced" in r.getMessage())
    assert all(f in replaced for f in files)


def test_decode_failures_use_the_loader_s_decoder(tiny_imagenet, monkeypatch):
    made = []
    real = recovery._decoder

    def recording(batch_size, num_threads, device="cpu", device_id=None):
        made.append((device, device_id))
        return real(batch_size, num_threads)  # a CPU pipeline stands in for the GPU's on this machine

    monkeypatch.setattr(recovery, "_decoder", recording)
    train, _ = image_folder_splits(tiny_imagenet)
    data = train.read(0)
    assert decode_failures([data]) == {} and made == [("cpu", None)]
    assert decode_failures([data], device="mixed", device_id=1) == {} and made[-1] == ("mixed", 1)
    guard = SampleGuard(train, "training", 0, device="mixed", device_id=0)
    with pytest.raises(RuntimeError, match="a batch failed"):  # none fails alone: not a bad file
        guard.find_undecodable([1, 2], RuntimeError("a batch failed"))
    assert made[-1] == ("mixed", 0)
    assert _loader(train).guard.device == "cpu"


def test_nvjpeg_settings_go_to_the_mixed_decoder_only(monkeypatch):
    assert not set(_MIXED_ONLY) & set(decoder_args("cpu"))
    assert set(_MIXED_ONLY) <= set(decoder_args("mixed")) and decoder_args("mixed")["device"] == "mixed"
    asked = []
    monkeypatch.setattr(dali, "decoder_args", lambda device: asked.append(device) or decoder_args(device))
    for device, mode in (("cpu", "roi"), ("mixed", "full")):
        pipe = _build_train_pipeline(
            lambda info: None, batch_size=2, num_threads=1, device_id=0 if device == "mixed" else None,
            decode_device=device, aug=dali.TrainAugment(), channels_last=False, decode_mode=mode, prefetch_depth=3,
        )
        pipe._build_graph()  # traces the graph (building it for "mixed" needs a GPU)
        assert pipe.prefetch_queue_depth == 3
    assert asked == ["cpu", "mixed"]


def test_dali_device_id_is_the_training_device(monkeypatch):
    """DALI's device_id follows the torch device; a one-process run's "cuda" without an index (what
    accelerate gives it) is the current device, not None (which DALI would refuse for mixed decoding)."""
    assert dali.dali_device_id(torch.device("cpu")) is None
    assert dali.dali_device_id(torch.device("cuda", 3)) == 3
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert dali.dali_device_id(torch.device("cuda")) == 1
