"""Class names for people: ImageNet synsets get timm's first lemma ("tench"), every other folder name stays,
and `eval`'s table and the report's tables show them."""

from __future__ import annotations

import numpy as np
from pages import PageParser

from trainer.class_names import display_names, imagenet_descriptions
from trainer.evaluation import format_report
from trainer.metrics import eval_report
from trainer.report import pairs_table_html, per_class_table_html

IMAGENET = ["n01440764", "n01443537", "n01484850"]


def test_imagenet_synsets_get_their_short_name_and_other_folders_keep_theirs():
    assert display_names(IMAGENET) == ["tench", "goldfish", "great white shark"]
    assert imagenet_descriptions(IMAGENET)["n01440764"] == "tench, Tinca tinca"  # timm's words, whole
    # ImageNet-1k has two cranes (the bird, the machine): a name still means one class; one maillot alone needs no id.
    assert display_names(["n02012849", "n03126707", "n03710637", "n01440764"]) == [
        "crane (n02012849)", "crane (n03126707)", "maillot", "tench"]
    # Any class that is not a synset timm knows: every folder keeps its name.
    assert display_names(["n01440764", "cats"]) == ["n01440764", "cats"]
    assert display_names(["n99999999", "n01440764"]) == ["n99999999", "n01440764"]
    assert display_names(["cat", "dog"]) == ["cat", "dog"] and imagenet_descriptions(["cat", "dog"]) is None


def record(classes: list[str]) -> dict:
    confusion = np.array([[3, 1, 0], [2, 2, 0], [0, 0, 4]])
    scores = {"samples": 12, "top1": 0.75, "top5": 1.0, "loss": 0.5, "confusion": confusion}
    return eval_report(phase="main", split="val", classes=classes, weights="bundle b", model=scores, ema=None)


def test_eval_table_and_report_tables_show_the_names():
    table = format_report(record(IMAGENET))
    assert "tench -> goldfish: 1" in table and "goldfish -> tench: 2" in table  # most confused pairs
    row = next(line for line in table.splitlines() if line.startswith("great white shark"))
    assert row.split()[-1] == "n01484850" and "folder" in table  # the folder beside the name
    text = []
    for fragment in (per_class_table_html(record(IMAGENET), "model"), pairs_table_html(np.array(record(IMAGENET)["model"]["confusion"]), display_names(IMAGENET))):
        parser = PageParser()
        parser.feed(fragment)
        text += parser.text
    assert {"tench", "goldfish", "great white shark", "n01440764"} <= {t.strip() for t in text}

    plain = format_report(record(["cat", "dog", "fox"]))
    assert "cat -> dog: 1" in plain and "folder" not in plain
    assert next(line for line in plain.splitlines() if line.startswith("fox")).split()[-1] == "4"  # images, no folder column
