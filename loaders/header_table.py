"""The structural check of many files at once: its results as one table of arrays, kept on disk per
dataset and keyed per file by (path, size, modification time), with the work shared out among the
processes of a run.

Checking every file of ImageNet (1.28 M files, `loaders.headers`: the first 16 KiB and last 1 KiB of
each) takes minutes. With the cache, a start on a tree seen before reads no file, only `stat`s each
one, and re-checks the new and changed ones; with N processes each one checks 1/N of the files and the
results are exchanged, so every process ends with the same table. The stats come from the survey of
the tree made while the run imported torch (`loaders.survey`), or, without one, each process stats its
share here.

The cache is one file per dataset root outside the dataset (datasets are often read-only mounts):
`<IMGCLS_CACHE>/headers/<hash of the root's absolute path>.npz`, or in the folder that
IMGCLS_HEADER_CACHE names ("off": no cache). It is written whole under a temporary name and renamed,
so two runs starting at once leave one of their two complete files; a missing, partial, corrupt or
foreign file is not used (everything is checked again), never an error. It is keyed to this
version of `loaders/headers.py` (a hash of its source), so a changed check re-checks everything.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import loaders.headers
from loaders.digits import cache_root
from loaders.headers import HUGE_PIXELS, TINY_SIDE_PX, BadFile, Header, file_headers
from loaders.sources import DataError
from loaders.survey import file_stats

FORMATS = ("jpeg", "png", "bmp", "webp")
MODES = ("", "greyscale", "cmyk", "16-bit", "palette", "alpha")
BAD = 255  # the format code of a file the check rejected; its (kind, detail) is in HeaderTable.bad
CACHE_ENV = "IMGCLS_HEADER_CACHE"  # a folder for the cache files, or "off"
CACHE_FORMAT = 1  # bump when the layout of the cache file changes
_NOT_CACHED = ("unreadable",)  # a permission or I/O error can be fixed without touching size or mtime


@dataclass(frozen=True)
class HeaderTable:
    """What the structural check found for each of N files (or samples), as arrays."""

    sizes: np.ndarray  # int64 (N, 2): (height, width) as the header stores them; (0, 0) for a bad file
    formats: np.ndarray  # uint8 (N,): an index into FORMATS, or BAD
    modes: np.ndarray  # uint8 (N,): an index into MODES (how the decoder converts the pixels)
    bad: dict[int, tuple[str, str]] = field(default_factory=dict)  # row → (kind, detail) of each bad file

    def __len__(self) -> int:
        return len(self.formats)

    @classmethod
    def of(cls, headers: Sequence[Header | BadFile]) -> HeaderTable:
        table = cls.blank(len(headers))
        for row, header in enumerate(headers):
            table.put(row, header)
        return table

    @classmethod
    def blank(cls, count: int) -> HeaderTable:
        return cls(np.zeros((count, 2), np.int64), np.full(count, BAD, np.uint8), np.zeros(count, np.uint8), {})

    def put(self, row: int, header: Header | BadFile) -> None:
        if isinstance(header, BadFile):
            self.sizes[row], self.formats[row], self.modes[row] = 0, BAD, 0
            self.bad[row] = (header.kind, header.detail)
        else:
            self.sizes[row] = header.height, header.width
            self.formats[row], self.modes[row] = FORMATS.index(header.format), MODES.index(header.mode)
            self.bad.pop(row, None)

    def header(self, row: int) -> Header | BadFile:
        if self.formats[row] == BAD:
            return BadFile(*self.bad[row])
        height, width = (int(v) for v in self.sizes[row])
        return Header(FORMATS[self.formats[row]], height, width, MODES[self.modes[row]])

    def good(self) -> np.ndarray:
        return self.formats != BAD

    def notable(self) -> np.ndarray:
        """Good rows that `Header.notable` would flag: converted by the decoder, huge or tiny."""
        height, width = self.sizes[:, 0], self.sizes[:, 1]
        return self.good() & ((self.modes != 0) | (height * width > HUGE_PIXELS) | (np.minimum(height, width) < TINY_SIDE_PX))

    def rows(self, start: int, stop: int) -> HeaderTable:
        bad = {row - start: found for row, found in self.bad.items() if start <= row < stop}
        return HeaderTable(self.sizes[start:stop], self.formats[start:stop], self.modes[start:stop], bad)

    def fill(self, rows: np.ndarray, other: HeaderTable) -> None:
        """Row rows[i] of this table becomes row i of `other`."""
        self.sizes[rows], self.formats[rows], self.modes[rows] = other.sizes, other.formats, other.modes
        if self.bad:
            for row in rows.tolist():
                self.bad.pop(row, None)
        for i, found in other.bad.items():
            self.bad[int(rows[i])] = found

    @classmethod
    def concatenate(cls, tables: Sequence[HeaderTable]) -> HeaderTable:
        bad, start = {}, 0
        for table in tables:
            bad.update({start + row: found for row, found in table.bad.items()})
            start += len(table)
        return cls(
            np.concatenate([t.sizes for t in tables]).reshape(-1, 2).astype(np.int64, copy=False),
            np.concatenate([t.formats for t in tables]).astype(np.uint8, copy=False),
            np.concatenate([t.modes for t in tables]).astype(np.uint8, copy=False),
            bad,
        )


# -- the processes of a run ------------------------------------------------------------------------


def _alone(obj: Any) -> list:
    return [obj]


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes that check the files together, and how they exchange
    results: `gather(obj)` returns every process's obj, in rank order, on every process."""

    rank: int = 0
    count: int = 1
    gather: Callable[[Any], list] = _alone


ALONE = Processes()  # one process: no exchange

def share(count: int, processes: Processes) -> tuple[int, int]:
    """[start, stop) of this process's contiguous share of `count` items (neighbours in a folder stay together)."""
    return count * processes.rank // processes.count, count * (processes.rank + 1) // processes.count


def _exchange(processes: Processes, work: Callable[[], Any]) -> list:
    """Every process's result of `work()`, on every process. A failure on one process is raised on all
    of them (the others would otherwise wait in the next exchange until the collective timeout)."""
    try:
        mine = ("ok", work())
    except Exception as err:
        if processes.count == 1:
            raise
        mine = ("error", f"{type(err).__name__}: {err}")
        error = err
    parts = processes.gather(mine)
    failed = [(rank, text) for rank, (status, text) in enumerate(parts) if status == "error"]
    if failed:
        if parts[processes.rank][0] == "error":
            raise error
        rank, text = failed[0]
        raise RuntimeError(f"the structural check failed on process {rank}: {text}")
    return [payload for _, payload in parts]


# -- the cache file -------------------------------------------------------------------------------


def cache_file(root: str | os.PathLike) -> Path | None:
    """Where the cache of the dataset at `root` lives; None when IMGCLS_HEADER_CACHE is "off"."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() == "off":
        return None
    folder = Path(setting).expanduser() if setting else cache_root() / "headers"
    return folder / f"{_digest(os.path.abspath(root))[:24]}.npz"


def _digest(data: str | bytes) -> str:
    return hashlib.sha256(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data).hexdigest()


def _checker() -> str:
    """The version of the check itself: a cache written by another `loaders/headers.py` is not used."""
    return _digest(Path(loaders.headers.__file__).read_bytes())[:16]


def _joined(texts: Sequence[str]) -> bytes:
    return "\0".join(texts).encode("utf-8", "surrogateescape")


def _split(joined: bytes) -> list[str]:
    return joined.decode("utf-8", "surrogateescape").split("\0") if joined else []


def relative_keys(paths: Sequence[str], root: str | os.PathLike) -> bytes:
    """The paths relative to `root`, NUL-separated: the cache's keys. One string operation for the
    whole list (a Python loop over 1.28 M paths costs a second)."""
    prefix = os.path.join(str(root), "")
    return ("\0" + "\0".join(paths)).replace("\0" + prefix, "\0")[1:].encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Cached:
    """A cache file's contents: per key (a path relative to the root), its stat and its check."""

    keys: bytes  # NUL-separated, in row order
    file_bytes: np.ndarray  # int64: st_size when checked
    mtimes_ns: np.ndarray  # int64: st_mtime_ns when checked
    table: HeaderTable


def load_cache(path: Path | None, root: str | os.PathLike) -> Cached | None:
    """The cache at `path`, or None when there is none that this check wrote for this root."""
    if path is None:
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
        if int(arrays["format"]) != CACHE_FORMAT or _split(arrays["meta"].tobytes()) != [os.path.abspath(root), _checker()]:
            return None
        keys = arrays["keys"].tobytes()
        bad_rows, bad_text = arrays["bad_rows"].astype(np.int64), _split(arrays["bad_text"].tobytes())
        table = HeaderTable(
            arrays["sizes"].astype(np.int64).reshape(-1, 2), arrays["formats"].astype(np.uint8, copy=False),
            arrays["modes"].astype(np.uint8, copy=False),
            {int(row): (bad_text[2 * i], bad_text[2 * i + 1]) for i, row in enumerate(bad_rows)},
        )
        cached = Cached(keys, arrays["file_bytes"].astype(np.int64, copy=False), arrays["mtimes_ns"].astype(np.int64, copy=False), table)
        count = keys.count(b"\0") + 1 if keys else 0
        if not (count == len(cached.file_bytes) == len(cached.mtimes_ns) == len(table)) or len(bad_text) != 2 * len(bad_rows):
            return None
        if np.any(table.formats[table.formats != BAD] >= len(FORMATS)) or np.any(table.modes >= len(MODES)):
            return None
        if any(not 0 <= row < count or table.formats[row] != BAD for row in table.bad) or int((table.formats == BAD).sum()) != len(table.bad):
            return None
        return cached
    except Exception:  # noqa: BLE001  a cache that cannot be read (truncated, corrupt, another layout) is only a miss
        return None


def save_cache(path: Path, root: str | os.PathLike, keys: bytes, file_bytes: np.ndarray, mtimes_ns: np.ndarray, table: HeaderTable) -> bool:
    """Write the cache (`keys`: NUL-separated, one per row) whole under a temporary name, then rename it
    into place; False (with a warning) when it cannot be written: the run goes on, and the next start
    checks again. Files that could not be stat'ed or read are left out: they are checked every time."""
    stored = file_bytes >= 0
    stored[[row for row, (kind, _) in table.bad.items() if kind in _NOT_CACHED]] = False
    keep = np.flatnonzero(stored)
    if len(keep) < len(table):
        listed = _split(keys)
        keys = _joined([listed[row] for row in keep])
    kept_bad = sorted(row for row in table.bad if stored[row])
    new_row = np.cumsum(stored) - 1
    arrays = {
        "format": np.asarray(CACHE_FORMAT),
        "meta": np.frombuffer(_joined([os.path.abspath(root), _checker()]), np.uint8),
        "keys": np.frombuffer(keys, np.uint8),
        "file_bytes": file_bytes[keep],
        "mtimes_ns": mtimes_ns[keep],
        "sizes": table.sizes[keep].astype(np.uint32),
        "formats": table.formats[keep],
        "modes": table.modes[keep],
        "bad_rows": new_row[np.asarray(kept_bad, np.int64)],
        "bad_text": np.frombuffer(_joined([text for row in kept_bad for text in table.bad[row]]), np.uint8),
    }
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path.parent)
        handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
        with os.fdopen(handle, "wb") as out:
            np.savez(out, **arrays)
        os.replace(tmp, path)
        return True
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        warnings.warn(f"the header cache {path} could not be written ({err}); the next start checks every file again "
                      f"(set {CACHE_ENV} to a writable folder, or to 'off')", stacklevel=2)
        return False


def _remove_stale_temporaries(folder: Path, older_than_s: float = 3600.0) -> None:
    """Temporary files of writers killed mid-write (a write takes a second or two)."""
    for stale in folder.glob(".tmp-*.npz"):
        try:
            if time.time() - stale.stat().st_mtime > older_than_s:
                stale.unlink()
        except OSError:
            pass


# -- the check ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckReport:
    """What a check of many files did: for the run's console line."""

    files: int
    checked: int  # files read (new, changed, or all without a cache)
    cache: Path | None
    written: bool  # whether this process wrote the cache file
    seconds: float

    def line(self) -> str:
        where = f"cache {self.cache}" if self.cache else f"no cache ({CACHE_ENV}=off)"
        return (f"structure check: {self.files:,} files, {self.checked:,} read, {self.files - self.checked:,} from the "
                f"{where}, {self.seconds:.1f} s")


def check_files(
    paths: Sequence[str], root: str | os.PathLike, processes: Processes = ALONE, cache: Path | None = None, threads: int = 4,
    stats: np.ndarray | None = None,
) -> tuple[HeaderTable, CheckReport]:
    """The structural check of every path (all under `root`), as `file_headers` would give it: files
    whose (path, size, mtime) the cache holds are not read; each process stats and checks its share;
    every process returns the same table. The main process rewrites the cache when anything changed.
    `stats`: int64 (N, 2) (st_size, st_mtime_ns) of the paths, taken when they were listed
    (`loaders.survey`); without them each process stats its share here."""
    start_s = time.perf_counter()
    keys = relative_keys(paths, root)
    cached = load_cache(cache, root)
    aligned = cached is not None and cached.keys == keys  # the usual case: the same tree in the same order
    lo, hi = share(len(paths), processes)

    def look_up() -> tuple:
        if stats is not None:
            file_bytes, mtimes_ns = stats[lo:hi, 0], stats[lo:hi, 1]
        else:
            file_bytes, mtimes_ns = file_stats(paths[lo:hi])
        table, hit = HeaderTable.blank(hi - lo), np.zeros(hi - lo, bool)
        if cached is not None:
            if aligned:
                rows = np.arange(lo, hi)
            else:
                index = {key: row for row, key in enumerate(_split(cached.keys))}
                rows = np.asarray([index.get(key, -1) for key in _split(keys)[lo:hi]], np.int64)
            found = rows >= 0
            hit[found] = (cached.file_bytes[rows[found]] == file_bytes[found]) & (cached.mtimes_ns[rows[found]] == mtimes_ns[found])
            hits = np.flatnonzero(hit)
            table.fill(hits, _take(cached.table, rows[hits]))
        # The same files on every process, or the shares would not add up (a machine whose mount differs).
        digest = _digest(keys) if processes.count > 1 else ""
        return file_bytes, mtimes_ns, hit, table, digest

    parts = _exchange(processes, look_up)
    if len({part[4] for part in parts}) > 1:
        raise DataError(f"the processes do not see the same files under {root} ({len(paths)} here): every process "
                        "must read the same dataset (on several machines: the same copy, or one shared filesystem)")
    file_bytes = np.concatenate([p[0] for p in parts])
    mtimes_ns = np.concatenate([p[1] for p in parts])
    hit = np.concatenate([p[2] for p in parts])
    table = HeaderTable.concatenate([p[3] for p in parts])

    misses = np.flatnonzero(~hit)
    if len(misses):
        mine_lo, mine_hi = share(len(misses), processes)
        mine = misses[mine_lo:mine_hi]
        checked = _exchange(processes, lambda: HeaderTable.of(file_headers([paths[i] for i in mine], threads=threads)))
        table.fill(misses, HeaderTable.concatenate(checked))
    written = False
    if cache is not None and processes.rank == 0 and (len(misses) or not aligned):
        written = save_cache(cache, root, keys, file_bytes, mtimes_ns, table)
    return table, CheckReport(len(paths), len(misses), cache, written, time.perf_counter() - start_s)


def _take(table: HeaderTable, rows: np.ndarray) -> HeaderTable:
    """Rows `rows` of `table` (each at most once)."""
    position = np.full(len(table), -1, np.int64)
    position[rows] = np.arange(len(rows))
    bad = {int(position[row]): found for row, found in table.bad.items() if position[row] >= 0}
    return HeaderTable(table.sizes[rows], table.formats[rows], table.modes[rows], bad)
