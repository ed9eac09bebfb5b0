"""Exact resume: a real run killed with SIGKILL mid-epoch, resumed with --resume auto, ends bit-identical."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import torch
from conftest import FAST, REPO, recipe_command, run_recipe
from safetensors.torch import load_file

from trainer.checkpoint import complete_checkpoints, read_state

SETS = FAST + [
    "phases.0.epochs=3",
    "phases.0.res_px=48",
    "phases.0.checkpoint_every_steps=4",
    "phases.0.ema_decay=0.9",
    "phases.0.warmup_epochs=1",
    "model.drop_path_rate=0.1",  # draws from the torch RNG every step: its state must be restored too
    "logging.wandb=false",
]


def _steps(run_dir):
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def _final_state(run_dir):
    ckpts = complete_checkpoints(run_dir / "main" / "checkpoints")
    last = max(ckpts, key=lambda p: read_state(p)["total_step"])
    weights = load_file(last / "model.safetensors")
    parts = torch.load(last / "custom_checkpoint_0.pkl", weights_only=False)
    return weights, parts["ema"], read_state(last)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, tiny_imagenet, run_env):
    data = ["--data", str(tiny_imagenet)]
    reference = tmp_path / "reference"
    done = run_recipe("quickstart.py", *data, "--run-dir", str(reference), env=run_env, sets=SETS)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        recipe_command("quickstart.py", *data, "--run-dir", str(killed), sets=SETS),
        env=run_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    # Kill once a mid-epoch checkpoint exists and training has gone past it: the steps after
    # the checkpoint are lost and must be redone identically.
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        mid = [read_state(p) for p in complete_checkpoints(killed / "main" / "checkpoints")]
        mid = [s for s in mid if s["batch"] > 0]
        if mid and (killed / "steps.jsonl").exists():
            done_steps = [s["total_step"] for s in _steps(killed)]
            if done_steps and done_steps[-1] > max(s["total_step"] for s in mid) + 1:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    steps_before = _steps(killed)
    assert steps_before[-1]["total_step"] < 36

    resumed = run_recipe("quickstart.py", *data, "--run-dir", str(killed), "--resume", "auto", env=run_env, sets=SETS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout

    # Same per-step losses and LRs, step for step, including the steps redone after the kill.
    ref_steps, new_steps = _steps(reference), _steps(killed)
    assert [s["total_step"] for s in new_steps] == list(range(1, 37))
    assert [(s["loss"], s["lr"]) for s in new_steps] == [(s["loss"], s["lr"]) for s in ref_steps]
    # The epoch records agree too (train loss summed across the kill, val scores).
    ref_history = (reference / "history.jsonl").read_text().splitlines()
    new_history = (killed / "history.jsonl").read_text().splitlines()
    strip = lambda line: {k: v for k, v in json.loads(line).items() if k != "images_per_s"}  # noqa: E731
    assert [strip(x) for x in new_history] == [strip(x) for x in ref_history]

    ref_weights, ref_ema, ref_state = _final_state(reference)
    new_weights, new_ema, new_state = _final_state(killed)
    assert ref_weights.keys() == new_weights.keys()
    for name in ref_weights:
        assert torch.equal(ref_weights[name], new_weights[name]), name
    for name, tensor in ref_ema.items():
        assert torch.equal(tensor, new_ema[name]), f"ema {name}"
    assert ref_state["best_top1"] == new_state["best_top1"]
