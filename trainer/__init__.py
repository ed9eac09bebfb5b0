"""Recipe-driven image-classifier training: `Recipe`/`Phase` describe a run, `run(recipe)` trains it."""

from trainer.recipe import Data, Logging, Model, Phase, Push, Recipe, RecipeError, apply_overrides

__all__ = ["Data", "Logging", "Model", "Phase", "Push", "Recipe", "RecipeError", "apply_overrides", "run", "train"]


def __getattr__(name: str):
    # `run` and `train` bring torch, accelerate and DALI: loaded when a recipe asks for them, so that
    # `python -m trainer --help` and the tools that only read run folders start in a second.
    if name in ("run", "train"):
        from trainer import launch

        return getattr(launch, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
