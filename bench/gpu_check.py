"""GPU check: `python -m trainer doctor` on recipes/imagenet_full.py, the way the GPU machine runs it.

What it measures (docs/gpu.md says how to read it): on the recipe's first phase (ResNet-50, batch 128, its
largest training resolution 160 px, 6 DALI threads, bf16, channels_last, compile auto) (a) the TrainLoader
alone, (b) the model on random-normal batches already on the GPU (the compute ceiling), (c) the real
`train_phase` loop on the JPEGs; each after 20 warm-up steps, over 100 timed steps, synchronizing before
every clock read; then the bottleneck and the `--set` lines to try. The data is `--data` or, without it,
doctor's generated ImageNet-like folder (`--images`, default 10,000 JPEGs). `--max-seconds` (default 300)
bounds the whole run: past it the measurements stop early and what was measured is printed; 30 s later it
exits whatever it is doing. The full log goes to $OUT/gpu_check.log (or ./gpu_check.log), line by line, so a
run cut short keeps what it measured.

Without a CUDA device it exits at once with status 2. `--dry-run-cpu` runs the same code on the CPU with tiny
sizes (resnet10t, 32 px, batch 8, 200 generated images, 3 timed steps; about 20 s) to prove the script end to
end; its numbers say nothing about a GPU. Not yet run on a GPU with DALI (doctor ran on an H200 with DALI's loaders
replaced by random batches: the GPU lines, bf16, compile and the real loop work there).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from trainer.__main__ import main as trainer_main

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "imagenet_full.py"
GPU_ARGS = ["--steps", "100", "--warmup", "20"]
CPU_DRY_RUN = [
    "--steps", "3", "--warmup", "1", "--images", "200",
    "--set", "model.arch=resnet10t", "--set", "phases.0.res_px=32", "--set", "phases.0.res_px_end=0",
    "--set", "phases.0.res_step_px=32", "--set", "phases.0.batch_size_per_device=8", "--set", "data.loader_threads=2",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run-cpu", action="store_true", help="run everything on the CPU with tiny sizes")
    parser.add_argument("--recipe", default=str(RECIPE), help="recipe file (default: recipes/imagenet_full.py)")
    parser.add_argument("--data", help="ImageFolder to train on (default: doctor's generated JPEGs)")
    parser.add_argument("--images", help="JPEGs to generate without --data (default: 10000)")
    parser.add_argument("--max-seconds", default="300", help="time limit of the whole check (default: 300)")
    args = parser.parse_args()

    if not args.dry_run_cpu and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here, nothing to measure. Run it on a machine with a CUDA GPU, "
            "or pass --dry-run-cpu to test the script on the CPU.",
            file=sys.stderr,
        )
        raise SystemExit(2)
    out = os.environ.get("OUT")
    argv = ["doctor", args.recipe, "--max-seconds", args.max_seconds, "--log", str(Path(out or ".") / "gpu_check.log")]
    argv += CPU_DRY_RUN if args.dry_run_cpu else GPU_ARGS
    if args.data:
        argv += ["--data", args.data]
    if args.images:
        argv += ["--images", args.images]
    raise SystemExit(trainer_main(argv))


if __name__ == "__main__":
    main()
