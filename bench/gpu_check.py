"""GPU check: does our DALI loader keep one H100/H200 busy training ResNet-50?

What it measures, on one GPU, with 2,000 ImageNet-like JPEGs from bench/loader.py's generator (built
on first use into bench/.cache/, seconds on 16 cores; reused when present):
  (a) loader alone: images/s of `loaders.dali.TrainLoader` with decode_device="mixed" (nvJPEG),
      224 px random-resized crops, NHWC (channels_last) float batches on the GPU, nothing else running;
  (b) real: ResNet-50 training images/s (bf16 autocast, channels_last, timm SGD) fed by that loader;
  (c) synthetic: the same training on one random batch already on the GPU: the compute ceiling.
How: cudnn.benchmark on; every figure comes after WARMUP_STEPS untimed batches and covers TIMED_STEPS
batches, with torch.cuda.synchronize() before both clock reads. (a) runs ROUNDS times first; then (b)
and (c) alternate ROUNDS times; each figure is the median. Batch 256, or 128 if 256 runs out of memory.
About a minute of GPU time after start-up. The full log goes to $OUT/gpu_check.log when OUT is set,
line by line, so a run cut short keeps what it measured.

The last line is `gpu_real_vs_synthetic: <(b) / (c)>`: 1.00 means the loader feeds the GPU fully.
Without a CUDA device it exits at once with status 2. `--dry-run-cpu` runs the same code on the CPU
(decode_device="cpu", resnet18, 200 images, 32 px, batch 8, few steps) to prove the script end to end;
its numbers say nothing about a GPU. Not yet run on a GPU; the dry run takes about 10 s.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import nvidia.dali
import timm
import torch
import torch.nn.functional as F

# bench/loader.py, found because `python bench/gpu_check.py` puts bench/ on sys.path: same JPEGs, same stream.
from loader import CACHE, Batches, build_image_folder, describe, endless
from timm.optim import create_optimizer_v2

from loaders.dali import TrainLoader
from loaders.sources import scan_image_folder
from trainer.recipe import Data

Step = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class Config:
    device: str
    decode_device: str
    arch: str
    num_images: int
    res_px: int
    batch_sizes: tuple[int, ...]  # tried in order until one fits in memory
    warmup_steps: int
    timed_steps: int
    rounds: int


GPU = Config("cuda", "mixed", "resnet50", 2000, 224, (256, 128), warmup_steps=10, timed_steps=30, rounds=3)
CPU_DRY_RUN = Config("cpu", "cpu", "resnet18", 200, 32, (8,), warmup_steps=2, timed_steps=3, rounds=2)


class Log:
    """Prints a line and, when a file is given, appends it there at once."""

    def __init__(self, file: TextIO | None) -> None:
        self.file = file

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        if self.file is not None:
            self.file.write(text + "\n")
            self.file.flush()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_s(batches: Batches, work: Step, warmup_steps: int, timed_steps: int, device: torch.device) -> float:
    """`work` on `warmup_steps` batches untimed, then images/s over `timed_steps` more, GPU work included."""
    for _ in range(warmup_steps):
        work(*next(batches))
    synchronize(device)
    started = time.perf_counter()
    images_done = 0
    for _ in range(timed_steps):
        images, labels = next(batches)
        work(images, labels)
        images_done += images.shape[0]
    synchronize(device)
    return images_done / (time.perf_counter() - started)


def training_step(model: torch.nn.Module, device: torch.device) -> Step:
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.1, momentum=0.9, weight_decay=5e-5)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(config: Config, root: Path, batch_size: int, threads: int, log: Log) -> dict[str, list[float]]:
    device = torch.device(config.device)
    loader = TrainLoader(
        scan_image_folder(root),
        batch_size=batch_size,
        seed=0,
        res_px_for_epoch=lambda epoch: config.res_px,
        decode_device=config.decode_device,
        device_id=0 if device.type == "cuda" else None,
        num_threads=threads,
        channels_last=True,
    )
    real = endless(loader)
    rates: dict[str, list[float]] = {"loader": [], "real": [], "synthetic": []}
    for _ in range(config.rounds):
        rates["loader"].append(images_per_s(real, lambda images, labels: None, config.warmup_steps, config.timed_steps, device))
        log(f"  (a) loader alone: {rates['loader'][-1]:.0f} img/s")

    model = timm.create_model(config.arch, num_classes=len(loader.source.classes))
    model = model.to(device, memory_format=torch.channels_last).train()
    step = training_step(model, device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, config.res_px, config.res_px, generator=generator)
    labels = torch.randint(0, len(loader.source.classes), (batch_size,), generator=generator)
    synthetic = itertools.repeat((images.to(device, memory_format=torch.channels_last), labels.to(device)))
    for _ in range(config.rounds):
        rates["real"].append(images_per_s(real, step, config.warmup_steps, config.timed_steps, device))
        rates["synthetic"].append(images_per_s(synthetic, step, config.warmup_steps, config.timed_steps, device))
        log(f"  (b) real: {rates['real'][-1]:.0f} img/s   (c) synthetic: {rates['synthetic'][-1]:.0f} img/s")
    return rates


def run(config: Config, root: Path, threads: int, log: Log) -> None:
    log(f"torch {torch.__version__}, DALI {nvidia.dali.__version__}, timm {timm.__version__}, Python {sys.version.split()[0]}")
    started = time.perf_counter()
    # Before CUDA is touched in this process: the build forks one worker per CPU.
    summary = build_image_folder(root, num_images=config.num_images)
    log(f"data: {describe(root, summary)} (ready in {time.perf_counter() - started:.1f} s)")
    device = torch.device(config.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: the numbers say nothing about a GPU)"
    log(f"device: {card}; {os.cpu_count()} CPUs")
    torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution algorithms once

    for batch_size in config.batch_sizes:
        log(f"batch {batch_size}: {config.arch}, bf16 autocast, channels_last, {config.res_px} px, "
            f"decode {config.decode_device}, {threads} DALI threads")
        try:
            rates = measure(config, root, batch_size, threads, log)
            break
        except torch.OutOfMemoryError:
            log(f"batch {batch_size} ran out of GPU memory")
        # Out of the except block the failed run's frames are gone: its model and pipeline can be freed.
        gc.collect()
        torch.cuda.empty_cache()
    else:
        raise RuntimeError(f"no batch size in {config.batch_sizes} fits in memory")

    loader, real, synthetic = (statistics.median(rates[k]) for k in ("loader", "real", "synthetic"))
    log()
    log(f"{'measure':<52} {'median img/s':>12}   rounds")
    for key, label in (
        ("loader", f"(a) TrainLoader alone, decode {config.decode_device}"),
        ("real", f"(b) {config.arch} training fed by TrainLoader"),
        ("synthetic", f"(c) {config.arch} training on a batch already there"),
    ):
        log(f"{label:<52} {statistics.median(rates[key]):>12.0f}   " + " ".join(f"{v:.0f}" for v in rates[key]))
    log(f"loader headroom, (a) / (c): {loader / synthetic:.2f}")
    log(f"total: {time.perf_counter() - started:.0f} s")
    log(f"gpu_real_vs_synthetic: {real / synthetic:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run-cpu", action="store_true", help="run everything on the CPU with tiny sizes")
    parser.add_argument("--data", type=Path, help="cache folder of the JPEGs (default: bench/.cache/imagenet_like_<N>)")
    parser.add_argument("--threads", type=int, default=Data().loader_threads, help="DALI CPU threads (default: the recipe default)")
    args = parser.parse_args()

    config = CPU_DRY_RUN if args.dry_run_cpu else GPU
    if config.device == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here, nothing to measure. Run it on a machine with a CUDA GPU, "
            "or pass --dry-run-cpu to test the script on the CPU.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    root = args.data or CACHE / f"imagenet_like_{config.num_images}"
    out = os.environ.get("OUT")
    with open(Path(out) / "gpu_check.log", "w") if out else contextlib.nullcontext() as log_file:
        log = Log(log_file)
        try:
            run(config, root, args.threads, log)
        except Exception:
            log(traceback.format_exc())  # the log is all that comes back from the GPU machine
            raise


if __name__ == "__main__":
    main()
