"""The README's main job, exactly as `make demo` runs it: the quickstart reaches >= 95% val top-1. And the README's
launch commands with accelerate_config.yaml (`accelerate-launch`, `accelerate launch`) run it as one process."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, run_recipe


@pytest.mark.slow
def test_quickstart_reaches_95_percent(tmp_path, run_env):
    # `make demo`: $(BIN)/python recipes/quickstart.py (one process needs no launcher)
    run_dir = tmp_path / "quickstart"
    done = run_recipe("quickstart.py", "--run-dir", str(run_dir), env=run_env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run folder: {run_dir}" in done.stdout
    assert "img_s=" in done.stderr  # the progress bar shows images/s
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    final = history[-1]
    assert max(final["val_top1"], final["ema_val_top1"]) >= 0.95
    info = json.loads((run_dir / "run.json").read_text())
    assert (info["train_images"], info["val_images"]) == (1438, 359)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", [["accelerate-launch"], ["accelerate", "launch"]], ids=["accelerate-launch", "accelerate-launch-cli"])
def test_the_launch_config_runs_the_quickstart_as_one_process(tmp_path, run_env, launcher):
    # The README's launch commands with the repository's accelerate_config.yaml: one process, nothing distributed.
    command = [shutil.which(launcher[0], path=str(REPO / ".venv" / "bin")) or launcher[0], *launcher[1:], "--config_file", str(REPO / "accelerate_config.yaml")]
    run_dir = tmp_path / "launched"
    done = run_recipe("quickstart.py", "--run-dir", str(run_dir), env=run_env, launcher=command,
                      sets=["phases.0.epochs=1", "phases.0.warmup_epochs=0"], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert (info["distributed_type"], info["num_processes"], len(info["processes"])) == ("NO", 1, 1)
    assert len((run_dir / "history.jsonl").read_text().splitlines()) == 1
