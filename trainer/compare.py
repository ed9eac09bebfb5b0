"""`python -m trainer compare RUN_A RUN_B ...`: runs side by side, a table and val top-1 per epoch overlaid.

Everything comes from what a run leaves behind: history.jsonl (scores, epochs, images/s), run.json
(`wall_s`) and the weights file (parameter count: the bundle's, else the last phase's checkpoint).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from trainer.atomic import write_atomic
from trainer.curves import epoch_positions
from trainer.recipe import RecipeError
from trainer.run_folder import (
    BUNDLE_DIR,
    CHECKPOINTS_DIR,
    HISTORY,
    MODEL_FILE,
    RESOLVED_RECIPE,
    RUN_INFO,
    phase_checkpoint,
    read_json,
    read_jsonl,
)

# Buffers that safetensors stores beside the weights: counted as state, not as parameters.
BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class RunSummary:
    """One run's line of the comparison; None where the run does not record the value."""

    name: str
    path: Path
    best_top1: float | None
    best_top1_source: str  # "model" or "ema"
    best_top5: float | None
    epochs: int
    wall_s: float | None
    images_per_s: float | None
    parameters: int | None
    history: list[dict[str, Any]]
    # per phase, from run.json: {"total", "trainable", "frozen"} (empty for runs trained before they were recorded)
    phase_parameters: dict[str, dict[str, int]] = field(default_factory=dict)


def _weights_file(run_dir: Path) -> Path | None:
    """The bundle's model.safetensors, else the checkpoint the last trained phase hands on."""
    bundle = run_dir / BUNDLE_DIR / MODEL_FILE
    if bundle.is_file():
        return bundle
    try:
        phases = [p["name"] for p in read_json(run_dir / RESOLVED_RECIPE)["phases"]]
    except (RecipeError, KeyError, TypeError):  # no usable recipe.json: the phase folders, by name
        phases = sorted(p.name for p in run_dir.iterdir() if (p / CHECKPOINTS_DIR).is_dir())
    for name in reversed(phases):
        ckpt = phase_checkpoint(run_dir / name)
        if ckpt is not None and (ckpt / MODEL_FILE).is_file():
            return ckpt / MODEL_FILE
    return None


def parameter_count(weights: Path) -> int:
    """Trainable-shaped tensors in a safetensors file, read from its header (no weights loaded, and no
    torch: framework="numpy"); BatchNorm running statistics and counters are buffers, not parameters."""
    total = 0
    with safe_open(str(weights), framework="numpy") as f:
        for key in f.keys():
            if not key.endswith(BUFFER_SUFFIXES):
                total += math.prod(f.get_slice(key).get_shape())
    return total


def summarize_run(run_dir: str | os.PathLike) -> RunSummary:
    """A run folder's summary; RecipeError when the folder is not a run (no run.json or history.jsonl)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise RecipeError(f"{run_dir} is not a run folder: it does not exist")
    missing = [name for name in (RUN_INFO, HISTORY) if not (path / name).is_file()]
    if missing:
        raise RecipeError(f"{run_dir} is not a run folder: {' and '.join(missing)} missing (a run folder is what training writes under runs/)")
    info = read_json(path / RUN_INFO)
    history, _ = epoch_positions(read_jsonl(path / HISTORY))
    best_top1, source, best_top5 = None, "model", None
    for record in history:
        for key, name in (("val_top1", "model"), ("ema_val_top1", "ema")):
            if record.get(key) is not None and (best_top1 is None or record[key] > best_top1):
                best_top1, source = record[key], name
        for key in ("val_top5", "ema_val_top5"):
            if record.get(key) is not None and (best_top5 is None or record[key] > best_top5):
                best_top5 = record[key]
    speeds = [r["images_per_s"] for r in history if r.get("images_per_s") is not None]
    weights = _weights_file(path)
    return RunSummary(
        name=path.resolve().name,  # the folder the user named (run.json keeps the name it was trained under)
        path=path,
        best_top1=best_top1,
        best_top1_source=source,
        best_top5=best_top5,
        epochs=len(history),
        wall_s=info.get("wall_s"),
        images_per_s=float(np.mean(speeds)) if speeds else None,
        parameters=parameter_count(weights) if weights is not None else None,
        history=history,
        phase_parameters={name: done["params"] for name, done in info.get("phases", {}).items() if done.get("params")},
    )


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{s:02d}s" if minutes else f"{s}s")


def _parameters(count: int | None) -> str:
    if count is None:
        return "-"
    return f"{count / 1e6:.2f}M" if count >= 1e5 else f"{count:,}"


def comparison_table(runs: list[RunSummary]) -> list[str]:
    """The table `compare` prints: one line per run, in the order given."""
    width = max(len("run"), *(len(r.name) for r in runs))
    lines = [f"{'run':<{width}}  {'best top-1':>15}  {'best top-5':>10}  {'epochs':>6}  {'wall':>8}  {'images/s':>9}  {'parameters':>10}"]
    for r in runs:
        top1 = f"{r.best_top1:.4f} ({r.best_top1_source})" if r.best_top1 is not None else "-"
        top5 = f"{r.best_top5:.4f}" if r.best_top5 is not None else "-"
        speed = f"{r.images_per_s:.0f}" if r.images_per_s is not None else "-"
        lines.append(f"{r.name:<{width}}  {top1:>15}  {top5:>10}  {r.epochs:>6}  {_duration(r.wall_s):>8}  {speed:>9}  {_parameters(r.parameters):>10}")
    for r in runs:
        if r.phase_parameters:
            lines.append(f"{r.name} parameters: " + "; ".join(
                f"{phase} {_parameters(p['trainable'])} trainable, {_parameters(p['frozen'])} frozen of {_parameters(p['total'])}"
                for phase, p in r.phase_parameters.items()
            ))
    if any(r.wall_s is None for r in runs):
        lines.append("wall: '-' where run.json has no wall_s (runs trained before it was recorded)")
    return lines


def plot_comparison(runs: list[RunSummary], out: str | os.PathLike) -> Path:
    """Val top-1 per epoch (counted across phases) of every run on one axis; the EMA's dashed in the run's colour."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for n, run in enumerate(runs):
        colour = f"C{n % 10}"
        x = np.arange(1, len(run.history) + 1)
        top1 = [np.nan if r.get("val_top1") is None else r["val_top1"] for r in run.history]
        ax.plot(x, top1, "o-", color=colour, markersize=3, label=f"{run.name} (val top-1)")
        ema = [np.nan if r.get("ema_val_top1") is None else r["ema_val_top1"] for r in run.history]
        if not np.isnan(ema).all():
            ax.plot(x, ema, "--", color=colour, linewidth=1.2, label=f"{run.name} (EMA)")
    ax.set_xlabel("epoch (counted across phases)")
    ax.set_ylabel("val top-1")
    ax.set_title("val top-1 per epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.1, top=0.93)
    out = Path(out)
    return write_atomic(out, lambda tmp: fig.savefig(tmp, format=out.suffix.lstrip(".") or "png"))
