"""Estimating a fit before it runs: every stage timed briefly on two slices, then scaled to the planned work.

A user should know from the first minute what ``fit`` will do and roughly when it ends. What a stage costs differs
by orders of magnitude between presets, machines and slice sizes, so it is measured rather than assumed:
``calibrate`` runs the real pipeline (the same configs and code) in a scratch folder on one training and one
validation slice, each training config cut to two epochs of ``TIMED_ITERATIONS`` full batches in all, and keeps
the ``Timing`` of every progress (``diffdenoise.progress``). ``plan`` scales them to the real run:

- a training config: its start-up, iterations x seconds per iteration (the median after the first, which pays
  for warm-up, scaled to the mean batch of a pass over the training slices, whose last batch is smaller), and
  per epoch the validation and checkpoint after an epoch's last iteration (the first epoch's end also opens logs
  and writers once), times the validation slices;
- a config that writes slice outputs: its start-up and, per output, seconds per pixel x the pixels of all slices;
- the assessment (``diffdenoise.assessment``): each denoiser twice per assessed slice (``diffdenoise.quality``).

Start-up is what a short run took beyond its timed units (parsing, caching, loading networks, choosing the
Tweedie rho). For a training config it is taken as fixed. For a config that writes slice outputs it is scaled by
the validation slices (up to ``RHO_SLICES``): in stage 3 it is mostly the rho choice, which reads each of them
(on 24 chest X-rays, 4 of them, it took longer than a third of the stage); elsewhere it is a few seconds, so the
overcount is small.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffdenoise.assessment import assessed_items
from diffdenoise.data import load_datalist
from diffdenoise.pipeline import DENOISER_OUTPUTS, TITLES, pipeline_steps, run_pipeline
from diffdenoise.progress import Progress, Timing, record
from diffdenoise.stages import SPLITS, stage_parser

TIMED_ITERATIONS = 6
# the validation slices stage 3 chooses the Tweedie rho on, at most (configs/method/leak_free.yaml)
RHO_SLICES = 8


@dataclass(frozen=True)
class StepCost:
    """A config's short run: ``seconds`` in all and each progress's ``Timing``; for a training config also the
    work it plans in the real run (``iterations``, ``epochs``, ``batch_size``, from its config and overrides)."""

    seconds: float
    timings: tuple[Timing, ...]
    iterations: int | None = None
    epochs: int | None = None
    batch_size: int | None = None


@dataclass(frozen=True)
class PlannedStep:
    """One line of the plan: a config run (``Step.name``) or the assessment, its work and estimated seconds."""

    name: str
    title: str
    work: str
    seconds: float


def calibrate(dataset_dir, scratch, overlays, **overrides) -> dict[str, StepCost]:
    """Runs iteration 1 of the pipeline on the first training and validation slice of ``dataset_dir``, in
    ``scratch`` (removed after), showing only its own progress over the configs; returns each config's
    ``StepCost`` by config name.

    Args:
        dataset_dir: a prepared folder with a validation split.
        scratch: a new folder for the short run.
        overlays, overrides: as for ``run_pipeline``.
    """
    scratch = Path(scratch)
    data = scratch / "data"
    data.mkdir(parents=True)
    datalist = Path(dataset_dir).absolute() / "datalist.json"  # the scratch datalist names its slices by this
    firsts = {split: load_datalist(datalist, split)[:1] for split in ("training", "validation")}
    (data / "datalist.json").write_text(json.dumps({**firsts, "test": [],
                                                    "meta": json.loads(datalist.read_text())["meta"]}))
    costs = {}

    @contextmanager
    def timed(step, step_overlays, keys):
        parser = stage_parser(step.config, step_overlays, **keys)
        planned, short = {}, None
        if "train#trainer" in parser:
            planned = {"epochs": parser.get_parsed_content("train#trainer#max_epochs"),
                       "iterations": parser.get_parsed_content("train#trainer#max_epochs")
                       * parser.get_parsed_content("train#trainer#epoch_length"),
                       "batch_size": parser.get_parsed_content("train#dataloader#batch_size")}
            # full batches (the one training slice, repeated to a batch) in two epochs, so that the time after
            # the last iteration is a validation without what the first epoch's end does once
            short = {"train#trainer#max_epochs": 2, "train#trainer#epoch_length": TIMED_ITERATIONS // 2,
                     "train#dataset#data": "$@train#datalist * @train#dataloader#batch_size"}
        started = time.perf_counter()
        with record(show=False) as timings:
            yield short
        costs[step.config] = StepCost(time.perf_counter() - started, tuple(timings), **planned)
        progress.update()

    try:
        with Progress(len(pipeline_steps(data)), "timing", "stage") as progress:
            run_pipeline(data, scratch, overlays, watch=timed, **overrides)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return costs


def plan(costs: dict[str, StepCost], dataset_dir, iterations: int = 1) -> list[PlannedStep]:
    """Every config run of the real pipeline, then the assessment, with its work and estimated seconds."""
    datalist = Path(dataset_dir) / "datalist.json"
    items = {split: load_datalist(datalist, split) for split in SPLITS}
    slices = [item for split in SPLITS for item in items[split]]
    timed = items["training"][:1] + items["validation"][:1]  # what calibrate ran on
    scale = _pixels(slices) / _pixels(timed)
    per_pixel = {}
    planned = []
    for step in pipeline_steps(Path(dataset_dir), iterations):
        cost = costs[step.config]
        if cost.iterations is not None:
            timing = next(t for t in cost.timings if t.unit == "iteration")
            startup = cost.seconds - timing.count * timing.per_unit - timing.tail
            # the end of an epoch: the later of the two, or the first's excess over an iteration if that is less
            # (either may have been slowed by other work on the machine); the short run validated on one slice
            epoch_end = min(timing.tail, timing.steps[TIMED_ITERATIONS // 2] - timing.per_unit)
            # the short run had only full batches; a pass over the training slices ends with a smaller one
            passes = math.ceil(len(items["training"]) / cost.batch_size)
            iteration = timing.per_unit * len(items["training"]) / (passes * cost.batch_size)
            seconds = startup + cost.iterations * iteration + cost.epochs * epoch_end * len(items["validation"])
            times = "once" if cost.epochs == 1 else f"{cost.epochs} times"
            work = (f"{cost.iterations} iterations of {cost.batch_size} crops, validated {times} on "
                    f"{len(items['validation'])} slices")
        else:
            startup = cost.seconds - sum(t.seconds + t.tail for t in cost.timings)
            startup *= min(len(items["validation"]), RHO_SLICES)
            seconds = startup + scale * sum(t.seconds for t in cost.timings)
            per_pixel.update({t.desc: t.seconds / _pixels(timed) for t in cost.timings})
            outputs = [t.desc for t in cost.timings]
            work = f"{len(slices)} slices, {len(outputs)} output{'s' * (len(outputs) > 1)} ({', '.join(outputs)})"
        planned.append(PlannedStep(step.name, TITLES[step.stage], work, max(seconds, 0.0)))
    split, assessed = assessed_items(datalist)
    seconds = 2 * _pixels(assessed) * sum(per_pixel[key] for key in DENOISER_OUTPUTS)
    planned.append(PlannedStep("assessment", "each stage's gain without a reference",
                               f"{len(DENOISER_OUTPUTS)} denoisers, each twice on {len(assessed)} {split} slices",
                               seconds))
    return planned


def _pixels(items) -> int:
    """Pixels of the slices of datalist items, from the ``.npy`` headers."""
    return sum(int(np.prod(np.load(item["image"], mmap_mode="r").shape)) for item in items)
