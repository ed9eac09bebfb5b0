"""What a run on several machines needs from them: one run folder that every process sees (checked at the
start with a probe file from each process), and which machine each process runs on (run.json's
`processes`)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from pathlib import Path

from accelerate.utils import broadcast_object_list, gather_object

from trainer.recipe import RecipeError

PROBE_PREFIX = ".probe-"
# How long the main process looks for the other processes' probe files. A network filesystem may show a
# file written on another machine a little later (NFS caches a folder's listing for a few seconds).
PROBE_WAIT_S = 5.0


def local_run_folder(main_run: Path, main_resume: Path | None, run_dir: str | None, resume: str | None) -> tuple[Path, Path | None]:
    """This process's path of the run folder the main process chose, and of the checkpoint to resume from.

    With --run-dir each machine names the folder by the path on its own command line: machines may mount
    the shared filesystem at different places. The probe (`check_shared_run_folder`) shows that the paths
    are one folder. Without --run-dir (a timestamped name, or --resume PATH) every process takes the main
    process's path."""
    if not run_dir or (resume and resume != "auto"):
        return main_run, main_resume
    own = Path(run_dir)
    if main_resume is not None and Path(main_resume).is_relative_to(main_run):
        main_resume = own / Path(main_resume).relative_to(main_run)
    return own, main_resume


def check_shared_run_folder(accelerator, run_path: Path) -> list[dict]:
    """Stop with a RecipeError unless every process sees the same run folder: each writes a probe file into
    the folder as it names it, and the main process must see them all. Checkpoints, logs and resume
    need this (only the main process writes most files; every process reads the checkpoints back).
    Returns each process's global rank, local rank and host, by global rank."""
    me = {"rank": accelerator.process_index, "local_rank": accelerator.local_process_index, "host": socket.gethostname()}
    if accelerator.num_processes == 1:
        return [me]
    token = [uuid.uuid4().hex[:12] if accelerator.is_main_process else None]
    broadcast_object_list(token)
    created = not run_path.exists()
    run_path.mkdir(parents=True, exist_ok=True)
    probe = run_path / f"{PROBE_PREFIX}{token[0]}-{me['rank']}"
    probe.write_text(me["host"])
    accelerator.wait_for_everyone()
    processes = gather_object([{**me, "run_dir": str(run_path.resolve())}])
    missing = [None]
    if accelerator.is_main_process:
        wanted = {f"{PROBE_PREFIX}{token[0]}-{p['rank']}": p for p in processes}
        deadline = time.monotonic() + PROBE_WAIT_S
        while True:
            seen = set(os.listdir(run_path))
            missing = [[p for name, p in wanted.items() if name not in seen]]
            if not missing[0] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    broadcast_object_list(missing)
    accelerator.wait_for_everyone()  # the main process has looked: the probes can go
    probe.unlink(missing_ok=True)
    if missing[0]:
        if created:  # nothing of the run was written: leave no empty folder behind
            with contextlib.suppress(OSError):
                run_path.rmdir()
        main = processes[0]
        unseen = ", ".join(f"rank {p['rank']} (host {p['host']}, run folder {p['run_dir']})" for p in missing[0])
        raise RecipeError(
            f"the run folder is not one folder shared by all processes: the main process (host {main['host']}, run folder "
            f"{main['run_dir']}) does not see the probe files written by {unseen}. Every process must write its checkpoint "
            "parts into, and resume from, the same folder: put --run-dir on a filesystem every machine mounts (NFS, Lustre, "
            "a bucket mount) and give each machine its path to it"
        )
    return [{k: p[k] for k in ("rank", "local_rank", "host")} for p in processes]
