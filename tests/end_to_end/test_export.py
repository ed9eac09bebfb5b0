"""Export and predict: a trained run becomes a bundle (safetensors, config, model card, inference.py,
examples) that loads without this repository and predicts as the trainer's eval scored it."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
from conftest import FAST, REPO, run_recipe
from PIL import Image
from safetensors.torch import load_file, save_file

from trainer.__main__ import main
from trainer.data import load_splits
from trainer.evaluation import bundle_target
from trainer.export import BundleError, export
from trainer.inference import gradcam, load_bundle, predict
from trainer.loop import build_eval_loader
from trainer.run_folder import HISTORY, PARTS_FILE, phase_checkpoint, read_jsonl, read_state

TRAIN = [*FAST, "phases.0.epochs=2", "phases.0.warmup_epochs=0", "logging.wandb=false"]  # quickstart: EMA on


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_imagenet, run_env) -> tuple[Path, Path]:
    """(run folder, bundle): a 2-epoch resnet10t on the tiny folder, exported by `python -m trainer export`."""
    run_dir = tmp_path_factory.mktemp("export") / "run"
    done = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=run_env, sets=TRAIN)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the command line, in this process: imports are paid once
        assert main(["export", str(run_dir)]) == 0
    bundle = Path(printed.getvalue().strip().splitlines()[-1])
    assert bundle == run_dir / "bundle"
    return run_dir, bundle


def val_images(tiny_imagenet: Path) -> list[Path]:
    return sorted((tiny_imagenet / "val").glob("*/*.JPEG"))


def test_bundle_files_and_config(exported, tiny_imagenet):
    run_dir, bundle = exported
    for name in ("model.safetensors", "config.json", "README.md", "inference.py"):
        assert (bundle / name).is_file(), name
    assert (bundle / "inference.py").read_bytes() == (REPO / "trainer" / "inference.py").read_bytes()
    config = json.loads((bundle / "config.json").read_text())
    info = json.loads((run_dir / "run.json").read_text())
    assert config["architecture"] == "resnet10t" and config["num_classes"] == 3
    assert config["classes"] == info["classes"] == sorted(p.name for p in (tiny_imagenet / "train").iterdir())
    assert config["head"] == "" and config["input_size"] == [3, 32, 32] and config["interpolation"] == "bilinear"
    assert config["mean"] == config["std"] == [0.5, 0.5, 0.5] and config["crop_fraction"] == 1.0  # the quickstart's
    assert config["recipe"] == "quickstart" and config["commit"] == info["git"]["commit"] and config["format_version"] == 1
    metrics = config["metrics"]
    assert metrics["source"] in ("model", "ema") and 0 <= metrics["top1"] <= 1
    # The figures of the epoch the weights come from, as history.jsonl has them (top-5 itself is checked
    # with more than 5 classes in tests/unit/test_reports.py: with 3 classes it is always 1).
    record = next(r for r in read_jsonl(run_dir / HISTORY) if r["phase"] == "main" and r["epoch"] == metrics["epoch"])
    prefix = "ema_val" if metrics["source"] == "ema" else "val"
    assert (metrics["top1"], metrics["top5"]) == pytest.approx((record[f"{prefix}_top1"], record[f"{prefix}_top5"]))
    assert set(metrics["phases"]) == {"main"} and metrics["phases"]["main"]["steps"] == info["phases"]["main"]["steps"]
    for wnid in config["classes"]:  # 3 val images per class, the JPEG bytes as they were
        copies = sorted((bundle / "examples" / wnid).glob("*.jpg"))
        assert len(copies) == 3
        originals = {p.read_bytes() for p in (tiny_imagenet / "val" / wnid).iterdir()}
        assert all(c.read_bytes() in originals for c in copies)
    card = (bundle / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\ntags:\n- image-classification\n- timm\n")
    for part in ("## Data", "## Metrics per phase", "| main | 2 |", "## How to use", "## Limitations"):
        assert part in card


def test_safetensors_round_trip_equals_the_checkpoint_weights(exported, tmp_path):
    run_dir, bundle = exported
    config = json.loads((bundle / "config.json").read_text())
    ckpt = phase_checkpoint(run_dir / "main")
    weights = load_file(str(bundle / "model.safetensors"))
    ema = {k.removeprefix("module."): v for k, v in torch.load(ckpt / PARTS_FILE, map_location="cpu", weights_only=False)["ema"].items()}
    expected = ema if config["metrics"]["source"] == "ema" else load_file(str(ckpt / "model.safetensors"))
    assert weights.keys() == expected.keys() == timm.create_model("resnet10t", num_classes=3).state_dict().keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    native = timm.create_model(f"local-dir:{bundle}", pretrained=True)  # timm's own loader reads the bundle too
    assert native.pretrained_cfg["label_names"] == config["classes"] and native.pretrained_cfg["crop_pct"] == 1.0
    assert all(torch.equal(native.state_dict()[k], weights[k]) for k in weights)

    # When the EMA scored better at that checkpoint, its weights are exported (the same rule as init="phase:...").
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("bundle"))
    state_file = phase_checkpoint(copy / "main") / "trainer_state.json"
    saved = read_state(state_file.parent)
    for ema_better in (True, False):
        saved["last_val"]["ema_top1"] = saved["last_val"]["top1"] + (0.1 if ema_better else -0.1)
        state_file.write_text(json.dumps(saved))
        out = export(copy, tmp_path / "bundle")  # the second export replaces the first
        got = load_file(str(out / "model.safetensors"))
        want = ema if ema_better else load_file(str(ckpt / "model.safetensors"))
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert json.loads((out / "config.json").read_text())["metrics"]["source"] == ("ema" if ema_better else "model")
    assert not any(tmp_path.glob(".tmp-*"))
    assert not all(torch.equal(ema[k], load_file(str(ckpt / "model.safetensors"))[k]) for k in ema)  # they did differ


FRESH = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])  # the bundle's own inference.py
    import inference
    from PIL import Image
    bundle = inference.load_bundle(sys.argv[1])
    top = inference.predict(bundle, [Image.open(sys.argv[2])], topk=2)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("trainer", "loaders", "accelerate") or m.startswith("nvidia.dali"))
    print(json.dumps({"file": inference.__file__, "top": top, "heavy": heavy}))
    """
)


def test_bundle_loads_in_a_fresh_process_without_this_repository(exported, tiny_imagenet, tmp_path):
    _, bundle = exported
    moved = shutil.copytree(bundle, tmp_path / "elsewhere")
    image = val_images(tiny_imagenet)[0]
    done = subprocess.run([sys.executable, "-I", "-c", FRESH, str(moved), str(image)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert Path(result["file"]) == moved / "inference.py" and result["heavy"] == []
    expected = predict(load_bundle(bundle), [Image.open(image)], topk=2)[0]
    assert [name for name, _ in result["top"][0]] == [name for name, _ in expected]
    assert [p for _, p in result["top"][0]] == pytest.approx([p for _, p in expected], abs=1e-5)


def test_predict_agrees_with_the_trainers_eval(exported, tiny_imagenet, run_env):
    run_dir, bundle = exported
    images = val_images(tiny_imagenet)
    assert len(images) == 24
    done = cli("predict", str(bundle), *map(str, images), "--json", "--topk", "3", env=run_env)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(done.stdout)
    assert [r["image"] for r in records] == list(map(str, images))
    assert all(len(r["top"]) == 3 and r["top"][0]["prob"] >= r["top"][1]["prob"] for r in records)
    assert all(sum(t["prob"] for t in r["top"]) == pytest.approx(1.0, abs=1e-4) for r in records)  # 3 classes
    correct = sum(r["top"][0]["class"] == Path(r["image"]).parent.name for r in records)
    metrics = json.loads((bundle / "config.json").read_text())["metrics"]
    record = next(r for r in read_jsonl(run_dir / HISTORY) if r["phase"] == "main" and r["epoch"] == metrics["epoch"])
    trainer_top1 = record["ema_val_top1" if metrics["source"] == "ema" else "val_top1"]
    assert trainer_top1 == pytest.approx(metrics["top1"])
    # Image by image: the trainer's own eval pipeline (DALI, the eval transform of training) on the same
    # weights gives every val image the same top-1 class as `predict`, with probabilities within
    # PROBABILITY_TOLERANCE (PIL's resize and DALI's differ by a grey level here and there).
    by_image = trainer_eval_probabilities(bundle)
    assert sorted(by_image) == sorted(map(str, images))
    for r in records:
        expected = by_image[r["image"]]
        assert r["top"][0]["class"] == max(expected, key=expected.get), (r, expected)
        for item in r["top"]:
            assert item["prob"] == pytest.approx(expected[item["class"]], abs=PROBABILITY_TOLERANCE), (r, expected)
    assert correct == round(trainer_top1 * 24), (correct, trainer_top1)


PROBABILITY_TOLERANCE = 0.01


def test_imagenet_synsets_are_named_in_config_and_predict_and_other_folders_keep_theirs(exported, tiny_imagenet, tmp_path, capsys):
    run_dir, bundle = exported
    config = json.loads((bundle / "config.json").read_text())
    wnids = ["n01440764", "n01443537", "n01484850"]  # tiny_imagenet's class folders: real ImageNet synsets
    assert config["classes"] == config["label_names"] == config["pretrained_cfg"]["label_names"] == wnids
    assert config["display_names"] == ["tench", "goldfish", "great white shark"]
    # timm's convention: label_names are the synsets, label_descriptions their words (timm's ImageNetInfo's).
    assert config["label_descriptions"] == config["pretrained_cfg"]["label_descriptions"]
    assert config["label_descriptions"]["n01440764"] == "tench, Tinca tinca"
    native = timm.create_model(f"local-dir:{bundle}", pretrained=True)
    assert native.pretrained_cfg["label_descriptions"]["n01443537"] == "goldfish, Carassius auratus"
    assert "tench (`n01440764`)" in (bundle / "README.md").read_text()

    image = str(val_images(tiny_imagenet)[0])
    assert main(["predict", str(bundle), image, "--json"]) == 0
    (record,) = json.loads(capsys.readouterr().out)
    named = dict(zip(wnids, config["display_names"]))
    assert sorted(t["class"] for t in record["top"]) == wnids and all(t["name"] == named[t["class"]] for t in record["top"])
    assert main(["predict", str(bundle), image]) == 0
    table = capsys.readouterr().out
    assert "  tench  (n01440764)" in table and "  goldfish  (n01443537)" in table

    # Folders that are not synsets keep their names: the same run with its classes renamed.
    data = tmp_path / "pets"
    for split in ("train", "val"):
        (data / split).mkdir(parents=True)
        for wnid, pet in zip(wnids, ("cat", "dog", "fox")):
            (data / split / pet).symlink_to(tiny_imagenet / split / wnid)
    renamed = shutil.copytree(run_dir, tmp_path / "run", ignore=shutil.ignore_patterns("bundle"))
    for name, key, value in (("run.json", "classes", ["cat", "dog", "fox"]), ("recipe.json", "data", None)):
        saved = json.loads((renamed / name).read_text())
        if key == "data":
            saved["data"]["path"] = str(data)
        else:
            saved[key] = value
        (renamed / name).write_text(json.dumps(saved))
    pets = export(renamed)
    config = json.loads((pets / "config.json").read_text())
    assert config["classes"] == config["display_names"] == config["label_names"] == ["cat", "dog", "fox"]
    assert "label_descriptions" not in config and "label_descriptions" not in config["pretrained_cfg"]
    assert {name for name, _ in predict(load_bundle(pets), [Image.open(image)], topk=3)[0]} == {"cat", "dog", "fox"}
    assert main(["eval", str(pets), "--out", str(tmp_path / "eval.json")]) == 0
    table = capsys.readouterr().out
    assert "\ncat " in table and "folder" not in table and "tench" not in table


def trainer_eval_probabilities(bundle_dir: Path) -> dict[str, dict[str, float]]:
    """{val image: {class: softmax probability}} from the trainer's eval loader (`python -m trainer eval`'s)
    with the bundle's weights, in this process."""
    target = bundle_target(bundle_dir, None)
    source = load_splits(target.recipe).val
    one_process = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    loader = build_eval_loader(target.recipe, target.phase, source, one_process)
    rows = []
    with torch.no_grad():
        for images, labels in loader:
            probs = torch.softmax(target.model(images).float(), dim=1)
            rows += [row.tolist() for row, label in zip(probs, labels) if label >= 0]  # -1: padding
    return {source.files[i]: dict(zip(target.classes, row)) for i, row in enumerate(rows)}  # eval order: 0, 1, ...


def test_gradcam_heatmap_and_overlay(exported, tiny_imagenet, tmp_path, capsys):
    _, bundle_dir = exported
    bundle = load_bundle(bundle_dir)
    image = Image.open(val_images(tiny_imagenet)[0])
    heat, overlay = gradcam(bundle, image, class_index=0)
    assert heat.shape == (32, 32) and heat.dtype == np.float32
    assert heat.min() >= 0 and heat.max() <= 1 and heat.std() > 0.01
    _, other = gradcam(bundle, image, class_index=1)
    assert overlay.size == other.size == (32, 32) and overlay.mode == "RGB"
    assert not np.array_equal(np.asarray(overlay), np.asarray(other))

    # The command line: one image writes OUT.png, several OUT-1.png, OUT-2.png; the table names the classes.
    images = [str(p) for p in val_images(tiny_imagenet)[:2]]
    assert main(["predict", str(bundle_dir), images[0], "--gradcam", str(tmp_path / "one.png")]) == 0
    assert re.findall(r"^ +(\d+)\. ", capsys.readouterr().out, re.M) == ["1", "2", "3"]  # --topk 5, 3 classes
    assert main(["predict", str(bundle_dir), *images, "--gradcam", str(tmp_path / "cam.png"), "--topk", "2"]) == 0
    table = capsys.readouterr().out
    assert images[0] in table and images[1] in table and re.findall(r"^ +(\d+)\. ", table, re.M) == ["1", "2", "1", "2"]
    assert Image.open(tmp_path / "one.png").size == (32, 32)
    assert sorted(p.name for p in tmp_path.glob("cam*.png")) == ["cam-1.png", "cam-2.png"]


def test_errors_exit_2_without_traceback(exported, tiny_imagenet, tmp_path, capsys):
    run_dir, bundle = exported
    image = str(val_images(tiny_imagenet)[0])
    assert main(["predict", str(tmp_path / "no-bundle"), image]) == 2
    assert capsys.readouterr().err.startswith("error: cannot load bundle")
    (tmp_path / "text.jpg").write_text("not an image")
    assert main(["predict", str(bundle), str(tmp_path / "text.jpg")]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot read image {tmp_path / 'text.jpg'}")
    assert main(["export", str(tmp_path / "no-run")]) == 2
    assert "does not exist" in capsys.readouterr().err

    # Weights that do not fit the recipe's model: refused before anything is written.
    broken = shutil.copytree(run_dir, tmp_path / "broken", ignore=shutil.ignore_patterns("bundle"))
    recipe = json.loads((broken / "recipe.json").read_text())
    recipe["model"]["arch"] = "resnet18"
    (broken / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(BundleError, match="do not fit resnet18"):
        export(broken)
    assert not (broken / "bundle").exists() and not any(broken.glob(".tmp-*"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not a bundle"):  # never overwrites a folder that is not a bundle
        export(run_dir, tmp_path / "mine")


def test_mlp_head_model_exports_and_reloads(tmp_path, tiny_imagenet, run_env):
    weights = tmp_path / "resnet10t.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=1000).state_dict(), str(weights))
    sets = ["model.arch=resnet10t", f"model.pretrained_file={weights}", "logging.progress_bar=false", "logging.wandb=false"]
    for p in ("phases.0", "phases.1"):
        sets += [f"{p}.epochs=1", f"{p}.warmup_epochs=0", f"{p}.batch_size_per_device=8", f"{p}.res_px=32",
                 f"{p}.eval_res_px=32", f"{p}.color_jitter=0"]
    sets.append("phases.0.head=mlp:16")
    run_dir = tmp_path / "run"
    done = run_recipe("folder_transfer.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=run_env, sets=sets)
    assert done.returncode == 0, done.stderr[-3000:]
    bundle = load_bundle(export(run_dir, tmp_path / "bundle"))
    config = bundle.config
    assert config["head"] == "mlp:16" and config["head_dropout"] == 0.2 and config["crop_fraction"] == 0.875
    assert config["metrics"]["phase"] == "finetune" and set(config["metrics"]["phases"]) == {"head", "finetune"}
    saved = load_file(str(tmp_path / "bundle" / "model.safetensors"))
    assert {"fc.0.weight", "fc.3.weight"} <= saved.keys() and saved["fc.3.weight"].shape == (3, 16)
    assert all(torch.equal(bundle.model.state_dict()[k], v) for k, v in saved.items())
    top = predict(bundle, [Image.open(val_images(tiny_imagenet)[0])], topk=5)[0]
    assert len(top) == 3 and {name for name, _ in top} == set(config["display_names"]) == {"tench", "goldfish", "great white shark"}
    heat, _ = gradcam(bundle, Image.open(val_images(tiny_imagenet)[0]))
    assert 0 <= heat.min() and heat.max() <= 1


def preprocess_from_config(path: Path, recipe: dict) -> np.ndarray:
    """What a user outside Python would write from config.json's "preprocessing": Pillow and numpy only."""
    image = Image.open(path).convert(recipe["color"])
    shorter = recipe["resize_shorter_side_px"]
    w, h = image.size
    scale = shorter / min(w, h)
    size = (shorter, round(h * scale)) if w <= h else (round(w * scale), shorter)
    if size != (w, h):
        image = image.resize(size, Image.BILINEAR)
    crop_h, crop_w = recipe["center_crop_px"]
    left, top = round((size[0] - crop_w) / 2), round((size[1] - crop_h) / 2)
    pixels = np.asarray(image.crop((left, top, left + crop_w, top + crop_h)), dtype=np.float32) * recipe["scale"]
    pixels = (pixels - np.array(recipe["mean"], np.float32)) / np.array(recipe["std"], np.float32)
    assert recipe["input_layout"] == "NCHW" and recipe["channel_order"] == "RGB"
    return pixels.transpose(2, 0, 1).astype(np.float32)


def test_onnx_export_answers_as_predict_does(exported, tiny_imagenet, tmp_path, capsys):
    import onnxruntime

    run_dir, _ = exported
    out = tmp_path / "onnx-bundle"
    assert main(["export", str(run_dir), "--out", str(out), "--onnx"]) == 0
    assert "model.onnx differs from PyTorch by at most" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    checked = config["onnx"]
    assert checked["file"] == "model.onnx" and checked["checked_on"] == "9 example images"
    assert 0 <= checked["max_abs_diff"] <= checked["tolerance"] == 1e-3
    assert "model.onnx" in (out / "README.md").read_text()
    # ONNX Runtime on images preprocessed from config.json's words alone, three at once (the batch axis is
    # dynamic; the export traced one image), against predict's probabilities.
    paths = val_images(tiny_imagenet)[:3]
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.stack([preprocess_from_config(p, config["preprocessing"]) for p in paths])
    logits = session.run([checked["output"]["name"]], {checked["input"]["name"]: batch})[0]
    assert logits.shape == (3, 3)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    bundle = load_bundle(out)
    for row, top in zip(probs, predict(bundle, [Image.open(p) for p in paths], topk=3)):
        assert dict(zip(config["display_names"], row.tolist())) == pytest.approx(dict(top), abs=1e-4)


def test_onnx_export_refuses_a_model_onnx_gets_wrong(exported, tmp_path, monkeypatch):
    """A tolerance nothing meets: the export fails and leaves no bundle."""
    from trainer import onnx_model

    run_dir, _ = exported
    monkeypatch.setattr(onnx_model, "TOLERANCE", -1.0)
    with pytest.raises(BundleError, match="model.onnx differs from the PyTorch model"):
        export(run_dir, tmp_path / "refused", onnx=True)
    assert not (tmp_path / "refused").exists()
