"""`python -m trainer push` against a Hub-compatible server on 127.0.0.1 (tests/hub_server.py).

huggingface_hub reads HF_ENDPOINT when it is imported, so every push runs in a subprocess with the server's
address, HF_HUB_DISABLE_XET=1 (plain LFS uploads) and an empty HF_HOME (no stored login of this machine).
A fake token is planted in every run; it must reach the server and never appear in any output or file.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import FAST, REPO, run_recipe
from hub_server import HubServer

TOKEN = "hf_FAKEtoken1234567890"
SPACE_FILES = ("app.py", "requirements.txt", "README.md")
OUTPUTS: list[str] = []  # every push's stdout and stderr, searched for the token at the end


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_imagenet, run_env) -> Path:
    run_dir = tmp_path_factory.mktemp("push") / "run"
    done = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=run_env,
                      sets=FAST + ["phases.0.epochs=1", "phases.0.warmup_epochs=0"])
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def hub_env(run_env: dict, hub: HubServer | None, home: Path, token: str | None = TOKEN) -> dict[str, str]:
    env = dict(run_env)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE"):
        env.pop(name, None)
    home.mkdir(parents=True, exist_ok=True)
    env.update(HF_HOME=str(home), HF_TOKEN_PATH=str(home / "token"), HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               HF_ENDPOINT=hub.endpoint if hub else "http://127.0.0.1:9")  # port 9: nothing listens
    if token:
        env["HF_TOKEN"] = token
    return env


def run_push(run_dir: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "trainer", "push", str(run_dir), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    OUTPUTS.append(done.stdout + done.stderr)
    assert TOKEN not in done.stdout + done.stderr
    return done


def snapshot(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def without_gitattributes(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k != ".gitattributes"}


@pytest.fixture(scope="module")
def pushed(run_dir, run_env, tmp_path_factory) -> SimpleNamespace:
    """Two pushes of one run to one Space: with a private model repo (exporting the bundle first), then again
    without one, so the Space switches from `model_repo.txt` to carrying the bundle itself."""
    root = tmp_path_factory.mktemp("hub")
    assert not (run_dir / "bundle").exists()
    with HubServer(root / "store", token=TOKEN) as hub:
        env = hub_env(run_env, hub, root / "home")
        with_model = run_push(run_dir, "--space", "tester/demo", "--model-repo", "tester/classifier", "--private", env=env)
        space_with_model = hub.files("space", "tester/demo")
        alone = run_push(run_dir, "--space", "tester/demo", env=env)
    return SimpleNamespace(hub=hub, with_model=with_model, space_with_model=space_with_model, alone=alone,
                           bundle=run_dir / "bundle")


def test_push_exports_then_uploads_the_bundle_byte_identical(pushed):
    assert pushed.with_model.returncode == 0, pushed.with_model.stderr[-3000:]
    assert "exporting" in pushed.with_model.stdout
    bundle = {p.relative_to(pushed.bundle).as_posix(): p.read_bytes() for p in pushed.bundle.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "README.md", "inference.py"} <= set(bundle)
    assert without_gitattributes(pushed.hub.files("model", "tester/classifier")) == bundle
    assert "Space: http://127.0.0.1:" in pushed.with_model.stdout


def test_space_gets_the_app_and_reads_the_model_repo(pushed):
    files = without_gitattributes(pushed.space_with_model)
    expected = {name: (REPO / "space" / name).read_bytes() for name in SPACE_FILES}
    expected["inference.py"] = (pushed.bundle / "inference.py").read_bytes()
    expected["model_repo.txt"] = b"tester/classifier\n"
    assert files == expected


def test_space_without_model_repo_carries_the_bundle(pushed):
    assert pushed.alone.returncode == 0, pushed.alone.stderr[-3000:]
    assert "already exported" in pushed.alone.stdout  # the second push reuses the bundle
    files = without_gitattributes(pushed.hub.files("space", "tester/demo"))
    for p in pushed.bundle.rglob("*"):
        if p.is_file():
            assert files.pop(f"bundle/{p.relative_to(pushed.bundle).as_posix()}") == p.read_bytes()
    assert set(files) == {*SPACE_FILES, "inference.py"}  # model_repo.txt of the first push is gone
    assert pushed.hub.repos[("space", "tester/demo")].commits[-1]["deleted"] == ["model_repo.txt"]


def test_repos_are_created_with_the_gradio_sdk_and_the_private_flag(pushed):
    model, first, again = pushed.hub.created  # the second push asks again: the Hub answers 409, exist_ok takes it
    assert (first["type"], first["organization"], first["name"]) == ("space", "tester", "demo")
    assert first["sdk"] == "gradio" and first["visibility"] == "private"
    assert (model["type"], model["name"], model["visibility"]) == ("model", "classifier", "private")
    assert again["sdk"] == "gradio" and again.get("visibility") != "private"
    assert pushed.hub.repos[("space", "tester/demo")].private and pushed.hub.repos[("model", "tester/classifier")].private
    assert pushed.hub.tokens_seen == {TOKEN}  # the planted token did the authenticating


def test_missing_token_is_a_clear_error(pushed, run_env, tmp_path):
    before = snapshot(pushed.bundle)
    with HubServer(tmp_path / "store") as hub:
        done = run_push(pushed.bundle.parent, "--space", "tester/demo", env=hub_env(run_env, hub, tmp_path / "home", token=None))
    assert done.returncode == 2
    assert "error: no Hugging Face token" in done.stderr
    assert "HF_TOKEN" in done.stderr and "hf auth login" in done.stderr
    assert str(pushed.bundle.resolve()) in done.stderr
    assert "Traceback" not in done.stderr
    assert hub.created == []
    assert snapshot(pushed.bundle) == before


@pytest.mark.parametrize("taken", ["space", "model"])
def test_repo_owned_by_someone_else_is_a_clear_error(pushed, run_env, tmp_path, taken):
    """An existing Space of another user (create answers 403, it exists, the upload answers 403), or a
    model repo in a namespace the token cannot create in (create answers 403, nothing exists)."""
    before = snapshot(pushed.bundle)
    with HubServer(tmp_path / "store", token=TOKEN, foreign=("someone-else",)) as hub:
        hub.seed_repo("space", "someone-else/demo", sdk="gradio")
        args = ["--space", "someone-else/demo"] if taken == "space" else ["--space", "tester/x", "--model-repo", "someone-else/clf"]
        done = run_push(pushed.bundle.parent, *args, env=hub_env(run_env, hub, tmp_path / "home"))
    assert done.returncode == 2
    repo = "Space someone-else/demo" if taken == "space" else "model repo someone-else/clf"
    assert f"error: no write access to {repo} (403 Forbidden" in done.stderr
    assert "write access" in done.stderr and "choose another name" in done.stderr
    assert str(pushed.bundle.resolve()) in done.stderr
    assert "Traceback" not in done.stderr
    assert without_gitattributes(hub.files("space", "someone-else/demo")) == {}
    assert snapshot(pushed.bundle) == before


@pytest.mark.parametrize("failure", ["500", "reset"])
def test_failed_upload_keeps_the_bundle_and_says_what_happened(pushed, run_env, tmp_path, failure):
    before = snapshot(pushed.bundle)
    with HubServer(tmp_path / "store", token=TOKEN, fail_commits=failure) as hub:
        done = run_push(pushed.bundle.parent, "--space", "tester/demo", env=hub_env(run_env, hub, tmp_path / "home"))
    assert done.returncode == 2
    assert "error: Space tester/demo: " in done.stderr
    assert ("500 Internal Server Error while uploading the app" if failure == "500" else "network failure while uploading the app") in done.stderr
    assert f"The bundle is kept at {pushed.bundle.resolve()}; run the same push again" in done.stderr
    assert "Traceback" not in done.stderr
    assert without_gitattributes(hub.files("space", "tester/demo")) == {}
    assert snapshot(pushed.bundle) == before


BACKGROUND = """
import json, sys
from trainer.hub import push_in_background
run_dir = sys.argv[1]
for space in ("tester/bg", "someone-else/bg"):
    thread = push_in_background(run_dir, space)
    print("returned", thread.is_alive(), thread.daemon, flush=True)
    thread.join()
    print("record", open(run_dir + "/push.json").read().replace(chr(10), " "), flush=True)
"""


def test_push_in_background_never_raises_and_records_the_outcome(pushed, run_env, tmp_path):
    run_dir = pushed.bundle.parent
    with HubServer(tmp_path / "store", token=TOKEN, foreign=("someone-else",)) as hub:
        done = subprocess.run([sys.executable, "-c", BACKGROUND, str(run_dir)], cwd=REPO, capture_output=True, text=True,
                              env=hub_env(run_env, hub, tmp_path / "home"), timeout=120)
    OUTPUTS.append(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("returned True False") == 2  # the caller goes on while the (non-daemon) push runs
    ok, failed = (json.loads(line.removeprefix("record ")) for line in done.stdout.splitlines() if line.startswith("record "))
    assert ok["ok"] is True and ok["urls"]["space_url"].endswith("/spaces/tester/bg")
    assert hub.files("space", "tester/bg")["app.py"] == (REPO / "space" / "app.py").read_bytes()
    assert failed["ok"] is False and "someone-else/bg" in failed["error"] and "403" in failed["error"]
    assert "push failed: " in done.stderr  # logged, not raised
    assert TOKEN not in done.stdout + done.stderr


def test_a_recipe_pushes_when_training_ends(run_env, tiny_imagenet, tmp_path):
    run_dir = tmp_path / "auto"
    with HubServer(tmp_path / "store", token=TOKEN) as hub:
        env = hub_env(run_env, hub, tmp_path / "home")
        done = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(run_dir), env=env,
                          sets=FAST + ["phases.0.epochs=1", "phases.0.warmup_epochs=0", "push.space=tester/auto"])
        OUTPUTS.append(done.stdout + done.stderr)
        assert done.returncode == 0, done.stderr[-3000:]
        record = json.loads((run_dir / "push.json").read_text())
        assert record["ok"] is True and record["urls"]["space_url"].endswith("/spaces/tester/auto")
        files = hub.files("space", "tester/auto")
    assert files["bundle/model.safetensors"] == (run_dir / "bundle" / "model.safetensors").read_bytes()
    assert done.stdout.index("done. run folder") < done.stdout.index("push: done")  # after training, not before
    assert TOKEN not in done.stdout + done.stderr


def test_the_token_is_never_printed_or_written(pushed, run_dir):
    assert OUTPUTS, "no push ran"
    assert not [out for out in OUTPUTS if TOKEN in out]
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
