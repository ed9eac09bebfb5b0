"""The listing and `stat` of an ImageFolder tree, made by child processes while the run's own process
imports torch, timm and DALI.

A start on a tree seen before does two long things that do not depend on each other: importing (about
2.2 s of one core here) and listing and stat'ing every file (ImageNet's 1.33 M files: about 4 s of one
core, most of it the kernel's `stat`). `start_survey(root)` starts the second in child processes before the
imports, on the other cores; `Survey.result()` waits for them and returns what they found: per class
folder, its image files as `loaders.sources.image_files` lists them (the same function), each with its
(st_size, st_mtime_ns). The run's listing then reads no folder (`loaders.sources.image_folder_sources`)
and its structure check stats no file (`loaders.header_table.check_files`).

The children are separate processes, not threads: the listing is Python code that would take turns with
the imports for the interpreter lock, and the kernel's `stat` ran slower from two threads of one process
than from one (measured: 5.4 s against 4.1 s for 1.33 M files), but at full speed from two processes.
Each child sends its answer back pickled through a pipe. Anything wrong with a child (it failed, was
killed, its answer is cut) only means that the run lists and stats the tree itself, as it does without
a survey. A child dies with its run, however the run ends (Linux).

With several processes on a machine each one surveys the whole tree, with fewer children (its share of
the cores): each listed the whole tree before too, but now each also stats every file, where the check
had each stat its share. Those are `stat`s of the same files at once, from the kernel's caches.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import pickle
import signal
import subprocess
import sys
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


def survey_folders(folders: Sequence[Path]) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per class folder, its image files and their int64 (n, 2) (st_size, st_mtime_ns)."""
    out = {}
    for folder in folders:
        found = image_files(folder)
        out[str(folder)] = (found, np.stack(file_stats(found), axis=1))
    return out


class Survey:
    """The child processes surveying `root`: `result()` is their Listing, or None when any of them failed."""

    def __init__(self, root: Path, children: list[subprocess.Popen], started: float):
        self.root, self._children = root, children
        self._started = started  # time.time() when the survey started
        self._result: Listing | None = None
        atexit.register(self.close)  # a run that stops before it asks (a bad recipe) leaves nothing behind

    def result(self) -> Listing | None:
        if self._children:
            merged, finished, failed = {}, self._started, False
            for child in self._children:
                # Each child writes its whole answer at its end, then exits: read it all, then reap it.
                answer = child.stdout.read()
                child.stdout.close()
                if child.wait() != 0 or failed:
                    failed = True
                    continue
                try:
                    folders, child_finished = pickle.loads(answer)  # our own child's answer
                except (pickle.UnpicklingError, EOFError, ValueError, TypeError):
                    failed = True
                    continue
                merged.update(folders)
                finished = max(finished, child_finished)
            self._children = []
            self._result = None if failed else Listing(merged, finished - self._started)
        return self._result

    def close(self) -> None:
        for child in self._children:
            if child.poll() is None:
                child.kill()
            child.stdout.close()
            child.wait()
        self._children = []


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
    repo = str(Path(__file__).resolve().parents[1])
    launched = []
    for n in range(count):
        command = [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from loaders.survey import main; main(sys.argv[2:])",
                   repo, str(root), str(n), str(count), str(os.getpid())]
        # The answer comes back through a pipe, pickled: no file to write, read back and remove (its
        # million path strings load in 0.08 s; the same as an .npz file took 0.27 s to read).
        launched.append(subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL))
    return Survey(root, launched, started)


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
    """A child: `ROOT N COUNT PARENT_PID`. It surveys every COUNT-th class folder of ROOT from the N-th, so
    that train/'s large folders and val/'s small ones are shared out evenly, and writes its answer,
    pickled, to stdout. (A class folder made since the run listed them is listed by the run itself.)"""
    root, n, count, parent_pid = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    _end_with(parent_pid)
    os.nice(NICENESS)
    folders = [d for split in split_folders(root) for d in class_dirs(split)][n::count]
    answer = pickle.dumps((survey_folders(folders), time.time()), protocol=pickle.HIGHEST_PROTOCOL)
    sys.stdout.buffer.write(answer)
    sys.stdout.buffer.flush()
    # The answer is out: the parent waits on this process's exit, not on freeing its million path
    # strings (0.1 s).
    os._exit(0)
