"""Two machines for real: two `accelerate launch` commands on this host, each one machine of a 2-machine run
(`--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`, one gloo CPU process each), as a user
starts them on two hosts. Both machines' processes have local rank 0, so only the global rank tells their
shards apart.

- The run is the one a single `accelerate launch` of 2 processes trains, bit for bit: the same shards (by
  global rank; sharding by local rank would give both machines rank 0's samples and other weights), the
  same weights on both machines (run.json's checksums), one set of checkpoint files, and exact resume of
  both machines after one of them is killed.
- Two machines whose run folders are different folders (here: different --run-dir paths, as two hosts
  whose runs/ is a local disk) stop at the start with a message that says what to do.

Each machine is pinned to a core of its own and the reference to both: one torch thread per process in
both runs, so the float reductions (and the weights) can match bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, assert_same_weights, history_without_timings, recipe_command, two_cpu_launcher

from trainer.run_folder import complete_checkpoints, read_state

# 96 training images over 2 processes in batches of 8: 6 steps an epoch, 12 in all; a checkpoint every 2.
SETS = [
    "model.arch=test_resnet",
    "model.drop_path_rate=0.1",  # per-process RNG draws: each machine's RNG file must come back
    "phases.0.epochs=2",
    "phases.0.res_px=32",
    "phases.0.eval_res_px=32",
    "phases.0.batch_size_per_device=8",
    "phases.0.ema_decay=0.9",
    "phases.0.checkpoint_every_steps=2",
    "data.loader_threads=1",
    "logging.progress_bar=false",
    "logging.log_every_steps=1",
    "logging.wandb=false",
]
STEPS_PER_EPOCH, TOTAL_STEPS = 6, 12
CORES = sorted(os.sched_getaffinity(0))
# What one checkpoint of a 2-process run holds: the main process's files and each process's RNG state.
CHECKPOINT_FILES = {"model.safetensors", "optimizer.bin", "custom_checkpoint_0.pkl", "trainer_state.json", "random_states_0.pkl", "random_states_1.pkl"}
RUN_TIMEOUT_S = 420


def machine_launcher(machine_rank: int, port: int) -> list[str]:
    """`accelerate launch` as machine `machine_rank` of 2, one process, the main process on this host."""
    command = two_cpu_launcher(port)
    at = command.index("--num_machines")
    command[at:at + 2] = ["--num_machines", "2", "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return command


class Machine:
    """One machine's `accelerate launch`, pinned to a core; its output goes to a file (a pipe nobody reads
    could fill and stall it)."""

    def __init__(self, machine_rank: int, port: int, run_dir: Path, env: dict, data: Path, log: Path, *args: str) -> None:
        self.log = log
        command = recipe_command("quickstart.py", "--data", str(data), "--run-dir", str(run_dir), *args, sets=SETS, launcher=machine_launcher(machine_rank, port))
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        os.sched_setaffinity(self.proc.pid, {CORES[machine_rank % len(CORES)]})  # inherited by the process it starts

    def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"machine still running after {timeout_s} s:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the launcher and the process it started (in a session of its own): the machine is gone."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
        self.proc.kill()
        self.proc.wait()

    def output(self) -> str:
        return self.log.read_text()


def two_machines(port: int, run_dirs: tuple[Path, Path], env: dict, data: Path, logs: Path, *args: str) -> tuple[Machine, Machine]:
    return tuple(Machine(r, port, run_dirs[r], env, data, logs / f"machine{r}.log", *args) for r in (0, 1))


def steps(run_dir: Path) -> list[dict]:
    path = run_dir / "steps.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def files_of(run_dir: Path) -> set[str]:
    """The run folder's files, checkpoints by their contents (their step numbers differ between runs)."""
    found = set()
    for path in run_dir.rglob("*"):
        if path.is_file():
            parts = path.relative_to(run_dir).parts
            found.add("/".join(("step_N",) + parts[3:]) if "checkpoints" in parts else "/".join(parts))
    return found


@pytest.fixture(scope="module")
def env(run_env) -> dict:
    return {**run_env, "ACCELERATE_USE_CPU": "1"}


def test_two_machines_train_the_run_of_one_and_resume_exactly_after_one_is_killed(tmp_path, tiny_imagenet, env):
    # The reference: one `accelerate launch` of 2 processes, never stopped.
    reference = tmp_path / "reference"
    done = subprocess.run(
        ["taskset", "-c", ",".join(map(str, CORES[:2])), *recipe_command("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(reference), sets=SETS, launcher=two_cpu_launcher(29571))],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # Two machines, one shared run folder; machine 1 is killed after a mid-epoch checkpoint.
    run_dir = tmp_path / "run"
    machines = two_machines(29572, (run_dir, run_dir), env, tiny_imagenet, tmp_path)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        saved = [read_state(p)["total_step"] for p in complete_checkpoints(run_dir / "main" / "checkpoints")]
        saved = [s for s in saved if s % STEPS_PER_EPOCH]  # mid-epoch: the resumed run starts inside an epoch
        done_steps = steps(run_dir)
        if saved and done_steps and done_steps[-1]["total_step"] > max(saved):
            break
        if machines[0].proc.poll() is not None or time.monotonic() > deadline:
            for m in machines:
                m.kill()
            pytest.fail("the run ended before a mid-epoch checkpoint:\n" + machines[0].output()[-3000:])
        time.sleep(0.005)
    machines[1].kill()
    assert machines[0].wait(timeout_s=60) != 0  # the survivor notices (gloo: connection reset) and stops
    killed_at = max(saved)
    assert killed_at < TOTAL_STEPS

    # Both machines again, --resume auto: they continue from the same checkpoint and end where the reference ended.
    machines = two_machines(29573, (run_dir, run_dir), env, tiny_imagenet, tmp_path, "--resume", "auto")
    codes = [m.wait() for m in machines]
    assert codes == [0, 0], machines[0].output()[-3000:] + machines[1].output()[-3000:]
    for m in machines:
        assert f"(phase main, epoch {killed_at // STEPS_PER_EPOCH}, step" in m.output(), m.output()[-3000:]

    assert_same_weights(run_dir, reference)
    assert history_without_timings(run_dir) == history_without_timings(reference)
    assert [(s["total_step"], s["loss"]) for s in steps(run_dir)] == [(s["total_step"], s["loss"]) for s in steps(reference)]

    info = json.loads((run_dir / "run.json").read_text())
    assert info["num_processes"] == 2 and info["distributed_type"] == "MULTI_CPU"
    # Two machines: global ranks 0 and 1, each the first process of its machine.
    assert [(p["rank"], p["local_rank"]) for p in info["processes"]] == [(0, 0), (1, 0)]
    reference_info = json.loads((reference / "run.json").read_text())
    assert [(p["rank"], p["local_rank"]) for p in reference_info["processes"]] == [(0, 0), (1, 1)]
    checksums = info["phases"]["main"]["param_checksums"]
    assert len(checksums) == 2 and len(set(checksums)) == 1 and checksums == reference_info["phases"]["main"]["param_checksums"]

    # One set of files, as the single launch wrote: no second copy from the other machine, no probe left.
    for checkpoint in complete_checkpoints(run_dir / "main" / "checkpoints"):
        assert {f.name for f in checkpoint.iterdir()} == CHECKPOINT_FILES
    assert files_of(run_dir) == files_of(reference)
    assert len(steps(run_dir)) == TOTAL_STEPS


def test_machines_whose_run_folders_differ_stop_at_the_start_and_say_what_to_do(tmp_path, tiny_imagenet, env):
    first, second = tmp_path / "machine0-runs" / "run", tmp_path / "machine1-runs" / "run"
    machines = two_machines(29574, (first, second), env, tiny_imagenet, tmp_path)
    codes = [m.wait() for m in machines]
    assert codes[0] != 0 and codes[1] != 0
    for m in machines:
        out = m.output()
        assert "the run folder is not one folder shared by all processes" in out, out[-3000:]
        assert f"does not see the probe files written by rank 1 (host {socket.gethostname()}, run folder {second}" in out
        assert "put --run-dir on a filesystem every machine mounts" in out
    # Stopped before any work: nothing written in either folder, not even the folders themselves.
    assert not first.exists() and not second.exists()
