"""The recipe's data: its train, val (and test) sources (an ImageFolder, `builtin:digits` or a Hugging Face
dataset) screened for bad files, what the screening found, and each phase's stratified subset."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loaders.digits import resolve_data_path
from loaders.hf import PREFIX as HF_PREFIX
from loaders.hf import HFDatasetSource, hf_sources
from loaders.screening import screen_splits, screen_test, screening_lines, screening_record
from loaders.sources import ImageFolderSource, image_folder_sources, stratified_split
from trainer.atomic import write_text_atomic
from trainer.recipe import Recipe, RecipeError
from trainer.run_folder import BAD_FILES, SUBSET_FILE, read_json


@dataclass
class Splits:
    """Train and val sources: anything with `read(i)`, `labels`, `classes` and `subset()`."""

    train: ImageFolderSource | HFDatasetSource
    val: ImageFolderSource | HFDatasetSource
    # The untouched test split (a test/ folder, an HF test split or data.test_fraction), scored once at the
    # run's end (trainer.holdout); None when the data have none.
    test: ImageFolderSource | HFDatasetSource | None = None


def load_splits(recipe: Recipe) -> Splits:
    """The recipe's train and val sources (an ImageFolder, `builtin:digits` or `hf:...`), screened."""
    if not recipe.data.path:
        raise RecipeError("no data: pass --data PATH (an ImageFolder) or set data.path in the recipe")
    if recipe.data.path.startswith(HF_PREFIX):
        train_src, val_src, test_src = hf_sources(recipe.data.path, recipe.data.val_fraction, recipe.data.test_fraction, recipe.seed)
    else:
        train_src, val_src, test_src = image_folder_sources(
            resolve_data_path(recipe.data.path), recipe.data.val_fraction, recipe.data.test_fraction, recipe.seed
        )
    # Files the decoder would fail on are found here, by a header check (no decode), on every process
    # alike: what is skipped is a function of the files' bytes, so all ranks and every resume agree.
    train_src, val_src = screen_splits(train_src, val_src, recipe.data.bad_files)
    test_src = screen_test(test_src, recipe.data.bad_files) if test_src is not None else None
    return Splits(train=train_src, val=val_src, test=test_src)


def report_bad_files(splits: Splits, recipe: Recipe, run_path: Path, accelerator) -> None:
    """What the check before training skipped and what the decoder will convert: printed, and listed
    in <run>/bad_files.json (files a loader replaces later, mid-run, are logged as they are found)."""
    record = screening_record(splits.train, splits.val, recipe.data.bad_files, splits.test)
    path = run_path / BAD_FILES
    if accelerator.is_main_process:
        write_text_atomic(path, json.dumps(record, indent=2))
    for line in screening_lines(record, str(path)):
        accelerator.print(line)


def phase_splits(splits: Splits, recipe: Recipe, index: int, run_path: Path, accelerator) -> tuple[Splits, dict]:
    """The phase's training data: all of it, or a stratified `subset` of each class. The chosen
    indices are cached in <run>/<phase>/subset.json and read back by every process, so all ranks
    and every resume use the same list."""
    phase = recipe.phases[index]
    if phase.subset >= 1.0:
        return splits, {}
    cache = run_path / phase.name / SUBSET_FILE
    if accelerator.is_main_process and not cache.exists():
        _, chosen = stratified_split(splits.train.labels, phase.subset, seed=recipe.seed + 7919 * (index + 1))
        chosen_src = splits.train.subset(chosen)
        record = {"fraction": phase.subset, "indices": chosen.tolist(), "class_counts": chosen_src.class_counts()}
        write_text_atomic(cache, json.dumps(record))
    accelerator.wait_for_everyone()
    record = read_json(cache)
    subset = splits.train.subset(record["indices"])
    counts = record["class_counts"]
    accelerator.print(
        f"[{phase.name}] subset {phase.subset:.0%}: {len(subset)} of {len(splits.train)} training images, "
        f"{min(counts.values())}-{max(counts.values())} per class (list in {cache})"
    )
    return Splits(train=subset, val=splits.val), counts
