"""Evaluation of real runs: eval.json at a phase's end, `python -m trainer eval` on a run, a bundle and 2 processes,
and the confusion matrix and sample predictions in the W&B offline files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import wandb_files
from conftest import FAST, REPO, run_recipe, two_cpu_launcher
from PIL import Image

from trainer.__main__ import main
from trainer.data import load_splits
from trainer.evaluation import bundle_target
from trainer.export import export
from trainer.loop import build_eval_loader
from trainer.run_folder import read_state

# One epoch: the weights at the phase's end are those of its only (so best) checkpoint, so eval.json
# and the eval command score the same weights. LR and EMA chosen so the EMA's confusion is not trivial.
SETS = FAST + ["phases.0.epochs=1", "phases.0.warmup_epochs=0", "phases.0.lr_per_256=0.01", "phases.0.ema_decay=0.9"]
VAL_IMAGES = 24  # tiny_imagenet: 3 classes x 8
BLOCK_KEYS = {
    "top1", "top5", "loss", "precision_macro", "recall_macro", "f1_macro",
    "precision_weighted", "recall_weighted", "f1_weighted", "per_class", "confusion",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_imagenet, run_env):
    root = tmp_path_factory.mktemp("eval")
    # W&B stages a table's images for upload in its data folder: keep them inside the test's folder.
    env = {**run_env, "WANDB_DATA_DIR": str(root / "wandb-data")}
    run_dir = root / "run"
    done = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=env, sets=SETS)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, env


def eval_command(*args: str, env: dict, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + ["-m", "trainer", "eval", *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def check_block(block: dict, classes: list[str]) -> np.ndarray:
    """The user's own sums over the confusion matrix agree with the reported figures."""
    assert set(block) == BLOCK_KEYS
    confusion = np.array(block["confusion"])
    assert confusion.shape == (3, 3) and confusion.sum() == VAL_IMAGES
    assert block["top1"] == pytest.approx(np.trace(confusion) / confusion.sum())
    assert list(block["per_class"]) == classes
    for i, name in enumerate(classes):
        scores = block["per_class"][name]
        assert scores["support"] == confusion[i].sum() == 8
        assert scores["accuracy"] == pytest.approx(confusion[i, i] / confusion[i].sum())
        # Recall over the row, precision over the column: the user's own division, 0/0 taken as 0.
        assert scores["recall"] == pytest.approx(confusion[i, i] / confusion[i].sum())
        predicted = confusion[:, i].sum()
        assert scores["precision"] == pytest.approx(confusion[i, i] / predicted if predicted else 0.0)
    return confusion


def assert_same_scores(got: dict, expected: dict) -> None:
    """Same counts exactly; same figures up to float summation order."""
    assert got["confusion"] == expected["confusion"]
    assert {k: v for k, v in got.items() if k not in ("confusion", "per_class")} == pytest.approx(
        {k: v for k, v in expected.items() if k not in ("confusion", "per_class")})
    assert list(got["per_class"]) == list(expected["per_class"])
    for name, scores in got["per_class"].items():
        assert scores == pytest.approx(expected["per_class"][name])


def test_phase_end_writes_eval_json_with_model_and_ema(trained):
    run_dir, _ = trained
    record = json.loads((run_dir / "main" / "eval.json").read_text())
    assert set(record) == {"phase", "split", "samples", "classes", "weights", "model", "ema"}
    assert record["phase"] == "main" and record["split"] == "val" and record["samples"] == VAL_IMAGES
    classes = list(json.loads((run_dir / "run.json").read_text())["classes"])
    assert record["classes"] == classes and "phase main" in record["weights"]
    assert record["ema"] is not None  # ema_decay > 0
    for block in (record["model"], record["ema"]):
        check_block(block, classes)
    # The same weights as the last epoch's line of history.jsonl, whose top-1 is counted from top-k hits.
    (last,) = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert record["model"]["top1"] == pytest.approx(last["val_top1"]) and record["model"]["top5"] == pytest.approx(last["val_top5"])
    assert record["model"]["loss"] == pytest.approx(last["val_loss"])
    assert record["ema"]["top1"] == pytest.approx(last["ema_val_top1"])
    assert not list((run_dir / "main").glob("*.tmp"))


def test_eval_command_reproduces_the_phase_end_numbers(trained):
    run_dir, env = trained
    done = eval_command(str(run_dir), env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for text in ("top-1", "F1 (macro)", "precision (weighted)", "most confused", "n01440764"):
        assert text in done.stdout
    # The ImageNet synsets by name (timm's metadata), the folder beside: "tench ... n01440764".
    rows = {line.split()[-1]: line for line in done.stdout.splitlines() if line.split()[-1:] in (["n01440764"], ["n01484850"])}
    assert rows["n01440764"].startswith("tench ") and rows["n01484850"].startswith("great white shark ")
    written = json.loads((run_dir / "eval-val.json").read_text())
    phase_end = json.loads((run_dir / "main" / "eval.json").read_text())
    assert written["samples"] == VAL_IMAGES and "checkpoints/step_" in written["weights"]
    for source in ("model", "ema"):
        assert_same_scores(written[source], phase_end[source])
    # ...and what training recorded in the checkpoint it scored.
    (ckpt,) = (run_dir / "main" / "checkpoints").iterdir()
    last_val = read_state(ckpt)["last_val"]
    assert (written["model"]["top1"], written["ema"]["top1"]) == pytest.approx((last_val["top1"], last_val["ema_top1"]))


def test_eval_command_on_a_bundle_scores_its_one_set_of_weights(trained, tmp_path, capsys):
    run_dir, _ = trained
    bundle = export(run_dir, tmp_path / "bundle")  # in this process, as the eval below: two fewer start-ups
    out = tmp_path / "bundle-eval.json"
    data = json.loads((run_dir / "recipe.json").read_text())["data"]["path"]
    assert main(["eval", str(bundle), "--data", data, "--out", str(out), "--json"]) == 0
    record = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == record
    assert record["ema"] is None and record["samples"] == VAL_IMAGES and record["weights"] == f"bundle {bundle}"
    # The bundle holds the better of model and EMA at the best checkpoint.
    phase_end = json.loads((run_dir / "main" / "eval.json").read_text())
    source = json.loads((bundle / "config.json").read_text())["metrics"]["source"]
    assert_same_scores(record["model"], phase_end[source])


def test_eval_with_flip_tta_scores_the_mean_of_each_image_and_its_mirror(trained, tmp_path, capsys):
    run_dir, _ = trained
    bundle = export(run_dir, tmp_path / "bundle")
    data = json.loads((run_dir / "recipe.json").read_text())["data"]["path"]
    assert main(["eval", str(bundle), "--data", data, "--tta", "flip"]) == 0
    assert "test-time augmentation: flip" in capsys.readouterr().out
    record = json.loads((bundle / "eval-val-tta-flip.json").read_text())  # beside, not over, eval-val.json
    assert record["tta"] == "flip" and record["samples"] == VAL_IMAGES
    check_block(record["model"], record["classes"])
    # The user's own TTA: the same eval loader's batches, their mirror images, the two softmaxes averaged.
    target = bundle_target(bundle, data)
    one_process = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    loader = build_eval_loader(target.recipe, target.phase, load_splits(target.recipe).val, one_process)
    probs, labels = [], []
    with torch.no_grad():
        for images, batch_labels in loader:
            mean = 0.5 * (torch.softmax(target.model(images), dim=1) + torch.softmax(target.model(torch.flip(images, dims=[3])), dim=1))
            probs += [p for p, label in zip(mean, batch_labels) if label >= 0]
            labels += [int(label) for label in batch_labels if label >= 0]
    probs, labels = torch.stack(probs), torch.tensor(labels)
    confusion = np.zeros((3, 3), np.int64)
    np.add.at(confusion, (labels.numpy(), probs.argmax(1).numpy()), 1)
    assert record["model"]["confusion"] == confusion.tolist()
    assert record["model"]["loss"] == pytest.approx(float(-probs[torch.arange(len(labels)), labels].log().mean()), rel=1e-5)
    plain = json.loads((run_dir / "main" / "eval.json").read_text())
    assert plain.get("tta", "none") == "none" and record["model"]["loss"] != pytest.approx(plain[json.loads((bundle / "config.json").read_text())["metrics"]["source"]]["loss"])


def test_eval_command_refuses_bad_inputs_with_one_line(trained, tmp_path, capsys):
    run_dir, _ = trained
    assert main(["eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "neither a run folder" in err and err.count("\n") == 1
    assert main(["eval", str(run_dir), "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and err.count("\n") == 1


def test_wandb_holds_confusion_matrix_per_class_and_predictions(trained):
    run_dir, env = trained
    record = json.loads((run_dir / "main" / "eval.json").read_text())
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (run_file,) = offline.glob("run-*.wandb")
    (row,) = [r for r in wandb_files.history(run_file) if "eval/main/predictions/path" in r]
    assert row["_step"] == 12  # the phase's last update: beside the last epoch's metrics

    def table(key: str) -> dict:
        assert row[f"{key}/_type"] == "table-file"
        return json.loads((offline / "files" / row[f"{key}/path"]).read_text())

    classes = record["classes"]
    for key, block in (("confusion_matrix", record["model"]), ("ema_confusion_matrix", record["ema"])):
        cells = table(f"eval/main/{key}_table")
        assert cells["columns"] == ["Actual", "Predicted", "nPredictions"]
        matrix = np.zeros((3, 3), int)
        for actual, predicted, count in cells["data"]:
            matrix[classes.index(actual), classes.index(predicted)] = count
        assert matrix.tolist() == block["confusion"]
    config = wandb_files.config(run_file)
    chart = config["_wandb/visualize/eval/main/confusion_matrix"]
    assert chart["panel_config"]["panelDefId"] == "wandb/confusion_matrix/v1"

    per_class = table("eval/main/per_class")
    assert [r[0] for r in per_class["data"]] == classes
    assert [r[1] for r in per_class["data"]] == pytest.approx([record["model"]["per_class"][c]["accuracy"] for c in classes])

    predictions = table("eval/main/predictions")
    assert predictions["columns"][:4] == ["image", "true", "predicted", "confidence"]
    assert sorted(r[1] for r in predictions["data"]) == sorted(classes * 3)  # 3 per class
    assert all(r[2] in classes and 1 / 3 <= r[3] <= 1 and r[4] == (r[1] == r[2]) for r in predictions["data"])
    # The images travel in the table's W&B artifact (uploaded by `wandb sync`): one small PNG per row.
    (artifact,) = [
        r.artifact for r in wandb_files.records(run_file)
        if r.WhichOneof("record_type") == "artifact" and "evalmainpredictions" in r.artifact.name
    ]
    images = [c for c in artifact.manifest.contents if c.path.startswith("media/images/")]
    assert len(images) == 9
    with Image.open(images[0].local_path) as image:
        assert max(image.size) <= 96


def test_resumed_after_the_last_epoch_writes_the_same_eval_json(trained, tmp_path, tiny_imagenet):
    run_dir, env = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "main" / "eval.json").unlink()
    done = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(copy), "--resume", "auto", env=env, sets=SETS)
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads((copy / "main" / "eval.json").read_text())  # scored once more: no epoch ran
    before = json.loads((run_dir / "main" / "eval.json").read_text())
    for source in ("model", "ema"):
        assert_same_scores(again[source], before[source])


def test_two_process_eval_counts_each_image_once(trained, tmp_path):
    run_dir, env = trained
    launcher = two_cpu_launcher(29531)
    out = tmp_path / "ddp.json"
    done = eval_command(str(run_dir), "--out", str(out), env={**env, "ACCELERATE_USE_CPU": "1"}, launcher=launcher)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("top-1") == 1  # one table, from the main process
    record = json.loads(out.read_text())
    assert record["samples"] == VAL_IMAGES
    phase_end = json.loads((run_dir / "main" / "eval.json").read_text())
    for source in ("model", "ema"):
        assert np.sum(record[source]["confusion"]) == VAL_IMAGES
        assert record[source]["confusion"] == phase_end[source]["confusion"]
