"""Run records: W&B through accelerate's trackers, history.jsonl (one record per epoch, which also feeds
W&B and the console line), steps.jsonl, each phase's eval.json with its W&B confusion matrix and
prediction tables, and the throughput summary at the end of a run."""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import netrc
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from trainer.atomic import write_text_atomic
from trainer.curves import CurvesRedraw
from trainer.run_folder import HISTORY, STEPS, read_jsonl


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


def _start_wandb(accelerator, project: str, config: dict, init_kwargs: dict) -> None:
    # What the start imports (much of wandb, pandas) lives as long as the process, as torch's modules do
    # (trainer.run): the collector's sweeps while it is built are skipped here too.
    collecting = gc.isenabled()
    gc.disable()
    try:
        accelerator.init_trackers(project, config=config, init_kwargs=init_kwargs)
        # wandb imports pandas, when it is installed, at the first value logged (to ask whether it is a
        # DataFrame): 0.15 s that the main thread would pay at its first logged step.
        if importlib.util.find_spec("pandas") is not None:
            importlib.import_module("pandas")
    finally:
        if collecting:
            gc.enable()


_starting: Future | None = None  # this process's W&B start still under way, if any


def start_trackers(accelerator, *, project: str, run_name: str, run_id: str, run_dir: Path, config: dict) -> None:
    """Start the W&B run on a thread of its own and return at once: importing wandb and waiting on its
    service process took 0.5 s of the start of a run, which the main thread now spends building the
    model and the pipelines. Everything here that reaches W&B first waits for it (`trackers_ready`)."""
    global _starting
    if _starting is not None:  # an earlier run of this process that stopped before it logged
        _starting.exception()  # waits; that run's error was its own
    init_kwargs = {
        "wandb": {
            "name": run_name,
            "id": run_id,  # the same id on resume: the W&B run continues instead of forking
            "resume": "allow",
            "dir": str(run_dir),
            "mode": wandb_mode(),
        }
    }
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wandb-start")
    _starting = pool.submit(_start_wandb, accelerator, project, config, init_kwargs)
    pool.shutdown(wait=False)  # the one task still runs to its end; the interpreter's exit waits for it


def trackers_ready() -> None:
    """Wait for `start_trackers`' thread, and raise its error here: accelerate's log skips trackers that
    do not exist yet, so nothing may log (or end the run) before this."""
    global _starting
    start, _starting = _starting, None
    if start is not None:
        start.result()


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


# history.jsonl's keys and their names on W&B: one epoch record feeds history.jsonl, W&B and the console.
EPOCH_SCALARS = {
    "train_loss": ("train/epoch_loss",),
    "train_top1": ("train/top1",),
    "images_per_s": ("train/images_per_s", "system/images_per_s"),
    "data_wait_share": ("system/data_wait_share",),
    "step_ms_p50": ("system/step_ms_p50",),
    "step_ms_p90": ("system/step_ms_p90",),
    "skipped_steps": ("system/skipped_steps",),
    "val_loss": ("val/loss",),
    "val_top1": ("val/top1",),
    "val_top5": ("val/top5",),
    "ema_val_top1": ("ema_val/top1",),
    "ema_val_top5": ("ema_val/top5",),
    "val_macro_f1": ("val/macro_f1",),
    "val_balanced_accuracy": ("val/balanced_accuracy",),
    "ema_val_macro_f1": ("ema_val/macro_f1",),
    "ema_val_balanced_accuracy": ("ema_val/balanced_accuracy",),
    "gpu_mem_gib": ("system/gpu_mem_gib",),
}


class RunLog:
    """Where a run's numbers go: history.jsonl and steps.jsonl in the run folder (main process only),
    W&B through the accelerator's trackers, and the console."""

    def __init__(self, run_dir: Path, accelerator) -> None:
        self.history_path = Path(run_dir) / HISTORY
        self.steps_path = Path(run_dir) / STEPS
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.curves = CurvesRedraw(run_dir)  # curves.png, on a thread of its own

    def epoch(self, record: dict[str, Any], epochs: int) -> None:
        """An epoch's record (of `epochs` in its phase): a line of history.jsonl, W&B scalars, a console line."""
        if self.enabled:
            _append_jsonl(self.history_path, record)
        scalars = {name: record[key] for key, names in EPOCH_SCALARS.items() if record.get(key) is not None for name in names}
        trackers_ready()
        self.accelerator.log({**scalars, "epoch": record["epoch"] + 1}, step=record["total_step"])
        ema = f"  ema_val_top1 {record['ema_val_top1']:.4f}" if record.get("ema_val_top1") is not None else ""
        train_top1 = f"  train_top1 {record['train_top1']:.4f}" if record.get("train_top1") is not None else ""
        f1 = f"  val_macro_f1 {record['val_macro_f1']:.4f}" if record.get("val_macro_f1") is not None else ""
        self.accelerator.print(
            f"[{record['phase']} {record['epoch'] + 1}/{epochs}] train_loss {record['train_loss']:.4f}{train_top1}  "
            f"val_top1 {record['val_top1']:.4f}{ema}{f1}  {record['images_per_s']:.0f} img/s"
        )

    def step(self, record: dict[str, Any], epoch_progress: float | None = None) -> None:
        """A line of steps.jsonl; a logged loss also goes to W&B (train/loss, train/lr) at `epoch_progress` epochs."""
        if self.enabled:
            _append_jsonl(self.steps_path, record)
        if "loss" in record:
            trackers_ready()
            self.accelerator.log({"train/loss": record["loss"], "train/lr": record["lr"], "epoch": epoch_progress}, step=record["total_step"])

    def history(self) -> list[dict[str, Any]]:
        return read_jsonl(self.history_path)

    def rewind(self, phase_index: int, epoch: int, total_step: int) -> None:
        """On resume, drop records newer than the checkpoint: they will be written again, identically."""
        if not self.enabled:
            return
        history = [
            r for r in read_jsonl(self.history_path) if (r["phase_index"], r["epoch"]) < (phase_index, epoch)
        ]
        steps = [r for r in read_jsonl(self.steps_path) if r["total_step"] <= total_step]
        for path, records in ((self.history_path, history), (self.steps_path, steps)):
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


# -- phase-end evaluation --------------------------------------------------------------------------


def write_eval_json(path: Path, record: dict[str, Any]) -> None:
    """Write an eval record (see `trainer.metrics.eval_report`) whole or not at all: tmp, then rename."""
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")


def _confusion_chart(wandb, confusion: list[list[int]], classes: list[str], title: str):
    """W&B's confusion-matrix chart built from the matrix itself (wandb.plot.confusion_matrix wants
    every sample's label again). A W&B table holds at most wandb.Table.MAX_ROWS rows: beyond that many
    cells, the diagonal and the largest off-diagonal cells are kept (the chart reads absent cells as 0)."""
    cells = [(t, p, count) for t, row in enumerate(confusion) for p, count in enumerate(row)]
    if len(cells) > wandb.Table.MAX_ROWS:
        diagonal = [c for c in cells if c[0] == c[1]]
        off = sorted((c for c in cells if c[0] != c[1] and c[2] > 0), key=lambda c: -c[2])
        cells = diagonal + off[: max(0, wandb.Table.MAX_ROWS - len(diagonal))]
    table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=[[classes[t], classes[p], n] for t, p, n in cells])
    fields = {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"}
    return wandb.plot_table("wandb/confusion_matrix/v1", table, fields, {"title": title})


def log_phase_eval(accelerator, record: dict[str, Any], predictions: list[dict[str, Any]], predictions_source: str, step: int) -> None:
    """At a phase's end, on the W&B run (main process only): the confusion matrix of the model (and of
    the EMA), a per-class table with its accuracy bar chart, and a table of sample predictions with their
    images. Keys: eval/<phase>/confusion_matrix, ema_confusion_matrix, per_class, per_class_accuracy,
    predictions."""
    if not accelerator.is_main_process:
        return
    import wandb

    trackers_ready()
    run = accelerator.get_tracker("wandb", unwrap=True)
    phase, classes = record["phase"], record["classes"]
    prefix = f"eval/{phase}"
    model, ema = record["model"], record["ema"]
    values: dict[str, Any] = {
        f"{prefix}/confusion_matrix": _confusion_chart(wandb, model["confusion"], classes, f"{phase}: confusion matrix (model)"),
    }
    if ema is not None:
        values[f"{prefix}/ema_confusion_matrix"] = _confusion_chart(wandb, ema["confusion"], classes, f"{phase}: confusion matrix (EMA)")
    columns = ["class", "accuracy", "precision", "recall", "f1", "support"] + (["ema_accuracy"] if ema is not None else [])
    rows = []
    for name in classes:
        scores = model["per_class"][name]
        row = [name, scores["accuracy"], scores["precision"], scores["recall"], scores["f1"], scores["support"]]
        rows.append(row + ([ema["per_class"][name]["accuracy"]] if ema is not None else []))
    per_class = wandb.Table(columns=columns, data=rows)
    values[f"{prefix}/per_class"] = per_class
    values[f"{prefix}/per_class_accuracy"] = wandb.plot.bar(per_class, "class", "accuracy", title=f"{phase}: accuracy per class (model)")
    values[f"{prefix}/predictions"] = wandb.Table(
        columns=["image", "true", "predicted", "confidence", "correct", "weights"],
        data=[
            [wandb.Image(p["image"]), p["true"], p["predicted"], p["confidence"], p["true"] == p["predicted"], predictions_source]
            for p in predictions
        ],
    )
    run.log(values, step=step)


# The test section's scores on the W&B run's summary (the runs table and the run's overview page).
TEST_SUMMARY_KEYS = ("top1", "top5", "loss", "f1_macro", "recall_macro", "samples")


def log_test_scores(accelerator, section: dict[str, Any]) -> None:
    """The untouched test split's scores into the W&B run's summary as test/<key> (main process only):
    scored once, they are a figure of the run, not a point of its history. recall_macro is the balanced
    accuracy."""
    if accelerator.is_main_process:
        trackers_ready()
        run = accelerator.get_tracker("wandb", unwrap=True)
        run.summary.update({f"test/{key}": section[key] for key in TEST_SUMMARY_KEYS} | {"test/source": section["source"]})


# Above this share of the epoch spent waiting for batches, the loader is what limits the run.
LOADER_BOUND_WAIT_SHARE = 0.10


def throughput_summary(history: list[dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """One screen on where the time went, per phase: images/s, the share of time waiting for data,
    step-time percentiles, and whether the loader or the model was the bottleneck."""
    phases: dict[str, list[dict[str, Any]]] = {}
    for record in history:
        if "data_wait_share" in record:
            phases.setdefault(record["phase"], []).append(record)
    lines = ["throughput (per phase, mean over epochs):",
             f"  {'phase':<16}{'images/s':>10}{'data wait':>11}{'step p50':>10}{'step p90':>10}  bottleneck"]
    summary: dict[str, Any] = {}
    for name, records in phases.items():
        means = {key: sum(r[key] for r in records) / len(records) for key in ("images_per_s", "data_wait_share", "step_ms_p50", "step_ms_p90")}
        wait = means["data_wait_share"]
        bound = "loader" if wait >= LOADER_BOUND_WAIT_SHARE else "model"
        summary[name] = {**means, "bottleneck": bound}
        lines.append(f"  {name:<16}{summary[name]['images_per_s']:>10.0f}{wait:>10.1%}{summary[name]['step_ms_p50']:>8.0f}ms"
                     f"{summary[name]['step_ms_p90']:>8.0f}ms  {bound}")
    if not summary:
        return [], {}
    worst = max(summary.values(), key=lambda s: s["data_wait_share"])
    if worst["bottleneck"] == "loader":
        lines.append(f"  the loader was the bottleneck: the model waited for data {worst['data_wait_share']:.0%} of the time. "
                     "Try more data.loader_threads, data.decode_device=mixed on a GPU, or a smaller res_px.")
    else:
        lines.append(f"  the model was the bottleneck: it waited for data {worst['data_wait_share']:.0%} of the time at most; "
                     "the loader has headroom.")
    return lines, summary
