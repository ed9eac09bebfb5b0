"""Training through bad data (`bad_files`): a run skips and lists the bad files, converts the rest, replaces
what fails only in the decoder, and 2 processes stay in lockstep."""

from __future__ import annotations

import json

from bad_files import SKIPPED, by_name
from conftest import CLASSES, FAST, run_recipe, two_cpu_launcher

from loaders.header_table import load_cache


def test_training_skips_bad_files_converts_the_rest_and_logs_them(bad_folder, tmp_path, run_env):
    run_dir = tmp_path / "run"
    sets = FAST + ["phases.0.epochs=1", "phases.0.warmup_epochs=0", "phases.0.batch_size_per_device=6", "logging.wandb=false"]
    done = run_recipe("quickstart.py", "--data", str(bad_folder), "--run-dir", str(run_dir), env=run_env, sets=sets)
    assert done.returncode == 0, done.stderr[-4000:]

    info = json.loads((run_dir / "run.json").read_text())
    assert (info["train_images"], info["val_images"]) == (54, 14)  # the 4 SKIPPED files left out, nothing else
    record = json.loads((run_dir / "bad_files.json").read_text())
    assert record["policy"] == "skip"
    assert by_name(record["skipped"]) == set(SKIPPED.items())
    assert record["converted"] == {"cmyk": 1, "greyscale": 1, "16-bit": 1}
    assert record["kept"] == {"huge": 1, "tiny": 1}
    assert "bad files: skipped 4 (truncated 2, zero-byte 1, not-an-image 1)" in done.stdout
    # The files were listed and stat'ed by the survey's child processes while the run imported torch.
    assert "listed and stat'ed beside the imports (72 files" in done.stdout
    assert str(bad_folder / "train" / CLASSES[0] / "empty.JPEG") in done.stdout
    assert "converted to RGB by the decoder: 3 files" in done.stdout
    # Bit rot surfaced in the decoder mid-epoch: replaced and logged with its path, not a crash.
    assert f"bad training file replaced: {bad_folder / 'train' / CLASSES[2] / 'bitrot.png'}" in done.stderr
    assert f"bad val file replaced: {bad_folder / 'val' / CLASSES[2] / 'bitrot_val.png'}" in done.stderr
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["val_samples"] == 13  # the bit-rotted val file is not scored


def test_two_processes_train_through_bad_files(bad_folder, tmp_path, run_env):
    launcher = two_cpu_launcher(29541)
    # A cache of its own, empty: the two processes share out the structure check of all 72 files.
    env = {**run_env, "ACCELERATE_USE_CPU": "1", "IMGCLS_HEADER_CACHE": str(tmp_path / "headers")}
    run_dir = tmp_path / "ddp"
    sets = FAST + ["phases.0.epochs=1", "phases.0.warmup_epochs=0", "phases.0.batch_size_per_device=9", "logging.wandb=false"]
    done = run_recipe("quickstart.py", "--data", str(bad_folder), "--run-dir", str(run_dir), env=env, sets=sets, launcher=launcher)
    assert done.returncode == 0, done.stderr[-4000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["num_processes"] == 2 and info["train_images"] == 54
    # Both ranks ended with the same files, labels, sizes and findings, and the main one wrote the cache.
    assert len(info["data_checksums"]) == 2 and info["data_checksums"][0] == info["data_checksums"][1]
    assert "structure check: 72 files, 72 read, 0 from the cache" in done.stdout
    assert "listed and stat'ed beside the imports (72 files" in done.stdout  # by each process's survey
    (cache,) = (tmp_path / "headers").glob("*.npz")
    assert len(load_cache(cache, bad_folder).table) == 72
    checksums = info["phases"]["main"]["param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # both ranks took every step together
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert steps[-1]["total_step"] == 3  # 54 images / 2 ranks / 9 per batch
    assert "bitrot.png" in done.stderr  # the rank that met it replaced it and said so
