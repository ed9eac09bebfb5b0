"""Phase parts that need no run: init rules, heads, freezing and the unfreeze schedule, stratified subsets, and the Hugging Face source against the folder source."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from loaders.dali import TrainLoader
from loaders.sources import image_folder_splits, stratified_split
from trainer.model import load_weights
from trainer.recipe import Phase, Recipe, RecipeError
from trainer.transfer import apply_freeze, ensure_head, frozen_group_count, stage_groups


def test_init_must_name_an_earlier_phase():
    with pytest.raises(RecipeError, match="must name an earlier phase"):
        Recipe(name="r", phases=(Phase(name="a", init="phase:b"), Phase(name="b")))


def test_freeze_groups_and_unfreeze_schedule():
    model = timm.create_model("resnet10t", num_classes=3)
    groups = stage_groups(model)  # stem, 4 stages, head
    assert len(groups) == 6 and groups[-1] == ["fc.weight", "fc.bias"]
    phase = Phase(freeze="stages:2", unfreeze_at=(2, 4))
    assert [frozen_group_count(phase, 6, e) for e in range(6)] == [3, 3, 2, 2, 1, 1]
    assert frozen_group_count(Phase(freeze="backbone"), 6, 0) == 5
    apply_freeze(model, phase, epoch=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not trainable & set(groups[0] + groups[1]) and set(groups[2] + groups[5]) <= trainable


def test_head_is_kept_when_unchanged_and_init_skips_mismatched_heads(pretrained):
    model = timm.create_model("resnet10t", num_classes=3)
    assert ensure_head(model, "mlp:16", 3, 0.1)
    head_weight = model.fc[0].weight.clone()
    assert not ensure_head(model, "mlp:16", 3, 0.1)  # same shape: trained head survives
    assert torch.equal(model.fc[0].weight, head_weight)
    plain = timm.create_model("resnet10t", num_classes=3)
    skipped = load_weights(plain, load_file(pretrained), "test weights")
    assert sorted(skipped) == ["fc.bias", "fc.weight"]  # 1000 classes there, 3 here: head stays new
    assert torch.equal(plain.conv1[0].weight, load_file(pretrained)["conv1.0.weight"])
    with pytest.raises(RecipeError, match="does not fit"):
        load_weights(timm.create_model("resnet18", num_classes=3), load_file(pretrained), "test weights")


def test_subset_is_stratified_and_seeded(tiny_imagenet):
    train, _ = image_folder_splits(tiny_imagenet)
    _, a = stratified_split(train.labels, 0.2, seed=7)
    _, b = stratified_split(train.labels, 0.2, seed=7)
    assert np.array_equal(a, b) and np.bincount(train.labels[a]).tolist() == [6, 6, 6]


def test_hf_dataset_source_matches_the_folder_source(tmp_path, tiny_imagenet):
    import datasets

    from loaders.hf import hf_splits

    folder_train, folder_val = image_folder_splits(tiny_imagenet)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(folder_train.classes))})

    def as_dataset(source):
        rows = {"image": [{"bytes": open(f, "rb").read(), "path": None} for f in source.files], "label": source.labels.tolist()}
        return datasets.Dataset.from_dict(rows, features=features)

    datasets.DatasetDict({"train": as_dataset(folder_train), "validation": as_dataset(folder_val)}).save_to_disk(str(tmp_path / "ds"))
    hf_train, hf_val = hf_splits(f"hf:{tmp_path / 'ds'}", 0.2, 0)
    as_dataset(folder_train).to_parquet(str(tmp_path / "train.parquet"))
    parquet_train, parquet_val = hf_splits(f"hf:{tmp_path / 'train.parquet'}", 0.25, 0)  # no val split: stratified
    assert parquet_train.classes == folder_train.classes and len(parquet_val) == 24
    assert hf_train.classes == folder_train.classes and len(hf_val) == len(folder_val)
    args = dict(batch_size=8, seed=3, res_px_for_epoch=lambda e: 32, decode_device="cpu", num_threads=1)
    for (x, y), (hx, hy) in zip(TrainLoader(folder_train, **args).epoch_batches(0), TrainLoader(hf_train, **args).epoch_batches(0)):
        assert torch.equal(x, hx) and torch.equal(y, hy)
