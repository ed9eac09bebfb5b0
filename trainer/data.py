"""The recipe's data: its train, val (and test) sources (an ImageFolder, `builtin:digits` or a Hugging Face
dataset) screened for bad files, what the screening found, and each phase's stratified subset."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch.distributed

from loaders.digits import resolve_data_path
from loaders.header_table import ALONE, Processes
from loaders.hf import PREFIX as HF_PREFIX
from loaders.hf import HFDatasetSource, hf_sources
from loaders.screening import check_sources, screen_splits, screen_test, screening_lines, screening_record
from loaders.sources import ImageFolderSource, image_folder_sources, stratified_split
from loaders.survey import Survey
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
    check_note: str = ""  # what the structure check read and took from its cache, for the console


def load_splits(recipe: Recipe, survey: Survey | None = None) -> Splits:
    """The recipe's train and val sources (an ImageFolder, `builtin:digits` or `hf:...`), screened.
    `survey`: the folder's listing and stats, started earlier in child processes (`loaders.survey`)."""
    if not recipe.data.path:
        raise RecipeError("no data: pass --data PATH (an ImageFolder) or set data.path in the recipe")
    root = listing = None
    if recipe.data.path.startswith(HF_PREFIX):
        train_src, val_src, test_src = hf_sources(recipe.data.path, recipe.data.val_fraction, recipe.data.test_fraction, recipe.seed)
    else:
        root = resolve_data_path(recipe.data.path)
        listing = survey.result() if survey is not None and survey.root == root else None
        train_src, val_src, test_src = image_folder_sources(
            root, recipe.data.val_fraction, recipe.data.test_fraction, recipe.seed, listing=listing
        )
    # Files the decoder would fail on are found here, by a header check (no decode): each process checks
    # its share of the files the header cache does not hold and all get every result, so all ranks and
    # every resume skip the same files (a function of the files' bytes).
    sources = [train_src, val_src] + ([test_src] if test_src is not None else [])
    tables, note = check_sources(sources, root, run_processes())
    if listing is not None and all(getattr(s, "file_stats", None) is not None for s in sources):
        note += f"; listed and stat'ed beside the imports ({listing.files:,} files in {listing.seconds:.1f} s)"
    train_src, val_src = screen_splits(train_src, val_src, recipe.data.bad_files, tables[:2])
    test_src = screen_test(test_src, recipe.data.bad_files, tables[2]) if test_src is not None else None
    return Splits(train=train_src, val=val_src, test=test_src, check_note=note)


def run_processes() -> Processes:
    """The processes of this run as torch.distributed knows them (after the Accelerator started them);
    this process alone when there is no process group (a tool, or one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ALONE

    def gather(obj):
        out = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(out, obj)
        return out

    return Processes(torch.distributed.get_rank(), torch.distributed.get_world_size(), gather)


def data_checksum(splits: Splits) -> str:
    """A digest of every split's files, labels, stored sizes and findings: equal on every process."""
    digest = hashlib.sha256()
    for part in fields(splits):
        source = getattr(splits, part.name)
        if not hasattr(source, "labels"):
            continue
        digest.update(part.name.encode())
        digest.update("\0".join(getattr(source, "files", ())).encode("utf-8", "surrogateescape"))
        digest.update(source.labels.tobytes())
        digest.update(b"" if source.sizes is None else source.sizes.tobytes())
        digest.update(repr(source.findings).encode())
    return digest.hexdigest()


def report_bad_files(splits: Splits, recipe: Recipe, run_path: Path, accelerator) -> None:
    """What the check before training skipped and what the decoder will convert: printed, and listed
    in <run>/bad_files.json (files a loader replaces later, mid-run, are logged as they are found)."""
    record = screening_record(splits.train, splits.val, recipe.data.bad_files, splits.test)
    path = run_path / BAD_FILES
    if splits.check_note:
        accelerator.print(splits.check_note)
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
