"""W&B's start on a thread of its own (trainer/tracking.py): the run goes on while wandb.init imports and
waits on its service, and nothing reaches the trackers before they exist. The real W&B run (offline, its
files read back) is checked by the end-to-end runs (tests/wandb_files.py); here, the contract of the
thread: whatever logs first waits for the start, and an error of the start is raised where it logs."""

from __future__ import annotations

import threading

import pytest

from trainer import tracking


class SlowStart:
    """An accelerator whose init_trackers takes a while (wandb.init's import and service wait) or fails."""

    is_main_process = True

    def __init__(self, fails: Exception | None = None) -> None:
        self.release = threading.Event()
        self.fails = fails
        self.trackers: list[str] = []
        self.logged: list[tuple[dict, int]] = []

    def init_trackers(self, project, config=None, init_kwargs=None) -> None:
        assert threading.current_thread() is not threading.main_thread()
        self.release.wait(10)
        if self.fails is not None:
            raise self.fails
        self.trackers.append(init_kwargs["wandb"]["name"])

    def log(self, values: dict, step: int) -> None:
        assert self.trackers, "logged before the trackers existed: accelerate would drop it"
        self.logged.append((values, step))

    def print(self, *args) -> None:
        pass


def start(accelerator, tmp_path) -> None:
    tracking.start_trackers(accelerator, project="p", run_name="run-a", run_id="abc", run_dir=tmp_path, config={"lr": 1e-3})


def test_the_run_goes_on_while_wandb_starts_and_logging_waits_for_it(tmp_path):
    accelerator = SlowStart()
    start(accelerator, tmp_path)  # returns before init_trackers is done
    assert accelerator.trackers == []
    log = tracking.RunLog(tmp_path, accelerator)
    threading.Timer(0.2, accelerator.release.set).start()
    log.step({"total_step": 10, "loss": 1.5, "lr": 1e-3}, epoch_progress=0.5)  # waits, then logs
    assert accelerator.trackers == ["run-a"]
    assert accelerator.logged == [({"train/loss": 1.5, "train/lr": 1e-3, "epoch": 0.5}, 10)]
    tracking.trackers_ready()  # nothing pending any more: returns at once


def test_an_error_of_the_start_is_raised_where_the_run_logs(tmp_path):
    accelerator = SlowStart(fails=RuntimeError("wandb: invalid API key"))
    start(accelerator, tmp_path)
    accelerator.release.set()
    with pytest.raises(RuntimeError, match="invalid API key"):
        tracking.RunLog(tmp_path, accelerator).step({"total_step": 1, "loss": 1.0, "lr": 1e-3}, epoch_progress=0.1)
    tracking.trackers_ready()  # raised once; the next caller finds nothing pending
