"""The real `trainer.loop.train_phase` on batches in memory, in this process: a tiny timm model, no DALI
(the `make_loaders` seam), an Accelerator on the CPU. For tests of the loop's own logic in seconds."""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import timm
import torch
from accelerate import Accelerator

from loaders.sources import ImageFolderSource
from trainer.checkpoint import Resumable, TrainState
from trainer.data import Splits
from trainer.loop import train_phase
from trainer.preemption import StopSignals
from trainer.recipe import Logging, Model, Phase, Recipe
from trainer.tracking import RunLog

ARCH = "test_resnet"  # timm's smallest ResNet with BatchNorm: ~1 ms a step at 16 px
NUM_CLASSES = 4
RES_PX = 16

Batch = tuple[torch.Tensor, torch.Tensor]


class MemoryLoader:
    """TrainLoader's interface over a fixed list of batches, the same every epoch; `poison(epoch, batch)`
    (0-based) may turn a batch to NaN on its way out."""

    def __init__(self, batches: list[Batch], poison: Callable[[int, int], bool] = lambda epoch, batch: False) -> None:
        self.batches, self.poison = batches, poison
        self.batches_per_epoch = len(batches)
        self.batch_size = batches[0][1].shape[0]
        self.epoch = 0
        self.batch = 0

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        if epoch != self.epoch:
            self.epoch, self.batch = epoch, 0
        while self.batch < self.batches_per_epoch:
            images, labels = self.batches[self.batch]
            if self.poison(epoch, self.batch):
                images = images * float("nan")
            self.batch += 1  # before yielding, as TrainLoader does: a checkpoint inside the step points past it
            yield images, labels
        self.epoch, self.batch = epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]

    def res_px(self, epoch: int) -> int:
        return RES_PX


def make_batches(count: int, batch_size: int = 4, seed: int = 0) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch_size, 3, RES_PX, RES_PX, generator=generator), torch.randint(0, NUM_CLASSES, (batch_size,), generator=generator))
        for _ in range(count)
    ]


def tiny_recipe(runs_root: Path, *, epochs: int = 1, log_every_steps: int = 10, ema_decay: float = 0.9,
                optimizer: str = "adamw", precision: str = "fp32", compile: str = "off", **phase: object) -> Recipe:
    return Recipe(
        name="loop-test",
        phases=(Phase(name="main", epochs=epochs, batch_size_per_device=4, optimizer=optimizer, lr_per_256=0.05,
                      ema_decay=ema_decay, res_px=RES_PX, eval_res_px=RES_PX, precision=precision, **phase),),
        model=Model(arch=ARCH, compile=compile),
        logging=Logging(wandb=False, progress_bar=False, log_every_steps=log_every_steps),
        runs_root=str(runs_root),
    )


def initial_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(ARCH, num_classes=NUM_CLASSES)


def run_loop(recipe: Recipe, run_dir: Path, loader: MemoryLoader, model: torch.nn.Module | None = None,
             resume_from: Path | None = None, signals: StopSignals | None = None) -> TrainState:
    """`train_phase` as `trainer.launch.train` calls it, fed from `loader` (validation: its first batch)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(cpu=True)
    resumable = Resumable()
    accelerator.register_for_checkpointing(resumable)
    nothing = ImageFolderSource(files=(), labels=np.zeros(0, dtype=np.int64), classes=tuple(map(str, range(NUM_CLASSES))))
    val_loader = [loader.batches[0]]
    return train_phase(
        accelerator, recipe, 0, copy.deepcopy(model) if model is not None else initial_model(), Splits(train=nothing, val=nothing),
        run_dir, TrainState(), resumable, RunLog(run_dir, accelerator), resume_from=resume_from, signals=signals,
        make_loaders=lambda phase, accelerator: (loader, val_loader),
    )


def temporary_runs() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="loop-test-")
