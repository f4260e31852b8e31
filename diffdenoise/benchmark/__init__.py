"""The benchmark: every denoiser on the same prepared cases, scored per test slice, with paired tests.

A *case* is one dataset with one noise model, level and correlation, scored against one kind of reference
(``REFERENCES``): ``full`` (the images as they are, whose own noise caps every score), ``down2`` (2x2
area-averaged images, half that noise), ``strong`` (a stronger synthetic level, so the references' noise
matters less), or ``repeats`` (real noise: a phantom scored against the mean of other repeats).

A *method* is one entry of ``METHODS``: ``fit(train_noisy, workdir, settings)`` returns a
``denoiser(noisy) -> denoised`` for one (H, W) slice in [0, 1]. Methods see the training split's noisy
slices only (classical filters ignore them); clean slices are read only to score and draw, except by a
method of kind ``supervised`` (the upper bound), which by definition trains on clean pairs. The BSN, SRDS
and student methods are stages of one DiffDenoise run (``diffdenoise.pipeline``), trained once per case
and shared (``PIPELINE_METHODS``).

Each finished (case, method) leaves ``OUT/cases/<case>/<method>.json`` (per-slice scores, timings and
the settings it ran with) and ``<method>.npy`` (its output on the figure slice), written atomically: a
rerun with the same settings skips it, so a stopped run resumes. ``OUT/results.csv``, ``OUT/results.md``
and ``OUT/figures/<case>.png`` are rebuilt from those files at the end of every run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import fnmatch
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import platform
import queue
import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import yaml
from tqdm import tqdm

from diffdenoise.baselines import (
    denoise_bm3d,
    denoise_neighbor2neighbor,
    denoise_nlm,
    denoise_noise2self,
    denoise_tv,
    train_neighbor2neighbor,
    train_noise2self,
)
from diffdenoise.data import SPLITS, evenly_spaced, load_datalist, prepare
from diffdenoise.errors import InputError
from diffdenoise.io import atomic_folder
from diffdenoise.metrics import noise_leak, psnr, ssim
from diffdenoise.noise import NOISE_MODELS, PAPER_LEVELS
from diffdenoise.pipeline import Step, bundle_overlays, pipeline_steps, stage_keys
from diffdenoise.report import paired_best, save_visual_grid, significance_table
from diffdenoise.stages import overlay_path, run_stage, stage_denoiser, stage_parser

logger = logging.getLogger(__name__)

Denoiser = Callable[[np.ndarray], np.ndarray]
KINDS = ("input", "classical", "self-supervised", "diffdenoise", "supervised")
REFERENCES = ("full", "down2", "strong", "repeats")
# The stronger levels (level = sigma | lambda | alpha, beta = alpha); presets restate them.
STRONG_LEVELS = {"gaussian": 15 / 255, "poisson": 50.0, "gamma": 25.0, "rician": 15 / 255}
_NOISE_NAME = re.compile(rf"^({'|'.join(NOISE_MODELS)})(?:_corr(\d+(?:\.\d+)?))?$")
_PRESET_KEYS = {"bundle_preset", "seed", "max_test_slices", "torch_threads", "datasets", "noises", "references",
                "methods", "method_settings", "pipeline_settings", "method_cases", "strong_levels"}
# methods read from one DiffDenoise pipeline run per case, so stage 1 is trained once, not three times
PIPELINE_METHODS = ("bsn", "bsn_learned", "srds", "student", "student_iter2", "student_iter3", "tweedie", "student_leak_free")
# the student iterations the benchmark offers (paper Table 4)
ITERATIONS = 3
_CSV_COLUMNS = ("case", "dataset", "noise", "level", "correlation", "reference", "method", "kind", "slice", "psnr",
                "ssim", "leak")


@dataclass(frozen=True)
class Dataset:
    """Where a dataset lies under the data root and how ``prepare`` reads it.

    Args:
        label: display name.
        src: folder under the data root.
        modality: passed to ``prepare``; picks the paper's noise levels.
        groups: CSV under the data root grouping images by patient (split by patient), or None.
        noisy_volume: real noise only: the repeat that is trained on and denoised.
        reference_volumes: real noise only: repeats whose mean is the reference.
        correlation: real noise only: the noise's correlation kernel sigma in pixels, which picks the BSN's
            blind spot (measured for the phantom: lag-1 autocorrelation of repeat differences 0.03, i.i.d.).
    """

    label: str
    src: str
    modality: str
    groups: str | None = None
    noisy_volume: str | None = None
    reference_volumes: tuple[str, ...] = ()
    correlation: float = 0.0

    @property
    def real(self) -> bool:
        """True for real noise (repeats), False for clean-ish images that get synthetic noise."""
        return self.noisy_volume is not None


DATASETS = {
    "studyforrest": Dataset("brain MRI (studyforrest T1)", "brain_mri_t1_axial_studyforrest/series", "mri"),
    "chest_xray": Dataset("chest X-ray (Hannover)", "chest_xray_mhh/png", "xray",
                          groups="chest_xray_mhh/data_subset.csv"),
    "head_ct": Dataset("head CT (GE)", "head_ct_ge/series", "ct"),
    # volume 1 (0063) is not at steady state; volumes 2-5 are repeats of one another
    "phantom": Dataset("EPI phantom, real noise", "phantom_mri_epi_repeats/series", "mri", noisy_volume="0126",
                       reference_volumes=("0189", "0252", "0315")),
}


@dataclass(frozen=True)
class Case:
    """One dataset x noise x reference variant; ``name`` is its folder under ``OUT/cases``."""

    dataset: str
    noise: str  # a NOISE_MODELS name, or "real"
    level: float | None
    correlation: float
    reference: str

    @property
    def name(self) -> str:
        if self.noise == "real":
            return f"{self.dataset}-real"
        corr = f"_corr{self.correlation:g}" if self.correlation else ""
        return f"{self.dataset}-{self.noise}{corr}-{self.reference}"

    def describe(self) -> str:
        """One line for the report: dataset, noise and reference."""
        dataset = DATASETS[self.dataset]
        if dataset.real:
            refs = ", ".join(dataset.reference_volumes)
            return (f"{dataset.label}: trained on and denoising repeat {dataset.noisy_volume}; reference = mean of "
                    f"repeats {refs} at the same slice, in the test volume's intensity scale")
        symbol = {"gaussian": "sigma", "rician": "sigma", "poisson": "lambda", "gamma": "alpha = beta"}[self.noise]
        value = f"{self.level * 255:.3g}/255" if symbol == "sigma" else f"{self.level:g}"
        corr = f", correlated (kernel sigma {self.correlation:g} px)" if self.correlation else ", i.i.d."
        ref = {"full": "full resolution", "down2": "2x2 area-downsampled images", "strong": "stronger noise level"}
        return f"{dataset.label}, {self.noise} {symbol} = {value}{corr}; reference: {ref[self.reference]}"


@dataclass(frozen=True)
class FitSettings:
    """What a method may use besides the noisy training slices.

    Args:
        case: the case being run (its noise correlation picks the BSN's blind spot).
        dataset_dir: the prepared case (``datalist.json``); bundle stages read their training split from it.
        bundle_preset: ``configs/presets/<name>.yaml`` for bundle stages.
        seed: seeds training.
        options: this method's knobs from the preset's ``method_settings``; for ``PIPELINE_METHODS``, the
            bundle keys of the shared pipeline run (``pipeline_settings``).
    """

    case: Case
    dataset_dir: Path
    bundle_preset: str
    seed: int
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Method:
    """A benchmark entry: ``fit(train_noisy, workdir, settings) -> denoiser`` (or a ``Fitted`` denoiser).

    Args:
        label: display name.
        kind: one of ``KINDS``; ``diffdenoise`` methods get a line in the report where they lose to another.
        fit: builds the denoiser; ``workdir`` is an empty folder for checkpoints and logs. Its wall time is
            the method's fit cost, unless it returns a ``Fitted`` carrying the cost itself.
        requires: optional modules; a method whose module is missing is skipped with the reason reported.
    """

    label: str
    kind: str
    fit: Callable[[list[np.ndarray], Path, FitSettings], Denoiser | Fitted]
    requires: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method kind {self.kind!r} is not one of {', '.join(KINDS)}")

    def missing(self) -> str | None:
        """Why this method cannot run here, or None."""
        absent = [name for name in self.requires if importlib.util.find_spec(name) is None]
        if not absent:
            return None
        return f"optional package(s) {', '.join(absent)} not installed (pip install {' '.join(absent)})"


def _fit_input(train_noisy, workdir, settings) -> Denoiser:
    """The noisy input itself: the floor every method must beat."""
    return np.asarray


def _fit_filter(denoise: Callable) -> Callable:
    """A classical filter needs no training; its knobs (``sigma``: None estimates it per slice) come from the preset."""

    def fit(train_noisy, workdir, settings) -> Denoiser:
        return partial(denoise, **settings.options)

    return fit


def _fit_noise2self(train_noisy, workdir, settings) -> Denoiser:
    """A Noise2Self U-Net trained on the noisy training slices; knobs (iterations, widths...) from the preset."""
    return partial(denoise_noise2self, train_noise2self(train_noisy, seed=settings.seed, **settings.options))


def _fit_neighbor2neighbor(train_noisy, workdir, settings) -> Denoiser:
    """A Neighbor2Neighbor U-Net trained on the noisy training slices; knobs from the preset."""
    network = train_neighbor2neighbor(train_noisy, seed=settings.seed, **settings.options)
    return partial(denoise_neighbor2neighbor, network)


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


@dataclass(frozen=True)
class Fitted:
    """A denoiser with the cost of what it needed, for methods whose ``fit`` call is not that cost: methods
    that share one pipeline run report the stages each needs (cumulative), whichever of them ran it."""

    denoise: Denoiser
    seconds: float
    cpu_seconds: float


def _overlays(settings: FitSettings, method: str = "paper", prior: str = "box") -> list[str]:
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
    overlays = _overlays(settings, method, prior)
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
            _save_atomic(path, lambda f: f.write(json.dumps(state, indent=1).encode()))
            continue
        started, cpu = time.perf_counter(), time.process_time()
        run_stage(step.config, [*overlays, *step.overlays], **{**keys, **step.keys})
        state["seconds"][step.name] = time.perf_counter() - started
        state["cpu_seconds"][step.name] = time.process_time() - cpu
        _save_atomic(path, lambda f: f.write(json.dumps(state, indent=1).encode()))
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
    (root / "bundle" / "models").mkdir(parents=True, exist_ok=True)
    shutil.copy2(Path(paper_keys["bundle_root"]) / "models" / "bsn.pt", root / "bundle" / "models" / "bsn.pt")
    shared = [step.name for step in pipeline_steps(root / "data") if step.stage == "bsn"]
    for name in shared:
        state["seconds"][name], state["cpu_seconds"][name] = paper_state["seconds"][name], paper_state["cpu_seconds"][name]
    state["shared"] = shared


def _fit_stage(upto: str, denoiser: str, inferer_key: str, method: str = "paper", prior: str = "box") -> Callable:
    """A method needing the case's pipeline run (of the diffusion ``method`` and stage-1 ``prior``) up to the step
    ``upto``: its fit
    cost is every step up to it, whichever method ran them; it denoises with the network and ``inferer_key`` of
    the step ``denoiser``'s config (``Step.name``: a config, ``@<k>`` for iteration k)."""

    def fit(train_noisy, workdir, settings) -> Fitted:
        keys, state = _pipeline(settings, upto, method, prior)
        steps = pipeline_steps(Path(keys["dataset_dir"]), ITERATIONS)
        needed = [step.name for step in _steps_upto(steps, upto)]
        step = next(step for step in steps if step.name == denoiser)
        return Fitted(stage_denoiser(step.config, [*_overlays(settings, method, prior), *step.overlays], {**keys, **step.keys},
                                       inferer_key),
                      sum(state["seconds"][n] for n in needed), sum(state["cpu_seconds"][n] for n in needed))

    return fit


def _fit_supervised(train_noisy, workdir, settings) -> Denoiser:
    """The upper bound: stage 4's NAFNet trained by ``train_student`` on (noisy, clean) pairs of the case's
    training split (validated on its clean validation pairs), then run as ``inference.yaml`` runs it."""
    datalist = settings.dataset_dir / "datalist.json"
    if not all("clean" in item for split in ("training", "validation") for item in load_datalist(datalist, split)):
        raise InputError(datalist, "the supervised bound needs a clean slice for every training and validation "
                                   "slice; delete this case's data folder to prepare it again")
    keys = {"dataset_dir": str(settings.dataset_dir), "bundle_root": str(workdir / "bundle"), "seed": settings.seed,
            "student_datalist_path": str(datalist), "student_target_key": "clean", **settings.options}
    run_stage("train_student", _overlays(settings), **keys)
    return stage_denoiser("inference", _overlays(settings), keys, "inferer")


METHODS: dict[str, Method] = {
    "noisy": Method("noisy input", "input", _fit_input),
    "nlm": Method("NLM", "classical", _fit_filter(denoise_nlm)),
    "tv": Method("TV", "classical", _fit_filter(denoise_tv)),
    "bm3d": Method("BM3D", "classical", _fit_filter(denoise_bm3d), requires=("bm3d",)),
    "noise2self": Method("Noise2Self", "self-supervised", _fit_noise2self),
    "neighbor2neighbor": Method("Neighbor2Neighbor", "self-supervised", _fit_neighbor2neighbor),
    "bsn": Method("BSN alone (stage 1)", "self-supervised", _fit_stage("train_bsn", "infer_bsn", "bsn_denoiser")),
    "bsn_learned": Method("BSN, learned prior (stage 1 as Laine et al.)", "self-supervised",
                          _fit_stage("train_bsn", "infer_bsn", "bsn_denoiser", prior="learned")),
    "srds": Method("DiffDenoise SRDS (stages 1-3)", "diffdenoise",
                   _fit_stage("train_diffusion", "sample_srds", "srds_inferer")),
    "student": Method("DiffDenoise student (stage 4, iteration 1)", "diffdenoise",
                      _fit_stage("train_student", "inference", "inferer")),
    "student_iter2": Method("DiffDenoise student, iteration 2", "diffdenoise",
                            _fit_stage("train_student@2", "inference@2", "inferer")),
    "student_iter3": Method("DiffDenoise student, iteration 3", "diffdenoise",
                            _fit_stage("train_student@3", "inference@3", "inferer")),
    "tweedie": Method("DiffDenoise leak-free, antithetic Tweedie (stages 1-3)", "diffdenoise",
                      _fit_stage("train_diffusion", "sample_srds", "srds_inferer", "leak_free")),
    "student_leak_free": Method("DiffDenoise leak-free student (stage 4)", "diffdenoise",
                                _fit_stage("train_student", "inference", "inferer", "leak_free")),
    "supervised": Method("supervised NAFNet (clean pairs)", "supervised", _fit_supervised),
}


def _names(value, allowed: Sequence[str], what: str) -> list[str]:
    """A list from a YAML list, a comma-separated string or ``all``, every entry checked against ``allowed``."""
    if isinstance(value, str):
        value = value.split(",")
    value = [str(v).strip() for v in value if str(v).strip()]
    value = list(allowed) if value == ["all"] else value
    unknown = [v for v in value if v not in allowed]
    if unknown or not value:
        raise ValueError(f"{what} {unknown or value} not known; choose from: {', '.join(allowed)} (or all)")
    return value


def parse_noise(name: str) -> tuple[str, float]:
    """``gaussian`` -> ("gaussian", 0.0); ``poisson_corr1.2`` -> ("poisson", 1.2): model and kernel sigma (pixels)."""
    match = _NOISE_NAME.match(name)
    if match is None:
        raise ValueError(
            f"noise {name!r} is not <model>[_corr<kernel sigma>] with model one of {', '.join(NOISE_MODELS)}; "
            "e.g. gaussian, poisson_corr1.2"
        )
    return match.group(1), float(match.group(2) or 0.0)


def load_preset(preset: str | os.PathLike, **selection) -> dict:
    """Reads and checks a benchmark preset (a name in ``configs/benchmark/`` or a YAML path) before anything runs.

    Args:
        preset: e.g. ``smoke``, ``cpu``, ``paper`` or ``my_preset.yaml``.
        selection: ``datasets``, ``noises``, ``references``, ``methods`` replacing the preset's lists (None keeps them).

    Raises:
        InputError: no such preset (the message lists the shipped ones).
        ValueError: an unknown key, dataset, noise, reference or method; the message lists the choices.
    """
    shipped = overlay_path("benchmark/smoke").parent
    path = Path(preset) if str(preset).endswith((".yaml", ".yml")) else shipped / f"{preset}.yaml"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in shipped.glob("*.yaml")))
        raise InputError(path, f"no such benchmark preset; choose {names} or a YAML file of your own")
    config = yaml.safe_load(path.read_text()) or {}
    unknown = set(config) - _PRESET_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(_PRESET_KEYS))}")
    config = {"bundle_preset": "smoke", "seed": 0, "max_test_slices": None, "torch_threads": None, "noises": [],
              "references": ["full"], "methods": "all", "method_settings": {}, "pipeline_settings": {},
              "method_cases": {}, **config}
    config.update({k: v for k, v in selection.items() if v is not None})
    config["path"] = str(path)
    config["datasets"] = _names(config.get("datasets", []), list(DATASETS), "datasets")
    noises = config["noises"].split(",") if isinstance(config["noises"], str) else config["noises"]
    config["noises"] = [str(n).strip() for n in noises if str(n).strip()]
    for noise in config["noises"]:
        parse_noise(noise)
    if not config["noises"] and not all(DATASETS[d].real for d in config["datasets"]):
        raise ValueError(f"{path}: no noises for the synthetic-noise datasets; set e.g. noises: [gaussian, "
                         "poisson_corr1.2]")
    config["references"] = _names(config["references"], REFERENCES[:3], "references")
    config["methods"] = _names(config["methods"], list(METHODS), "methods")
    stray = set(config["method_settings"]) - set(METHODS)
    if stray:
        raise ValueError(f"{path}: method_settings for unknown method(s) {sorted(stray)}; known: {', '.join(METHODS)}")
    stray = set(config["method_cases"]) - set(METHODS)
    if stray:
        raise ValueError(f"{path}: method_cases for unknown method(s) {sorted(stray)}; known: {', '.join(METHODS)}")
    for name, patterns in config["method_cases"].items():
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(f"{path}: method_cases.{name} must be a list of case-name patterns, e.g. ['*-down2', "
                             f"'phantom-real'], not {patterns!r}")
    shared = set(config["method_settings"]) & set(PIPELINE_METHODS)
    if shared:
        raise ValueError(f"{path}: method_settings for {sorted(shared)}: {', '.join(PIPELINE_METHODS)} share one "
                         "pipeline run per case; put its bundle keys under pipeline_settings")
    config["strong_levels"] = {**STRONG_LEVELS, **config.get("strong_levels", {})}
    return config


def runs_on(config: Mapping[str, Any], name: str, case: Case) -> bool:
    """Whether a preset runs a method on a case: everywhere, unless ``method_cases`` limits it to the cases whose
    names match one of its fnmatch patterns (how a CPU preset keeps an expensive method to the cases it can afford)."""
    patterns = config["method_cases"].get(name)
    return patterns is None or any(fnmatch.fnmatchcase(case.name, pattern) for pattern in patterns)


def build_cases(config: Mapping[str, Any]) -> list[Case]:
    """Datasets x noises x references of a loaded preset; a real-noise dataset is one case of its own."""
    cases = []
    for name in config["datasets"]:
        dataset = DATASETS[name]
        if dataset.real:
            cases.append(Case(name, "real", None, dataset.correlation, "repeats"))
            continue
        for noise in config["noises"]:
            model, correlation = parse_noise(noise)
            for reference in config["references"]:
                levels = config["strong_levels"] if reference == "strong" else PAPER_LEVELS[dataset.modality]
                cases.append(Case(name, model, float(levels[model]), correlation, reference))
    return cases


def prepare_case(case: Case, data_root: str | os.PathLike, case_dir: Path, seed: int = 0,
                 progress: bool = False) -> Path:
    """The case's prepared slices in ``case_dir/data`` (made once, atomically; an existing one is reused).

    Synthetic noise: ``prepare`` with the case's noise, level and correlation (``downsample=2`` for
    ``down2``). Real noise: see ``_prepare_repeats``.

    Returns:
        The path of ``case_dir/data/datalist.json``.

    Raises:
        InputError: the dataset is not under ``data_root``.
    """
    datalist = case_dir / "data" / "datalist.json"
    if datalist.is_file():
        return datalist
    dataset = DATASETS[case.dataset]
    src = Path(data_root) / dataset.src
    if not src.exists():
        raise InputError(src, f"dataset '{case.dataset}' not found; pass --data pointing at ../shared/data, or drop it")
    if dataset.real:
        return _prepare_repeats(dataset, src, case_dir, seed, progress)
    groups = None if dataset.groups is None else Path(data_root) / dataset.groups
    return prepare(src, case_dir / "data", noise=case.noise, level=case.level, correlation=case.correlation,
                   modality=dataset.modality, seed=seed, groups=groups,
                   downsample=2 if case.reference == "down2" else 1, progress=progress)


def _prepare_repeats(dataset: Dataset, src: Path, case_dir: Path, seed: int, progress: bool) -> Path:
    """Real noise: train on and denoise one repeat; the reference is the mean of other repeats.

    All repeats are prepared together into ``case_dir/repeats`` (one ``prepare`` call, so one slicing and
    one split of slice blocks, identical across repeats). ``case_dir/data/datalist.json`` keeps only
    ``noisy_volume``'s slices in each split; each slice gets ``clean`` = the mean over
    ``reference_volumes`` of the same slice position, taken in physical units (each repeat's normalisation
    inverted with its stored ``intensity_range``) and normalised with the noisy volume's range, so reference
    and input share one intensity scale. The reference still carries noise of 1/sqrt(n) of the input's.
    Test slices are scored against it; training and validation slices have it only for the supervised bound
    (its targets), as synthetic-noise cases have their clean slices.
    """
    repeats = case_dir / "repeats"
    if not (repeats / "datalist.json").is_file():
        prepare(src, repeats, modality=dataset.modality, seed=seed, progress=progress)
    listing = json.loads((repeats / "datalist.json").read_text())
    volumes = listing["meta"]["volumes"]
    absent = [v for v in (dataset.noisy_volume, *dataset.reference_volumes) if v not in volumes]
    if absent:
        raise InputError(src, f"repeat volume(s) {absent} not found; prepare found {sorted(volumes)}")
    low, high = volumes[dataset.noisy_volume]["intensity_range"]
    with atomic_folder(case_dir / "data") as tmp:  # also removes what a killed earlier run left there
        (tmp / "reference").mkdir()
        datalist = {split: [] for split in SPLITS}
        for split in SPLITS:
            for item in listing[split]:
                if item["volume"] != dataset.noisy_volume:
                    continue
                item = {**item, "image": f"../repeats/{item['image']}",
                        "clean": f"reference/{item['slice_index']:04d}.npy"}
                physical = [_physical(repeats, volumes, v, item["slice_index"]) for v in dataset.reference_volumes]
                reference = np.clip((np.mean(physical, axis=0) - low) / ((high - low) or 1.0), 0.0, 1.0)
                np.save(tmp / item["clean"], reference.astype(np.float32))
                datalist[split].append(item)
        datalist["meta"] = {
            "created_by": "diffdenoise.benchmark",
            "protocol": _prepare_repeats.__doc__.split("\n\n")[1].strip(),
            "noisy_volume": dataset.noisy_volume,
            "reference_volumes": list(dataset.reference_volumes),
            "repeats_datalist": "../repeats/datalist.json",
            "counts": {split: len(datalist[split]) for split in SPLITS},
        }
        (tmp / "datalist.json").write_text(json.dumps(datalist, indent=1))
    return case_dir / "data" / "datalist.json"


def _physical(repeats: Path, volumes: Mapping[str, Any], volume: str, k: int) -> np.ndarray:
    """Slice k of a prepared repeat back in physical units: lo + x (hi - lo)."""
    path = repeats / "slices" / volume / f"{k:04d}_noisy.npy"
    if not path.is_file():
        raise InputError(path, f"repeat {volume} has no slice {k} (background or guard); the repeats must align")
    low, high = volumes[volume]["intensity_range"]
    return low + np.load(path).astype(np.float64) * (high - low)


def _test_items(datalist: Path, max_slices: int | None) -> list[dict]:
    """The scored test slices: all, or ``max_slices`` evenly spaced ones (a fixed rule, never chosen by score)."""
    items = load_datalist(datalist, "test")
    if not items or "clean" not in items[0]:
        raise InputError(datalist, "the test split is empty or has no reference ('clean') slices to score against")
    if max_slices and len(items) > max_slices:
        items = [items[i] for i in evenly_spaced(len(items), max_slices)]
    return items


def _save_atomic(path: Path, write: Callable) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename: a reader sees all or nothing."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fingerprint(settings: FitSettings, items: Sequence[dict]) -> dict:
    """What a stored result depends on; a result with another fingerprint is run again, not reused."""
    raw = {"options": dict(settings.options), "seed": settings.seed, "bundle_preset": settings.bundle_preset,
           "slices": [item["id"] for item in items]}
    return json.loads(json.dumps(raw))


def run_method(name: str, settings: FitSettings, train: list[np.ndarray], items: Sequence[dict], workdir: Path,
               figure_slice: str) -> dict:
    """Fits one method, denoises the test ``items`` and scores them against ``clean``.

    Returns:
        The record stored as ``<method>.json``: per-slice ``slices``, ``psnr``, ``ssim``; ``fit_seconds`` and
        ``denoise_seconds_per_slice`` (wall) with their process-CPU twins ``*_cpu_*`` (all threads; they
        estimate costs on a machine shared with other jobs); ``figure``, the output on ``figure_slice``.

    Raises:
        RuntimeError: the denoiser returned another shape or non-finite values.
    """
    method = METHODS[name]
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started, cpu = time.perf_counter(), time.process_time()
    denoiser = method.fit(train, workdir, settings)
    fit_seconds, fit_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    if isinstance(denoiser, Fitted):
        denoiser, fit_seconds, fit_cpu_seconds = denoiser.denoise, denoiser.seconds, denoiser.cpu_seconds
    record = {"case": settings.case.name, "method": name, "label": method.label, "kind": method.kind,
              "fit_seconds": fit_seconds, "fit_cpu_seconds": fit_cpu_seconds, "slices": [], "psnr": [], "ssim": [], "leak": []}
    seconds = cpu_seconds = 0.0
    for item in items:
        noisy = np.load(item["image"])
        started, cpu = time.perf_counter(), time.process_time()
        out = np.asarray(denoiser(noisy), dtype=np.float32)
        seconds, cpu_seconds = seconds + time.perf_counter() - started, cpu_seconds + time.process_time() - cpu
        if out.shape != noisy.shape or not np.isfinite(out).all():
            raise RuntimeError(
                f"method '{name}' on case {settings.case.name}, slice {item['id']}: returned shape {out.shape} with "
                f"{int(np.size(out) - np.isfinite(out).sum())} non-finite values; a denoiser must return a finite "
                f"image of the input's shape {noisy.shape}"
            )
        reference = np.load(item["clean"])
        record["slices"].append(item["id"])
        record["psnr"].append(psnr(out, reference))
        record["ssim"].append(ssim(out, reference))
        record["leak"].append(noise_leak(out, noisy, reference))
        if item["id"] == figure_slice:
            record["figure"] = out
    record["denoise_seconds_per_slice"] = seconds / max(len(items), 1)
    record["denoise_cpu_seconds_per_slice"] = cpu_seconds / max(len(items), 1)
    return record


def run_benchmark(
    preset: str | os.PathLike = "smoke",
    data_root: str | os.PathLike = "../shared/data",
    out: str | os.PathLike = "runs/bench",
    datasets=None,
    noises=None,
    methods=None,
    references=None,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    command: str | None = None,
    workers: int = 1,
) -> Path:
    """Runs datasets x noises x references x methods of a preset, resuming finished pairs, and writes the report.

    Args:
        preset: ``smoke``, ``cpu``, ``paper`` (``configs/benchmark/<name>.yaml``) or a YAML path.
        data_root: folder holding the datasets (``../shared/data``).
        out: output folder; rerunning on the same folder resumes.
        datasets, noises, methods, references: lists or comma-separated strings replacing the preset's.
        progress: show a tqdm bar over (case, method) pairs.
        callback: called with ``{"event": "prepare" | "start" | "fit" | "resume" | "skip", "case": ..., "method": ...}``.
        command: the command line recorded in the report (default: this process's ``sys.argv``).
        workers: cases run side by side in this many spawned processes, each with the preset's
            ``torch_threads`` (cases are independent; the costliest go first). 1 runs them in this process.

    Returns:
        The path of ``OUT/results.md`` (beside it ``results.csv``; figures in ``OUT/figures``).

    Example::

        from diffdenoise.benchmark import run_benchmark

        report = run_benchmark("smoke", "../shared/data", "runs/bench_smoke")
        print(report.read_text())  # a rerun on the same folder refits nothing
    """
    started = time.perf_counter()
    config = load_preset(preset, datasets=datasets, noises=noises, methods=methods, references=references)
    out = Path(out).absolute()  # datalists hold paths relative to their own folder
    cases = build_cases(config)
    emit = callback or (lambda info: None)
    skipped = {name: reason for name in config["methods"] if (reason := METHODS[name].missing())}
    names = [name for name in config["methods"] if name not in skipped]
    for name, reason in skipped.items():
        logger.warning("skipping %s: %s", name, reason)
        emit({"event": "skip", "method": name, "reason": reason})
    _check_workers(workers)
    pairs = sum(runs_on(config, name, case) for case in cases for name in names)
    bar = tqdm(total=pairs, desc="benchmark", unit="run", disable=not progress)

    def report(info: dict) -> None:
        if info["event"] == "start":
            bar.set_postfix_str(f"{info['case']}: {info['method']}")
        elif info["event"] in ("fit", "resume"):
            bar.update()
        emit(info)

    threads = config["torch_threads"] or torch.get_num_threads()
    jobs = [(case, names, config, Path(data_root), out / "cases" / case.name) for case in cases]
    try:
        if workers == 1:
            with _torch_threads(threads):
                for job in jobs:
                    _run_case(*job, report)
        else:
            _run_cases_in_workers(jobs, workers, threads, report)
    finally:
        bar.close()
    header = {
        "command": command or shlex.join(sys.argv),
        "commit": _commit(),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                   f"with {threads} thread(s) in each of {workers} process(es)",
        "preset": f"{config['path']} (bundle preset `{config['bundle_preset']}`, seed {config['seed']}, "
                  f"max_test_slices {config['max_test_slices']})",
        "wall time of this run": f"{time.perf_counter() - started:.0f} s",
    }
    return write_report(out, cases, names, skipped, header, config["max_test_slices"])


def _check_workers(workers) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers must be a positive integer, got {workers!r}")


@contextlib.contextmanager
def _torch_threads(threads: int):
    """torch's intra-op thread count set for a block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_cases_in_workers(jobs: Sequence[tuple], workers: int, threads: int, report: Callable[[dict], None]) -> None:
    """Runs ``_run_case`` for each job in spawned processes; their events come back through a managed queue.

    A managed queue's ``put`` returns only once the event is stored, so every event of a case is here before its
    future completes. A case that fails stops the run: the cases not yet started are cancelled and the error is
    raised here once the running ones have finished (each leaves only finished, atomically written results, so a
    rerun resumes).
    """
    context = multiprocessing.get_context("spawn")
    costliest_first = sorted(jobs, key=lambda job: -sum(runs_on(job[2], name, job[0]) for name in job[1]))
    with context.Manager() as manager:
        events = manager.Queue()

        def drain() -> None:
            while True:
                try:
                    report(events.get_nowait())
                except queue.Empty:
                    return

        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                    initargs=(events, threads)) as pool:
            pending = {pool.submit(_run_case_in_worker, *job) for job in costliest_first}
            try:
                while pending:
                    done, pending = concurrent.futures.wait(pending, timeout=0.5)
                    drain()
                    for future in done:
                        future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            finally:
                drain()


_worker_events = None


def _start_worker(events, threads: int) -> None:
    """Worker-process set-up: the event queue back to the parent and the torch thread count."""
    global _worker_events
    _worker_events = events
    torch.set_num_threads(threads)


def _run_case_in_worker(*job) -> None:
    _run_case(*job, _worker_events.put)


def _run_case(case: Case, names: Sequence[str], config: Mapping[str, Any], data_root: Path, case_dir: Path,
              emit: Callable[[dict], None]) -> None:
    """Prepares one case if needed, then runs each method that has no stored result with the same fingerprint."""
    datalist = case_dir / "data" / "datalist.json"
    if not datalist.is_file():
        prepare_case(case, data_root, case_dir, config["seed"], progress=False)
        emit({"event": "prepare", "case": case.name})
    items = _test_items(datalist, config["max_test_slices"])
    train = None
    for name in [n for n in names if runs_on(config, n, case)]:
        options = config["pipeline_settings"] if name in PIPELINE_METHODS else config["method_settings"].get(name)
        settings = FitSettings(case, datalist.parent, config["bundle_preset"], config["seed"], options or {})
        path = case_dir / f"{name}.json"
        fingerprint = _fingerprint(settings, items)
        if path.is_file() and json.loads(path.read_text()).get("fingerprint") == fingerprint:
            emit({"event": "resume", "case": case.name, "method": name})
            continue
        emit({"event": "start", "case": case.name, "method": name})
        train = train or [np.load(item["image"]) for item in load_datalist(datalist, "training")]
        record = run_method(name, settings, train, items, case_dir / "work" / name, items[len(items) // 2]["id"])
        figure = record.pop("figure")
        _save_atomic(case_dir / f"{name}.npy", lambda f: np.save(f, figure))
        record["fingerprint"] = fingerprint
        _save_atomic(path, lambda f: f.write(json.dumps(record, indent=1).encode()))
        emit({"event": "fit", "case": case.name, "method": name, "seconds": record["fit_seconds"]})


def _commit() -> str:
    """``git rev-parse --short HEAD`` of the package's checkout, or 'unknown'."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def losses_line(scores: Mapping[str, Mapping[str, np.ndarray]], kinds: Mapping[str, str],
                labels: Mapping[str, str]) -> str | None:
    """Where a ``diffdenoise`` method has a lower mean PSNR or SSIM than another method, said in one line.

    Returns:
        None when no DiffDenoise method is in ``scores``; otherwise the losses (with the paired Wilcoxon p)
        or a line saying there are none.
    """
    ours = [name for name in scores if kinds[name] == "diffdenoise"]
    if not ours:
        return None
    losses = []
    for name in ours:
        for other in scores:
            if kinds[other] == "diffdenoise":
                continue
            for metric, digits in (("psnr", 2), ("ssim", 4)):
                mine, theirs = float(np.mean(scores[name][metric])), float(np.mean(scores[other][metric]))
                if theirs > mine:
                    p = paired_best({other: scores[other][metric], name: scores[name][metric]}).p_values[name]
                    losses.append(f"{labels[name]} < {labels[other]} in {metric.upper()} "
                                  f"({mine:.{digits}f} vs {theirs:.{digits}f}, p = {p:.3g})")
    if not losses:
        return f"DiffDenoise ({', '.join(labels[n] for n in ours)}) has the highest mean PSNR and SSIM here."
    return "**DiffDenoise loses here:** " + "; ".join(losses) + "."


def _best_note(scores: Mapping[str, Mapping[str, np.ndarray]], labels: Mapping[str, str]) -> str:
    """The paired-test verdict on each metric's best, in words."""
    notes = []
    for metric in ("psnr", "ssim"):
        test = paired_best({k: s[metric] for k, s in scores.items()})
        if test.significant:
            notes.append(f"best {metric.upper()}: {labels[test.best]}, above every other method (p < {test.alpha})")
        else:
            ties = ", ".join(f"{labels[k]} (p = {p:.3g})" for k, p in test.p_values.items() if p >= test.alpha)
            notes.append(f"best {metric.upper()}: {labels[test.best]}, not significant against {ties or 'nothing'}")
    return "Paired Wilcoxon signed-rank tests over test slices: " + "; ".join(notes) + "."


def _summary(records: Mapping[tuple[str, str], dict], cases: Sequence[Case], names: Sequence[str],
             labels: Mapping[str, str], metric: str, digits: int, rank: bool = True) -> str:
    """One row per case, one column per method: the mean score, best marked as in the case tables (``rank``)."""
    rows = ["| case | " + " | ".join(labels[n] for n in names) + " |", "|---|" + "---|" * len(names)]
    for case in cases:
        scores = {n: np.asarray(records[case.name, n][metric]) for n in names
                  if (case.name, n) in records and metric in records[case.name, n]}
        if not scores:
            continue
        test = paired_best(scores) if rank else None
        cells = []
        for name in names:
            if name not in scores:
                cells.append("")
                continue
            cell = f"{scores[name].mean():.{digits}f}"
            if test is not None and name == test.best:
                cell = f"**{cell}**" if test.significant else f"{cell} (n.s.)"
            cells.append(cell)
        rows.append(f"| {case.name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_report(out: Path, cases: Sequence[Case], names: Sequence[str], skipped: Mapping[str, str],
                 header: Mapping[str, str], max_test_slices: int | None = None) -> Path:
    """``results.csv``, ``results.md`` and ``figures/<case>.png`` from the stored per-(case, method) results.

    Only (case, method) pairs with a stored result appear; the tables depend on those files alone, so a
    resumed run writes the same tables (only the header's wall time differs).
    """
    records = {}
    for case in cases:
        for name in names:
            path = out / "cases" / case.name / f"{name}.json"
            if path.is_file():
                records[case.name, name] = json.loads(path.read_text())
    labels = {name: METHODS[name].label for name in names}
    kinds = {name: METHODS[name].kind for name in names}
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_CSV_COLUMNS)
        for (case_name, name), record in records.items():
            case = next(c for c in cases if c.name == case_name)
            leak = record.get("leak", [""] * len(record["slices"]))
            for row in zip(record["slices"], record["psnr"], record["ssim"], leak):
                writer.writerow([case.name, case.dataset, case.noise, "" if case.level is None else f"{case.level:.6g}",
                                 case.correlation, case.reference, name, kinds[name], *row])
    costs = {case.name: _case_cost(out / "cases" / case.name, [r for (c, _), r in records.items() if c == case.name])
             for case in cases}
    lines = ["# Benchmark results", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines.append(f"- method time recorded in these results (fit + denoise, earlier runs included; each pipeline step "
                 f"once): {sum(wall for wall, _ in costs.values()):.0f} s wall, "
                 f"{sum(cpu for _, cpu in costs.values()):.0f} s process CPU")
    lines += [f"- skipped {name}: {reason}" for name, reason in skipped.items()]
    lines += ["", "Scores on the test split against each case's reference (see docs/benchmark.md). Best mean in "
              "**bold** when a paired Wilcoxon signed-rank test puts it above every other method (p < 0.05), "
              "else marked (n.s.).", ""]
    for metric, digits, unit in (("psnr", 2, " (dB)"), ("ssim", 4, "")):
        summary = _summary(records, cases, names, labels, metric, digits)
        lines += [f"## Summary: mean {metric.upper()}{unit}", "", summary, ""]
    lines += ["## Summary: noise leak", "", "Correlation of (output - reference) with (noisy - reference), mean over "
              "slices (diffdenoise.metrics.noise_leak): 1 for the noisy input, near 0 for an output that keeps none of "
              "the input's noise; results stored before this column have none.", "",
              _summary(records, cases, names, labels, "leak", 3, rank=False), ""]
    lines += ["## Cost per case", "", "Fit and denoise time of every stored result of the case, each step of its "
              "DiffDenoise pipeline run counted once (the methods share it); process CPU includes all threads.", "",
              "| case | wall (s) | process CPU (s) |", "|---|---|---|"]
    lines += [f"| {name} | {wall:.0f} | {cpu:.0f} |" for name, (wall, cpu) in costs.items() if wall or cpu]
    lines.append("")
    for case in cases:
        done = [name for name in names if (case.name, name) in records]
        if not done:
            continue
        scores = {n: {m: np.asarray(records[case.name, n][m]) for m in ("psnr", "ssim")} for n in done}
        extra = {
            "fit (s)": {n: f"{records[case.name, n]['fit_seconds']:.1f}" for n in done},
            "denoise (s/slice)": {n: f"{records[case.name, n]['denoise_seconds_per_slice']:.2f}" for n in done},
        }
        split = len(load_datalist(out / "cases" / case.name / "data" / "datalist.json", "test"))
        figure = _case_figure(out, case, done, labels)
        lines += [f"## {case.name}", "", f"{case.describe()}. Test slices scored: {len(scores[done[0]]['psnr'])} "
                  f"of {split}" + (f" (max_test_slices {max_test_slices}, evenly spaced)" if max_test_slices else "")
                  + ".", "", significance_table(scores, labels, extra_columns=extra), "", _best_note(scores, labels)]
        loss = losses_line(scores, kinds, labels)
        lines += ["", loss] if loss else []
        absent = [labels[n] for n in names if n not in done]
        lines += ["", f"No result on this case (the preset's method_cases, or not run yet): {', '.join(absent)}."] \
            if absent else []
        lines += ["", f"![{case.name}]({figure.relative_to(out).as_posix()})", ""]
    report = out / "results.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _case_cost(case_dir: Path, records: Sequence[dict]) -> tuple[float, float]:
    """(wall, process-CPU) seconds spent on a case's stored results, each pipeline step once.

    A pipeline method's ``fit_seconds`` is the sum of the pipeline steps it needs, shared with the other pipeline
    methods, so those steps are counted from the run's ``state.json`` instead."""
    wall = cpu = 0.0
    for record in records:
        slices = len(record["slices"])
        wall += record["denoise_seconds_per_slice"] * slices
        cpu += record["denoise_cpu_seconds_per_slice"] * slices
        if record["method"] not in PIPELINE_METHODS:
            wall, cpu = wall + record["fit_seconds"], cpu + record["fit_cpu_seconds"]
    for state in sorted((case_dir / "work").glob("pipeline*/state.json")):
        if any(record["method"] in PIPELINE_METHODS for record in records):
            steps = json.loads(state.read_text())
            own = [name for name in steps["seconds"] if name not in steps.get("shared", [])]
            wall, cpu = wall + sum(steps["seconds"][n] for n in own), cpu + sum(steps["cpu_seconds"][n] for n in own)
    return wall, cpu


def _case_figure(out: Path, case: Case, names: Sequence[str], labels: Mapping[str, str]) -> Path:
    """The visual grid of one case: noisy input, each method's output, the reference (figure slice of the results)."""
    case_dir = out / "cases" / case.name
    record = json.loads((case_dir / f"{names[0]}.json").read_text())
    item = next(i for i in load_datalist(case_dir / "data" / "datalist.json", "test")
                if i["id"] == record["slices"][len(record["slices"]) // 2])
    reference = np.load(item["clean"])
    images = [np.load(item["image"])] + [np.load(case_dir / f"{n}.npy") for n in names if n != "noisy"] + [reference]
    titles = ["noisy input"] + [labels[n] for n in names if n != "noisy"] + ["reference"]
    return save_visual_grid(images, titles, reference, out / "figures" / f"{case.name}.png")


def main(preset: str = "smoke", data: str = "../shared/data", out: str = "runs/bench", noise=None, dataset=None,
         method=None, reference=None, progress: bool = True, workers: int = 1) -> str:
    """``diffdenoise benchmark``: run a preset's datasets x noises x methods; rerun the same OUT to resume.

    Example: ``diffdenoise benchmark --preset smoke --data ../shared/data --out runs/bench``;
    ``--noise gaussian,poisson_corr1.2 --dataset studyforrest --method noisy,bm3d,srds --reference full,down2``
    narrow the preset's lists; ``--workers 2`` runs two cases at a time (one per core at ``torch_threads: 1``).
    A bad preset, selection or worker count fails before anything runs, as one ``InputError`` naming the preset.
    Returns the path of ``OUT/results.md``.
    """
    try:
        load_preset(preset, datasets=dataset, noises=noise, methods=method, references=reference)
        _check_workers(workers)
    except InputError:
        raise
    except ValueError as err:
        raise InputError(preset, str(err)) from None
    return str(run_benchmark(preset, data, out, datasets=dataset, noises=noise, methods=method, references=reference,
                             progress=progress, workers=workers))
