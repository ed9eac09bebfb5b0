"""`python -m trainer doctor` as the GPU machine runs it: with datasets, wandb and gradio absent, on doctor's
own generated JPEGs; and how it reads its figures into a bottleneck and `--set` lines."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO

from trainer.doctor import Measure, advice
from trainer.recipe import Data, Phase, Recipe

# Put in front of the path as sitecustomize: these imports then fail as if the packages were not installed
# (None in sys.modules: `import x` raises ModuleNotFoundError and importlib.util.find_spec gives None, which
# is how accelerate asks), in this process and in every child it starts. It leaves a mark that it ran.
BLOCKER = """
import os, sys
for name in ("datasets", "wandb", "gradio"):
    sys.modules[name] = None
open(os.environ["BLOCKER_MARK"], "a").write("blocked\\n")
"""
FIGURE = re.compile(r"^(loader|model|loop)_images_per_s: ([0-9.]+)$", re.MULTILINE)


def blocked_env(tmp_path, run_env) -> dict[str, str]:
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCKER)
    env = dict(run_env, PYTHONPATH=str(block), BLOCKER_MARK=str(tmp_path / "mark"), IMGCLS_CACHE=str(tmp_path / "cache"))
    env.pop("OUT", None)
    return env


def test_doctor_runs_without_datasets_wandb_or_gradio(tmp_path, run_env):
    log = tmp_path / "logs" / "doctor.log"
    done = subprocess.run(
        [sys.executable, "-m", "trainer", "doctor", "recipes/quickstart.py", "--set", "data.path=",
         "--set", "model.arch=resnet10t", "--set", "phases.0.batch_size_per_device=8", "--images", "120", "--steps", "3",
         "--warmup", "1", "--log", str(log)],
        cwd=REPO, env=blocked_env(tmp_path, run_env), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "mark").read_text().startswith("blocked")
    figures = dict(FIGURE.findall(done.stdout))
    assert set(figures) == {"loader", "model", "loop"}, done.stdout[-3000:]
    assert all(float(v) > 0 for v in figures.values())
    assert re.search(r"^bottleneck: (loader|model)", done.stdout, re.MULTILINE)
    assert "CUDA: not available" in done.stdout and "nvImageCodec" in done.stdout
    assert "decode pre-flight: mode " in done.stdout
    assert "data: generated: 120 JPEGs" in done.stdout
    # Every line of the log was printed, and every line doctor printed (the loop's own epoch line aside) is in the log.
    logged = log.read_text().splitlines()
    printed = [line for line in done.stdout.splitlines() if not line.startswith("[main ")]
    assert logged == printed


def test_gpu_check_dry_run_on_the_cpu(tmp_path, run_env):
    env = dict(blocked_env(tmp_path, run_env), OUT=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run-cpu", "--images", "64"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "gpu_check.log").read_text()
    assert "recipe 'imagenet_full'" in log and "resnet10t, batch 8" in log
    assert set(dict(FIGURE.findall(log))) == {"loader", "model", "loop"}


def measure(images_per_s: float, note: str = "") -> Measure:
    return Measure(images_per_s, 100, 100, 128, 1.0, 0.5, note)


def test_advice_names_the_slower_part_and_what_to_set():
    recipe = Recipe(name="r", phases=(Phase(batch_size_per_device=128),), data=Data(loader_threads=4, decode_device="cpu"))
    loader_bound = advice(recipe, {"loader": measure(1000), "model": measure(3000), "loop": measure(950)}, "cuda", "eager", 16)
    text = "\n".join(loader_bound)
    assert loader_bound[0].startswith("bottleneck: loader")
    assert "--set data.loader_threads=8" in text and "--set data.decode_device=mixed" in text
    assert "real loop: 950 img/s = 95% of min(loader, model) = 1000" in text

    model_bound = advice(recipe, {"loader": measure(5000), "model": measure(2000, "peak memory 20.0 of 139 GiB"),
                                  "loop": measure(1200)}, "cuda", "eager", 16)
    text = "\n".join(model_bound)
    assert model_bound[0].startswith("bottleneck: model")
    assert "--set model.compile=on" in text and "--set phases.0.batch_size_per_device=256" in text
    assert "60% of min(loader, model)" in text and "--set data.prefetch_depth=4" in text
    # A run cut short: what was measured is read, nothing is made up.
    assert advice(recipe, {"loader": measure(1000)}, "cuda", "eager", 16) == []
