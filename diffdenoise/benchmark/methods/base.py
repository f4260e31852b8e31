"""What a benchmark method is: ``Method`` (label, kind, ``fit``), what its ``fit`` is given (``FitSettings``) and
may return (a denoiser, or a ``Fitted`` one carrying its own cost). The method modules beside it build on these."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from diffdenoise.benchmark.cases import Case

Denoiser = Callable[[np.ndarray], np.ndarray]
KINDS = ("input", "classical", "self-supervised", "diffdenoise", "supervised")


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
        unavailable: for what a module check cannot see (another environment): returns why the method cannot
            run here, or None; a method with a reason is skipped as one with a missing module.
    """

    label: str
    kind: str
    fit: Callable[[list[np.ndarray], Path, FitSettings], Denoiser | Fitted]
    requires: tuple[str, ...] = ()
    unavailable: Callable[[], str | None] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"method kind {self.kind!r} is not one of {', '.join(KINDS)}")

    def missing(self) -> str | None:
        """Why this method cannot run here, or None."""
        absent = [name for name in self.requires if importlib.util.find_spec(name) is None]
        if absent:
            return f"optional package(s) {', '.join(absent)} not installed (pip install {' '.join(absent)})"
        return self.unavailable() if self.unavailable is not None else None


@dataclass(frozen=True)
class Fitted:
    """A denoiser with the cost of what it needed, for methods whose ``fit`` call is not that cost: methods
    that share one pipeline run report the stages each needs (cumulative), whichever of them ran it."""

    denoise: Denoiser
    seconds: float
    cpu_seconds: float
