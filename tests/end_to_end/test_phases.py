"""Phases in real runs: a frozen backbone stays bit-identical, missing pretrained weights say how to
provide them, early stopping ends a phase, and resume across a phase boundary."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import torch
from conftest import REPO, recipe_command, run_recipe
from safetensors.torch import load_file

from trainer.run_folder import complete_checkpoints, read_state

SMALL = ["model.arch=resnet10t", "logging.progress_bar=false", "logging.log_every_steps=1", "data.loader_threads=1", "logging.wandb=false"]


def _sets(index: int, epochs: int, batch: int = 8) -> list[str]:
    p = f"phases.{index}"
    return [f"{p}.epochs={epochs}", f"{p}.warmup_epochs=0", f"{p}.batch_size_per_device={batch}",
            f"{p}.res_px=32", f"{p}.eval_res_px=32", f"{p}.checkpoint_every_steps=0", f"{p}.color_jitter=0"]


# -- units ---------------------------------------------------------------------------------------


# -- real runs -----------------------------------------------------------------------------------


def test_frozen_backbone_is_unchanged_and_bn_stats_stay(tmp_path, tiny_imagenet, run_env, pretrained):
    sets = SMALL + [f"model.pretrained_file={pretrained}"] + _sets(0, 2) + _sets(1, 1) + ["phases.1.epochs=1"]
    run_dir = tmp_path / "frozen"
    done = run_recipe("folder_transfer.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=run_env, sets=sets)
    assert done.returncode == 0, done.stderr[-3000:]
    (ckpt,) = complete_checkpoints(run_dir / "head" / "checkpoints")
    after = load_file(ckpt / "model.safetensors")
    before = load_file(pretrained)
    for name, tensor in before.items():
        if not name.startswith("fc."):  # everything but the head, BatchNorm statistics included
            assert torch.equal(after[name], tensor), name
    assert "fc.0.weight" in after and after["fc.3.weight"].shape == (512, 3)[::-1]


def test_missing_pretrained_weights_say_how_to_provide_them(tmp_path, tiny_imagenet, run_env):
    env = {**run_env, "HF_HOME": str(tmp_path / "empty-hf"), "HF_HUB_OFFLINE": "1"}
    done = run_recipe("folder_transfer.py", "--data", str(tiny_imagenet), "--run-dir", str(tmp_path / "run"),
                      env=env, sets=SMALL + _sets(0, 1) + _sets(1, 1))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "no pretrained weights for 'resnet10t'" in done.stderr and "model.pretrained_file" in done.stderr


def test_early_stopping_ends_the_phase(tmp_path, tiny_imagenet, run_env):
    sets = SMALL + _sets(0, 6) + ["phases.0.lr_per_256=1e-12", "phases.0.early_stop_patience=2",
                                   "phases.0.early_stop_metric=val_top1", "phases.0.ema_decay=0"]
    run_dir = tmp_path / "early"
    done = run_recipe("folder_scratch.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=run_env, sets=sets)
    assert done.returncode == 0, done.stderr[-3000:]
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert history[-1]["early_stopped"] and "early stop" in done.stdout and len(history) < 6
    scores = [h["val_top1"] for h in history]
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))  # the first epoch with the best score
    assert best == len(history) - 3  # then 2 epochs without improvement: stop


def test_resume_across_a_phase_boundary(tmp_path, tiny_imagenet, run_env, pretrained):
    sets = SMALL + [f"model.pretrained_file={pretrained}"] + _sets(0, 2) + _sets(1, 3) + [
        "phases.1.unfreeze_at=1", "phases.1.ema_decay=0.9", "phases.1.early_stop_patience=0", "phases.1.checkpoint_every_steps=5"]
    data = ["--data", str(tiny_imagenet)]
    reference = tmp_path / "reference"
    done = run_recipe("folder_transfer.py", *data, "--run-dir", str(reference), env=run_env, sets=sets)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(recipe_command("folder_transfer.py", *data, "--run-dir", str(killed), sets=sets),
                            env=run_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:  # kill inside phase 2, after a checkpoint there
        if complete_checkpoints(killed / "finetune" / "checkpoints"):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"

    resumed = run_recipe("folder_transfer.py", *data, "--run-dir", str(killed), "--resume", "auto", env=run_env, sets=sets)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "phase finetune" in resumed.stdout and "[head" not in resumed.stdout  # phase 1 is not re-run
    ref_steps = (reference / "steps.jsonl").read_text().splitlines()
    assert (killed / "steps.jsonl").read_text().splitlines() == ref_steps
    last = lambda run: max(complete_checkpoints(run / "finetune" / "checkpoints"), key=lambda p: read_state(p)["total_step"])  # noqa: E731
    ref_w, new_w = load_file(last(reference) / "model.safetensors"), load_file(last(killed) / "model.safetensors")
    for name in ref_w:
        assert torch.equal(ref_w[name], new_w[name]), name
