"""The optimizer, the schedules and the precision of a phase, and the LR range test's own schedule: no weight decay on norms and biases, the LR as a pure function of the update count, timm's schedules and the plateau schedule, LR multipliers."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from trainer.loop import early_stop_score, evaluates_ema, resolve_precision, stops_early
from trainer.lr_find import lr_at, range_test, steepest_descent
from trainer.optim import build_optimizer, ema_decay_for
from trainer.recipe import Phase


def test_auto_precision_is_fp32_on_cpu():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"


def test_no_weight_decay_on_norms_and_biases():
    model = timm.create_model("resnet10t", num_classes=3)
    optimizer, _ = build_optimizer(model, Phase(weight_decay=0.05), lr=0.1, updates_per_epoch=10)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        expected = 0.0 if param.ndim <= 1 else 0.05  # biases and BatchNorm weights are 1-D
        assert decay_of[id(param)] == expected, name


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb"])
def test_cpu_runs_take_torchs_fused_kernel_where_the_optimizer_has_one(name):
    """On the CPU, torch's SGD/Adam family get `fused=True` (one vectorised pass instead of a loop over
    the tensors), and its updates are the loop's: three steps from the same gradients agree."""
    phase = Phase(optimizer=name, weight_decay=0.05, momentum=0.9)
    models = [timm.create_model("resnet10t", num_classes=3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    ours, _ = build_optimizer(models[0], phase, lr=0.01, updates_per_epoch=10)
    assert all(g.get("fused", False) is (name != "lamb") for g in ours.param_groups)  # timm's Lamb has no fused kernel
    looped = timm.optim.create_optimizer_v2(models[1], name, lr=0.01, weight_decay=0.05, momentum=0.9)
    assert not any(g.get("fused") for g in looped.param_groups)
    torch.manual_seed(0)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, optimizer in zip(models, (ours, looped)):
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.clone()
            optimizer.step()
    for (name_a, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name_a)


def test_lr_is_a_pure_function_of_the_update_count():
    phase = Phase(epochs=4, warmup_epochs=1, min_lr_ratio=0.01)
    model = timm.create_model("resnet10t", num_classes=3)
    optimizer, scheduler = build_optimizer(model, phase, lr=0.4, updates_per_epoch=10)
    walked = []
    for step in range(41):
        scheduler.step_update(step)
        walked.append(optimizer.param_groups[0]["lr"])
    assert walked[0] == pytest.approx(0.004) and walked[10] == pytest.approx(0.4)  # warmup to the peak
    assert walked[40] == pytest.approx(0.004, rel=1e-3) and walked[25] < walked[15]  # cosine to min
    fresh_opt, fresh = build_optimizer(model, phase, lr=0.4, updates_per_epoch=10)
    fresh.step_update(27)  # what resume does: jump straight to the update count
    assert fresh_opt.param_groups[0]["lr"] == walked[27]


def _lrs(phase: Phase, updates_per_epoch: int = 10) -> list[float]:
    model = timm.create_model("resnet10t", num_classes=3)
    optimizer, scheduler = build_optimizer(model, phase, lr=1.0, updates_per_epoch=updates_per_epoch)
    out = []
    for step in range(phase.epochs * updates_per_epoch + 1):
        scheduler.step_update(step)
        out.append(optimizer.param_groups[0]["lr"])
    return out


def test_step_and_onecycle_schedules():
    step = _lrs(Phase(epochs=6, schedule="step", decay_epochs=2, decay_rate=0.1))
    assert step[0] == pytest.approx(1.0) and step[25] == pytest.approx(0.1) and step[45] == pytest.approx(0.01)
    one = _lrs(Phase(epochs=10, schedule="onecycle"))
    assert one[0] == pytest.approx(1 / 25) and max(one) == pytest.approx(1.0)
    assert one.index(max(one)) == 30 and one[-1] == pytest.approx(1 / 25e4, rel=1e-2)


def test_plateau_schedule_cuts_lr_after_patience_and_resumes():
    model = timm.create_model("resnet10t", num_classes=3)
    phase = Phase(epochs=10, schedule="plateau", plateau_patience_epochs=1, decay_rate=0.5, warmup_epochs=1)
    optimizer, scheduler = build_optimizer(model, phase, lr=1.0, updates_per_epoch=5)
    scheduler.step_update(0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)  # warmup start
    lrs = []
    for epoch, top1 in enumerate([0.1, 0.2, 0.2, 0.2, 0.2, 0.2]):
        scheduler.epoch_end(top1)
        scheduler.step_update(5 * (epoch + 1))
        lrs.append(optimizer.param_groups[0]["lr"])
        if epoch == 2:
            saved = scheduler.state_dict()
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.25])
    _, again = build_optimizer(model, phase, lr=1.0, updates_per_epoch=5)
    again.load_state_dict(saved)  # resume after epoch 2: the patience counter comes back too
    again.epoch_end(0.2)
    again.step_update(20)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(0.5)


def test_backbone_lr_multiplier_and_layer_decay_scale_groups():
    model = timm.create_model("resnet10t", num_classes=3)
    optimizer, scheduler = build_optimizer(model, Phase(backbone_lr_mult=0.1), lr=1.0, updates_per_epoch=5)
    scheduler.step_update(0)
    head = {id(p) for p in model.fc.parameters()}
    for group in optimizer.param_groups:
        in_head = {id(p) for p in group["params"]} <= head
        assert group["lr"] == pytest.approx(1.0 if in_head else 0.1)
    optimizer, scheduler = build_optimizer(model, Phase(layer_decay=0.5), lr=1.0, updates_per_epoch=5)
    scheduler.step_update(0)
    assert min(g["lr"] for g in optimizer.param_groups) < 0.1 < max(g["lr"] for g in optimizer.param_groups)


def test_early_stop_scores_are_higher_is_better():
    val, ema = {"top1": 0.5, "loss": 2.0}, {"top1": 0.6}
    assert early_stop_score("best_top1", val, ema) == 0.6
    assert early_stop_score("val_loss", val, None) == -2.0
    assert early_stop_score("val_macro_f1", {**val, "macro_f1": 0.4}, ema) == 0.4


def test_lr_schedule_is_exponential_from_start_to_end():
    lrs = [lr_at(i, 5, 1e-4, 1.0) for i in range(5)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(1.0)
    assert np.allclose(np.diff(np.log10(lrs)), 1.0)  # one decade per step


def test_suggestion_is_the_steepest_fall_of_the_smoothed_loss():
    lrs = np.logspace(-6, 0, 60)
    smoothed = 2.0 - np.tanh(3 * (np.log10(lrs) + 3))  # falls fastest at 1e-3
    smoothed[-5:] += np.linspace(1, 10, 5)  # the blow-up at the end must not matter
    smoothed[0] = 5.0  # a noisy first point (skipped, as fastai does)
    index = steepest_descent(list(lrs), list(smoothed))
    assert lrs[index] == pytest.approx(1e-3, rel=0.3)
    assert steepest_descent([1e-3], [1.0]) is None


@pytest.mark.parametrize("curvature", [0.5, 4.0, 50.0])
def test_range_test_suggests_an_lr_just_below_the_best_of_a_problem_built_to_have_one(curvature):
    """Gradient descent on L(w) = h/2 |w|^2 multiplies the loss by (1 - lr h)^2 per update: the best LR is
    exactly 1/h, and above 2/h the loss grows. The range test, at its defaults, must suggest an LR a
    little below that best one (the smoothed loss lags the raw one: about a quarter of it here), and it
    must see the blow-up."""
    w = torch.ones(10, dtype=torch.float64)

    def train_step(lr: float) -> float:
        nonlocal w
        loss = 0.5 * curvature * float(w @ w)
        w = w - lr * curvature * w
        return loss

    lrs, losses, smoothed, reason = range_test(train_step, steps=100, start_lr=1e-7, end_lr=10.0)
    best_lr = 1 / curvature
    suggested = lrs[steepest_descent(lrs, smoothed)]
    assert best_lr / 5 <= suggested <= best_lr, (suggested, best_lr)
    if curvature * 10.0 >= 5 * 2:  # the LR ends far above 2/h: the loss grows until the test stops
        assert reason == "diverged", reason
    assert len(lrs) == len(losses) == len(smoothed) and lrs[0] == pytest.approx(1e-7)


# -- what a device-side skip can put back (trainer.optim.GuardedUpdate) ---------------------------


def _stepped(name: str) -> torch.optim.Optimizer:
    from timm.optim import create_optimizer_v2

    model = torch.nn.Linear(3, 2)
    optimizer = create_optimizer_v2(model, opt=name, lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return optimizer


def test_host_counters_are_found():
    from trainer.optim import host_counters

    for name in ("sgd", "momentum", "lion", "lamb", "adamw"):  # on the CPU, counters in CPU tensors are on the device
        assert not host_counters(_stepped(name)), name
    optimizer = _stepped("momentum")
    next(iter(optimizer.state.values()))["step"] = 1  # a Python number: the device cannot put it back
    assert host_counters(optimizer)


def test_adam_counts_steps_on_the_device_only_on_cuda():
    from trainer.optim import capture_steps_on_device

    optimizer = _stepped("adamw")
    optimizer.param_groups[0]["capturable"] = True  # as a GPU run's checkpoint brings it back
    capture_steps_on_device(optimizer, torch.device("cpu"))
    assert optimizer.param_groups[0]["capturable"] is False


def test_ema_horizon_follows_the_phase_length():
    """A 144-photo folder's phase of 40 updates averages over its last ~4; 100,000 photos keep ema_decay."""
    assert ema_decay_for(Phase(ema_decay=0.999), 40) == 0.999  # no horizon: as given
    short = ema_decay_for(Phase(ema_decay=0.9998, ema_horizon=0.1), 40)
    assert short == pytest.approx(0.75) and 0.999**40 > 0.96  # 0.999 would keep 96 % of the initial weights
    assert ema_decay_for(Phase(ema_decay=0.9998, ema_horizon=0.1), 25_000) == pytest.approx(0.9996)
    assert ema_decay_for(Phase(ema_decay=0.9998, ema_horizon=0.1), 10**7) == 0.9998  # capped
    assert ema_decay_for(Phase(ema_decay=0.9998, ema_horizon=0.1), 3) == 0.0  # a window under one update: no averaging


def test_the_ema_is_evaluated_from_ema_eval_after_and_at_the_last_epoch():
    ema = object()  # only its presence matters
    phase = Phase(epochs=8, ema_decay=0.99, ema_eval_after=0.5)
    assert [evaluates_ema(phase, e, ema) for e in range(8)] == [False] * 3 + [True] * 5  # epochs 4-8 of 8
    assert [evaluates_ema(Phase(epochs=3, ema_decay=0.99, ema_eval_after=1.0), e, ema) for e in range(3)] == [False, False, True]
    assert all(evaluates_ema(Phase(epochs=4, ema_decay=0.99), e, ema) for e in range(4))  # 0: every epoch
    assert not evaluates_ema(phase, 7, None)  # no EMA kept


def test_early_stopping_waits_for_early_stop_after():
    phase = Phase(epochs=8, early_stop_patience=2, early_stop_after=0.5)
    assert not stops_early(phase, 2, bad_epochs=2)  # epoch 3 of 8: the schedule is not half done
    assert stops_early(phase, 3, bad_epochs=2)  # epoch 4 of 8
    assert not stops_early(phase, 5, bad_epochs=1)
    assert stops_early(Phase(epochs=8, early_stop_patience=2), 1, bad_epochs=2)  # 0: from the first epoch on
    assert not stops_early(Phase(epochs=8), 7, bad_epochs=7)  # patience 0: off
