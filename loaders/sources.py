"""Where samples come from: an ImageFolder tree, indexed as (encoded bytes, label) pairs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(ValueError):
    """The dataset on disk is not usable as asked; the message says what to change."""


@dataclass(frozen=True)
class ImageFolderSource:
    """A list of image files with integer labels; `classes[label]` is the folder name."""

    files: tuple[str, ...]
    labels: np.ndarray  # int64, one per file
    classes: tuple[str, ...]
    # What the check before training found (loaders.screening.Finding): the files it left out, and the
    # converted, huge and tiny ones it kept. Empty when the source was not screened.
    findings: tuple = ()
    # (height, width) of every file as its header stores it, int64 (N, 2): kept by the check before
    # training, so the train loader's crop windows need no read. None when the source was not screened.
    sizes: np.ndarray | None = None
    # int64 (N, 2): (st_size, st_mtime_ns) of every file when it was listed (loaders.survey), so that the
    # structure check's cache lookup stats nothing again. None when the listing did not stat.
    file_stats: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> np.ndarray:
        """The encoded bytes of sample `index`, as DALI's external source wants them."""
        return np.fromfile(self.files[index], dtype=np.uint8)

    def name(self, index: int) -> str:
        """How logs and reports name sample `index`: its path."""
        return self.files[index]

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(c) for name, c in zip(self.classes, counts)}

    def subset(self, indices: np.ndarray) -> ImageFolderSource:
        indices = np.asarray(indices, dtype=np.int64)
        return ImageFolderSource(
            files=tuple(self.files[i] for i in indices),
            labels=self.labels[indices],
            classes=self.classes,
            findings=self.findings,
            sizes=None if self.sizes is None else self.sizes[indices],
            file_stats=None if self.file_stats is None else self.file_stats[indices],
        )


def class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(folder: Path) -> list[str]:
    """The image files under `folder`, sorted, hidden files left out; what os.walk would list (symlinked
    folders not followed, unreadable ones skipped), with os.scandir's own paths: joining a path per file
    in Python was half of the listing's time on ImageNet (several times Path.rglob's speed by now)."""
    found: list[str] = []
    _list_images(os.fspath(folder), found)
    return sorted(found)


def _list_images(folder: str, found: list[str]) -> None:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        try:
            is_folder = entry.is_dir()
        except OSError:
            is_folder = False
        if is_folder:
            if not entry.is_symlink():
                _list_images(entry.path, found)
        elif entry.name.lower().endswith(IMAGE_SUFFIXES) and not entry.name.startswith("."):
            found.append(entry.path)


_CHECK_HINT = "python -m trainer check-data PATH lists every problem of a dataset at once"


def _scan(root: Path, classes: tuple[str, ...] | None, listing=None) -> tuple[ImageFolderSource, list[str], list[str]]:
    """(source, empty class folders, class folders not in `classes`): layout problems are returned, not
    raised, so that a train/val pair can report all of them in one message. `listing`: a
    `loaders.survey.Listing` made earlier; its class folders are not listed again."""
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; pass --data PATH to a folder of class folders")
    dirs = class_dirs(root)
    if not dirs:
        raise DataError(
            f"{root} has no class folders; an ImageFolder is root/<class_name>/<image>.jpg "
            "(or root/train/<class>/... and root/val/<class>/...)"
        )
    classes = tuple(d.name for d in dirs) if classes is None else classes
    files: list[str] = []
    labels: list[int] = []
    stats: list[np.ndarray] | None = [np.zeros((0, 2), np.int64)] if listing is not None else None
    empty, extra = [], []
    for d in dirs:
        if d.name not in classes:
            extra.append(d.name)
            continue
        surveyed = listing.get(d) if listing is not None else None
        if surveyed is None:  # no survey, or a folder made after it
            found, stats = image_files(d), None
        else:
            found, folder_stats = surveyed
            if stats is not None:
                stats.append(folder_stats)
        if not found:
            empty.append(str(d))
        files.extend(found)
        labels.extend([classes.index(d.name)] * len(found))
    # The stats when the survey listed every folder; else the structure check stats the files itself.
    file_stats = np.concatenate(stats) if stats is not None else None
    return ImageFolderSource(tuple(files), np.asarray(labels, dtype=np.int64), tuple(classes), file_stats=file_stats), empty, extra


def _layout_error(empty: list[str], extra: dict[Path, list[str]]) -> DataError | None:
    """Empty class folders, and per held-out folder (val/, test/) its class folders that train lacks."""
    problems = []
    if empty:
        problems.append(
            f"empty class folders (no {'/'.join(IMAGE_SUFFIXES)} files): {empty[:10]}; add images or remove the folders"
        )
    for held_out_root, names in extra.items():
        if names:
            problems.append(
                f"{held_out_root} has class folders that train does not have: {names[:10]}; each of its classes needs training images"
            )
    return DataError(f"{'; and '.join(problems)} ({_CHECK_HINT})") if problems else None


def scan_image_folder(root: str | os.PathLike, classes: tuple[str, ...] | None = None, listing=None) -> ImageFolderSource:
    """Index `root/<class>/*.jpg`. With `classes` given, labels follow that list (train's)."""
    root = Path(root)
    source, empty, extra = _scan(root, classes, listing)
    error = _layout_error(empty, {root: extra})
    if error:
        raise error
    return source


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: each class gives round(fraction * count) samples (at least 1) to val."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    train, val, _ = stratified_three_way(labels, val_fraction, 0.0, seed)
    return train, val


def stratified_three_way(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, val, test) indices, disjoint, per class: one seeded permutation of the class gives its first
    round(val_fraction * count) samples (at least 1) to val and the next round(test_fraction * count) (at
    least 1, while train keeps one) to test. Val is the same with or without a test split: a test split
    only takes images from train."""
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise DataError(f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) with a sum under 1")
    labels = np.asarray(labels)
    if val_fraction == 0 and test_fraction == 0:  # train keeps everything (a val/ folder, no test split)
        return np.arange(len(labels)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, 0x5B117])
    train_parts, val_parts, test_parts = [], [], []
    # Each class's indices in ascending order, by one stable sort (a scan of the labels per class was
    # 0.4 s on ImageNet).
    by_class = np.argsort(labels, kind="stable")
    _, starts = np.unique(labels[by_class], return_index=True)
    for lo, hi in zip(starts.tolist(), [*starts[1:].tolist(), len(labels)]):
        members = by_class[lo:hi]
        members = members[rng.permutation(len(members))]
        n_val = max(1, int(round(val_fraction * len(members)))) if len(members) > 1 and val_fraction > 0 else 0
        n_test = max(0, min(max(1, int(round(test_fraction * len(members)))), len(members) - n_val - 1)) if test_fraction > 0 else 0
        val_parts.append(members[:n_val])
        test_parts.append(members[n_val : n_val + n_test])
        train_parts.append(members[n_val + n_test :])
    parts = [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in (train_parts, val_parts, test_parts)]
    return parts[0], parts[1], parts[2]


def image_folder_splits(
    root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0
) -> tuple[ImageFolderSource, ImageFolderSource]:
    """(train, val) from `root/train` + `root/val`, or from one folder split by a seeded stratified fraction."""
    train, val, _ = image_folder_sources(root, val_fraction, 0.0, seed)
    return train, val


def image_folder_sources(
    root: str | os.PathLike, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0, listing=None
) -> tuple[ImageFolderSource, ImageFolderSource, ImageFolderSource | None]:
    """(train, val, test or None). Val is `root/val`, else a seeded stratified fraction of `root/train` (or
    of `root` when it has no train/). Test is `root/test` when there is one (with train's classes, checked
    like val), else with `test_fraction` > 0 a stratified fraction of the training images, disjoint from
    val; else None. `listing`: the tree's `loaders.survey.Listing`, when a survey listed it already."""
    root = Path(root)
    if (root / "train").is_dir():
        train, empty, _ = _scan(root / "train", None, listing)
        if (root / "test").is_dir() and test_fraction > 0:
            raise DataError(
                f"{root / 'test'} is a test split already, and data.test_fraction={test_fraction} asks for another "
                "from train: set data.test_fraction=0 to use the folder"
            )
        # Train's, val's and test's layout problems together, so one start shows them all.
        held_out, extra = {}, {}
        for split in ("val", "test"):
            if (root / split).is_dir():
                held_out[split], split_empty, extra[root / split] = _scan(root / split, train.classes, listing)
                empty += split_empty
        error = _layout_error(empty, extra)
        if error:
            raise error
        if "val" in held_out and "test" in held_out:
            return train, held_out["val"], held_out["test"]
        # What train/ has to give: val when there is no val/, test when there is no test/ and test_fraction asks.
        train_idx, val_idx, test_idx = stratified_three_way(
            train.labels, 0.0 if "val" in held_out else val_fraction, test_fraction, seed
        )
        val = held_out["val"] if "val" in held_out else train.subset(val_idx)
        test = held_out["test"] if "test" in held_out else (train.subset(test_idx) if test_fraction > 0 else None)
        # train_idx is sorted and unique: as long as train, it is all of it (no copy of a million paths).
        return train if len(train_idx) == len(train) else train.subset(train_idx), val, test
    everything = scan_image_folder(root, listing=listing)
    train_idx, val_idx, test_idx = stratified_three_way(everything.labels, val_fraction, test_fraction, seed)
    test = everything.subset(test_idx) if test_fraction > 0 else None
    return everything.subset(train_idx), everything.subset(val_idx), test


# -- class balance ---------------------------------------------------------------------------------

# Above this largest/smallest class ratio, check-data and a run say what an unbalanced set can use.
IMBALANCE_HINT_RATIO = 3.0
BALANCE_ADVICE = "data.balance=sampler (class-balanced order) or data.balance=loss (class-weighted loss)"
METRIC_ADVICE = "phases.N.early_stop_metric=val_macro_f1 or val_balanced_accuracy (top-1 flatters an unbalanced val set)"


def class_balance(counts: dict[str, int]) -> dict:
    """{"counts": images per class, "ratio": largest / smallest class (None with an empty class or none)}."""
    values = list(counts.values())
    ratio = max(values) / min(values) if values and min(values) > 0 else None
    return {"counts": dict(counts), "ratio": ratio}


def label_balance(labels: np.ndarray, classes: list[str] | tuple[str, ...]) -> dict:
    """`class_balance` of a source's labels (bad-file stand-ins and all: the labels as a run reads them)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    return class_balance({name: int(n) for name, n in zip(classes, counts)})


def imbalance_hint(*balances: dict, balance: str = "none", class_averaged: bool = False) -> str | None:
    """The hint when any split's ratio is above IMBALANCE_HINT_RATIO (an empty class counts as above), else None.

    It names only what the run does not do yet: nothing about data.balance when one is set, nothing about
    early_stop_metric when every phase already ranks by a class-averaged score; no hint when both are done.
    """
    ratios = [b["ratio"] if b["ratio"] is not None else float("inf") for b in balances if b["counts"]]
    worst = max(ratios, default=0.0)
    advice = []
    if balance == "none":
        advice.append(BALANCE_ADVICE)
    if not class_averaged:
        advice.append(METRIC_ADVICE)
    if worst <= IMBALANCE_HINT_RATIO or not advice:
        return None
    return f"classes are unbalanced (largest/smallest {worst:.1f} > {IMBALANCE_HINT_RATIO:g}): consider {', and '.join(advice)}"
