"""The student as a file other runtimes load, through MONAI's bundle exporters.

TorchScript (``models/model.ts``) is the model zoo's format and what MONAI Deploy loads; ONNX
(``models/model.onnx``) serves ONNX Runtime, TensorRT and other non-Python runtimes. The ONNX graph takes
any batch, height and width (NAFNet pads to its multiple inside the graph) and is checked against the torch
network with ONNX Runtime when it is written. Both are written beside their final name and renamed, so an
export that fails leaves no partial file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

import torch
from monai.bundle import ConfigParser, ckpt_export, onnx_export

from diffdenoise.errors import InputError
from diffdenoise.stages import bundle_dir

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# the example input the exporter traces; batch, height and width stay free in the graph
ONNX_EXAMPLE_SHAPE = [1, 1, 64, 64]


def check_formats(formats: Sequence[str]) -> list[str]:
    """The requested formats, or a clear error naming what is unknown or not installed (before any work)."""
    formats = [formats] if isinstance(formats, str) else list(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InputError("--formats", f"{unknown or formats} is not a list of {', '.join(FORMATS)}")
    missing = [p for p in ONNX_PACKAGES if "onnx" in formats and importlib.util.find_spec(p) is None]
    if missing:
        raise InputError("--formats onnx", f"needs {', '.join(missing)}: pip install 'diffdenoise[onnx]'")
    return formats


def export_student(config_files: Sequence[str], bundle_root, formats: Sequence[str] = ("torchscript",)) -> list[Path]:
    """Writes the student of ``config_files`` (inference.yaml after common.yaml and overlays, or a fitted
    bundle's merged inference.yaml) to ``bundle_root/models/`` in each format; returns the files."""
    formats = check_formats(formats)
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser["bundle_root"] = str(bundle_root)
    ckpt = parser.get_parsed_content("ckpt_path")
    if not os.path.isfile(ckpt):
        raise InputError(str(ckpt), "no student checkpoint: train stage 4 first (train_student.yaml)")
    common = {"net_id": "network_def", "ckpt_file": str(ckpt), "config_file": [str(f) for f in config_files],
              "meta_file": str(bundle_dir() / "configs" / "metadata.json"), "bundle_root": str(bundle_root)}
    written = []
    for fmt in formats:
        final = Path(bundle_root) / "models" / FORMATS[fmt]
        partial = final.with_name(f".partial.{final.name}")
        if fmt == "torchscript":
            ckpt_export(filepath=str(partial), **common)
        else:
            free = torch.export.Dim.DYNAMIC
            onnx_export(filepath=str(partial), input_shape=ONNX_EXAMPLE_SHAPE, use_trace=True,
                        converter_kwargs={"input_names": ["image"], "output_names": ["pred"], "dynamo": True,
                                          "dynamic_shapes": ({0: free, 2: free, 3: free},),
                                          "verify": True, "use_ort": True, "verbose": False},
                        **common)  # fmt: skip
        os.replace(partial, final)
        written.append(final)
    return written


def bundle_inference_config(run_dir) -> Path:
    """A fitted bundle's merged inference config (``diffdenoise fit`` writes it)."""
    path = Path(run_dir) / "configs" / "inference.yaml"
    if not path.is_file():
        raise InputError(str(run_dir), "not a bundle written by `diffdenoise fit` (no configs/inference.yaml)")
    return path
