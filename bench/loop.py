"""Training-step overhead: our `trainer.loop.train_phase` vs a minimal raw PyTorch loop, same model and data.

What it measures: seconds per training step (forward, loss, backward, optimizer step) of
  - ours: the real `trainer.loop.train_phase` (accelerate on the CPU, timm optimizer and scheduler,
    loss bookkeeping, logging every 50 steps; EMA on, fp32), fed through its `make_loaders` seam by an
    in-memory loader with TrainLoader's interface;
  - raw: `model.train()` then, per batch, `zero_grad(set_to_none=True)`, `F.cross_entropy(model(x), y)`,
    `backward()`, `step()` and timm's `ModelEmaV3.update`, with the optimizer from timm's
    `create_optimizer_v2` (same optimizer, LR, weight decay and EMA decay as ours).
Both train timm's resnet18 (10 classes) from the same initial weights on the same batches of 16 random
64 px images already in memory, in the same process (so the same torch thread count), fp32 on the CPU:
about 150 ms a step on a 2-core machine, so per-step costs of the loop show up at the percent level.

How: the two loops take turns step by step, on the same batch, and which goes first alternates. The
in-memory loader runs one raw step on a batch and then yields that batch to ours, or yields it first and
runs the raw step when ours asks for the next batch; ours' step is the time from the yield until the
loop asks for the next batch, so the eval and checkpoint at an epoch's end are not timed. The script
prints the ratio for each order apart: an order effect (one loop leaving warm caches or a grown
allocator to the other) shows there as a difference between the two. Alternating every ~150 ms, the two
see the same load from other processes on this shared machine, which runs of whole loops one after the
other do not (their ratio swung by +-5 % here). `train_phase` runs ROUNDS epochs; in each, the first
WARMUP_STEPS steps are untimed and the next TIMED_STEPS are timed. Each timed step gives a pair (raw
step, ours' step on the same batch, one right after the other); the figure is the median over all pairs of ours /
raw, which a burst of other work hitting a few steps of one loop does not move. A median leaves out
work ours does only every 50 steps (a log line, ~0.1 ms): next to 50 steps of ~140 ms, nothing.

Allocator: glibc's malloc by default hands freed gradient and activation memory back to the OS and
page-faults it in again on the next step (~18,000 minor faults, ~10 % of a step here). Which loop pays
for that depends on the other's frees, so step-by-step interleaving skewed the ratio to 1.10 through
the allocator alone. The script therefore asks malloc (mallopt) to keep freed memory: both loops then
run without page-fault churn and the ratio measures the loops' own work.

Measured on the 2-core development machine (torch 2.14.1, accelerate 1.15, timm 1.0.31) while it was
quiet, EMA off: about 143 ms a step for both, loop_overhead 1.005-1.009. About 85 s. With EMA on in both
(2026-12-04, 5 rounds of 40 steps, a quiet machine on a slow afternoon: 735 vs 726 ms a step): 1.007.

The last line is `loop_overhead: <ours step time / raw step time>`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import io
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3

from loaders.sources import ImageFolderSource
from trainer.checkpoint import Resumable, TrainState
from trainer.data import Splits
from trainer.loop import train_phase
from trainer.recipe import Logging, Model, Phase, Recipe
from trainer.tracking import RunLog

ARCH = "resnet18"
NUM_CLASSES = 10
BATCH_SIZE = 16
RES_PX = 64
DISTINCT_BATCHES = 4  # cycled, so the model does not see one batch over and over
WARMUP_STEPS = 5
TIMED_STEPS = 40
ROUNDS = 5

Batch = tuple[torch.Tensor, torch.Tensor]


class RawLoop:
    """The textbook step, with timm's optimizer factory and the LR that train_phase derives for `phase`."""

    def __init__(self, model: torch.nn.Module, phase: Phase) -> None:
        self.model = model.train()
        lr = phase.lr_per_256 * phase.batch_size_per_device / 256
        self.optimizer = create_optimizer_v2(
            model, opt=phase.optimizer, lr=lr, weight_decay=phase.weight_decay, momentum=phase.momentum
        )
        self.ema = ModelEmaV3(model, decay=phase.ema_decay, use_warmup=phase.ema_warmup)
        self.updates = 0

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(images), labels)
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        self.ema.update(self.model, step=self.updates)


class InterleavedLoader:
    """TrainLoader's interface over batches in memory. Before handing ours a batch it runs one raw
    step on it; it times both, ours from the yield until the loop asks for the next batch."""

    def __init__(self, batches: list[Batch], raw: RawLoop, warmup_steps: int, timed_steps: int, res_px: int) -> None:
        self.batches = batches
        self.raw = raw
        self.warmup_steps = warmup_steps
        self.batches_per_epoch = warmup_steps + timed_steps
        self.batch_size = batches[0][1].shape[0]
        self._res_px = res_px
        self.epoch = 0
        self.batch = 0
        # Per epoch, seconds of each timed step: raw's and then ours' on the same batch.
        self.ours_seconds: list[list[float]] = []
        self.raw_seconds: list[list[float]] = []
        self.raw_first: list[list[bool]] = []  # per timed step: whether the raw loop stepped first

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0
        ours_steps: list[float] = []
        raw_steps: list[float] = []
        raw_first: list[bool] = []
        while self.batch < self.batches_per_epoch:
            images, labels = self.batches[self.batch % len(self.batches)]
            timed = self.batch >= self.warmup_steps
            # Which loop steps first alternates: whatever one leaves behind for the next (warm caches, a
            # grown allocator) is then paid by each loop half the time, and the two orders can be compared.
            first = self.batch % 2 == 0
            # Advance before yielding, as TrainLoader does (a checkpoint inside the step points past it).
            self.batch += 1
            if first:
                raw_s = self._raw_step(images, labels)
            yielded = time.perf_counter()
            yield images, labels
            ours_s = time.perf_counter() - yielded
            if not first:
                raw_s = self._raw_step(images, labels)
            if timed:
                ours_steps.append(ours_s)
                raw_steps.append(raw_s)
                raw_first.append(first)
        self.ours_seconds.append(ours_steps)
        self.raw_seconds.append(raw_steps)
        self.raw_first.append(raw_first)
        self.epoch, self.batch = epoch + 1, 0

    def _raw_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        started = time.perf_counter()
        self.raw.step(images, labels)
        return time.perf_counter() - started

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]

    def res_px(self, epoch: int) -> int:
        return self._res_px


def make_batches(count: int, seed: int = 0) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(BATCH_SIZE, 3, RES_PX, RES_PX, generator=generator),
            torch.randint(0, NUM_CLASSES, (BATCH_SIZE,), generator=generator),
        )
        for _ in range(count)
    ]


def bench_recipe(runs_root: Path, epochs: int) -> Recipe:
    phase = Phase(
        name="bench",
        epochs=epochs,
        batch_size_per_device=BATCH_SIZE,
        optimizer="adamw",
        lr_per_256=1e-3,
        weight_decay=0.05,
        ema_decay=0.999,
        res_px=RES_PX,
        eval_res_px=RES_PX,
        precision="fp32",
    )
    return Recipe(
        name="bench-loop",
        phases=(phase,),
        model=Model(arch=ARCH),
        logging=Logging(wandb=False, progress_bar=False, log_every_steps=50),
        runs_root=str(runs_root),
    )


def run_interleaved(rounds: int, warmup_steps: int, timed_steps: int) -> InterleavedLoader:
    """One `train_phase` of `rounds` epochs, set up as `trainer.launch.train` sets it up, raw steps in between."""
    torch.manual_seed(0)
    initial = timm.create_model(ARCH, num_classes=NUM_CLASSES)
    batches = make_batches(DISTINCT_BATCHES)
    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        recipe = bench_recipe(Path(tmp), epochs=rounds)
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()  # train() makes it before any phase runs
        raw = RawLoop(copy.deepcopy(initial), recipe.phases[0])
        loader = InterleavedLoader(batches, raw, warmup_steps, timed_steps, RES_PX)
        val_loader = [(batches[0][0][:8], batches[0][1][:8])]
        accelerator = Accelerator(cpu=True)
        resumable = Resumable()
        accelerator.register_for_checkpointing(resumable)
        # train_phase reads data only to build DALI loaders, which the make_loaders seam replaces.
        nothing = ImageFolderSource(files=(), labels=np.zeros(0, dtype=np.int64), classes=tuple(map(str, range(NUM_CLASSES))))
        # train_phase prints an epoch summary per epoch; the table below is this script's output.
        with contextlib.redirect_stdout(io.StringIO()):
            train_phase(
                accelerator,
                recipe,
                0,
                copy.deepcopy(initial),
                Splits(train=nothing, val=nothing),
                run_dir,
                TrainState(),
                resumable,
                RunLog(run_dir, accelerator),
                make_loaders=lambda phase, accelerator: (loader, val_loader),
            )
    return loader


def keep_freed_memory() -> bool:
    """Raise glibc malloc's trim and mmap thresholds (see the module docstring); False where that is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from malloc.h
    # 32 MiB is the highest mmap threshold glibc accepts; every tensor of this model is smaller.
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--steps", type=int, default=TIMED_STEPS, help="timed steps per round")
    args = parser.parse_args()

    allocator = "glibc malloc keeping freed memory" if keep_freed_memory() else "default allocator (not glibc)"
    loader = run_interleaved(args.rounds, WARMUP_STEPS, args.steps)
    print(f"allocator: {allocator}")
    print(
        f"{ARCH}, {NUM_CLASSES} classes, batch {BATCH_SIZE}, {RES_PX} px, fp32 CPU, torch threads "
        f"{torch.get_num_threads()}, adamw, EMA; {args.rounds} rounds of {args.steps} timed steps, interleaved step by "
        f"step, after {WARMUP_STEPS} warm-up steps each"
    )
    print(f"{'loop':<32} {'median ms/step':>14}   per round")
    for label, rounds in (("ours: trainer.loop.train_phase", loader.ours_seconds), ("raw PyTorch loop", loader.raw_seconds)):
        per_round = [1000 * np.median(steps) for steps in rounds]
        print(f"{label:<32} {1000 * np.median(np.concatenate(rounds)):>14.1f}   " + " ".join(f"{v:.1f}" for v in per_round))
    ratios = [np.divide(ours, raw) for ours, raw in zip(loader.ours_seconds, loader.raw_seconds)]
    print("ours / raw, median per round: " + " ".join(f"{np.median(r):.3f}" for r in ratios))
    first = np.concatenate(loader.raw_first).astype(bool)
    every = np.concatenate(ratios)
    print(f"ours / raw by order: raw loop first {np.median(every[first]):.3f}, ours first {np.median(every[~first]):.3f}")
    print(f"loop_overhead: {np.median(np.concatenate(ratios)):.3f}")


if __name__ == "__main__":
    main()
