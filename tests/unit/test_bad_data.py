"""Bad data, injected for real (`bad_files`): `check-data` reports each kind with its path and exit code,
the structural check knows what DALI rejects, converted files decode to their RGB versions' pixels, the
loaders replace files that fail only in the decoder, and data.bad_files=stop stops before training."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
from pathlib import Path

import bad_files
import numpy as np
import pytest
from bad_files import BIT_ROT, CONVERTED, KEPT, SKIPPED, by_name
from conftest import CLASSES, FAST, REPO, write_image_folder
from PIL import Image

from loaders.dali import EvalLoader, TrainLoader
from loaders.headers import BadFile, read_file_header
from loaders.screening import screen
from loaders.sources import DataError, image_folder_sources, image_folder_splits, scan_image_folder
from trainer.__main__ import load_recipe, main
from trainer.data import load_splits
from trainer.launch import run
from trainer.recipe import Data, Phase, Recipe


def check_data(capsys, *args: str) -> tuple[int, str]:
    """`python -m trainer check-data ARGS`, in this process: (exit status, stdout)."""
    try:
        status = main(["check-data", *args])
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().out


def test_check_data_reports_every_kind_with_its_path(bad_folder, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(bad_folder, root)
    (root / "train" / "n09999999").mkdir()  # a class folder left empty
    (root / "val" / "n08888888").mkdir()  # a class only val has
    bad_files.photo(7).save(root / "val" / "n08888888" / "stray.JPEG")

    status, out = check_data(capsys, str(root), "--json")
    assert status == 2  # unusable as it is: a run would stop
    report = json.loads(out)
    found = by_name(report["findings"])
    expected = {**SKIPPED, **BIT_ROT, **CONVERTED, **KEPT, "n09999999": "empty-class", "n08888888": "val-only-class"}
    assert set(expected.items()) <= found, set(expected.items()) - found
    assert not {name for name, _ in found} - set(expected)  # nothing good reported
    duplicate = next(f for f in report["findings"] if f["kind"] == "duplicate")
    assert duplicate["path"] == str(root / "val" / CLASSES[0] / "copy.JPEG")
    assert duplicate["detail"] == f"same bytes as {root / 'train' / CLASSES[0] / (CLASSES[0] + '_1.JPEG')}"
    assert report["counts"]["truncated"] == 2 and report["images"] == {"train": 57, "val": 16}

    status, table = check_data(capsys, str(root), "--show", "1")
    assert status == 2
    assert re.search(r"^empty-class +1  stops the run$", table, re.M)
    assert re.search(r"^truncated +2  skipped$", table, re.M)
    assert re.search(r"^cmyk +1  converted to RGB$", table, re.M)
    assert f"  {root / 'train' / CLASSES[0] / 'empty.JPEG'}  (the file is empty (0 bytes))" in table
    assert "... and 1 more" in table  # the second truncated file, under --show 1


def test_check_data_exit_codes(bad_folder, tiny_imagenet, capsys):
    status, out = check_data(capsys, str(bad_folder), "--structure-only", "--json")
    assert status == 1  # a run copes: skips, converts, trains on the rest
    kinds = set(json.loads(out)["counts"])
    assert "undecodable" not in kinds and {"truncated", "cmyk", "duplicate"} <= kinds  # headers only: bit rot passes
    status, out = check_data(capsys, str(tiny_imagenet))
    assert status == 0 and "no problems found" in out
    status, out = check_data(capsys, str(bad_folder / "nope"))
    assert status == 2 and "no-data" in out


def test_check_data_reports_a_test_folder_as_the_run_reads_it(tmp_path, capsys, monkeypatch):
    """A test/ folder beside train/ and val/: its images, bad files, duplicates, per-class counts and ratio,
    the same test images a run keeps (load_splits), and no imbalance hint from test alone (as run.json)."""
    monkeypatch.setenv("IMGCLS_HEADER_CACHE", "off")
    root = write_image_folder(tmp_path / "data", {"train": 4, "val": 2, "test": 4})
    for wnid, keep in zip(CLASSES, (4, 2, 1)):  # test: 4, 2, 1 per class
        for extra in sorted((root / "test" / wnid).iterdir())[keep:]:
            extra.unlink()
    cut = root / "test" / CLASSES[2] / "cut.JPEG"
    cut.write_bytes((root / "test" / CLASSES[2] / f"{CLASSES[2]}_0.JPEG").read_bytes()[:300])
    copy = root / "test" / CLASSES[1] / "copy.JPEG"
    shutil.copyfile(root / "train" / CLASSES[1] / f"{CLASSES[1]}_3.JPEG", copy)

    status, out = check_data(capsys, str(root), "--json")
    assert status == 1  # a run copes: skips the cut file, scores the copy
    report = json.loads(out)
    assert report["layout"] == "train/val/test" and report["images"] == {"train": 12, "val": 6, "test": 9}
    assert {(f["kind"], f["split"], f["path"]) for f in report["findings"]} == {
        ("truncated", "test", str(cut)), ("duplicate", "test", str(copy))}
    test_counts = {CLASSES[0]: 4, CLASSES[1]: 3, CLASSES[2]: 1}  # usable images: the cut file does not count
    assert report["class_balance"]["test"] == {"counts": test_counts, "ratio": 4.0}
    assert report["class_balance"]["train"]["ratio"] == report["class_balance"]["val"]["ratio"] == 1.0
    assert report["imbalance_hint"] is None  # test trains and selects nothing: run.json hints on train and val
    run_test = load_splits(Recipe(name="t", data=Data(path=str(root)), phases=(Phase(epochs=1),))).test
    assert run_test.class_counts() == test_counts and str(cut) not in run_test.files

    status, table = check_data(capsys, str(root), "--structure-only")
    lines = table.splitlines()
    assert lines[0] == f"{root}: train/val/test, 3 classes, 12 train, 6 val, 9 test images (structure only, not decoded)"
    assert f"test: imbalance ratio 4.0 (largest/smallest class); per class: {CLASSES[0]} 4, {CLASSES[1]} 3, {CLASSES[2]} 1" in lines
    assert not any(line.startswith("hint:") for line in lines)
    assert re.search(r"^truncated +1  skipped$", table, re.M) and re.search(r"^duplicate +1  trained on as is$", table, re.M)
    assert f"  {copy}  (same bytes as {root / 'train' / CLASSES[1] / (CLASSES[1] + '_3.JPEG')})" in lines


def test_check_data_stops_on_a_test_folder_a_run_refuses(tmp_path, capsys):
    """A class only test/ has, an empty test class folder, a test/ without class folders: exit 2, as a run
    stops on each (loaders.sources.image_folder_sources)."""
    root = write_image_folder(tmp_path / "data", {"train": 2, "val": 1, "test": 1})
    (root / "test" / "n07777777").mkdir()
    bad_files.photo(3).save(root / "test" / "n07777777" / "stray.JPEG")
    (root / "test" / "n06666666").mkdir()  # train has no such class either: reported as test-only and empty
    status, out = check_data(capsys, str(root), "--json", "--structure-only")
    assert status == 2
    found = {(f["kind"], f["path"]) for f in json.loads(out)["findings"]}
    assert found == {("test-only-class", str(root / "test" / "n07777777")), ("test-only-class", str(root / "test" / "n06666666")),
                     ("empty-class", str(root / "test" / "n06666666"))}
    status, table = check_data(capsys, str(root), "--structure-only")
    assert re.search(r"^test-only-class +2  stops the run$", table, re.M)
    assert "test-only-class (a class folder in test that train does not have): 2" in table
    with pytest.raises(DataError, match="test has class folders that train does not have"):
        image_folder_sources(root)

    shutil.rmtree(root / "test")
    (root / "test").mkdir()
    status, out = check_data(capsys, str(root), "--json", "--structure-only")
    assert status == 2
    assert [(f["kind"], f["split"], f["path"]) for f in json.loads(out)["findings"]] == [("no-data", "test", str(root / "test"))]
    with pytest.raises(DataError, match="has no class folders"):
        image_folder_sources(root)


def test_structural_check_knows_what_dali_rejects(bad_folder):
    """Each kind as the header check sees it; the bit-rotted PNG is the one it cannot see."""
    files = {p.name: p for p in bad_folder.rglob("*") if p.is_file()}
    for name, kind in SKIPPED.items():
        with pytest.raises(BadFile) as caught:
            read_file_header(files[name])
        assert caught.value.kind == kind, name
    for name, mode in CONVERTED.items():
        assert read_file_header(files[name]).mode == mode
    for name in BIT_ROT:
        assert read_file_header(files[name]).mode == ""
    # A JPEG with bytes after its end marker (camera trailers) decodes in DALI: not truncated.
    trailing = files[f"{CLASSES[0]}_2.JPEG"].read_bytes() + b"\0" * 3000
    path = bad_folder.parent / "trailing.jpg"
    path.write_bytes(trailing)
    assert read_file_header(path).format == "jpeg"


def test_converted_files_decode_like_their_rgb_versions(tmp_path):
    """Greyscale, CMYK, 16-bit, palette and alpha files give the pixels of their RGB equivalents."""
    photo = bad_files.photo(8, size=(48, 48))
    grey = photo.convert("L")
    pairs = {  # the file as stored -> the same picture as plain 8-bit RGB
        "cmyk.jpg": (bad_files.encoded(photo.convert("CMYK"), "JPEG", quality=100), None),
        "grey.png": (bad_files.encoded(grey, "PNG"), grey.convert("RGB")),
        "grey16.png": (bad_files.encoded(Image.fromarray(np.asarray(grey, np.uint16) * 257), "PNG"), grey.convert("RGB")),
        "palette.png": (bad_files.encoded(photo.convert("P"), "PNG"), photo.convert("P").convert("RGB")),
        "alpha.png": (bad_files.encoded(photo.convert("RGBA"), "PNG"), photo),
    }
    for name, (stored, _) in pairs.items():
        (tmp_path / "stored" / "x").mkdir(parents=True, exist_ok=True)
        (tmp_path / "stored" / "x" / name).write_bytes(stored)
        (tmp_path / "rgb" / "x").mkdir(parents=True, exist_ok=True)
        reference = pairs[name][1] or Image.open(io.BytesIO(stored)).convert("RGB")
        reference.save(tmp_path / "rgb" / "x" / (name + ".png"))

    def decoded(folder: Path) -> np.ndarray:
        loader = EvalLoader(scan_image_folder(folder), batch_size=5, res_px=48, crop_fraction=1.0, decode_device="cpu")
        return next(iter(loader))[0].numpy()

    stored, reference = decoded(tmp_path / "stored"), decoded(tmp_path / "rgb")
    assert stored.shape == (5, 3, 48, 48)
    # Normalised units (1 = one std, ~58 grey levels): within rounding of the JPEG colour conversion.
    assert np.abs(stored - reference).max(axis=(1, 2, 3)).tolist() == pytest.approx([0] * 5, abs=0.05)


def test_loaders_survive_files_that_fail_only_in_the_decoder(bad_folder, caplog):
    """Bit rot passes the header check; the loaders replace it when DALI fails, and carry on in lockstep."""
    train, val = image_folder_splits(bad_folder)
    train, val = screen(train, "train"), screen(val, "val")
    assert len(train) == 54 and len(val) == 14  # the header check dropped the 4 SKIPPED files

    def one_epoch() -> list:
        loader = TrainLoader(train, batch_size=6, seed=0, res_px_for_epoch=lambda epoch: 32, decode_device="cpu")
        return [(images.numpy(), labels.tolist()) for images, labels in loader.epoch_batches(0)]

    with caplog.at_level(logging.WARNING, logger="loaders.recovery"):
        first = one_epoch()
    assert len(first) == 9 and all(images.shape == (6, 3, 32, 32) for images, _ in first)  # 54 / 6: none lost
    replaced = [r.getMessage() for r in caplog.records if "bad training file replaced" in r.getMessage()]
    assert len(replaced) == 1 and str(bad_folder / "train" / CLASSES[2] / "bitrot.png") in replaced[0]
    again = one_epoch()  # the recovery replays exactly: same pixels, same labels
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again))

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loaders.recovery"):
        labels = [label for _, batch in EvalLoader(val, batch_size=4, res_px=32, decode_device="cpu") for label in batch.tolist()]
    assert len(labels) == 16 and labels.count(-1) == 3  # 14 files, 2 padding, the bit-rotted one not scored
    assert any(str(bad_folder / "val" / CLASSES[2] / "bitrot_val.png") in r.getMessage() for r in caplog.records)


def test_stop_policy_exits_2_before_training_with_the_list(bad_folder, tmp_path, capsys):
    # run() as `python recipes/quickstart.py ...` calls it, in this process (it stops before any import-heavy work).
    run_dir = tmp_path / "run"
    sets = FAST + ["phases.0.epochs=1", "phases.0.warmup_epochs=0", "logging.wandb=false", "data.bad_files=stop"]
    with pytest.raises(SystemExit) as stopped:
        run(load_recipe(str(REPO / "recipes" / "quickstart.py")), ["--data", str(bad_folder), "--run-dir", str(run_dir),
                                                                    *(arg for item in sets for arg in ("--set", item))])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "4 bad image file(s) and data.bad_files='stop'" in err
    for name, kind in SKIPPED.items():
        assert any(name in line and f"({kind}:" in line for line in err.splitlines()), name
    assert not run_dir.exists()  # stopped before the run folder, the model or a step


