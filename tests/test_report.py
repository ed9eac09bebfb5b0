"""Curves, report and compare on real tiny runs: curves.png redrawn each epoch, an HTML report that opens
from disk (every image there, confidences equal to `predict`'s, Grad-CAM per class, confusion heatmap),
and `compare` over two runs."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import math
import struct
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import timm
from conftest import FAST, run_recipe
from PIL import Image

from trainer.__main__ import main
from trainer.curves import CURVES, CURVES_SIZE_PX, draw_curves, epoch_positions, redraw_curves
from trainer.inference import load_bundle, predict
from trainer.report import (
    GALLERY_CLASSES_MAX,
    HEATMAP_CLASSES_MAX,
    gallery_labels,
    heatmap_classes,
    pairs_table_html,
    per_class_table_html,
)
from trainer.tracking import HISTORY, read_jsonl

TRAIN = [*FAST, "phases.0.warmup_epochs=0", "logging.wandb=false"]  # quickstart: EMA on
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_imagenet, run_env) -> tuple[Path, Path]:
    """Two real runs of the quickstart on the tiny folder: 2 epochs and 1 epoch."""
    root = tmp_path_factory.mktemp("report")
    made = []
    for name, epochs in (("two-epochs", 2), ("one-epoch", 1)):
        run_dir = root / name
        done = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=run_env,
                          sets=[*TRAIN, f"phases.0.epochs={epochs}"])
        assert done.returncode == 0, done.stderr[-3000:]
        made.append(run_dir)
    return made[0], made[1]


class PageParser(HTMLParser):
    """Every <img> src and every gallery <figure> (its data-* attributes, image sources and caption text)."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.figures: list[dict] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.figures.append({"attrs": attrs, "images": [], "text": []})
        elif tag == "img":
            self.images.append(attrs)
            if self.figures and self.figures[-1].get("open", True):
                self.figures[-1]["images"].append(attrs)

    def handle_endtag(self, tag):
        if tag == "figure":
            self.figures[-1]["open"] = False

    def handle_data(self, data):
        self.text.append(data)
        if self.figures and self.figures[-1].get("open", True):
            self.figures[-1]["text"].append(data)


def resolve_image(report_dir: Path, src: str) -> Image.Image:
    """The image an <img src> shows when the page is opened from disk: a relative file or a data URI."""
    if src.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    assert "://" not in src and not src.startswith("/"), f"{src} would need a server or an absolute path"
    path = report_dir / src
    assert path.is_file(), f"{src} is missing from {report_dir}"
    return Image.open(path)


# -- curves ----------------------------------------------------------------------------------------


def test_curves_redrawn_every_epoch(runs):
    run_dir, one_epoch = runs
    for folder in (run_dir, one_epoch):
        curves = folder / CURVES
        assert png_size(curves) == CURVES_SIZE_PX  # the 2x2 figure, at its fixed size
        # Drawn after the last epoch's record was appended: the figure shows every epoch of the run.
        assert curves.stat().st_mtime >= (folder / HISTORY).stat().st_mtime
    assert not list(run_dir.glob(".tmp-*"))  # written under a temporary name and renamed


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


def test_a_plotting_error_never_stops_training(tmp_path, capsys):
    (tmp_path / HISTORY).write_text(json.dumps({"phase_index": 0, "phase": "main", "epoch": 0, "val_top1": "not a number"}) + "\n")
    redraw_curves(tmp_path)  # must not raise: the loop calls it between epochs
    assert "warning: could not draw" in capsys.readouterr().err
    assert not (tmp_path / CURVES).exists()


# -- report ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(runs) -> tuple[Path, str, PageParser]:
    run_dir, _ = runs
    assert not (run_dir / "bundle").exists()  # the report exports the bundle itself
    code, out, err = cli("report", str(run_dir), "--per-class", "4")
    assert code == 0, err
    index = run_dir / "report" / "index.html"
    assert out.strip().splitlines()[-1] == str(index)
    page = index.read_text(encoding="utf-8")
    parser = PageParser()
    parser.feed(page)
    return index.parent, page, parser


def test_report_opens_from_disk(report):
    report_dir, page, parser = report
    assert page.startswith("<!doctype html>")
    assert parser.images, "the page shows no image"
    for attrs in parser.images:
        image = resolve_image(report_dir, attrs["src"])
        image.load()  # a whole, decodable image
        assert max(image.size) <= 224 or attrs["src"].endswith(("curves.png", "confusion.png"))  # thumbnails stay small


def test_report_metrics_confusion_and_classes(report, runs, tiny_imagenet):
    report_dir, page, parser = report
    run_dir, _ = runs
    classes = sorted(p.name for p in (tiny_imagenet / "train").iterdir())
    text = " ".join(parser.text)
    for name in classes:
        assert name in text
    record = json.loads((run_dir / "main" / "eval.json").read_text())  # written by the trainer at the phase's end
    for weights in ("model", "ema"):
        assert f"{record[weights]['top1']:.4f}" in text and f"{record[weights]['f1_macro']:.4f}" in text
    sources = [attrs["src"] for attrs in parser.images]
    assert any("confusion" in src for src in sources) and any("curves" in src for src in sources)
    confusion = next(src for src in sources if "confusion" in src)
    assert png_size(report_dir / confusion)[0] >= 400  # a readable heatmap, not an icon
    assert "Most confused pairs" in text


def test_report_galleries_match_predict(report, runs):
    report_dir, _, parser = report
    run_dir, _ = runs
    bundle = load_bundle(run_dir / "bundle")
    by_class: dict[str, list[dict]] = {}
    for figure in parser.figures:
        by_class.setdefault(figure["attrs"]["data-class"], []).append(figure)
    assert sorted(by_class) == sorted(bundle.classes)  # a gallery for every class
    for name, figures in by_class.items():
        kinds = [f["attrs"]["data-kind"] for f in figures]
        assert kinds == ["best", "worst"]  # 4 images scored per class
        assert float(figures[0]["attrs"]["data-true-prob"]) >= float(figures[1]["attrs"]["data-true-prob"])
        for figure in figures:
            attrs = figure["attrs"]
            cams = [i for i in figure["images"] if "gradcam" in i.get("class", "")]
            assert len(cams) == 1, f"no Grad-CAM overlay for {name}"
            resolve_image(report_dir, cams[0]["src"]).load()
            with Image.open(attrs["data-source"]) as image:
                top = predict(bundle, [image.convert("RGB")], topk=len(bundle.classes))[0]
            assert Path(attrs["data-source"]).parent.name == name  # the image is a val image of this class
            assert math.isclose(float(attrs["data-true-prob"]), dict(top)[name], abs_tol=1e-5)
            assert attrs["data-predicted"] == top[0][0]
            assert math.isclose(float(attrs["data-predicted-prob"]), top[0][1], abs_tol=1e-5)
            caption = " ".join(figure["text"])
            assert f"{dict(top)[name]:.1%}" in caption and f"{top[0][1]:.1%}" in caption


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


# -- compare ---------------------------------------------------------------------------------------


def test_compare_two_runs(runs, tmp_path):
    two, one = runs
    out = tmp_path / "compare.png"
    code, printed, err = cli("compare", str(two), str(one), "--out", str(out))
    assert code == 0, err
    lines = printed.splitlines()
    assert lines[0].split()[:2] == ["run", "best"]
    rows = {line.split()[0]: line for line in lines[1:3]}
    assert set(rows) == {"two-epochs", "one-epoch"}
    expected_params = sum(p.numel() for p in timm.create_model("resnet10t", num_classes=3).parameters())
    for run_dir, epochs in ((two, 2), (one, 1)):
        history = read_jsonl(run_dir / HISTORY)
        best = max(max(r["val_top1"], r["ema_val_top1"] or 0.0) for r in history)
        fields = rows[run_dir.name].split()
        assert fields[1] == f"{best:.4f}" and int(fields[4]) == epochs
        assert fields[7] == f"{expected_params / 1e6:.2f}M"
        assert json.loads((run_dir / "run.json").read_text())["wall_s"] > 0 and fields[5] != "-"
    assert png_size(out)[0] > 0 and lines[-1] == f"plot: {out}"


def test_compare_refuses_what_is_not_a_run(tmp_path, runs):
    code, _, err = cli("compare", str(runs[0]), str(tmp_path))
    assert code == 2 and f"{tmp_path} is not a run folder" in err
