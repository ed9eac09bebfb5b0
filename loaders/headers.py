"""Image file headers: a cheap structural check of one encoded image (its header and its end, no decode).

`read_file_header` reads the first 16 KiB and the last 1 KiB of a file and returns its stored size and
how the decoder will convert its pixels (a `Header`), or raises `BadFile` for what DALI's decoder would
fail on: zero-byte files, non-images, GIFs and other formats, truncated JPEGs and PNGs, 12-bit or
lossless JPEGs, JPEGs without quantisation tables, broken chunk structures. What DALI 2.4's CPU decoder
does with each kind was measured (docs/reliability.md, "Bad data"). This is the bottom layer of
`loaders`: it imports nothing from the package.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

HUGE_PIXELS = 50_000_000  # above this a file is reported as huge (a decoded 50 MP RGB image is 150 MB)
TINY_SIDE_PX = 32  # a shorter side below this is reported as tiny: upscaled ≥ 7x into a 224 px crop


class BadFile(Exception):
    """A file the decoder would fail on; `kind` is a key of `loaders.screening.KINDS`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass(frozen=True)
class Header:
    """What the structural check learned: the stored size and how the decoder must convert the pixels."""

    format: str  # "jpeg", "png", "bmp", "webp"
    height: int
    width: int
    mode: str = ""  # "" = 8-bit RGB; else the conversion kind ("greyscale", "cmyk", "16-bit", "palette", "alpha")

    @property
    def huge(self) -> bool:
        return self.height * self.width > HUGE_PIXELS

    @property
    def tiny(self) -> bool:
        return min(self.height, self.width) < TINY_SIDE_PX

    @property
    def notable(self) -> bool:
        """Converted by the decoder, or huge, or tiny: check-data reports it."""
        return bool(self.mode) or self.huge or self.tiny


# -- the structural check: header and end of one file ---------------------------------------------

_HEAD_BYTES = 16 * 1024  # one read covers the headers of almost every JPEG and PNG
_TAIL_BYTES = 1024  # where the end-of-image marker sits, after at most some padding
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SOF_UNSUPPORTED = {0xC3: "lossless", 0xC5: "hierarchical", 0xC6: "hierarchical", 0xC7: "hierarchical lossless",
                    0xCB: "lossless", 0xCD: "hierarchical", 0xCE: "hierarchical", 0xCF: "hierarchical lossless"}
_PNG_MODES = {0: "greyscale", 2: "", 3: "palette", 4: "greyscale", 6: "alpha"}


class _Bytes:
    """Random access to an encoded image already in memory."""

    def __init__(self, data: bytes) -> None:
        self.data, self.size = data, len(data)

    def at(self, offset: int, count: int) -> bytes:
        return self.data[offset : offset + count]


class _File:
    """Random access to a file that reads only what is asked: the first 16 KiB once, then small seeks."""

    def __init__(self, handle, size: int) -> None:
        self.handle, self.size = handle, size
        self.head = handle.read(_HEAD_BYTES)

    def at(self, offset: int, count: int) -> bytes:
        if offset + count <= len(self.head):
            return self.head[offset : offset + count]
        self.handle.seek(offset)
        return self.handle.read(count)


def _jpeg(r) -> Header:
    pos, frame, has_tables = 2, None, False
    while True:
        segment = r.at(pos, 4)
        if len(segment) < 2:
            raise BadFile("truncated", f"the file ends inside the JPEG header (byte {pos})")
        if segment[0] != 0xFF:
            raise BadFile("corrupt", f"no JPEG marker where one must be (byte {pos})")
        marker = segment[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker == 0xD9:
            raise BadFile("corrupt", "end-of-image marker before any image data")
        if len(segment) < 4:
            raise BadFile("truncated", f"the file ends inside the JPEG header (byte {pos})")
        length = (segment[2] << 8) | segment[3]
        if length < 2:
            raise BadFile("corrupt", f"JPEG segment of impossible length {length} at byte {pos}")
        if marker in _SOF_MARKERS:
            body = r.at(pos + 4, 6)
            if len(body) < 6:
                raise BadFile("truncated", "the file ends inside the JPEG frame header")
            if marker in _SOF_UNSUPPORTED:
                raise BadFile("unsupported", f"{_SOF_UNSUPPORTED[marker]} JPEG (SOF{marker - 0xC0})")
            frame = (body[0], (body[1] << 8) | body[2], (body[3] << 8) | body[4], body[5])
        has_tables |= marker == 0xDB
        if marker == 0xDA:  # start of scan: the entropy-coded data follow
            break
        pos += 2 + length
    if frame is None:
        raise BadFile("corrupt", "no JPEG frame header (SOF) before the image data")
    precision, height, width, channels = frame
    if precision != 8:
        raise BadFile("unsupported", f"{precision}-bit JPEG (DALI decodes 8-bit JPEGs)")
    if height == 0 or width == 0:
        raise BadFile("corrupt", f"JPEG frame header says {width}x{height}")
    if not has_tables:
        raise BadFile("corrupt", "no quantisation table (DQT) in the JPEG header")
    if channels not in (1, 3, 4):
        raise BadFile("unsupported", f"JPEG with {channels} colour components")
    # 0xFF 0xD9 cannot occur inside entropy-coded data (a data 0xFF is followed by 0x00 or a restart
    # marker), so finding it after the first scan means the file reaches its end-of-image marker.
    # Writers may append bytes after it (camera trailers), hence the whole file when the tail lacks it.
    tail_from = max(pos, r.size - _TAIL_BYTES)
    if b"\xff\xd9" not in r.at(tail_from, r.size - tail_from) and b"\xff\xd9" not in r.at(pos, r.size - pos):
        raise BadFile("truncated", f"no end-of-image marker: the JPEG stops inside its image data ({r.size} bytes)")
    return Header("jpeg", height, width, {1: "greyscale", 3: "", 4: "cmyk"}[channels])


def _png(r) -> Header:
    ihdr = r.at(8, 25)
    if len(ihdr) < 25:
        raise BadFile("truncated", "the file ends inside the PNG header")
    if ihdr[4:8] != b"IHDR" or int.from_bytes(ihdr[0:4], "big") != 13:
        raise BadFile("corrupt", "the PNG does not start with its IHDR chunk")
    width, height = int.from_bytes(ihdr[8:12], "big"), int.from_bytes(ihdr[12:16], "big")
    depth, colour = ihdr[16], ihdr[17]
    if height == 0 or width == 0:
        raise BadFile("corrupt", f"PNG header says {width}x{height}")
    if colour not in _PNG_MODES:
        raise BadFile("corrupt", f"PNG colour type {colour} does not exist")
    # Walk the chunk headers (8 bytes each; PNG writers cut the data into 8-64 KiB chunks): a file cut
    # short, or cut and patched, leaves a length that overshoots the end or lands on a non-chunk.
    pos, has_data = 8, False
    while True:
        chunk = r.at(pos, 8)
        if len(chunk) < 8:
            raise BadFile("truncated", f"the PNG ends before its IEND chunk (a chunk starting at byte {pos} runs past the end, {r.size} bytes)")
        length, name = int.from_bytes(chunk[0:4], "big"), chunk[4:8]
        if not name.isalpha():
            raise BadFile("corrupt", f"broken PNG chunk structure at byte {pos}")
        if name == b"IEND":
            break
        has_data |= name == b"IDAT"
        pos += 12 + length
    if not has_data:
        raise BadFile("corrupt", "the PNG has no image data (IDAT)")
    mode = "16-bit" if depth == 16 else _PNG_MODES[colour]
    return Header("png", height, width, mode)


def _bmp(r) -> Header:
    head = r.at(0, 30)
    if len(head) < 26:
        raise BadFile("truncated", "the file ends inside the BMP header")
    declared, offset = int.from_bytes(head[2:6], "little"), int.from_bytes(head[10:14], "little")
    if declared > r.size or offset >= r.size:
        raise BadFile("truncated", f"the BMP header promises {max(declared, offset)} bytes, the file has {r.size}")
    if int.from_bytes(head[14:18], "little") == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height, bits = int.from_bytes(head[18:20], "little"), int.from_bytes(head[20:22], "little"), head[24]
    else:
        width = int.from_bytes(head[18:22], "little", signed=True)
        height = abs(int.from_bytes(head[22:26], "little", signed=True))  # negative = stored top-down
        bits = head[28] if len(head) > 28 else 24
    if width <= 0 or height == 0:
        raise BadFile("corrupt", f"BMP header says {width}x{height}")
    return Header("bmp", height, width, "palette" if bits <= 8 else "")


def _webp(r) -> Header:
    head = r.at(0, 30)
    if len(head) < 30:
        raise BadFile("truncated", "the file ends inside the WebP header")
    declared = int.from_bytes(head[4:8], "little") + 8
    if declared > r.size:
        raise BadFile("truncated", f"the WebP header promises {declared} bytes, the file has {r.size}")
    chunk = head[12:16]
    if chunk == b"VP8 ":
        width, height = int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    elif chunk == b"VP8L":
        bits = int.from_bytes(head[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8X":
        width, height = int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    else:
        raise BadFile("corrupt", f"unknown WebP chunk {chunk!r}")
    if width == 0 or height == 0:
        raise BadFile("corrupt", f"WebP header says {width}x{height}")
    return Header("webp", height, width)


def _other(r) -> BadFile:
    """Why a file with no signature the loader takes is bad: another image format, or not an image."""
    head = r.at(0, _HEAD_BYTES)
    try:
        with Image.open(io.BytesIO(head)) as image:
            return BadFile("unsupported", f"a {image.format} image (the loader takes JPEG, PNG, BMP and WebP)")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        pass
    text = head[:64].lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return BadFile("not-an-image", "an HTML page (a saved error page?)")
    return BadFile("not-an-image", f"starts with {bytes(head[:16])!r}")


def _header(r) -> Header:
    if r.size == 0:
        raise BadFile("zero-byte", "the file is empty (0 bytes)")
    magic = r.at(0, 16)
    if magic[:3] == b"\xff\xd8\xff":
        return _jpeg(r)
    if magic[:8] == b"\x89PNG\r\n\x1a\n":
        return _png(r)
    if magic[:2] == b"BM":
        return _bmp(r)
    if magic[:4] == b"RIFF" and magic[8:12] == b"WEBP":
        return _webp(r)
    raise _other(r)


def read_header(data: bytes | np.ndarray) -> Header:
    """The structural check of an encoded image in memory; raises BadFile for what the decoder would fail on."""
    return _header(_Bytes(data.tobytes() if isinstance(data, np.ndarray) else bytes(data)))


def read_file_header(path: str | os.PathLike) -> Header:
    """The structural check of a file, reading its first 16 KiB and its last 1 KiB (more only for
    JPEG headers past 16 KiB, PNG chunk headers, and JPEGs with bytes after their end marker)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            return _header(_File(handle, size) if size else _Bytes(b""))
    except OSError as err:
        raise BadFile("unreadable", f"{type(err).__name__}: {err.strerror or err}") from None


def _checked(path: str) -> Header | BadFile:
    try:
        return read_file_header(path)
    except BadFile as bad:
        return bad


def file_headers(paths: list[str], threads: int = 4, progress: Callable[[int], object] | None = None) -> list[Header | BadFile]:
    """read_file_header of every path (or its BadFile), in order; threads overlap the small reads."""
    results: list[Header | BadFile] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for result in pool.map(_checked, paths, chunksize=256):
            results.append(result)
            if progress is not None:
                progress(1)
    return results
