"""Bad recipes and arguments stop before any work: exit status 2, one `error:` line naming the problem,
no traceback, no run folder. Random override strings raise only RecipeError."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import re
import time
from pathlib import Path

import pytest
import timm
import torch
from conftest import FAST, REPO, fill_placeholders
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.launch import run
from trainer.model import initialize
from trainer.recipe import Data, Logging, Model, Phase, Push, Recipe, RecipeError, apply_overrides, recipe_from_dict

# -- (a) the override parser under random input ---------------------------------------------------------

BASE = Recipe(name="t", phases=(Phase(name="warm", epochs=3, warmup_epochs=1), Phase(name="full", epochs=5, init="phase:warm")))
SECTIONS = {"model": Model, "data": Data, "logging": Logging, "push": Push}
# Real key paths, as the dataclasses define them: top-level fields, section fields, and phase fields by
# index (negative too) and by phase name.
REAL_KEYS = st.one_of(
    st.sampled_from([f.name for f in dataclasses.fields(Recipe) if f.name not in ("phases", *SECTIONS)]),
    st.sampled_from([f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]),
    st.builds("phases.{}.{}".format, st.sampled_from(["0", "1", "-1", "-2", "warm", "full"]),
              st.sampled_from([f.name for f in dataclasses.fields(Phase)])),
)
FIELDS = sorted({f.name for cls in (Recipe, Model, Data, Phase, Logging, Push) for f in dataclasses.fields(cls)})
SEGMENTS = st.one_of(
    st.sampled_from(FIELDS),
    st.sampled_from(["phases", "model", "data", "logging", "push", "0", "1", "-1", "-2", "-5", "2", "warm", "full",
                     "", " ", "epoch", "²", "٣", "99999999999999999999", "phases.0", "0x1", "*"]),
    st.text(max_size=6),
)
BOGUS_KEYS = st.builds(".".join, st.lists(SEGMENTS, min_size=1, max_size=4))
HOSTILE = st.sampled_from([
    "nan", "-nan", "inf", "-inf", "1e400", "-1e-400", "1e308", "9" * 30, "-9" * 5, "", " ", "()", "[]", "[1, 2]",
    "((0.5,1))", "0.5,", ",", ",,", "0,0", "1,0", "nan,1", "true", "True", "none", "null", "mlp:512", "mlp:0",
    "mlp:²", "stages:2", "stages:-1", "linear", "phase:warm", "phase:full", "phase:nope", "pretrained", "²", "٣",
    "\x00", "1_0", "0x10", "1.5", "-0", "0.0", "..", ".", "a/b", "resnet18", "fp8", "bf16", "u/n", "/", "\n",
    "é" * 100, "2147483648", "-2147483649", "1e-320", "0.5,0.5,0.5", "1,2,3,4", "backbone", "step", "plateau",
])
# Plain values of every type a field has: valid often enough that whole lists get through to validation.
PLAIN = st.one_of(
    st.integers(min_value=-3, max_value=40).map(str),
    st.sampled_from(["0.1", "0.5", "0.9", "0.99", "1.0", "2.5", "0.35,1.0", "0.75,1.333", "2,4", "8,16", "0.5,0.5,0.5"]),
)
VALUES = st.one_of(
    HOSTILE,
    PLAIN,
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=12),
)
OVERRIDE = st.one_of(
    # Mostly real keys, whose values reach each field's own checks.
    st.builds("{}={}".format, REAL_KEYS, VALUES),
    st.builds("{}={}".format, REAL_KEYS, VALUES),
    st.builds("{}={}".format, REAL_KEYS, PLAIN),
    st.builds("{}={}".format, BOGUS_KEYS, VALUES),
    st.text(max_size=20),  # anything at all, with or without "="
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(OVERRIDE, min_size=1, max_size=3))
def test_random_overrides_raise_only_recipe_errors(overrides):
    # No catch-all: an exception other than RecipeError is a bug, and fails here.
    try:
        recipe = apply_overrides(BASE, overrides)
    except RecipeError as err:
        assert "\n" not in str(err) and str(err)  # one error line, never empty
        return
    # What comes back is a valid recipe that survives recipe.json: strict JSON (no NaN) and validation again.
    text = json.dumps(recipe.to_dict(), allow_nan=False)
    assert recipe_from_dict(json.loads(text)) == recipe


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.builds("{}={}".format, REAL_KEYS, st.one_of(HOSTILE, PLAIN)), min_size=1, max_size=3))
def test_random_overrides_on_the_real_command_line_stop_before_any_work(tmp_path_factory, overrides):
    """What `python recipes/quickstart.py --set ...` calls, with data that are not there: whether the
    overrides are wrong or fine, the run stops before any work with exit 2 and one error line."""
    folder = tmp_path_factory.mktemp("fuzz")
    argv = ["--data", str(folder / "nowhere"), "--run-dir", str(folder / "run")] + [i for o in overrides for i in ("--set", o)]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        run(_load_quickstart(), argv)
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert stop.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
    assert not (folder / "run").exists()


def test_nan_and_huge_values_are_refused_with_the_key():
    for override, expected in [
        ("phases.0.lr_per_256=nan", "phases.0.lr_per_256 takes a finite number, got 'nan'"),
        ("phases.warm.clip_grad_norm=inf", "takes a finite number"),
        ("data.mean=nan,0.5,0.5", "data.mean takes a finite number"),
        ("phases.0.epochs=99999999999999999999", "epochs must be at most 2147483647"),
        ("phases.0.crop_scale.0=0.5", "'phases.0.crop_scale.0' goes below a plain value"),
        ("phases.².epochs=2", "unknown phase '²'"),
        ("phases.0.head=mlp:²", "head must be"),
    ]:
        with pytest.raises(RecipeError, match=re.escape(expected)):
            apply_overrides(BASE, [override])


def test_recipe_files_with_wrong_types_stop_at_the_field():
    """A recipe written in Python skips the parser; the dataclasses check types themselves."""
    with pytest.raises(RecipeError, match="phase 'main': epochs must be an integer, got '2'"):
        Phase(epochs="2")
    with pytest.raises(RecipeError, match="model.drop_rate must be a finite number, got nan"):
        Model(drop_rate=float("nan"))
    with pytest.raises(RecipeError, match="phases must be a tuple"):
        Recipe(name="r", phases=[Phase()])


# -- (b) bad command lines ----------------------------------------------------------------------------------


def _load_quickstart() -> Recipe:
    spec = importlib.util.spec_from_file_location("quickstart_recipe", REPO / "recipes" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RECIPE


# (arguments after --data and --run-dir, with "{five}" etc. filled from `files`; what the error line says)
BAD_COMMAND_LINES = [
    (["--set", "phases.0.epoch=2"], "unknown key 'epoch' in 'phases.0.epoch' under phases.0 (did you mean 'epochs'?)"),
    (["--set", "phases.0.epochs=two"], "phases.0.epochs takes an integer, got 'two'"),
    (["--set", "phases.0.epochs=2.5"], "phases.0.epochs takes an integer, got '2.5'"),
    (["--set", "phases.0.lr_per_256=nan"], "phases.0.lr_per_256 takes a finite number, got 'nan'"),
    (["--set", "phases.0.lr_per_256=-0.1"], "lr_per_256 must be positive, got -0.1"),
    (["--set", "phases.0.batch_size_per_device=0"], "batch_size_per_device must be >= 1, got 0"),
    (["--set", "phases.0.subset=0"], "subset must be in (0, 1], got 0.0"),
    (["--set", "phases.0.subset=1.5"], "subset must be in (0, 1], got 1.5"),
    (["--set", "phases.0.res_px=0"], "res_px and eval_res_px must be >= 8, got 0"),
    (["--set", "phases.0.res_px=100000"], "must be <= 8192"),
    (["--set", "phases.0.epochs=99999999999999999999"], "epochs must be at most 2147483647"),
    (["--set", "phases.0.init=phase:warmup"], "init 'phase:warmup' must name an earlier phase"),
    (["--set", "phases.5.epochs=2"], "unknown phase '5' in 'phases.5.epochs'"),
    (["--set", "phases..epochs=2"], "unknown phase '' in 'phases..epochs'"),
    (["--set", "phases.0.crop_scale=0.5"], "phases.0.crop_scale takes 2 comma-separated values"),
    (["--set", "phases.0.head=mlp:0"], 'head must be "", "linear" or "mlp:<hidden units'),
    (["--set", "phases.0.name=.."], "name must be a folder name"),
    (["--set", "model.channels_last=maybe"], "model.channels_last takes true or false, got 'maybe'"),
    (["--set", "data.std=0,1,1"], "data.std must be positive"),
    (["--set", "seed=-1"], "seed must be >= 0, got -1"),
    (["--set", "logging.run_name=../x"], "logging.run_name must be a folder name"),
    (["--set", "epochs"], "override 'epochs' is not key=value"),
    (["--set", "model.arch=resnet181"], "model.arch 'resnet181' is not a timm model (close: resnet18"),
    (["--set", "phases.0.optimizer=adamww"], "optimizer 'adamww' is not a timm optimizer (close: adamw"),
    (["--data", "{missing}"], "does not exist"),
    (["--resume", "{missing}"], "no complete checkpoint in that folder"),
    (["--set", "phases.0.init={missing}/w.safetensors"], "w.safetensors does not exist"),
    (["--set", "phases.0.init={damaged}"], "damaged.safetensors cannot be read"),
    (["--set", "phases.0.init={resnet18}"], "does not fit model ResNet"),
    (["--set", "phases.0.init={five}"], 'holds a head for 5 classes, and this phase keeps its head (head=""), which needs one for the data\'s 3 classes; to train a new head, set head="linear"'),
    (["--set", "phases.0.init={three_mlp}"], "holds a head for the same 3 classes but another shape"),
    (["--set", "phases.0.init=pretrained", "--set", "model.pretrained_file={missing}/w.safetensors"], "w.safetensors does not exist"),
    (["--run-dir", "{a_file}"], "is a file, not a folder"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_COMMAND_LINES, ids=[" ".join(a)[:60] for a, _ in BAD_COMMAND_LINES])
def test_bad_command_line_stops_before_any_work(args, expected, tmp_path, tiny_imagenet, files, capsys):
    """In-process: `run(RECIPE, argv)` is what `python recipes/quickstart.py argv` calls."""
    run_dir = tmp_path / "run"
    # FAST first, minus the keys a case sets itself; a later --data or --run-dir wins over these.
    argv = ["--data", str(tiny_imagenet), "--run-dir", str(run_dir)] + [i for s in FAST if not _overridden(s, args) for i in ("--set", s)]
    argv += fill_placeholders(args, files, tmp_path / "nowhere")
    started = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        run(_load_quickstart(), argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, err
    assert expected in error_lines[0]
    assert "Traceback" not in err
    assert not run_dir.exists()
    assert time.monotonic() - started < 30


def _overridden(fast_setting: str, args: list[str]) -> bool:
    key = fast_setting.split("=", 1)[0]
    return any(a.startswith(key + "=") for a in args)


# -- the kept-head rule, where it lets runs through -------------------------------------------------------


def test_a_fitting_head_or_an_asked_for_new_head_passes(files):
    model = timm.create_model("resnet10t", num_classes=3)
    keep = Recipe(name="r", model=Model(arch="resnet10t"), phases=(Phase(init=files["three"]),))
    assert initialize(model, keep, keep.phases[0], Path()) == f"weights from {files['three']}"
    assert torch.equal(model.fc.weight, _state(files["three"])["fc.weight"])  # the trained head is kept
    new = Recipe(name="r", model=Model(arch="resnet10t"), phases=(Phase(init=files["five"], head="linear"),))
    model = timm.create_model("resnet10t", num_classes=3)
    said = initialize(model, new, new.phases[0], Path())
    assert "new head" in said and "fc.weight" in said and "fc.bias" in said
    assert torch.equal(model.conv1[0].weight, _state(files["five"])["conv1.0.weight"])  # the backbone is loaded


def _state(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)
