"""Run records: W&B through accelerate's trackers, plus history.jsonl (per epoch) and steps.jsonl (per step)."""

from __future__ import annotations

import json
import netrc
import os
from pathlib import Path
from typing import Any

HISTORY = "history.jsonl"
STEPS = "steps.jsonl"


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return auth is not None


def wandb_mode() -> str:
    """WANDB_MODE when the user set it; offline when there are no credentials, so a fresh machine
    never stops at a login prompt (the run can be uploaded later with `wandb sync`)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_credentials_present() else "offline"


def start_trackers(accelerator, *, project: str, run_name: str, run_id: str, run_dir: Path, config: dict) -> None:
    mode = wandb_mode()
    accelerator.init_trackers(
        project,
        config=config,
        init_kwargs={
            "wandb": {
                "name": run_name,
                "id": run_id,  # the same id on resume: the W&B run continues instead of forking
                "resume": "allow",
                "dir": str(run_dir),
                "mode": mode,
            }
        },
    )


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill mid-write
            continue
    return records


class RunLog:
    """history.jsonl and steps.jsonl in the run folder, written by the main process only."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.history_path = Path(run_dir) / HISTORY
        self.steps_path = Path(run_dir) / STEPS
        self.enabled = enabled

    def epoch(self, record: dict[str, Any]) -> None:
        if self.enabled:
            _append_jsonl(self.history_path, record)

    def step(self, record: dict[str, Any]) -> None:
        if self.enabled:
            _append_jsonl(self.steps_path, record)

    def rewind(self, phase_index: int, epoch: int, total_step: int) -> None:
        """On resume, drop records newer than the checkpoint: they will be written again, identically."""
        if not self.enabled:
            return
        history = [
            r for r in read_jsonl(self.history_path) if (r["phase_index"], r["epoch"]) < (phase_index, epoch)
        ]
        steps = [r for r in read_jsonl(self.steps_path) if r["total_step"] <= total_step]
        for path, records in ((self.history_path, history), (self.steps_path, steps)):
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
            os.replace(tmp, path)
