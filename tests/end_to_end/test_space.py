"""The Space in a real browser: train a tiny model, export it, start space/app.py from a standalone copy
(the files `push` uploads, nothing from this repository importable), drive it with headless Debian
chromium through playwright, and screenshot it into test-output/space.png.

`make test` installs what this needs: apt `chromium`, pip `playwright` (no `playwright install`: the
browser is Debian's). IMGCLS_UPDATE_DOCS=1 also copies the screenshot to docs/space.png for the README.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, REPO, run_recipe
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
SCREENSHOT = REPO / "test-output" / "space.png"
DOCS_SCREENSHOT = REPO / "docs" / "space.png"
# Run as the Space runs: app.py by path with the repository's packages unimportable (the venv has them
# installed in editable mode, so isolation alone would not hide them).
STANDALONE = """
import runpy, sys
class NoRepo:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("trainer", "loaders", "recipes"):
            raise ImportError(f"the Space imported {name} from the imgcls repository")
sys.meta_path.insert(0, NoRepo())
sys.argv = ["app.py"]
runpy.run_path("app.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_imagenet, run_env) -> Path:
    """A real bundle: the quickstart recipe, two short epochs on the tiny folder, then `export`."""
    root = tmp_path_factory.mktemp("space-run")
    sets = [*FAST, "phases.0.epochs=2", "phases.0.warmup_epochs=0", "phases.0.lr_per_256=0.1", "logging.wandb=false"]
    done = run_recipe("quickstart.py", "--data", str(tiny_imagenet), "--run-dir", str(root / "run"), env=run_env, sets=sets)
    assert done.returncode == 0, done.stderr[-3000:]
    out = root / "bundle"
    done = subprocess.run([sys.executable, "-m", "trainer", "export", str(root / "run"), "--out", str(out)],
                          env=run_env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "inference.py").is_file()
    return out


def standalone_space(bundle: Path, folder: Path) -> Path:
    """The pushed Space's files: app.py, requirements.txt, README.md, inference.py and the bundle in bundle/."""
    folder.mkdir()
    for name in ("app.py", "requirements.txt", "README.md"):
        shutil.copy(REPO / "space" / name, folder / name)
    shutil.copy(bundle / "inference.py", folder / "inference.py")
    shutil.copytree(bundle, folder / "bundle")
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"space/app.py exited with {proc.returncode} before serving:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"space/app.py did not serve {url} within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def load_inference(bundle: Path):
    """The bundle's own inference.py, to compute what the page should show."""
    spec = importlib.util.spec_from_file_location("bundle_inference", bundle / "inference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up here
    spec.loader.exec_module(module)
    return module


def poll(condition, what: str, timeout_s: float = 30):
    """condition() until it returns something truthy; fail saying `what` did not happen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def test_space_in_chromium(bundle, tmp_path):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright Python package is missing: `make test` installs the dev extras (pip install -e '.[dev]')")

    inference = load_inference(bundle)
    model = inference.load_bundle(bundle)
    examples = sorted((bundle / "examples").glob("*/*.jpg"))  # the order the app lists them in
    val_a, val_b = examples[0], examples[-1]
    assert val_a.parent != val_b.parent, "the examples should cover at least two classes"

    space = standalone_space(bundle, tmp_path / "space")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "HF_", "MODEL_REPO", "BUNDLE_DIR"))}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1", PYTHONPATH="",
               GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port), GRADIO_TEMP_DIR=str(tmp_path / "gradio"),
               PYTHONUNBUFFERED="1")
    log = tmp_path / "app.log"
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-I", "-c", STANDALONE], cwd=space, env=env, stdout=sink, stderr=subprocess.STDOUT)
    outside: list[str] = []
    try:
        wait_for_server(url, proc, log)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})

                def local_only(route):  # the page must need nothing beyond the Space's own server
                    if route.request.url.startswith((url, "data:", "blob:")):
                        route.continue_()
                    else:
                        outside.append(route.request.url)
                        route.abort()

                page.route("**/*", local_only)
                page.goto(url)
                page.wait_for_selector("#input-image input[type=file]", state="attached", timeout=30_000)
                config = model.config
                heading = page.locator("h1").first.inner_text()
                assert config["architecture"] in heading and f"{len(model.classes)} classes" in heading
                assert f"{config['metrics']['top1']:.1%}" in page.locator("body").inner_text()
                assert "Classes: tench, goldfish, great white shark." in page.locator("body").inner_text()  # ImageNet synsets by name

                def top5() -> list[tuple[str, float]]:
                    rows = page.locator("#top5 [data-testid$='-confidence-set']")
                    return [(rows.nth(i).locator("dt").inner_text(), float(rows.nth(i).locator("meter").get_attribute("value")))
                            for i in range(rows.count())]

                def overlay_src() -> str | None:
                    img = page.locator("#gradcam-overlay img")
                    return img.get_attribute("src") if img.count() and img.is_visible() else None

                # Upload a val image: the top-k (all 3 classes of the tiny data) with confidences, as inference.predict says.
                page.locator("#input-image input[type=file]").set_input_files(str(val_a))
                shown = poll(lambda: len(top5()) == min(5, len(model.classes)) and top5(), "the top-5 after an upload")
                expected = inference.predict(model, [Image.open(val_a)], topk=5)[0]
                assert [name for name, _ in shown] == [name for name, _ in expected]
                assert {name for name, _ in shown} == {"tench", "goldfish", "great white shark"}
                assert sum(p for _, p in shown) == pytest.approx(1.0, abs=1e-3)
                assert np.allclose([p for _, p in shown], [p for _, p in expected], atol=1e-3), (shown, expected)
                assert not page.locator("#gradcam-overlay").is_visible()  # Grad-CAM is off by default

                # Grad-CAM on: the overlay appears, and it is inference.gradcam's overlay of this image.
                page.locator("#gradcam-toggle input[type=checkbox]").check()
                src_a = poll(overlay_src, "the Grad-CAM overlay after switching it on")
                shot_a = page.locator("#gradcam-overlay img").screenshot()
                served = Image.open(io.BytesIO(page.request.get(src_a).body())).convert("RGB")
                _, overlay = inference.gradcam(model, Image.open(val_a))
                back = np.asarray(served.resize(overlay.size, Image.BOX), np.float32)
                assert np.abs(back - np.asarray(overlay, np.float32)).mean() < 6, "the page's overlay is not inference.gradcam's"

                # Click an example (the last, of another class) with Grad-CAM on: new predictions and a new overlay.
                page.locator("#examples .gallery-item").last.click()
                src_b = poll(lambda: (s := overlay_src()) and s != src_a and s, "a new overlay after clicking an example")
                expected_b = inference.predict(model, [Image.open(val_b)], topk=5)[0]
                poll(lambda: [n for n, _ in top5()] == [n for n, _ in expected_b], "the example's top-5")
                assert page.locator("#gradcam-overlay img").screenshot() != shot_a
                assert src_b != src_a

                # Off again: the overlay goes; on again: it comes back for the same image.
                page.locator("#gradcam-toggle input[type=checkbox]").uncheck()
                poll(lambda: not page.locator("#gradcam-overlay").is_visible(), "the overlay to hide after switching Grad-CAM off")
                page.locator("#gradcam-toggle input[type=checkbox]").check()
                poll(overlay_src, "the overlay after switching Grad-CAM on again")
                page.wait_for_timeout(500)  # let the image finish painting
                SCREENSHOT.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)

                # Flip TTA on: the probabilities become the mean over the image and its mirror; off: back again.
                # On the image (an example, or a lopsided synthetic one) whose mirror changes the answer most.
                lopsided = np.zeros((48, 48, 3), np.uint8)
                lopsided[:, :16] = np.random.default_rng(0).integers(0, 256, (48, 16, 3))
                Image.fromarray(lopsided).save(tmp_path / "lopsided.png")
                candidates = [*examples, tmp_path / "lopsided.png"]

                def answers(path: Path, tta: str) -> list[tuple[str, float]]:
                    return inference.predict(model, [Image.open(path).convert("RGB")], topk=5, tta=tta)[0]

                def flip_change(path: Path) -> float:
                    return max(abs(dict(answers(path, "flip"))[n] - p) for n, p in answers(path, "none"))

                chosen = max(candidates, key=flip_change)
                assert flip_change(chosen) > 0.005, "the mirror must change the answer for this check to mean anything"
                plain, flipped = answers(chosen, "none"), answers(chosen, "flip")

                def shows(expected: list[tuple[str, float]]) -> bool:
                    return np.allclose([dict(top5()).get(n, -1) for n, _ in expected], [p for _, p in expected], atol=1e-3)

                page.locator("#input-image input[type=file]").set_input_files(str(chosen))
                poll(lambda: shows(plain), "the top-5 of the image without TTA")
                page.locator("#tta-toggle input[type=checkbox]").check()
                poll(lambda: shows(flipped), "the flip-TTA top-5")
                page.locator("#tta-toggle input[type=checkbox]").uncheck()
                poll(lambda: shows(plain), "the plain top-5 again")
            finally:
                browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not outside, f"the page asked for resources outside the Space: {outside}"
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
    assert SCREENSHOT.stat().st_size > 10_000
    if os.environ.get("IMGCLS_UPDATE_DOCS") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(SCREENSHOT, DOCS_SCREENSHOT)


@pytest.mark.parametrize("via", ["env", "model_repo.txt"])
def test_space_loads_a_model_repo_through_the_hub_cache(bundle, tmp_path, via):
    """MODEL_REPO=user/name, or model_repo.txt as `push --model-repo` writes it: the app gets the bundle
    with snapshot_download (here from a filled Hub cache, offline) and loads it with the inference.py inside it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    repo = cache / "models--tester--tiny-classifier"
    shutil.copytree(bundle, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    space = tmp_path / "space"
    space.mkdir()
    shutil.copy(REPO / "space" / "app.py", space / "app.py")  # no inference.py beside it: the repo's copy is used
    probe = STANDALONE.replace('runpy.run_path("app.py", run_name="__main__")', "\n".join([
        'app = runpy.run_path("app.py", run_name="space_app")',
        'folder = app["bundle_folder"]()',
        'inference = app["import_inference"](folder)',
        'loaded = inference.load_bundle(folder)',
        'print(folder, inference.__file__, loaded.config["architecture"], len(loaded.classes), sep="\\n")',
    ]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "HF_", "BUNDLE_DIR"))}
    env.update(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONPATH="")
    if via == "env":
        env["MODEL_REPO"] = "tester/tiny-classifier"
    else:
        env.pop("MODEL_REPO", None)
        (space / "model_repo.txt").write_text("tester/tiny-classifier\n")
    done = subprocess.run([sys.executable, "-I", "-c", probe], cwd=space, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    folder, module, arch, classes = done.stdout.split("\n")[-5:-1]
    snapshot = repo / "snapshots" / commit
    assert Path(folder) == snapshot and Path(module) == snapshot / "inference.py"
    assert (arch, int(classes)) == ("resnet10t", 3)
