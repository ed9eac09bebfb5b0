"""`python -m trainer lr-find`: a real range test on the tiny folder writes only its plot and series, and bad input stops cleanly."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from conftest import FAST, REPO

from trainer.__main__ import load_recipe
from trainer.recipe import apply_overrides

RECIPE_FILE = REPO / "recipes" / "quickstart.py"
START_LR, END_LR, STEPS = 1e-7, 10.0, 30
BATCHES_PER_EPOCH = 12  # 96 tiny training images / batch 8


def lr_find_command(*args: str, sets: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "trainer", "lr-find", str(RECIPE_FILE), *args]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def recipe_bytecode() -> list:
    # Only this recipe's: other files in recipes/ may come and go while the tests run.
    return sorted((REPO / "recipes" / "__pycache__").glob("quickstart.*"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_imagenet, run_env):
    """The real run and the two refused ones, started together (the refused ones are mostly imports)."""
    before = {"recipe": RECIPE_FILE.read_bytes(), "bytecode": recipe_bytecode()}
    commands = {
        "ok": lr_find_command("--data", str(tiny_imagenet), "--steps", str(STEPS), "--start-lr", str(START_LR), "--end-lr", str(END_LR), sets=FAST),
        "bad_phase": lr_find_command("--data", str(tiny_imagenet), "--phase", "nope", sets=FAST),
        "bad_key": lr_find_command("--data", str(tiny_imagenet), sets=FAST + ["phases.0.epoch=1"]),
    }
    cwds = {name: tmp_path_factory.mktemp(f"lr-find-{name}") for name in commands}
    procs = {
        name: subprocess.Popen(cmd, cwd=cwds[name], env=run_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in commands.items()
    }
    done = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[name] = (proc.returncode, stdout, stderr, cwds[name])
    return done, before


@pytest.fixture(scope="module")
def ok_run(runs):
    returncode, stdout, stderr, cwd = runs[0]["ok"]
    assert returncode == 0, stderr[-3000:]
    return stdout, cwd, json.loads((cwd / "lr_find.json").read_text())


def test_writes_only_the_plot_and_its_series(runs, ok_run):
    done, before = runs
    stdout, cwd, _ = ok_run
    # No run folder, checkpoint or W&B files: the working directory holds exactly the two outputs.
    assert sorted(p.name for p in cwd.iterdir()) == ["lr_find.json", "lr_find.png"]
    png = (cwd / "lr_find.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 400 and height >= 300
    assert "plot: lr_find.png" in stdout and "series: lr_find.json" in stdout
    # The recipe was imported, not rewritten, and left no bytecode beside it.
    assert RECIPE_FILE.read_bytes() == before["recipe"]
    assert recipe_bytecode() == before["bytecode"]
    for _, _, _, refused_cwd in (done["bad_phase"], done["bad_key"]):
        assert list(refused_cwd.iterdir()) == []


def test_series_rises_from_start_to_end_or_stops_at_the_blow_up(ok_run):
    _, _, result = ok_run
    lrs = [p["lr"] for p in result["series"]]
    losses = [p["loss"] for p in result["series"]]
    smoothed = [p["smoothed"] for p in result["series"]]
    assert lrs[0] == pytest.approx(START_LR)
    assert all(a < b for a, b in zip(lrs, lrs[1:]))
    assert all(math.isfinite(v) for v in losses + smoothed)
    # 30 steps on a 12-batch epoch: the test carried on into the next epochs.
    assert len(lrs) > BATCHES_PER_EPOCH
    if result["stop_reason"] == "end_lr reached":
        assert len(lrs) == STEPS and lrs[-1] == pytest.approx(END_LR)
    else:
        assert result["stop_reason"] == "diverged" and len(lrs) <= STEPS
        assert smoothed[-1] > 4 * min(smoothed)
        assert max(smoothed[:-1]) <= 4 * min(smoothed)  # and not a step earlier


def test_prints_a_suggestion_and_a_set_line_that_parses(ok_run):
    stdout, _, result = ok_run
    suggested = float(re.search(r"^suggested lr: (\S+)", stdout, re.M).group(1))
    assert START_LR <= suggested <= END_LR
    assert suggested == pytest.approx(result["suggested_lr"], rel=5e-3)
    assert "global batch of 8:" in stdout
    override = re.search(r"^\s*--set (\S+)$", stdout, re.M).group(1)
    assert override.startswith("phases.0.lr_per_256=")
    recipe = apply_overrides(load_recipe(str(RECIPE_FILE)), [override])
    # lr_per_256 is the LR for 256 images: the tested global batch was 8.
    assert recipe.phases[0].lr_per_256 == pytest.approx(suggested * 256 / 8, rel=5e-3)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("bad_phase", "error: unknown phase 'nope'; the phases of recipe 'quickstart' are: main"),
        ("bad_key", "error: unknown key 'epoch' in 'phases.0.epoch' under phases.0 (did you mean 'epochs'?)"),
    ],
)
def test_bad_phase_or_override_stops_with_exit_2_and_no_traceback(runs, name, expected):
    done, _ = runs
    returncode, stdout, stderr, _ = done[name]
    assert returncode == 2, stderr[-3000:]
    assert expected in stderr
    assert "Traceback" not in stderr and "Traceback" not in stdout
