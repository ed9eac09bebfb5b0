"""A real short training run: history, checkpoints, the resolved recipe, and W&B offline files read back;
and a run with gradient accumulation, clipping and channels_last."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import timm
import wandb_files
from conftest import FAST, REPO, run_recipe
from safetensors.torch import load_file

from trainer.optim import build_optimizer
from trainer.recipe import recipe_from_dict
from trainer.run_folder import STATE_FILE, read_state

SETS = FAST + ["phases.0.epochs=3", "phases.0.checkpoint_every_steps=5", "phases.0.keep_best_k=1", "phases.0.ema_decay=0.9"]


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_imagenet, run_env):
    run_dir = tmp_path_factory.mktemp("runs") / "short"
    done = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=run_env, sets=SETS)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done


def test_prints_the_run_folder(short_run):
    run_dir, done = short_run
    assert f"run folder: {run_dir}" in done.stdout


def test_history_has_one_line_per_epoch_with_the_metrics(short_run):
    run_dir, _ = short_run
    lines = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2]
    for r in lines:
        for key in ("phase", "epoch", "train_loss", "val_top1", "val_top5", "ema_val_top1", "lr", "images_per_s"):
            assert r[key] is not None, key
        assert r["val_samples"] == 24  # each val image counted once
        assert 0 <= r["val_top1"] <= r["val_top5"] <= 1 and r["images_per_s"] > 0
    assert lines[-1]["train_loss"] < lines[0]["train_loss"]  # it learns
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [s["total_step"] for s in steps] == list(range(1, 37))  # 96 images / 8 = 12 steps x 3 epochs


def test_resolved_recipe_and_git_commit_are_recorded(short_run):
    run_dir, _ = short_run
    recipe = json.loads((run_dir / "recipe.json").read_text())
    assert recipe["phases"][0]["epochs"] == 3 and recipe["model"]["arch"] == "resnet10t"
    info = json.loads((run_dir / "run.json").read_text())
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert info["git"]["commit"] == head and re.fullmatch(r"[0-9a-f]{40}", head)
    assert info["distributed_type"] == "NO" and info["num_processes"] == 1


def test_checkpoints_keep_last_and_best_and_are_complete(short_run):
    run_dir, _ = short_run
    folders = sorted((run_dir / "main" / "checkpoints").iterdir())
    assert not [f for f in folders if f.name.startswith(".tmp")]
    states = [read_state(f) for f in folders]
    assert 1 <= len(folders) <= 2
    assert max(s["total_step"] for s in states) == 36  # the last, at the end of epoch 3
    best = max(json.loads(line)["val_top1"] for line in (run_dir / "history.jsonl").read_text().splitlines())
    best_ema = max(json.loads(line)["ema_val_top1"] for line in (run_dir / "history.jsonl").read_text().splitlines())
    assert max(s["val_top1"] for s in states if s["val_top1"] is not None) == max(best, best_ema)
    for folder in folders:
        assert (folder / STATE_FILE).is_file() and (folder / "optimizer.bin").is_file()
        weights = load_file(folder / "model.safetensors")
        assert "fc.weight" in weights and weights["fc.weight"].shape[0] == 3


def test_wandb_offline_files_hold_the_metrics_and_config(short_run):
    run_dir, _ = short_run
    (run_file,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    rows = wandb_files.history(run_file)
    logged = [r["val/top1"] for r in rows if "val/top1" in r]
    history = [json.loads(line)["val_top1"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(history)
    assert max(r["_step"] for r in rows) == 36
    assert any("train/loss" in r for r in rows)
    config = wandb_files.config(run_file)
    assert config["phases"][0]["epochs"] == 3 and config["git"]["commit"]
    info = json.loads((run_dir / "run.json").read_text())
    assert run_file.name == f"run-{info['wandb_id']}.wandb"


def test_throughput_report_per_epoch_and_at_the_end(short_run):
    run_dir, done = short_run
    lines = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    for r in lines:
        assert 0 <= r["data_wait_share"] < 1
        assert 0 < r["step_ms_p50"] <= r["step_ms_p90"] <= r["step_ms_p99"]
        assert r["skipped_steps"] == 0
    # The end-of-run screen: one line for the phase, and a verdict that matches the figures.
    summary = json.loads((run_dir / "run.json").read_text())["throughput"]["main"]
    mean_wait = sum(r["data_wait_share"] for r in lines) / len(lines)
    assert summary["data_wait_share"] == pytest.approx(mean_wait)
    assert summary["bottleneck"] == ("loader" if mean_wait >= 0.10 else "model")
    assert "throughput (per phase, mean over epochs):" in done.stdout
    assert f"the {summary['bottleneck']} was the bottleneck" in done.stdout
    (run_file,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    logged = [r for r in wandb_files.history(run_file) if "system/data_wait_share" in r]
    assert [r["system/data_wait_share"] for r in logged] == pytest.approx([r["data_wait_share"] for r in lines])
    assert all("system/step_ms_p90" in r for r in logged)


# The quickstart run as a user starts it, watched from inside: a global optimizer-step hook sees the
# gradients after the loop clipped them, and a hook on the model sees the memory layout of its input.
OBSERVED = """
import json, sys
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from trainer import launch
from trainer.__main__ import load_recipe

OUT, seen = sys.argv[1], {{"grad_norms": [], "input_channels_last": []}}


def after_clipping(optimizer, args, kwargs):  # every optimizer step, after the loop clipped the gradients
    grads = [p.grad.flatten() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    seen["grad_norms"].append(float(torch.linalg.vector_norm(torch.cat(grads))))


register_optimizer_step_pre_hook(after_clipping)
create_model = launch.create_model


def watched(recipe, num_classes):
    model = create_model(recipe, num_classes)

    def layout(module, args):
        if module.training:
            x = args[0]
            seen["input_channels_last"].append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())

    model.register_forward_pre_hook(layout)
    return model


launch.create_model = watched
try:
    launch.run(load_recipe({recipe!r}), sys.argv[2:])
finally:
    with open(OUT, "w") as f:
        json.dump(seen, f)
"""


def test_accumulation_clipping_channels_last_run(tmp_path, tiny_imagenet, run_env):
    run_dir = tmp_path / "accum"
    clip = 0.05  # below every gradient norm of this model: each update is clipped to exactly this norm
    sets = FAST + [
        "phases.0.epochs=1", "phases.0.warmup_epochs=0", "phases.0.grad_accum_steps=3", f"phases.0.clip_grad_norm={clip}",
        "model.channels_last=true", "logging.wandb=false",
    ]
    script, seen_file = tmp_path / "observed.py", tmp_path / "seen.json"
    script.write_text(OBSERVED.format(recipe=str(REPO / "recipes" / "quickstart.py")))
    cmd = [sys.executable, str(script), str(seen_file), "--data", str(tiny_imagenet), "--run-dir", str(run_dir)]
    done = subprocess.run([*cmd, *(i for item in sets for i in ("--set", item))], env=run_env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [s["total_step"] for s in steps] == [1, 2, 3, 4]  # 12 batches of 8 / 3 per update
    # The LR is scaled by the global batch, 8 per device x 3 accumulated = 24 images per update, and
    # follows the phase's cosine schedule from that peak: the same values, step by step.
    recipe = recipe_from_dict(json.loads((run_dir / "recipe.json").read_text()))
    peak = recipe.phases[0].lr_per_256 * 24 / 256
    optimizer, schedule = build_optimizer(timm.create_model("resnet10t", num_classes=3), recipe.phases[0], peak, updates_per_epoch=4)
    for record in steps:
        schedule.step_update(record["total_step"])
        assert record["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9), record
    seen = json.loads(seen_file.read_text())
    # Clipping: 4 updates, each with its gradient norm brought down to the limit.
    assert seen["grad_norms"] == pytest.approx([clip] * 4, rel=1e-4)
    # channels_last: every training batch reaches the model in NHWC memory (12 batches).
    assert seen["input_channels_last"] == [True] * 12
