"""The embedded default dataset: scikit-learn's handwritten digits, written once as an ImageFolder of JPEGs.

1,797 8x8 greyscale scans with 10 classes ship inside scikit-learn, so the quickstart needs no
download. They are upscaled to 32x32 RGB JPEGs so they go through the same DALI decode path as
any user folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

DIGITS_SIDE_PX = 32


def cache_root() -> Path:
    return Path(os.environ.get("IMGCLS_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imgcls"))


def digits_folder(root: Path | None = None) -> Path:
    """Path of the digits ImageFolder (root/<digit>/<n>.jpg), written on first use.

    Several processes may call this at once: each writes a private temporary folder and renames
    it into place; the first rename wins and the others discard theirs.
    """
    target = Path(root or cache_root()) / "digits-jpeg"
    if (target / "9").is_dir():
        return target
    from PIL import Image
    from sklearn.datasets import load_digits

    target.parent.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=target.parent))
    try:
        for i, (image, label) in enumerate(zip(digits.images, digits.target)):
            # Values are 0..16; scale to 0..255 with ink dark on white, as on the scanned forms.
            pixels = (255 - image * (255 / 16)).clip(0, 255).astype(np.uint8)
            big = Image.fromarray(pixels, mode="L").resize((DIGITS_SIDE_PX, DIGITS_SIDE_PX), Image.BILINEAR)
            folder = tmp / str(label)
            folder.mkdir(exist_ok=True)
            big.convert("RGB").save(folder / f"{i:04d}.jpg", quality=95)
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


BUILTIN = {"builtin:digits": digits_folder}


def resolve_data_path(path: str) -> Path:
    if path in BUILTIN:
        return BUILTIN[path]()
    return Path(path).expanduser()
