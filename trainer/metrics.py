"""Classification metrics: top-k accuracy and the confusion matrix over gathered predictions (each real
sample counted once), the per-class report built from a confusion matrix (eval.json's schema), and a
small sample of per-image predictions for dashboards."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from trainer import inference


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator, autocast, num_classes: int | None = None) -> dict[str, Any]:
    """Top-1/top-5, loss and confusion matrix of `model` on `loader`, across all processes.

    Each rank scores its shard; `gather_for_metrics` collects (top-5, label, loss) from all ranks and
    the padding that keeps batch counts equal (label -1) is dropped, so each sample counts once.
    `confusion[true, predicted top-1]` counts samples; `num_classes` defaults to the logits' width.
    """
    was_training = model.training
    model.eval()
    top_k, labels_all, losses = [], [], []
    for images, labels in loader:
        images = images.to(accelerator.device, non_blocking=True)
        labels = labels.to(accelerator.device, non_blocking=True)
        with autocast:
            logits = model(images)
        logits = logits.float()
        num_classes = num_classes or logits.shape[1]
        k = min(5, logits.shape[1])
        loss = torch.nn.functional.cross_entropy(logits, labels.clamp(min=0), reduction="none")
        gathered = accelerator.gather_for_metrics((logits.topk(k, dim=1).indices, labels, loss))
        top_k.append(gathered[0])
        labels_all.append(gathered[1])
        losses.append(gathered[2])
    model.train(was_training)
    top_k, labels_all, losses = torch.cat(top_k), torch.cat(labels_all), torch.cat(losses)
    real = labels_all >= 0
    top_k, labels_all, losses = top_k[real], labels_all[real], losses[real]
    hits = top_k == labels_all[:, None]
    n = max(int(real.sum()), 1)
    # One bincount over (true, predicted) pairs: cheap enough to run every epoch.
    confusion = torch.bincount(labels_all * num_classes + top_k[:, 0], minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes).cpu().numpy()
    return {
        "top1": float(hits[:, 0].sum()) / n,
        "top5": float(hits.any(dim=1).sum()) / n,
        "loss": float(losses.sum()) / n,
        "samples": int(real.sum()),
        "confusion": confusion,
        **class_averaged(confusion),
    }


def class_averaged(confusion: np.ndarray) -> dict[str, float]:
    """The scores an unbalanced val set does not flatter, from `confusion[true, predicted]` (gathered from
    every process, each sample once): `macro_f1`, F1 averaged over the classes that occur (as true or
    predicted), and `balanced_accuracy`, recall averaged over the classes that occur as true labels.
    The same conventions as scikit-learn's f1_score(average="macro") and balanced_accuracy_score."""
    confusion = np.asarray(confusion, dtype=np.int64)
    correct, support, predicted = np.diag(confusion), confusion.sum(axis=1), confusion.sum(axis=0)
    precision, recall = _ratio(correct, predicted), _ratio(correct, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    occurring, true_classes = (support + predicted) > 0, support > 0
    return {
        "macro_f1": float(f1[occurring].mean()) if occurring.any() else 0.0,
        "balanced_accuracy": float(recall[true_classes].mean()) if true_classes.any() else 0.0,
    }


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Elementwise numerator / denominator with 0/0 (a class never seen or never predicted) defined as 0."""
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def confusion_scores(confusion: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Precision, recall and F1 per class and averaged (macro: every class alike; weighted: by support),
    and per-class accuracy (= recall: correct / samples of the class), from `confusion[true, predicted]`."""
    confusion = np.asarray(confusion, dtype=np.int64)
    if confusion.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix of shape {confusion.shape} for {len(classes)} classes")
    correct = np.diag(confusion)
    support = confusion.sum(axis=1)
    precision = _ratio(correct, confusion.sum(axis=0))
    recall = _ratio(correct, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    weights = _ratio(support, np.full_like(support, support.sum()))
    return {
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "precision_weighted": float((precision * weights).sum()),
        "recall_weighted": float((recall * weights).sum()),
        "f1_weighted": float((f1 * weights).sum()),
        "per_class": {
            name: {"accuracy": float(r), "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(classes, precision, recall, f1, support)
        },
        "confusion": confusion.tolist(),
    }


def scores_report(scores: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """One weights' block of eval.json from `evaluate()`'s result."""
    return {"top1": scores["top1"], "top5": scores["top5"], "loss": scores["loss"], **confusion_scores(scores["confusion"], classes)}


def eval_report(
    *, phase: str, split: str, classes: list[str], weights: str, model: dict[str, Any], ema: dict[str, Any] | None
) -> dict[str, Any]:
    """The eval.json record (report, curve and compare tools read exactly these keys) from `evaluate()`
    results of the model and, when there is one, the EMA."""
    return {
        "phase": phase,
        "split": split,
        "samples": model["samples"],
        "classes": list(classes),
        "weights": weights,
        "model": scores_report(model, classes),
        "ema": scores_report(ema, classes) if ema is not None else None,
    }


def most_confused(confusion: list[list[int]] | np.ndarray, classes: list[str], count: int = 5) -> list[tuple[str, str, int]]:
    """The `count` largest off-diagonal cells as (true class, predicted class, samples), largest first."""
    confusion = np.array(confusion, dtype=np.int64)
    np.fill_diagonal(confusion, 0)
    flat = np.argsort(-confusion, axis=None, kind="stable")[:count]
    pairs = [np.unravel_index(i, confusion.shape) for i in flat]
    return [(classes[t], classes[p], int(confusion[t, p])) for t, p in pairs if confusion[t, p] > 0]


def sample_indices(labels: np.ndarray, per_class: int = 3, total: int = 64) -> list[int]:
    """A bounded, deterministic pick of samples for a predictions table: the first `per_class` of each
    class in source order (fewer per class when there are many classes), `total` at most."""
    classes = int(labels.max()) + 1 if len(labels) else 0
    per_class = max(1, min(per_class, total // max(1, classes)))
    taken: dict[int, int] = {}
    chosen = []
    for i, label in enumerate(np.asarray(labels).tolist()):
        if label < 0 or taken.get(label, 0) >= per_class:
            continue
        taken[label] = taken.get(label, 0) + 1
        chosen.append(i)
        if len(chosen) == total:
            break
    return chosen


@torch.no_grad()
def sample_predictions(
    model: torch.nn.Module,
    source,
    indices: list[int],
    preprocess_config: dict[str, Any],
    autocast,
    thumbnail_px: int = 96,
) -> list[dict[str, Any]]:
    """Per chosen sample of `source` (anything with `read(i)`, `labels` and `classes`): the image as a
    thumbnail, true and predicted class and the softmax confidence. Runs on the calling process only
    (no collectives), through `trainer.inference`'s preprocessing, the one `predict()` uses."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(indices), 16):
        chunk = indices[start : start + 16]
        images = [Image.open(io.BytesIO(bytes(source.read(i)))).convert("RGB") for i in chunk]
        batch = torch.stack([inference.preprocess(image, preprocess_config) for image in images]).to(device)
        with autocast:
            logits = model(batch)
        confidence, predicted = torch.softmax(logits.float(), dim=1).max(dim=1)
        for i, image, p, c in zip(chunk, images, predicted.tolist(), confidence.tolist()):
            image.thumbnail((thumbnail_px, thumbnail_px))
            rows.append({
                "index": i,
                "image": image,
                "true": source.classes[int(source.labels[i])],
                "predicted": source.classes[p],
                "confidence": c,
            })
    model.train(was_training)
    return rows
