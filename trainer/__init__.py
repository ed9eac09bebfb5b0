"""Recipe-driven image-classifier training: `Recipe`/`Phase` describe a run, `run(recipe)` trains it."""

from trainer.recipe import Data, Logging, Model, Phase, Push, Recipe, RecipeError, apply_overrides
from trainer.run import run, train

__all__ = ["Data", "Logging", "Model", "Phase", "Push", "Recipe", "RecipeError", "apply_overrides", "run", "train"]
