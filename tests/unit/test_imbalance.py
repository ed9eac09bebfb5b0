"""Unbalanced classes: the class-balanced order (a pure function of (seed, epoch), sharded by rank, exactly
resumable through the real DALI loader), the class weights of the loss against a hand computation and
torch's `weight=`, macro F1 and balanced accuracy against scikit-learn, the counts and ratio with their
hint, and train top-1 under Mixup as the loop records it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import CLASSES, write_image_folder
from loop_run import MemoryLoader, make_batches, run_loop, temporary_runs, tiny_recipe
from sklearn.metrics import balanced_accuracy_score, f1_score

from loaders import order
from loaders.dali import TrainLoader
from loaders.scan import report_lines, scan_dataset
from loaders.sources import IMBALANCE_HINT_RATIO, image_folder_splits, imbalance_hint, label_balance
from trainer import loop, optim
from trainer.metrics import class_averaged, evaluate
from trainer.optim import WeightedCrossEntropy, build_criterion, class_weights
from trainer.recipe import Data, Phase, RecipeError
from trainer.run_folder import HISTORY, read_jsonl

SKEWED = np.repeat([0, 1, 2], [80, 15, 5])  # 16:3:1


def test_balanced_order_is_a_pure_function_of_seed_and_epoch_and_balances_the_classes():
    args = dict(seed=3, epoch=5, rank=0, world_size=1, batch_size=4)
    samples, rows = order.balanced_train_order(SKEWED, **args)
    again, _ = order.balanced_train_order(SKEWED, **args)
    assert np.array_equal(samples, again) and len(samples) == 100 and np.array_equal(rows, np.arange(100))
    assert not np.array_equal(samples, order.balanced_train_order(SKEWED, **{**args, "epoch": 6})[0])
    assert not np.array_equal(samples, order.balanced_train_order(SKEWED, **{**args, "seed": 4})[0])
    # Over many epochs every class is drawn a third of the time (16:3:1 in the data).
    drawn = np.concatenate([SKEWED[order.balanced_train_order(SKEWED, **{**args, "epoch": e})[0]] for e in range(50)])
    shares = np.bincount(drawn) / len(drawn)
    assert shares == pytest.approx([1 / 3] * 3, abs=0.03)
    assert len(set(samples[SKEWED[samples] == 2].tolist())) <= 5  # the rare class repeats: drawn with replacement


def test_balanced_order_deals_one_global_sequence_to_disjoint_rank_shards():
    args = dict(seed=1, epoch=2, batch_size=3)
    whole, _ = order.balanced_train_order(SKEWED, rank=0, world_size=1, **args)
    shards = [order.balanced_train_order(SKEWED, rank=r, world_size=3, **args) for r in range(3)]
    rows = [r for _, r in shards]
    assert len({len(r) for r in rows}) == 1 and len(rows[0]) == 33  # 33 per rank: 11 whole batches each
    assert len(np.intersect1d(rows[0], rows[1])) == len(np.intersect1d(rows[1], rows[2])) == 0
    for samples, row in shards:  # each rank's positions of the one sequence a single process trains on
        assert np.array_equal(samples, whole[row])
    with pytest.raises(ValueError, match="outside world"):
        order.balanced_train_order(SKEWED, rank=3, world_size=3, **args)


@pytest.fixture(scope="module")
def skewed_folder(tmp_path_factory) -> Path:
    """3 classes of 24, 8 and 4 training images (ratio 6), 6/6/2 in val: real JPEGs."""
    root = write_image_folder(tmp_path_factory.mktemp("skewed"), {"train": 24, "val": 6})
    for split, keep in (("train", (24, 8, 4)), ("val", (6, 6, 2))):
        for wnid, count in zip(CLASSES, keep):
            for extra in sorted((root / split / wnid).iterdir())[count:]:
                extra.unlink()
    return root


def test_sampler_loader_resumes_mid_epoch_with_the_same_remaining_samples(skewed_folder):
    train, _ = image_folder_splits(skewed_folder)
    args = dict(batch_size=6, seed=5, res_px_for_epoch=lambda e: 32, decode_device="cpu", num_threads=1, balance="sampler")
    straight = TrainLoader(train, **args)
    reference = [b for e in range(2) for b in straight.epoch_batches(e)]
    assert len(reference) == 12  # 36 images: 6 batches of 6 per epoch
    labels = torch.cat([y for _, y in reference]).numpy()
    expected = np.concatenate([train.labels[order.balanced_train_order(train.labels, seed=5, epoch=e, rank=0, world_size=1, batch_size=6)[0]]
                               for e in range(2)])
    assert np.array_equal(labels, expected)
    assert np.bincount(labels, minlength=3).min() >= 12  # the 4-image class is no longer 1 in 9 of the draws
    resumed = TrainLoader(train, **args)
    resumed.load_state_dict({**straight.state_dict(), "epoch": 0, "batch": 4})
    tail = [b for e in range(2) for b in resumed.epoch_batches(e)]
    assert len(tail) == len(reference) - 4
    for (x, y), (rx, ry) in zip(tail, reference[4:]):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    plain = TrainLoader(train, **{**args, "balance": ""})
    with pytest.raises(ValueError, match="same data.balance"):
        plain.load_state_dict(straight.state_dict())


def test_class_weights_by_hand_and_as_torch_weighted_cross_entropy():
    weights = class_weights([6, 2, 1, 0])
    # n / (k * count_c) with n = 9 images, k = 3 classes with images; an empty class weighs nothing.
    assert weights.tolist() == pytest.approx([9 / 18, 9 / 6, 9 / 3, 0.0])
    assert float((torch.tensor([6.0, 2, 1, 0]) * weights).sum()) == pytest.approx(9)  # mean weight over the images: 1
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=generator)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 0, 2])
    log_p = logits.log_softmax(dim=1)
    # Hard labels: torch's weighted CE summed, over the batch size.
    loss = WeightedCrossEntropy(weights)(logits, labels)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, labels, weight=weights, reduction="sum")) / 8, rel=1e-6)
    by_hand = -(weights[labels] * log_p[torch.arange(8), labels]).mean()
    assert float(loss) == pytest.approx(float(by_hand), rel=1e-6)
    # With label smoothing: -sum_c w_c y_c log p_c, y = (1 - s) one-hot + s / k.
    smoothed = F.one_hot(labels, 4) * 0.8 + 0.2 / 4
    phase = Phase(name="p", label_smoothing=0.2)
    _, criterion = build_criterion(phase, 4, weights)
    assert float(criterion(logits, labels)) == pytest.approx(float(-(smoothed * weights * log_p).sum(1).mean()), rel=1e-6)
    # Equal counts: weights of 1, the plain smoothed cross-entropy.
    _, equal = build_criterion(phase, 4, class_weights([3, 3, 3, 3]))
    assert float(equal(logits, labels)) == pytest.approx(float(F.cross_entropy(logits, labels, label_smoothing=0.2)), rel=1e-6)


def test_class_weights_compose_with_mixup_and_bce():
    weights = class_weights([6, 2, 1])
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 3, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    mixup, criterion = build_criterion(Phase(name="p", mixup_alpha=0.8, mixup_prob=1.0, label_smoothing=0.1), 3, weights)
    _, soft = mixup(torch.zeros(6, 3, 8, 8), labels)
    assert soft.shape == (6, 3) and not torch.allclose(soft, F.one_hot(labels, 3) * 0.9 + 0.1 / 3)  # mixed with the flipped batch
    by_hand = -(soft * weights * logits.log_softmax(1)).sum(1).mean()
    assert float(criterion(logits, soft)) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(criterion(logits, soft)) == pytest.approx(float(F.cross_entropy(logits, soft, weight=weights)), rel=1e-6)
    # BCE: each class's term (its column) times its weight.
    _, bce = build_criterion(Phase(name="p", bce_loss=True, label_smoothing=0.1), 3, weights)
    targets = F.one_hot(labels, 3) * 0.9 + 0.1 / 3
    elementwise = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert float(bce(logits, labels)) == pytest.approx(float((elementwise * weights).mean()), rel=1e-6)


def test_balance_field_is_checked():
    assert Data().balance == "" and Data(balance="loss").balance == "loss"
    with pytest.raises(RecipeError, match="data.balance must be one of"):
        Data(balance="oversample")
    assert Phase(name="p", early_stop_metric="val_macro_f1").early_stop_metric == "val_macro_f1"


@pytest.mark.parametrize("seed", [0, 1])
def test_macro_f1_and_balanced_accuracy_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    # 5 classes; class 3 never occurs as a true label, class 4 is never predicted.
    y_true = rng.choice([0, 1, 2, 4], size=60, p=[0.7, 0.15, 0.1, 0.05])
    y_pred = np.where(rng.random(60) < 0.6, y_true, rng.choice([0, 1, 2, 3], size=60))
    confusion = np.zeros((5, 5), np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    scores = class_averaged(confusion)
    assert scores["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert scores["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))


def test_evaluate_reports_the_class_averaged_scores():
    logits = torch.eye(3)[[0, 0, 0, 0, 1, 0, 2, 1]] * 5  # predictions 0 0 0 0 1 0 2 1
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    scores = evaluate(torch.nn.Identity(), [(logits, labels)], Accelerator(cpu=True), contextlib.nullcontext())
    assert scores["top1"] == pytest.approx(6 / 8)
    assert scores["balanced_accuracy"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert scores["macro_f1"] == pytest.approx(f1_score(labels, logits.argmax(1), average="macro"))


def test_counts_ratio_and_hint(skewed_folder):
    train, val = image_folder_splits(skewed_folder)
    balance = label_balance(train.labels, train.classes)
    assert balance == {"counts": dict(zip(CLASSES, (24, 8, 4))), "ratio": 6.0}
    assert "data.balance=sampler" in imbalance_hint(balance) and "val_macro_f1" in imbalance_hint(balance)
    assert imbalance_hint(label_balance(np.repeat([0, 1], [30, 30 // IMBALANCE_HINT_RATIO]), ["a", "b"])) is None
    # The hint names only what a run does not do yet, and goes when nothing is left.
    assert "data.balance" not in imbalance_hint(balance, balance="loss") and "val_macro_f1" in imbalance_hint(balance, balance="loss")
    assert "data.balance=sampler" in imbalance_hint(balance, class_averaged=True)
    assert "early_stop_metric" not in imbalance_hint(balance, class_averaged=True)
    assert imbalance_hint(balance, balance="sampler", class_averaged=True) is None
    report = scan_dataset(skewed_folder, decode=False)
    lines = list(report_lines(report))
    assert any(line.startswith("train: imbalance ratio 6.0") and "n01484850 4" in line for line in lines)
    assert any(line.startswith("val: imbalance ratio 3.0") for line in lines)
    assert any(line.startswith("hint: classes are unbalanced (largest/smallest 6.0 > 3)") for line in lines)
    assert json.loads(json.dumps(report.to_dict()))["class_balance"]["train"]["ratio"] == 6.0


def test_train_top1_under_mixup_counts_the_label_with_the_larger_weight(monkeypatch):
    """The epoch's train_top1 is the hits of the batches as trained, against the argmax of the mixed targets."""
    seen = []

    class RecordingMixup(optim.Mixup):
        def __call__(self, x, target):
            mixed, soft = super().__call__(x, target)
            seen.append((target.clone(), soft.clone()))
            return mixed, soft

    monkeypatch.setattr(optim, "Mixup", RecordingMixup)
    logits_seen = []
    with temporary_runs() as tmp:
        recipe = tiny_recipe(Path(tmp), ema_decay=0.0, mixup_alpha=1.0, mixup_prob=1.0)
        loader = MemoryLoader(make_batches(8))
        real_batch = loop.PhaseRun.train_batch

        def train_batch(self, images, labels):
            hook = self.parts.raw_model.register_forward_hook(lambda m, i, out: logits_seen.append(out.detach().clone()))
            try:
                return real_batch(self, images, labels)
            finally:
                hook.remove()

        monkeypatch.setattr(loop.PhaseRun, "train_batch", train_batch)
        run_loop(recipe, Path(tmp) / "run", loader)
        record = read_jsonl(Path(tmp) / "run" / HISTORY)[0]
    assert len(seen) == len(logits_seen) == 8
    hits = sum(int((out.argmax(1) == soft.argmax(1)).sum()) for out, (_, soft) in zip(logits_seen, seen))
    assert record["train_top1"] == pytest.approx(hits / 32)
    # The mixed label is not always the batch's own: lambda < 0.5 picks the partner's.
    assert any(not torch.equal(soft.argmax(1), labels) for labels, soft in seen)
    assert 0 <= record["val_macro_f1"] <= 1 and 0 <= record["val_balanced_accuracy"] <= 1


def test_curves_draw_train_accuracy_and_its_gap(tmp_path):
    from pages import png_size

    from trainer.curves import CURVES_SIZE_PX, draw_curves

    records = [{"phase_index": 0, "phase": "main", "epoch": e, "train_loss": 2.0 / (e + 1), "val_loss": 2.2 / (e + 1),
                "val_top1": 0.3 + 0.05 * e, "val_top5": 0.8, "ema_val_top1": None, "train_top1": 0.3 + 0.08 * e,
                "lr": 1e-3, "total_step": 4 * (e + 1)} for e in range(3)]
    (tmp_path / HISTORY).write_text("".join(json.dumps(r) + "\n" for r in records))
    assert png_size(draw_curves(tmp_path)) == CURVES_SIZE_PX


def test_a_recipe_wires_the_sampler_into_the_loader_and_the_weights_into_the_loss(skewed_folder):
    from dataclasses import replace

    from trainer.data import Splits

    train, val = image_folder_splits(skewed_folder)
    splits = Splits(train=train, val=val)
    accelerator = Accelerator(cpu=True)
    with temporary_runs() as tmp:
        recipe = tiny_recipe(Path(tmp))
        sampled = replace(recipe, data=replace(recipe.data, balance="sampler", decode_mode="roi", path=str(skewed_folder)))
        loader, _ = loop.build_loaders(sampled, sampled.phases[0], 0, splits, accelerator)
        assert loader.balance == "sampler"
        weighted = replace(recipe, data=replace(recipe.data, balance="loss"))
        model = timm.create_model("test_resnet", num_classes=3)
        memory = MemoryLoader(make_batches(2))
        parts = loop.set_up_phase(accelerator, weighted, 0, model, splits, make_loaders=lambda phase, acc: (memory, [memory.batches[0]]))
    assert isinstance(parts.criterion, WeightedCrossEntropy)
    assert parts.criterion.weight.tolist() == pytest.approx(class_weights([24, 8, 4]).tolist())
