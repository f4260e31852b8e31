"""The supervised upper bound: the student's network trained on (noisy, clean) pairs, the one method that may read
clean training slices."""

from __future__ import annotations

from diffdenoise.benchmark.methods.base import Denoiser
from diffdenoise.benchmark.methods.pipeline_run import case_overlays
from diffdenoise.data import load_datalist
from diffdenoise.errors import InputError
from diffdenoise.stages import run_stage, stage_denoiser


def fit_supervised(train_noisy, workdir, settings) -> Denoiser:
    """The upper bound: stage 4's NAFNet trained by ``train_student`` on (noisy, clean) pairs of the case's
    training split (validated on its clean validation pairs), then run as ``inference.yaml`` runs it."""
    datalist = settings.dataset_dir / "datalist.json"
    if not all("clean" in item for split in ("training", "validation") for item in load_datalist(datalist, split)):
        raise InputError(datalist, "the supervised bound needs a clean slice for every training and validation "
                                   "slice; delete this case's data folder to prepare it again")
    keys = {"dataset_dir": str(settings.dataset_dir), "bundle_root": str(workdir / "bundle"), "seed": settings.seed,
            "student_datalist_path": str(datalist), "student_target_key": "clean", **settings.options}
    run_stage("train_student", case_overlays(settings), **keys)
    return stage_denoiser("inference", case_overlays(settings), keys, "inferer")
