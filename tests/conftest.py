"""Shared fixtures: a tiny ImageNet-like folder of real JPEGs, and a way to run recipes as users do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("n01440764", "n01443537", "n01484850")


def write_image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """root/<split>/<wnid>/<name>.JPEG with varied sizes; each class has its own colour cast."""
    rng = np.random.default_rng(seed)
    for split, count in per_class.items():
        for c, wnid in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = rng.integers(40, 97, size=2)
                base = np.zeros((h, w, 3), np.float32)
                base[..., c] = 180
                pixels = (base + rng.normal(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("tiny-imagenet"), {"train": 32, "val": 8})


@pytest.fixture(scope="session")
def run_env(tmp_path_factory) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DISABLE_GIT="true",
        IMGCLS_CACHE=str(tmp_path_factory.mktemp("cache")),
        PYTHONUNBUFFERED="1",
    )
    env.pop("WANDB_API_KEY", None)
    return env


# Small, fast settings for the quickstart recipe on the tiny folder.
FAST = [
    "model.arch=resnet10t",
    "phases.0.res_px=32",
    "phases.0.eval_res_px=32",
    "phases.0.batch_size_per_device=8",
    "phases.0.hflip_prob=0.5",
    "logging.progress_bar=false",
    "logging.log_every_steps=1",
]


def recipe_command(recipe: str, *args: str, sets: list[str] = (), launcher: list[str] | None = None) -> list[str]:
    cmd = list(launcher) if launcher else [sys.executable]
    cmd += [str(REPO / "recipes" / recipe), *args]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def run_recipe(recipe: str, *args: str, env: dict, sets: list[str] = (), launcher=None, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(
        recipe_command(recipe, *args, sets=sets, launcher=launcher),
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )
    return done
