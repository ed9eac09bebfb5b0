"""Every shipped recipe runs end to end on a tiny ImageNet-like folder, with its sizes overridden."""

from __future__ import annotations

import json

from conftest import run_recipe, two_cpu_launcher

SMALL = ["model.arch=resnet10t", "logging.progress_bar=false", "logging.log_every_steps=1", "data.loader_threads=1"]


def _phase_sets(index: int, epochs: int, batch: int, res: int = 32) -> list[str]:
    p = f"phases.{index}"
    return [f"{p}.epochs={epochs}", f"{p}.warmup_epochs=0", f"{p}.batch_size_per_device={batch}",
            f"{p}.res_px={res}", f"{p}.eval_res_px={res}", f"{p}.checkpoint_every_steps=0"]


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def test_imagenet_full_three_phases_in_two_processes(tmp_path, tiny_imagenet, run_env):
    launcher = two_cpu_launcher(29523)
    sets = SMALL + ["model.channels_last=false"]
    sets += _phase_sets(0, 2, 4) + ["phases.0.res_px_end=48", "phases.0.res_ramp_epochs=0,1", "phases.0.res_step_px=16"]
    sets += _phase_sets(1, 2, 4) + ["phases.1.res_px_end=48", "phases.1.res_ramp_epochs=0,1", "phases.1.res_step_px=16"]
    sets += _phase_sets(2, 1, 4) + ["phases.2.res_px_end=0", "phases.2.ema_decay=0.9"]
    run_dir = tmp_path / "imagenet"
    done = run_recipe("imagenet_full.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir),
                      env={**run_env, "ACCELERATE_USE_CPU": "1"}, sets=sets, launcher=launcher)
    assert done.returncode == 0, done.stderr[-4000:]
    history = _history(run_dir)
    assert [(h["phase"], h["epoch"]) for h in history] == [
        ("lowres_subset", 0), ("lowres_subset", 1), ("stronger_aug", 0), ("stronger_aug", 1), ("full", 0)]
    assert [h["res_px"] for h in history] == [32, 48, 32, 48, 32]  # progressive resizing per epoch
    assert all(h["val_samples"] == 24 for h in history)
    subset = json.loads((run_dir / "lowres_subset" / "subset.json").read_text())
    assert len(subset["indices"]) == 18 and set(subset["class_counts"].values()) == {6}  # 20% of 32 per class
    info = json.loads((run_dir / "run.json").read_text())
    assert info["num_processes"] == 2
    for phase in ("lowres_subset", "stronger_aug", "full"):
        sums = info["phases"][phase]["param_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1]
    assert "init: weights of" in done.stdout or "init: EMA weights of" in done.stdout


def test_folder_transfer_two_phases(tmp_path, tiny_imagenet, run_env, pretrained):
    sets = SMALL + [f"model.pretrained_file={pretrained}"]
    sets += _phase_sets(0, 1, 8) + _phase_sets(1, 3, 8) + ["phases.1.unfreeze_at=1", "phases.1.ema_decay=0.9"]
    run_dir = tmp_path / "transfer"
    done = run_recipe("folder_transfer.py", "--data", str(tiny_imagenet / "train"), "--run-dir", str(run_dir), env=run_env, sets=sets)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"pretrained resnet10t from {pretrained}" in done.stdout
    assert "new head" in done.stdout
    assert "[finetune 2/3] unfroze a stage" in done.stdout  # unfreeze_at=1: the second epoch
    assert [h["phase"] for h in _history(run_dir)] == ["head", "finetune", "finetune", "finetune"]


def test_folder_scratch(tmp_path, tiny_imagenet, run_env):
    sets = SMALL + _phase_sets(0, 2, 8) + ["phases.0.res_px_end=0", "phases.0.random_erasing=0.5"]
    run_dir = tmp_path / "scratch"
    done = run_recipe("folder_scratch.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=run_env, sets=sets)
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(_history(run_dir)) == 2
