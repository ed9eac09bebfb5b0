"""Faults injected for real into real runs: SIGTERM/SIGINT preemption, NaN losses, a full or read-only disk.

Each interrupted run must stop with its documented exit code and message, leave only complete
checkpoints, and (where it resumes) end bit-identical to the uninterrupted `reference_run`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    FAST,
    REPO,
    RESUME_SETS,
    assert_same_weights,
    final_checkpoint,
    history_without_timings,
    recipe_command,
    run_recipe,
    two_cpu_launcher,
)

from trainer.atomic import TMP_PREFIX
from trainer.run_folder import complete_checkpoints, read_state


def _steps(run_dir: Path) -> list[dict]:
    path = run_dir / "steps.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _start(run_dir: Path, data: Path, env: dict, sets=RESUME_SETS, launcher=None, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        recipe_command("quickstart.py", "--data", str(data), "--run-dir", str(run_dir), sets=sets, launcher=launcher),
        env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )


def _wait_for_steps(proc: subprocess.Popen, run_dir: Path, count: int, timeout_s: float = 300) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = _steps(run_dir)
        if steps and steps[-1]["total_step"] >= count:
            return steps[-1]["total_step"]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    raise AssertionError(f"no step {count} within {timeout_s} s")


# -- preemption --------------------------------------------------------------------------------------


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, tiny_imagenet, run_env, reference_run):
    run_dir = tmp_path / "preempted"
    proc = _start(run_dir, tiny_imagenet, run_env)
    # Step 6 is mid-epoch (12 per epoch) and just past the step-4 checkpoint: without the signal's
    # checkpoint, steps 5-6 would be lost.
    at_step = _wait_for_steps(proc, run_dir, 6)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    stop_s = time.monotonic() - signalled
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM: finishing this step" in err and "continue with --resume auto" in err
    saved = max(complete_checkpoints(run_dir / "main" / "checkpoints"), key=lambda p: read_state(p)["total_step"])
    state = read_state(saved)
    # Within one step of where the signal found it: the step in flight, not more.
    assert at_step <= state["total_step"] <= at_step + 1 and state["batch"] == state["total_step"] % 12
    assert state["total_step"] == _steps(run_dir)[-1]["total_step"]  # nothing trained after the checkpoint
    assert not list((run_dir / "main" / "checkpoints").glob(TMP_PREFIX + "*"))
    assert stop_s < 60

    resumed = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), "--resume", "auto", env=run_env, sets=RESUME_SETS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {saved}" in resumed.stdout
    assert history_without_timings(run_dir) == history_without_timings(reference_run)
    assert_same_weights(reference_run, run_dir)


# The quickstart recipe as a worker of `accelerate launch` runs it, noting the status it exits with:
# the launcher reports its own, so each worker's is read here.
WORKER = """
import os, sys
from trainer import launch
from trainer.__main__ import load_recipe

try:
    launch.run(load_recipe({recipe!r}), sys.argv[1:])
except SystemExit as stop:
    with open(os.path.join({folder!r}, "exit-" + os.environ["RANK"]), "w") as f:
        f.write(str(stop.code))
    raise
"""


def test_sigint_to_a_two_process_launch_stops_both_at_the_same_step(tmp_path, tiny_imagenet, run_env):
    """Ctrl-C in a terminal: SIGINT reaches the launcher and both workers, and the launcher forwards
    it once more. Both workers must stop after the same update with one checkpoint, which resumes."""
    launcher = two_cpu_launcher(29561)
    env = {**run_env, "ACCELERATE_USE_CPU": "1"}
    sets = FAST + ["phases.0.epochs=2", "phases.0.batch_size_per_device=4", "logging.wandb=false"]
    run_dir = tmp_path / "ddp"
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(recipe=str(REPO / "recipes" / "quickstart.py"), folder=str(tmp_path)))
    cmd = [*launcher, str(worker), "--data", str(tiny_imagenet), "--run-dir", str(run_dir), *(i for item in sets for i in ("--set", item))]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_steps(proc, run_dir, 3)
    os.killpg(proc.pid, signal.SIGINT)  # the whole process group, as a terminal does
    _, err = proc.communicate(timeout=120)
    # 128 + SIGINT, from each worker and from the launcher.
    assert [(tmp_path / f"exit-{rank}").read_text() for rank in (0, 1)] == ["130", "130"], err[-4000:]
    assert proc.returncode == 130, err[-4000:]
    # Both workers, not one, each naming the last update it trained: the same one.
    stopped_after = [int(n) for n in re.findall(r"preempted: stopped by SIGINT after update (\d+)", err)]
    assert len(stopped_after) == 2 and stopped_after[0] == stopped_after[1], err[-4000:]
    saved = complete_checkpoints(run_dir / "main" / "checkpoints")
    assert len(saved) == 1
    state = read_state(saved[0])
    assert 0 < state["batch"] < 12  # mid-epoch: 96 images / 2 processes / batches of 4
    # No step trained twice: the checkpoint holds the last update both workers trained, and the log,
    # read before a resume rewinds it, ends at that update too.
    assert state["total_step"] == stopped_after[0]
    assert _steps(run_dir)[-1]["total_step"] == stopped_after[0]

    resumed = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), "--resume", "auto", env=env, sets=sets, launcher=launcher)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = _steps(run_dir)
    assert [s["total_step"] for s in steps] == list(range(1, 25))  # 2 epochs x 12, none lost or doubled
    assert json.loads((run_dir / "run.json").read_text())["num_processes"] == 2


def test_a_second_signal_exits_at_once(tmp_path):
    """The handler on its own, with real signals: the first asks for a checkpoint, a repeat within
    the same request window is ignored (the launcher's forward), a later one exits immediately."""
    script = tmp_path / "signals.py"
    script.write_text(textwrap.dedent(
        """
        import os, signal, sys, time
        sys.path.insert(0, sys.argv[1])
        from trainer.preemption import SAME_REQUEST_S, StopSignals
        signals = StopSignals().install()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the same request, forwarded: ignored
        time.sleep(0.1)
        print("requested", signals.requested, flush=True)
        time.sleep(SAME_REQUEST_S + 0.2)
        print("sending again", time.monotonic(), flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        print("still running", flush=True)
        """
    ))
    done = subprocess.run([sys.executable, str(script), str(REPO)], capture_output=True, text=True, timeout=60)
    ended = time.monotonic()
    assert done.returncode == 143, done.stderr
    assert f"requested {int(signal.SIGTERM)}" in done.stdout and "still running" not in done.stdout
    sent_at = float(done.stdout.split("sending again")[1].split()[0])
    assert ended - sent_at < 5  # at once, not after the 30 s sleep
    assert "again: exiting without a checkpoint" in done.stderr


# -- non-finite losses -------------------------------------------------------------------------------

POISON = """
import sys
sys.path.insert(0, {repo!r})
import torch
from trainer import launch as run_module
from trainer.__main__ import load_recipe

BAD_FORWARDS = {bad!r}  # training forward passes (1-based) whose input batch becomes NaN
create_model = run_module.create_model


def poisoned(recipe, num_classes):
    model = create_model(recipe, num_classes)
    count = [0]

    def nan_input(module, args):
        if module.training:
            count[0] += 1
            if count[0] in BAD_FORWARDS or (BAD_FORWARDS and count[0] > max(BAD_FORWARDS) and {forever!r}):
                return (args[0] * float("nan"),)

    # NaN enters the first layer, so BatchNorm statistics see it too (the loop must put them back).
    model.register_forward_pre_hook(nan_input)
    return model


run_module.create_model = poisoned
run_module.run(load_recipe({recipe!r}), sys.argv[1:])
"""


def _poisoned_run(tmp_path, tiny_imagenet, run_env, run_dir, bad, forever, sets, resume=()):
    script = tmp_path / f"poison-{run_dir.name}.py"
    script.write_text(POISON.format(repo=str(REPO), bad=set(bad), forever=forever, recipe=str(REPO / "recipes" / "quickstart.py")))
    cmd = [sys.executable, str(script), "--data", str(tiny_imagenet), "--run-dir", str(run_dir), *resume]
    for item in sets:
        cmd += ["--set", item]
    return subprocess.run(cmd, env=run_env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _all_finite(tensors: dict) -> bool:
    return all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


SETS_NAN = FAST + ["phases.0.epochs=2", "phases.0.ema_decay=0.9", "logging.wandb=false", "phases.0.max_nonfinite_steps=3"]


def test_nan_steps_are_skipped_and_counted(tmp_path, tiny_imagenet, run_env):
    run_dir = tmp_path / "transient"
    done = _poisoned_run(tmp_path, tiny_imagenet, run_env, run_dir, bad=[4, 5, 15], forever=False, sets=SETS_NAN)
    assert done.returncode == 0, done.stderr[-3000:]
    skipped = [s for s in _steps(run_dir) if s.get("skipped")]
    assert [s["total_step"] for s in skipped] == [4, 5, 15]
    assert "step 4: non-finite loss, update skipped (1 in a row" in done.stdout
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["skipped_steps"] for h in history] == [2, 1]
    assert all(h["train_loss"] == h["train_loss"] for h in history)  # not NaN: skipped losses are left out
    weights, ema, state = final_checkpoint(run_dir)
    assert state["skipped_steps"] == 3 and state["total_step"] == 24
    assert _all_finite(weights) and _all_finite(ema)  # BatchNorm running stats included
    assert all(h["val_loss"] < 10 for h in history)  # evaluation with the restored statistics is sound


def test_nan_every_step_stops_with_the_last_good_state(tmp_path, tiny_imagenet, run_env):
    run_dir = tmp_path / "diverged"
    done = _poisoned_run(tmp_path, tiny_imagenet, run_env, run_dir, bad=[6], forever=True, sets=SETS_NAN)
    assert done.returncode == 3, done.stderr[-3000:]
    message = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "3 updates in a row had a non-finite loss" in message[0] and "lr_per_256" in message[0]
    assert "Traceback" not in done.stderr
    weights, ema, state = final_checkpoint(run_dir)
    assert state["total_step"] == 8 and state["nonfinite_streak"] == 3  # steps 6, 7, 8
    assert _all_finite(weights) and _all_finite(ema)
    # The data was the fault: resumed without it, the run carries on from the saved state to the end.
    resumed = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), "--resume", "auto", env=run_env, sets=SETS_NAN)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert final_checkpoint(run_dir)[2]["total_step"] == 24


# -- storage -----------------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")


class Tmpfs:
    """A real small filesystem: `mount -t tmpfs` (root, as CI runs), unmounted at the end."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)

    def remount(self, mode: str) -> None:
        for _ in range(200):  # "busy" while a file there is open for writing: try again a moment later
            if subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], capture_output=True).returncode == 0:
                return
            time.sleep(0.005)
        raise AssertionError(f"could not remount {self.path} {mode}")

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def tmpfs_factory(tmp_path):
    made = []

    def make(path: str | Path, size: str) -> Tmpfs:
        made.append(Tmpfs(tmp_path / path, size))  # an absolute `path` stays as it is
        return made[-1]

    yield make
    for fs in made:
        fs.close()


def _checkpoint_bytes(run_dir: Path) -> dict[str, bytes]:
    return {f"{c.name}/{f.name}": f.read_bytes() for c in complete_checkpoints(run_dir / "main" / "checkpoints") for f in c.iterdir()}


@needs_root
def test_full_disk_keeps_the_previous_checkpoint_and_says_where(tmp_path, tiny_imagenet, run_env, reference_run, tmpfs_factory):
    # One checkpoint of this model (weights, AdamW state, EMA) is ~76 MiB: the second cannot fit.
    disk = tmpfs_factory("small-disk", "120m")
    run_dir = disk.path / "run"
    done = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=run_env, sets=RESUME_SETS)
    assert done.returncode == 4, done.stderr[-3000:]
    message = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "Traceback" not in done.stderr
    assert "cannot write checkpoint" in message[0] and "step_00000008" in message[0]
    assert "No space left on device" in message[0] and f"MiB free on {run_dir / 'main' / 'checkpoints'}" in message[0]
    assert "step_00000004 is intact" in message[0]
    kept = complete_checkpoints(run_dir / "main" / "checkpoints")
    assert [p.name for p in kept] == ["step_00000004"]
    assert not list((run_dir / "main" / "checkpoints").glob(TMP_PREFIX + "*"))  # the half-written one is gone

    # On a disk with room, the kept checkpoint carries the run to the reference's exact end.
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    resumed = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(moved), "--resume", "auto", env=run_env, sets=RESUME_SETS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(reference_run, moved)


def _stop_on_read_only(proc: subprocess.Popen, run_dir: Path, disk: Tmpfs) -> tuple[dict[str, bytes], str]:
    """Once the first checkpoint is complete, remount `disk` read-only; returns the checkpoints' bytes
    at that moment and the error line the run stopped with (exit 4, no traceback)."""
    deadline = time.monotonic() + 300
    while not complete_checkpoints(run_dir / "main" / "checkpoints"):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.01)
    disk.remount("ro")
    before = _checkpoint_bytes(run_dir)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err[-3000:]
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "Traceback" not in err, err[-3000:]
    return before, message[0]


@needs_root
def test_read_only_checkpoints_stop_inside_a_checkpoint_write_and_resume(tmp_path, tiny_imagenet, run_env, reference_run, tmpfs_factory):
    # The checkpoints on a filesystem of their own, remounted read-only after the first checkpoint: the
    # run's logs stay writable, so the next checkpoint write is what fails.
    run_dir = tmp_path / "run"
    checkpoints = tmpfs_factory(run_dir / "main" / "checkpoints", "1024m")
    proc = _start(run_dir, tiny_imagenet, run_env)
    before, message = _stop_on_read_only(proc, run_dir, checkpoints)
    assert "cannot write checkpoint" in message and "step_00000008" in message and "Read-only file system" in message
    assert "step_00000004 is intact" in message
    assert _checkpoint_bytes(run_dir) == before  # nothing of the checkpoints changed or vanished
    assert _steps(run_dir)[-1]["total_step"] == 8  # the logs went on to the step being saved

    checkpoints.remount("rw")
    resumed = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), "--resume", "auto", env=run_env, sets=RESUME_SETS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert history_without_timings(run_dir) == history_without_timings(reference_run)
    assert_same_weights(reference_run, run_dir)


@needs_root
def test_read_only_run_folder_stops_inside_a_log_write_and_resumes(tmp_path, tiny_imagenet, run_env, reference_run, tmpfs_factory):
    # The other way round: the run folder read-only, its checkpoints writable. The next line of
    # steps.jsonl is what fails.
    disk = tmpfs_factory("flaky-disk", "1024m")
    run_dir = disk.path / "run"
    tmpfs_factory(run_dir / "main" / "checkpoints", "1024m")
    proc = _start(run_dir, tiny_imagenet, run_env)
    before, message = _stop_on_read_only(proc, run_dir, disk)
    assert f"cannot write {run_dir / 'steps.jsonl'}: Read-only file system" in message
    assert _checkpoint_bytes(run_dir) == before

    disk.remount("rw")
    resumed = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), "--resume", "auto", env=run_env, sets=RESUME_SETS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert history_without_timings(run_dir) == history_without_timings(reference_run)
    assert_same_weights(reference_run, run_dir)


# A run whose second phase starts from the first's checkpoint. The first phase saves only at its end, so
# the disk never holds two of its checkpoints at once; the second saves every 4 updates. Its first
# checkpoint has no earlier one of its phase to estimate the space by, so a disk that is too small fails
# in the middle of the write itself.
TWO_PHASES = """
from trainer import Data, Logging, Model, Phase, Recipe, run


def phase(name, init="", checkpoint_every_steps=0):
    return Phase(name=name, init=init, epochs=1, batch_size_per_device=8, lr_per_256=2e-3, warmup_epochs=0,
                 ema_decay=0.9, res_px=32, eval_res_px=32, checkpoint_every_steps=checkpoint_every_steps, keep_best_k=1)


RECIPE = Recipe(
    name="two-phases",
    model=Model(arch="resnet10t"),
    data=Data(loader_threads=1),
    phases=(phase("first"), phase("second", init="phase:first", checkpoint_every_steps=4)),
    logging=Logging(wandb=False, progress_bar=False, log_every_steps=1),
)

if __name__ == "__main__":
    run(RECIPE)
"""


def _two_phases(recipe: Path, run_dir: Path, data: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(recipe), "--data", str(data), "--run-dir", str(run_dir), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_phase_reference(tmp_path_factory, tiny_imagenet, run_env) -> tuple[Path, Path]:
    """(recipe file, its uninterrupted run)."""
    folder = tmp_path_factory.mktemp("two-phases")
    recipe = folder / "two_phases.py"
    recipe.write_text(TWO_PHASES)
    done = _two_phases(recipe, folder / "reference", tiny_imagenet, run_env)
    assert done.returncode == 0, done.stderr[-3000:]
    return recipe, folder / "reference"


def _disk_bytes(folder: Path) -> int:
    """What the files of `folder` take on a tmpfs: whole 4 KiB pages."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in folder.rglob("*") if f.is_file())


@needs_root
@pytest.mark.parametrize("fails_in", ["model.safetensors", "optimizer.bin"])
def test_a_disk_that_fills_during_a_checkpoint_write_keeps_the_last_one_and_resumes(
        tmp_path, tiny_imagenet, run_env, two_phase_reference, tmpfs_factory, fails_in):
    recipe, reference = two_phase_reference
    # Room for all the run holds when the second phase writes its first checkpoint, plus half of the
    # file that write is to fail in (safetensors' weights, or torch.save's optimizer state).
    sizes = {f.name: f.stat().st_size for f in complete_checkpoints(reference / "second" / "checkpoints")[0].iterdir()}
    room = sizes["model.safetensors"] // 2 if fails_in == "model.safetensors" else sizes["model.safetensors"] + sizes["optimizer.bin"] // 2
    held = _disk_bytes(reference) - _disk_bytes(reference / "second")
    disk = tmpfs_factory("filling-disk", f"{(held + room) // 1024}k")
    run_dir = disk.path / "run"
    done = _two_phases(recipe, run_dir, tiny_imagenet, run_env)
    assert done.returncode == 4, done.stderr[-3000:]
    message = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    first_saved = complete_checkpoints(run_dir / "first" / "checkpoints")
    assert [p.name for p in first_saved] == ["step_00000012"]
    assert "cannot write checkpoint" in message[0] and "step_00000016" in message[0]
    assert "No space left on device" in message[0] and f"{first_saved[0]} is intact" in message[0]
    # The write failed half-way: its temporary folder was there and is gone, and nothing of the second
    # phase counts as a checkpoint.
    assert not list((run_dir / "second" / "checkpoints").glob(TMP_PREFIX + "*"))
    assert complete_checkpoints(run_dir / "second" / "checkpoints") == []
    # The first phase's checkpoint is whole: the same bytes as the uninterrupted run's.
    expected = complete_checkpoints(reference / "first" / "checkpoints")[0]
    assert (first_saved[0] / "model.safetensors").read_bytes() == (expected / "model.safetensors").read_bytes()

    disk.remount("size=1g")
    resumed = _two_phases(recipe, run_dir, tiny_imagenet, run_env, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {first_saved[0]}" in resumed.stdout
    assert history_without_timings(run_dir) == history_without_timings(reference)
    assert_same_weights(reference, run_dir, phase="second")
