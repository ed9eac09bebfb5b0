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
def tiny_imagenet_with_test(tmp_path_factory) -> Path:
    """tiny_imagenet's train and val, byte for byte (the same draws), and a test/ of 8 images per class."""
    return write_image_folder(tmp_path_factory.mktemp("tiny-imagenet-test"), {"train": 32, "val": 8, "test": 8})


@pytest.fixture(scope="session")
def bad_folder(tmp_path_factory) -> Path:
    """48 train + 12 val good JPEGs, then every file fault of `bad_files`: 57 train files (54 usable), 15 val (14)."""
    from bad_files import inject_file_faults

    root = write_image_folder(tmp_path_factory.mktemp("bad-data"), {"train": 16, "val": 4})
    inject_file_faults(root)
    return root


def weights_file(path: Path, arch: str, num_classes: int, head: str = "") -> str:
    """A timm model's random weights for `num_classes` (with `head`) saved as safetensors."""
    import timm
    from safetensors.torch import save_file

    from trainer.transfer import ensure_head

    model = timm.create_model(arch, num_classes=num_classes)
    if head:
        ensure_head(model, head, num_classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> dict[str, str]:
    """Init files next to the 3-class tiny ImageNet: one for 5 classes, one for 3, another arch, a damaged one."""
    folder = tmp_path_factory.mktemp("inits")
    (folder / "damaged.safetensors").write_bytes(b"\x00not safetensors" * 10)
    (folder / "a_file").write_text("not a folder")
    return {
        "five": weights_file(folder / "five.safetensors", "resnet10t", 5),
        "three": weights_file(folder / "three.safetensors", "resnet10t", 3),
        "three_mlp": weights_file(folder / "three_mlp.safetensors", "resnet10t", 3, head="mlp:16"),
        "resnet18": weights_file(folder / "resnet18.safetensors", "resnet18", 3),
        "damaged": str(folder / "damaged.safetensors"),
        "a_file": str(folder / "a_file"),
    }


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Path:
    """A stand-in for downloaded ImageNet weights: a resnet10t state dict with a 1000-class head."""
    return Path(weights_file(tmp_path_factory.mktemp("weights") / "resnet10t.safetensors", "resnet10t", 1000))


def fill_placeholders(args: list[str], files: dict[str, str], missing: Path) -> list[str]:
    return [a.format(missing=missing, **files) for a in args]


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


def two_cpu_launcher(port: int) -> list[str]:
    """`accelerate launch` for 2 gloo processes on this CPU (with ACCELERATE_USE_CPU=1 in the env; a
    plain `--cpu --num_processes 2` silently runs one). Each test takes its own port: tests may overlap."""
    import shutil

    return [
        shutil.which("accelerate", path=str(REPO / ".venv" / "bin")) or "accelerate",
        "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
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


# Per-epoch records that measure time, not training: they differ between any two runs.
TIMING_KEYS = frozenset({"images_per_s", "data_wait_share", "step_ms_p50", "step_ms_p90", "step_ms_p99", "gpu_mem_gib"})


def history_without_timings(run_dir: Path) -> list[dict]:
    import json

    lines = (Path(run_dir) / "history.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


# A 3-epoch run with mid-epoch checkpoints, EMA, warmup and stochastic depth: what the interrupted
# runs (SIGKILL, SIGTERM, a full disk) are compared against, bit for bit.
RESUME_SETS = FAST + [
    "phases.0.epochs=3",
    "phases.0.res_px=48",
    "phases.0.checkpoint_every_steps=4",
    "phases.0.ema_decay=0.9",
    "phases.0.warmup_epochs=1",
    "model.drop_path_rate=0.1",  # draws from the torch RNG every step: its state must be restored too
    "logging.wandb=false",
]


@pytest.fixture(scope="session")
def reference_run(tiny_imagenet, run_env, tmp_path_factory) -> Path:
    """The uninterrupted run of RESUME_SETS on tiny_imagenet (36 steps), shared by the resume tests."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    done = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=run_env, sets=RESUME_SETS)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def final_checkpoint(run_dir: Path, phase: str = "main"):
    """(weights, EMA weights, trainer state) of the newest checkpoint of `phase`."""
    import torch
    from safetensors.torch import load_file

    from trainer.run_folder import complete_checkpoints, read_state

    last = max(complete_checkpoints(Path(run_dir) / phase / "checkpoints"), key=lambda p: read_state(p)["total_step"])
    parts = torch.load(last / "custom_checkpoint_0.pkl", weights_only=False)
    return load_file(last / "model.safetensors"), parts.get("ema"), read_state(last)


def assert_same_weights(run_a: Path, run_b: Path, phase: str = "main") -> None:
    import torch

    (wa, ea, sa), (wb, eb, sb) = final_checkpoint(run_a, phase), final_checkpoint(run_b, phase)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    for name in ea or {}:
        assert torch.equal(ea[name], eb[name]), f"ema {name}"
    assert sa["total_step"] == sb["total_step"] and sa["best_top1"] == sb["best_top1"]
