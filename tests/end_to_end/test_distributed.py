"""Two real processes through `accelerate launch` (gloo on CPU): DDP, sharding and eval counted once."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import FAST, run_recipe, two_cpu_launcher
from sklearn.metrics import balanced_accuracy_score, f1_score


def test_two_cpu_processes_train_in_lockstep(tmp_path, tiny_imagenet, run_env):
    launcher = two_cpu_launcher(29517)
    env = {**run_env, "ACCELERATE_USE_CPU": "1"}
    run_dir = tmp_path / "ddp"
    sets = FAST + ["phases.0.epochs=2", "phases.0.ema_decay=0.9", "phases.0.batch_size_per_device=5"]
    done = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=env, sets=sets, launcher=launcher)
    assert done.returncode == 0, done.stderr[-4000:]

    info = json.loads((run_dir / "run.json").read_text())
    # A launch that silently ran one process would say NO / 1 here.
    assert info["distributed_type"] == "MULTI_CPU" and info["num_processes"] == 2
    checksums = info["phases"]["main"]["param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]

    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2
    for record in history:
        assert record["val_samples"] == 24  # 24 val images over 2 ranks in batches of 5: padding dropped
        assert 0 <= record["train_top1"] <= 1
    # Macro F1 and balanced accuracy come from the confusion gathered from both ranks: the same as
    # scikit-learn's on the (true, predicted) pairs eval.json's confusion holds.
    confusion = np.array(json.loads((run_dir / "main" / "eval.json").read_text())["model"]["confusion"])
    assert confusion.sum() == 24
    pairs = np.argwhere(np.ones_like(confusion)).repeat(confusion.ravel(), axis=0)
    assert history[-1]["val_macro_f1"] == pytest.approx(f1_score(pairs[:, 0], pairs[:, 1], average="macro"))
    assert history[-1]["val_balanced_accuracy"] == pytest.approx(balanced_accuracy_score(pairs[:, 0], pairs[:, 1]))
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    # 96 images / 2 ranks = 48 each → 9 batches of 5 per epoch: every rank steps together.
    assert steps[-1]["total_step"] == 18
