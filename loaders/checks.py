"""Bad image files: the kinds of problem and what training does with each, a cheap structural check of
one file (its header and its end, no decode), the screening of a source before training, and the full
scan of a dataset folder behind `python -m trainer check-data`.

What DALI 2.4's CPU decoder does with each kind was measured (README, "Bad data"): it converts
greyscale, CMYK, 16-bit, palette and alpha images to 8-bit RGB itself, and it fails the whole pipeline
("Critical error in pipeline"; the pipeline object is then invalid) on zero-byte files, non-images,
GIFs, truncated JPEGs and PNGs, 12-bit JPEGs, JPEGs without a quantisation table and PNGs whose
data fail their CRC. The structural check catches every one of those except the last (that needs the
whole file read and inflated); the loaders recover from what slips through (`loaders.dali`).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from loaders.sources import IMAGE_SUFFIXES, DataError, ImageFolderSource, class_dirs, image_files

BAD_FILE_POLICIES = ("skip", "stop")
HUGE_PIXELS = 50_000_000  # above this a file is reported as huge (a decoded 50 MP RGB image is 150 MB)
TINY_SIDE_PX = 32  # a shorter side below this is reported as tiny: upscaled ≥ 7x into a 224 px crop

SKIP, CONVERT, KEEP, STOP = "skipped", "converted to RGB", "trained on as is", "stops the run"
REPLACE = "replaced when met"  # only a decode finds it: the loader swaps in a stand-in and logs the path


@dataclass(frozen=True)
class Kind:
    meaning: str
    action: str  # what a training run does with such a file or folder


KINDS: dict[str, Kind] = {
    "unreadable": Kind("cannot be opened or read (permissions, I/O error)", SKIP),
    "zero-byte": Kind("empty file", SKIP),
    "not-an-image": Kind("no JPEG, PNG, BMP or WebP signature (text, HTML, ...)", SKIP),
    "unsupported": Kind("an image DALI cannot decode: GIF, TIFF, 12-bit or lossless JPEG, ...", SKIP),
    "truncated": Kind("the file ends before its image data do", SKIP),
    "corrupt": Kind("a broken header: no frame header or quantisation tables, a zero size, broken chunks", SKIP),
    "undecodable": Kind("a sound header over image data the decoder rejects (bit rot: a PNG CRC error, ...)", REPLACE),
    "cmyk": Kind("CMYK (or YCCK) JPEG", CONVERT),
    "greyscale": Kind("one channel (with or without alpha)", CONVERT),
    "16-bit": Kind("16 bits per channel", CONVERT),
    "palette": Kind("palette (indexed) colours", CONVERT),
    "alpha": Kind("RGB with an alpha channel (dropped)", CONVERT),
    "huge": Kind(f"more than {HUGE_PIXELS // 1_000_000} megapixels", KEEP),
    "tiny": Kind(f"shorter side under {TINY_SIDE_PX} px", KEEP),
    "duplicate": Kind("the same bytes in train and val (val scores leak)", KEEP),
    "empty-class": Kind("a class folder without image files", STOP),
    "val-only-class": Kind("a class folder in val that train does not have", STOP),
    "no-usable-images": Kind("a training class whose every image is bad", STOP),
    "no-data": Kind("the folder is missing or holds no class folders", STOP),
}
# A run drops a file only for these; conversions and the rest never cost a sample.
BAD_KINDS = tuple(k for k, v in KINDS.items() if v.action == SKIP)


@dataclass(frozen=True)
class Finding:
    kind: str  # a key of KINDS
    path: str  # the file, the folder, or "hf row N"
    detail: str = ""
    split: str = ""  # "train" or "val" (empty when it concerns the whole dataset)

    @property
    def action(self) -> str:
        return KINDS[self.kind].action

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "split": self.split, "path": self.path, "detail": self.detail, "action": self.action}


class BadFile(Exception):
    """A file the decoder would fail on; `kind` is a key of KINDS."""

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
    def notable(self) -> bool:
        """Converted by the decoder, or huge, or tiny: check-data reports it."""
        return bool(self.mode) or self.height * self.width > HUGE_PIXELS or min(self.height, self.width) < TINY_SIDE_PX

    def findings(self, path: str, split: str = "") -> list[Finding]:
        """What check-data reports about a good file: its conversion, and a huge or tiny size."""
        found = []
        if self.mode:
            found.append(Finding(self.mode, path, f"{self.format.upper()}, {self.width}x{self.height}", split))
        if self.height * self.width > HUGE_PIXELS:
            found.append(Finding("huge", path, f"{self.width}x{self.height} ({self.height * self.width / 1e6:.1f} MP)", split))
        if min(self.height, self.width) < TINY_SIDE_PX:
            found.append(Finding("tiny", path, f"{self.width}x{self.height}", split))
        return found


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
    import io

    from PIL import Image, UnidentifiedImageError

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


# -- screening a source before training -------------------------------------------------------------


def file_headers(paths: list[str], threads: int = 4, progress: Callable[[int], object] | None = None) -> list[Header | BadFile]:
    """read_file_header of every path (or its BadFile), in order; threads overlap the small reads."""
    results: list[Header | BadFile] = []
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for result in pool.map(_checked, paths, chunksize=256):
            results.append(result)
            if progress is not None:
                progress(1)
    return results


def source_headers(source) -> list[Header | BadFile]:
    """The structural check of every sample of a source: files read head and tail only; HF rows read whole."""
    if isinstance(source, ImageFolderSource):
        return file_headers(list(source.files))
    headers: list[Header | BadFile] = []
    for index in range(len(source)):
        try:
            headers.append(read_header(source.read(index)))
        except BadFile as bad:
            headers.append(bad)
        except DataError as err:  # a row without bytes
            headers.append(BadFile("zero-byte", str(err)))
    return headers


def screen(source, split: str):
    """The source without the files the decoder would fail on, carrying every finding in `findings`
    (the dropped files, and the converted, huge and tiny ones that stay)."""
    findings, keep = [], []
    for index, header in enumerate(source_headers(source)):
        if isinstance(header, BadFile):
            findings.append(Finding(header.kind, source.name(index), header.detail, split))
        else:
            keep.append(index)
            if header.notable:  # named only then: an HF row's name costs a read
                findings.extend(header.findings(source.name(index), split))
    kept = source.subset(np.asarray(keep, dtype=np.int64)) if len(keep) < len(source) else source
    return replace(kept, findings=tuple(findings))


def screen_splits(train, val, policy: str):
    """Both splits screened as `data.bad_files` says: "skip" drops bad files (a pure function of the
    files' bytes, so every process and every resume drops the same ones); "stop" raises DataError
    listing them. Either way a training class left without images is an error."""
    if policy not in BAD_FILE_POLICIES:
        raise DataError(f"data.bad_files must be one of {BAD_FILE_POLICIES}, got {policy!r}")
    train, val = screen(train, "train"), screen(val, "val")
    bad = [f for f in train.findings + val.findings if f.kind in BAD_KINDS]
    if bad and policy == "stop":
        listed = "\n".join(f"  {f.split}: {f.path}  ({f.kind}: {f.detail})" for f in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        raise DataError(
            f"{len(bad)} bad image file(s) and data.bad_files='stop':\n{listed}{more}\n"
            "fix or remove them, or set data.bad_files=skip to train without them "
            "(python -m trainer check-data PATH lists every problem)"
        )
    counts = np.bincount(train.labels, minlength=len(train.classes))
    empty = [name for name, count in zip(train.classes, counts) if count == 0]
    if empty:
        raise DataError(f"training classes with no usable image after skipping {len(bad)} bad file(s): {empty[:10]}")
    return train, val


def screening_record(train, val, policy: str) -> dict:
    """What the pre-training check found, as written to <run>/bad_files.json."""
    findings = train.findings + val.findings
    return {
        "policy": policy,
        "skipped": [f.to_dict() for f in findings if f.action == SKIP],
        "converted": dict(Counter(f.kind for f in findings if f.action == CONVERT)),
        "kept": dict(Counter(f.kind for f in findings if f.action == KEEP)),
    }


def screening_lines(record: dict, where: str, shown: int = 5) -> list[str]:
    """The lines a run prints about its screening; nothing when the data are clean."""
    lines = []
    skipped = record["skipped"]
    if skipped:
        kinds = ", ".join(f"{k} {n}" for k, n in Counter(f["kind"] for f in skipped).items())
        lines.append(f"bad files: skipped {len(skipped)} ({kinds}); the list is in {where}")
        lines += [f"  skipped {f['split']}: {f['path']} ({f['kind']}: {f['detail']})" for f in skipped[:shown]]
        if len(skipped) > shown:
            lines.append(f"  ... and {len(skipped) - shown} more")
    if record["converted"]:
        kinds = ", ".join(f"{k} {n}" for k, n in record["converted"].items())
        lines.append(f"converted to RGB by the decoder: {sum(record['converted'].values())} files ({kinds})")
    if record["kept"]:
        kinds = ", ".join(f"{k} {n}" for k, n in record["kept"].items())
        lines.append(f"trained on as they are: {kinds} (python -m trainer check-data lists them)")
    return lines


# -- check-data: the full scan of a dataset folder ---------------------------------------------------


@dataclass
class DatasetReport:
    root: str
    layout: str  # "train/val" or "one folder"
    classes: list[str]
    images: dict[str, int]  # per split
    findings: list[Finding]
    decoded: bool

    @property
    def exit_code(self) -> int:
        """0: clean; 1: findings a run copes with (skips, converts, or trains on); 2: a run would stop."""
        if any(f.action == STOP for f in self.findings):
            return 2
        return 1 if self.findings else 0

    def counts(self) -> dict[str, int]:
        counted = Counter(f.kind for f in self.findings)
        return {kind: counted[kind] for kind in KINDS if counted[kind]}

    def to_dict(self) -> dict:
        return {
            "root": self.root, "layout": self.layout, "classes": self.classes, "images": self.images,
            "decoded": self.decoded, "exit_code": self.exit_code, "counts": self.counts(),
            "findings": [f.to_dict() for f in self.findings],
        }


def _layout(root: Path) -> tuple[str, dict[str, dict[str, list[str]]], list[Finding]]:
    """(layout, {split: {class: files}}, dataset-level findings), all of them, not just the first."""
    if not root.is_dir():
        return "none", {}, [Finding("no-data", str(root), "no such folder")]
    splits = ("train", "val") if (root / "train").is_dir() else ("all",)
    found: dict[str, dict[str, list[str]]] = {}
    problems = []
    for split in splits:
        folder = root / split if split != "all" else root
        if split == "val" and not folder.is_dir():
            continue
        found[split] = {d.name: image_files(d) for d in class_dirs(folder)}
        if not found[split] and split != "val":
            problems.append(Finding("no-data", str(folder), "no class folders (expected <folder>/<class>/<image>)", split))
        for name, files in found[split].items():
            if not files:
                problems.append(Finding("empty-class", str(folder / name), f"no {'/'.join(IMAGE_SUFFIXES)} files", split))
    for name in sorted(set(found.get("val", {})) - set(found.get("train", {}))):
        problems.append(Finding("val-only-class", str(root / "val" / name), "train has no folder of that name", "val"))
    return ("train/val" if splits[0] == "train" else "one folder"), found, problems


def _digest(path: str) -> str:
    digest = hashlib.blake2b()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def duplicates(groups: dict[str, list[str]]) -> list[Finding]:
    """Files with the same bytes in two splits (or, with one split, twice in it: any split may part
    them). Sizes first, so only files whose size occurs twice are hashed (blake2b of the bytes)."""
    by_size: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for split, paths in groups.items():
        for path in paths:
            try:
                by_size[os.path.getsize(path)].append((split, path))
            except OSError:
                continue
    cross = len(groups) > 1
    candidates = [members for members in by_size.values() if len(members) > 1 and (not cross or len({s for s, _ in members}) > 1)]
    by_digest: dict[str, list[tuple[str, str]]] = defaultdict(list)
    paths = [member for members in candidates for member in members]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for (split, path), digest in zip(paths, pool.map(lambda m: _digest(m[1]), paths)):
            by_digest[digest].append((split, path))
    found = []
    for members in by_digest.values():
        splits = {s for s, _ in members}
        if len(members) < 2 or (cross and len(splits) < 2):
            continue
        first_split, first = members[0]
        for split, path in members[1:]:
            if cross and split == first_split:
                continue
            found.append(Finding("duplicate", path, f"same bytes as {first}", split))
    return found


def scan_dataset(
    root: str | os.PathLike,
    *,
    decode: bool = True,
    threads: int = 2,
    progress: Callable[[str, int], Callable[[int], object]] | None = None,
) -> DatasetReport:
    """Every problem of an ImageFolder at once: layout (empty, val-only classes), each file's structure,
    with `decode` each remaining file through DALI's CPU decoder (the one training uses without a GPU),
    and duplicates across train and val. `progress(label, total)` returns a per-file advance callable."""
    root = Path(root)
    layout, found, findings = _layout(root)
    split_of = {"all": "", "train": "train", "val": "val"}
    entries = [(split_of[split], name, path) for split, classes in found.items() for name, files in classes.items() for path in files]
    paths = [path for _, _, path in entries]
    advance = progress("structure", len(paths)) if progress else None
    headers = file_headers(paths, progress=advance)
    bad_paths = set()
    decodable: list[tuple[str, str, Header]] = []
    for (split, _, path), header in zip(entries, headers):
        if isinstance(header, BadFile):
            findings.append(Finding(header.kind, path, header.detail, split))
            bad_paths.add(path)
        else:
            findings.extend(header.findings(path, split))
            decodable.append((split, path, header))
    if decode and decodable:
        from loaders.dali import decode_failures  # DALI (and torch) only for the full scan

        advance = progress("decode", len(decodable)) if progress else None
        failures = decode_failures([p for _, p, _ in decodable], [h for _, _, h in decodable], num_threads=threads, progress=advance)
        for index, reason in sorted(failures.items()):
            split, path, _ = decodable[index]
            findings.append(Finding("undecodable", path, reason, split))
            bad_paths.add(path)
    train_split = "train" if "train" in found else "all"
    for files in found.get(train_split, {}).values():
        if files and all(path in bad_paths for path in files):
            findings.append(Finding("no-usable-images", str(Path(files[0]).parent), f"all {len(files)} images are bad", split_of[train_split]))
    groups = {split: [p for s, _, p in entries if s == split_of[split] and p not in bad_paths] for split in found}
    findings.extend(duplicates(groups))
    order = {kind: n for n, kind in enumerate(KINDS)}
    findings.sort(key=lambda f: (order[f.kind], f.path))
    return DatasetReport(
        root=str(root), layout=layout, classes=sorted(found.get(train_split, {})),
        images={split: sum(len(files) for files in classes.values()) for split, classes in found.items()},
        findings=findings, decoded=decode,
    )


def report_lines(report: DatasetReport, shown: int = 10) -> Iterable[str]:
    """The human-readable report: a table of kinds, then the first `shown` paths of each."""
    images = ", ".join(f"{n} {split}" if split != "all" else str(n) for split, n in report.images.items())
    yield f"{report.root}: {report.layout}, {len(report.classes)} classes, {images or 0} images" + (
        "" if report.decoded else " (structure only, not decoded)"
    )
    counts = report.counts()
    if not counts:
        yield "no problems found"
        return
    yield ""
    yield f"{'problem':<18} {'count':>7}  in training"
    for kind, count in counts.items():
        yield f"{kind:<18} {count:>7}  {KINDS[kind].action}"
    by_kind = defaultdict(list)
    for finding in report.findings:
        by_kind[finding.kind].append(finding)
    for kind, members in by_kind.items():
        yield ""
        yield f"{kind} ({KINDS[kind].meaning}): {len(members)}"
        for f in members[:shown]:
            yield f"  {f.path}" + (f"  ({f.detail})" if f.detail else "")
        if len(members) > shown:
            yield f"  ... and {len(members) - shown} more (--json lists all)"
