"""The test split beside train and val: a test/ folder, data.test_fraction on one folder and on train/ alone
(builtin:digits: test_loaders.py), a Hugging Face test split; disjoint, stratified, seeded, screened like val."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CLASSES, write_image_folder
from PIL import Image

from loaders.screening import screening_record
from loaders.sources import DataError, image_folder_sources, image_folder_splits, stratified_split, stratified_three_way
from trainer.data import load_splits
from trainer.recipe import Data, Phase, Recipe, RecipeError


def recipe_for(path: str, **data) -> Recipe:
    return Recipe(name="splits", data=Data(path=path, **data), phases=(Phase(epochs=1),))


def test_three_way_split_is_disjoint_stratified_seeded_and_leaves_val_alone():
    labels = np.repeat(np.arange(4), [100, 50, 10, 3])
    train, val, test = stratified_three_way(labels, 0.2, 0.1, seed=0)
    assert np.bincount(labels[val]).tolist() == [20, 10, 2, 1]
    assert np.bincount(labels[test]).tolist() == [10, 5, 1, 1]
    assert np.bincount(labels[train]).tolist() == [70, 35, 7, 1]  # a 3-image class keeps one to train on
    assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(len(labels)))
    again = stratified_three_way(labels, 0.2, 0.1, seed=0)
    other = stratified_three_way(labels, 0.2, 0.1, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(again, (train, val, test)))
    assert not np.array_equal(other[2], test)
    # A test split only takes training images: val is the one the run would have without it.
    assert np.array_equal(stratified_split(labels, 0.2, seed=0)[1], val)
    with pytest.raises(DataError, match="sum under 1"):
        stratified_three_way(labels, 0.6, 0.4, seed=0)


def test_test_fraction_on_one_folder_and_on_train_without_val(tmp_path):
    root = write_image_folder(tmp_path, {"all": 10})
    train, val, test = image_folder_sources(root / "all", val_fraction=0.2, test_fraction=0.2, seed=1)
    assert val.class_counts() == test.class_counts() == {c: 2 for c in CLASSES}
    assert train.class_counts() == {c: 6 for c in CLASSES}
    assert len({*train.files, *val.files, *test.files}) == 30
    assert val.files == image_folder_splits(root / "all", val_fraction=0.2, seed=1)[1].files
    assert image_folder_sources(root / "all", 0.2, 0.2, seed=1)[2].files == test.files
    assert image_folder_sources(root / "all", 0.2, 0.2, seed=2)[2].files != test.files
    assert image_folder_sources(root / "all", 0.2, 0.0, seed=1)[2] is None  # the default: no test split

    (root / "all").rename(root / "train")  # train/ without val/: both come from it
    train, val, test = image_folder_sources(root, val_fraction=0.2, test_fraction=0.2, seed=1)
    assert len(train) == 18 and len(val) == 6 and len(test) == 6
    assert len({*train.files, *val.files, *test.files}) == 30


def test_test_fraction_beside_a_val_folder_takes_from_train_only(tiny_imagenet):
    train, val, test = image_folder_sources(tiny_imagenet, test_fraction=0.25, seed=0)
    assert val.files == image_folder_splits(tiny_imagenet)[1].files
    assert test.class_counts() == {c: 8 for c in CLASSES} and len(train) == 72
    assert set(test.files).isdisjoint(train.files) and all("/train/" in f for f in test.files)


def test_test_folder_has_trains_classes_and_vals_layout_checks(tmp_path):
    root = write_image_folder(tmp_path, {"train": 4, "val": 2, "test": 3})
    train, val, test = image_folder_sources(root)
    assert len(train) == 12 and len(val) == 6 and test.class_counts() == {c: 3 for c in CLASSES}
    assert test.classes == train.classes and all("/test/" in f for f in test.files)
    with pytest.raises(DataError, match="test split already.*test_fraction=0"):
        image_folder_sources(root, test_fraction=0.1)

    (root / "test" / "n07777777").mkdir()
    Image.new("RGB", (8, 8)).save(root / "test" / "n07777777" / "x.JPEG")
    (root / "val" / "n08888888").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "n08888888" / "x.JPEG")
    for f in (root / "test" / CLASSES[1]).iterdir():
        f.unlink()
    # One message names every problem: the unknown class of test/, that of val/, the empty folder.
    with pytest.raises(DataError) as raised:
        image_folder_sources(root)
    message = str(raised.value)
    assert "test has class folders that train does not have: ['n07777777']" in message
    assert "val has class folders that train does not have: ['n08888888']" in message
    assert "empty class folders" in message and f"test/{CLASSES[1]}" in message


def test_test_folder_missing_a_class_is_fine(tmp_path):
    root = write_image_folder(tmp_path, {"train": 3, "val": 1, "test": 1})
    for f in (root / "test" / CLASSES[2]).iterdir():
        f.unlink()
    (root / "test" / CLASSES[2]).rmdir()
    _, _, test = image_folder_sources(root)
    assert test.classes == CLASSES and test.class_counts() == {CLASSES[0]: 1, CLASSES[1]: 1, CLASSES[2]: 0}


def test_test_split_is_screened_like_val_and_listed_in_bad_files(tmp_path):
    root = write_image_folder(tmp_path, {"train": 3, "val": 1, "test": 2})
    bad = root / "test" / CLASSES[0] / "truncated.JPEG"
    bad.write_bytes((root / "test" / CLASSES[0] / f"{CLASSES[0]}_0.JPEG").read_bytes()[:200])
    splits = load_splits(recipe_for(str(root)))
    assert len(splits.test) == 6 and str(bad) not in splits.test.files
    record = screening_record(splits.train, splits.val, "skip", splits.test)
    (skipped,) = record["skipped"]
    assert skipped["split"] == "test" and skipped["path"] == str(bad) and skipped["kind"] == "truncated"
    json.dumps(record)
    with pytest.raises(DataError, match=r"(?s)1 bad image file\(s\) in the test split.*truncated.JPEG"):
        load_splits(recipe_for(str(root), bad_files="stop"))
    assert load_splits(recipe_for(str(root / "train"))).test is None  # no test split: none asked for


def test_test_fraction_is_validated():
    assert Data().test_fraction == 0.0
    with pytest.raises(RecipeError, match="data.test_fraction"):
        Data(test_fraction=-0.1)
    with pytest.raises(RecipeError, match="data.test_fraction"):
        Data(val_fraction=0.5, test_fraction=0.5)


def test_hugging_face_test_split(tmp_path, tiny_imagenet):
    import datasets

    from loaders.hf import hf_sources

    train, val = image_folder_splits(tiny_imagenet)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(train.classes))})

    def as_dataset(source, rows: int):
        cells = {"image": [{"bytes": open(f, "rb").read(), "path": None} for f in source.files[:rows]], "label": source.labels[:rows].tolist()}
        return datasets.Dataset.from_dict(cells, features=features)

    three = datasets.DatasetDict({"train": as_dataset(train, 96), "validation": as_dataset(val, 12), "test": as_dataset(val, 24)})
    three.save_to_disk(str(tmp_path / "three"))
    hf_train, hf_val, hf_test = hf_sources(f"hf:{tmp_path / 'three'}", 0.2, 0.0, 0)
    assert (len(hf_train), len(hf_val), len(hf_test)) == (96, 12, 24)
    with pytest.raises(DataError, match="test split already"):
        hf_sources(f"hf:{tmp_path / 'three'}", 0.2, 0.1, 0)
    # Only train and test: test stays the val split, as it always was; test_fraction takes from train.
    datasets.DatasetDict({"train": three["train"], "test": three["test"]}).save_to_disk(str(tmp_path / "two"))
    hf_train, hf_val, hf_test = hf_sources(f"hf:{tmp_path / 'two'}", 0.2, 0.0, 0)
    assert (len(hf_train), len(hf_val), hf_test) == (96, 24, None)
    hf_train, hf_val, hf_test = hf_sources(f"hf:{tmp_path / 'two'}", 0.2, 0.25, 0)
    assert (len(hf_train), len(hf_val), len(hf_test)) == (72, 24, 24)
    assert hf_test.class_counts() == {c: 8 for c in CLASSES}
