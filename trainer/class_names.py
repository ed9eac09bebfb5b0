"""Class names for people: when every class folder of a run is an ImageNet synset (a WordNet id such as
`n01440764`), its name is the first lemma of timm's own ImageNet metadata (`timm.data.ImageNetInfo`:
"tench, Tinca tinca" → "tench"); for any other dataset the folder names are the names.

The folder names stay the classes everywhere data are matched (run.json, eval.json, the bundle's
`classes`); these names are what the bundle's `display_names`, `predict`, `eval`'s table, the report and
the Space show. Two synsets of one run with the same first lemma (ImageNet-1k has two "crane"s and two
"maillot"s) get their wnid added, "crane (n02012849)", so that a name still means one class.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from timm.data import ImageNetInfo

WNID = re.compile(r"n\d{8}")
# The largest of timm's ImageNet subsets: its lemma table covers ImageNet-1k, -12k and -21k alike.
SUBSET = "imagenet-22k"


def imagenet_descriptions(classes: Sequence[str]) -> dict[str, str] | None:
    """{wnid: timm's description (its WordNet lemmas, "tench, Tinca tinca")} when every class is a
    synset timm knows, else None."""
    if not classes or not all(WNID.fullmatch(name) for name in classes):
        return None
    info = ImageNetInfo(SUBSET)
    try:
        return {name: info.label_name_to_description(name) for name in classes}
    except KeyError:  # shaped like a wnid, but no synset of ImageNet
        return None


def display_names(classes: Sequence[str]) -> list[str]:
    """The name to show for each class, in label order: the first lemma for ImageNet synsets, else the
    folder name itself."""
    descriptions = imagenet_descriptions(classes)
    if descriptions is None:
        return list(classes)
    short = [descriptions[name].split(",")[0].strip() for name in classes]
    count = Counter(short)
    return [f"{name} ({wnid})" if count[name] > 1 else name for name, wnid in zip(short, classes)]
