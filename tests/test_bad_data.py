"""Bad data, injected for real: files a scraper, a camera or a failing disk leaves behind, written into a
small ImageFolder, then found by `check-data` and survived (skipped, converted, or stopped on) by training."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASSES, FAST, REPO, run_recipe, two_cpu_launcher, write_image_folder
from PIL import Image

from loaders.checks import BadFile, read_file_header, screen
from loaders.dali import EvalLoader, TrainLoader
from loaders.sources import image_folder_splits, scan_image_folder
from trainer.__main__ import load_recipe, main
from trainer.run import run

# Bad files: a run skips them before it starts (or stops on them with data.bad_files=stop).
SKIPPED = {
    "cut.JPEG": "truncated",  # a download cut off halfway
    "empty.JPEG": "zero-byte",
    "notes.jpg": "not-an-image",  # an HTML error page saved under an image name
    "cut_val.JPEG": "truncated",
}
# Passes the header check, fails in the decoder: replaced at run time, logged with its path.
BIT_ROT = {"bitrot.png": "undecodable", "bitrot_val.png": "undecodable"}
CONVERTED = {"print.jpg": "cmyk", "scan.JPEG": "greyscale", "depth.png": "16-bit"}
KEPT = {"panorama.jpg": "huge", "icon.jpg": "tiny", "copy.JPEG": "duplicate"}


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kwargs)
    return out.getvalue()


def _photo(seed: int, size=(60, 44)) -> Image.Image:
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    rng = np.random.default_rng(seed)
    pixels = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1) + rng.normal(0, 8, (size[1], size[0], 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _bit_rot_png(image: Image.Image) -> bytes:
    """A PNG whose chunks are intact but whose image data had bytes flipped (its CRC no longer matches)."""
    data = bytearray(_encoded(image, "PNG"))
    start = data.find(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    for k in range(start + length // 3, start + length // 3 + 40):
        data[k] ^= 0x5A
    return bytes(data)


def inject_file_faults(root: Path) -> None:
    """The files of SKIPPED, BIT_ROT, CONVERTED and KEPT, written into root/train and root/val."""
    a, b, c = (root / "train" / name for name in CLASSES)
    good = (a / f"{CLASSES[0]}_0.JPEG").read_bytes()
    (a / "cut.JPEG").write_bytes(good[: len(good) // 2])
    (a / "empty.JPEG").write_bytes(b"")
    (a / "notes.jpg").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>\n")
    (a / "print.jpg").write_bytes(_encoded(_photo(1).convert("CMYK"), "JPEG", quality=95))
    (b / "scan.JPEG").write_bytes(_encoded(_photo(2).convert("L"), "JPEG", quality=95))
    grey = np.asarray(_photo(3).convert("L"), dtype=np.uint16) * 257
    (b / "depth.png").write_bytes(_encoded(Image.fromarray(grey), "PNG"))  # mode I;16
    # 7100 x 7100 = 50.4 MP; one flat colour, so 0.8 MB on disk.
    Image.new("RGB", (7100, 7100), (20, 150, 90)).save(c / "panorama.jpg", quality=50)
    _photo(4, size=(4, 4)).save(c / "icon.jpg")
    (c / "bitrot.png").write_bytes(_bit_rot_png(_photo(5)))
    val = root / "val"
    val_good = (val / CLASSES[1] / f"{CLASSES[1]}_0.JPEG").read_bytes()
    (val / CLASSES[1] / "cut_val.JPEG").write_bytes(val_good[: len(val_good) * 2 // 3])
    (val / CLASSES[2] / "bitrot_val.png").write_bytes(_bit_rot_png(_photo(6)))
    shutil.copy(a / f"{CLASSES[0]}_1.JPEG", val / CLASSES[0] / "copy.JPEG")  # a train image leaked into val


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory) -> Path:
    """48 train + 12 val good JPEGs, then every file fault: 57 train files (54 usable), 15 val (14)."""
    root = write_image_folder(tmp_path_factory.mktemp("bad-data"), {"train": 16, "val": 4})
    inject_file_faults(root)
    return root


def check_data(capsys, *args: str) -> tuple[int, str]:
    """`python -m trainer check-data ARGS`, in this process: (exit status, stdout)."""
    try:
        status = main(["check-data", *args])
    except SystemExit as exit:
        status = exit.code
    return status, capsys.readouterr().out


def by_name(findings: list[dict]) -> set[tuple[str, str]]:
    return {(Path(f["path"]).name, f["kind"]) for f in findings}


def test_check_data_reports_every_kind_with_its_path(bad_folder, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(bad_folder, root)
    (root / "train" / "n09999999").mkdir()  # a class folder left empty
    (root / "val" / "n08888888").mkdir()  # a class only val has
    _photo(7).save(root / "val" / "n08888888" / "stray.JPEG")

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
    photo = _photo(8, size=(48, 48))
    grey = photo.convert("L")
    pairs = {  # the file as stored -> the same picture as plain 8-bit RGB
        "cmyk.jpg": (_encoded(photo.convert("CMYK"), "JPEG", quality=100), None),
        "grey.png": (_encoded(grey, "PNG"), grey.convert("RGB")),
        "grey16.png": (_encoded(Image.fromarray(np.asarray(grey, np.uint16) * 257), "PNG"), grey.convert("RGB")),
        "palette.png": (_encoded(photo.convert("P"), "PNG"), photo.convert("P").convert("RGB")),
        "alpha.png": (_encoded(photo.convert("RGBA"), "PNG"), photo),
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

    with caplog.at_level(logging.WARNING, logger="loaders.dali"):
        first = one_epoch()
    assert len(first) == 9 and all(images.shape == (6, 3, 32, 32) for images, _ in first)  # 54 / 6: none lost
    replaced = [r.getMessage() for r in caplog.records if "bad training file replaced" in r.getMessage()]
    assert len(replaced) == 1 and str(bad_folder / "train" / CLASSES[2] / "bitrot.png") in replaced[0]
    again = one_epoch()  # the recovery replays exactly: same pixels, same labels
    assert all(np.array_equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again))

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loaders.dali"):
        labels = [label for _, batch in EvalLoader(val, batch_size=4, res_px=32, decode_device="cpu") for label in batch.tolist()]
    assert len(labels) == 16 and labels.count(-1) == 3  # 14 files, 2 padding, the bit-rotted one not scored
    assert any(str(bad_folder / "val" / CLASSES[2] / "bitrot_val.png") in r.getMessage() for r in caplog.records)


def test_training_skips_bad_files_converts_the_rest_and_logs_them(bad_folder, tmp_path, run_env):
    run_dir = tmp_path / "run"
    sets = FAST + ["phases.0.epochs=1", "phases.0.warmup_epochs=0", "phases.0.batch_size_per_device=6", "logging.wandb=false"]
    done = run_recipe("quickstart.py", "--data", str(bad_folder), "--run-dir", str(run_dir), env=run_env, sets=sets)
    assert done.returncode == 0, done.stderr[-4000:]

    info = json.loads((run_dir / "run.json").read_text())
    assert (info["train_images"], info["val_images"]) == (54, 14)  # the 4 SKIPPED files left out, nothing else
    record = json.loads((run_dir / "bad_files.json").read_text())
    assert record["policy"] == "skip"
    assert by_name(record["skipped"]) == set(SKIPPED.items())
    assert record["converted"] == {"cmyk": 1, "greyscale": 1, "16-bit": 1}
    assert record["kept"] == {"huge": 1, "tiny": 1}
    assert "bad files: skipped 4 (truncated 2, zero-byte 1, not-an-image 1)" in done.stdout
    assert str(bad_folder / "train" / CLASSES[0] / "empty.JPEG") in done.stdout
    assert "converted to RGB by the decoder: 3 files" in done.stdout
    # Bit rot surfaced in the decoder mid-epoch: replaced and logged with its path, not a crash.
    assert f"bad training file replaced: {bad_folder / 'train' / CLASSES[2] / 'bitrot.png'}" in done.stderr
    assert f"bad val file replaced: {bad_folder / 'val' / CLASSES[2] / 'bitrot_val.png'}" in done.stderr
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(history) == 1 and history[0]["val_samples"] == 13  # the bit-rotted val file is not scored


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


def test_two_processes_train_through_bad_files(bad_folder, tmp_path, run_env):
    launcher = two_cpu_launcher(29541)
    env = {**run_env, "ACCELERATE_USE_CPU": "1"}
    run_dir = tmp_path / "ddp"
    sets = FAST + ["phases.0.epochs=1", "phases.0.warmup_epochs=0", "phases.0.batch_size_per_device=9", "logging.wandb=false"]
    done = run_recipe("quickstart.py", "--data", str(bad_folder), "--run-dir", str(run_dir), env=env, sets=sets, launcher=launcher)
    assert done.returncode == 0, done.stderr[-4000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["num_processes"] == 2 and info["train_images"] == 54
    checksums = info["phases"]["main"]["param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # both ranks took every step together
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert steps[-1]["total_step"] == 3  # 54 images / 2 ranks / 9 per batch
    assert "bitrot.png" in done.stderr  # the rank that met it replaced it and said so
