"""Atomic writes: a file or a folder appears whole or not at all, and a deleted folder never looks whole.

Everything is built under a temporary name beside its destination, `.tmp-<name>`, then renamed into
place with `os.replace` (atomic within a filesystem). A reader (a resume, a report, the Space) that
skips `.tmp-` names therefore never sees half a checkpoint, bundle, report or run record, whatever
moment a kill, a full disk or a crash picks. Used by checkpoints, export, report and the run logs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def staging_path(final: str | os.PathLike, private: bool = False) -> Path:
    """Where `final` is built before `swap_in`: `.tmp-<name>` beside it; `private` adds this process's
    id, for a folder that two commands might build at once (two exports of one run)."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{final.name}" + (f"-{os.getpid()}" if private else ""))


def fsync_folder(folder: Path, *, files: bool = False) -> None:
    """Flush `folder`'s entry list (and with `files`, every file in it) to the disk: what a rename
    promises survives a power cut only once both are on the disk."""
    if files:
        for path in folder.iterdir():
            if path.is_file():
                with open(path, "rb") as f:
                    os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(folder: Path) -> None:
    """Delete a folder so that no moment of the deletion looks complete: first an atomic rename to a
    temporary name (never picked up), then the files."""
    doomed = folder.with_name(f"{TMP_PREFIX}old-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def swap_in(staged: Path, final: Path, *, durable: bool = False) -> Path:
    """Rename the finished folder `staged` to `final`, replacing a folder already there: the old one
    steps aside under a temporary name first and comes back if the rename fails. With `durable`, the
    files and the rename are flushed to the disk (checkpoints)."""
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
    if durable:
        fsync_folder(staged, files=True)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(staged, final)
    except OSError:
        if old.exists():
            os.replace(old, final)
        raise
    if durable:
        fsync_folder(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def remove_leftovers(folder: Path) -> None:
    """Remove the temporary folders a process killed mid-write or mid-delete left in `folder`."""
    for leftover in folder.glob(TMP_PREFIX + "*"):
        shutil.rmtree(leftover, ignore_errors=True)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)`, then rename tmp over `path`: the file is replaced whole or not at all (a kill
    mid-write leaves the old one; run.json, history.jsonl and subset.json are read on resume). The
    temporary file is removed if writing fails, so a full disk leaves no half file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))
