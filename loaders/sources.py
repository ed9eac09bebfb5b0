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

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> np.ndarray:
        """The encoded bytes of sample `index`, as DALI's external source wants them."""
        return np.fromfile(self.files[index], dtype=np.uint8)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(c) for name, c in zip(self.classes, counts)}

    def subset(self, indices: np.ndarray) -> ImageFolderSource:
        indices = np.asarray(indices, dtype=np.int64)
        return ImageFolderSource(
            files=tuple(self.files[i] for i in indices),
            labels=self.labels[indices],
            classes=self.classes,
        )


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def encoded_size(data: np.ndarray) -> tuple[int, int]:
    """(height, width) of an encoded image as stored, from its header: a JPEG frame marker or a PNG
    IHDR read directly (microseconds), anything else through PIL (which also reads only the header)."""
    raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if raw[:2] == b"\xff\xd8":
        pos = 2
        while pos + 9 <= len(raw):
            if raw[pos] != 0xFF:
                break
            marker = raw[pos + 1]
            if marker == 0xFF:  # fill byte
                pos += 1
                continue
            if marker in _SOF_MARKERS:
                return (raw[pos + 5] << 8) | raw[pos + 6], (raw[pos + 7] << 8) | raw[pos + 8]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
                pos += 2
                continue
            pos += 2 + ((raw[pos + 2] << 8) | raw[pos + 3])
    elif raw[:8] == b"\x89PNG\r\n\x1a\n":
        return int.from_bytes(raw[20:24], "big"), int.from_bytes(raw[16:20], "big")
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.height, image.width
    except Exception as err:  # noqa: BLE001 - any undecodable header is the same user error
        raise DataError(f"cannot read the image header ({type(err).__name__}: {err})") from None


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    # os.scandir is several times faster than Path.rglob on ImageNet-sized folders.
    found = []
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("."):
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def scan_image_folder(root: str | os.PathLike, classes: tuple[str, ...] | None = None) -> ImageFolderSource:
    """Index `root/<class>/*.jpg`. With `classes` given, labels follow that list (train's)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist; pass --data PATH to a folder of class folders")
    dirs = _class_dirs(root)
    if not dirs:
        raise DataError(
            f"{root} has no class folders; an ImageFolder is root/<class_name>/<image>.jpg "
            "(or root/train/<class>/... and root/val/<class>/...)"
        )
    names = tuple(d.name for d in dirs)
    if classes is None:
        classes = names
    else:
        extra = sorted(set(names) - set(classes))
        if extra:
            raise DataError(
                f"{root} has class folders that train does not have: {extra[:10]}; "
                "every val class needs training images"
            )
    files: list[str] = []
    labels: list[int] = []
    empty = []
    for d in dirs:
        found = _image_files(d)
        if not found:
            empty.append(str(d))
        files.extend(found)
        labels.extend([classes.index(d.name)] * len(found))
    if empty:
        raise DataError(
            f"empty class folders (no {'/'.join(IMAGE_SUFFIXES)} files): {empty[:10]}; "
            "add images or remove the folders"
        )
    return ImageFolderSource(tuple(files), np.asarray(labels, dtype=np.int64), tuple(classes))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: each class gives round(fraction * count) samples (at least 1) to val."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng([seed, 0x5B117])
    train_parts, val_parts = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_val = max(1, int(round(val_fraction * len(members)))) if len(members) > 1 else 0
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    return np.sort(np.concatenate(train_parts)), np.sort(np.concatenate(val_parts))


def image_folder_splits(
    root: str | os.PathLike, val_fraction: float = 0.2, seed: int = 0
) -> tuple[ImageFolderSource, ImageFolderSource]:
    """(train, val) from `root/train` + `root/val`, or from one folder split by a seeded stratified fraction."""
    root = Path(root)
    if (root / "train").is_dir():
        train = scan_image_folder(root / "train")
        if not (root / "val").is_dir():
            train_idx, val_idx = stratified_split(train.labels, val_fraction, seed)
            return train.subset(train_idx), train.subset(val_idx)
        return train, scan_image_folder(root / "val", classes=train.classes)
    everything = scan_image_folder(root)
    train_idx, val_idx = stratified_split(everything.labels, val_fraction, seed)
    return everything.subset(train_idx), everything.subset(val_idx)
