"""``diffdenoise fit``: every stage on a user's noisy scans, leaving a finished, self-contained bundle.

No clean image is needed or used. The run is built in a hidden folder beside RUN_DIR and renamed when the
last stage and the export are done, so RUN_DIR is either a finished bundle or absent:

    RUN_DIR/configs/<stage>.yaml   each stage's config merged with common.yaml and the overlays, with
                                   bundle_root = RUN_DIR, so ``python -m monai.bundle run --config_file
                                   RUN_DIR/configs/inference.yaml`` needs nothing else
    RUN_DIR/configs/common.yaml    the merged shared keys (what ``diffdenoise denoise --bundle`` reads first)
    RUN_DIR/configs/metadata.json, RUN_DIR/LICENSE
    RUN_DIR/models/{bsn,diffusion,model}.pt, RUN_DIR/models/model.ts (the student, TorchScript)
    RUN_DIR/models/model.onnx      with --onnx: the student for ONNX Runtime (diffdenoise.export)
    RUN_DIR/models/{diffusion,model}_iter<k>.pt   with --iterations N > 1: each later iteration's networks;
                                   the stage configs and model.ts are then the last iteration's
    RUN_DIR/data/                  the prepared slices and every stage's outputs (pseudo-targets included)
    RUN_DIR/report.md              each mode's estimated gain over the noisy input on the validation slices, no
                                   reference needed (diffdenoise.assessment); the best is the bundle's default_mode
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from monai.bundle import ConfigParser

from diffdenoise.assessment import assess_bundle, write_assessment
from diffdenoise.data import prepare
from diffdenoise.errors import InputError
from diffdenoise.export import check_formats, export_student
from diffdenoise.io import atomic_folder, check_output_folder
from diffdenoise.pipeline import (DEFAULT_METHOD, ITERATED, ITERATION_OVERLAY, STAGES, method_overlay, run_pipeline,
                                  stage_keys)
from diffdenoise.stages import bundle_dir, stage_config_files

# configs a finished bundle carries, beyond those STAGES run
_EXTRA_CONFIGS = ("infer_bsn",)


def fit(src, run_dir, preset: str = "cpu", overlays: Sequence[str] = (), modality: str | None = None,
        seed: int = 0, iterations: int = 1, onnx: bool = False, overwrite: bool = False, method: str = DEFAULT_METHOD,
        **overrides) -> Path:
    """Prepares ``src`` (already noisy), trains and runs every stage, exports the student; returns RUN_DIR.

    Args:
        src: noisy DICOM series / NIfTI / PNG / TIFF, a file or a folder (``diffdenoise prepare``).
        run_dir: the bundle folder to create.
        preset: ``smoke``, ``cpu`` or ``paper`` (``configs/presets``).
        overlays: more overlays after the preset, e.g. ``["noise/correlated"]`` for correlated noise.
        modality: "mri", "ct", "xray" or "other" (CT is windowed in HU); None detects it.
        seed: fixes the splits and the training.
        iterations: rounds of stages 2-4 (paper Table 4); each after the first is conditioned on the previous
            student, and the bundle ships the last student.
        onnx: also export the student to ONNX (needs the ``onnx`` extra).
        overwrite: replace an existing RUN_DIR.
        method: stages 2-3, ``leak_free`` or ``paper`` (``diffdenoise.pipeline.DIFFUSION_METHODS``).
        overrides: any config key, e.g. ``max_epochs=30`` (applied to every stage).

    Raises:
        InputError: unusable input or an output folder that would clobber something (before any work).
    """
    run_dir = Path(run_dir).absolute()
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise InputError("--iterations", f"must be a whole number >= 1, got {iterations!r}")
    check_output_folder(run_dir, src, overwrite)
    formats = check_formats(["torchscript", *(["onnx"] if onnx else [])])
    overlays = [f"presets/{preset}", method_overlay(method), *overlays]
    with atomic_folder(run_dir, overwrite) as work:
        prepare(src, work / "data", modality=modality, seed=seed)
        run_pipeline(work / "data", work, overlays, iterations=iterations, seed=seed, **overrides)
        _write_configs(work, run_dir, overlays, {"seed": seed, **overrides}, iterations)
        assessment = assess_bundle(work, work / "data", seed=seed)
        write_assessment(work, assessment)
        export_student([work / "configs" / "inference.yaml"], work, formats)
    return run_dir


def _write_configs(work: Path, run_dir: Path, overlays: Sequence[str], overrides: dict, iterations: int) -> None:
    """One merged config per stage, pointing at the final RUN_DIR (the last iteration's for iterated stages),
    plus metadata and licence."""
    configs = work / "configs"
    configs.mkdir()
    data = run_dir / "data"
    for name, stage in [("common", None), *((c, None) for c in _EXTRA_CONFIGS),
                        *((c, s.name) for s in STAGES for c in s.configs)]:
        iteration = iterations if stage in ITERATED else 1
        files = stage_config_files(name, [*overlays, *([ITERATION_OVERLAY] if iteration > 1 else [])])
        parser = ConfigParser()
        parser.read_config(files[1:] if name == "common" else files)  # common.yaml is files[0]
        parser.update({"bundle_root": str(run_dir), "dataset_dir": str(data), **stage_keys(data, iteration),
                       **overrides})
        ConfigParser.export_config_file(parser.get(), str(configs / f"{name}.yaml"), fmt="yaml", sort_keys=False)
    shutil.copy(bundle_dir() / "configs" / "metadata.json", configs / "metadata.json")
    shutil.copy(bundle_dir() / "LICENSE", work / "LICENSE")
