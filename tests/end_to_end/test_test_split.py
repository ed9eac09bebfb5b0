"""The untouched test split in a real run: scored once at the end with the weights the run hands on, in
eval.json and on the console; `eval --split test` gives the same figures (in 1 and 2 processes); and a run with a test split
selects exactly what the same run without one selects."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import wandb_files
from conftest import REPO, RESUME_SETS, assert_same_weights, history_without_timings, run_recipe, two_cpu_launcher

from trainer.__main__ import main
from trainer.run_folder import complete_checkpoints, read_state

TEST_IMAGES = 24  # tiny_imagenet_with_test: 3 classes x 8


@pytest.fixture(scope="module")
def with_test(tmp_path_factory, tiny_imagenet_with_test, run_env):
    """reference_run's recipe on reference_run's train and val, with a test/ folder beside them, and W&B
    (offline) on to receive the test scores: logging changes nothing the run selects."""
    run_dir = tmp_path_factory.mktemp("test-split") / "run"
    sets = RESUME_SETS + ["logging.wandb=true"]
    done = run_recipe("quickstart.py", "--data", str(tiny_imagenet_with_test), "--run-dir", str(run_dir), env=run_env, sets=sets)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done.stdout


def kept_checkpoints(run_dir) -> dict[str, dict]:
    return {p.name: read_state(p) for p in complete_checkpoints(run_dir / "main" / "checkpoints")}


def test_the_test_split_is_scored_once_and_selects_nothing(with_test, reference_run):
    run_dir, stdout = with_test
    record = json.loads((run_dir / "main" / "eval.json").read_text())
    section = record.pop("test")
    assert section["split"] == "test" and section["samples"] == TEST_IMAGES and section["source"] in ("model", "ema")
    assert np.sum(section["confusion"]) == TEST_IMAGES
    assert section["top1"] == pytest.approx(np.trace(section["confusion"]) / TEST_IMAGES)
    assert "checkpoints/step_" in section["weights"]
    (line,) = [x for x in stdout.splitlines() if x.startswith("test split")]
    assert f"top-1 {section['top1']:.4f}  top-5 {section['top5']:.4f}" in line and f"{TEST_IMAGES} images" in line
    info, reference_info = (json.loads((r / "run.json").read_text()) for r in (run_dir, reference_run))
    assert (info["test_images"], reference_info["test_images"]) == (TEST_IMAGES, 0)
    assert json.loads((run_dir / "bad_files.json").read_text())["skipped"] == []
    # On W&B: the summary's test/ keys, never a history row (nothing on the dashboard's curves selects on it).
    (run_file,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    summary = wandb_files.summary(run_file)
    assert summary["test/top1"] == pytest.approx(section["top1"]) and summary["test/samples"] == TEST_IMAGES
    assert summary["test/recall_macro"] == pytest.approx(section["recall_macro"]) and summary["test/source"] == section["source"]
    assert not any(key.startswith("test/") for row in wandb_files.history(run_file) for key in row)

    # Everything the run chose is what the same run without a test split chose.
    assert history_without_timings(run_dir) == history_without_timings(reference_run)
    assert kept_checkpoints(run_dir) == kept_checkpoints(reference_run)
    assert_same_weights(run_dir, reference_run)
    assert info["phases"] == reference_info["phases"]  # best top-1, its source and epoch, weights' checksums
    assert record == json.loads((reference_run / "main" / "eval.json").read_text())
    assert "test split" not in json.dumps(reference_info)


def test_eval_command_scores_the_test_split_as_the_run_did(with_test, reference_run, tmp_path, capsys):
    run_dir, _ = with_test
    out = tmp_path / "test.json"
    assert main(["eval", str(run_dir), "--split", "test", "--out", str(out)]) == 0
    assert "split test: 24 images" in capsys.readouterr().out
    scored = json.loads(out.read_text())
    section = json.loads((run_dir / "main" / "eval.json").read_text())["test"]
    assert scored["split"] == "test" and scored["samples"] == TEST_IMAGES
    block = scored[section["source"]]  # the eval command scores model and EMA; the run scored the one it hands on
    assert block["confusion"] == section["confusion"]
    assert {k: v for k, v in block.items() if k not in ("confusion", "per_class")} == pytest.approx(
        {k: section[k] for k in block if k not in ("confusion", "per_class")})
    assert main(["eval", str(run_dir), "--split", "val", "--out", str(tmp_path / "val.json")]) == 0
    assert json.loads((tmp_path / "val.json").read_text())["samples"] == 24

    assert main(["eval", str(reference_run), "--split", "test"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "has no test split" in err and "test_fraction" in err and err.count("\n") == 1


def test_two_process_eval_of_the_test_split_counts_each_image_once(with_test, tmp_path, run_env):
    run_dir, _ = with_test
    out = tmp_path / "ddp.json"
    cmd = two_cpu_launcher(29547) + ["-m", "trainer", "eval", str(run_dir), "--split", "test", "--out", str(out)]
    done = subprocess.run(cmd, env={**run_env, "ACCELERATE_USE_CPU": "1"}, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    section = json.loads((run_dir / "main" / "eval.json").read_text())["test"]
    assert record["samples"] == TEST_IMAGES and record[section["source"]]["confusion"] == section["confusion"]
