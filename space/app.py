"""Gradio Space for an exported imgcls bundle: top-5 classes with confidence bars (optionally with flip
test-time augmentation) and a Grad-CAM overlay.

Runs on its own, without the imgcls repository: everything it needs is the bundle (model.safetensors,
config.json, examples/) and `inference.py`, the one inference implementation that `export` copies into
every bundle. Where the bundle comes from:
    BUNDLE_DIR=path/to/bundle python app.py      # a local folder (default: ./bundle next to this file)
    MODEL_REPO=user/name python app.py           # a Hub model repo, via huggingface_hub.snapshot_download
It serves on GRADIO_SERVER_NAME:GRADIO_SERVER_PORT (Gradio's defaults: 127.0.0.1:7860 here, what
Spaces set there).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Before gradio and huggingface_hub are imported: no usage reports or version checks at startup.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).resolve().parent
TOPK = 5
OVERLAY_MIN_PX = 320  # small crops (32 px models) are shown enlarged; the heatmap itself is at crop size


def bundle_folder() -> Path:
    """The bundle: a Hub model repo (MODEL_REPO, or model_repo.txt written by `push --model-repo`),
    else BUNDLE_DIR, else ./bundle beside app.py."""
    repo = os.environ.get("MODEL_REPO", "").strip()
    if not repo and (HERE / "model_repo.txt").is_file():
        repo = (HERE / "model_repo.txt").read_text().strip()
    if repo:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=repo, revision=os.environ.get("MODEL_REVISION") or None))
    folder = Path(os.environ.get("BUNDLE_DIR") or HERE / "bundle").expanduser().resolve()
    if not folder.is_dir():
        raise SystemExit(f"no bundle at {folder}: set BUNDLE_DIR to a folder written by `python -m trainer export`, or MODEL_REPO to a Hub model repo")
    return folder


def import_inference(folder: Path):
    """`inference` from the bundle (the copy that wrote these weights), else the one next to app.py."""
    for place in (folder, HERE):
        if (place / "inference.py").is_file():
            sys.path.insert(0, str(place))
            break
    else:
        raise SystemExit(f"inference.py is in neither {folder} nor {HERE}")
    import inference

    return inference


def example_files(folder: Path) -> tuple[list[str], list[str]]:
    """examples/<class>/<n>.jpg as (paths, class-name labels), sorted."""
    files = sorted(p for p in (folder / "examples").glob("*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})
    return [str(p) for p in files], [p.parent.name for p in files]


def describe(config: dict) -> tuple[str, str]:
    """Title and description from config.json: architecture, class count, validation top-1."""
    classes = config.get("classes", [])
    title = f"{config.get('architecture', 'model')} · {len(classes)} classes"
    metrics = config.get("metrics") or {}
    score = f"val top-1 **{metrics['top1']:.1%}**" if isinstance(metrics.get("top1"), int | float) else "val top-1 not recorded"
    if metrics.get("source") == "ema":
        score += " (EMA weights)"
    _, height, width = config.get("input_size", [3, "?", "?"])
    names = config.get("display_names") or classes  # "tench" for ImageNet's n01440764; folder names otherwise
    shown = ", ".join(names[:12]) + (f", … ({len(names) - 12} more)" if len(names) > 12 else "")
    description = (
        f"timm `{config.get('architecture')}` trained with the imgcls recipe `{config.get('recipe', '?')}`: "
        f"{len(classes)} classes, {score}, input {width}×{height}.\n\n"
        f"Upload an image or click an example. Classes: {shown}.\n\n"
        "**Grad-CAM** overlays where the model looked for its top class, on the centre crop it sees. "
        "**Flip TTA** averages the probabilities of the image and its mirror image."
    )
    return title, description


def build_demo(bundle, inference) -> gr.Blocks:
    config = bundle.config
    title, description = describe(config)
    examples, example_classes = example_files(bundle.path)

    # Bundles exported before TTA existed carry an inference.py without it: no checkbox for them.
    has_tta = "flip" in getattr(inference, "TTA_MODES", ())

    def analyse(image: Image.Image | None, show_cam: bool, flip_tta: bool = False):
        if image is None:
            return None, gr.update(value=None, visible=False)
        ranked = inference.predict(bundle, [image], topk=TOPK, **({"tta": "flip"} if flip_tta else {}))[0]
        scores = {name: prob for name, prob in ranked}
        if not show_cam:
            return scores, gr.update(value=None, visible=False)
        try:
            _, overlay = inference.gradcam(bundle, image)
        except NotImplementedError as err:  # e.g. a ViT: no convolutional feature map
            gr.Warning(f"Grad-CAM is not available for this model: {err}")
            return scores, gr.update(value=None, visible=False)
        if max(overlay.size) < OVERLAY_MIN_PX:
            scale = OVERLAY_MIN_PX / max(overlay.size)
            overlay = overlay.resize((round(overlay.width * scale), round(overlay.height * scale)), Image.BICUBIC)
        return scores, gr.update(value=overlay, visible=True, label=f"Grad-CAM for {ranked[0][0]} (the centre crop the model sees)")

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}\n\n{description}")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], height=320, elem_id="input-image")
                show_cam = gr.Checkbox(value=False, label="Grad-CAM", info="overlay where the model looked", elem_id="gradcam-toggle")
                flip_tta = gr.Checkbox(value=False, label="Flip TTA", info="average the probabilities of the image and its mirror",
                                       visible=has_tta, elem_id="tta-toggle")
                if examples:
                    gr.Examples(examples=examples, inputs=image, label=f"Examples: {len(examples)} val images of {len(set(example_classes))} classes", examples_per_page=12, elem_id="examples")
            with gr.Column():
                top5 = gr.Label(num_top_classes=TOPK, label=f"Top-{min(TOPK, len(bundle.classes))}", elem_id="top5")
                overlay = gr.Image(type="pil", format="png", label="Grad-CAM", interactive=False, visible=False, height=320, buttons=["download", "fullscreen"], elem_id="gradcam-overlay")
        for event in (image.change, show_cam.change, flip_tta.change):
            event(analyse, inputs=[image, show_cam, flip_tta], outputs=[top5, overlay], show_progress="minimal")
    return demo


def main() -> None:
    folder = bundle_folder()
    inference = import_inference(folder)
    bundle = inference.load_bundle(folder)
    demo = build_demo(bundle, inference)
    # Server name and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT (read by Gradio itself).
    demo.launch(allowed_paths=[str(folder / "examples")], show_error=True)


if __name__ == "__main__":
    main()
