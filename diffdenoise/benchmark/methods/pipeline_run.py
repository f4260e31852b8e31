"""The DiffDenoise methods (BSN, SRDS, students, leak-free): stages of one pipeline run per case, diffusion method
and stage-1 prior, trained step by step as far as a method needs and shared by all methods that read it."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from diffdenoise.benchmark.cases import Case
from diffdenoise.benchmark.methods.base import FitSettings, Fitted
from diffdenoise.benchmark.store import save_atomic
from diffdenoise.convergence import CURVE_SUFFIX
from diffdenoise.data import load_datalist
from diffdenoise.errors import InputError
from diffdenoise.pipeline import Step, bundle_overlays, pipeline_steps, stage_keys
from diffdenoise.stages import run_stage, stage_denoiser, stage_parser

# the student iterations the benchmark offers (paper Table 4)
ITERATIONS = 3


def bsn_overlay(correlation: float) -> str:
    """The noise overlay whose blind spot suits a correlation kernel sigma (px): 0 -> 1, 0.5 -> 5x5, 1.2 -> 9x9."""
    if correlation <= 0:
        return "noise/iid"
    return "noise/correlated_mild" if correlation < 0.85 else "noise/correlated"


def _noise_keys(case: Case) -> dict:
    """The bundle's noise keys (stage 1's posterior re-injection, the leak-free recorruption): the model and level
    of the case's synthetic noise, known as in the paper's comparisons; real noise is taken as Gaussian with its
    sigma estimated (``diffdenoise.noise_level``). The classical filters still estimate sigma per slice."""
    if case.noise == "real":
        return {"noise_model": "gaussian", "noise_level": None}
    return {"noise_model": case.noise, "noise_level": case.level, "noise_correlation_sigma": case.correlation}


def case_overlays(settings: FitSettings, method: str = "paper", prior: str = "box") -> list[str]:
    """The bundle overlays of every bundle stage of a case: the preset's sizes, the blind spot for its noise, the
    diffusion method (``configs/method``) and, for stage 1's learned prior, ``configs/stage1``."""
    stage1 = [] if prior == "box" else [f"stage1/{prior}_prior"]
    return [*bundle_overlays(settings.bundle_preset, method), bsn_overlay(settings.case.correlation), *stage1]


def _steps_upto(steps: Sequence[Step], name: str) -> list[Step]:
    """The pipeline's config runs (``diffdenoise.pipeline.pipeline_steps``) from the first to the one ``name``."""
    return list(steps[:[step.name for step in steps].index(name) + 1])


def _fitting_crop(overlays: Sequence[str], keys: Mapping[str, Any], datalist: Path) -> dict:
    """``roi_size`` for the BSN and diffusion training when the overlays' crop exceeds the case's smallest slice
    side (the 9x9 blind spot's 160 px crops on 192x137 down2 brain slices), else nothing: the largest square
    that fits and stays a multiple of the BSN's pixel-shuffle stride and of the diffusion U-Net's downsampling,
    which both trainers need (a crop cut to the slice is not square, and rotating it breaks the batch)."""
    parser = stage_parser("train_diffusion", overlays, **keys)
    side = min(min(np.load(item["image"], mmap_mode="r").shape)
               for split in ("training", "validation") for item in load_datalist(datalist, split))
    if max(parser["roi_size"]) <= side:
        return {}
    step = math.lcm(int(parser["bsn_pd_stride"]), 2 ** (len(parser["diffusion_channels"]) - 1))
    if side < step:
        raise InputError(datalist, f"slices of {side} px are smaller than one {step} px training crop")
    return {"roi_size": [side // step * step] * 2}


def _pipeline(settings: FitSettings, upto: str, method: str = "paper", prior: str = "box") -> tuple[dict, dict]:
    """The case's DiffDenoise run, one per case, diffusion method and stage-1 prior, carried up to the step ``upto``.

    The configs run in ``<case>/work/pipeline`` on ``data/datalist.json`` there: the case's training and
    validation slices, noisy only, and no test split, so no stage can read a clean slice nor spends time on
    test slices (the benchmark denoises its scored slices itself). Step by step rather than with
    ``run_pipeline`` (which always runs from stage 1 to a whole stage), so each method pays only for what it
    needs: ``bsn`` the BSN's training, ``srds`` then x_c and the diffusion training, ``student`` then the SRDS
    pseudo-targets and its own training, ``student_iter<k>`` then iterations 2..k (the previous student over
    the slices, a fine-tuned diffusion model, new targets, a new student). ``state.json`` records the
    overlays and keys and each finished step's wall and process-CPU seconds; other keys start the run again,
    an interrupted step is rerun.

    Returns:
        The config keys (the run's ``dataset_dir`` and ``bundle_root`` included) and the state record.
    """
    name = "_".join(["pipeline", *([] if method == "paper" else [method]), *([] if prior == "box" else [prior])])
    root = settings.dataset_dir.parent / "work" / name
    overlays = case_overlays(settings, method, prior)
    data = root / "data"
    keys = {"dataset_dir": str(data), "bundle_root": str(root / "bundle"), **stage_keys(data), "seed": settings.seed,
            **_noise_keys(settings.case), **settings.options}
    source = settings.dataset_dir / "datalist.json"
    keys.update(_fitting_crop(overlays, keys, source))
    run = json.loads(json.dumps({"overlays": overlays, "keys": keys}))
    path = root / "state.json"
    state = json.loads(path.read_text()) if path.is_file() else {}
    if state.get("run") != run:
        shutil.rmtree(root, ignore_errors=True)
        data.mkdir(parents=True)
        noisy = {split: [{k: v for k, v in item.items() if k != "clean"} for item in load_datalist(source, split)]
                 for split in ("training", "validation")}
        (data / "datalist.json").write_text(json.dumps({**noisy, "test": [], "meta": {"source": str(source)}}))
        state = {"run": run, "seconds": {}, "cpu_seconds": {}}
    for step in _steps_upto(pipeline_steps(data, ITERATIONS), upto):
        if step.name in state["seconds"]:
            continue
        if method != "paper" and prior == "box" and step.stage == "bsn":
            _share_stage_one(settings, root, state)
            save_atomic(path, lambda f: f.write(json.dumps(state, indent=1).encode()))
            continue
        started, cpu = time.perf_counter(), time.process_time()
        run_stage(step.config, [*overlays, *step.overlays], **{**keys, **step.keys})
        state["seconds"][step.name] = time.perf_counter() - started
        state["cpu_seconds"][step.name] = time.process_time() - cpu
        save_atomic(path, lambda f: f.write(json.dumps(state, indent=1).encode()))
    return keys, state


def _share_stage_one(settings: FitSettings, root: Path, state: dict) -> None:
    """Stage 1 does not depend on the diffusion method: another method's pipeline takes the paper pipeline's BSN
    and its outputs (running it first if needed) instead of training its own. The steps keep their cost, marked
    ``shared`` so that a case's cost counts them once."""
    paper_keys, paper_state = _pipeline(settings, "infer_bsn")
    paper_root = Path(paper_keys["bundle_root"]).parent
    for source in (paper_root / "data").glob("*bsn*"):
        target = root / "data" / source.name
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
    for folder, name in (("models", "bsn.pt"), ("logs", f"bsn{CURVE_SUFFIX}")):
        source = Path(paper_keys["bundle_root"]) / folder / name
        (root / "bundle" / folder).mkdir(parents=True, exist_ok=True)
        if source.is_file():  # a paper run stored before curves were recorded has none
            shutil.copy2(source, root / "bundle" / folder / name)
    shared = [step.name for step in pipeline_steps(root / "data") if step.stage == "bsn"]
    for name in shared:
        state["seconds"][name], state["cpu_seconds"][name] = paper_state["seconds"][name], paper_state["cpu_seconds"][name]
    state["shared"] = shared


@dataclass(frozen=True)
class StageFit:
    """The ``fit`` of a method needing the case's pipeline run (of the diffusion ``method`` and stage-1 ``prior``) up
    to the step ``upto``: its fit cost is every step up to it, whichever method ran them; it denoises with the
    network and ``inferer_key`` of the step ``denoiser``'s config (``Step.name``: a config, ``@<k>`` for iteration
    k). The registry tells the methods that share a pipeline run (``PIPELINE_METHODS``) by this type."""

    upto: str
    denoiser: str
    inferer_key: str
    method: str = "paper"
    prior: str = "box"

    def __call__(self, train_noisy, workdir, settings) -> Fitted:
        keys, state = _pipeline(settings, self.upto, self.method, self.prior)
        steps = pipeline_steps(Path(keys["dataset_dir"]), ITERATIONS)
        needed = _steps_upto(steps, self.upto)
        base = case_overlays(settings, self.method, self.prior)
        for trained in needed:
            if trained.config.startswith("train_"):  # its training curve goes with this method's result
                parser = stage_parser(trained.config, [*base, *trained.overlays], **{**keys, **trained.keys})
                curve = Path(parser.get_parsed_content("curve_path"))
                if curve.is_file():  # a pipeline run stored before curves were recorded has none
                    shutil.copy2(curve, workdir / curve.name)
        step = next(step for step in steps if step.name == self.denoiser)
        return Fitted(stage_denoiser(step.config, [*base, *step.overlays], {**keys, **step.keys}, self.inferer_key),
                      sum(state["seconds"][n.name] for n in needed), sum(state["cpu_seconds"][n.name] for n in needed))
