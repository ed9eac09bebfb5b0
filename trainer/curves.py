"""Training curves of a run: `runs/<run>/curves.png`, a 2×2 figure drawn from history.jsonl (and steps.jsonl).

Panels: accuracy (train top-1, val top-1, EMA top-1, top-5), loss (train, val), learning rate, and
the generalisation gap (val loss − train loss, and train top-1 − val top-1 on a second axis). The x axis counts epochs across all phases
(epoch 3 of the second phase after a 5-epoch first phase is x = 8); a dashed vertical line marks
each phase boundary, with the phase's name above its stretch. history.jsonl is the source of truth
(it is rewound on resume, so the figure never shows epochs a resumed run threw away).

The loop redraws the figure at epoch ends at most every CURVES_EVERY_S seconds of the run and after
its last epoch (`CurvesRedraw`, main process only), on a thread of its own, written to a temporary file
and renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from trainer.atomic import write_atomic
from trainer.run_folder import CURVES, HISTORY, STEPS, read_jsonl

FIGURE_SIZE_IN = (11.0, 7.5)
FIGURE_DPI = 100
CURVES_SIZE_PX = (round(FIGURE_SIZE_IN[0] * FIGURE_DPI), round(FIGURE_SIZE_IN[1] * FIGURE_DPI))  # (width, height)


def epoch_positions(history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The records in (phase, epoch) order and their x positions: 1, 2, ... counted across phases.
    A phase that stopped early simply contributes fewer epochs."""
    records = sorted(history, key=lambda r: (r.get("phase_index", 0), r.get("epoch", 0)))
    return records, np.arange(1, len(records) + 1, dtype=np.float64)


def _series(records: list[dict[str, Any]], key: str) -> np.ndarray:
    """One field per epoch as floats; NaN where it is missing or null (no EMA), so lines just break there."""
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in records], dtype=np.float64)


def _step_lr(run_dir: Path, records: list[dict[str, Any]], x: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """The logged per-step LR (warmup and decay within epochs) placed on the epoch axis: epoch i's
    updates are spread linearly between x = i - 1 and x = i using the total_step at each epoch end."""
    steps = [r for r in read_jsonl(run_dir / STEPS) if r.get("lr") is not None and r.get("total_step") is not None]
    ends = np.array([r.get("total_step", np.nan) for r in records], dtype=np.float64)
    if len(steps) < 2 or np.isnan(ends).any() or np.any(np.diff(ends) <= 0):
        return None
    total = np.array([r["total_step"] for r in steps], dtype=np.float64)
    keep = total <= ends[-1]  # steps of the epoch in progress have no epoch end to place them against yet
    if keep.sum() < 2:
        return None
    step_x = np.interp(total[keep], np.concatenate([[0.0], ends]), np.concatenate([[0.0], x]))
    step_lr = np.array([r["lr"] for r in steps], dtype=np.float64)[keep]
    # A NaN between the last logged step of a phase and the first of the next: the line breaks at the
    # boundary instead of joining one phase's decayed LR to the next phase's warmup.
    phases = [r.get("phase") for r, k in zip(steps, keep) if k]
    cuts = [i for i in range(1, len(phases)) if phases[i] != phases[i - 1]]
    return np.insert(step_x, cuts, np.nan), np.insert(step_lr, cuts, np.nan)


def _mark_phases(ax, records: list[dict[str, Any]], x: np.ndarray, label: bool) -> None:
    """A dashed line between phases; with `label`, each phase's name over its stretch of epochs."""
    starts = [i for i in range(len(records)) if i == 0 or records[i].get("phase_index") != records[i - 1].get("phase_index")]
    for n, start in enumerate(starts):
        end = starts[n + 1] - 1 if n + 1 < len(starts) else len(records) - 1
        if start > 0:
            ax.axvline(x[start] - 0.5, color="0.45", linestyle="--", linewidth=1)
        if label:
            ax.text((x[start] + x[end]) / 2, 1.01, str(records[start].get("phase", "")), transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=8, color="0.25", clip_on=False)


def draw_curves(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path | None:
    """Draw the run's curves into `out` (default RUN_DIR/curves.png); None when there is no epoch yet."""
    run_dir = Path(run_dir)
    records, x = epoch_positions(read_jsonl(run_dir / HISTORY))
    if not records:
        return None
    # The Agg canvas on a bare Figure: files only, no display, no global pyplot state shared with the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, NullFormatter

    fig = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI)
    FigureCanvasAgg(fig)
    (acc, loss), (lr, gap) = fig.subplots(2, 2, sharex=True)
    style = {"marker": "o", "markersize": 3, "linewidth": 1.5}

    acc.plot(x, _series(records, "val_top1"), label="val top-1", **style)
    ema = _series(records, "ema_val_top1")
    if not np.isnan(ema).all():
        acc.plot(x, ema, label="EMA val top-1", **style)
    acc.plot(x, _series(records, "val_top5"), label="val top-5", linestyle=":", **{**style, "marker": "."})
    train_top1 = _series(records, "train_top1")  # NaN in a history written before train_top1 was recorded
    if not np.isnan(train_top1).all():
        acc.plot(x, train_top1, label="train top-1", color="0.35", linestyle="--", **style)
    acc.set_ylabel("accuracy")
    acc.set_title("accuracy (train: the batches as trained, with their augmentation)", fontsize=10, pad=14)

    train_loss, val_loss = _series(records, "train_loss"), _series(records, "val_loss")
    loss.plot(x, train_loss, label="train loss", **style)
    loss.plot(x, val_loss, label="val loss", **style)
    loss.set_ylabel("loss")
    loss.set_title("loss (train: mean over the epoch, with its augmentation)", fontsize=10, pad=14)

    per_step = _step_lr(run_dir, records, x)
    if per_step is not None:
        lr.plot(per_step[0], per_step[1], linewidth=1.2, label="per logged step")
    epoch_lr = _series(records, "lr")
    lr.plot(x, epoch_lr, "o" if per_step is not None else "o-", markersize=3, label="at epoch end")
    lr.set_ylabel("learning rate")
    lr.set_title("learning rate (param group 0)", fontsize=10, pad=14)
    every_lr = np.concatenate([epoch_lr, per_step[1] if per_step is not None else []])
    every_lr = every_lr[~np.isnan(every_lr)]
    if every_lr.size and every_lr.min() > 0 and every_lr.max() / every_lr.min() > 30:  # warmup from ~0, decay to 1% of peak
        lr.set_yscale("log")
        lr.yaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks crowd into the axis label

    gap.axhline(0.0, color="0.6", linewidth=0.8)
    gap.plot(x, val_loss - train_loss, color="tab:red", label="val loss − train loss", **style)
    gap.set_ylabel("val loss − train loss", color="tab:red")
    gap.set_title("generalisation gap (> 0: overfitting)", fontsize=10, pad=14)
    if not np.isnan(train_top1).all():
        # Accuracy on its own axis: its scale (a fraction) has nothing to do with the loss's.
        acc_gap = gap.twinx()
        acc_gap.axhline(0.0, color="tab:blue", linewidth=0.6, alpha=0.5)
        acc_gap.plot(x, train_top1 - _series(records, "val_top1"), color="tab:blue", label="train top-1 − val top-1", **style)
        acc_gap.set_ylabel("train top-1 − val top-1", color="tab:blue")
        lines = gap.get_lines()[1:] + acc_gap.get_lines()[1:]
        gap.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="best")

    for ax in (acc, loss, lr, gap):
        _mark_phases(ax, records, x, label=True)
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0.5, x[-1] + 0.5)
    for ax in (lr, gap):
        ax.set_xlabel("epoch (counted across phases)")
    for ax in (acc, loss, lr):
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{run_dir.name}: {len(records)} epochs", fontsize=11)
    # Fixed margins: tight_layout measured every tick label and took 0.3 s of a 0.6 s redraw.
    fig.subplots_adjust(left=0.08, right=0.93, bottom=0.075, top=0.87, wspace=0.28, hspace=0.32)

    return write_atomic(Path(out) if out is not None else run_dir / CURVES, lambda tmp: fig.savefig(tmp, format="png"))


def redraw_curves(run_dir: str | os.PathLike) -> None:
    """`draw_curves` for the training loop: a plotting failure is reported on stderr and never stops training."""
    try:
        draw_curves(run_dir)
    except Exception as err:  # noqa: BLE001 - a figure must never cost a training run
        print(f"warning: could not draw {Path(run_dir) / CURVES}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


class CurvesRedraw:
    """`redraw_curves` on a thread of its own, for the training loop's main process: matplotlib's 0.3-0.5 s
    runs beside the checkpoint write and the next steps instead of before them (the loop's Python work
    is little; its kernels run without the GIL). One drawing at a time: a new one first waits for the
    previous. `wait()` returns once the latest is written; the run calls it before it returns, and the
    thread is not a daemon, so an exit waits for it too. Reading history.jsonl while the loop appends to
    it is safe: read_jsonl skips a line cut mid-write, and the next redraw has it."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.drawn_at = -math.inf  # time.monotonic() of the latest redraw's start, for the whole run
        self._thread: threading.Thread | None = None

    def due(self, every_s: float) -> bool:
        return time.monotonic() - self.drawn_at >= every_s

    def start(self) -> None:
        self.wait()
        self.drawn_at = time.monotonic()
        self._thread = threading.Thread(target=redraw_curves, args=(self.run_dir,), name="curves.png", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
