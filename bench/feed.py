"""The train loader's feed: what it costs the training thread, in µs per sample at batch 256.

What it measures: DALI calls `TrainLoader`'s external-source callable on the thread that asks for the
next batch (the training loop's, inside `next()`), then copies what it returned into its own buffers.
Both are on the GPU's critical path, so their sum per batch, divided by the batch size, is the figure.
The decode, crop and augmentation run in DALI's worker threads and are not counted here.

How: 2,000 generated ImageNet-sized JPEGs (bench/loader.py's generator, cached in bench/.cache/),
screened as a training run screens them; a TrainLoader at batch 256 with default augmentation. Its
callable is called directly for BATCHES consecutive batches (about 10 epochs of these 2,000 files, so
each epoch's set-up is counted at its share), timing each call; each batch's outputs are then handed
to a pipeline of five external sources with `feed_input`, timing that copy (the pipeline's run, which
moves the batch on, is not timed). Means over the batches, after a warm-up of one epoch.

It times whatever `loaders` is importable, so today's code and an older copy run the same script:
  python bench/feed.py                               # this tree
  PYTHONPATH=/tmp/orig python bench/feed.py          # e.g. a copy of an older loaders/ in /tmp/orig/loaders

Measured on the 2-core development machine (DALI 2.4.0), 2026-12-04, while other work ran on it:
before (the feed read each file and parsed its header on the training thread, and DALI copied the
bytes) 182-278 µs per sample; after (two slices of per-epoch arrays, paths for DALI's own file reader)
3.40 on a slow afternoon. Details in docs/benchmarks.md, "Feed".

The last line is `feed_us_per_sample: <x>`.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from loader import CACHE, build_image_folder, describe, warm_page_cache
from nvidia.dali import fn, types
from nvidia.dali.pipeline import Pipeline

import loaders
from loaders.dali import TrainLoader
from loaders.screening import screen
from loaders.sources import scan_image_folder

BATCH_SIZE = 256
BATCHES = 70  # 10 epochs of the 2,000 images (7 batches each)
WARMUP = 7  # one epoch
_DALI_TYPES = {np.dtype(np.uint8): types.UINT8, np.dtype(np.int64): types.INT64, np.dtype(np.float32): types.FLOAT}


def copy_pipeline(outputs) -> Pipeline:
    """One external source per output of the callable, fed by hand as the loader's are fed from its
    callable: feed_input is DALI's copy. Outputs are whole arrays or lists of per-sample arrays."""
    pipe = Pipeline(batch_size=BATCH_SIZE, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_dynamic=True)
    with pipe:
        dtypes = [_DALI_TYPES[np.asarray(out[0]).dtype] for out in outputs]
        pipe.set_outputs(*(fn.external_source(name=f"out{i}", dtype=dtype) for i, dtype in enumerate(dtypes)))
    pipe.build()
    return pipe


def main() -> None:
    root = CACHE / "imagenet_like_2000"
    summary = build_image_folder(root)
    print(describe(root, summary))
    warm_page_cache(root)
    source = screen(scan_image_folder(root), "train")
    loader = TrainLoader(source, batch_size=BATCH_SIZE, seed=0, decode_device="cpu", num_threads=2)
    loader._start = (0, 0)  # what starting its pipeline sets: the callable positions batches from it
    pipe = copy_pipeline(loader._feed(SimpleNamespace(iteration=0)))  # the callable is a function of the iteration
    call_s, copy_s = [], []
    for iteration in range(WARMUP + BATCHES):
        start = time.perf_counter()
        outputs = loader._feed(SimpleNamespace(iteration=iteration))
        called = time.perf_counter()
        for i, data in enumerate(outputs):
            pipe.feed_input(f"out{i}", data)
        copied = time.perf_counter()
        pipe.run()
        if iteration >= WARMUP:
            call_s.append(called - start)
            copy_s.append(copied - called)
    call_us, copy_us = (1e6 * float(np.mean(t)) / BATCH_SIZE for t in (call_s, copy_s))
    print(f"loaders from {Path(loaders.__file__).parent}")
    print(f"batch {BATCH_SIZE}, {BATCHES} batches: callable {call_us:.2f} µs/sample "
          f"({1e3 * float(np.mean(call_s)):.2f} ms/batch), DALI's copy {copy_us:.2f} µs/sample "
          f"({1e3 * float(np.mean(copy_s)):.2f} ms/batch)")
    print(f"feed_us_per_sample: {call_us + copy_us:.2f}")


if __name__ == "__main__":
    main()
