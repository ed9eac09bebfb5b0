"""Screening: the kinds of bad image file and what a run does with each, and the check of a source
before training (every file's header, no decode) that drops the files the decoder would fail on.

The result is a pure function of the files' bytes, so every process and every resume keep the same
files. The check of an ImageFolder's files goes through `loaders.header_table` (cached per file,
shared out among the processes). What only a decode finds is handled later, in the loaders
(`loaders.recovery`); the full scan behind `python -m trainer check-data` is `loaders.scan`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np

from loaders.header_table import ALONE, HeaderTable, Processes, cache_file, check_files
from loaders.headers import HUGE_PIXELS, TINY_SIDE_PX, BadFile, Header, file_headers, read_header
from loaders.sources import DataError, ImageFolderSource

BAD_FILE_POLICIES = ("skip", "stop")  # data.bad_files

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
    "duplicate": Kind("the same bytes in two splits: train and val or test (held-out scores leak)", KEEP),
    "empty-class": Kind("a class folder without image files", STOP),
    "val-only-class": Kind("a class folder in val that train does not have", STOP),
    "test-only-class": Kind("a class folder in test that train does not have", STOP),
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
    split: str = ""  # "train", "val" or "test" (empty when it concerns the whole dataset)

    @property
    def action(self) -> str:
        return KINDS[self.kind].action

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "split": self.split, "path": self.path, "detail": self.detail, "action": self.action}


def header_findings(header: Header, path: str, split: str = "") -> list[Finding]:
    """What check-data reports about a good file: its conversion, and a huge or tiny size."""
    found = []
    if header.mode:
        found.append(Finding(header.mode, path, f"{header.format.upper()}, {header.width}x{header.height}", split))
    if header.huge:
        found.append(Finding("huge", path, f"{header.width}x{header.height} ({header.height * header.width / 1e6:.1f} MP)", split))
    if header.tiny:
        found.append(Finding("tiny", path, f"{header.width}x{header.height}", split))
    return found


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


def header_sizes(headers: list[Header | BadFile]) -> np.ndarray:
    """(height, width) of each header as an int64 (N, 2) array; (0, 0) for a BadFile."""
    sizes = np.zeros((len(headers), 2), dtype=np.int64)
    for index, header in enumerate(headers):
        if not isinstance(header, BadFile):
            sizes[index] = header.height, header.width
    return sizes


def check_sources(sources: list, root, processes: Processes = ALONE) -> tuple[list[HeaderTable], str]:
    """The structural check of every sample of several sources, one table each, and a line saying what
    it read: the files of ImageFolder sources (all under `root`) in one pass through the header cache of
    `root`, shared out among `processes`; other sources' samples (HF rows) read here, by every process."""
    folders = [s for s in sources if isinstance(s, ImageFolderSource)]
    note = ""
    if folders:
        surveyed = all(s.file_stats is not None for s in folders)
        stats = np.concatenate([s.file_stats for s in folders]) if surveyed else None
        table, report = check_files([f for s in folders for f in s.files], root, processes, cache_file(root), stats=stats)
        note = report.line()
    tables, start = [], 0
    for source in sources:
        if isinstance(source, ImageFolderSource):
            tables.append(table.rows(start, start + len(source)))
            start += len(source)
        else:
            tables.append(HeaderTable.of(source_headers(source)))
    return tables, note


def screen(source, split: str, table: HeaderTable | None = None):
    """The source without the files the decoder would fail on, carrying every finding in `findings`
    (the dropped files, and the converted, huge and tiny ones that stay) and every kept file's stored
    size in `sizes` (the train loader's crop windows are computed from them, without reading a file).
    `table`: the source's check already made (`check_sources`); without it the files are read here."""
    table = HeaderTable.of(source_headers(source)) if table is None else table
    good = table.good()
    findings = []
    # Arrays for the million good files; Python only for the few that have something to say, in file
    # order. Named only then: an HF row's name costs a read.
    for index in np.flatnonzero(~good | table.notable()).tolist():
        header = table.header(index)
        if isinstance(header, BadFile):
            findings.append(Finding(header.kind, source.name(index), header.detail, split))
        else:
            findings.extend(header_findings(header, source.name(index), split))
    keep = np.flatnonzero(good)
    kept = source.subset(keep) if len(keep) < len(source) else source
    return replace(kept, findings=tuple(findings), sizes=table.sizes[keep])


def _listed(bad: list[Finding], shown: int = 50) -> str:
    """The first `shown` bad files as the "stop" error lists them, one per line, and how many more."""
    listed = "\n".join(f"  {f.split}: {f.path}  ({f.kind}: {f.detail})" for f in bad[:shown])
    return listed + (f"\n  ... and {len(bad) - shown} more" if len(bad) > shown else "")


def screen_splits(train, val, policy: str, tables: list[HeaderTable] | None = None):
    """Both splits screened as `data.bad_files` says: "skip" drops bad files (a pure function of the
    files' bytes, so every process and every resume drops the same ones); "stop" raises DataError
    listing them. Either way a training class left without images is an error. `tables`: the two
    splits' checks already made (`check_sources`)."""
    if policy not in BAD_FILE_POLICIES:
        raise DataError(f"data.bad_files must be one of {BAD_FILE_POLICIES}, got {policy!r}")
    train_table, val_table = tables or (None, None)
    train, val = screen(train, "train", train_table), screen(val, "val", val_table)
    bad = [f for f in train.findings + val.findings if f.kind in BAD_KINDS]
    if bad and policy == "stop":
        raise DataError(
            f"{len(bad)} bad image file(s) and data.bad_files='stop':\n{_listed(bad)}\n"
            "fix or remove them, or set data.bad_files=skip to train without them "
            "(python -m trainer check-data PATH lists every problem)"
        )
    counts = np.bincount(train.labels, minlength=len(train.classes))
    empty = [name for name, count in zip(train.classes, counts) if count == 0]
    if empty:
        raise DataError(f"training classes with no usable image after skipping {len(bad)} bad file(s): {empty[:10]}")
    return train, val


def screen_test(test, policy: str, table: HeaderTable | None = None):
    """The test split screened as `screen_splits` screens val: bad files dropped ("skip") or listed in a
    DataError ("stop"). A test class left without images is no error: the test split scores what it has."""
    test = screen(test, "test", table)
    bad = [f for f in test.findings if f.kind in BAD_KINDS]
    if bad and policy == "stop":
        raise DataError(
            f"{len(bad)} bad image file(s) in the test split and data.bad_files='stop':\n{_listed(bad)}\n"
            "fix or remove them, or set data.bad_files=skip to score without them"
        )
    return test


def screening_record(train, val, policy: str, test=None) -> dict:
    """What the pre-training check found, as written to <run>/bad_files.json."""
    findings = train.findings + val.findings + (test.findings if test is not None else ())
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
