"""A real run on a skewed folder with data.balance="loss" and early stopping on macro F1: the counts, ratio,
hint and class weights in run.json and on the console, parameter counts per phase (run.json, model card,
compare), history's train top-1 and class-averaged scores, the checkpoint ranking; a real run on the same
folder with data.balance="sampler": run.json's record, and the classes its loader fed, balanced; and
check-data's report of the same folder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from conftest import CLASSES, FAST, REPO, run_recipe, write_image_folder

from loaders.dali import TrainLoader
from loaders.sources import scan_image_folder
from trainer.compare import comparison_table, summarize_run
from trainer.export import parameter_table
from trainer.recipe import recipe_from_dict
from trainer.run_folder import HISTORY, PARTS_FILE, best_checkpoint, complete_checkpoints, read_jsonl, read_state

TRAIN, VAL = (32, 8, 4), (8, 8, 2)  # ratio 8 in train, 4 in val


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("skewed"), {"train": 32, "val": 8})
    for split, keep in (("train", TRAIN), ("val", VAL)):
        for wnid, count in zip(CLASSES, keep):
            for extra in sorted((root / split / wnid).iterdir())[count:]:
                extra.unlink()
    return root


@pytest.fixture(scope="module")
def weighted_run(tmp_path_factory, skewed, run_env):
    run_dir = tmp_path_factory.mktemp("runs") / "weighted"
    sets = FAST + ["phases.0.epochs=2", "phases.0.ema_decay=0.9", "data.balance=loss", "phases.0.early_stop_metric=val_macro_f1",
                   "phases.0.keep_best_k=1", "logging.wandb=false"]
    done = run_recipe("quickstart.py", "--data", str(skewed), "--run-dir", str(run_dir), env=run_env, sets=sets)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done


def test_run_json_has_counts_ratio_weights_and_parameters(weighted_run):
    run_dir, done = weighted_run
    info = json.loads((run_dir / "run.json").read_text())
    balance = info["class_balance"]
    assert balance["train"] == {"counts": dict(zip(CLASSES, TRAIN)), "ratio": 8.0}
    assert balance["val"] == {"counts": dict(zip(CLASSES, VAL)), "ratio": 4.0}
    # data.balance=loss and a class-averaged early_stop_metric: the run already does what the hint would say.
    assert balance["balance"] == "loss" and balance["hint"] is None and "hint: classes are unbalanced" not in done.stdout
    n, k = sum(TRAIN), len(TRAIN)
    expected = {c: n / (k * count) for c, count in zip(CLASSES, TRAIN)}
    assert balance["loss_weights"] == pytest.approx(expected)
    assert info["phases"]["main"]["loss_weights"] == pytest.approx(expected)
    total = sum(p.numel() for p in timm.create_model("resnet10t", num_classes=3).parameters())
    assert info["phases"]["main"]["params"] == {"total": total, "trainable": total, "frozen": 0}
    recipe = recipe_from_dict(json.loads((run_dir / "recipe.json").read_text()))
    assert f"| main | {total:,} | {total:,} | 0 |" in parameter_table(info["phases"], recipe)
    assert any(line.startswith("weighted parameters: main") and "trainable, 0 frozen" in line
               for line in comparison_table([summarize_run(run_dir)]))


def test_history_has_train_top1_and_class_averaged_scores_that_rank_checkpoints(weighted_run):
    run_dir, done = weighted_run
    history = read_jsonl(run_dir / HISTORY)
    assert len(history) == 2
    for record in history:
        for key in ("train_top1", "val_macro_f1", "val_balanced_accuracy", "ema_val_macro_f1", "ema_val_balanced_accuracy"):
            assert 0 <= record[key] <= 1, key
    assert "train_top1" in done.stdout and "val_macro_f1" in done.stdout
    checkpoints = [read_state(c) for c in complete_checkpoints(run_dir / "main" / "checkpoints")]
    for state in checkpoints:
        record = history[state["epoch"] - 1]
        assert state["rank_score"] == max(record["val_macro_f1"], record["ema_val_macro_f1"])
        assert state["last_val"]["rank_by"] == "macro_f1"
    best = read_state(best_checkpoint(run_dir / "main" / "checkpoints"))
    assert best["rank_score"] == max(max(r["val_macro_f1"], r["ema_val_macro_f1"]) for r in history)


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory, skewed, run_env):
    run_dir = tmp_path_factory.mktemp("runs") / "sampled"
    sets = FAST + ["phases.0.epochs=2", "data.balance=sampler", "logging.wandb=false"]
    done = run_recipe("quickstart.py", "--data", str(skewed), "--run-dir", str(run_dir), env=run_env, sets=sets)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done


def test_sampler_run_records_the_balance_and_feeds_the_classes_equally(sampled_run, skewed):
    run_dir, done = sampled_run
    info = json.loads((run_dir / "run.json").read_text())
    balance = info["class_balance"]
    assert balance["balance"] == "sampler" and "loss_weights" not in balance
    # The order is balanced already; the hint is left with the early-stopping score (top-1 here).
    assert "data.balance" not in balance["hint"] and "early_stop_metric=val_macro_f1" in balance["hint"]
    assert f"hint: {balance['hint']}" in done.stdout
    assert balance["train"] == {"counts": dict(zip(CLASSES, TRAIN)), "ratio": 8.0}
    assert balance["val"] == {"counts": dict(zip(CLASSES, VAL)), "ratio": 4.0}
    assert "loss_weights" not in info["phases"]["main"]
    history = read_jsonl(run_dir / HISTORY)
    assert len(history) == 2 and all(0 <= r["train_top1"] <= 1 for r in history)

    # The classes the model was fed: the run's own loader position (seed, images, processes, batch and
    # balance, as its checkpoint holds them) given to a real loader over the same training images, and
    # its two epochs read back. load_state_dict refuses a position written for another seed, other
    # images or another data.balance, so these are the batches the run trained on.
    recipe = recipe_from_dict(json.loads((run_dir / "recipe.json").read_text()))
    checkpoint = max(complete_checkpoints(run_dir / "main" / "checkpoints"), key=lambda c: read_state(c)["total_step"])
    position = torch.load(checkpoint / PARTS_FILE, weights_only=False)["loader"]
    assert position["balance"] == "sampler" and position["world_size"] == 1
    loader = TrainLoader(scan_image_folder(skewed / "train"), batch_size=recipe.phases[0].batch_size_per_device,
                         seed=position["seed"], res_px_for_epoch=lambda epoch: 32, decode_device="cpu", balance="sampler")
    loader.load_state_dict(position)
    fed = np.concatenate([labels.numpy() for epoch in range(2) for _, labels in loader.epoch_batches(epoch)]).astype(np.int64)
    assert len(fed) == 2 * (sum(TRAIN) // 8) * 8  # whole batches of 8, as many as an unbalanced epoch has
    shares = np.bincount(fed, minlength=3) / len(fed)
    # Unbalanced, the shares would be 32:8:4 (0.73, 0.18, 0.09); balanced, about a third each.
    assert shares.max() < 0.45 and shares.min() > 0.22, shares
    assert np.bincount(fed, minlength=3)[2] > 2 * TRAIN[2]  # the rarest class's 4 images repeat within the epochs


def test_check_data_reports_the_ratio_and_the_hint(skewed, run_env):
    done = subprocess.run([sys.executable, "-m", "trainer", "check-data", str(skewed), "--structure-only"],
                          cwd=REPO, env=run_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("train: imbalance ratio 8.0 (largest/smallest class)") for line in lines), done.stdout
    assert any(line.startswith("val: imbalance ratio 4.0") for line in lines)
    assert any(line.startswith("hint: classes are unbalanced") and "data.balance=loss" in line for line in lines)
