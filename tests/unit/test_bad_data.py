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
from conftest import CLASSES, FAST, REPO
from PIL import Image

from loaders.dali import EvalLoader, TrainLoader
from loaders.headers import BadFile, read_file_header
from loaders.screening import screen
from loaders.sources import image_folder_splits, scan_image_folder
from trainer.__main__ import load_recipe, main
from trainer.launch import run


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


