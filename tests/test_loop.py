"""Pieces of the loop: precision choice, optimizer groups, the LR as a function of the update count,
and a run with accumulation, clipping and channels_last."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import FAST, run_recipe

from trainer.loop import build_optimizer, resolve_precision
from trainer.recipe import Phase


def test_auto_precision_is_fp32_on_cpu():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_no_weight_decay_on_norms_and_biases():
    model = timm.create_model("resnet10t", num_classes=3)
    optimizer, _ = build_optimizer(model, Phase(weight_decay=0.05), lr=0.1, updates_per_epoch=10)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        expected = 0.0 if param.ndim <= 1 else 0.05  # biases and BatchNorm weights are 1-D
        assert decay_of[id(param)] == expected, name


def test_lr_is_a_pure_function_of_the_update_count():
    phase = Phase(epochs=4, warmup_epochs=1, min_lr_ratio=0.01)
    model = timm.create_model("resnet10t", num_classes=3)
    optimizer, scheduler = build_optimizer(model, phase, lr=0.4, updates_per_epoch=10)
    walked = []
    for step in range(41):
        scheduler.step_update(step)
        walked.append(optimizer.param_groups[0]["lr"])
    assert walked[0] == pytest.approx(0.004) and walked[10] == pytest.approx(0.4)  # warmup to the peak
    assert walked[40] == pytest.approx(0.004, rel=1e-3) and walked[25] < walked[15]  # cosine to min
    fresh_opt, fresh = build_optimizer(model, phase, lr=0.4, updates_per_epoch=10)
    fresh.step_update(27)  # what resume does: jump straight to the update count
    assert fresh_opt.param_groups[0]["lr"] == walked[27]


def test_accumulation_clipping_channels_last_run(tmp_path, tiny_imagenet, run_env):
    run_dir = tmp_path / "accum"
    sets = FAST + [
        "phases.0.epochs=1", "phases.0.warmup_epochs=0", "phases.0.grad_accum_steps=3", "phases.0.clip_grad_norm=1.0",
        "model.channels_last=true", "logging.wandb=false",
    ]
    done = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=run_env, sets=sets)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [s["total_step"] for s in steps] == [1, 2, 3, 4]  # 12 batches of 8 / 3 per update
    # The LR is scaled by the global batch: 8 per device x 3 accumulated = 24 images per update.
    recipe = json.loads((run_dir / "recipe.json").read_text())
    peak = recipe["phases"][0]["lr_per_256"] * 24 / 256
    assert max(s["lr"] for s in steps) <= peak + 1e-12
