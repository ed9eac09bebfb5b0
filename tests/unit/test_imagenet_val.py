"""`python -m trainer prepare-imagenet` on generated miniatures of ImageNet's flat val folder, with each label
file it reads (Kaggle's CSV, the devkit's ground truth with meta.mat, two columns): the images land in their
wnid folders as links, a second run changes nothing, and a folder that does not match its labels is refused
with nothing linked."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from loaders.sources import scan_image_folder
from trainer.__main__ import main

# (wnid, its ILSVRC2012_ID in the devkit) for three real classes. The devkit's IDs do not follow the sorted
# wnids (ID 1 is the kit fox, n02119789, the last of these three in sorted order): a reader that took
# the IDs for positions in the sorted list would put every image in the wrong folder.
CLASSES = {"n02119789": 1, "n01440764": 449, "n01443537": 450}
LABELS = ["n01443537", "n02119789", "n01440764", "n02119789", "n01443537", "n01440764", "n02119789"]  # image 1, 2, ...


def val_name(number: int) -> str:
    return f"ILSVRC2012_val_{number:08d}"


def flat_val(root: Path, count: int = len(LABELS)) -> Path:
    folder = root / "val"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for number in range(1, count + 1):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{val_name(number)}.JPEG")
    return folder


def write_meta(path: Path) -> Path:
    """The devkit's data/meta.mat as scipy writes it: the leaf synsets and one inner node (num_children > 0)."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]
    rows = [(i, wnid, wnid, "", 0, np.zeros(0), 0, 1300) for wnid, i in CLASSES.items()]
    rows.append((1001, "n00001740", "entity", "", 2, np.array([1, 449]), 17, 0))
    synsets = np.array(rows, dtype=[(f, object) for f in fields])
    scipy.io.savemat(path, {"synsets": synsets})
    return path


def label_file(root: Path, kind: str, labels: list[str] = LABELS) -> Path:
    """The label file of `kind` for images 1..len(labels)."""
    if kind == "kaggle":
        rows = [f"{val_name(n)},{wnid} 12 30 200 180 {wnid} 5 5 60 60" for n, wnid in enumerate(labels, 1)]
        path = root / "LOC_val_solution.csv"
        path.write_text("ImageId,PredictionString\n" + "\n".join(rows[::-1]) + "\n")  # any row order
    elif kind == "devkit":
        data = root / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        write_meta(data / "meta.mat")
        path = data / "ILSVRC2012_validation_ground_truth.txt"
        path.write_text("".join(f"{CLASSES[wnid]}\n" for wnid in labels))
    else:
        path = root / "val_labels.txt"
        path.write_text("".join(f"{val_name(n)}.JPEG {wnid}\n" for n, wnid in enumerate(labels, 1)))
    return path


def layout(folder: Path) -> dict[str, tuple[int, ...]]:
    """{relative path: (inode, is symlink)} of everything under `folder`: what a second run must leave alone."""
    return {str(p.relative_to(folder)): (p.lstat().st_ino, p.is_symlink()) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("kind", ["kaggle", "devkit", "two-column"])
def test_each_label_file_links_the_images_into_wnid_folders_once(tmp_path, capsys, kind):
    val = flat_val(tmp_path)
    labels = label_file(tmp_path, kind)
    assert main(["prepare-imagenet", str(val), "--labels", str(labels)]) == 0
    out = capsys.readouterr().out
    assert f"linked 7 of 7 images into 3 class folders of {val} (hard links" in out
    for number, wnid in enumerate(LABELS, 1):
        linked = val / wnid / f"{val_name(number)}.JPEG"
        original = val / f"{val_name(number)}.JPEG"
        assert linked.is_file() and not linked.is_symlink()
        assert linked.stat().st_ino == original.stat().st_ino  # a hard link: the same file, no copy
    source = scan_image_folder(val)  # what training reads: the class folders, not the flat files beside them
    assert source.classes == tuple(sorted(CLASSES)) and len(source) == 7
    assert dict(zip(*np.unique(source.labels, return_counts=True))) == {0: 2, 1: 2, 2: 3}

    before = layout(val)
    assert main(["prepare-imagenet", str(val), "--labels", str(labels)]) == 0
    assert capsys.readouterr().out.strip() == f"nothing to do: all 7 images are already in 3 class folders of {val}"
    assert layout(val) == before


def test_other_filesystem_gets_symlinks_and_an_interrupted_run_is_finished(tmp_path, capsys):
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's folder")
    val = flat_val(tmp_path)
    labels = label_file(tmp_path, "kaggle")
    out = Path(tempfile.mkdtemp(dir="/dev/shm")) / "val"
    try:
        assert main(["prepare-imagenet", str(val), "--labels", str(labels), "--out", str(out)]) == 0
        assert "(symlinks;" in capsys.readouterr().out
        linked = out / "n01443537" / f"{val_name(1)}.JPEG"
        assert linked.is_symlink() and linked.resolve() == (val / f"{val_name(1)}.JPEG").resolve()
        assert sorted(p.name for p in val.iterdir()) == sorted(f"{val_name(n)}.JPEG" for n in range(1, 8))  # VAL_DIR untouched
        # As a kill leaves it: one class folder gone, one half built under its temporary name, a link missing.
        shutil.rmtree(out / "n01440764")
        (out / ".tmp-n01440764").mkdir()
        (out / "n02119789" / f"{val_name(2)}.JPEG").unlink()
        assert main(["prepare-imagenet", str(val), "--labels", str(labels), "--out", str(out)]) == 0
        assert "linked 3 of 7 images" in capsys.readouterr().out
        assert sorted(p.name for p in out.iterdir()) == sorted(CLASSES)
        assert len(scan_image_folder(out)) == 7
    finally:
        shutil.rmtree(out.parent)


@pytest.mark.parametrize("kind", ["kaggle", "devkit", "two-column"])
def test_a_folder_that_does_not_match_its_labels_is_refused_whole(tmp_path, capsys, kind):
    val = flat_val(tmp_path, count=8)  # image 8 has no label
    (val / f"{val_name(3)}.JPEG").unlink()  # image 3 is labelled but missing
    labels = label_file(tmp_path, kind)
    assert main(["prepare-imagenet", str(val), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {val} does not match {labels}") and err.count("\n") == 1
    assert f"1 labelled images are not in {val} ({val_name(3)})" in err
    assert f"1 images of {val} have no label ({val_name(8)}.JPEG)" in err
    assert "Nothing was linked" in err
    assert not [p for p in val.iterdir() if p.is_dir()]


def test_unknown_wnids_are_refused_with_counts_and_examples(tmp_path, capsys):
    val = flat_val(tmp_path)
    labels = label_file(tmp_path, "kaggle", ["n99999999", "n99999999", "n01440764", "cat", *LABELS[4:]])
    assert main(["prepare-imagenet", str(val), "--labels", str(labels)]) == 2
    err = capsys.readouterr().err
    assert "2 wnids are not ImageNet-1k classes (cat (1 images), n99999999 (2 images))" in err
    assert not [p for p in val.iterdir() if p.is_dir()]


def test_label_file_problems_are_named(tmp_path, capsys):
    val = flat_val(tmp_path)
    ground_truth = label_file(tmp_path, "devkit")
    (ground_truth.parent / "meta.mat").unlink()
    assert main(["prepare-imagenet", str(val), "--labels", str(ground_truth)]) == 2
    err = capsys.readouterr().err
    assert "whose wnids are in the devkit's meta.mat" in err and "pass --meta" in err
    meta = write_meta(tmp_path / "elsewhere.mat")
    assert main(["prepare-imagenet", str(val), "--labels", str(ground_truth), "--meta", str(meta)]) == 0
    assert (val / "n02119789" / f"{val_name(2)}.JPEG").is_file()  # ID 1: the kit fox

    numbers = tmp_path / "caffe_val.txt"
    numbers.write_text("".join(f"{val_name(n)}.JPEG {n % 3}\n" for n in range(1, 8)))
    assert main(["prepare-imagenet", str(val), "--labels", str(numbers)]) == 2
    assert "gives class numbers, not wnids" in capsys.readouterr().err
    other = tmp_path / "notes.txt"
    other.write_text("some words on a line\n")
    assert main(["prepare-imagenet", str(val), "--labels", str(other)]) == 2
    assert "is none of the label files read here" in capsys.readouterr().err
    twice = label_file(tmp_path, "two-column")
    twice.write_text(twice.read_text() + f"{val_name(1)}.JPEG n01440764\n")
    assert main(["prepare-imagenet", str(val), "--labels", str(twice)]) == 2
    assert f"labels 1 images more than once ({val_name(1)})" in capsys.readouterr().err
