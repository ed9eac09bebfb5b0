"""Metrics and report pieces that need no run: top-1/top-5 and the loss of `evaluate` on known logits, P/R/F1
against scikit-learn, the curves' epoch axis, caps at ImageNet scale, escaped class names, and what is
not a run."""

from __future__ import annotations

import contextlib
import json
import threading

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from pages import PageParser, cli, png_size
from sklearn.metrics import precision_recall_fscore_support

from trainer.curves import CURVES, CURVES_SIZE_PX, CurvesRedraw, draw_curves, epoch_positions, redraw_curves
from trainer.metrics import confusion_scores, evaluate, most_confused
from trainer.report import (
    GALLERY_CLASSES_MAX,
    HEATMAP_CLASSES_MAX,
    gallery_labels,
    heatmap_classes,
    pairs_table_html,
    per_class_table_html,
)
from trainer.run_folder import HISTORY, read_jsonl


def test_evaluate_counts_top1_top5_and_the_loss_of_known_logits():
    """12 classes, so top-5 is not 1 by construction; padding (label -1) counts nowhere."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 12, generator=generator)
    labels = torch.randint(0, 12, (40,), generator=generator)
    labels[-3:] = -1  # the padding that evens out the ranks' batches
    batches = [(logits[i : i + 8], labels[i : i + 8]) for i in range(0, 40, 8)]
    scores = evaluate(torch.nn.Identity(), batches, Accelerator(cpu=True), contextlib.nullcontext())
    real = labels >= 0
    # Where the true class ranks among the logits, counted by hand: how many classes score higher.
    rank = (logits[real] > logits[real, labels[real]][:, None]).sum(dim=1).numpy()
    assert scores["samples"] == 37
    assert scores["top1"] == pytest.approx((rank == 0).mean()) and scores["top5"] == pytest.approx((rank < 5).mean())
    assert 0 < scores["top1"] < scores["top5"] < 1
    expected_loss = torch.nn.functional.cross_entropy(logits[real], labels[real]).item()
    assert scores["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert scores["confusion"].sum() == 37 and np.trace(scores["confusion"]) == (rank == 0).sum()


def test_precision_recall_f1_match_sklearn():
    # Class "c" is never predicted and class "d" never occurs: both 0/0 cases, defined as 0.
    confusion = np.array([[5, 2, 0, 1], [1, 3, 0, 0], [2, 0, 0, 2], [0, 0, 0, 0]])
    classes = ["a", "b", "c", "d"]
    y_true = np.repeat(np.repeat(np.arange(4), 4), confusion.ravel())
    y_pred = np.repeat(np.tile(np.arange(4), 4), confusion.ravel())
    report = confusion_scores(confusion, classes)
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=range(4), average=average, zero_division=0)
        assert (report[f"precision_{average}"], report[f"recall_{average}"], report[f"f1_{average}"]) == pytest.approx((p, r, f))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=range(4), zero_division=0)
    for i, name in enumerate(classes):
        got = report["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"], got["support"]) == pytest.approx((p[i], r[i], f[i], s[i]))
    assert report["per_class"]["c"]["accuracy"] == 0.0 and report["per_class"]["d"]["precision"] == 0.0
    assert most_confused(confusion, classes, count=2) == [("a", "b", 2), ("c", "a", 2)]


def test_curves_count_epochs_across_phases(tmp_path):
    history = [  # written out of order: the figure orders by (phase, epoch)
        {"phase_index": 1, "phase": "finetune", "epoch": 0, "train_loss": 0.6, "val_loss": 0.7, "val_top1": 0.7, "val_top5": 0.9,
         "ema_val_top1": 0.72, "lr": 1e-4, "total_step": 40},
        *({"phase_index": 0, "phase": "head", "epoch": e, "train_loss": 1.0 - 0.1 * e, "val_loss": 1.1 - 0.1 * e, "val_top1": 0.5,
           "val_top5": 0.8, "ema_val_top1": None, "lr": 1e-3, "total_step": 10 * (e + 1)} for e in range(3)),
    ]
    (tmp_path / HISTORY).write_text("".join(json.dumps(r) + "\n" for r in history))
    records, x = epoch_positions(read_jsonl(tmp_path / HISTORY))
    assert [(r["phase"], r["epoch"]) for r in records] == [("head", 0), ("head", 1), ("head", 2), ("finetune", 0)]
    assert x.tolist() == [1, 2, 3, 4]
    assert png_size(draw_curves(tmp_path)) == CURVES_SIZE_PX
    assert draw_curves(tmp_path / "empty-run") is None  # nothing to draw before the first epoch


def _epoch(e: int) -> dict:
    return {"phase_index": 0, "phase": "main", "epoch": e, "train_loss": 2.0 - 0.1 * e, "val_loss": 2.1 - 0.1 * e,
            "val_top1": 0.1 * e, "val_top5": 0.3 + 0.1 * e, "ema_val_top1": None, "lr": 1e-3, "total_step": 10 * (e + 1)}


def test_curves_redraw_on_a_thread_writes_the_latest_history(tmp_path):
    # What the loop does at epoch ends: start a redraw and go on; before the run returns, wait. A redraw
    # started while the previous one still draws waits for it, so the file ends up with the newest epochs.
    (tmp_path / HISTORY).write_text("".join(json.dumps(_epoch(e)) + "\n" for e in range(3)))
    curves = CurvesRedraw(tmp_path)
    assert curves.due(30.0)
    curves.start()
    assert not curves.due(30.0) and curves.due(0.0)
    with open(tmp_path / HISTORY, "a") as f:
        f.write(json.dumps(_epoch(3)) + "\n")
    curves.start()
    curves.wait()
    assert png_size(tmp_path / CURVES) == CURVES_SIZE_PX
    # The same pixels as drawing the 4-epoch history directly (the Agg canvas is deterministic).
    assert (tmp_path / CURVES).read_bytes() == draw_curves(tmp_path, tmp_path / "direct.png").read_bytes()
    assert [t.name for t in threading.enumerate() if t.name == "curves.png"] == []


def test_a_plotting_error_on_the_thread_is_printed_not_raised(tmp_path, capsys):
    (tmp_path / HISTORY).write_text(json.dumps({"phase_index": 0, "phase": "main", "epoch": 0, "val_top1": "not a number"}) + "\n")
    curves = CurvesRedraw(tmp_path)
    curves.start()
    curves.wait()  # must not raise either
    assert "warning: could not draw" in capsys.readouterr().err
    assert not (tmp_path / CURVES).exists()


def test_a_plotting_error_never_stops_training(tmp_path, capsys):
    (tmp_path / HISTORY).write_text(json.dumps({"phase_index": 0, "phase": "main", "epoch": 0, "val_top1": "not a number"}) + "\n")
    redraw_curves(tmp_path)  # must not raise: the loop calls it between epochs
    assert "warning: could not draw" in capsys.readouterr().err
    assert not (tmp_path / CURVES).exists()


def test_report_refuses_what_is_not_a_run(tmp_path, tiny_imagenet):
    code, _, err = cli("report", str(tiny_imagenet))
    assert code == 2 and "is not a run folder" in err and "Traceback" not in err


def test_report_caps_for_many_classes():
    # ImageNet-sized: the heatmap keeps the most confused classes, the galleries the lowest recall.
    classes = [f"class {i}" for i in range(1000)]
    confusion = np.eye(1000, dtype=np.int64) * 50
    confusion[10, 900], confusion[900, 10], confusion[500, 501] = 30, 5, 20
    shown = heatmap_classes(confusion)
    assert len(shown) == HEATMAP_CLASSES_MAX and {10, 900, 500, 501} <= set(shown)
    per_class = {name: {"recall": 1.0} for name in classes}
    per_class["class 777"]["recall"] = 0.1
    chosen = gallery_labels(classes, {"model": {"per_class": per_class}}, "model", GALLERY_CLASSES_MAX)
    assert len(chosen) == GALLERY_CLASSES_MAX and 777 in chosen


def test_report_escapes_class_names():
    classes = ["<b>cats & dogs</b>", "plain"]  # folder names are free text: they must show as text, not markup
    confusion = np.array([[3, 1], [2, 4]])
    per_class = {name: {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 4} for name in classes}
    for fragment in (pairs_table_html(confusion, classes), per_class_table_html({"classes": classes, "model": {"per_class": per_class}}, "model")):
        parser = PageParser()
        parser.feed(fragment)
        assert "<b>" not in fragment and "<b>cats & dogs</b>" in "".join(parser.text)
