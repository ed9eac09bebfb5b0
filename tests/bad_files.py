"""Bad image files as a scraper, a camera or a failing disk leaves them, injected into a small ImageFolder
(`conftest.bad_folder`): what `check-data` must report and what training must skip, convert or replace."""

from __future__ import annotations

import io
import shutil
import struct
from pathlib import Path

import numpy as np
from conftest import CLASSES
from PIL import Image

# Bad files: a run skips them before it starts (or stops on them with data.bad_files=stop).
SKIPPED = {
    "cut.JPEG": "truncated",  # a download cut off halfway
    "empty.JPEG": "zero-byte",
    "notes.jpg": "not-an-image",  # an HTML error page saved under an image name
    "cut_val.JPEG": "truncated",
}


# Passes the header check, fails in the decoder: replaced at run time, logged with its path.
BIT_ROT = {"bitrot.png": "undecodable", "bitrot_val.png": "undecodable"}


CONVERTED = {"print.jpg": "cmyk", "scan.JPEG": "greyscale", "depth.png": "16-bit"}


KEPT = {"panorama.jpg": "huge", "icon.jpg": "tiny", "copy.JPEG": "duplicate"}


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def photo(seed: int, size=(60, 44)) -> Image.Image:
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rng = np.random.default_rng(seed)
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1) + rng.normal(0, 8, (size[1], size[0], 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def bit_rot_png(image: Image.Image) -> bytes:
    """A PNG whose chunks are intact but whose image data had bytes flipped (its CRC no longer matches)."""
    data = bytearray(encoded(image, "PNG"))
    start = data.find(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    for k in range(start + length // 3, start + length // 3 + 40):
        data[k] ^= 0x5A
    return bytes(data)


def inject_file_faults(root: Path) -> None:
    """The files of SKIPPED, BIT_ROT, CONVERTED and KEPT, written into root/train and root/val."""
    a, b, c = (root / "train" / name for name in CLASSES)
    good = (a / f"{CLASSES[0]}_0.JPEG").read_bytes()
    (a / "cut.JPEG").write_bytes(good[: len(good) // 2])
    (a / "empty.JPEG").write_bytes(b"")
    (a / "notes.jpg").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    (a / "print.jpg").write_bytes(encoded(photo(1).convert("CMYK"), "JPEG", quality=95))
    (b / "scan.JPEG").write_bytes(encoded(photo(2).convert("L"), "JPEG", quality=95))
    grey = np.asarray(photo(3).convert("L"), dtype=np.uint16) * 257
    (b / "depth.png").write_bytes(encoded(Image.fromarray(grey), "PNG"))  # mode I;16
    # 7100 x 7100 = 50.4 MP; one flat colour, so 0.8 MB on disk.
    Image.new("RGB", (7100, 7100), (20, 150, 90)).save(c / "panorama.jpg", quality=50)
    photo(4, size=(4, 4)).save(c / "icon.jpg")
    (c / "bitrot.png").write_bytes(bit_rot_png(photo(5)))
    val = root / "val"
    val_good = (val / CLASSES[1] / f"{CLASSES[1]}_0.JPEG").read_bytes()
    (val / CLASSES[1] / "cut_val.JPEG").write_bytes(val_good[: len(val_good) * 2 // 3])
    (val / CLASSES[2] / "bitrot_val.png").write_bytes(bit_rot_png(photo(6)))
    shutil.copy(a / f"{CLASSES[0]}_1.JPEG", val / CLASSES[0] / "copy.JPEG")  # a train image leaked into val


def by_name(findings: list[dict]) -> set[tuple[str, str]]:
    return {(Path(f["path"]).name, f["kind"]) for f in findings}
