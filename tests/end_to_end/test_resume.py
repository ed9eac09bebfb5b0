"""Exact resume: a real run killed with SIGKILL mid-epoch, resumed with --resume auto, ends bit-identical."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from conftest import REPO, RESUME_SETS, assert_same_weights, history_without_timings, recipe_command, run_recipe

from trainer.run_folder import complete_checkpoints, read_state

SETS = RESUME_SETS


def _steps(run_dir):
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, tiny_imagenet, run_env, reference_run):
    data = ["--data", str(tiny_imagenet)]
    reference = reference_run

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        recipe_command("quickstart.py", *data, "--run-dir", str(killed), sets=SETS),
        env=run_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    # Kill once a mid-epoch checkpoint exists and training has gone past it: the steps after
    # the checkpoint are lost and must be redone identically.
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        mid = [read_state(p) for p in complete_checkpoints(killed / "main" / "checkpoints")]
        mid = [s for s in mid if s["batch"] > 0]
        if mid and (killed / "steps.jsonl").exists():
            done_steps = [s["total_step"] for s in _steps(killed)]
            if done_steps and done_steps[-1] > max(s["total_step"] for s in mid) + 1:
                proc.send_signal(signal.SIGKILL)
                break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    steps_before = _steps(killed)
    assert steps_before[-1]["total_step"] < 36

    resumed = run_recipe("quickstart.py", *data, "--run-dir", str(killed), "--resume", "auto", env=run_env, sets=SETS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout

    # Same per-step losses and LRs, step for step, including the steps redone after the kill.
    ref_steps, new_steps = _steps(reference), _steps(killed)
    assert [s["total_step"] for s in new_steps] == list(range(1, 37))
    assert [(s["loss"], s["lr"]) for s in new_steps] == [(s["loss"], s["lr"]) for s in ref_steps]
    # The epoch records agree too (train loss summed across the kill, val scores).
    assert history_without_timings(killed) == history_without_timings(reference)
    assert_same_weights(reference, killed)
