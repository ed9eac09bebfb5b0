"""Train-loader throughput: our DALI `TrainLoader` (CPU decoding) vs torchvision's `DataLoader`.

What it measures: images/s delivered by the training input pipeline alone (no model), on 2,000
synthetic ImageNet-like JPEGs (200-800 px a side, mean about 400x350, quality 90, about 100 KB each:
smooth colour fields plus texture and noise, so decode cost tracks real photos) in an ImageFolder of
10 classes, built once into bench/.cache/.

How: three loaders, each an endless stream of batches of 64 at 224 px:
  - ours: `loaders.dali.TrainLoader` on `scan_image_folder`, default `TrainAugment`, decode_device="cpu",
    num_threads=2;
  - raw DALI: `fn.readers.file` + `fn.decoders.image_random_crop` + `fn.resize` + `fn.crop_mirror_normalize`
    with the same threads and queue depth, to show what our wrapper costs over plain DALI;
  - torchvision: `ImageFolder` + `DataLoader(num_workers=2, shuffle, drop_last, persistent_workers)` with
    RandomResizedCrop(224) + RandomHorizontalFlip + ToTensor + Normalize (PIL decoding).
After a warm-up of every loader (and a read of every file, so the page cache is warm) the loaders take
turns, one chunk each, ROUNDS times. Each ratio is the median over rounds of that round's ratio: the
loaders of one round ran within seconds of each other, so load from other processes on the machine
(it is shared) mostly cancels, where a ratio of per-loader medians can pair a busy round of one loader
with a quiet round of the other. The table shows per-loader medians too. A chunk's clock starts at
its SKIP_BATCHES-th batch: a loader's background prefetch from before its turn (DALI's queue, the
workers' outstanding batches) is then used up and the rate is steady-state production. A pause between
turns lets that background work finish before the next loader's clock starts. Each batch is touched
(one scalar per image summed) so nothing is left lazy.

Measured on the 2-core development machine (DALI 2.4.0, torch 2.14.1, Pillow 13 with libjpeg-turbo),
four runs while it was quiet: ours 865-930 img/s, raw DALI 940-1,010, torchvision 580-640;
loader_vs_torchvision 1.44-1.59, ours / raw DALI 0.92-0.93. About 100 s, plus 40 s to build the JPEGs once.

The last line is `loader_vs_torchvision: <ours / torchvision images/s>`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator
from PIL import Image
from torchvision import datasets, transforms

from loaders import IMAGENET_MEAN, IMAGENET_STD
from loaders.dali import TrainLoader
from loaders.sources import scan_image_folder

CACHE = Path(__file__).resolve().parent / ".cache"
# Bump when the generator changes, so a cached folder made by an older one is rebuilt.
GENERATOR_VERSION = 1
BATCH_SIZE = 64
RES_PX = 224
THREADS = 2
# More, shorter rounds than strictly needed: on a shared 2-core machine a burst of someone else's
# work then spoils one round, which the median drops.
ROUNDS = 5
BATCHES_PER_CHUNK = 40  # 2,560 images: every chunk crosses an epoch boundary of the 2,000
SKIP_BATCHES = 5  # > torchvision's 2 workers x prefetch_factor 2 outstanding, > DALI's queue depth 2
PAUSE_S = 2.0  # > the time torchvision's workers need to finish their 4 outstanding batches

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


# -- the data ----------------------------------------------------------------------------------


def _smooth_field(rng: np.random.Generator, height: int, width: int, grid: tuple[int, int], amplitude: float) -> np.ndarray:
    """A random (grid_h, grid_w, 3) lattice, bicubic-upsampled: colour blobs of size ~ image / grid."""
    lattice = rng.uniform(-amplitude, amplitude, size=(*grid, 3)).astype(np.float32)
    channels = [
        np.asarray(Image.fromarray(lattice[..., c], mode="F").resize((width, height), Image.BICUBIC))
        for c in range(3)
    ]
    return np.stack(channels, axis=-1)


def imagenet_like_jpeg(index: int, seed: int = 0) -> bytes:
    """One JPEG with ImageNet-like size and byte count, a pure function of (seed, index).

    A linear colour ramp plus blobs at three scales plus pixel noise: flat colours would compress to
    a few KB and decode several times faster than photos; this lands near ImageNet's ~100 KB.
    """
    rng = np.random.default_rng([seed, index, 0x1A6E])
    width = int(np.clip(rng.normal(400, 110), 200, 800))
    height = int(np.clip(rng.normal(350, 100), 200, 800))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp_x = rng.uniform(-80, 80, 3) / width
    ramp_y = rng.uniform(-80, 80, 3) / height
    pixels = rng.uniform(60, 195, 3) + xx[..., None] * ramp_x + yy[..., None] * ramp_y
    pixels += _smooth_field(rng, height, width, (int(rng.integers(3, 8)), int(rng.integers(3, 8))), 60)
    pixels += _smooth_field(rng, height, width, (max(2, height // 12), max(2, width // 12)), 40)
    pixels += _smooth_field(rng, height, width, (max(2, height // 3), max(2, width // 3)), 80)
    pixels += rng.normal(0, 30, size=pixels.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def _write_image(args: tuple[Path, int, int, int]) -> tuple[int, int, int]:
    root, index, num_classes, seed = args
    data = imagenet_like_jpeg(index, seed)
    (root / f"class_{index % num_classes:02d}" / f"img_{index:05d}.jpg").write_bytes(data)
    width, height = Image.open(io.BytesIO(data)).size
    return width, height, len(data)


def build_image_folder(root: Path, num_images: int = 2000, num_classes: int = 10, seed: int = 0) -> dict:
    """Make (or reuse) `root/class_XX/img_NNNNN.jpg`; returns its summary (counts, mean size, mean bytes).

    Built in a temporary folder and renamed, with the summary written last, so an interrupted build is
    never mistaken for a finished one.
    """
    root = Path(root)
    wanted = {"version": GENERATOR_VERSION, "num_images": num_images, "num_classes": num_classes, "seed": seed}
    summary_path = root / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if all(summary.get(k) == v for k, v in wanted.items()):
            return summary
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for c in range(num_classes):
        (tmp / f"class_{c:02d}").mkdir(parents=True)
    jobs = [(tmp, i, num_classes, seed) for i in range(num_images)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        sizes = np.array(list(pool.map(_write_image, jobs, chunksize=16)), dtype=np.float64)
    summary = {
        **wanted,
        "mean_width_px": float(sizes[:, 0].mean()),
        "mean_height_px": float(sizes[:, 1].mean()),
        "mean_kb": float(sizes[:, 2].mean() / 1000),
        "min_kb": float(sizes[:, 2].min() / 1000),
        "max_kb": float(sizes[:, 2].max() / 1000),
    }
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return summary


def describe(root: Path, summary: dict) -> str:
    return (
        f"{summary['num_images']} JPEGs in {summary['num_classes']} classes at {root}: mean "
        f"{summary['mean_width_px']:.0f}x{summary['mean_height_px']:.0f} px, mean {summary['mean_kb']:.1f} KB "
        f"(min {summary['min_kb']:.1f}, max {summary['max_kb']:.1f})"
    )


def warm_page_cache(root: Path) -> None:
    """Read every file once, so no loader pays for the disk and the first one measured is not penalised."""
    for path in sorted(root.rglob("*.jpg")):
        path.read_bytes()


# -- the three loaders, each an endless stream of (images, labels) ----------------------------


def endless(loader: TrainLoader) -> Batches:
    """Our loader as one stream across epoch boundaries, the way the training loop consumes it."""
    while True:
        yield from loader.epoch_batches(loader.epoch)


def ours_stream(root: Path) -> Batches:
    return endless(
        TrainLoader(scan_image_folder(root), batch_size=BATCH_SIZE, seed=0, decode_device="cpu", num_threads=THREADS)
    )


def raw_dali_stream(root: Path) -> Batches:
    """Plain DALI as its docs show it: reader with its own shuffle, random-crop decoder, resize, normalise."""
    # The same executor and queue depth as TrainLoader's pipeline: the difference is the wrapper.
    pipe = Pipeline(batch_size=BATCH_SIZE, num_threads=THREADS, device_id=None, prefetch_queue_depth=2, exec_dynamic=True)
    with pipe:
        jpegs, labels = fn.readers.file(file_root=str(root), random_shuffle=True, name="reader")
        images = fn.decoders.image_random_crop(
            jpegs, device="cpu", output_type=types.RGB, random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3]
        )
        images = fn.resize(images, resize_x=RES_PX, resize_y=RES_PX, interp_type=types.INTERP_LINEAR, antialias=True)
        images = fn.crop_mirror_normalize(
            images,
            mirror=fn.random.coin_flip(probability=0.5),
            mean=[255 * m for m in IMAGENET_MEAN],
            std=[255 * s for s in IMAGENET_STD],
            dtype=types.FLOAT,
            output_layout="CHW",
        )
        pipe.set_outputs(images, labels)
    iterator = DALIGenericIterator(
        pipe, ["images", "labels"], reader_name="reader", last_batch_policy=LastBatchPolicy.DROP, auto_reset=True
    )
    while True:
        for out in iterator:
            yield out[0]["images"], out[0]["labels"].view(-1)


def torchvision_stream(root: Path) -> Batches:
    transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(RES_PX),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    # persistent_workers: the strongest usual setting (no worker restart at each epoch).
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(root), transform=transform),
        batch_size=BATCH_SIZE,
        shuffle=True,
        drop_last=True,
        num_workers=THREADS,
        persistent_workers=True,
    )
    while True:
        yield from loader


# -- timing ------------------------------------------------------------------------------------


def chunk_rate(stream: Batches, num_batches: int, skip: int) -> float:
    """Images/s over `num_batches` batches, timed from the `skip`-th batch's arrival to the last's."""
    checksum = 0.0
    images_timed = 0
    started = 0.0
    for k in range(skip + num_batches):
        images, labels = next(stream)
        # Touch one value per image: the batch is really there, at a cost next to nothing.
        checksum += float(images[:, 0, 0, 0].sum()) + float(labels.sum())
        if k == skip - 1:
            started = time.perf_counter()
        elif k >= skip:
            images_timed += images.shape[0]
    elapsed = time.perf_counter() - started
    if not np.isfinite(checksum):
        raise RuntimeError("non-finite pixels in a batch")
    return images_timed / elapsed


def interleaved_rates(streams: dict[str, Batches], rounds: int, num_batches: int, skip: int, pause_s: float) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {name: [] for name in streams}
    for _ in range(rounds):
        for name, stream in streams.items():
            time.sleep(pause_s)  # the previous loader's run-ahead finishes before this clock starts
            rates[name].append(chunk_rate(stream, num_batches, skip))
    return rates


def table(rates: dict[str, list[float]], labels: dict[str, str]) -> str:
    lines = [f"{'loader':<44} {'median img/s':>12}   runs"]
    for name, values in rates.items():
        runs = " ".join(f"{v:.0f}" for v in values)
        lines.append(f"{labels[name]:<44} {statistics.median(values):>12.0f}   {runs}")
    return "\n".join(lines)


def paired_ratios(rates: dict[str, list[float]], num: str, den: str) -> str:
    return " ".join(f"{a / b:.2f}" for a, b in zip(rates[num], rates[den]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=CACHE / "imagenet_like_2000", help="cache folder of the JPEGs")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--batches", type=int, default=BATCHES_PER_CHUNK, help="timed batches per chunk")
    args = parser.parse_args()

    summary = build_image_folder(args.data)
    print(describe(args.data, summary))
    warm_page_cache(args.data)
    streams: dict[str, Batches] = {
        "ours": ours_stream(args.data),
        "raw": raw_dali_stream(args.data),
        "torchvision": torchvision_stream(args.data),
    }
    labels = {
        "ours": "ours: TrainLoader (DALI cpu, 2 threads)",
        "raw": "raw DALI: readers.file + image_random_crop",
        "torchvision": "torchvision: DataLoader (PIL, 2 workers)",
    }
    load_before = os.getloadavg()[0]
    # Warm-up: pipelines built, worker processes started, first-epoch allocations done.
    interleaved_rates(streams, rounds=1, num_batches=10, skip=SKIP_BATCHES, pause_s=PAUSE_S)
    rates = interleaved_rates(streams, args.rounds, args.batches, SKIP_BATCHES, PAUSE_S)
    # Other work on the machine lowers every figure; the load average says how much there was.
    print(
        f"batch {BATCH_SIZE}, {RES_PX} px, {args.rounds} interleaved rounds of {args.batches} timed batches each; "
        f"{os.cpu_count()} CPUs, load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(table(rates, labels))
    print(f"ours / raw DALI, per round: {paired_ratios(rates, 'ours', 'raw')}")
    print(f"ours / torchvision, per round: {paired_ratios(rates, 'ours', 'torchvision')}")
    for name, base in (("ours / raw DALI", "raw"), ("ours / torchvision", "torchvision")):
        ratios = np.divide(rates["ours"], rates[base])
        print(f"{name}: median {statistics.median(ratios):.2f}, rounds {min(ratios):.2f}-{max(ratios):.2f}")
    print(f"loader_vs_torchvision: {statistics.median(np.divide(rates['ours'], rates['torchvision'])):.2f}")


if __name__ == "__main__":
    main()
