"""A recipe command's start. The survey (`loaders.survey`): child processes list and stat a dataset while the
run imports torch. They list what the run's own listing would, file for file (hidden files, other
suffixes, nested and symlinked folders), the sources built from their listing are those of a fresh one,
the structure check then stats and reads nothing on a tree seen before and still sees a changed file, a
survey that failed or was closed gives nothing, so that the run lists the tree itself, and a killed run
leaves no child behind. The imports themselves run without the garbage collector and are frozen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, REPO, write_image_folder

import loaders.header_table as header_table
import loaders.survey as survey
from loaders.headers import file_headers
from loaders.screening import check_sources
from loaders.sources import class_dirs, image_files, image_folder_sources
from loaders.survey import start_survey
from trainer import Data, Phase, Recipe
from trainer.command_line import early_survey, parse_args


@pytest.fixture
def odd_tree(tmp_path) -> Path:
    """train/ and val/ with what a listing must leave out or follow: hidden and non-image files, an upper-case
    suffix, a nested folder (listed) and a symlinked one (not followed), a hidden class folder."""
    root = write_image_folder(tmp_path / "data", {"train": 3, "val": 2})
    first = root / "train" / CLASSES[0]
    (first / ".hidden.JPEG").write_bytes((first / f"{CLASSES[0]}_0.JPEG").read_bytes())
    (first / "notes.txt").write_text("not an image")
    (first / "UPPER.JPG").write_bytes((first / f"{CLASSES[0]}_1.JPEG").read_bytes())
    (first / "nested").mkdir()
    (first / "nested" / "deep.jpeg").write_bytes((first / f"{CLASSES[0]}_2.JPEG").read_bytes())
    (first / "linked").symlink_to(first / "nested")
    (root / "train" / ".cache").mkdir()
    (root / "train" / ".cache" / "x.jpg").write_bytes(b"x")
    return root


def _stats(files: list[str]) -> list[list[int]]:
    return [[os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files]


def test_survey_lists_and_stats_what_the_run_would(odd_tree):
    listing = start_survey(odd_tree, children=2).result()
    folders = [d for split in ("train", "val") for d in class_dirs(odd_tree / split)]
    assert sorted(listing.folders) == sorted(str(d) for d in folders)  # .cache is hidden: not a class
    for folder in folders:
        files, stats = listing.get(folder)
        assert files == image_files(folder)
        assert stats.dtype == np.int64 and stats.tolist() == _stats(files)
    first = listing.get(odd_tree / "train" / CLASSES[0])[0]
    names = [os.path.relpath(f, odd_tree / "train" / CLASSES[0]) for f in first]
    assert "UPPER.JPG" in names and os.path.join("nested", "deep.jpeg") in names
    assert not any(n.startswith((".hidden", "notes", "linked")) for n in names)
    assert listing.files == sum(len(image_files(d)) for d in folders) == 3 * 3 + 2 + 3 * 2


@pytest.mark.parametrize("layout", ["train/val", "train/val/test", "one folder"])
def test_sources_from_a_survey_are_those_of_a_fresh_listing(tmp_path, layout):
    if layout == "one folder":
        root = write_image_folder(tmp_path, {"all": 6}) / "all"
    else:
        root = write_image_folder(tmp_path / "data", {"train": 5, "val": 2, **({"test": 2} if "test" in layout else {})})
    test_fraction = 0.2 if layout == "one folder" else 0.0
    listing = start_survey(root, children=2).result()
    surveyed = image_folder_sources(root, 0.2, test_fraction, 3, listing=listing)
    fresh = image_folder_sources(root, 0.2, test_fraction, 3)
    assert (surveyed[2] is not None) == (fresh[2] is not None) == (layout != "train/val")  # a test split where asked
    for a, b in zip(surveyed[: 2 if layout == "train/val" else 3], fresh):
        assert a.files == b.files and a.classes == b.classes and a.labels.tolist() == b.labels.tolist()
        assert b.file_stats is None  # no survey: the check stats the files itself
        assert a.file_stats.tolist() == _stats(list(a.files))


def test_check_with_survey_stats_reads_nothing_on_a_seen_tree_and_sees_a_change(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "data", {"train": 4, "val": 2})
    monkeypatch.setenv("IMGCLS_HEADER_CACHE", str(tmp_path / "headers"))
    read, stat = [], []
    monkeypatch.setattr(header_table, "file_headers", lambda paths, **kw: read.extend(paths) or file_headers(paths, **kw))
    monkeypatch.setattr(header_table, "file_stats", lambda paths: stat.extend(paths) or survey.file_stats(paths))

    fresh_tables, _ = check_sources(list(image_folder_sources(root, 0.2)[:2]), root)  # fills the cache
    assert len(read) == len(stat) == 3 * 6
    read.clear(), stat.clear()
    sources = list(image_folder_sources(root, 0.2, listing=start_survey(root).result())[:2])
    tables, note = check_sources(sources, root)
    assert read == [] and stat == []  # neither read nor stat'ed: the survey's stats matched the cache
    assert "0 read, 18 from the cache" in note
    for a, b in zip(tables, fresh_tables):
        assert a.sizes.tolist() == b.sizes.tolist() and a.formats.tolist() == b.formats.tolist()

    changed = root / "val" / CLASSES[1] / f"{CLASSES[1]}_0.JPEG"
    changed.write_bytes(changed.read_bytes() + b"\0" * 7)  # a new size: read again
    sources = list(image_folder_sources(root, 0.2, listing=start_survey(root).result())[:2])
    check_sources(sources, root)
    assert read == [str(changed)] and stat == []


def test_a_closed_or_failed_survey_gives_nothing_and_the_run_lists_itself(tmp_path, monkeypatch):
    root = write_image_folder(tmp_path / "data", {"train": 2, "val": 1})
    closed = start_survey(root)
    closed.close()
    assert closed.result() is None

    monkeypatch.setattr(sys, "executable", "/bin/false")  # every child exits 1 at once
    failed = start_survey(root)
    assert failed.result() is None
    train, val, _ = image_folder_sources(root, 0.2, listing=failed.result())
    assert len(train) == 6 and train.file_stats is None


def test_no_survey_where_there_is_no_folder_to_list(tmp_path):
    assert start_survey(tmp_path / "missing") is None
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"")
    assert start_survey(tmp_path / "flat") is None  # no class folders: the run says what is wrong


def test_a_recipe_starts_its_survey_only_for_a_folder(tmp_path):
    root = write_image_folder(tmp_path / "data", {"train": 2, "val": 1})
    recipe = Recipe(name="t", data=Data(path="builtin:digits"), phases=(Phase(name="main", epochs=1),))

    assert early_survey(recipe, parse_args([])) is None  # the built-in digits: written on first use, not listed
    assert early_survey(recipe, parse_args(["--data", "hf:some/dataset"])) is None
    assert early_survey(recipe, parse_args(["--data", str(root), "--set", "phases.0.epochz=1"])) is None  # the run reports the typo
    started = early_survey(recipe, parse_args(["--data", str(root)]))
    assert started is not None and started.root == root
    assert started.result().files == 9


def _stopped_recipe_command(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -c code --data TREE --run-dir A_FILE`: a recipe command on a small tree that stops, after its
    imports and its listing, at its --run-dir, a file (exit 2, as any bad argument)."""
    root = write_image_folder(tmp_path / "data", {"train": 2, "val": 1})
    (tmp_path / "a-file").write_text("")
    done = subprocess.run([sys.executable, "-c", code, "--data", str(root), "--run-dir", str(tmp_path / "a-file")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    return done


def test_a_recipe_command_starts_its_survey_before_importing_torch(tmp_path):
    """`trainer.run` starts the survey, then imports torch, timm and DALI (here the run then stops at its
    --run-dir, a file: exit 2, as any bad argument)."""
    code = (
        "import sys\n"
        "import loaders.survey as survey\n"
        "started = survey.start_survey\n"
        "def recorded(root, *a, **k):\n"
        "    print('torch loaded at the survey start:', 'torch' in sys.modules, flush=True)\n"
        "    return started(root, *a, **k)\n"
        "survey.start_survey = recorded\n"
        "import trainer.command_line\n"
        "trainer.command_line.start_survey = recorded\n"
        "from recipes.quickstart import RECIPE\n"
        "from trainer import run\n"
        "run(RECIPE, sys.argv[1:])\n"
    )
    done = _stopped_recipe_command(code, tmp_path)
    assert "torch loaded at the survey start: False" in done.stdout
    assert "is a file, not a folder" in done.stderr


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; nobody may be there to reap it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_survey_child_ends_with_the_run(tmp_path):
    """A run killed outright (SIGKILL: no atexit) leaves no survey child running on: the kernel ends it."""
    child_code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from loaders.survey import _end_with; "
                  "_end_with(int(sys.argv[1])); print('ready', flush=True); time.sleep(120)")
    run_code = (
        "import os, subprocess, sys\n"
        f"child = subprocess.Popen([sys.executable, '-c', {child_code!r}, str(os.getpid())], stdout=subprocess.PIPE, text=True)\n"
        "assert child.stdout.readline().strip() == 'ready'\n"
        "print(child.pid, flush=True)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    done = subprocess.run([sys.executable, "-c", run_code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr[-2000:]
    child = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_a_recipe_command_imports_without_the_collector_and_freezes_the_imports(tmp_path):
    """Importing torch, timm and DALI runs without the garbage collector, and a command freezes what they
    built before the collector runs again: no collection walks those objects (0.8 s of a 3.0 s import,
    then 0.27 s for the first collection after it, here)."""
    code = (
        "import gc, json, sys\n"
        "seen = []\n"
        "gc.callbacks.append(lambda phase, info: phase == 'start' and seen.append(('torch' in sys.modules, gc.get_freeze_count())))\n"
        "import atexit\n"
        "atexit.register(lambda: print('COLLECTIONS ' + json.dumps(seen), flush=True))\n"
        "from recipes.quickstart import RECIPE\n"
        "from trainer import run\n"
        "sys.argv = ['quickstart.py', *sys.argv[1:]]\n"
        "run(RECIPE)\n"
    )
    done = _stopped_recipe_command(code, tmp_path)
    seen = json.loads(done.stdout.split("COLLECTIONS ", 1)[1])
    after_torch = [frozen for torch_loaded, frozen in seen if torch_loaded]
    assert after_torch, "the run collects at some point"
    assert min(after_torch) > 100_000  # every collection once torch was imported: with the imports frozen
