"""ImageNet's validation folder as it is distributed, made into the `val/<wnid>/` layout the loaders read:
`python -m trainer prepare-imagenet VAL_DIR --labels FILE [--out DIR] [--meta meta.mat]`.

ImageNet ships its 50,000 validation images flat (`ILSVRC2012_val_00000001.JPEG` ...) with the labels in a
separate file. Three label files are read:
- Kaggle's `LOC_val_solution.csv`: `ImageId,PredictionString`, the wnid is the prediction's first token;
- the devkit's `ILSVRC2012_validation_ground_truth.txt`: one ILSVRC2012_ID per line, line i for image i,
  with the ID → wnid table of the devkit's `data/meta.mat` (the IDs are not the sorted-wnid order);
- a two-column text file, `ILSVRC2012_val_00000001.JPEG n01751748` per line.

Every image is linked, never copied, into `<out>/<wnid>/`: a hard link when `out` is on the same
filesystem (no space used, and the link survives the original's removal), else a symlink. The folder is
checked against the label file before anything is linked (files missing, files without a label, a wnid
that is not one of ImageNet-1k's); a folder that does not match is refused whole. A class folder appears
whole or not at all (built under `.tmp-<wnid>`, which the loaders skip, then renamed), so a run started
after an interrupted one never sees half a class; running the command again finishes the work, and a run
on a prepared folder changes nothing.
"""

from __future__ import annotations

import csv
import errno
import importlib.util
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import scipy.io

from loaders.sources import IMAGE_SUFFIXES, DataError
from trainer.atomic import staging_path

KAGGLE_HEADER = ("ImageId", "PredictionString")
META_FILE = "meta.mat"  # beside the ground truth in the devkit: ILSVRC2012_devkit_t12/data/
WNID = re.compile(r"n\d{8}")
SHOWN = 5  # examples named per problem in a refusal
# Errors of os.link that mean "not here" rather than "broken": another filesystem, a filesystem without
# hard links, or a kernel that refuses links to files the user does not own (fs.protected_hardlinks).
NO_HARD_LINK = {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EACCES}


@dataclass
class Prepared:
    """What `prepare_val` did: `linked` is 0 on a folder prepared before."""

    out: Path
    images: int
    classes: int
    linked: int
    link_kind: str  # "hard links", "symlinks", or "" when nothing was linked
    label_format: str


def imagenet_synsets() -> frozenset[str]:
    """ImageNet-1k's 1,000 wnids: the list in timm's package data that `timm.data.ImageNetInfo` reads,
    found by path so that this command loads neither timm nor torch."""
    spec = importlib.util.find_spec("timm")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "_info" / "imagenet_synsets.txt"
    return frozenset(path.read_text().split())


def _examples(items, count: int = SHOWN) -> str:
    items = list(items)
    return ", ".join(map(str, items[:count])) + (f", ... ({len(items)} in all)" if len(items) > count else "")


def _stem(name: str) -> str:
    """`ILSVRC2012_val_00000001` from the file name or the bare id (os.path, not pathlib: 50,000 names)."""
    root, suffix = os.path.splitext(name)
    return root if suffix.lower() in IMAGE_SUFFIXES else name


def _refuse_malformed(path: Path, kind: str, bad: list[str]) -> None:
    if bad:
        raise DataError(f"{path} is not a well-formed {kind}: {len(bad)} lines cannot be read ({_examples(bad, 3)})")


def _read_kaggle(path: Path, lines: list[str]) -> list[tuple[str, str]]:
    rows, bad = [], []
    for number, row in enumerate(csv.reader(lines), 1):
        if number == 1 or not row:
            continue
        tokens = row[1].split() if len(row) == 2 else []
        if not tokens or not row[0].strip():
            bad.append(f"line {number}: {','.join(row)[:80]!r}")
            continue
        rows.append((_stem(row[0].strip()), tokens[0]))
    _refuse_malformed(path, "LOC_val_solution.csv (ImageId,PredictionString)", bad)
    return rows


def devkit_ids(meta: Path) -> dict[int, str]:
    """{ILSVRC2012_ID: wnid} of the 1,000 leaf synsets in the devkit's meta.mat."""
    try:
        synsets = scipy.io.loadmat(str(meta), squeeze_me=True)["synsets"]
        table = zip(synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["num_children"])
        return {int(i): str(w) for i, w, children in table if int(children) == 0}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{meta} is not the devkit's meta.mat (a 'synsets' table with ILSVRC2012_ID, WNID, num_children): {err}") from None


def _read_devkit(path: Path, lines: list[str], meta: Path | None) -> list[tuple[str, str]]:
    meta = meta or path.parent / META_FILE
    if not meta.is_file():
        raise DataError(
            f"{path.name} gives ILSVRC2012_IDs, whose wnids are in the devkit's {META_FILE}, and there is none at {meta}: "
            f"pass --meta PATH/TO/{META_FILE} (ILSVRC2012_devkit_t12/data/{META_FILE})"
        )
    ids = devkit_ids(meta)
    rows, bad, unknown = [], [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not line.strip().isdigit():
            bad.append(f"line {number}: {line[:80]!r}")
        elif int(line) not in ids:
            unknown.append(f"line {number}: {int(line)}")
        else:
            rows.append((f"ILSVRC2012_val_{number:08d}", ids[int(line)]))
    _refuse_malformed(path, "devkit ground truth (one ILSVRC2012_ID per line)", bad)
    if unknown:
        raise DataError(f"{path} names {len(unknown)} IDs that are no leaf synset of {meta} ({_examples(unknown, 3)}): is it the meta.mat of the same devkit?")
    return rows


def _read_two_columns(path: Path, lines: list[str]) -> list[tuple[str, str]]:
    rows, bad = [], []
    for number, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != 2 or tokens[1].isdigit():
            bad.append(f"line {number}: {line[:80]!r}")
            continue
        rows.append((_stem(tokens[0]), tokens[1]))
    if bad and all(len(line.split()) == 2 for line in lines if line.strip()):
        raise DataError(f"{path} gives class numbers, not wnids ({_examples(bad, 3)}); number-to-class orders differ between "
                        "sources, so only wnids are read: use LOC_val_solution.csv or the devkit's ground truth with meta.mat")
    _refuse_malformed(path, "two-column label file (<file> <wnid>)", bad)
    return rows


def read_labels(path: str | os.PathLike, meta: str | os.PathLike | None = None) -> tuple[dict[str, str], str]:
    """({image id: wnid}, the format's name) from any of the three label files, told apart by content."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"label file {path} does not exist")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    if tuple(part.strip() for part in first.split(",")) == KAGGLE_HEADER:
        rows, kind = _read_kaggle(path, lines), "Kaggle LOC_val_solution.csv"
    elif first.isdigit():
        rows, kind = _read_devkit(path, lines, Path(meta) if meta else None), f"devkit ground truth with {meta or path.parent / META_FILE}"
    elif len(first.split()) == 2:
        rows, kind = _read_two_columns(path, lines), "two-column <file> <wnid>"
    else:
        raise DataError(
            f"{path} is none of the label files read here: Kaggle's LOC_val_solution.csv (header ImageId,PredictionString), "
            "the devkit's ILSVRC2012_validation_ground_truth.txt (one ID per line) or '<file> <wnid>' lines"
        )
    if not rows:
        raise DataError(f"{path} labels no image")
    twice = [stem for stem, n in Counter(stem for stem, _ in rows).items() if n > 1]
    if twice:
        raise DataError(f"{path} labels {len(twice)} images more than once ({_examples(sorted(twice))})")
    return dict(rows), kind


def _image_files(folder: Path) -> dict[str, str]:
    """{image id: file name} of the images directly in `folder` (its class folders are not looked into)."""
    with os.scandir(folder) as entries:
        return {_stem(e.name): e.name for e in entries
                if not e.name.startswith(".") and e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file()}


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def prepare_val(val_dir: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike | None = None,
                meta: str | os.PathLike | None = None) -> Prepared:
    """Link the flat images of `val_dir` into `out/<wnid>/` (default: `val_dir` itself; its flat files
    stay, and the loaders read only the class folders). Raises DataError, before linking anything, when
    the folder and the label file do not match."""
    val_dir = Path(val_dir)
    if not val_dir.is_dir():
        raise DataError(f"{val_dir} is not a folder: pass ImageNet's validation folder (ILSVRC2012_val_*.JPEG)")
    by_id, kind = read_labels(labels, meta)
    out = Path(out) if out is not None else val_dir
    known = imagenet_synsets()
    present = _image_files(val_dir)
    # Paths as strings joined by os.path: pathlib's objects cost more than the links themselves at 50,000 files.
    source_dir, out_dir = os.path.abspath(val_dir), str(out)
    sources = {stem: os.path.join(source_dir, name) for stem, name in present.items()}
    targets = {stem: (wnid, os.path.join(out_dir, wnid, present.get(stem, f"{stem}.JPEG"))) for stem, wnid in by_id.items()}

    unknown = Counter(wnid for wnid in by_id.values() if wnid not in known)
    missing = sorted(stem for stem in by_id if stem not in present and not os.path.isfile(targets[stem][1]))
    extra = sorted(name for stem, name in present.items() if stem not in by_id)
    clashing = sorted(t for stem, (_, t) in targets.items() if stem in present and os.path.lexists(t) and not _same_file(t, sources[stem]))
    expected = defaultdict(set)
    for wnid, target in targets.values():
        expected[wnid].add(os.path.basename(target))
    stray = sorted(os.path.join(out_dir, wnid, name) for wnid, names in expected.items() if os.path.isdir(os.path.join(out_dir, wnid))
                   for name in os.listdir(os.path.join(out_dir, wnid)) if not name.startswith(".") and name not in names)
    problems = []
    if missing:
        problems.append(f"{len(missing)} labelled images are not in {val_dir} ({_examples(missing)})")
    if extra:
        problems.append(f"{len(extra)} images of {val_dir} have no label ({_examples(extra)})")
    if unknown:
        problems.append(f"{len(unknown)} wnids are not ImageNet-1k classes ({_examples(f'{w} ({n} images)' for w, n in sorted(unknown.items()))})")
    if clashing:
        problems.append(f"{len(clashing)} files in {out} have the name of a link to make but are other files ({_examples(clashing)})")
    if stray:
        problems.append(f"{len(stray)} files in {out}'s class folders are not those the label file puts there ({_examples(stray)})")
    if problems:
        raise DataError(
            f"{val_dir} does not match {labels} ({kind}: {len(by_id)} images, {len(expected)} classes): "
            + "; ".join(problems) + ". Nothing was linked: check that the folder is ImageNet's validation folder and the file its labels"
        )

    todo: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for stem, (wnid, target) in targets.items():
        if not os.path.lexists(target):
            todo[wnid].append((sources[stem], os.path.basename(target)))
    try:
        out.mkdir(parents=True, exist_ok=True)
        link_kind = _link_all(todo, out)
    except PermissionError as err:
        raise DataError(f"cannot write into {out} ({err}): pass --out DIR on a writable filesystem") from None
    return Prepared(out, len(by_id), len(expected), sum(map(len, todo.values())), link_kind, kind)


def _link_all(todo: dict[str, list[tuple[str, str]]], out: Path) -> str:
    """Make the links of `todo` ({wnid: [(source, link name)]}): hard links until the filesystem refuses one
    (another filesystem, no hard links, a file the user does not own), symlinks from then on."""
    hard = True
    made = set()

    def link(source: str, target: str) -> None:
        nonlocal hard
        if hard:
            try:
                os.link(source, target)
                made.add("hard links")
                return
            except OSError as err:
                if err.errno not in NO_HARD_LINK:
                    raise
                hard = False
        os.symlink(source, target)
        made.add("symlinks")

    for wnid, pairs in sorted(todo.items()):
        folder = out / wnid
        if folder.is_dir():  # a class folder from before that lacks files: completed in place
            for source, name in pairs:
                link(source, os.path.join(folder, name))
            continue
        staged = staging_path(folder)
        shutil.rmtree(staged, ignore_errors=True)  # a leftover of an interrupted run
        staged.mkdir()
        for source, name in pairs:
            link(source, os.path.join(staged, name))
        os.replace(staged, folder)
    return " and ".join(sorted(made))

