"""`python -m trainer <command>`: tools around recipes and runs: lr-find, export (run → bundle), predict, push, eval, report, compare, check-data, doctor, import-weights, prepare-imagenet.

Argument parsing only: each command's module is imported when that command is chosen, so
`python -m trainer --help` and `compare` load neither torch nor DALI.
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from loaders.sources import DataError
from trainer.recipe import Recipe, RecipeError, resolve_recipe


def load_recipe(path: str) -> Recipe:
    """The module-level `RECIPE` of a recipe file, imported by path (its `if __name__ == "__main__"` does not run)."""
    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    # As `python recipes/x.py` would: the recipe's folder is importable, so it may import its neighbours.
    sys.path.insert(0, str(file.resolve().parent))
    spec = importlib.util.spec_from_file_location(f"_recipe_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses defined in the recipe look their module up here
    written = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # leave no __pycache__ beside the recipe
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = written
    recipe = getattr(module, "RECIPE", None)
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"{path} defines no module-level RECIPE = Recipe(...)")
    return recipe


def pick_phase(recipe: Recipe, name: str | None) -> int:
    """The phase index for `--phase` (a name, or an index as in `--set phases.0...`); the first by default."""
    names = [p.name for p in recipe.phases]
    if name is None:
        return 0
    if name in names:
        return names.index(name)
    if name.isdigit() and int(name) < len(names):
        return int(name)
    raise RecipeError(f"unknown phase {name!r}; the phases of recipe {recipe.name!r} are: {', '.join(names)}")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe file and the same overrides as a training run (`--data`, `--set`)."""
    parser.add_argument("recipe", help="recipe file, e.g. recipes/quickstart.py")
    parser.add_argument("--data", help="dataset folder (overrides data.path)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field, e.g. phases.0.epochs=2 (repeatable)")


# -- lr-find ---------------------------------------------------------------------------------------


def add_lr_find(subparsers) -> None:
    parser = subparsers.add_parser(
        "lr-find",
        help="LR range test on a recipe phase: plot, JSON series and a suggested lr_per_256",
        description="Train a fresh copy of the recipe's model on one phase with an exponentially rising LR "
        "(Leslie Smith's range test) and suggest the LR where the smoothed loss falls fastest. "
        "Writes only the plot and its JSON: no run folder, checkpoint or W&B run.",
    )
    add_recipe_arguments(parser)
    parser.add_argument("--phase", help="phase name (or index); default: the first phase")
    parser.add_argument("--out", default="lr_find.png", help="plot path; the JSON series goes beside it (default: lr_find.png)")
    parser.add_argument("--steps", type=int, default=100, help="optimizer updates, across epochs if needed (default: 100)")
    parser.add_argument("--start-lr", type=float, default=1e-7, help="first LR (default: 1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="last LR (default: 10)")
    parser.set_defaults(command=run_lr_find, check=functools.partial(check_lr_find, parser))


def check_lr_find(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps < 2:
        parser.error(f"--steps must be >= 2, got {args.steps}")
    if not 0 < args.start_lr < args.end_lr:
        parser.error(f"need 0 < --start-lr < --end-lr, got {args.start_lr} and {args.end_lr}")
    if Path(args.out).suffix.lower() == ".json":
        parser.error("--out names the plot; the JSON is written beside it with the same stem")


def run_lr_find(args: argparse.Namespace) -> None:
    from trainer.lr_find import lr_find, save_result

    recipe = resolve_recipe(load_recipe(args.recipe), args.set, args.data)
    index = pick_phase(recipe, args.phase)
    phase = recipe.phases[index]
    print(f"lr-find: recipe {recipe.name}, phase {index} {phase.name!r}, {args.steps} steps, lr {args.start_lr:g} -> {args.end_lr:g}", flush=True)
    result = lr_find(recipe, index, steps=args.steps, start_lr=args.start_lr, end_lr=args.end_lr)
    for note in result.weights:
        print(note)
    out = Path(args.out)
    json_path = save_result(result, out)
    print(f"ran {len(result.lrs)} of {result.steps} steps ({result.stop_reason}), global batch {result.global_batch} "
          f"({phase.batch_size_per_device} per device x {phase.grad_accum_steps} accumulation), {result.precision}")
    if result.suggested_lr is None:
        print("no suggestion: fewer than two steps ran (the loss was not finite); try a lower --start-lr")
    else:
        print(f"suggested lr: {result.suggested_lr:.3g} (steepest descent of the smoothed loss)")
        print(f"as lr_per_256 for a global batch of {result.global_batch}: {result.suggested_lr_per_256:.3g}")
        print(f"  {result.set_line}")
    print(f"plot: {out}")
    print(f"series: {json_path}")


# -- export and predict ----------------------------------------------------------------------------


def add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a run's bundle: model.safetensors, config.json, model card, inference.py, examples",
        description="Export the best weights of a run (the last phase's best checkpoint; its EMA weights when "
        "they scored better) as a bundle that loads with torch, timm and safetensors alone.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holds run.json and recipe.json)")
    parser.add_argument("--out", metavar="DIR", help="bundle folder (default: RUN_DIR/bundle); a bundle there is replaced")
    parser.add_argument("--onnx", action="store_true", help="also write model.onnx (dynamic batch), checked against PyTorch with onnxruntime")
    parser.set_defaults(command=run_export, check=lambda args: None)


def run_export(args: argparse.Namespace) -> None:
    from trainer.export import export

    print(export(args.run_dir, args.out, onnx=args.onnx))


def add_predict(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="classify images with a bundle: top-k classes, optional Grad-CAM overlay",
        description="Classify images with an exported bundle (the same preprocessing as the trainer's eval).",
    )
    parser.add_argument("bundle", metavar="BUNDLE", help="bundle folder written by export")
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--gradcam", metavar="OUT.png", help="write the Grad-CAM overlay of the top class; with several images OUT-1.png, OUT-2.png, ...")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {image, top: [{class, prob}]} instead of a table")
    parser.add_argument("--tta", choices=("none", "flip"), default="none", help="flip: average the softmax of each image and its mirror (default: none)")
    parser.set_defaults(command=run_predict, check=functools.partial(check_predict, parser))


def check_predict(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.topk < 1:
        parser.error(f"--topk must be >= 1, got {args.topk}")


def gradcam_paths(out: str, count: int) -> list[Path]:
    """OUT.png for one image; OUT-1.png, OUT-2.png, ... (in argument order) for several."""
    path = Path(out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{n}{path.suffix or '.png'}") for n in range(1, count + 1)]


def run_predict(args: argparse.Namespace) -> None:
    from PIL import Image, UnidentifiedImageError

    from trainer.export import BundleError
    from trainer.inference import gradcam, load_bundle, predict

    try:
        bundle = load_bundle(args.bundle)
    except (OSError, ValueError, KeyError) as err:
        raise BundleError(f"cannot load bundle {args.bundle}: {err}") from None
    images = []
    for name in args.images:
        try:
            with Image.open(name) as image:
                image.load()
                images.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as err:
            raise BundleError(f"cannot read image {name}: {err}") from None
    results = predict(bundle, images, topk=args.topk, tta=args.tta)
    cams = gradcam_paths(args.gradcam, len(images)) if args.gradcam else [None] * len(images)
    records = []
    for name, image, top, cam_path in zip(args.images, images, results, cams):
        # "class": the folder name the model was trained on; "name": what people call it ("tench" for n01440764).
        record = {"image": name, "top": [{"class": bundle.classes[bundle.names.index(n)], "name": n, "prob": p} for n, p in top], "tta": args.tta}
        if cam_path is not None:
            _, overlay = gradcam(bundle, image)
            cam_path.parent.mkdir(parents=True, exist_ok=True)
            overlay.save(cam_path)
            record["gradcam"] = str(cam_path)
        records.append(record)
    if args.json:
        print(json.dumps(records, indent=2))
        return
    for record in records:
        print(record["image"])
        for rank, item in enumerate(record["top"], 1):
            print(f"  {rank:>2}. {item['prob']:7.2%}  {item['name']}" + (f"  ({item['class']})" if item["name"] != item["class"] else ""))
        if "gradcam" in record:
            print(f"  grad-cam: {record['gradcam']}")


# -- push ------------------------------------------------------------------------------------------


def add_push(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a run's bundle to a Hub model repo and its demo to a Gradio Space",
        description="Export RUN_DIR if its bundle is missing or older than the run, create the Space (Gradio SDK) "
        "and the model repo if missing, and upload. Without --model-repo the bundle goes into the Space itself. "
        "The token comes from HF_TOKEN or `hf auth login`; it is never printed.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (or a bundle folder)")
    parser.add_argument("--space", required=True, metavar="USER/NAME", help="the Space to create or update")
    parser.add_argument("--model-repo", metavar="USER/NAME", help="also upload the bundle to this model repo; the Space loads it from there")
    parser.add_argument("--private", action="store_true", help="create the repos private (existing repos keep their visibility)")
    parser.set_defaults(command=run_push, check=lambda args: None)


def run_push(args: argparse.Namespace) -> None:
    from trainer.hub import PushError, push

    try:
        urls = push(args.run_dir, args.space, args.model_repo, private=args.private, report=functools.partial(print, flush=True))
    except PushError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"Space: {urls['space_url']}")
    if "model_url" in urls:
        print(f"model repo: {urls['model_url']}")


# -- eval ------------------------------------------------------------------------------------------


def add_eval(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="score a run's best checkpoint (model and EMA) or a bundle: top-1/5, P/R/F1, per class, confusion",
        description="Evaluate the best checkpoint of a run's last phase (its model and its EMA weights) or a "
        "bundle on the val (or train, or test) split, with training's own eval loader. Prints a table and writes the "
        "eval JSON (the schema of <run>/<phase>/eval.json). Works under accelerate launch; each image counts once.",
    )
    parser.add_argument("path", metavar="RUN_DIR|BUNDLE", help="a run folder (holds run.json) or a bundle folder (holds config.json)")
    parser.add_argument("--data", help="dataset folder (default: the run's data; a bundle outside a run needs it)")
    parser.add_argument("--split", choices=("val", "train", "test"), default="val", help="which split to score (default: val)")
    parser.add_argument("--out", metavar="FILE.json", help="where the JSON goes (default: RUN_DIR|BUNDLE/eval-<split>.json)")
    parser.add_argument("--json", action="store_true", help="print the JSON record instead of the table")
    parser.add_argument("--tta", choices=("none", "flip"), default="none",
                        help="flip: score each image as the mean of the softmax of it and its mirror; the default --out becomes eval-<split>-tta-flip.json (default: none)")
    parser.set_defaults(command=run_eval, check=lambda args: None)


def run_eval(args: argparse.Namespace) -> None:
    from accelerate import PartialState

    from trainer.evaluation import evaluate_saved, format_report
    from trainer.tracking import write_eval_json

    record = evaluate_saved(args.path, args.data, args.split, args.tta)
    if not PartialState().is_main_process:  # under accelerate launch every process scored its share
        return
    suffix = "" if args.tta == "none" else f"-tta-{args.tta}"  # a TTA score does not overwrite the plain one
    out = Path(args.out) if args.out else Path(args.path) / f"eval-{args.split}{suffix}.json"
    write_eval_json(out, record)
    if args.json:
        print(json.dumps(record, indent=2))
        print(f"written: {out}", file=sys.stderr)
    else:
        print(format_report(record))
        print(f"\nwritten: {out}")


# -- report and compare ----------------------------------------------------------------------------


def add_report(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help="an HTML page about a run: metrics, curves, confusion matrix, best/worst predictions with Grad-CAM",
        description="Write RUN_DIR/report/index.html (opens from disk, images beside it): each phase's eval.json, "
        "the training curves, the confusion heatmap and most confused pairs, and per class the best and worst of a "
        "few val images with Grad-CAM, predicted by the run's bundle (exported first when missing or stale).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (holds run.json and recipe.json)")
    parser.add_argument("--out", metavar="DIR", help="report folder (default: RUN_DIR/report); a report there is replaced")
    parser.add_argument("--per-class", type=int, default=8, metavar="N", help="val images scored per class for the galleries (default: 8)")
    parser.add_argument("--data", metavar="PATH", help="the val data, when the run's data.path is not readable here")
    parser.add_argument("--tta", choices=("none", "flip"), default="none", help="score the gallery images with flip test-time augmentation (default: none)")
    parser.set_defaults(command=run_report, check=functools.partial(check_report, parser))


def check_report(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.per_class < 1:
        parser.error(f"--per-class must be >= 1, got {args.per_class}")


def run_report(args: argparse.Namespace) -> None:
    from trainer.report import write_report

    result = write_report(args.run_dir, args.out, per_class=args.per_class, data=args.data, tta=args.tta)
    for note in result.notes:
        print(note)
    print(result.index_html)


def add_compare(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="runs side by side: best top-1/top-5, epochs, wall time, images/s, parameters; val top-1 plot",
        description="Print one line per run (best val top-1 of model or EMA and best top-5 from history.jsonl, "
        "epochs, wall time from run.json, mean images/s, parameter count) and plot val top-1 per epoch, overlaid.",
    )
    parser.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run folders")
    parser.add_argument("--out", default="compare.png", help="plot path (default: compare.png)")
    parser.set_defaults(command=run_compare, check=lambda args: None)


def run_compare(args: argparse.Namespace) -> None:
    from trainer.compare import comparison_table, plot_comparison, summarize_run

    runs = [summarize_run(path) for path in args.run_dirs]
    for line in comparison_table(runs):
        print(line)
    print(f"plot: {plot_comparison(runs, args.out)}")


# -- check-data ------------------------------------------------------------------------------------

CHECK_DATA_EXIT_CODES = """exit status:
  0  no problems found
  1  problems a training run copes with: with data.bad_files=skip (the default) it skips the bad
     files, converts greyscale/CMYK/16-bit/palette/alpha images to RGB, replaces undecodable files
     when it meets them, and trains on huge, tiny and duplicated files as they are
     (data.bad_files=stop makes the bad files stop the run instead)
  2  an unusable dataset, a training run stops before it starts: missing folder, no class
     folders, empty class folders, class folders only in val or test, a class whose every image is bad"""


def add_check_data(subparsers) -> None:
    parser = subparsers.add_parser(
        "check-data",
        help="scan a dataset for bad images and layout problems: a table of counts and paths, or --json",
        description="Scan an ImageFolder (PATH/train/<class>/* + PATH/val/<class>/* and an optional PATH/test/<class>/*, "
        "or PATH/<class>/*) for what "
        "training would skip, convert or stop on: unreadable, zero-byte, truncated, non-image, unsupported, "
        "corrupt and undecodable files; CMYK, greyscale, 16-bit, palette and alpha images; huge (> 50 MP) and tiny (shorter side "
        "< 32 px) images; empty class folders, class folders only in val or test, and files duplicated across "
        "splits (same bytes); and each split's images per class and imbalance ratio. Each file's structure is checked, then it is decoded with DALI's CPU decoder "
        "(--structure-only skips that: the same check a training run makes before it starts).",
        epilog=CHECK_DATA_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", metavar="PATH", help="dataset folder, or builtin:digits")
    parser.add_argument("--structure-only", action="store_true", help="check headers and file ends only, no decode (fast)")
    parser.add_argument("--json", action="store_true", help="print a JSON record of every finding instead of the table")
    parser.add_argument("--show", type=int, default=10, metavar="N", help="paths listed per problem kind (default: 10)")
    parser.add_argument("--threads", type=int, default=0, metavar="N", help="decoder threads (default: the CPU cores)")
    parser.set_defaults(command=run_check_data, check=functools.partial(check_check_data, parser))


def check_check_data(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.show < 0:
        parser.error(f"--show must be >= 0, got {args.show}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")


def run_check_data(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from loaders.digits import resolve_data_path
    from loaders.scan import report_lines, scan_dataset

    bars = []

    def progress(label: str, total: int):
        # On stderr, and only on a terminal: --json output and logs stay clean.
        bar = tqdm(total=total, desc=label, unit="file", file=sys.stderr, disable=not sys.stderr.isatty(), leave=False)
        bars.append(bar)
        return bar.update

    if args.path.startswith("hf:"):
        raise DataError("check-data scans folders; a Hugging Face dataset's rows are checked (headers only) when a run starts")
    threads = args.threads or len(os.sched_getaffinity(0))
    report = scan_dataset(resolve_data_path(args.path), decode=not args.structure_only, threads=threads, progress=progress)
    for bar in bars:
        bar.close()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for line in report_lines(report, shown=args.show):
            print(line)
    if report.exit_code:
        raise SystemExit(report.exit_code)


# -- doctor ----------------------------------------------------------------------------------------


def add_doctor(subparsers) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="first thing on a new GPU machine: versions, GPUs, decode pre-flight, loader vs model vs loop images/s",
        description="Print versions (torch, CUDA, DALI, nvImageCodec, NCCL) and each GPU, run the decode pre-flight, "
        "then measure on the recipe's first phase (its resolution, batch, threads, precision, channels_last, compile): "
        "(a) the loader alone, (b) the model on synthetic data on the device, (c) the real training loop; name the "
        "bottleneck and print --set lines to try. Without data (no --data, no data.path in the recipe) it generates "
        "an ImageNet-like folder of JPEGs in ~/.cache/imgcls ($IMGCLS_CACHE). See docs/gpu.md.",
    )
    parser.add_argument("recipe", nargs="?", help="recipe file (default: the field defaults: resnet50, batch 64, 224 px)")
    parser.add_argument("--data", help="dataset folder (overrides data.path)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field (repeatable)")
    parser.add_argument("--steps", type=int, help="timed steps per measurement (default: 100 with CUDA, 5 on the CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default: 20 with CUDA, 2 on the CPU)")
    parser.add_argument("--images", type=int, help="JPEGs to generate when there is no data (default: 10000 with CUDA, 400 on the CPU)")
    parser.add_argument("--max-seconds", type=float, help="time limit: measurements stop early past it and what was measured is printed")
    parser.add_argument("--log", help="log file (default: $OUT/doctor.log when OUT is set, else ./doctor.log)")
    parser.set_defaults(command=run_doctor, check=functools.partial(check_doctor, parser))


def check_doctor(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("steps", "warmup", "images"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be >= {0 if name == 'warmup' else 1}, got {value}")
    if args.max_seconds is not None and not args.max_seconds > 0:
        parser.error(f"--max-seconds must be positive, got {args.max_seconds}")


def generated_folder(num_images: int):
    """`make_data` for doctor: bench/loader.py's ImageNet-like JPEGs (200-800 px, ~100 KB), built once into
    the cache folder, one class per 10 images up to 1000. The generator lives with the benchmarks, beside
    this package in the repository."""

    def make(log) -> str:
        repo = Path(__file__).resolve().parent.parent
        if not (repo / "bench" / "loader.py").is_file():
            raise RecipeError(f"no data, and no generator ({repo / 'bench' / 'loader.py'} is missing): pass --data PATH")
        # Imported by name, with the repository on the path, so the generator's worker processes find it too.
        sys.path.insert(0, str(repo))
        module = importlib.import_module("bench.loader")
        from loaders.digits import cache_root

        num_classes = min(1000, max(2, num_images // 10))
        root = cache_root() / f"imagenet_like_{num_images}_{num_classes}"
        started = time.perf_counter()
        summary = module.build_image_folder(root, num_images=num_images, num_classes=num_classes)
        log(f"data: generated: {module.describe(root, summary)} (ready in {time.perf_counter() - started:.1f} s)")
        return str(root)

    return make


def run_doctor(args: argparse.Namespace) -> None:
    import torch

    from trainer.doctor import Options, doctor
    from trainer.recipe import Phase

    base = load_recipe(args.recipe) if args.recipe else Recipe(name="doctor", phases=(Phase(),))
    recipe = resolve_recipe(base, args.set, args.data)
    cuda = torch.cuda.is_available()
    out = os.environ.get("OUT")
    log_path = Path(args.log) if args.log else Path(out) / "doctor.log" if out else Path("doctor.log")
    opts = Options(
        steps=args.steps or (100 if cuda else 5),
        warmup=args.warmup if args.warmup is not None else (20 if cuda else 2),
        max_seconds=args.max_seconds,
        log_path=log_path,
    )
    code = doctor(recipe, opts, generated_folder(args.images or (10000 if cuda else 400)))
    if code:
        raise SystemExit(code)


# -- import-weights --------------------------------------------------------------------------------


def add_import_weights(subparsers) -> None:
    parser = subparsers.add_parser(
        "import-weights",
        help="map another implementation's weights onto a timm architecture, for model.pretrained_file",
        description="Read a state dict (.pth/.pt/.bin torch file, weights only, or .safetensors), match its tensors "
        "to timm's ARCH in order and shape (BatchNorm's num_batches_tracked and non-tensor entries aside), and write "
        "them under timm's names as a .safetensors file that model.pretrained_file takes. Refuses, naming the first "
        "tensor where the two part, when they do not match.",
    )
    parser.add_argument("file", metavar="FILE", help="the foreign weights file")
    parser.add_argument("--arch", required=True, help="timm architecture, e.g. efficientnet_lite0")
    parser.add_argument("--out", required=True, metavar="X.safetensors", help="the file to write (replaced if there)")
    parser.set_defaults(command=run_import_weights, check=lambda args: None)


def run_import_weights(args: argparse.Namespace) -> None:
    from trainer.foreign_weights import import_weights

    print(import_weights(args.file, args.arch, args.out))


# -- prepare-imagenet ------------------------------------------------------------------------------


def add_prepare_imagenet(subparsers) -> None:
    parser = subparsers.add_parser(
        "prepare-imagenet",
        help="link ImageNet's flat val folder into val/<wnid>/ from LOC_val_solution.csv or the devkit's ground truth",
        description="Link the 50,000 flat ILSVRC2012_val_*.JPEG files of ImageNet's validation folder into "
        "OUT/<wnid>/ (hard links on the same filesystem, else symlinks; nothing is copied), reading the labels "
        "from Kaggle's LOC_val_solution.csv, the devkit's ILSVRC2012_validation_ground_truth.txt (with the "
        "devkit's data/meta.mat) or '<file> <wnid>' lines. The folder is checked against the label file first "
        "and refused whole when they do not match; running it again on a prepared folder changes nothing.",
    )
    parser.add_argument("val_dir", metavar="VAL_DIR", help="the flat validation folder (ILSVRC2012_val_00000001.JPEG ...)")
    parser.add_argument("--labels", required=True, metavar="FILE", help="LOC_val_solution.csv, ILSVRC2012_validation_ground_truth.txt or a '<file> <wnid>' text file")
    parser.add_argument("--out", metavar="DIR", help="where the class folders go (default: VAL_DIR itself; its flat files stay, training reads only the class folders)")
    parser.add_argument("--meta", metavar="FILE", help="the devkit's meta.mat, for the ground-truth file (default: meta.mat beside it, as in the devkit's data/)")
    parser.set_defaults(command=run_prepare_imagenet, check=lambda args: None)


def run_prepare_imagenet(args: argparse.Namespace) -> None:
    from trainer.imagenet_val import prepare_val

    done = prepare_val(args.val_dir, args.labels, args.out, args.meta)
    if done.linked:
        print(f"linked {done.linked:,} of {done.images:,} images into {done.classes:,} class folders of {done.out} "
              f"({done.link_kind}; labels: {done.label_format})")
    else:
        print(f"nothing to do: all {done.images:,} images are already in {done.classes:,} class folders of {done.out}")


# -- entry point -----------------------------------------------------------------------------------

SUBCOMMANDS: tuple[Callable, ...] = (
    add_lr_find, add_export, add_predict, add_push, add_eval, add_report, add_compare, add_check_data, add_doctor,
    add_import_weights, add_prepare_imagenet,
)  # a new subcommand: one more add_<name> here


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Tools around recipes and runs.")
    subparsers = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    args.check(args)  # flag combinations, reported by the subcommand's own parser (usage, exit 2)
    try:
        args.command(args)
    except (RecipeError, DataError) as err:
        # As a training run: a clear line and exit status 2, no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    # The interpreter's last sweep at exit would walk every object that importing torch and timm built
    # (about 440,000): a second of a command's exit. They die with the process anyway.
    gc.freeze()
    sys.exit(code)
