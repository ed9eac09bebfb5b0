"""`python -m trainer <command>`: tools that work on a recipe file without training it (lr-find so far)."""

from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from loaders.sources import DataError
from trainer.recipe import Recipe, RecipeError
from trainer.run import resolve_recipe


def load_recipe(path: str) -> Recipe:
    """The module-level `RECIPE` of a recipe file, imported by path (its `if __name__ == "__main__"` does not run)."""
    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    # As `python recipes/x.py` would: the recipe's folder is importable, so it may import its neighbours.
    sys.path.insert(0, str(file.resolve().parent))
    spec = importlib.util.spec_from_file_location(f"_recipe_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in the recipe look their module up here
    written = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # leave no __pycache__ beside the recipe
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = written
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"{path} defines no module-level RECIPE = Recipe(...)")
    return recipe


def pick_phase(recipe: Recipe, name: str | None) -> int:
    """The phase index for `--phase` (a name, or an index as in `--set phases.0...`); the first by default."""
    names = [p.name for p in recipe.phases]
    if name is None:
        return 0
    if name in names:
        return names.index(name)
    if name.isdigit() and int(name) < len(names):
        return int(name)
    raise RecipeError(f"unknown phase {name!r}; the phases of recipe {recipe.name!r} are: {', '.join(names)}")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe file and the same overrides as a training run (`--data`, `--set`)."""
    parser.add_argument("recipe", help="recipe file, e.g. recipes/quickstart.py")
    parser.add_argument("--data", help="dataset folder (overrides data.path)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field, e.g. phases.0.epochs=2 (repeatable)")


# -- lr-find ---------------------------------------------------------------------------------------


def add_lr_find(subparsers) -> None:
    parser = subparsers.add_parser(
        "lr-find",
        help="LR range test on a recipe phase: plot, JSON series and a suggested lr_per_256",
        description="Train a fresh copy of the recipe's model on one phase with an exponentially rising LR "
        "(Leslie Smith's range test) and suggest the LR where the smoothed loss falls fastest. "
        "Writes only the plot and its JSON: no run folder, checkpoint or W&B run.",
    )
    add_recipe_arguments(parser)
    parser.add_argument("--phase", help="phase name (or index); default: the first phase")
    parser.add_argument("--out", default="lr_find.png", help="plot path; the JSON series goes beside it (default: lr_find.png)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer updates, across epochs if needed (default: 100)")
    parser.add_argument("--start-lr", type=float, default=1e-7, help="first LR (default: 1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="last LR (default: 10)")
    parser.set_defaults(command=run_lr_find, check=functools.partial(check_lr_find, parser))


def check_lr_find(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps < 2:
        parser.error(f"--steps must be >= 2, got {args.steps}")
    if not 0 < args.start_lr < args.end_lr:
        parser.error(f"need 0 < --start-lr < --end-lr, got {args.start_lr} and {args.end_lr}")
    if Path(args.out).suffix.lower() == ".json":
        parser.error("--out names the plot; the JSON is written beside it with the same stem")


def run_lr_find(args: argparse.Namespace) -> None:
    # Imported here: `python -m trainer --help` need not load torch and DALI.
    from trainer.lr_find import lr_find, save_result

    recipe = resolve_recipe(load_recipe(args.recipe), args)
    index = pick_phase(recipe, args.phase)
    phase = recipe.phases[index]
    print(f"lr-find: recipe {recipe.name}, phase {index} {phase.name!r}, {args.steps} steps, lr {args.start_lr:g} -> {args.end_lr:g}", flush=True)
    result = lr_find(recipe, index, steps=args.steps, start_lr=args.start_lr, end_lr=args.end_lr)
    for note in result.weights:
        print(note)
    out = Path(args.out)
    json_path = save_result(result, out)
    print(f"ran {len(result.lrs)} of {result.steps} steps ({result.stop_reason}), global batch {result.global_batch} "
          f"({phase.batch_size_per_device} per device x {phase.grad_accum_steps} accumulation), {result.precision}")
    if result.suggested_lr is None:
        print("no suggestion: fewer than two steps ran (the loss was not finite); try a lower --start-lr")
    else:
        print(f"suggested lr: {result.suggested_lr:.3g} (steepest descent of the smoothed loss)")
        print(f"as lr_per_256 for a global batch of {result.global_batch}: {result.suggested_lr_per_256:.3g}")
        print(f"  {result.set_line}")
    print(f"plot: {out}")
    print(f"series: {json_path}")


# -- entry point -----------------------------------------------------------------------------------

SUBCOMMANDS: tuple[Callable, ...] = (add_lr_find,)  # a new subcommand: one more add_<name> here


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Tools that work on a recipe file.")
    subparsers = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    args.check(args)  # flag combinations, reported by the subcommand's own parser (usage, exit 2)
    try:
        args.command(args)
    except (RecipeError, DataError) as err:
        # As a training run: a clear line and exit status 2, no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
