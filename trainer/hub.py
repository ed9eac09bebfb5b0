"""`push(run_dir, space, model_repo)`: a run's bundle to a Hub model repo and the demo to a Gradio Space.

What lands where:
- model repo (when given): the bundle as it is on disk (weights, config.json, model card, inference.py, examples/).
- Space: space/app.py, space/requirements.txt, space/README.md and the bundle's inference.py, plus either the
  whole bundle under `bundle/` (no model repo) or `model_repo.txt` holding the model repo's id, which the app
  reads to download the bundle from there. A push removes what the other layout or an earlier bundle left.

Nothing local is changed by a push except writing RUN_DIR/bundle when it is missing or older than the run.
Every failure is a `PushError` whose message names the repo, says what to do, and says where the bundle is;
the token never appears in a message.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from trainer import inference
from trainer.export import export
from trainer.run_folder import BUNDLE_DIR, HISTORY, PUSH_RECORD, RUN_INFO

SPACE_DIR = Path(__file__).resolve().parents[1] / "space"
SPACE_FILES = ("app.py", "requirements.txt", "README.md")
MODEL_REPO_FILE = "model_repo.txt"  # in the Space: the model repo's id, read by space/app.py
BUNDLE_FILES = (inference.CONFIG_FILE, inference.WEIGHTS_FILE)
RUN_RECORDS = (RUN_INFO, HISTORY)  # rewritten as the run trains: newer than the bundle = stale bundle
TOKEN_HELP = "log in with `hf auth login` (older huggingface_hub: `huggingface-cli login`) or set HF_TOKEN"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

logger = logging.getLogger(__name__)


class PushError(Exception):
    """A push could not finish; the message says what failed, what to do, and where the bundle is."""


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token and len(token) >= 8 else text


def resolve_token(token: str | None = None) -> str | None:
    """The argument, else HF_TOKEN, else huggingface_hub's stored login (`hf auth login`)."""
    from huggingface_hub import get_token

    for candidate in (token, os.environ.get("HF_TOKEN"), get_token()):
        if candidate and candidate.strip():
            return candidate.strip()
    return None


def check_repo_id(repo_id: str, what: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not REPO_ID.match(repo_id or ""):
        raise PushError(f"{what} must be USER/NAME (or ORG/NAME), got {repo_id!r}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise PushError(f"{what} {repo_id!r} is not a valid repo id: {err}") from None
    return repo_id


def is_bundle(folder: Path) -> bool:
    return all((folder / name).is_file() for name in BUNDLE_FILES)


def ensure_bundle(run_dir: Path, report: Callable[[str], None]) -> Path:
    """RUN_DIR itself when it is a bundle; else RUN_DIR/bundle, exported when missing or older than the run."""
    if is_bundle(run_dir):
        return run_dir
    bundle = run_dir / BUNDLE_DIR
    if is_bundle(bundle):
        exported = (bundle / inference.CONFIG_FILE).stat().st_mtime
        trained = max((f.stat().st_mtime for f in (run_dir / n for n in RUN_RECORDS) if f.is_file()), default=0.0)
        if trained <= exported:
            report(f"bundle: {bundle} (already exported)")
            return bundle
        report(f"bundle: {bundle} is older than the run's records; exporting again")
    report(f"bundle: exporting {run_dir} -> {bundle}")
    return export(run_dir)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Transport failures (no answer, reset, timeout) of whichever HTTP client huggingface_hub uses:
    httpx2 (2.x), httpx (1.x) or requests (0.x). Not OSError at large: a local file error is no network failure."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]  # OfflineModeIsEnabled is a ConnectionError
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            found = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(found, name) for name in names if hasattr(found, name)]
    return tuple(errors)


class _Hub:
    """Runs each Hub call as a named step and turns its failures into one clear PushError."""

    def __init__(self, token: str, bundle: Path) -> None:
        from huggingface_hub import HfApi

        self.api = HfApi(token=token)
        self.token = token
        self.bundle = bundle

    def _fail(self, message: str) -> PushError:
        message = f"{message}. The bundle is kept at {self.bundle}; run the same push again once fixed"
        return PushError(_redact(message, self.token))

    @contextmanager
    def step(self, doing: str, kind: str, repo_id: str):
        from huggingface_hub.errors import HfHubHTTPError

        where = f"{kind} {repo_id}"
        try:
            yield
        except HfHubHTTPError as err:
            response = getattr(err, "response", None)
            status = getattr(response, "status_code", None)
            said = f" (the Hub said: {err.server_message.strip()})" if getattr(err, "server_message", None) else ""
            if status == 401:
                raise self._fail(f"{where}: the Hub rejected the token (401 Unauthorized while {doing}): it is "
                                 f"invalid or expired; {TOKEN_HELP} with a valid write token") from None
            if status == 403:
                raise self._fail(f"no write access to {where} (403 Forbidden while {doing}){said}: the name belongs to "
                                 "someone else, or the token cannot write there; check that the token has write access "
                                 f"(https://huggingface.co/settings/tokens) or choose another name than {repo_id}") from None
            reason = getattr(response, "reason_phrase", "") or ""
            raise self._fail(f"{where}: the Hub answered {status} {reason}".rstrip() + f" while {doing}{said}") from None
        except _network_errors() as err:
            detail = str(err).strip() or "no answer"
            raise self._fail(f"{where}: network failure while {doing} ({type(err).__name__}: {detail}; "
                             f"Hub endpoint {self.api.endpoint})") from None


def _space_files(bundle: Path, model_repo: str | None) -> dict[str, Path | bytes]:
    """path in the Space -> local file (or content)."""
    missing = [name for name in SPACE_FILES if not (SPACE_DIR / name).is_file()]
    if missing:
        raise PushError(f"the Space's files are missing from this checkout: {', '.join(str(SPACE_DIR / m) for m in missing)}")
    if not (bundle / "inference.py").is_file():
        raise PushError(f"{bundle} has no inference.py; export the run again (python -m trainer export RUN_DIR)")
    files: dict[str, Path | bytes] = {name: SPACE_DIR / name for name in SPACE_FILES}
    files["inference.py"] = bundle / "inference.py"
    if model_repo:
        files[MODEL_REPO_FILE] = f"{model_repo}\n".encode()
    else:
        for path in sorted(bundle.rglob("*")):
            if path.is_file():
                files[f"bundle/{path.relative_to(bundle).as_posix()}"] = path
    return files


def push(run_dir: str | os.PathLike, space: str, model_repo: str | None = None, private: bool = False,
         token: str | None = None, *, report: Callable[[str], None] | None = None) -> dict[str, str]:
    """Export RUN_DIR if needed, create the repos if missing (Space: Gradio SDK), upload; returns their URLs:
    {"space_url", "model_url" (with a model repo), "bundle_dir"}. `private` applies to both repos when this
    push creates them (an existing repo keeps its visibility). `report` gets one line per step (default: log)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    report = report or logger.info
    run_dir = Path(run_dir)
    check_repo_id(space, "--space")
    if model_repo is not None:
        check_repo_id(model_repo, "--model-repo")
    if not run_dir.is_dir():
        raise PushError(f"{run_dir} is not a folder (expected a run folder or a bundle)")
    bundle = ensure_bundle(run_dir, report).resolve()
    files = _space_files(bundle, model_repo)

    token = resolve_token(token)
    if token is None:
        raise PushError(f"no Hugging Face token: {TOKEN_HELP}. The bundle is at {bundle}; run push again after")
    hub = _Hub(token, bundle)
    api = hub.api
    urls: dict[str, str] = {"bundle_dir": str(bundle)}

    # Both repos first: a name that is taken fails before anything is uploaded.
    if model_repo:
        with hub.step("creating it", "model repo", model_repo):
            urls["model_url"] = str(api.create_repo(model_repo, repo_type="model", private=private, exist_ok=True))
    with hub.step("creating it", "Space", space):
        urls["space_url"] = str(api.create_repo(space, repo_type="space", space_sdk="gradio", private=private, exist_ok=True))

    if private:  # `private` only counts when a repo is created; say so when one already existed in public
        for repo_id, repo_type, kind in ((model_repo, "model", "model repo"), (space, "space", "Space")):
            if repo_id:
                with hub.step("reading its settings", kind, repo_id):
                    public = not api.repo_info(repo_id, repo_type=repo_type).private
                if public:
                    report(f"note: {kind} {repo_id} already existed and stays public; make it private in its settings")

    if model_repo:
        size_mb = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()) / 1e6
        report(f"model repo: uploading {bundle} ({size_mb:.1f} MB) to {model_repo}")
        with hub.step("uploading the bundle", "model repo", model_repo):
            # Old example images of classes this bundle no longer has go; other files of the repo stay.
            api.upload_folder(repo_id=model_repo, repo_type="model", folder_path=bundle, delete_patterns=["examples/*"],
                              commit_message=f"Upload bundle from {run_dir.name}")

    with hub.step("listing its files", "Space", space):
        existing = set(api.list_repo_files(space, repo_type="space"))
    stale = sorted(p for p in existing if p not in files and (p.startswith("bundle/") or p == MODEL_REPO_FILE))
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=src if isinstance(src, bytes) else str(src))
                  for name, src in files.items()]
    operations += [CommitOperationDelete(path_in_repo=p) for p in stale]
    layout = f"{MODEL_REPO_FILE} -> {model_repo}" if model_repo else "the bundle under bundle/"
    report(f"Space: uploading {len(files)} files to {space} ({layout}){f', removing {len(stale)} stale' if stale else ''}")
    with hub.step("uploading the app", "Space", space):
        api.create_commit(space, repo_type="space", operations=operations,
                          commit_message=f"Upload demo of {run_dir.name}")
    if private and model_repo:
        report(f"note: a private Space reads the private model repo {model_repo} only with a read token: "
               "add one as the Space secret HF_TOKEN (Space settings)")
    return urls


def push_in_background(run_dir: str | os.PathLike, space: str, model_repo: str | None = None, private: bool = False,
                       token: str | None = None, *, report: Callable[[str], None] | None = None) -> threading.Thread:
    """Start `push` in a thread and return it, for the end of training: the caller goes on at once, and
    because the thread is not a daemon the process stays alive until the upload ends. Failures are
    reported (default: logged) and written to RUN_DIR/push.json, never raised into the caller."""
    say, warn = report or logger.info, report or logger.error
    record = Path(run_dir) / PUSH_RECORD

    def work() -> None:
        started = time.time()
        outcome: dict = {"space": space, "model_repo": model_repo, "started": started}
        secret = None
        try:
            secret = resolve_token(token)
            outcome.update(ok=True, urls=push(run_dir, space, model_repo, private, secret, report=say))
            say(f"push: done: {outcome['urls']['space_url']}")
        except Exception as err:  # whatever went wrong, training has finished and must not be taken down
            message = str(err) if isinstance(err, PushError) else f"{type(err).__name__}: {err}"
            outcome.update(ok=False, error=_redact(message, secret))
            warn(f"push failed: {outcome['error']}")
        outcome["seconds"] = round(time.time() - started, 1)
        try:
            record.write_text(json.dumps(outcome, indent=2) + "\n")
        except OSError as err:
            logger.error("push: could not write %s: %s", record, err)

    thread = threading.Thread(target=work, name=f"push-{space}", daemon=False)
    thread.start()
    return thread
