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

Every slice but a small validation split trains (``FIT_SPLIT``): with no clean reference a test split would serve
nothing. Before training each stage is timed briefly (``diffdenoise.plan``) and the plan is logged, one line per
config run with its work and estimated time; each run then says when it starts and shows its progress
(``diffdenoise.progress``), and a summary table ends the log: each stage's time, output and estimated gain.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Sequence

from monai.bundle import ConfigParser

from diffdenoise.assessment import Assessment, assess_bundle, write_assessment
from diffdenoise.data import prepare
from diffdenoise.errors import InputError
from diffdenoise.export import check_formats, export_student
from diffdenoise.io import atomic_folder, check_output_folder
from diffdenoise.pipeline import (DEFAULT_METHOD, ITERATED, ITERATION_OVERLAY, STAGES, bundle_overlays, iteration_suffix,
                                  run_pipeline, stage_keys)
from diffdenoise.plan import PlannedStep, calibrate, plan
from diffdenoise.progress import duration
from diffdenoise.stages import bundle_dir, stage_config_files

logger = logging.getLogger(__name__)

# configs a finished bundle carries, beyond those STAGES run
_EXTRA_CONFIGS = ("infer_bsn",)
# (training, validation, test): validation picks checkpoints, the Tweedie rho and the default mode; no test split
FIT_SPLIT = (0.85, 0.15, 0.0)


def fit(src, run_dir, preset: str = "cpu", overlays: Sequence[str] = (), modality: str | None = None,
        seed: int = 0, iterations: int = 1, onnx: bool = False, overwrite: bool = False, method: str = DEFAULT_METHOD,
        **overrides) -> Path:
    """Prepares ``src`` (already noisy), trains and runs every stage, exports the student; returns RUN_DIR.

    Args:
        src: noisy DICOM series / NIfTI / PNG / TIFF, a file or a folder (``diffdenoise prepare``).
        run_dir: the bundle folder to create.
        preset: a preset of ``configs/presets`` (``diffdenoise.resources.presets``), e.g. ``demo`` or ``cpu``.
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
        InputError: unusable input, too few slices for a validation split, or an output folder that would clobber
            something (before any work, or before any training for the slice count).
    """
    run_dir = Path(run_dir).absolute()
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise InputError("--iterations", f"must be a whole number >= 1, got {iterations!r}")
    check_output_folder(run_dir, src, overwrite)
    formats = check_formats(["torchscript", *(["onnx"] if onnx else [])])
    overlays = [*bundle_overlays(preset, method), *overlays]
    keys = {"seed": seed, **overrides}
    started, seconds = time.perf_counter(), {}
    with atomic_folder(run_dir, overwrite) as work:
        data = work / "data"
        with _timed(seconds, "prepare"):
            prepare(src, data, modality=modality, seed=seed, split=FIT_SPLIT)
            _say_counts(src, data)
        logger.info("timing every stage on one training and one validation slice, to plan the run")
        with _timed(seconds, "timing"):
            planned = plan(calibrate(data, work / "timing", overlays, **keys), data, iterations)
        _say_plan(planned)
        _, stage_seconds = run_pipeline(data, work, overlays, iterations=iterations, watch=_announce(planned), **keys)
        seconds.update(stage_seconds)
        _write_configs(work, run_dir, overlays, keys, iterations)
        _say_start(planned, len(planned) - 1)
        with _timed(seconds, "assessment"):
            assessment = assess_bundle(work, data, seed=seed)
            write_assessment(work, assessment)
        with _timed(seconds, "export"):
            export_student([work / "configs" / "inference.yaml"], work, formats)
        _say_summary(seconds, time.perf_counter() - started, sum(p.seconds for p in planned), assessment, formats)
    return run_dir


@contextmanager
def _timed(seconds: dict, name: str):
    started = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - started


def _say_counts(src, data: Path) -> None:
    """How the slices were split, in one line; a clear error when there are too few for a validation split."""
    meta = json.loads((data / "datalist.json").read_text())["meta"]
    counts, volumes = meta["counts"], meta["volumes"].values()
    guards = sum(len(v["guard_slices"]) for v in volumes)
    if not counts["validation"]:
        raise InputError(src, f"{counts['training']} foreground slices in {len(volumes)} volume(s): too few for a "
                         "validation split; fit needs two volumes, or 3 slices of one (training, a guard slice, "
                         "validation)")
    how = ("whole volumes to each split" if meta["split_by"] == "group" else
           f"by contiguous slice blocks, {guards} guard slice{'s' * (guards != 1)} between them left out")
    background = sum(len(v["background_slices"]) for v in volumes)
    logger.info("%d volume%s: %d slices for training, %d for validation, no test split (%s; %d background-only "
                "slices skipped)", len(volumes), "s" * (len(volumes) != 1), counts["training"], counts["validation"],
                how, background)


def _say_plan(planned: list[PlannedStep]) -> None:
    logger.info("plan, with times estimated on this machine:")
    for i, step in enumerate(planned, 1):
        logger.info("  [%d/%d] %s (%s): %s; about %s", i, len(planned), step.name, step.title, step.work,
                    duration(step.seconds))
    logger.info("in all %s", _left(planned))


def _left(planned: list[PlannedStep]) -> str:
    """The estimated time of ``planned`` and when it ends from now."""
    left = sum(step.seconds for step in planned)
    return f"about {duration(left)}: done around {(datetime.now() + timedelta(seconds=left)).strftime('%H:%M')}"


def _say_start(planned: list[PlannedStep], index: int) -> None:
    step = planned[index]
    logger.info("[%d/%d] %s (%s): about %s; left in all %s", index + 1, len(planned), step.name, step.title,
                duration(step.seconds), _left(planned[index:]))


def _announce(planned: list[PlannedStep]):
    """``run_pipeline``'s watch: each config run starts with its line of the plan and the time left."""
    names = [step.name for step in planned]

    @contextmanager
    def announce(step, overlays, keys):
        _say_start(planned, names.index(step.name))
        yield None

    return announce


def _say_summary(seconds: dict, total: float, estimated: float, assessment: Assessment,
                 formats: Sequence[str]) -> None:
    """A table, a row per entry of ``seconds`` (in order): its time, what it left and, for a stage's last run,
    its estimated gain (the default mode marked)."""
    stages = {stage.name: stage for stage in STAGES}
    others = {"prepare": "data/datalist.json", "timing": "the plan above", "assessment": "report.md",
              "export": ", ".join(f"models/model.{'ts' if f == 'torchscript' else f}" for f in formats)}
    last_run = {key.partition("@")[0]: key for key in seconds}
    rows = []
    for key, took in seconds.items():
        name, _, k = key.partition("@")
        if name not in stages:
            rows.append((name, took, others[name], ""))
            continue
        estimate = assessment.estimates.get(name) if last_run[name] == key else None
        gain = "" if estimate is None else f"{estimate.gain_db:+.2f} dB" + (
            " (default)" if assessment.default_mode == name else "")
        outputs = ", ".join(f"data/{output}{iteration_suffix(int(k or 1))}/" for output in stages[name].outputs)
        rows.append((stages[name].title + (f", iteration {k}" if k else ""), took, outputs, gain))
    widths = (max(len(row[0]) for row in rows), 10, max(len(row[2]) for row in rows))
    logger.info("done in %s (estimated %s before training):", duration(total), duration(estimated))
    for name, took, output, gain in [("stage", "time", "output", "estimated gain"), *rows]:
        took = took if isinstance(took, str) else duration(took)
        line = f"{name.ljust(widths[0])}  {took.ljust(widths[1])}  {output.ljust(widths[2])}  {gain}"
        logger.info("  %s", line.rstrip())
    if assessment.default_mode is None:
        logger.info("no stage is estimated to beat the noisy input: `diffdenoise denoise` needs --mode")


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
