"""The Hugging Face token and the W&B API key never reach a file of the run, its bundle or the console.

A real tiny training run and `python -m trainer export` run with fake credentials planted in the
environment (W&B offline, so nothing leaves the machine); then every byte under the run folder (W&B's
offline files, logs and metadata included), under W&B's staging, cache and settings folders, and
everything printed is searched for them.
(tests/test_push.py does the same for the token during a push.)
"""

from __future__ import annotations

import subprocess
import sys

from conftest import FAST, REPO, run_recipe

HF_TOKEN = "hf_FAKEsecretTOKENforTESTS0123456789abcd"
WANDB_KEY = "fa4e0123456789abcdef0123456789abcdef5eed"  # 40 hex digits, the shape of a W&B API key


def _leaks(data: bytes) -> list[str]:
    return [name for name, secret in (("HF_TOKEN", HF_TOKEN), ("WANDB_API_KEY", WANDB_KEY)) if secret.encode() in data]


def test_tokens_reach_no_file_and_no_output(tmp_path, tiny_imagenet, run_env):
    # W&B's own folders outside the run, here inside the test's: staging (media of offline runs wait there
    # for `wandb sync`), cache and settings.
    wandb_dirs = {name: tmp_path / name.lower() for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR")}
    env = dict(run_env, HF_TOKEN=HF_TOKEN, HUGGING_FACE_HUB_TOKEN=HF_TOKEN, WANDB_API_KEY=WANDB_KEY, WANDB_MODE="offline",
               **{name: str(path) for name, path in wandb_dirs.items()})
    run_dir = tmp_path / "run"
    trained = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=env,
                         sets=FAST + ["phases.0.epochs=1", "phases.0.warmup_epochs=0", "logging.wandb=true"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = subprocess.run([sys.executable, "-m", "trainer", "export", str(run_dir)], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]

    files = [p for p in sorted(run_dir.rglob("*")) if p.is_file()]
    names = {p.relative_to(run_dir).as_posix() for p in files}
    # The search covers what it must: W&B's offline run (the .wandb log, which holds the run's config and
    # system metadata, its console copy and debug logs), the records, the resolved recipe and the bundle.
    assert any(n.endswith(".wandb") for n in names) and any(n.endswith("files/output.log") for n in names), names
    assert any(n.endswith("logs/debug.log") for n in names) and any(n.endswith("logs/debug-internal.log") for n in names), names
    assert {"run.json", "recipe.json", "history.jsonl", "bundle/model.safetensors", "bundle/config.json"} <= names, names

    staged = [p for p in sorted(wandb_dirs["WANDB_DATA_DIR"].rglob("*")) if p.is_file()]
    assert staged, "W&B staged nothing: the prediction images of the phase end should wait there"
    outside = [p for folder in wandb_dirs.values() for p in sorted(folder.rglob("*")) if p.is_file()]
    found = {p.relative_to(tmp_path).as_posix(): leaks for p in files + outside if (leaks := _leaks(p.read_bytes()))}
    for name, output in (("training", trained), ("export", exported)):
        if leaks := _leaks((output.stdout + output.stderr).encode()):
            found[f"<{name} output>"] = leaks
    assert found == {}
