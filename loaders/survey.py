"""The listing and `stat` of an ImageFolder tree, made by child processes while the run's own process
imports torch, timm and DALI.

A start on a tree seen before does two long things that do not depend on each other: importing (about
2.5 s of one core here) and listing and stat'ing every file (ImageNet's 1.33 M files: about 4 s of one
core, half of it in the kernel). `start_survey(root)` starts the second in child processes before the
imports, on the other cores; `Survey.result()` waits for them and returns what they found: per class
folder, its image files as `loaders.sources.image_files` lists them (the same function), each with its
(st_size, st_mtime_ns). The run's listing then reads no folder (`loaders.sources.image_folder_sources`)
and its structure check stats no file (`loaders.header_table.check_files`).

The children are separate processes, not threads: the listing is Python code that would take turns with
the imports for the interpreter lock, and the kernel's `stat` ran slower from two threads of one process
than from one (measured: 5.4 s against 4.1 s for 1.33 M files), but at full speed from two processes.
Anything wrong with a child (it failed, was killed, its file is missing) only means that the run lists
and stats the tree itself, as it does without a survey.

With several processes on a machine each one surveys the whole tree, with fewer children (its share of
the cores): each listed the whole tree before too, but now each also stats every file, where the check
had each stat its share. Those are `stat`s of the same files at once, from the kernel's caches.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loaders.sources import class_dirs, image_files

# The imports are the start's longest single thread: they keep their core and the children take what is
# left (2 cores, 1.33 M files: warm starts of 5.7-6.3 s at niceness 10, 6.2-6.7 s at 0).
NICENESS = 10
MAX_CHILDREN = 4  # past a few, the children would only take cores from the other processes of the run
WORK_PREFIX = "imgcls-survey-"  # the children's output folders, in the temporary folder


def file_stats(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(st_size, st_mtime_ns) of each path as int64 arrays; (-1, -1) for one that cannot be stat'ed."""
    file_bytes, mtimes_ns = np.empty(len(paths), np.int64), np.empty(len(paths), np.int64)
    for i, path in enumerate(paths):
        try:
            stat = os.stat(path)
            file_bytes[i], mtimes_ns[i] = stat.st_size, stat.st_mtime_ns
        except OSError:
            file_bytes[i] = mtimes_ns[i] = -1
    return file_bytes, mtimes_ns


def split_folders(root: Path) -> list[Path]:
    """The folders whose class folders a run lists (`image_folder_sources`): train/, val/ and test/ when
    there is a train/, else the root itself."""
    if (root / "train").is_dir():
        return [root / split for split in ("train", "val", "test") if (root / split).is_dir()]
    return [root]


@dataclass(frozen=True)
class Listing:
    """Per class folder (its path as `class_dirs` gives it), its image files and their int64 (n, 2)
    (st_size, st_mtime_ns) at the time of the survey."""

    folders: dict[str, tuple[list[str], np.ndarray]]
    seconds: float  # from the start of the survey to the end of its last child's work

    def get(self, folder: Path) -> tuple[list[str], np.ndarray] | None:
        return self.folders.get(str(folder))

    @property
    def files(self) -> int:
        return sum(len(found) for found, _ in self.folders.values())


def _joined(texts: Sequence[str]) -> np.ndarray:
    return np.frombuffer("\0".join(texts).encode("utf-8", "surrogateescape"), np.uint8)


def _split(joined: np.ndarray) -> list[str]:
    return joined.tobytes().decode("utf-8", "surrogateescape").split("\0") if len(joined) else []


def survey_folders(folders: Sequence[Path], out: Path) -> None:
    """List and stat the class folders `folders`; written to `out` (.npz) under a temporary name, then renamed."""
    files, counts, stats = [], [], []
    for folder in folders:
        found = image_files(folder)
        files.extend(found)
        counts.append(len(found))
        stats.append(np.stack(file_stats(found), axis=1))
    arrays = {
        "folders": _joined([str(f) for f in folders]),
        "counts": np.asarray(counts, np.int64),
        "files": _joined(files),
        "stats": np.concatenate(stats) if stats else np.zeros((0, 2), np.int64),
        "finished": np.asarray(time.time()),  # wall-clock time: the parent's start is compared with it
    }
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, out)


def _read(path: Path) -> tuple[dict[str, tuple[list[str], np.ndarray]], float]:
    """(the class folders' files and stats, when the child finished) from a child's output."""
    with np.load(path, allow_pickle=False) as npz:
        folders, counts, files, stats = _split(npz["folders"]), npz["counts"], _split(npz["files"]), npz["stats"]
        finished = float(npz["finished"])
    if not (len(folders) == len(counts) and int(counts.sum()) == len(files) == len(stats)):
        raise ValueError(f"{path}: inconsistent survey")
    out, start = {}, 0
    for folder, count in zip(folders, counts.tolist()):
        out[folder] = (files[start : start + count], stats[start : start + count])
        start += count
    return out, finished


class Survey:
    """The child processes surveying `root`: `result()` is their Listing, or None when any of them failed."""

    def __init__(self, root: Path, children: list[subprocess.Popen], outputs: list[Path], work: Path, started: float):
        self.root, self._children, self._outputs, self._work = root, children, outputs, work
        self._started = started  # time.time() when the survey started
        self._result: Listing | None = None
        atexit.register(self.close)  # a run that stops before it asks (a bad recipe) leaves nothing behind

    def result(self) -> Listing | None:
        if self._children:
            failed = [child.wait() for child in self._children]
            try:
                if not any(failed):
                    merged, finished = {}, self._started
                    for out in self._outputs:
                        folders, child_finished = _read(out)
                        merged.update(folders)
                        finished = max(finished, child_finished)
                    self._result = Listing(merged, finished - self._started)
            except (OSError, ValueError):
                self._result = None
            self._children = []
            shutil.rmtree(self._work, ignore_errors=True)
        return self._result

    def close(self) -> None:
        for child in self._children:
            if child.poll() is None:
                child.kill()
            child.wait()
        self._children = []
        shutil.rmtree(self._work, ignore_errors=True)


def survey_children() -> int:
    """How many child processes survey a tree: this process's share of the machine's cores (the other
    processes of the run on this machine survey too), at most MAX_CHILDREN."""
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_CHILDREN, cores // local_processes))


def start_survey(root: str | os.PathLike, children: int | None = None) -> Survey | None:
    """Start surveying the ImageFolder at `root` in child processes; None when it is not a folder with
    class folders (the run then says what is wrong with it)."""
    started, root = time.time(), Path(root)
    try:
        folders = [d for split in split_folders(root) for d in class_dirs(split)]
    except OSError:
        return None
    if not folders:
        return None
    count = min(children or survey_children(), len(folders))
    _remove_stale_surveys(Path(tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX))
    repo = str(Path(__file__).resolve().parents[1])
    launched, outputs = [], []
    for n in range(count):
        # Every count-th class folder, so that train/'s large folders and val/'s small ones are shared out evenly.
        mine = folders[n::count]
        (work / f"{n}.folders").write_bytes(_joined([str(f) for f in mine]).tobytes())
        outputs.append(work / f"{n}.npz")
        command = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from loaders.survey import main; main(sys.argv[2:])",
                   repo, str(work / f"{n}.folders"), str(outputs[-1]), str(os.getpid())]
        launched.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return Survey(root, launched, outputs, work, started)


def _remove_stale_surveys(folder: Path, older_than_s: float = 3600.0) -> None:
    """Work folders of runs killed (SIGKILL) before they read their survey: a survey takes seconds."""
    for stale in folder.glob(WORK_PREFIX + "*"):
        try:
            if time.time() - stale.stat().st_mtime > older_than_s:
                shutil.rmtree(stale)
        except OSError:
            pass


def _end_with(parent_pid: int) -> None:
    """Have the kernel kill this child when the run's process ends, however it ends (Linux's
    PR_SET_PDEATHSIG), so that a killed run leaves no survey running; elsewhere the child runs out."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the run ended before the line above
        os._exit(1)


def main(argv: list[str]) -> None:
    """A child: `FOLDERS_FILE OUT PARENT_PID`, the class folders NUL-separated in FOLDERS_FILE."""
    folders_file, out, parent_pid = Path(argv[0]), Path(argv[1]), int(argv[2])
    _end_with(parent_pid)
    os.nice(NICENESS)
    survey_folders([Path(f) for f in _split(np.fromfile(folders_file, np.uint8))], out)
    # The output is written and renamed: the parent waits on this process's exit, not on freeing its
    # million path strings (0.1 s).
    os._exit(0)
