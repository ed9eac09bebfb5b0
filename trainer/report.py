"""`python -m trainer report RUN_DIR`: one HTML page about a trained run, opened from disk with no server.

`<RUN_DIR>/report/index.html` with its images beside it in `report/` (relative links, so the folder
can be copied or zipped as a whole):
- the metrics table: every phase's `<phase>/eval.json` (final weights of the phase; model and EMA);
- the training curves (`trainer.curves`);
- the confusion matrix of the last evaluated phase as a heatmap, and its most confused class pairs;
- per class, the best and the worst of a few val images by the confidence of the true class, each
  with its Grad-CAM overlay. These come from the run's bundle (exported first when missing or stale)
  through `trainer.inference`, the one implementation the CLI and the Space use too; with `tta="flip"`
  they are scored with flip test-time augmentation, and the page says so. A TTA score of the eval
  command (`RUN_DIR/eval-val-tta-flip.json`) joins the metrics table, marked as such.

Bounded for ImageNet: at most `per_class` val images are scored per gallery class, at most
`GALLERY_CLASSES_MAX` classes get galleries (the ones with the lowest recall, when there are more),
the heatmap shows at most `HEATMAP_CLASSES_MAX` classes (the most confused ones), and images are
JPEG thumbnails of at most `THUMBNAIL_PX` px. The page says when a cap applied.
"""

from __future__ import annotations

import html
import io
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from trainer import atomic
from trainer.class_names import display_names
from trainer.curves import draw_curves
from trainer.data import load_splits
from trainer.hub import ensure_bundle
from trainer.inference import gradcam, load_bundle, predict
from trainer.metrics import most_confused
from trainer.recipe import Recipe, RecipeError
from trainer.run_folder import EVAL_FILE, REPORT_DIR, load_run, read_json

PER_CLASS_DEFAULT = 8
GALLERY_CLASSES_MAX = 100
HEATMAP_CLASSES_MAX = 30
HEATMAP_ANNOTATE_MAX = 20  # counts written into the cells up to this many classes
CONFUSED_PAIRS = 10
THUMBNAIL_PX = 224
PREDICT_BATCH = 32


@dataclass
class Scored:
    """One scored val image: where it came from, the confidence of its true class, the top prediction."""

    index: int
    source: str
    true_prob: float
    predicted: str
    predicted_prob: float


@dataclass
class ReportResult:
    """What `write_report` wrote, and what it left out and why (printed by the CLI)."""

    index_html: Path
    notes: list[str] = field(default_factory=list)


# -- the run ---------------------------------------------------------------------------------------


def phase_evals(run_dir: Path, recipe: Recipe) -> list[tuple[str, dict[str, Any] | None]]:
    """(phase name, its eval.json or None when the phase has not finished) in recipe order."""
    found = []
    for phase in recipe.phases:
        path = run_dir / phase.name / EVAL_FILE
        found.append((phase.name, read_json(path) if path.is_file() else None))
    return found


def better_weights(record: dict[str, Any]) -> str:
    """"ema" when the EMA scored a higher top-1 than the model in this eval, else "model" (export's rule)."""
    ema = record.get("ema")
    return "ema" if ema is not None and ema["top1"] > record["model"]["top1"] else "model"


# -- figures ---------------------------------------------------------------------------------------


def heatmap_classes(confusion: np.ndarray, limit: int = HEATMAP_CLASSES_MAX) -> list[int]:
    """All classes when there are at most `limit`; else the `limit` classes with the most confused
    samples (off-diagonal, as true or as predicted class), in label order."""
    n = confusion.shape[0]
    if n <= limit:
        return list(range(n))
    off = confusion.astype(np.int64).copy()
    np.fill_diagonal(off, 0)
    weight = off.sum(axis=0) + off.sum(axis=1)
    return sorted(np.argsort(-weight, kind="stable")[:limit].tolist())


def draw_confusion(confusion: np.ndarray, classes: list[str], shown: list[int], out: Path, title: str) -> Path:
    """Heatmap of `confusion[true, predicted]` over the `shown` classes: colour = share of the true
    class's samples (so rare and common classes read alike), counts in the cells when few classes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sub = confusion[np.ix_(shown, shown)].astype(np.float64)
    support = confusion.sum(axis=1)[shown].astype(np.float64)
    share = np.divide(sub, support[:, None], out=np.zeros_like(sub), where=support[:, None] > 0)
    n = len(shown)
    side_in = float(np.clip(2.5 + 0.32 * n, 5.0, 14.0))
    fig = Figure(figsize=(side_in + 1.2, side_in), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    names = [classes[i] if len(classes[i]) <= 24 else classes[i][:23] + "…" for i in shown]
    ax.set_xticks(range(n), names, rotation=90, fontsize=8 if n <= 20 else 6)
    ax.set_yticks(range(n), names, fontsize=8 if n <= 20 else 6)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    if n <= HEATMAP_ANNOTATE_MAX:
        for t in range(n):
            for p in range(n):
                if sub[t, p]:
                    ax.text(p, t, str(int(sub[t, p])), ha="center", va="center", fontsize=8,
                            color="white" if share[t, p] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class's samples")
    fig.tight_layout()  # once per report: the rotated class names need measuring
    fig.savefig(out, format="png")
    return out


# -- galleries -------------------------------------------------------------------------------------


def gallery_labels(classes: list[str], record: dict[str, Any] | None, weights: str, limit: int) -> list[int]:
    """The classes that get galleries, in label order: all of them, or the `limit` with the lowest
    recall in the eval record (the first `limit` when there is no record)."""
    if len(classes) <= limit:
        return list(range(len(classes)))
    if record is None:
        return list(range(limit))
    per_class = record[weights]["per_class"]
    recall = np.array([per_class.get(name, {}).get("recall", 1.0) for name in classes])
    return sorted(np.argsort(recall, kind="stable")[:limit].tolist())


def sample_val(labels: np.ndarray, chosen: list[int], per_class: int, seed: int = 0) -> dict[int, list[int]]:
    """Up to `per_class` val indices of each chosen class, picked with a fixed seed (the same on every report)."""
    rng = np.random.default_rng(seed)
    picked = {}
    for label in chosen:
        where = np.flatnonzero(labels == label)
        picked[label] = sorted(rng.choice(where, size=min(per_class, len(where)), replace=False).tolist()) if len(where) else []
    return picked


def _open_image(source, index: int) -> Image.Image:
    with Image.open(io.BytesIO(bytes(source.read(index)))) as image:
        return image.convert("RGB")


def _source_name(source, index: int) -> str:
    files = getattr(source, "files", None)
    return str(files[index]) if files is not None else f"val index {index}"


def score_images(bundle, source, picked: dict[int, list[int]], tta: str = "none") -> dict[int, list[Scored]]:
    """`trainer.inference.predict` over the picked images, in batches: per class, each image's
    confidence in its true class and the top prediction."""
    flat = [(label, i) for label, indices in picked.items() for i in indices]
    scored: dict[int, list[Scored]] = {label: [] for label in picked}
    for start in range(0, len(flat), PREDICT_BATCH):
        chunk = flat[start : start + PREDICT_BATCH]
        images = [_open_image(source, i) for _, i in chunk]
        for (label, i), top in zip(chunk, predict(bundle, images, topk=len(bundle.classes), tta=tta)):
            probs = dict(top)
            predicted, predicted_prob = top[0]
            scored[label].append(Scored(i, _source_name(source, i), probs[bundle.names[label]], predicted, predicted_prob))
    return scored


def _save_jpeg(image: Image.Image, path: Path) -> None:
    image = image.copy()
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))  # only ever shrinks
    image.save(path, format="JPEG", quality=88)


# -- the page --------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


METRIC_COLUMNS = (("top1", "top-1"), ("top5", "top-5"), ("loss", "loss"), ("precision_macro", "precision (macro)"),
                  ("recall_macro", "recall (macro)"), ("f1_macro", "F1 (macro)"), ("precision_weighted", "precision (weighted)"),
                  ("recall_weighted", "recall (weighted)"), ("f1_weighted", "F1 (weighted)"))

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child, td.name { text-align: left; }
th { background: #f3f3f3; }
.note { color: #555; font-size: 0.9em; }
.galleries { display: flex; flex-wrap: wrap; gap: 0 2.5em; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; margin-bottom: 1.2em; }
figure.prediction { margin: 0; border: 1px solid #ddd; padding: 0.5em; border-radius: 6px; }
figure.prediction.wrong { border-color: #d66; }
figure.prediction img { width: 128px; height: 128px; object-fit: contain; image-rendering: pixelated; background: #eee; }
figcaption { font-size: 0.85em; margin-top: 0.3em; }
h3 { margin-bottom: 0.3em; }
"""


def _metrics_html(evals: list[tuple[str, dict[str, Any] | None]]) -> str:
    head = "".join(f"<th>{label}</th>" for _, label in METRIC_COLUMNS)
    rows = []
    for phase, record in evals:
        if record is None:
            rows.append(f"<tr><td>{html.escape(phase)}</td><td colspan='{len(METRIC_COLUMNS) + 2}' class='name'>no eval.json (the phase has not finished)</td></tr>")
            continue
        for weights in ("model", "ema"):
            scores = record.get(weights)
            if scores is None:
                continue
            cells = "".join(f"<td>{_fmt(scores.get(key))}</td>" for key, _ in METRIC_COLUMNS)
            tta = f", TTA {html.escape(str(record['tta']))}" if record.get("tta", "none") != "none" else ""
            rows.append(f"<tr><td>{html.escape(phase)}</td><td class='name'>{'EMA' if weights == 'ema' else 'model'}{tta}</td>"
                        f"<td>{record.get('samples', '-')}</td>{cells}</tr>")
    return (f"<table class='metrics'><tr><th>phase</th><th>weights</th><th>val samples</th>{head}</tr>{''.join(rows)}</table>"
            "<p class='note'>Each phase's eval.json scores the weights the phase ended with, on the whole val split.</p>")


def _name_html(name: str, folder: str) -> str:
    """A class's display name, with its folder name beside it when they differ (ImageNet: "tench n01440764")."""
    return html.escape(name) + (f" <span class='note'>{html.escape(folder)}</span>" if name != folder else "")


def per_class_table_html(record: dict[str, Any], weights: str) -> str:
    rows = []
    for name, shown in zip(record["classes"], display_names(record["classes"])):
        s = record[weights]["per_class"][name]
        rows.append(f"<tr><td class='name'>{_name_html(shown, name)}</td><td>{s['support']}</td><td>{_fmt(s['accuracy'])}</td>"
                    f"<td>{_fmt(s['precision'])}</td><td>{_fmt(s['recall'])}</td><td>{_fmt(s['f1'])}</td></tr>")
    return ("<table class='per-class'><tr><th>class</th><th>support</th><th>accuracy</th><th>precision</th><th>recall</th>"
            f"<th>F1</th></tr>{''.join(rows)}</table>")


def pairs_table_html(confusion: np.ndarray, classes: list[str]) -> str:
    pairs = most_confused(confusion, classes, count=CONFUSED_PAIRS)
    if not pairs:
        return "<p>No val image was misclassified.</p>"
    support = dict(zip(classes, confusion.sum(axis=1).tolist()))
    rows = "".join(
        f"<tr><td class='name'>{html.escape(t)}</td><td class='name'>{html.escape(p)}</td><td>{n}</td><td>{n / max(support[t], 1):.1%}</td></tr>"
        for t, p, n in pairs
    )
    return f"<table class='pairs'><tr><th>true class</th><th>predicted as</th><th>images</th><th>share of the true class</th></tr>{rows}</table>"


def _figure_html(kind: str, label: int, item: Scored, bundle, source, folder: Path, name: str) -> str:
    """One gallery entry: the image, its Grad-CAM overlay (of the predicted class) and the confidences."""
    image = _open_image(source, item.index)
    stem = f"c{label:04d}-{kind}"
    folder_name, name = name, bundle.names[label]  # data-class keeps the folder name; the page shows the display name
    _save_jpeg(image, folder / f"{stem}.jpg")
    try:
        _, overlay = gradcam(bundle, image)
        _save_jpeg(overlay, folder / f"{stem}-cam.jpg")
        cam = f"<img src='img/{stem}-cam.jpg' class='gradcam' alt='Grad-CAM overlay of {html.escape(item.predicted, quote=True)}'>"
    except NotImplementedError as err:  # no convolutional feature map (a transformer): say so instead
        cam = f"<span class='note'>no Grad-CAM: {html.escape(str(err))}</span>"
    wrong = item.predicted != name
    return (
        f"<figure class='prediction{' wrong' if wrong else ''}' data-kind='{kind}' data-class='{html.escape(folder_name, quote=True)}' "
        f"data-name='{html.escape(name, quote=True)}' "
        f"data-source='{html.escape(item.source, quote=True)}' data-true-prob='{item.true_prob:.6f}' "
        f"data-predicted='{html.escape(item.predicted, quote=True)}' data-predicted-prob='{item.predicted_prob:.6f}'>"
        f"<img src='img/{stem}.jpg' class='image' alt='{kind} val image of {html.escape(name, quote=True)}'> {cam}"
        f"<figcaption><b>{kind}</b>, true {html.escape(name)}: {item.true_prob:.1%}<br>"
        f"predicted {html.escape(item.predicted)}: {item.predicted_prob:.1%}"
        f"<br><span class='note' title='{html.escape(item.source, quote=True)}'>{html.escape(Path(item.source).name)}</span></figcaption></figure>"
    )


def _galleries_html(run_dir: Path, recipe: Recipe, record: dict[str, Any] | None, weights: str, per_class: int,
                    folder: Path, notes: list[str], tta: str = "none") -> str:
    try:
        source = load_splits(recipe).val
    except (RecipeError, ValueError, OSError) as err:  # DataError is a ValueError
        notes.append(f"no galleries: the run's val images ({recipe.data.path}) cannot be read here ({err}); pass --data PATH")
        return f"<p class='note'>No galleries: {html.escape(notes[-1])}</p>"
    bundle_dir = ensure_bundle(run_dir, report=notes.append)
    bundle = load_bundle(bundle_dir)
    if list(source.classes) != bundle.classes:
        raise RecipeError(f"the val data at {recipe.data.path} has classes {list(source.classes)[:5]}..., the bundle {bundle.classes[:5]}...; "
                          "pass --data with the data the run was trained on")
    chosen = gallery_labels(bundle.classes, record, weights, GALLERY_CLASSES_MAX)
    scored = score_images(bundle, source, sample_val(np.asarray(source.labels), chosen, per_class), tta)
    metrics = bundle.config.get("metrics", {})
    intro = (f"<p class='note'>Weights: the bundle ({html.escape(str(bundle_dir))}): "
             f"{'EMA' if metrics.get('source') == 'ema' else 'model'} weights of the best checkpoint of phase "
             f"{html.escape(str(metrics.get('phase', '?')))}, scored by trainer.inference.predict"
             f"{' with flip test-time augmentation (the mean of the softmax of each image and its mirror)' if tta == 'flip' else ', no test-time augmentation'}"
             f". Up to {per_class} val images per class "
             "(seeded pick); best and worst by the confidence of the true class; Grad-CAM of the predicted class.</p>")
    if len(chosen) < len(bundle.classes):
        intro += (f"<p class='note'><b>Capped:</b> galleries for {len(chosen)} of {len(bundle.classes)} classes, "
                  "those with the lowest recall in the eval above.</p>")
        notes.append(f"galleries capped at {len(chosen)} of {len(bundle.classes)} classes")
    parts, galleries = [intro], []
    for label in chosen:
        name = bundle.classes[label]
        items = sorted(scored[label], key=lambda s: -s.true_prob)
        if not items:
            figures = "<p class='note'>no val images of this class</p>"
        else:
            shown = [("best", items[0])] + ([("worst", items[-1])] if len(items) > 1 else [])
            figures = "".join(_figure_html(kind, label, item, bundle, source, folder, name) for kind, item in shown)
        galleries.append(f"<section class='class-gallery' id='class-{label}'><h3>{_name_html(bundle.names[label], name)}</h3><div class='gallery'>{figures}</div></section>")
    return "".join(parts) + f"<div class='galleries'>{''.join(galleries)}</div>"


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, per_class: int = PER_CLASS_DEFAULT,
                 data: str | None = None, tta: str = "none") -> ReportResult:
    """Write the report of `run_dir` into `out` (default RUN_DIR/report): index.html and its images.
    Built in a temporary folder beside it and renamed, so a failed report leaves the last good one."""
    if per_class < 1:
        raise RecipeError(f"--per-class must be >= 1, got {per_class}")
    run_dir = Path(run_dir)
    recipe, info = load_run(run_dir, data)
    out = Path(out) if out is not None else run_dir / REPORT_DIR
    if out.exists() and not (out / "index.html").is_file():
        raise RecipeError(f"{out} exists and is not a report folder; choose another --out")
    tmp = atomic.staging_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "img").mkdir(parents=True)
    notes: list[str] = []
    try:
        body = _report_body(run_dir, recipe, info, per_class, tmp, notes, tta)
        title = f"Report: {run_dir.name}"
        page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")
        (tmp / "index.html").write_text(page, encoding="utf-8")
        atomic.swap_in(tmp, out)  # the previous report is replaced only now
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ReportResult(out / "index.html", notes)


def _report_body(run_dir: Path, recipe: Recipe, info: dict[str, Any], per_class: int, folder: Path, notes: list[str],
                 tta: str = "none") -> str:
    evals = phase_evals(run_dir, recipe)
    tta_eval = run_dir / "eval-val-tta-flip.json"  # what `eval RUN_DIR --tta flip` writes
    shown_evals = evals + ([("eval --tta flip", read_json(tta_eval))] if tta_eval.is_file() else [])
    classes = list(info.get("classes") or [])
    git = info.get("git", {})
    parts = [
        f"<p>Recipe <b>{html.escape(recipe.name)}</b>, model <b>{html.escape(recipe.model.arch)}</b>, "
        f"{len(classes)} classes, data {html.escape(str(recipe.data.path))}, commit {html.escape(str(git.get('commit', '?'))[:12])}"
        f"{' (dirty)' if git.get('dirty') else ''}. Written {time.strftime('%Y-%m-%d %H:%M')}.</p>",
        "<h2 id='metrics'>Metrics</h2>", _metrics_html(shown_evals),
    ]
    if draw_curves(run_dir, folder / "img" / "curves.png") is not None:
        parts += ["<h2 id='curves'>Training curves</h2>", "<img src='img/curves.png' class='curves' alt='training curves' style='max-width:100%'>"]
    last = next(((phase, record) for phase, record in reversed(evals) if record is not None), None)
    weights = "model"
    if last is None:
        notes.append("no phase has an eval.json yet: no metrics, confusion matrix or per-class table")
    else:
        phase, record = last
        weights = better_weights(record)
        label = "EMA" if weights == "ema" else "model"
        confusion = np.asarray(record[weights]["confusion"], dtype=np.int64)
        names = display_names(record["classes"])
        shown = heatmap_classes(confusion)
        capped = len(shown) < len(names)
        draw_confusion(confusion, names, shown, folder / "img" / "confusion.png",
                       f"{phase}, {label} weights: {'the ' + str(len(shown)) + ' most confused classes' if capped else 'all classes'}")
        parts += [
            "<h2 id='confusion'>Confusion matrix</h2>",
            f"<p class='note'>Phase {html.escape(phase)}, {label} weights (the better of model and EMA in its eval.json); "
            "rows: true class, columns: predicted; colour: share of the true class's images, numbers: images.</p>",
            *([f"<p class='note'><b>Capped:</b> the {len(shown)} classes with the most misclassified images, of {len(names)}.</p>"] if capped else []),
            "<img src='img/confusion.png' class='confusion' alt='confusion matrix heatmap' style='max-width:100%'>",
            "<h2 id='confused-pairs'>Most confused pairs</h2>", pairs_table_html(confusion, names),
            "<h2 id='per-class'>Per class</h2>", per_class_table_html(record, weights),
        ]
    parts += ["<h2 id='galleries'>Best and worst predictions per class</h2>",
              _galleries_html(run_dir, recipe, last[1] if last else None, weights, per_class, folder / "img", notes, tta)]
    return "".join(parts)
