"""The README's main job, exactly as `make demo` runs it: the quickstart reaches >= 95% val top-1."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import REPO, run_recipe

from loaders.digits import digits_folder
from loaders.sources import image_folder_splits


def test_digits_are_written_once_as_a_jpeg_image_folder(tmp_path):
    folder = digits_folder(tmp_path)
    files = sorted(folder.rglob("*.jpg"))
    assert len(files) == 1797 and sorted(p.name for p in folder.iterdir()) == [str(d) for d in range(10)]
    stamp = files[0].stat().st_mtime_ns
    assert digits_folder(tmp_path) == folder and files[0].stat().st_mtime_ns == stamp  # cached
    train, val = image_folder_splits(folder, val_fraction=0.2, seed=0)
    assert (len(train), len(val)) == (1438, 359)
    assert all(135 <= n <= 150 for n in train.class_counts().values())  # 80% of ~180 per class


@pytest.mark.slow
def test_quickstart_reaches_95_percent(tmp_path, run_env):
    launcher = [shutil.which("accelerate", path=str(REPO / ".venv" / "bin")) or "accelerate", "launch", "--config_file", str(REPO / "accelerate_config.yaml")]
    run_dir = tmp_path / "quickstart"
    done = run_recipe("quickstart.py", "--run-dir", str(run_dir), env=run_env, launcher=launcher, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"run folder: {run_dir}" in done.stdout
    assert "img_s=" in done.stderr  # the progress bar shows images/s
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    final = history[-1]
    assert max(final["val_top1"], final["ema_val_top1"]) >= 0.95
    info = json.loads((run_dir / "run.json").read_text())
    assert (info["train_images"], info["val_images"]) == (1438, 359)
