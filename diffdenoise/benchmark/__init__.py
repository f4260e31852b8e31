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

Modules, by concern: ``cases`` (datasets, cases, their prepared slices), ``methods`` (the registry ``METHODS`` and
one module per family of methods), ``preset`` (reading and checking a preset), ``store`` (atomic files and the
fingerprint that decides reuse), ``runner`` (fitting, scoring, workers, resume; ``main``), ``report`` (tables,
tests and figures from the stored results). Everything other code imports is re-exported here (``_test_items`` and ``_CSV_COLUMNS`` too, which scripts/
and tests/ import by those names).
"""

from diffdenoise.benchmark.cases import (
    DATASETS,
    REFERENCES,
    STRONG_LEVELS,
    Case,
    Dataset,
    _test_items,
    build_cases,
    parse_noise,
    prepare_case,
)
from diffdenoise.benchmark.methods import (
    ITERATIONS,
    KINDS,
    METHODS,
    PIPELINE_METHODS,
    Denoiser,
    Fitted,
    FitSettings,
    Method,
    StageFit,
    bsn_overlay,
)
from diffdenoise.benchmark.preset import load_preset, runs_on
from diffdenoise.benchmark.report import _CSV_COLUMNS, losses_line, write_report
from diffdenoise.benchmark.runner import main, run_benchmark, run_method

__all__ = [
    "DATASETS",
    "ITERATIONS",
    "KINDS",
    "METHODS",
    "PIPELINE_METHODS",
    "REFERENCES",
    "STRONG_LEVELS",
    "Case",
    "Dataset",
    "Denoiser",
    "FitSettings",
    "Fitted",
    "Method",
    "StageFit",
    "bsn_overlay",
    "build_cases",
    "load_preset",
    "losses_line",
    "main",
    "parse_noise",
    "prepare_case",
    "run_benchmark",
    "run_method",
    "runs_on",
    "write_report",
]
