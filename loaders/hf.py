"""Hugging Face datasets as a source: an image column of encoded JPEG/PNG bytes, fed to the same DALI pipeline.

`data.path` forms: `hf:/path/saved/with/save_to_disk`, `hf:/path/to/*.parquet` (or a folder of
parquet files), or `hf:user/name` (a Hub dataset, only when online or already in the HF cache).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loaders.sources import DataError, stratified_three_way

PREFIX = "hf:"
VAL_SPLITS = ("validation", "val", "valid", "test")


@dataclass(frozen=True)
class HFDatasetSource:
    """A `datasets.Dataset` viewed as (encoded bytes, label) pairs; classes from its ClassLabel feature."""

    dataset: Any  # datasets.Dataset with the image column cast to Image(decode=False)
    image_column: str
    labels: np.ndarray
    classes: tuple[str, ...]
    findings: tuple = ()  # what the check before training found (loaders.screening.Finding)
    sizes: np.ndarray | None = None  # (height, width) per row from the check's headers, as ImageFolderSource's

    def __len__(self) -> int:
        return len(self.dataset)

    def read(self, index: int) -> np.ndarray:
        cell = self.dataset[int(index)][self.image_column]
        data = cell.get("bytes")
        if data is None and cell.get("path"):
            data = Path(cell["path"]).read_bytes()
        if not data:
            raise DataError(f"row {index} of the dataset has no image bytes in column {self.image_column!r}")
        return np.frombuffer(data, dtype=np.uint8)

    def name(self, index: int) -> str:
        """How logs and reports name sample `index`: its file if the dataset has paths, else its row."""
        cell = self.dataset[int(index)][self.image_column]
        return cell.get("path") or f"row {index} of the dataset"

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(c) for name, c in zip(self.classes, counts)}

    def subset(self, indices: np.ndarray) -> HFDatasetSource:
        indices = np.asarray(indices, dtype=np.int64)
        sizes = None if self.sizes is None else self.sizes[indices]
        return HFDatasetSource(self.dataset.select(indices), self.image_column, self.labels[indices], self.classes, self.findings, sizes)


def _columns(dataset) -> tuple[str, str]:
    from datasets import ClassLabel, Image

    images = [name for name, f in dataset.features.items() if isinstance(f, Image)]
    labels = [name for name, f in dataset.features.items() if isinstance(f, ClassLabel)]
    if not images:
        raise DataError(f"the dataset has no Image column (features: {dict(dataset.features)}); it needs encoded images")
    if not labels:
        raise DataError(
            f"the dataset has no ClassLabel column (features: {dict(dataset.features)}); "
            "cast the label column with dataset.cast_column('label', ClassLabel(names=[...]))"
        )
    return images[0], labels[0]


def as_source(dataset) -> HFDatasetSource:
    from datasets import Image

    image_column, label_column = _columns(dataset)
    dataset = dataset.cast_column(image_column, Image(decode=False))
    names = tuple(dataset.features[label_column].names)
    return HFDatasetSource(dataset, image_column, np.asarray(dataset[label_column], dtype=np.int64), names)


def load(spec: str):
    """A DatasetDict (or Dataset) from an `hf:` path."""
    import datasets

    target = spec[len(PREFIX):]
    path = Path(target).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists() or (path / "state.json").exists()):
        return datasets.load_from_disk(str(path))
    files = sorted(glob.glob(str(path / "*.parquet"))) if path.is_dir() else sorted(glob.glob(str(path)))
    if files:
        return datasets.load_dataset("parquet", data_files={"train": files})
    if path.exists() or target.startswith(("/", ".", "~")):
        raise DataError(f"{target}: neither a dataset saved with save_to_disk nor parquet files")
    try:
        return datasets.load_dataset(target)
    except Exception as err:  # offline, unknown name, no access: say what to do
        raise DataError(
            f"could not load Hugging Face dataset {target!r} ({type(err).__name__}: {err}); offline, save it "
            "with dataset.save_to_disk(PATH) on a connected machine and use --data hf:PATH"
        ) from None


def hf_splits(spec: str, val_fraction: float, seed: int) -> tuple[HFDatasetSource, HFDatasetSource]:
    train, val, _ = hf_sources(spec, val_fraction, 0.0, seed)
    return train, val


def hf_sources(spec: str, val_fraction: float, test_fraction: float, seed: int) -> tuple[HFDatasetSource, HFDatasetSource, HFDatasetSource | None]:
    """(train, val, test or None). Val is the first of VAL_SPLITS the dataset has, else a stratified
    fraction of train. Test is the dataset's `test` split when it also has a validation split (with only
    train and test, `test` stays the val split, as it always was); else with `test_fraction` > 0 a
    stratified fraction of train, disjoint from val; else None."""
    loaded = load(spec)
    val = test = None
    if hasattr(loaded, "keys"):  # DatasetDict
        if "train" not in loaded:
            raise DataError(f"{spec}: no 'train' split (splits: {list(loaded)})")
        train = as_source(loaded["train"])
        val_name = next((name for name in VAL_SPLITS if name in loaded and name != "test"), None)
        test_name = "test" if "test" in loaded else None
        if val_name is None:  # only train and test: test is the val split, as it always was
            val_name, test_name = test_name, None
        held_out = {}
        for name in (val_name, test_name):
            if name is not None:
                held_out[name] = as_source(loaded[name])
                if held_out[name].classes != train.classes:
                    raise DataError(f"{spec}: split {name!r} has classes {held_out[name].classes[:5]}..., train has {train.classes[:5]}...")
        val, test = held_out.get(val_name), held_out.get(test_name)
        if test is not None and test_fraction > 0:
            raise DataError(f"{spec} has a test split already, and data.test_fraction={test_fraction} asks for another from train: set data.test_fraction=0")
    else:
        train = as_source(loaded)
    if val is not None and (test is not None or test_fraction == 0):
        return train, val, test
    train_idx, val_idx, test_idx = stratified_three_way(train.labels, 0.0 if val is not None else val_fraction, test_fraction, seed)
    val = val if val is not None else train.subset(val_idx)
    return train.subset(train_idx), val, train.subset(test_idx) if test_fraction > 0 else None
