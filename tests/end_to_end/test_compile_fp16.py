"""fp16 with a loss scaler, and torch.compile: each run stopped by SIGTERM mid-epoch and resumed ends
bit-identical to the same run uninterrupted; checkpoints hold the scaler, and compiled weights keep their names.

On the CPU: fp16 autocast with `GradScaler("cpu")` exercises the same scaler logic as on an older GPU; the
compiled runs use the "aot_eager" backend (trainer.loop.COMPILE_BACKEND_ENV): the same graph capture as
inductor without its C++ code generation, which takes ~5 minutes for this model on 2 cores.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import FAST, REPO, assert_same_weights, history_without_timings, recipe_command, run_recipe

from trainer.loop import COMPILE_BACKEND_ENV
from trainer.run_folder import complete_checkpoints, read_state

BASE = FAST + [
    "model.arch=test_resnet",
    "phases.0.epochs=2",
    "phases.0.checkpoint_every_steps=4",
    "phases.0.ema_decay=0.9",
    "phases.0.warmup_epochs=1",
    "logging.wandb=false",
]  # 96 images in batches of 8: 12 steps an epoch, 24 in all
MODES = {
    "fp16": ["phases.0.precision=fp16"],
    "compiled": ["model.compile=on"],
}


def _steps(run_dir: Path) -> list[dict]:
    path = run_dir / "steps.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []


def _env(run_env: dict) -> dict:
    return {**run_env, COMPILE_BACKEND_ENV: "aot_eager"}


def _newest(run_dir: Path) -> Path:
    return max(complete_checkpoints(run_dir / "main" / "checkpoints"), key=lambda p: read_state(p)["total_step"])


@pytest.mark.parametrize("mode", sorted(MODES))
def test_interrupted_and_resumed_is_bit_identical(tmp_path, tiny_imagenet, run_env, mode):
    sets, env, data = BASE + MODES[mode], _env(run_env), ["--data", str(tiny_imagenet)]
    reference = tmp_path / "reference"
    done = run_recipe("quickstart.py", *data, "--run-dir", str(reference), env=env, sets=sets)
    assert done.returncode == 0, done.stderr[-3000:]

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(recipe_command("quickstart.py", *data, "--run-dir", str(stopped), sets=sets),
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (_steps(stopped) and _steps(stopped)[-1]["total_step"] >= 6):  # mid-epoch, past the step-4 checkpoint
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert 6 <= read_state(_newest(stopped))["total_step"] < 12

    resumed = run_recipe("quickstart.py", *data, "--run-dir", str(stopped), "--resume", "auto", env=env, sets=sets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [(s["loss"], s["lr"]) for s in _steps(stopped)] == [(s["loss"], s["lr"]) for s in _steps(reference)]
    assert history_without_timings(stopped) == history_without_timings(reference)
    assert_same_weights(reference, stopped)

    parts = torch.load(_newest(stopped) / "custom_checkpoint_0.pkl", weights_only=False)
    if mode == "fp16":
        assert parts["scaler"]["scale"] > 0 and "_growth_tracker" in parts["scaler"]
    else:
        # Compiled in place: the names an uncompiled model has, so either kind of run resumes the other's checkpoints.
        from safetensors.torch import load_file

        names = set(timm.create_model("test_resnet", num_classes=3).state_dict())
        assert set(load_file(_newest(stopped) / "model.safetensors")) == names
        assert {k.removeprefix("module.") for k in parts["ema"]} == names  # ModelEmaV3's own prefix, compiled or not
