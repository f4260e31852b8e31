"""The method's stages in order, run as bundle configs on one prepared dataset: the one place that knows it.

Each stage reads the datalist its predecessor wrote and adds its output key to every slice
(``stages.write_stage_outputs``), so the last datalist holds the noisy input, the clean reference where one
exists, and every stage's output side by side:

    datalist.json -> infer_bsn -> datalist_bsn.json (x_c, blind: the condition)
                                -> datalist_bsn_posterior.json (+ stage 1 as a denoiser)
                  -> train_diffusion, sample_srds -> datalist_srds.json (+ SRDS: the pseudo-targets)
                  -> train_student, inference -> datalist_student.json (+ the distilled student)

Iterations 2, 3, ... (paper Table 4) repeat stages 2-4 with ``configs/iteration.yaml``: the previous student's
output is the new condition, and each iteration's keys and checkpoints carry the suffix ``_iter<k>``:

                  -> train_diffusion, sample_srds (condition: student) -> datalist_srds_iter2.json
                  -> train_student, inference -> datalist_student_iter2.json -> ... iteration 3

The demo, ``diffdenoise fit`` and the benchmark run it (``pipeline_steps``); ``STAGES`` names what each stage adds.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from diffdenoise.stages import run_stage

logger = logging.getLogger(__name__)


class Stage(NamedTuple):
    """One step of the pipeline: the bundle configs it runs and the slice keys it adds."""

    name: str  # also the `diffdenoise denoise --mode` that runs it
    title: str  # what a user is told it is
    configs: tuple[str, ...]  # bundle configs run in order, each merged over common.yaml
    outputs: tuple[str, ...]  # slice keys added, in the order their datalists are written
    labels: tuple[str, ...]  # report labels of those keys


STAGES = (
    Stage("bsn", "stage 1: blind-spot network", ("train_bsn", "infer_bsn"), ("bsn", "bsn_posterior"),
          ("BSN x_c (stage 1, blind)", "BSN + re-injection (stage 1 denoiser)")),
    Stage("srds", "stages 2-3: diffusion", ("train_diffusion", "sample_srds"), ("srds",), ("SRDS (stages 2-3)",)),
    Stage("student", "stage 4: distilled student", ("train_student", "inference"), ("student",),
          ("student (stage 4)",)),
)
TITLES = {stage.name: stage.title for stage in STAGES}
LABELS = {"image": "noisy input", **{k: label for s in STAGES for k, label in zip(s.outputs, s.labels)}}
# the denoising outputs, each with the config whose network makes it and that config's inferer key
# (``diffdenoise.stages.stage_denoiser``); x_c (``bsn``) is the blind condition, not a denoiser's output
DENOISER_OUTPUTS = {"bsn_posterior": ("infer_bsn", "bsn_denoiser"), "srds": ("sample_srds", "srds_inferer"),
                    "student": ("inference", "inferer")}
# the stages an iteration > 1 repeats, and the overlay that chains them to the previous iteration
ITERATED = ("srds", "student")
ITERATION_OVERLAY = "iteration"
# stages 2-3 come in two forms, each an overlay ``configs/method/<name>.yaml``: the paper's (BSN(y) condition, L1
# eps loss, DDIM pairs) and the leak-free one (recorrupted target, antithetic Tweedie; issue 16, docs/results.md)
DIFFUSION_METHODS = ("leak_free", "paper")
# the one fit and the demo use unless told otherwise
DEFAULT_METHOD = "leak_free"


class Step(NamedTuple):
    """One bundle config run: ``name`` is the config, with ``@<k>`` in iterations k > 1 (``train_student@3``)."""

    name: str
    stage: str
    config: str
    overlays: tuple[str, ...]  # added after the caller's overlays
    keys: dict  # added after the caller's keys


# a context manager around each config run; ``run_pipeline`` says what it is given and what it yields
Watch = Callable[[Step, list, dict], AbstractContextManager[dict | None]]


def iteration_suffix(iteration: int) -> str:
    """What iteration ``k`` appends to its output keys and checkpoints: '' for 1, '_iter<k>' after."""
    return "" if iteration == 1 else f"_iter{iteration}"


def output_label(key: str) -> str | None:
    """The report label of a slice key (``student_iter3`` -> 'student (stage 4), iteration 3'); None for others."""
    base, _, iteration = key.partition("_iter")
    if base not in LABELS or (iteration and not iteration.isdigit()):
        return None
    return LABELS[base] + (f", iteration {iteration}" if iteration else "")


def method_overlay(method: str) -> str:
    """The overlay of a diffusion method (``DIFFUSION_METHODS``), e.g. ``method/leak_free``.

    Raises:
        ValueError: an unknown method, naming the valid ones.
    """
    if method not in DIFFUSION_METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(DIFFUSION_METHODS)}")
    return f"method/{method}"


def bundle_overlays(preset: str, method: str) -> list[str]:
    """The overlays every stage of a run starts with: the method's, then the preset's. The method brings its
    mechanism and its options' defaults; a preset, merged after it, may set those options (e.g. the demo's
    fixed Tweedie rho)."""
    return [method_overlay(method), f"presets/{preset}"]


def stage_keys(dataset_dir: Path, iteration: int = 1) -> dict:
    """Config keys that chain the datalists: each stage reads the one its predecessor wrote.

    Iteration 1 needs only the student's datalists; a later one adds ``iteration`` for its overlay, and
    restates the student's datalists as the overlay names them, since these keys override the overlay."""
    targets = str(Path(dataset_dir) / f"datalist_srds{iteration_suffix(iteration)}.json")
    keys = {"student_datalist_path": targets, "inference_datalist_path": targets}
    return keys if iteration == 1 else {"iteration": iteration, **keys}


def pipeline_steps(dataset_dir: Path, iterations: int = 1) -> list[Step]:
    """Every config run of a pipeline with ``iterations`` rounds of stages 2-4, in order."""
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be a whole number >= 1, got {iterations!r}")
    steps = [Step(config, stage.name, config, (), {}) for stage in STAGES for config in stage.configs]
    for k in range(2, int(iterations) + 1):
        keys = stage_keys(dataset_dir, k)
        steps += [Step(f"{config}@{k}", stage.name, config, (ITERATION_OVERLAY,), keys)
                  for stage in STAGES if stage.name in ITERATED for config in stage.configs]
    return steps


def run_pipeline(dataset_dir, bundle_root, overlays: Sequence[str], stop_after: str | None = None,
                 iterations: int = 1, watch: Watch | None = None, **overrides) -> tuple[Path, dict[str, float]]:
    """Runs the stages in order (up to ``stop_after``, a ``Stage.name``) on a prepared dataset.

    Args:
        dataset_dir: a folder written by ``diffdenoise prepare``.
        bundle_root: where checkpoints (``models/``) and logs go.
        overlays: preset/noise overlays merged after each stage's configs, e.g. ``["presets/cpu"]``.
        stop_after: the last stage to run (of iteration 1); None runs all.
        iterations: rounds of stages 2-4; each after the first is conditioned on the previous student.
        watch: ``watch(step, overlays, keys)`` is entered around each config run, with that run's overlays and
            keys; the dict it yields (or None) adds keys to that run alone. ``diffdenoise.plan`` cuts training
            short with it, ``diffdenoise fit`` says which stage starts.
        overrides: config keys for every stage, e.g. ``seed=0``.

    Returns:
        The last datalist written and the seconds each stage took (``srds``, ..., ``srds@2``, ...).
    """
    dataset_dir = Path(dataset_dir)
    keys = {"dataset_dir": str(dataset_dir), "bundle_root": str(bundle_root), **stage_keys(dataset_dir), **overrides}
    steps = pipeline_steps(dataset_dir, iterations)
    if stop_after is not None:
        last = max(i for i, step in enumerate(steps) if step.stage == stop_after and "@" not in step.name)
        steps = steps[:last + 1]
    seconds: dict[str, float] = {}
    for step in steps:
        logger.debug("stage %s: %s", step.stage, step.name)
        step_overlays, step_keys = [*overlays, *step.overlays], {**keys, **step.keys}
        started = time.perf_counter()
        with watch(step, step_overlays, step_keys) if watch else nullcontext() as extra:
            run_stage(step.config, step_overlays, **{**step_keys, **(extra or {})})
        iteration = step.keys.get("iteration", 1)
        timed = step.stage if iteration == 1 else f"{step.stage}@{iteration}"
        seconds[timed] = seconds.get(timed, 0.0) + time.perf_counter() - started
    last = steps[-1]
    output = next(stage for stage in STAGES if stage.name == last.stage).outputs[-1]
    return dataset_dir / f"datalist_{output}{iteration_suffix(last.keys.get('iteration', 1))}.json", seconds
