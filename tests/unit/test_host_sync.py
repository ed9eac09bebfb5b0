"""The loop reads no tensor on the host per update on an accelerator, and a dropped update leaves no trace.

`trainer.loop.skip_on_device` picks the accelerator's path (the drop decided on the device, the flags
read every log_every_steps updates); these tests turn it on here on the CPU, so the GPU's code path runs."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from loop_run import MemoryLoader, initial_model, make_batches, run_loop, temporary_runs, tiny_recipe
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from trainer import loop
from trainer.loop import Diverged, PhaseRun, resolve_precision
from trainer.model import configure_device
from trainer.preemption import Preempted, StopSignals
from trainer.run_folder import complete_checkpoints, read_state


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values on the host: `item()`, `bool()`, `int()`, `float()` and indexing with a
    tensor all end in aten._local_scalar_dense; `tolist()` and `numpy()` do not dispatch and are patched."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.active = False

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def device_path(monkeypatch):
    monkeypatch.setattr(loop, "skip_on_device", lambda device: True)


def count_update_reads(monkeypatch, recipe, run_dir: Path, loader: MemoryLoader) -> int:
    """Host reads inside train_batch and finish_update only (the epoch's end evaluates: not per update)."""
    reads = HostReads()

    def counted(method):
        def wrapper(self, *args):
            with reads:
                return method(self, *args)
        return wrapper

    for name in ("train_batch", "finish_update"):
        monkeypatch.setattr(PhaseRun, name, counted(getattr(PhaseRun, name)))
    for name in ("tolist", "numpy"):
        original = getattr(torch.Tensor, name)

        def patched(self, *args, _original=original, **kwargs):
            reads.count += reads.active
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, patched)
    run_loop(recipe, run_dir, loader)
    return reads.count


UPDATES, LOG_EVERY = 20, 10


# Not torch's Adam here: on the CPU it counts steps in a CPU tensor that it reads each step (on a GPU,
# `capture_steps_on_device` keeps that count on the device).
@pytest.mark.parametrize("optimizer", ["momentum"])
def test_host_reads_every_log_step_not_every_update(monkeypatch, device_path, optimizer):
    with temporary_runs() as tmp:
        recipe = tiny_recipe(Path(tmp), log_every_steps=LOG_EVERY, ema_decay=0.9, optimizer=optimizer)
        count = count_update_reads(monkeypatch, recipe, Path(tmp) / "run", MemoryLoader(make_batches(UPDATES)))
    # Per log step: the flags since the last read (one tolist) and the logged loss (one item). The first
    # update, before the optimizer has state, decides on the host too.
    assert count <= (UPDATES // LOG_EVERY) * 2 + 1, count


def test_cpu_path_reads_every_update(monkeypatch):
    """The counter works: on the CPU's path the flags are read each update (free there)."""
    with temporary_runs() as tmp:
        recipe = tiny_recipe(Path(tmp), log_every_steps=LOG_EVERY)
        count = count_update_reads(monkeypatch, recipe, Path(tmp) / "run", MemoryLoader(make_batches(UPDATES)))
    assert count >= UPDATES


def snapshot(run: PhaseRun) -> dict[str, torch.Tensor]:
    """Weights and BatchNorm buffers, optimizer state (param groups' tensors too), EMA: by name, cloned."""
    parts = run.parts
    out = {f"model.{k}": v.clone() for k, v in parts.raw_model.state_dict().items()}
    optimizer = parts.optimizer.optimizer
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        for k, v in optimizer.state.get(p, {}).items():
            out[f"opt.{i}.{k}"] = v.clone() if torch.is_tensor(v) else torch.tensor(v)
    for g, group in enumerate(optimizer.param_groups):
        for k, v in group.items():
            if torch.is_tensor(v):
                out[f"group.{g}.{k}"] = v.clone()
    if parts.ema is not None:
        out |= {f"ema.{k}": v.clone() for k, v in parts.ema.module.state_dict().items()}
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "lamb", "lion"])
def test_nan_update_leaves_no_trace(monkeypatch, device_path, optimizer):
    bad_batch = 5  # 0-based: update 6
    seen: dict[int, dict] = {}
    original = PhaseRun.finish_update

    def recording(self, epoch, loss):
        original(self, epoch, loss)
        seen[self.state.step] = snapshot(self)

    monkeypatch.setattr(PhaseRun, "finish_update", recording)
    with temporary_runs() as tmp:
        recipe = tiny_recipe(Path(tmp), optimizer=optimizer, log_every_steps=LOG_EVERY, ema_decay=0.9)
        state = run_loop(recipe, Path(tmp) / "run", MemoryLoader(make_batches(12), poison=lambda e, b: b == bad_batch))
        steps = (Path(tmp) / "run" / "steps.jsonl").read_text()
    before, after, next_one = seen[bad_batch], seen[bad_batch + 1], seen[bad_batch + 2]
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert any(not torch.equal(after[k], next_one[k]) for k in after if k.startswith("model."))  # training went on
    assert all(torch.isfinite(v).all() for v in seen[12].values() if v.is_floating_point())
    assert state.skipped_steps == 1 and state.nonfinite_streak == 0
    assert f'"step": {bad_batch + 1}, "total_step": {bad_batch + 1}, "skipped": "non-finite loss"' in steps


def test_nonfinite_streak_stops_at_the_next_read_with_the_last_good_weights(monkeypatch, device_path):
    with temporary_runs() as tmp:
        recipe = tiny_recipe(Path(tmp), log_every_steps=LOG_EVERY, max_nonfinite_steps=3)
        with pytest.raises(Diverged, match="3 updates in a row") as raised:
            run_loop(recipe, Path(tmp) / "run", MemoryLoader(make_batches(UPDATES), poison=lambda e, b: b >= 2))
        assert "from update 5 on, every update was dropped" in str(raised.value)
        last = max(complete_checkpoints(Path(tmp) / "run" / "main" / "checkpoints"), key=lambda p: read_state(p)["total_step"])
        state = read_state(last)
        weights = load_file(last / "model.safetensors")
    assert state["total_step"] == LOG_EVERY and state["nonfinite_streak"] == 3 and state["skipped_steps"] == LOG_EVERY - 2
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = max(complete_checkpoints(run_dir / "main" / "checkpoints"), key=lambda p: read_state(p)["total_step"])
    parts = torch.load(last / "custom_checkpoint_0.pkl", weights_only=False)
    return load_file(last / "model.safetensors") | {f"ema.{k}": v for k, v in parts["ema"].items()}


def interrupted_then_resumed(tmp: Path, recipe, batches, poison, stop_at_batch: int) -> Path:
    """A run stopped by a signal at (epoch 0, stop_at_batch), then resumed from its checkpoint to the end."""
    signals = StopSignals()  # not installed: the loader sets the flag as a handler would

    def poison_and_signal(epoch, batch):
        if (epoch, batch) == (0, stop_at_batch):
            signals.requested = signal.SIGTERM
        return poison(epoch, batch)

    run_dir = tmp / "interrupted"
    with pytest.raises(Preempted) as stopped:
        run_loop(recipe, run_dir, MemoryLoader(batches, poison_and_signal), signals=signals)
    assert read_state(stopped.value.checkpoint)["total_step"] == stop_at_batch + 1
    run_loop(recipe, run_dir, MemoryLoader(batches, poison), resume_from=stopped.value.checkpoint)
    return run_dir


def test_device_path_resume_is_bit_identical(device_path):
    batches = make_batches(8)

    def poison(epoch, batch):
        return (epoch, batch) == (1, 2)

    with temporary_runs() as tmp:
        recipe = tiny_recipe(Path(tmp), epochs=2, log_every_steps=3, checkpoint_every_steps=3)
        whole = Path(tmp) / "whole"
        run_loop(recipe, whole, MemoryLoader(batches, poison))
        resumed = interrupted_then_resumed(Path(tmp), recipe, batches, poison, stop_at_batch=4)
        a, b = final_weights(whole), final_weights(resumed)
        assert (Path(tmp) / "whole" / "steps.jsonl").read_text() != ""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# -- precision and device settings ---------------------------------------------------------------


@pytest.mark.parametrize(("capability", "expected"), [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((6, 1), "fp16")])
def test_auto_precision_follows_the_compute_capability(capability, expected):
    assert resolve_precision("auto", torch.device("cuda", 0), capability) == expected


def test_auto_precision_is_fp32_on_the_cpu_and_explicit_choices_stand():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("fp16", cpu) == "fp16"
    assert resolve_precision("fp32", torch.device("cuda", 0), (9, 0)) == "fp32"


def test_configure_device_touches_nothing_on_the_cpu_and_sets_tf32_on_cuda():
    saved = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(), torch.backends.cudnn.conv.fp32_precision)
    try:
        torch.backends.cudnn.benchmark = False
        configure_device(torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is False and torch.get_float32_matmul_precision() == saved[1]
        configure_device(SimpleNamespace(type="cuda", index=0))  # chosen by the device's type alone
        assert torch.backends.cudnn.benchmark is True
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.fp32_precision == "tf32"
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.set_float32_matmul_precision(saved[1])
        torch.backends.cudnn.conv.fp32_precision = saved[2]


def test_initial_model_is_small():
    assert sum(p.numel() for p in initial_model().parameters()) < 1_000_000
