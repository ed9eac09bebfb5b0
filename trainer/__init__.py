"""Recipe-driven image-classifier training: `Recipe`/`Phase` describe a run, `run(recipe)` trains it."""

from trainer.recipe import Data, Logging, Model, Phase, Push, Recipe, RecipeError, apply_overrides

__all__ = ["Data", "Logging", "Model", "Phase", "Push", "Recipe", "RecipeError", "apply_overrides", "run", "train"]


def run(recipe: Recipe, argv: list[str] | None = None):
    """Train `recipe` with the command line's overrides (`sys.argv` when argv is None); returns the run folder.

    The listing and stat of the dataset's files start first, in child processes (`loaders.survey`), so
    that they run beside the imports of torch, timm and DALI instead of after them."""
    import gc
    import sys

    from trainer.command_line import early_survey, parse_args

    args = parse_args(sys.argv[1:] if argv is None else argv)
    survey = early_survey(recipe, args)
    # Importing torch, timm and DALI builds ~440,000 objects that live as long as the process: the
    # collector's sweeps of them while they are built were 0.8 s of the imports' 3.0 s here. A command
    # (argv None) then freezes them out of its reach before it collects again: the first collection
    # after the imports would walk them all once more (0.27 s), and the later ones during the run and at
    # exit every time.
    gc.disable()
    try:
        from trainer import launch

        if argv is None:
            gc.freeze()
    finally:
        gc.enable()
    return launch.run(recipe, argv, survey=survey)


def __getattr__(name: str):
    # `train` brings torch, accelerate and DALI: loaded when asked for, so that `python -m trainer --help`,
    # the tools that only read run folders, and `run` until its survey is started, do without them.
    if name == "train":
        from trainer import launch

        return launch.train
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
