"""Bad command lines as users type them, as real processes: exit status 2, one error line, no run folder;
and seeded random override lists the same way."""

from __future__ import annotations

import dataclasses
import random
import resource
import subprocess

from conftest import REPO, fill_placeholders, recipe_command

from trainer.recipe import Data, Logging, Model, Phase, Push


def test_cli_typo_stops_before_any_work(tmp_path, run_env):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        recipe_command("quickstart.py", "--run-dir", str(run_dir), sets=["phases.0.epoch=2"]),
        env=run_env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "error: unknown key 'epoch'" in done.stderr and "epochs" in done.stderr
    assert "Traceback" not in done.stderr
    assert not run_dir.exists()


def test_cli_missing_data_folder_is_a_clear_error(tmp_path, run_env):
    done = subprocess.run(
        recipe_command("quickstart.py", "--data", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "run")),
        env=run_env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "--data" in done.stderr
    assert not (tmp_path / "run").exists()


# A few as users type them, as real processes (run side by side): nothing but the one line on the way out.
SUBPROCESS_CASES = [
    (["--set", "phases.0.lr_per_256=nan"], "takes a finite number"),
    (["--set", "model.arch=resnet181"], "is not a timm model"),
    (["--set", "phases.0.init={five}"], "holds a head for 5 classes"),
]


def test_bad_command_lines_as_processes(tmp_path, tiny_imagenet, files, run_env):
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    runs = []
    for i, (args, expected) in enumerate(SUBPROCESS_CASES):
        run_dir = tmp_path / f"run{i}"
        cmd = recipe_command("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), *fill_placeholders(args, files, tmp_path))
        runs.append((subprocess.Popen(cmd, env=run_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), run_dir, expected))
    for process, run_dir, expected in runs:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 2, err[-3000:]
        error_lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(error_lines) == 1 and expected in error_lines[0], err[-3000:]
        assert "Traceback" not in err
        assert not run_dir.exists()
    # "Within seconds": CPU time, which other work on a shared machine does not stretch (imports are ~7 s of it).
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    assert cpu_s < 30 * len(runs)


def _random_overrides(rng: random.Random) -> list[str]:
    """1-3 overrides on real key paths with values of every kind: wrong, hostile, or fine."""
    sections = {"model": Model, "data": Data, "logging": Logging, "push": Push}
    keys = [f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls)]
    keys += [f"phases.{p}.{f.name}" for p in ("0", "-1", "main") for f in dataclasses.fields(Phase)] + ["seed", "name"]
    values = ["nan", "inf", "-1", "0", "1", "3", "0.5", "1e400", "9" * 30, "", "0.5,1", "true", "mlp:0", "²", "a/b", "linear"]
    return [f"{rng.choice(keys)}={rng.choice(values)}" for _ in range(rng.randint(1, 3))]


def test_random_overrides_as_processes(tmp_path, run_env):
    """A few random override lists (seeded) as real `python recipes/quickstart.py` processes with data that
    are not there, run side by side: whether the overrides are wrong or fine, each stops with exit
    status 2 and one `error:` line, no traceback and no run folder."""
    rng = random.Random(20261204)
    runs = []
    for i in range(4):
        run_dir, sets = tmp_path / f"run{i}", _random_overrides(rng)
        cmd = recipe_command("quickstart.py", "--data", str(tmp_path / "nowhere"), "--run-dir", str(run_dir), sets=sets)
        runs.append((subprocess.Popen(cmd, env=run_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), run_dir, sets))
    for process, run_dir, sets in runs:
        _, err = process.communicate(timeout=300)
        error_lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert process.returncode == 2 and len(error_lines) == 1 and "Traceback" not in err, (sets, err[-3000:])
        assert not run_dir.exists()
