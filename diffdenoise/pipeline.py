"""The method's stages in order, run as bundle configs on one prepared dataset: the one place that knows it.

Each stage reads the datalist its predecessor wrote and adds its output key to every slice
(``stages.write_stage_outputs``), so the last datalist holds the noisy input, the clean reference where one
exists, and every stage's output side by side:

    datalist.json -> infer_bsn -> datalist_bsn.json (x_c, blind: the condition)
                                -> datalist_bsn_posterior.json (+ stage 1 as a denoiser)
                  -> train_diffusion, sample_srds -> datalist_srds.json (+ SRDS: the pseudo-targets)
                  -> train_student, inference -> datalist_student.json (+ the distilled student)

The demo, ``diffdenoise fit`` and the benchmark run it; ``STAGES`` names what each step adds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import NamedTuple, Sequence

from diffdenoise.stages import run_stage

logger = logging.getLogger(__name__)


class Stage(NamedTuple):
    """One step of the pipeline: the bundle configs it runs and the slice keys it adds."""

    name: str
    configs: tuple[str, ...]  # bundle configs run in order, each merged over common.yaml
    outputs: tuple[str, ...]  # slice keys added, in the order their datalists are written
    labels: tuple[str, ...]  # report labels of those keys


STAGES = (
    Stage("bsn", ("train_bsn", "infer_bsn"), ("bsn", "bsn_posterior"),
          ("BSN x_c (stage 1, blind)", "BSN + re-injection (stage 1 denoiser)")),
    Stage("srds", ("train_diffusion", "sample_srds"), ("srds",), ("SRDS (stages 2-3)",)),
    Stage("student", ("train_student", "inference"), ("student",), ("student (stage 4)",)),
)
LABELS = {"image": "noisy input", **{k: label for s in STAGES for k, label in zip(s.outputs, s.labels)}}


def stage_keys(dataset_dir: Path) -> dict[str, str]:
    """Config keys that chain the datalists: each stage reads the one its predecessor wrote."""
    return {"student_datalist_path": str(dataset_dir / "datalist_srds.json"),
            "inference_datalist_path": str(dataset_dir / "datalist_srds.json")}


def run_pipeline(dataset_dir, bundle_root, overlays: Sequence[str], stop_after: str | None = None,
                 **overrides) -> tuple[Path, dict[str, float]]:
    """Runs the stages in order (up to ``stop_after``, a ``Stage.name``) on a prepared dataset.

    Args:
        dataset_dir: a folder written by ``diffdenoise prepare``.
        bundle_root: where checkpoints (``models/``) and logs go.
        overlays: preset/noise overlays merged after each stage's configs, e.g. ``["presets/cpu"]``.
        stop_after: the last stage to run; None runs all.
        overrides: config keys for every stage, e.g. ``seed=0``.

    Returns:
        The last datalist written and the seconds each stage took.
    """
    dataset_dir = Path(dataset_dir)
    keys = {"dataset_dir": str(dataset_dir), "bundle_root": str(bundle_root), **stage_keys(dataset_dir), **overrides}
    datalist, seconds = dataset_dir / "datalist.json", {}
    for stage in STAGES:
        started = time.perf_counter()
        for config in stage.configs:
            logger.info("stage %s: %s", stage.name, config)
            run_stage(config, overlays, **keys)
        seconds[stage.name] = time.perf_counter() - started
        datalist = dataset_dir / f"datalist_{stage.outputs[-1]}.json"
        if stage.name == stop_after:
            break
    return datalist, seconds
