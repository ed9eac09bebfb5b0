"""The full scan of a dataset folder behind `python -m trainer check-data`: its layout, every file's
structure, a decode of every file through DALI's CPU decoder, and files duplicated across splits
(train, and the val/ and test/ folders beside it)."""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from loaders.headers import BadFile, Header, file_headers
from loaders.recovery import decode_failures
from loaders.screening import KINDS, STOP, Finding, header_findings
from loaders.sources import IMAGE_SUFFIXES, class_balance, class_dirs, image_files, imbalance_hint


@dataclass
class DatasetReport:
    root: str
    layout: str  # "train/val", "train/val/test" (a test/ folder beside train/) or "one folder"
    classes: list[str]
    images: dict[str, int]  # per split
    findings: list[Finding]
    decoded: bool
    # per split: {"counts": usable images per class, "ratio": largest/smallest class} (loaders.sources.class_balance)
    balance: dict[str, dict] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """0: clean; 1: findings a run copes with (skips, converts, or trains on); 2: a run would stop."""
        if any(f.action == STOP for f in self.findings):
            return 2
        return 1 if self.findings else 0

    def counts(self) -> dict[str, int]:
        counted = Counter(f.kind for f in self.findings)
        return {kind: counted[kind] for kind in KINDS if counted[kind]}

    def to_dict(self) -> dict:
        return {
            "root": self.root, "layout": self.layout, "classes": self.classes, "images": self.images,
            "decoded": self.decoded, "exit_code": self.exit_code, "counts": self.counts(),
            "class_balance": self.balance, "imbalance_hint": training_hint(self.balance),
            "findings": [f.to_dict() for f in self.findings],
        }


def _layout(root: Path) -> tuple[str, dict[str, dict[str, list[str]]], list[Finding]]:
    """(layout, {split: {class: files}}, dataset-level findings), all of them, not just the first."""
    if not root.is_dir():
        return "none", {}, [Finding("no-data", str(root), "no such folder")]
    splits = ("train", "val", "test") if (root / "train").is_dir() else ("all",)
    found: dict[str, dict[str, list[str]]] = {}
    problems = []
    for split in splits:
        folder = root / split if split != "all" else root
        if split in ("val", "test") and not folder.is_dir():
            continue
        found[split] = {d.name: image_files(d) for d in class_dirs(folder)}
        # A val/ or test/ folder without class folders stops a run as train/ does (sources.image_folder_sources).
        if not found[split]:
            problems.append(Finding("no-data", str(folder), "no class folders (expected <folder>/<class>/<image>)", split))
        for name, files in found[split].items():
            if not files:
                problems.append(Finding("empty-class", str(folder / name), f"no {'/'.join(IMAGE_SUFFIXES)} files", split))
    for split in ("val", "test"):
        for name in sorted(set(found.get(split, {})) - set(found.get("train", {}))):
            problems.append(Finding(f"{split}-only-class", str(root / split / name), "train has no folder of that name", split))
    layout = "one folder" if splits[0] == "all" else "train/val/test" if "test" in found else "train/val"
    return layout, found, problems


def _digest(path: str) -> str:
    digest = hashlib.blake2b()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def duplicates(groups: dict[str, list[str]]) -> list[Finding]:
    """Files with the same bytes in two splits (or, with one split, twice in it: any split may part
    them). Sizes first, so only files whose size occurs twice are hashed (blake2b of the bytes)."""
    by_size: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for split, paths in groups.items():
        for path in paths:
            try:
                by_size[os.path.getsize(path)].append((split, path))
            except OSError:
                continue
    cross = len(groups) > 1
    candidates = [members for members in by_size.values() if len(members) > 1 and (not cross or len({s for s, _ in members}) > 1)]
    by_digest: dict[str, list[tuple[str, str]]] = defaultdict(list)
    paths = [member for members in candidates for member in members]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for (split, path), digest in zip(paths, pool.map(lambda m: _digest(m[1]), paths)):
            by_digest[digest].append((split, path))
    found = []
    for members in by_digest.values():
        splits = {s for s, _ in members}
        if len(members) < 2 or (cross and len(splits) < 2):
            continue
        first_split, first = members[0]
        for split, path in members[1:]:
            if cross and split == first_split:
                continue
            found.append(Finding("duplicate", path, f"same bytes as {first}", split))
    return found


def scan_dataset(
    root: str | os.PathLike,
    *,
    decode: bool = True,
    threads: int = 2,
    progress: Callable[[str, int], Callable[[int], object]] | None = None,
) -> DatasetReport:
    """Every problem of an ImageFolder at once: layout (empty, val-only and test-only classes), each file's
    structure, with `decode` each remaining file through DALI's CPU decoder (the one training uses without
    a GPU), and duplicates across train, val and test. `progress(label, total)` returns a per-file advance
    callable. A test class whose every image is bad is no finding: a run scores the test split it has."""
    root = Path(root)
    layout, found, findings = _layout(root)
    split_of = {"all": "", "train": "train", "val": "val", "test": "test"}
    entries = [(split_of[split], name, path) for split, classes in found.items() for name, files in classes.items() for path in files]
    paths = [path for _, _, path in entries]
    advance = progress("structure", len(paths)) if progress else None
    headers = file_headers(paths, progress=advance)
    bad_paths = set()
    decodable: list[tuple[str, str, Header]] = []
    for (split, _, path), header in zip(entries, headers):
        if isinstance(header, BadFile):
            findings.append(Finding(header.kind, path, header.detail, split))
            bad_paths.add(path)
        else:
            findings.extend(header_findings(header, path, split))
            decodable.append((split, path, header))
    if decode and decodable:
        advance = progress("decode", len(decodable)) if progress else None
        failures = decode_failures([p for _, p, _ in decodable], [h for _, _, h in decodable], num_threads=threads, progress=advance)
        for index, reason in sorted(failures.items()):
            split, path, _ = decodable[index]
            findings.append(Finding("undecodable", path, reason, split))
            bad_paths.add(path)
    train_split = "train" if "train" in found else "all"
    for files in found.get(train_split, {}).values():
        if files and all(path in bad_paths for path in files):
            findings.append(Finding("no-usable-images", str(Path(files[0]).parent), f"all {len(files)} images are bad", split_of[train_split]))
    groups = {split: [p for s, _, p in entries if s == split_of[split] and p not in bad_paths] for split in found}
    findings.extend(duplicates(groups))
    order = {kind: n for n, kind in enumerate(KINDS)}
    findings.sort(key=lambda f: (order[f.kind], f.path))
    return DatasetReport(
        root=str(root), layout=layout, classes=sorted(found.get(train_split, {})),
        images={split: sum(len(files) for files in classes.values()) for split, classes in found.items()},
        findings=findings, decoded=decode,
        balance={split_of[split] or "all": class_balance({name: sum(p not in bad_paths for p in files) for name, files in classes.items()})
                 for split, classes in found.items()},
    )


def report_lines(report: DatasetReport, shown: int = 10) -> Iterable[str]:
    """The human-readable report: a table of kinds, then the first `shown` paths of each."""
    images = ", ".join(f"{n} {split}" if split != "all" else str(n) for split, n in report.images.items())
    yield f"{report.root}: {report.layout}, {len(report.classes)} classes, {images or 0} images" + (
        "" if report.decoded else " (structure only, not decoded)"
    )
    yield from balance_lines(report.balance)
    counts = report.counts()
    if not counts:
        yield "no problems found"
        return
    yield ""
    yield f"{'problem':<18} {'count':>7}  in training"
    for kind, count in counts.items():
        yield f"{kind:<18} {count:>7}  {KINDS[kind].action}"
    by_kind = defaultdict(list)
    for finding in report.findings:
        by_kind[finding.kind].append(finding)
    for kind, members in by_kind.items():
        yield ""
        yield f"{kind} ({KINDS[kind].meaning}): {len(members)}"
        for f in members[:shown]:
            yield f"  {f.path}" + (f"  ({f.detail})" if f.detail else "")
        if len(members) > shown:
            yield f"  ... and {len(members) - shown} more (--json lists all)"


def balance_lines(balance: dict[str, dict], shown: int = 20) -> Iterable[str]:
    """Images per class (usable ones) and the largest/smallest ratio per split, then the hint when unbalanced."""
    for split, summary in balance.items():
        counts = summary["counts"]
        ratio = f"{summary['ratio']:.1f}" if summary["ratio"] is not None else "inf (an empty class)"
        listed = ", ".join(f"{name} {n}" for name, n in list(counts.items())[:shown])
        more = f", ... {len(counts) - shown} more" if len(counts) > shown else ""
        yield f"{split}: imbalance ratio {ratio} (largest/smallest class); per class: {listed}{more}"
    hint = training_hint(balance)
    if hint:
        yield f"hint: {hint}"


def training_hint(balance: dict[str, dict]) -> str | None:
    """The imbalance hint from the splits a run's choices answer to (train and val, or one folder), as a run
    gives it in run.json: the test split trains and selects nothing, so its ratio is reported, not hinted on."""
    return imbalance_hint(*(summary for split, summary in balance.items() if split != "test"))
