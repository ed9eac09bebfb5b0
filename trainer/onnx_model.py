"""The bundle's `model.onnx` (`export --onnx`): written with torch's exporter, then run with onnxruntime on
the bundle's example images (preprocessed by `trainer.inference`, as `predict` does) and compared with
the PyTorch logits, so a file that would answer differently is never shipped silently."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer import inference

ONNX_FILE = "model.onnx"
# 17: the first opset with LayerNormalization as one op (ViT, Swin, ConvNeXt); onnxruntime has run it since 1.14.
OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# Largest |ONNX - PyTorch| allowed on a logit, float32 on the CPU: kernels sum in another order
# (typically 1e-6..1e-5 here); a wrong graph is off by far more.
TOLERANCE = 1e-3
CHECK_IMAGES_MAX = 32


def check_inputs(bundle_dir: Path, config: dict) -> tuple[torch.Tensor, str]:
    """(batch, what it is): the example images, preprocessed; two seeded noise images when there are none."""
    files = sorted(p for p in (bundle_dir / "examples").glob("*/*") if p.is_file())[:CHECK_IMAGES_MAX]
    if files:
        images = []
        for path in files:
            with Image.open(path) as image:
                images.append(inference.preprocess(image, config))
        return torch.stack(images), f"{len(files)} example images"
    generator = torch.Generator().manual_seed(0)
    return torch.randn((2, *config["input_size"]), generator=generator), "2 random inputs (the bundle has no example images)"


def write_onnx(bundle_dir: Path) -> dict:
    """Write `bundle_dir/model.onnx` from the bundle there (model.safetensors + config.json) with a dynamic
    batch axis, and return what config.json records about it, including the largest logit difference
    from PyTorch on the check inputs ("max_abs_diff"); the caller decides whether that is acceptable."""
    import onnxruntime

    bundle = inference.load_bundle(bundle_dir)
    batch, described = check_inputs(bundle_dir, bundle.config)
    path = bundle_dir / ONNX_FILE
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter: no onnxscript needed, seconds not minutes, and torch 2.14 still
        # ships it (it warns that the torch.export-based one is the default now).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            bundle.model, (batch[:1],), buffer, dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    path.write_bytes(buffer.getvalue())
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = bundle.model(batch).float().numpy()
    got = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy().astype(np.float32)})[0]  # the whole batch: batch axis dynamic
    return {
        "file": ONNX_FILE,
        "opset": OPSET,
        "input": {"name": INPUT_NAME, "shape": ["batch", *bundle.config["input_size"]], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", bundle.config["num_classes"]], "dtype": "float32",
                   "meaning": "logits in the order of `classes`; softmax gives probabilities"},
        "checked_on": described,
        "max_abs_diff": float(np.abs(got - expected).max()),
        "tolerance": TOLERANCE,
        "onnxruntime": onnxruntime.__version__,
    }
