"""Training budgets by convergence: one plateau rule on a validation-loss history, for every learned method.

A comparison of denoisers ranks training signals only if each network trained until its own validation loss
stopped falling; a fixed step count ranks budgets instead. The rule (``PlateauRule``): training has converged when
the best loss of the last ``window`` fraction of the steps run is less than ``min_improvement`` (relative) below the
best loss before them. A window that is a fraction of the steps run (not a fixed patience) makes the rule
independent of how often validation runs and lets a slow, steady fall carry on: a curve still falling 1% per 20% of
its length is still learning. The step cap stays, and a run that reaches it unconverged says so (``cap_hit``).

The history and its verdict (``TrainingCurve``) are shared by the in-house U-Net loop
(``diffdenoise.baselines._unet.fit``) and, through ``PlateauStopping``, by the bundle's ignite trainers, whose
validation already computes a key metric that is the stage's own loss on held-out slices (lower is better).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ignite.distributed import get_rank
from ignite.engine import Engine, Events

# a training run's curve is stored as <name><CURVE_SUFFIX> (the benchmark collects them from a method's workdir)
CURVE_SUFFIX = "_curve.json"


@dataclass(frozen=True)
class PlateauRule:
    """Converged when ``min(last window) > (1 - min_improvement) * min(before it)`` (losses, lower is better).

    Args:
        window: the fraction of the steps run that forms the recent window; 0.2 (the last fifth) spans several
            validations at any useful interval yet reacts within a fifth of the run.
        min_improvement: relative gain the window's best must make on the earlier best to count as progress;
            0.01 (1%) is about the noise of a validation loss on a few held-out slices, so a smaller gain is noise.
        min_evaluations: no verdict before this many validations, so the window holds more than one noisy point.
    """

    window: float = 0.2
    min_improvement: float = 0.01
    min_evaluations: int = 10

    def __post_init__(self):
        if not 0 < self.window < 1:
            raise ValueError(f"window must be a fraction in (0, 1), got {self.window!r}; e.g. 0.2 (the last fifth)")
        if not 0 <= self.min_improvement < 1:
            raise ValueError(f"min_improvement must be in [0, 1), got {self.min_improvement!r}; e.g. 0.01 (1%)")
        if isinstance(self.min_evaluations, bool) or not isinstance(self.min_evaluations, int) \
                or self.min_evaluations < 2:
            raise ValueError(f"min_evaluations must be an integer >= 2, got {self.min_evaluations!r}; e.g. 10")

    def converged(self, steps: list[int], losses: list[float]) -> bool:
        """Whether the history ``(steps[i], losses[i])``, steps increasing, has plateaued."""
        if len(losses) < self.min_evaluations:
            return False
        start = steps[-1] - self.window * steps[-1]
        before = [loss for step, loss in zip(steps, losses) if step <= start]
        recent = [loss for step, loss in zip(steps, losses) if step > start]
        if not before or not recent:
            return False
        best = min(before)
        return min(recent) > best - self.min_improvement * abs(best)


@dataclass
class TrainingCurve:
    """A run's (step, validation loss) history, its cap and steps run, and whether the rule stopped it.

    The trainer sets ``cap`` (its step limit) and ``steps_run`` (at the end) and calls ``add`` after each
    validation; ``rule`` None records the curve without ever stopping.
    """

    rule: PlateauRule | None = None
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    converged: bool = False
    steps_run: int = 0
    cap: int = 0

    @classmethod
    def from_settings(cls, rule: Mapping[str, Any] | None) -> TrainingCurve:
        """A curve for a config's ``convergence_rule``: a mapping of ``PlateauRule`` arguments, or None (record only)."""
        return cls(None if rule is None else PlateauRule(**rule))

    def add(self, step: int, loss: float) -> bool:
        """Record a validation; True when the rule says training should stop here."""
        if not math.isfinite(loss):
            raise ValueError(f"validation loss at step {step} is {loss}: training diverged; lower the learning rate")
        self.steps.append(int(step))
        self.losses.append(float(loss))
        self.steps_run = int(step)
        self.converged = self.rule is not None and self.rule.converged(self.steps, self.losses)
        return self.converged

    def record(self) -> dict:
        """The stored form: the history, steps run, the cap, and whether it was hit before the rule said converged."""
        return {"steps": self.steps, "losses": self.losses, "steps_run": self.steps_run, "cap": self.cap,
                "converged": self.converged, "cap_hit": not self.converged and self.steps_run >= self.cap,
                "rule": None if self.rule is None else asdict(self.rule)}

    def save(self, path: Path) -> None:
        """``record`` as JSON, written beside ``path`` and renamed, so a reader never sees half a curve."""
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(self.record()))
        os.replace(tmp, path)

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "losses": list(self.losses), "converged": self.converged}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps, self.losses, self.converged = list(state["steps"]), list(state["losses"]), bool(state["converged"])
        self.steps_run = self.steps[-1] if self.steps else 0


class PlateauStopping:
    """Ignite handler for a bundle trainer: after each validation, record the validator's key metric at the trainer's
    iteration in ``path``, and terminate the trainer when ``rule`` says converged (its ``max_epochs`` is the cap).

    Not ignite's ``EarlyStopping``: its fixed ``patience`` and absolute ``min_delta`` cannot express a window that is a
    fraction of the steps run nor a relative gain, and it keeps no history; this handler applies the same
    ``PlateauRule`` as the U-Net baselines and writes the curve the benchmark reports. Attach it to the trainer
    (a ``train#handlers`` entry); it takes the validator like MONAI's ``ValidationHandler``, so the configs have no
    reference cycle. Its ``state_dict`` goes into the resume checkpoint, so a resumed run keeps its history.

    Args:
        validator: the evaluator run by the trainer's ``ValidationHandler``; its key metric is the loss.
        path: the curve's JSON file (``TrainingCurve.record``), rewritten after each validation.
        rule: ``PlateauRule`` arguments, or None to record the curve without stopping.
    """

    def __init__(self, validator: Engine, path: str, rule: Mapping[str, Any] | None = None):
        self.validator, self.path, self.curve = validator, Path(path), TrainingCurve.from_settings(rule)
        self.trainer: Engine | None = None

    def attach(self, trainer: Engine) -> None:
        self.trainer = trainer
        self.validator.add_event_handler(Events.COMPLETED, self._validated)
        trainer.add_event_handler(Events.COMPLETED, self._save)

    def _validated(self, validator: Engine) -> None:
        stop = self.curve.add(self.trainer.state.iteration, validator.state.metrics[validator.state.key_metric_name])
        self._save(self.trainer)
        if stop:
            self.trainer.terminate()

    def _save(self, trainer: Engine) -> None:
        self.curve.steps_run = trainer.state.iteration
        self.curve.cap = trainer.state.max_epochs * trainer.state.epoch_length
        if get_rank() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.curve.save(self.path)

    def state_dict(self) -> dict:
        return self.curve.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.curve.load_state_dict(state)
