"""The structure check's cache (`loaders.header_table`): a start on a tree seen before reads no file, a
new or changed file is read again, a deleted one leaves the cache, a broken or foreign cache file is
only a miss, a read-only dataset is no obstacle, and two writers at once leave a loadable cache. The
results are those of the uncached check, file for file."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder

import loaders.header_table as header_table
from loaders.header_table import HeaderTable, cache_file, check_files, load_cache
from loaders.headers import file_headers
from loaders.screening import check_sources, screen
from loaders.sources import image_folder_splits


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_image_folder(tmp_path / "data", {"train": 4, "val": 2})


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every path the check reads (the real `file_headers` still reads them)."""
    read: list[str] = []

    def counted(paths, **kwargs):
        read.extend(paths)
        return file_headers(paths, **kwargs)

    monkeypatch.setattr(header_table, "file_headers", counted)
    return read


def all_files(root: Path) -> list[str]:
    train, val = image_folder_splits(root)
    return list(train.files) + list(val.files)


def same(a: HeaderTable, b: HeaderTable) -> bool:
    return (np.array_equal(a.sizes, b.sizes) and np.array_equal(a.formats, b.formats) and np.array_equal(a.modes, b.modes)
            and a.bad == b.bad)


def test_a_second_check_reads_no_file_and_gives_the_same_table(tree, tmp_path, reads):
    paths, cache = all_files(tree), tmp_path / "cache" / "tree.npz"
    first, report = check_files(paths, tree, cache=cache)
    assert len(reads) == len(paths) == 18 and report.checked == 18 and report.written and cache.is_file()
    reads.clear()
    second, report = check_files(paths, tree, cache=cache)
    assert reads == [] and report.checked == 0 and not report.written
    assert same(first, second) and same(second, HeaderTable.of(file_headers(paths)))


def test_cached_results_are_the_uncached_ones_for_every_kind_of_bad_file(bad_folder, tmp_path, monkeypatch):
    monkeypatch.setenv(header_table.CACHE_ENV, str(tmp_path / "headers"))
    train, val = image_folder_splits(bad_folder)
    for expected_note in ("72 files, 72 read", "72 files, 0 read"):  # cold, then from the cache
        (train_table, val_table), note = check_sources([train, val], bad_folder)
        assert expected_note in note
        findings = []
        for source, table, split in ((train, train_table, "train"), (val, val_table, "val")):
            ours, plain = screen(source, split, table), screen(source, split)
            assert ours.files == plain.files and ours.findings == plain.findings and np.array_equal(ours.sizes, plain.sizes)
            findings += ours.findings
        assert {"truncated", "zero-byte", "not-an-image", "greyscale", "cmyk"} <= {f.kind for f in findings}
    assert len(load_cache(cache_file(bad_folder), bad_folder).table) == 72


def test_a_changed_file_is_read_again(tree, tmp_path, reads):
    paths, cache = all_files(tree), tmp_path / "tree.npz"
    check_files(paths, tree, cache=cache)
    resized, touched = Path(paths[0]), Path(paths[1])
    resized.write_bytes(resized.read_bytes()[:200])  # a new size (and a truncated JPEG)
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the same bytes, a new mtime
    reads.clear()
    table, report = check_files(paths, tree, cache=cache)
    assert sorted(reads) == sorted([str(resized), str(touched)]) and report.checked == 2
    assert table.bad[0][0] == "truncated" and 1 not in table.bad
    reads.clear()
    assert check_files(paths, tree, cache=cache)[1].checked == 0 and reads == []  # and remembered


def test_a_new_file_is_read_and_a_deleted_one_leaves_the_cache(tree, tmp_path, reads):
    cache = tmp_path / "tree.npz"
    check_files(all_files(tree), tree, cache=cache)
    new = tree / "train" / "n01440764" / "new.JPEG"
    shutil.copy(all_files(tree)[5], new)
    gone = Path(all_files(tree)[3])
    gone.unlink()
    reads.clear()
    paths = all_files(tree)
    table, report = check_files(paths, tree, cache=cache)
    assert reads == [str(new)] and report.checked == 1 and report.written
    assert same(table, HeaderTable.of(file_headers(paths)))
    keys = load_cache(cache, tree).keys.decode().split("\0")
    assert "train/n01440764/new.JPEG" in keys and str(gone.relative_to(tree)) not in keys and len(keys) == len(paths)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "another root"])
def test_a_broken_or_foreign_cache_file_is_only_a_miss(tree, tmp_path, reads, damage):
    paths, cache = all_files(tree), tmp_path / "tree.npz"
    check_files(paths, tree, cache=cache)
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    elif damage == "garbage":
        cache.write_bytes(os.urandom(5000))
    elif damage == "empty":
        cache.write_bytes(b"")
    else:  # the cache of another dataset under this one's name
        other = write_image_folder(tmp_path / "other", {"train": 1})
        check_files(all_files(other), other, cache=cache)
    reads.clear()
    table, report = check_files(paths, tree, cache=cache)
    assert report.checked == len(paths) and len(reads) == len(paths)
    assert same(table, HeaderTable.of(file_headers(paths)))
    assert load_cache(cache, tree) is not None  # written anew


def test_a_read_only_dataset_is_checked_and_cached_elsewhere(tree, tmp_path, monkeypatch):
    monkeypatch.setenv(header_table.CACHE_ENV, str(tmp_path / "headers"))
    before = sorted(p for p in tree.rglob("*"))
    for folder in [tree, *[p for p in tree.rglob("*") if p.is_dir()]]:
        folder.chmod(0o555)
    try:
        train, val = image_folder_splits(tree)
        tables, note = check_sources([train, val], tree)
        assert sorted(p for p in tree.rglob("*")) == before  # nothing written into the dataset
        assert cache_file(tree).parent == tmp_path / "headers" and cache_file(tree).is_file()
        assert "18 files, 18 read" in note
        assert "18 files, 0 read" in check_sources([train, val], tree)[1]
    finally:
        for folder in [tree, *[p for p in tree.rglob("*") if p.is_dir()]]:
            folder.chmod(0o755)


def test_a_cache_that_cannot_be_written_warns_and_the_check_goes_on(tree, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    paths = all_files(tree)
    with pytest.warns(UserWarning, match="could not be written"):
        table, report = check_files(paths, tree, cache=tmp_path / "a_file" / "tree.npz")
    assert not report.written and same(table, HeaderTable.of(file_headers(paths)))


def test_the_cache_can_be_turned_off_or_moved(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "imgcls"))
    monkeypatch.delenv(header_table.CACHE_ENV, raising=False)
    assert cache_file(tree).parent == tmp_path / "imgcls" / "headers"
    monkeypatch.setenv(header_table.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert cache_file(tree).parent == tmp_path / "elsewhere"
    assert cache_file(tree) == cache_file(str(tree) + "/")  # one cache per folder, however it is spelled
    monkeypatch.setenv(header_table.CACHE_ENV, "off")
    assert cache_file(tree) is None
    train, val = image_folder_splits(tree)
    assert "no cache" in check_sources([train, val], tree)[1]
    assert not (tmp_path / "imgcls").exists()


def _cold_check(args: tuple[str, str, int]) -> int:
    root, cache, rounds = args
    for _ in range(rounds):
        Path(cache).unlink(missing_ok=True)
        check_files(all_files(Path(root)), root, cache=Path(cache))
    return rounds


def test_two_writers_at_once_leave_a_loadable_cache(tree, tmp_path):
    cache = tmp_path / "shared" / "tree.npz"
    # spawn, not fork: other tests of the session may have started threads (DALI, torch) in this process
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert list(pool.map(_cold_check, [(str(tree), str(cache), 8)] * 2)) == [8, 8]
    cached = load_cache(cache, tree)
    assert cached is not None and len(cached.table) == 18
    assert not list(cache.parent.glob(".tmp-*"))  # no temporary file left behind
    table, report = check_files(all_files(tree), tree, cache=cache)
    assert report.checked == 0 and same(table, HeaderTable.of(file_headers(all_files(tree))))
