"""Curves, report and compare on real tiny runs: curves.png redrawn each epoch, an HTML report that opens
from disk (every image there, confidences equal to `predict`'s, Grad-CAM per class, confusion heatmap),
and `compare` over two runs."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import pytest
import timm
from conftest import FAST, run_recipe
from pages import PageParser, cli, png_size
from PIL import Image

from trainer.curves import CURVES, CURVES_SIZE_PX
from trainer.inference import load_bundle, predict
from trainer.run_folder import HISTORY, read_jsonl

TRAIN = [*FAST, "phases.0.warmup_epochs=0", "logging.wandb=false"]  # quickstart: EMA on


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
    for name in ("tench", "goldfish", "great white shark"):  # ImageNet synsets: named from timm's metadata
        assert f"{name} " in " ".join(parser.text)
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
            assert attrs["data-name"] == bundle.names[bundle.classes.index(name)]  # "tench" for n01440764
            assert math.isclose(float(attrs["data-true-prob"]), dict(top)[attrs["data-name"]], abs_tol=1e-5)
            assert attrs["data-predicted"] == top[0][0]
            assert math.isclose(float(attrs["data-predicted-prob"]), top[0][1], abs_tol=1e-5)
            caption = " ".join(figure["text"])
            assert f"{dict(top)[attrs['data-name']]:.1%}" in caption and f"{top[0][1]:.1%}" in caption
            assert f"true {attrs['data-name']}:" in caption


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


def test_report_says_when_tta_was_used(runs, tmp_path):
    """`eval --tta flip` joins the metrics table as such; `report --tta flip` scores the galleries with it."""
    _, run_dir = runs
    code, _, err = cli("eval", str(run_dir), "--tta", "flip")
    assert code == 0, err
    record = json.loads((run_dir / "eval-val-tta-flip.json").read_text())
    code, out, err = cli("report", str(run_dir), "--out", str(tmp_path / "report"), "--per-class", "2", "--tta", "flip")
    assert code == 0, err
    parser = PageParser()
    parser.feed((tmp_path / "report" / "index.html").read_text(encoding="utf-8"))
    text = " ".join(parser.text)
    assert "eval --tta flip" in text and "model, TTA flip" in text and f"{record['model']['top1']:.4f}" in text
    assert "scored by trainer.inference.predict with flip test-time augmentation" in text
    bundle = load_bundle(run_dir / "bundle")
    for figure in parser.figures:
        attrs = figure["attrs"]
        with Image.open(attrs["data-source"]) as image:
            top = predict(bundle, [image.convert("RGB")], topk=len(bundle.classes), tta="flip")[0]
        assert math.isclose(float(attrs["data-true-prob"]), dict(top)[attrs["data-name"]], abs_tol=1e-5)
