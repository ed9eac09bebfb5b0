"""Start-up: seconds from process start to the first training batch, on an ImageNet-layout tree.

What it measures: whole processes of the real product (`recipes/quickstart.py --data TREE`, a tiny
timm model, resnet10t at 32 px, batch 32, W&B off, a step record per update), timed from the moment
the command is started to the moment the run's first `steps.jsonl` line (written when the first
training batch's update is done) appears. Four starts on the same tree:
  1. first start, one process, header cache removed (every file's structure is checked);
  2. second start, one process (the cache is warm: every file is stat'ed, by the survey's child
     processes while the run imports torch, none read);
  3. first start with 2 processes (`accelerate launch`, gloo on the CPU), cache removed again;
  4. a start on a 3,000-file tree of the same layout (warm), the fixed cost that any tree pays.
Extrapolation to ImageNet's 1.28 M files: fixed cost (4) + the per-file cost of (1) or (2) above
(their time minus (4), over the tree's file count) x 1.28 M.

The tree: 1,000 class folders of 1,281 training and 50 validation JPEGs (1,331,000 files, ImageNet's
size; 48-128 px, about 3.6 KB each: 400 distinct images, encoded once, written round-robin), built once
into bench/.cache/ (~60 s, ~5 GB). The page cache is warmed before the timings (every file read), so
the first start is a fresh header cache, not a cold disk.

Measured on the 2-core development machine, quiet, 2026-12-05 at 02:30: first start 63.0 s (its check
57.8 s), second start 5.2 s (its check 0.4 s, the survey of the files beside the imports 3.6 s), 2
processes cold 34.1 s, fixed cost 3.1 s; startup_warm_vs_cold 0.082 (a second run: 64.2 / 5.2 s,
0.081; a third, the imports without the garbage collector but the machine slower: 70.4 / 6.9 s, 2
processes 39.6 s, fixed cost 2.5 s, 0.098; then 78.8 / 6.8 s, 0.087; with the survey's answers
through pipes, 71.5 / 5.2 s, 2 processes 37.6 s, 0.073): target met in all five. About 5 minutes, plus the tree's build once. Until that day the tree had 210,000
files (200 and 10 per class) and no survey: 12.5 / 4.2 s, 0.333, extrapolated to 1.28 M files 0.16.

The last line is `startup_warm_vs_cold: <second start / first start>` (target <= 0.1).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(__file__).resolve().parent / ".cache"
GENERATOR_VERSION = 1  # bump when the tree changes, so an older cached one is rebuilt
CLASSES = 1000
TRAIN_PER_CLASS = 1281  # 1,281,000 training files: ImageNet-1k has 1,281,167
VAL_PER_CLASS = 50  # and 50,000 validation files, as ImageNet


def distinct_jpegs(count: int = 400, seed: int = 0) -> list[bytes]:
    """`count` different small JPEGs (48-128 px a side, ~3.6 KB): a colour, two ramps and noise each."""
    rng = np.random.default_rng([seed, 0x57A7])
    out = []
    for _ in range(count):
        height, width = (int(v) for v in rng.integers(48, 129, size=2))
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        pixels = rng.uniform(40, 215, 3) + xx[..., None] * rng.uniform(-1, 1, 3) + yy[..., None] * rng.uniform(-1, 1, 3)
        pixels += rng.normal(0, 20, (height, width, 3))
        encoded = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(encoded, "JPEG", quality=85)
        out.append(encoded.getvalue())
    return out


def build_tree(root: Path, classes: int = CLASSES, train_per_class: int = TRAIN_PER_CLASS, val_per_class: int = VAL_PER_CLASS) -> dict:
    """`root/{train,val}/n<8 digits>/n<8 digits>_<i>.JPEG`, ImageNet's layout, made once and reused.

    A few hundred distinct JPEGs are encoded once and their bytes written round-robin, so building
    200,000 files costs file creation only (~10 s here). Written to a temporary folder and renamed,
    with the summary last, so an interrupted build is never taken for a finished one."""
    wanted = {"version": GENERATOR_VERSION, "classes": classes, "train_per_class": train_per_class, "val_per_class": val_per_class}
    summary_path = root / "summary.json"
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("spec") == wanted:
        return json.loads(summary_path.read_text())
    start = time.perf_counter()
    images = distinct_jpegs()
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    written = 0
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            wnid = f"n{c:08d}"
            folder = tmp / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                (folder / f"{wnid}_{i}.JPEG").write_bytes(images[(written + 7 * c) % len(images)])
                written += 1
    summary = {"spec": wanted, "files": written, "build_s": round(time.perf_counter() - start, 1)}
    (tmp / "summary.json").write_text(json.dumps(summary))
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return summary


IMAGENET_FILES = 1_281_167  # ImageNet-1k's training images
SETS = [
    "model.arch=resnet10t", "phases.0.res_px=32", "phases.0.eval_res_px=32", "phases.0.batch_size_per_device=32",
    "logging.progress_bar=false", "logging.log_every_steps=1", "logging.wandb=false",
]


def warm_page_cache(root: Path) -> None:
    """Read every file once, so that no start is timed against a cold disk."""
    paths = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for _ in pool.map(lambda p: Path(p).read_bytes(), paths, chunksize=512):
            pass


def time_to_first_batch(root: Path, header_cache: Path, processes: int = 1, timeout_s: float = 1800) -> float:
    """Seconds from starting the training command to its first steps.jsonl line; then the run is killed."""
    run_dir = Path(tempfile.mkdtemp(prefix="startup-run-")) / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "IMGCLS_HEADER_CACHE": str(header_cache), "PYTHONUNBUFFERED": "1"}
    env.pop("WANDB_API_KEY", None)
    if processes == 1:
        launcher = [sys.executable]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        launcher = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29611"]
    command = [*launcher, str(REPO / "recipes" / "quickstart.py"), "--data", str(root), "--run-dir", str(run_dir)]
    for item in SETS:
        command += ["--set", item]
    log = run_dir.parent / "output.txt"
    steps = run_dir / "steps.jsonl"
    start = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while not (steps.is_file() and steps.stat().st_size > 0):
                if child.poll() is not None:
                    raise RuntimeError(f"the run exited ({child.returncode}) before its first step:\n{log.read_text()[-3000:]}")
                if time.perf_counter() - start > timeout_s:
                    raise RuntimeError(f"no first step after {timeout_s} s:\n{log.read_text()[-3000:]}")
                time.sleep(0.02)
            elapsed = time.perf_counter() - start
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    for line in log.read_text().splitlines():
        if line.startswith("structure check:"):
            print(f"    {line}")
    shutil.rmtree(run_dir.parent, ignore_errors=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-two", action="store_true", help="leave out the 2-process start")
    args = parser.parse_args()
    root, small = CACHE / "startup_imagenet", CACHE / "startup_imagenet_small"
    summary = build_tree(root)
    build_tree(small, train_per_class=2, val_per_class=1)
    files, small_files = summary["files"], 3 * CLASSES
    print(f"tree: {root} ({files:,} files, {CLASSES} classes); built in {summary['build_s']} s the first time")
    warm_page_cache(root)
    header_cache = CACHE / "startup_header_cache"
    shutil.rmtree(header_cache, ignore_errors=True)
    print(f"load average at the start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)")
    cold_s = time_to_first_batch(root, header_cache)
    print(f"first start (cold header cache), 1 process: {cold_s:.1f} s")
    warm_s = time_to_first_batch(root, header_cache)
    print(f"second start (warm header cache), 1 process: {warm_s:.1f} s")
    if not args.skip_two:
        shutil.rmtree(header_cache, ignore_errors=True)
        two_s = time_to_first_batch(root, header_cache, processes=2)
        print(f"first start (cold header cache), 2 processes: {two_s:.1f} s")
    time_to_first_batch(small, header_cache)  # fills the small tree's cache
    fixed_s = time_to_first_batch(small, header_cache)
    print(f"fixed cost (warm start on {small_files:,} files): {fixed_s:.1f} s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    for name, seconds in (("cold", cold_s), ("warm", warm_s)):
        per_file_s = max(0.0, seconds - fixed_s) / (files - small_files)
        print(f"extrapolated to {IMAGENET_FILES:,} files, {name}, 1 process: {fixed_s + per_file_s * IMAGENET_FILES:.0f} s "
              f"({per_file_s * 1e6:.0f} us per file)")
    print(f"startup_warm_vs_cold: {warm_s / cold_s:.3f}")


if __name__ == "__main__":
    main()
