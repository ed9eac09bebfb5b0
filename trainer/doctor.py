"""`python -m trainer doctor`: what to run first on a new machine. Versions and GPUs, the decode pre-flight,
then images/s of (a) the recipe's loader alone, (b) its model on synthetic data already on the device (the
compute ceiling) and (c) the real training loop on the real data; the bottleneck named and the recipe fields
to change as `--set` lines. Every line goes to a log file too, flushed as it is written, so a run cut short
keeps what it measured.

How it measures (each figure on the recipe's first phase, at its largest training resolution, with its batch
size, loader threads, precision, channels_last and compile setting): warm-up steps first, untimed (the first
one, which holds torch.compile's compilation, is reported apart), then the timed steps, with
`torch.cuda.synchronize()` before both clock reads on CUDA; synthetic batches are random normal, never zeros.
(c) is `trainer.loop.train_phase` itself, fed through its `make_loaders` seam by the phase's own TrainLoader
wrapped so that one epoch is warm-up + timed steps (streaming across the loader's epochs) and timestamped.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import math
import os
import platform
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TextIO

import accelerate
import numpy as np
import timm
import torch

from loaders import dali
from trainer import model as trainer_model
from trainer.checkpoint import Resumable, TrainState
from trainer.data import Splits, load_splits
from trainer.launch import create_accelerator
from trainer.loop import Diverged, build_loaders, compile_wanted, resolve_precision, set_up_phase, train_phase
from trainer.model import check_names, create_model
from trainer.recipe import Logging, Phase, Recipe
from trainer.tracking import RunLog
from trainer.transfer import ensure_head

# GPU models with NVJPG engines (the hardware JPEG decoder DALI's "mixed" decoding can use). Neither DALI nor
# torch says whether a card has one, so it is inferred from the name.
HW_JPEG_GPUS = ("A100", "A800", "A30", "H100", "H800", "H200", "H20", "GH200", "B100", "B200", "GB200")
HARD_LIMIT_GRACE_S = 30.0  # past --max-seconds by this much (a compile that will not end): exit with what was measured
LOOP_OVERHEAD_NOTE = 0.85  # real loop below this share of min(loader, model): the loop itself costs time
SYNTHETIC_CLASSES = 1000


@dataclass(frozen=True)
class Options:
    steps: int  # timed steps per measurement
    warmup: int  # untimed steps before them
    max_seconds: float | None = None  # soft limit on the whole doctor run: measurements stop early past it
    log_path: Path = Path("doctor.log")


@dataclass
class Measure:
    """One images/s figure and how it was obtained."""

    images_per_s: float
    timed_steps: int
    wanted_steps: int
    batch_size: int
    warmup_s: float  # the warm-up steps together
    first_step_s: float  # the first warm-up step alone: pipeline build or torch.compile land here
    note: str = ""

    @property
    def partial(self) -> bool:
        return self.timed_steps < self.wanted_steps


class Log:
    """Prints a line and appends it to the log file at once (a lock: the hard-limit watchdog writes too)."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self.lock = threading.Lock()

    def __call__(self, text: str = "") -> None:
        with self.lock:
            print(text, flush=True)
            self.file.write(text + "\n")
            self.file.flush()


@dataclass
class Budget:
    max_seconds: float | None
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def spent(self) -> bool:
        return self.max_seconds is not None and self.elapsed() >= self.max_seconds

    def share(self, stages_left: int) -> Budget:
        """A budget for the next of `stages_left` measurements: an even share of the time left, so a slow
        first one cannot leave nothing to the others (time one does not use goes on to the next)."""
        if self.max_seconds is None:
            return Budget(None)
        return Budget(max(0.0, self.max_seconds - self.elapsed()) / stages_left)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the machine -----------------------------------------------------------------------------------


def _version(module_name: str) -> str:
    try:
        return getattr(importlib.import_module(module_name), "__version__", "installed (no version)")
    except Exception as err:  # an ImportError, or a library that fails to load its native part
        return "not installed" if isinstance(err, ModuleNotFoundError) else f"fails to import ({type(err).__name__}: {err})"


def has_hw_jpeg_decoder(gpu_name: str) -> bool:
    words = gpu_name.upper().replace("-", " ").split()
    return any(word.startswith(model) for word in words for model in HW_JPEG_GPUS)


def environment_lines(recipe: Recipe) -> list[str]:
    """Versions, CPUs, NCCL and each GPU; on a machine without CUDA it says so."""
    cuda = torch.cuda.is_available()
    lines = [
        f"python {platform.python_version()} on {platform.platform()}; {len(os.sched_getaffinity(0))} CPUs usable",
        f"torch {torch.__version__} (built for CUDA {torch.version.cuda or 'none: a CPU-only build'}), "
        f"cuDNN {torch.backends.cudnn.version() if cuda else 'n/a'}",
        f"timm {timm.__version__}, accelerate {accelerate.__version__}, DALI {_version('nvidia.dali')}, "
        f"nvImageCodec {_version('nvidia.nvimgcodec')}",
    ]
    nccl = "n/a"
    if cuda:
        try:
            version = torch.cuda.nccl.version()  # a tuple (2, 28, 9) in recent torch, an int in old ones
            nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except Exception as err:  # a build without NCCL
            nccl = f"unknown ({type(err).__name__})"
    lines.append(f"NCCL {nccl}; torch.distributed NCCL backend available: {torch.distributed.is_nccl_available()}")
    if not cuda:
        lines.append("CUDA: not available here (no GPU or no driver); going on with the CPU: the figures below say nothing about a GPU")
        return lines
    decode = dali.resolve_decode_device(recipe.data.decode_device)
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        cc = (props.major, props.minor)
        bf16 = "native" if cc >= (8, 0) else "not native (compute capability < 8.0: use precision=fp32)"
        lines.append(
            f"GPU {index}: {props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs, bf16 {bf16}"
        )
        if has_hw_jpeg_decoder(props.name):
            used = (
                "used: data.decode_device resolves to mixed, and DALI sends up to hw_decoder_load (default 0.65) of "
                "each batch to it (with data.decode_mode=roi, older DALI versions decoded ROIs without it)"
                if decode == "mixed" else f"not used: data.decode_device resolves to {decode}"
            )
            lines.append(f"  hardware JPEG decoder (NVJPG): yes, inferred from the name (DALI has no query for it); {used}")
        else:
            lines.append("  hardware JPEG decoder (NVJPG): none, inferred from the name; mixed decoding runs on the CUDA cores")
    return lines


def tf32_state() -> str:
    """TF32 for matmuls and convolutions. Reading the legacy `allow_tf32` flags raises once the new
    `fp32_precision` API has been used (seen with torch 2.11 on an H200), so the new one is read first."""
    try:
        matmul = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
        conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
        if matmul is not None and conv is not None:
            return f"fp32 precision: matmul {matmul}, convolutions {conv} (tf32 = TF32 on)"
        return f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}"
    except RuntimeError as err:
        return f"TF32 state unreadable ({' '.join(str(err).split())[:120]})"


# -- the decode pre-flight -------------------------------------------------------------------------


def preflight(recipe: Recipe, splits: Splits, accelerator) -> tuple[str, str]:
    """(decode mode, why), decided as a training run decides data.decode_mode "auto" (trainer.launch):
    `loaders.dali.preflight_decode`, a trial decode of one batch in a child process on the GPU (none on the
    CPU, where libjpeg's ROI path is the one every test runs)."""
    if recipe.data.decode_mode != "auto":
        return recipe.data.decode_mode, f"data.decode_mode={recipe.data.decode_mode} in the recipe: no trial"
    device = accelerator.device
    device_id = dali.dali_device_id(device)
    return dali.preflight_decode(splits.train, recipe.data.decode_device, device_id, sizes=splits.train.sizes)


# -- the three measurements ------------------------------------------------------------------------


def timed_steps(step: Callable[[], int], opts: Options, budget: Budget, device: torch.device, batch_size: int) -> Measure:
    """`opts.warmup` untimed calls of `step` (each returns its images), then images/s over `opts.steps` more;
    past the budget it stops early (after at least one timed step) and says so."""
    started = time.perf_counter()
    first_step_s = 0.0
    for index in range(opts.warmup):
        step()
        if index == 0:
            synchronize(device)
            first_step_s = time.perf_counter() - started
        if budget.spent():
            break
    synchronize(device)
    timed_from = time.perf_counter()
    warmup_s = timed_from - started
    images = steps = 0
    while steps < opts.steps and not (steps and budget.spent()):
        images += step()
        steps += 1
    synchronize(device)
    seconds = time.perf_counter() - timed_from
    return Measure(images / seconds, steps, opts.steps, batch_size, warmup_s, first_step_s)


def endless(loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader as one stream across its epochs, as the loop consumes it (the pipeline streams on)."""
    while True:
        yield from loader.epoch_batches(loader.epoch)


def measure_loader(loader, opts: Options, budget: Budget, device: torch.device) -> Measure:
    """(a) Batches of the loader alone. One value per image is summed on the device, so each batch is really
    there, and checked finite at the end."""
    stream = endless(loader)
    checksum = torch.zeros((), dtype=torch.float64, device=device)

    def step() -> int:
        nonlocal checksum
        images, labels = next(stream)
        checksum += images[:, 0, 0, 0].double().sum() + labels.double().sum()
        return images.shape[0]

    result = timed_steps(step, opts, budget, device, loader.batch_size)
    if not math.isfinite(float(checksum)):
        raise RuntimeError("the loader delivered non-finite pixels")
    return result


def measure_model(recipe: Recipe, num_classes: int, accelerator, opts: Options, budget: Budget) -> tuple[Measure, str]:
    """(b) The phase's model, optimizer, loss, batch augmentation, EMA and autocast (`set_up_phase`, as the
    loop builds them) on one random-normal batch already on the device: forward, backward, step. Returns the
    measure and how it was compiled."""
    phase, device = recipe.phases[0], accelerator.device
    model = create_model(recipe, num_classes)
    ensure_head(model, phase.head, num_classes, phase.head_dropout)
    no_data = Splits(train=None, val=None)
    parts = set_up_phase(accelerator, recipe, 0, model, no_data,
                         make_loaders=lambda phase, accelerator: (SimpleNamespace(batches_per_epoch=opts.warmup + opts.steps), None))
    compiled = "compiled (torch.compile, as the loop does)" if getattr(parts, "compiled", False) else "eager"
    res_px = max(phase.res_px_at(e) for e in range(phase.epochs))
    generator = torch.Generator(device=device).manual_seed(0)
    memory_format = torch.channels_last if recipe.model.channels_last else torch.contiguous_format
    images = torch.randn(phase.batch_size_per_device, 3, res_px, res_px, generator=generator, device=device)
    images = images.contiguous(memory_format=memory_format)
    labels = torch.randint(0, num_classes, (phase.batch_size_per_device,), generator=generator, device=device)
    micro = 0

    def step() -> int:
        nonlocal micro
        batch, targets = images, labels
        if parts.mixup is not None:
            batch, targets = parts.mixup(batch, labels)
        if parts.eraser is not None:
            batch = parts.eraser(batch)
        with parts.autocast:
            loss = parts.criterion(parts.model(batch), targets)
        accelerator.backward(loss / phase.grad_accum_steps)
        micro += 1
        if micro % phase.grad_accum_steps == 0:
            parts.optimizer.step()
            parts.optimizer.zero_grad(set_to_none=True)
            if parts.ema is not None:
                parts.ema.update(parts.raw_model)
        return batch.shape[0]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = timed_steps(step, opts, budget, device, phase.batch_size_per_device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        result.note = f"peak memory {peak / 2**30:.1f} of {total / 2**30:.0f} GiB"
    accelerator.free_memory()
    return result, compiled


class TimedLoader:
    """The phase's TrainLoader as seen by `train_phase`: one epoch of `warmup + steps` batches, drawn from the
    real loader across its own epochs, with the timed part's clock read (after a synchronize) when the loop
    asks for the first timed batch and when it asks for the one after the last: every timed step's whole work
    (forward, backward, update, logs) lies between. Time spent waiting inside the real loader is summed."""

    def __init__(self, inner, opts: Options, budget: Budget, device: torch.device) -> None:
        self.inner, self.opts, self.budget, self.device = inner, opts, budget, device
        self.batch_size = inner.batch_size
        self.batches_per_epoch = opts.warmup + opts.steps
        self.epoch = self.batch = 0
        self.stream = endless(inner)
        self.started = self.first_step_s = self.warmup_s = self.timed_s = self.wait_s = 0.0
        self.timed_steps = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # anything else the loop reads (source, res_px_for_epoch, ...)

    def epoch_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch, self.batch = epoch, 0
        self.started = time.perf_counter()
        timed_from = None
        while self.batch < self.batches_per_epoch:
            if self.batch == 1:
                synchronize(self.device)
                self.first_step_s = time.perf_counter() - self.started
            if self.batch == self.opts.warmup or (timed_from is None and self.batch > 0 and self.budget.spent()):
                synchronize(self.device)
                timed_from = time.perf_counter()
                self.warmup_s = timed_from - self.started
            if timed_from is not None and self.timed_steps and self.budget.spent():
                break
            asked = time.perf_counter()
            images, labels = next(self.stream)
            if timed_from is not None:
                self.wait_s += time.perf_counter() - asked
                self.timed_steps += 1
            self.batch += 1
            yield images, labels
        synchronize(self.device)
        if timed_from is not None:
            self.timed_s = time.perf_counter() - timed_from
        self.epoch, self.batch = epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.batch = state["epoch"], state["batch"]

    def measure(self) -> Measure:
        if not self.timed_steps:
            raise RuntimeError("the loop ended before any timed step")
        wait_share = self.wait_s / self.timed_s
        return Measure(self.timed_steps * self.batch_size / self.timed_s, self.timed_steps, self.opts.steps,
                       self.batch_size, self.warmup_s, self.first_step_s, f"waiting for the loader {wait_share:.0%} of the timed steps")


def measure_loop(recipe: Recipe, splits: Splits, num_classes: int, accelerator, opts: Options, budget: Budget, log: Log) -> tuple[Measure, dict]:
    """(c) `train_phase` on the real data: one epoch of warm-up + timed steps, then its evaluation (on a few
    val batches) and checkpoint, untimed, in a temporary run folder. Returns the measure and the epoch record."""
    phase = recipe.phases[0]
    val = splits.val.subset(np.arange(min(len(splits.val), 2 * phase.batch_size_per_device)))
    data = Splits(train=splits.train, val=val)
    timed: list[TimedLoader] = []

    def make_loaders(phase: Phase, accelerator):
        loader, val_loader = build_loaders(recipe, phase, 0, data, accelerator)
        timed.append(TimedLoader(loader, opts, budget, accelerator.device))
        return timed[-1], val_loader

    model = create_model(recipe, num_classes)
    ensure_head(model, phase.head, num_classes, phase.head_dropout)
    with tempfile.TemporaryDirectory(prefix="doctor-") as tmp:
        run_dir = Path(tmp)
        recipe = dataclasses.replace(recipe, runs_root=tmp)
        resumable = Resumable()
        accelerator.register_for_checkpointing(resumable)
        run_log = RunLog(run_dir, accelerator)
        try:
            train_phase(accelerator, recipe, 0, model, data, run_dir, TrainState(), resumable, run_log, make_loaders=make_loaders)
        except Diverged as err:  # the timed steps are measured all the same
            log(f"  note: the loop stopped on non-finite losses ({err}); its timing stands")
        history = run_log.history()
    accelerator.free_memory()
    return timed[-1].measure(), history[-1] if history else {}


# -- the recipe as doctor runs it ------------------------------------------------------------------


def doctor_recipe(recipe: Recipe) -> Recipe:
    """The first phase alone, one epoch at its largest training resolution, random initial weights (the
    throughput does not depend on them), no W&B, no progress bar, no mid-epoch checkpoints."""
    phase = recipe.phases[0]
    res_px = max(phase.res_px_at(e) for e in range(phase.epochs))
    phase = dataclasses.replace(
        phase, epochs=1, warmup_epochs=0.5 if phase.warmup_epochs else 0.0, init="", subset=1.0, res_px=res_px,
        res_px_end=0, res_ramp_epochs=(0, 0), unfreeze_at=(), checkpoint_every_steps=0, keep_best_k=1, early_stop_patience=0,
    )
    logging = Logging(project=recipe.logging.project, wandb=False, progress_bar=False, log_every_steps=recipe.logging.log_every_steps)
    return dataclasses.replace(recipe, phases=(phase,), logging=logging)


# -- reading the figures ---------------------------------------------------------------------------


def advice(recipe: Recipe, measures: dict[str, Measure], device_type: str, compiled: str, cpus: int) -> list[str]:
    """The bottleneck and what to change, from whichever of loader (a), model (b) and loop (c) were measured."""
    loader, model, loop = (measures.get(k) for k in ("loader", "model", "loop"))
    lines: list[str] = []
    sets: list[str] = []
    phase, data = recipe.phases[0], recipe.data
    if loader and model:
        bound = "loader" if loader.images_per_s < model.images_per_s else "model"
        ratio = loader.images_per_s / model.images_per_s
        if bound == "loader":
            lines.append(f"bottleneck: loader: it delivers {loader.images_per_s:.0f} img/s, the model could take "
                         f"{model.images_per_s:.0f} ({ratio:.2f}x)")
            if data.loader_threads < cpus:
                sets.append(f"--set data.loader_threads={min(cpus, 2 * data.loader_threads)}  # {cpus} CPUs usable")
            if device_type == "cuda" and dali.resolve_decode_device(data.decode_device) == "cpu":
                sets.append("--set data.decode_device=mixed  # decode on the GPU (nvJPEG)")
            if device_type == "cuda" and data.decode_mode != "full":
                sets.append("--set data.decode_mode=full  # whole-image decode can use the hardware decoder; compare")
            if data.prefetch_depth < 4:
                sets.append(f"--set data.prefetch_depth={2 * data.prefetch_depth}  # more batches in flight smooths decode bursts")
        else:
            lines.append(f"bottleneck: model (compute): it takes {model.images_per_s:.0f} img/s, the loader delivers "
                         f"{loader.images_per_s:.0f} ({ratio:.2f}x headroom)")
            if device_type == "cuda" and "compiled" not in compiled:
                sets.append("--set model.compile=on  # torch.compile: fused kernels")
            elif device_type == "cuda":
                sets.append("--set model.compile=off  # to compare: compiling does not always pay (docs/gpu.md)")
            if device_type == "cuda" and not recipe.model.channels_last:
                sets.append("--set model.channels_last=true  # NHWC: the tensor cores' layout")
            if device_type == "cuda" and phase.precision == "fp32":
                sets.append("--set phases.0.precision=bf16")
            if device_type == "cuda" and "peak memory" in model.note:
                peak, total = (float(v) for v in model.note.split("peak memory ")[1].split(" GiB")[0].split(" of "))
                if peak < total / 3:
                    sets.append(f"--set phases.0.batch_size_per_device={2 * phase.batch_size_per_device}  "
                                f"# {peak:.0f} of {total:.0f} GiB used; the LR follows (lr_per_256)")
    if loop and (loader or model):
        ceiling = min(m.images_per_s for m in (loader, model) if m)
        share = loop.images_per_s / ceiling
        lines.append(f"real loop: {loop.images_per_s:.0f} img/s = {share:.0%} of min(loader, model) = {ceiling:.0f}")
        if share < LOOP_OVERHEAD_NOTE:
            lines.append("  the loop loses time beyond its slower part: the loader and the model compete for the CPU, "
                         "or waits (data, logging syncs) are not overlapped")
            sets.append(f"--set data.prefetch_depth={max(4, 2 * data.prefetch_depth)}  # hide the loader's jitter")
            if recipe.logging.log_every_steps < 50:
                sets.append("--set logging.log_every_steps=50  # each logged step reads the loss: a sync point")
    if sets:
        lines.append("to try (one at a time, then run doctor again):")
        lines.extend(f"  {line}" for line in dict.fromkeys(sets))
    elif lines:
        lines.append("nothing to change: the slower part runs near its own ceiling")
    return lines


def table_lines(measures: dict[str, Measure]) -> list[str]:
    labels = {
        "loader": "(a) loader alone (TrainLoader)",
        "model": "(b) model on synthetic data (ceiling)",
        "loop": "(c) real loop (train_phase)",
    }
    lines = [f"{'measure':<40} {'img/s':>9} {'steps':>9} {'warm-up s':>10}  note"]
    for key, label in labels.items():
        m = measures.get(key)
        if m is None:
            lines.append(f"{label:<40} {'-':>9} {'-':>9} {'-':>10}  not measured")
            continue
        steps = f"{m.timed_steps}/{m.wanted_steps}"
        lines.append(f"{label:<40} {m.images_per_s:>9.1f} {steps:>9} {m.warmup_s:>10.1f}  {m.note}{' (partial)' if m.partial else ''}")
    lines.extend(f"{key}_images_per_s: {measures[key].images_per_s:.1f}" for key in labels if key in measures)
    return lines


# -- the whole check -------------------------------------------------------------------------------


def doctor(recipe: Recipe, opts: Options, make_data: Callable[[Log], str] | None = None) -> int:
    """Run the checks and write the log; returns 0 when all three figures were measured, 1 otherwise.
    `make_data(log)` gives the data folder when the recipe names none (doctor's generated JPEGs)."""
    opts.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(opts.log_path, "w", encoding="utf-8") as file:
        log = Log(file)
        budget = Budget(opts.max_seconds)
        measures: dict[str, Measure] = {}
        watchdog = _start_watchdog(opts, measures, log)
        try:
            return _run(recipe, opts, make_data, log, budget, measures)
        finally:
            if watchdog is not None:
                watchdog.cancel()


def _run(recipe: Recipe, opts: Options, make_data, log: Log, budget: Budget, measures: dict[str, Measure]) -> int:
    log(f"doctor: recipe {recipe.name!r}, log {opts.log_path}")
    for line in environment_lines(recipe):
        log(line)
    check_names(recipe)
    if not recipe.data.path:
        if make_data is None:
            raise ValueError("no data: pass --data PATH")
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, path=make_data(log)))
    recipe = doctor_recipe(recipe)
    phase = recipe.phases[0]
    accelerator = create_accelerator()
    device = accelerator.device
    # What training sets on the device (cudnn.benchmark, TF32), when this version has it: doctor measures what a run gets.
    trainer_model.configure_device(device)
    log(f"device settings: cudnn.benchmark {torch.backends.cudnn.benchmark}, {tf32_state()}")
    started = time.perf_counter()
    splits = load_splits(recipe)
    num_classes = len(splits.train.classes)
    log(f"data: {recipe.data.path}: {len(splits.train)} train / {len(splits.val)} val images, {num_classes} classes "
        f"(read in {time.perf_counter() - started:.1f} s)")
    precision = resolve_precision(phase.precision, device)
    log(f"phase {phase.name!r}: {recipe.model.arch}, batch {phase.batch_size_per_device} per device, {phase.res_px} px "
        f"(its largest training resolution), {recipe.data.loader_threads} loader threads, decode "
        f"{dali.resolve_decode_device(recipe.data.decode_device)}, precision {precision if phase.precision != 'auto' else 'auto → ' + precision}, "
        f"channels_last {recipe.model.channels_last}, compile {recipe.model.compile} → {'on' if compile_wanted(recipe, device) else 'off'}; "
        f"{opts.warmup} warm-up + {opts.steps} timed steps each")

    try:
        mode, why = preflight(recipe, splits, accelerator)
        log(f"decode pre-flight: mode {mode} ({why})")
        # As trainer.launch does: the run's loaders get the decided mode, not "auto".
        recipe = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, decode_mode=mode))
    except Exception:
        log(f"decode pre-flight: failed:\n{traceback.format_exc().rstrip()}")
    failed = []

    def stage(name: str, work: Callable[[], None]) -> None:
        if budget.spent():
            log(f"{name}: skipped, --max-seconds {opts.max_seconds:g} spent")
            failed.append(name)
            return
        try:
            work()
        except torch.OutOfMemoryError:
            log(f"{name}: out of GPU memory at batch {phase.batch_size_per_device}: "
                f"try --set phases.0.batch_size_per_device={max(1, phase.batch_size_per_device // 2)}")
            failed.append(name)
        except Exception:
            log(f"{name}: failed:\n{traceback.format_exc().rstrip()}")
            failed.append(name)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def run_loader() -> None:
        loader, _ = build_loaders(recipe, phase, 0, splits, accelerator)
        measures["loader"] = measure_loader(loader, opts, budget.share(3), device)
        # DALI's pipeline, its threads and its device memory go before (b): the ceiling is the model's alone.
        del loader
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        m = measures["loader"]
        log(f"(a) loader alone: {m.images_per_s:.1f} img/s over {m.timed_steps} batches "
            f"(first batch {m.first_step_s:.1f} s, the pipeline start included)")

    compiled = ["eager"]

    def run_model() -> None:
        m, compiled[0] = measure_model(recipe, num_classes, accelerator, opts, budget.share(2))
        measures["model"] = m
        log(f"(b) model on synthetic data: {m.images_per_s:.1f} img/s over {m.timed_steps} steps, {compiled[0]}; "
            f"first step {m.first_step_s:.1f} s{' (torch.compile included)' if 'compiled' in compiled[0] else ''}"
            f"{'; ' + m.note if m.note else ''}")

    def run_loop() -> None:
        m, record = measure_loop(recipe, splits, num_classes, accelerator, opts, budget.share(1), log)
        measures["loop"] = m
        log(f"(c) real loop: {m.images_per_s:.1f} img/s over {m.timed_steps} steps; first step {m.first_step_s:.1f} s, "
            f"warm-up {m.warmup_s:.1f} s; {m.note}")
        if record:
            log(f"  its epoch record: {record['images_per_s']:.1f} img/s over all its steps (warm-up included), "
                f"step p50 {record['step_ms_p50']:.0f} ms, data wait {record['data_wait_share']:.0%}")

    stage("(a) loader", run_loader)
    stage("(b) model", run_model)
    stage("(c) loop", run_loop)

    log()
    for line in advice(recipe, measures, device.type, compiled[0], len(os.sched_getaffinity(0))):
        log(line)
    log()
    for line in table_lines(measures):
        log(line)
    log(f"total: {budget.elapsed():.0f} s" + (f" (--max-seconds {opts.max_seconds:g})" if opts.max_seconds else ""))
    return 0 if not failed and len(measures) == 3 else 1


def _start_watchdog(opts: Options, measures: dict[str, Measure], log: Log) -> threading.Timer | None:
    """Past --max-seconds plus a grace, something will not end (a compile, a hung pipeline): print what was
    measured and exit, so the machine's time is not spent waiting."""
    if opts.max_seconds is None:
        return None

    def stop() -> None:
        log(f"hard limit: --max-seconds {opts.max_seconds:g} + {HARD_LIMIT_GRACE_S:g} s passed; what was measured:")
        for line in table_lines(dict(measures)):
            log(line)
        sys.stdout.flush()
        os._exit(124)

    timer = threading.Timer(opts.max_seconds + HARD_LIMIT_GRACE_S, stop)
    timer.daemon = True
    timer.start()
    return timer
