"""A recipe's command line: its arguments, and the work a run starts before it imports torch.

Nothing here imports torch, timm or DALI: `trainer.run` uses it to start surveying the dataset
(`loaders.survey`: listing and stat'ing every file, in child processes) and only then imports them."""

from __future__ import annotations

import argparse
from pathlib import Path

from loaders.digits import BUILTIN
from loaders.hf import PREFIX as HF_PREFIX
from loaders.survey import Survey, start_survey
from trainer.recipe import Recipe, resolve_recipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the recipe in this file.",
        epilog="Example: accelerate launch recipes/quickstart.py --set phases.0.epochs=2",
    )
    parser.add_argument("--data", help="dataset folder (overrides data.path)")
    parser.add_argument("--run-dir", help="run folder (default: <runs_root>/<name>-<timestamp>)")
    parser.add_argument(
        "--resume",
        help='"auto": continue the newest complete checkpoint of --run-dir (or of the newest run of this '
        "recipe); or a run folder or checkpoint folder",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field, e.g. phases.0.epochs=2 (repeatable)")
    return parser.parse_args(argv)


def early_survey(recipe: Recipe, args: argparse.Namespace) -> Survey | None:
    """The survey of the run's ImageFolder, started now; None for the built-in and Hugging Face datasets,
    and when the recipe or the folder is wrong (the run reports that itself, after its imports)."""
    try:
        path = resolve_recipe(recipe, args.set, args.data).data.path
    except ValueError:  # RecipeError: reported by the run
        return None
    if not path or path in BUILTIN or path.startswith(HF_PREFIX):
        return None
    return start_survey(Path(path).expanduser())
