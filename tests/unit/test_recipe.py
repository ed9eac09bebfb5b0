"""Recipes and --set overrides: typed, validated all together, wrong ones refused with the valid keys."""

from __future__ import annotations

import dataclasses

import pytest

from trainer.recipe import Phase, Recipe, RecipeError, apply_overrides

RECIPE = Recipe(name="t", phases=(Phase(name="warm", epochs=3), Phase(name="full", epochs=5)))


def test_recipe_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RECIPE.seed = 3


def test_overrides_by_index_and_name_with_types():
    r = apply_overrides(
        RECIPE,
        ["phases.0.epochs=2", "phases.full.lr_per_256=0.5", "model.arch=resnet18", "seed=7",
         "phases.1.crop_scale=0.35,1.0", "model.channels_last=true", "data.mean=(0.5, 0.5, 0.5)"],
    )
    assert r.phases[0].epochs == 2 and r.phases[1].epochs == 5
    assert r.phases[1].lr_per_256 == 0.5
    assert r.model.arch == "resnet18" and r.seed == 7
    assert r.phases[1].crop_scale == (0.35, 1.0)
    assert r.model.channels_last is True
    assert r.data.mean == (0.5, 0.5, 0.5)
    assert RECIPE.phases[0].epochs == 3  # the original is untouched


def test_unknown_key_names_valid_keys_and_a_suggestion():
    with pytest.raises(RecipeError) as err:
        apply_overrides(RECIPE, ["phases.0.epoch=2"])
    message = str(err.value)
    assert "'epoch'" in message and "did you mean 'epochs'" in message
    assert "batch_size_per_device" in message and "lr_per_256" in message


def test_unknown_top_level_key_and_unknown_phase():
    with pytest.raises(RecipeError, match="valid keys: name, phases, model, data, seed, logging"):
        apply_overrides(RECIPE, ["sed=1"])
    with pytest.raises(RecipeError, match="unknown phase 'finetune'.*'warm', 'full'"):
        apply_overrides(RECIPE, ["phases.finetune.epochs=1"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("phases.0.epochs=two", "takes an integer"),
        ("phases.0.epochs=2.5", "takes an integer"),
        ("phases.0.lr_per_256=fast", "takes a number"),
        ("model.channels_last=maybe", "true or false"),
        ("phases.0.crop_scale=0.5", "2 comma-separated values"),
        ("phases.0.lr_per_256=-1", "lr_per_256 must be positive"),
        ("phases.0.batch_size_per_device=0", "batch_size_per_device must be >= 1"),
        ("phases.0.precision=fp8", "precision must be one of"),
        ("phases.0=3", "names a whole phase"),
        ("model=resnet", "is a section"),
        ("epochs", "is not key=value"),
        ("phases.0.ema_horizon=0.1", "ema_horizon needs the EMA on"),
        ("phases.0.ema_horizon=1.5", "ema_horizon must be in"),
        ("phases.0.early_stop_after=-0.1", "early_stop_after must be in"),
        ("phases.0.ema_eval_after=0.5", "ema_eval_after needs the EMA on"),
        ("phases.0.ema_eval_after=2", "ema_eval_after must be in"),
    ],
)
def test_bad_values_are_recipe_errors(override, expected):
    with pytest.raises(RecipeError, match=expected):
        apply_overrides(RECIPE, [override])


def test_ema_eval_after_may_not_outlast_early_stopping():
    """A phase that early stopping can end must have evaluated its EMA by then (eval.json and "best" read it)."""
    with pytest.raises(RecipeError, match="before the EMA is evaluated"):
        Phase(epochs=8, ema_decay=0.99, ema_eval_after=0.75, early_stop_patience=2, early_stop_after=0.5)
    Phase(epochs=8, ema_decay=0.99, ema_eval_after=0.5, early_stop_patience=2, early_stop_after=0.5)
    Phase(epochs=8, ema_decay=0.99, ema_eval_after=0.75)  # no early stopping: the last epoch evaluates it


def test_overrides_are_validated_together_not_one_by_one():
    base = Recipe(name="t", phases=(Phase(epochs=10, warmup_epochs=2),))
    r = apply_overrides(base, ["phases.0.epochs=1", "phases.0.warmup_epochs=0"])
    assert (r.phases[0].epochs, r.phases[0].warmup_epochs) == (1, 0)
    with pytest.raises(RecipeError, match="warmup_epochs must be >= 0 and below epochs"):
        apply_overrides(base, ["phases.0.epochs=1"])
