"""Phases: init and heads, freezing and unfreezing, schedules, early stopping, subsets, the HF source,
and resume across a phase boundary."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import numpy as np
import pytest
import timm
import torch
from conftest import REPO, recipe_command, run_recipe
from safetensors.torch import load_file, save_file

from loaders.dali import TrainLoader
from loaders.sources import image_folder_splits, stratified_split
from trainer.checkpoint import complete_checkpoints, read_state
from trainer.loop import build_optimizer, early_stop_score
from trainer.recipe import Phase, Recipe, RecipeError
from trainer.transfer import apply_freeze, ensure_head, frozen_group_count, load_weights, stage_groups

SMALL = ["model.arch=resnet10t", "logging.progress_bar=false", "logging.log_every_steps=1", "data.loader_threads=1", "logging.wandb=false"]


def _sets(index: int, epochs: int, batch: int = 8) -> list[str]:
    p = f"phases.{index}"
    return [f"{p}.epochs={epochs}", f"{p}.warmup_epochs=0", f"{p}.batch_size_per_device={batch}",
            f"{p}.res_px=32", f"{p}.eval_res_px=32", f"{p}.checkpoint_every_steps=0", f"{p}.color_jitter=0"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet10t.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=1000).state_dict(), str(path))
    return path


# -- units ---------------------------------------------------------------------------------------


def test_init_must_name_an_earlier_phase():
    with pytest.raises(RecipeError, match="must name an earlier phase"):
        Recipe(name="r", phases=(Phase(name="a", init="phase:b"), Phase(name="b")))


def test_freeze_groups_and_unfreeze_schedule():
    model = timm.create_model("resnet10t", num_classes=3)
    groups = stage_groups(model)  # stem, 4 stages, head
    assert len(groups) == 6 and groups[-1] == ["fc.weight", "fc.bias"]
    phase = Phase(freeze="stages:2", unfreeze_at=(2, 4))
    assert [frozen_group_count(phase, 6, e) for e in range(6)] == [3, 3, 2, 2, 1, 1]
    assert frozen_group_count(Phase(freeze="backbone"), 6, 0) == 5
    apply_freeze(model, phase, epoch=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not trainable & set(groups[0] + groups[1]) and set(groups[2] + groups[5]) <= trainable


def test_head_is_kept_when_unchanged_and_init_skips_mismatched_heads(pretrained):
    model = timm.create_model("resnet10t", num_classes=3)
    assert ensure_head(model, "mlp:16", 3, 0.1)
    head_weight = model.fc[0].weight.clone()
    assert not ensure_head(model, "mlp:16", 3, 0.1)  # same shape: trained head survives
    assert torch.equal(model.fc[0].weight, head_weight)
    plain = timm.create_model("resnet10t", num_classes=3)
    skipped = load_weights(plain, load_file(pretrained), "test weights")
    assert sorted(skipped) == ["fc.bias", "fc.weight"]  # 1000 classes there, 3 here: head stays new
    assert torch.equal(plain.conv1[0].weight, load_file(pretrained)["conv1.0.weight"])
    with pytest.raises(RecipeError, match="does not fit"):
        load_weights(timm.create_model("resnet18", num_classes=3), load_file(pretrained), "test weights")


def _lrs(phase: Phase, updates_per_epoch: int = 10) -> list[float]:
    model = timm.create_model("resnet10t", num_classes=3)
    optimizer, scheduler = build_optimizer(model, phase, lr=1.0, updates_per_epoch=updates_per_epoch)
    out = []
    for step in range(phase.epochs * updates_per_epoch + 1):
        scheduler.step_update(step)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_step_and_onecycle_schedules():
    step = _lrs(Phase(epochs=6, schedule="step", decay_epochs=2, decay_rate=0.1))
    assert step[0] == pytest.approx(1.0) and step[25] == pytest.approx(0.1) and step[45] == pytest.approx(0.01)
    one = _lrs(Phase(epochs=10, schedule="onecycle"))
    assert one[0] == pytest.approx(1 / 25) and max(one) == pytest.approx(1.0)
    assert one.index(max(one)) == 30 and one[-1] == pytest.approx(1 / 25e4, rel=1e-2)


def test_plateau_schedule_cuts_lr_after_patience_and_resumes():
    model = timm.create_model("resnet10t", num_classes=3)
    phase = Phase(epochs=10, schedule="plateau", plateau_patience_epochs=1, decay_rate=0.5, warmup_epochs=1)
    optimizer, scheduler = build_optimizer(model, phase, lr=1.0, updates_per_epoch=5)
    scheduler.step_update(0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # warmup start
    lrs = []
    for epoch, top1 in enumerate([0.1, 0.2, 0.2, 0.2, 0.2, 0.2]):
        scheduler.epoch_end(top1)
        scheduler.step_update(5 * (epoch + 1))
        lrs.append(optimizer.param_groups[0]["lr"])
        if epoch == 2:
            saved = scheduler.state_dict()
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.25])
    _, again = build_optimizer(model, phase, lr=1.0, updates_per_epoch=5)
    again.load_state_dict(saved)  # resume after epoch 2: the patience counter comes back too
    again.epoch_end(0.2)
    again.step_update(20)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


def test_backbone_lr_multiplier_and_layer_decay_scale_groups():
    model = timm.create_model("resnet10t", num_classes=3)
    optimizer, scheduler = build_optimizer(model, Phase(backbone_lr_mult=0.1), lr=1.0, updates_per_epoch=5)
    scheduler.step_update(0)
    head = {id(p) for p in model.fc.parameters()}
    for group in optimizer.param_groups:
        in_head = {id(p) for p in group["params"]} <= head
        assert group["lr"] == pytest.approx(1.0 if in_head else 0.1)
    optimizer, scheduler = build_optimizer(model, Phase(layer_decay=0.5), lr=1.0, updates_per_epoch=5)
    scheduler.step_update(0)
    assert min(g["lr"] for g in optimizer.param_groups) < 0.1 < max(g["lr"] for g in optimizer.param_groups)


def test_early_stop_scores_are_higher_is_better():
    val, ema = {"top1": 0.5, "loss": 2.0}, {"top1": 0.6}
    assert early_stop_score("best_top1", val, ema) == 0.6
    assert early_stop_score("val_loss", val, None) == -2.0


def test_subset_is_stratified_and_seeded(tiny_imagenet):
    train, _ = image_folder_splits(tiny_imagenet)
    _, a = stratified_split(train.labels, 0.2, seed=7)
    _, b = stratified_split(train.labels, 0.2, seed=7)
    assert np.array_equal(a, b) and np.bincount(train.labels[a]).tolist() == [6, 6, 6]


def test_hf_dataset_source_matches_the_folder_source(tmp_path, tiny_imagenet):
    import datasets

    from loaders.hf import hf_splits

    folder_train, folder_val = image_folder_splits(tiny_imagenet)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(folder_train.classes))})

    def as_dataset(source):
        rows = {"image": [{"bytes": open(f, "rb").read(), "path": None} for f in source.files], "label": source.labels.tolist()}
        return datasets.Dataset.from_dict(rows, features=features)

    datasets.DatasetDict({"train": as_dataset(folder_train), "validation": as_dataset(folder_val)}).save_to_disk(str(tmp_path / "ds"))
    hf_train, hf_val = hf_splits(f"hf:{tmp_path / 'ds'}", 0.2, 0)
    as_dataset(folder_train).to_parquet(str(tmp_path / "train.parquet"))
    parquet_train, parquet_val = hf_splits(f"hf:{tmp_path / 'train.parquet'}", 0.25, 0)  # no val split: stratified
    assert parquet_train.classes == folder_train.classes and len(parquet_val) == 24
    assert hf_train.classes == folder_train.classes and len(hf_val) == len(folder_val)
    args = dict(batch_size=8, seed=3, res_px_for_epoch=lambda e: 32, decode_device="cpu", num_threads=1)
    for (x, y), (hx, hy) in zip(TrainLoader(folder_train, **args).epoch_batches(0), TrainLoader(hf_train, **args).epoch_batches(0)):
        assert torch.equal(x, hx) and torch.equal(y, hy)


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
