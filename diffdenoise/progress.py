"""Progress of long loops: a bar on a terminal, plain periodic lines in a log, and the times a plan is scaled from.

A fit runs for minutes to hours, often with its output redirected to a file. A tqdm bar redraws one line with
carriage returns, which a file keeps as one unreadable run of text; so the bar is drawn only when stderr is a
terminal, and otherwise a plain line is logged every ``interval`` seconds and at the end, through the
``diffdenoise`` logger (so ``--quiet`` silences both). ``TrainingProgress`` keeps one over a trainer's whole run,
where ignite's ``ProgressBar`` starts again each epoch and so cannot say when the stage ends. Inside ``record()``
every closed progress also leaves a ``Timing``, which ``diffdenoise.plan`` scales to estimate a run.

Example::

    from diffdenoise.progress import Progress

    with Progress(total=24, desc="bsn", unit="slice") as progress:
        for _ in range(24):
            ...  # one slice
            progress.update()
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from statistics import median

from ignite.engine import Engine, Events
from tqdm import tqdm

logger = logging.getLogger(__name__)
_recordings: list[tuple[list["Timing"], bool]] = []  # (timings, show) of each active record()


@dataclass(frozen=True)
class Timing:
    """What one closed progress took: ``count`` units, the seconds each update's units took per unit (``steps``,
    in order), and ``tail`` seconds from the last unit to the close (for a trainer: the last validation and
    checkpoint)."""

    desc: str
    unit: str
    count: int
    steps: tuple[float, ...]
    tail: float

    @property
    def seconds(self) -> float:
        """From the start to the last unit."""
        return sum(self.steps)

    @property
    def per_unit(self) -> float:
        """The median after the first step, which also pays for warm-up; the first when there is no other."""
        return float(median(self.steps[1:] or self.steps))


@contextmanager
def record(show: bool = True):
    """Collects the ``Timing`` of every progress closed inside the block, in order, into the yielded list; with
    ``show`` False no progress inside the block shows anything."""
    recording = ([], show)
    _recordings.append(recording)
    try:
        yield recording[0]
    finally:
        _recordings.pop()  # blocks nest, so this one is the last


def duration(seconds: float) -> str:
    """Seconds as a person reads them: '45 s', '3 min 20 s', '1 h 05 min'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}{'s' * (n != 1)}"


class Progress:
    """``total`` units of a loop, shown as a bar on a terminal or as a log line every ``interval`` seconds.

    Args:
        total: units the loop will do.
        desc: what the loop does, first on every line.
        unit: what one unit is, e.g. "slice" (lines add an "s").
        initial: units done before (a resumed run).
        interval: seconds between log lines when stderr is not a terminal.
        shown: False shows nothing (the timing is still recorded).
    """

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, interval: float = 60.0,
                 shown: bool = True):
        self.total, self.desc, self.unit, self.interval = int(total), desc, unit, interval
        self.initial = self.n = int(initial)
        self.started = self.last_unit = self.last_line = time.perf_counter()
        self.steps: list[float] = []
        shown = shown and logger.isEnabledFor(logging.INFO) and all(show for _, show in _recordings)
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, initial=self.initial, dynamic_ncols=True,
                        disable=not (shown and sys.stderr.isatty()))
        self.lines = shown and self.bar.disable

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more units are done."""
        now = time.perf_counter()
        self.steps.append((now - self.last_unit) / n)
        self.n += n
        self.last_unit = now
        self.bar.update(n)
        if self.lines and now - self.last_line >= self.interval and self.n < self.total:
            self.last_line = now
            logger.info("%s: %s", self.desc, self._status(now))

    def _status(self, now: float) -> str:
        elapsed = now - self.started
        done = f"{self.n}/{self.total} {self.unit}s ({100 * self.n / max(self.total, 1):.0f}%), {duration(elapsed)}"
        if self.n == self.initial:
            return done + " elapsed"
        left = elapsed / (self.n - self.initial) * (self.total - self.n)
        return f"{done} elapsed, about {duration(left)} left"

    def close(self) -> None:
        """Ends the bar (or logs the last line) and leaves the timing with every active ``record()``."""
        now = time.perf_counter()
        self.bar.close()
        if self.lines:
            done = _count(self.n - self.initial, self.unit)
            logger.info("%s: %s in %s", self.desc, done, duration(now - self.started))
        if self.steps:
            timing = Timing(self.desc, self.unit, self.n - self.initial, tuple(self.steps), now - self.last_unit)
            for timings, _ in _recordings:
                timings.append(timing)


class TrainingProgress:
    """An ignite handler: one ``Progress`` over every iteration of a trainer's run (all epochs, validation
    included in the time), e.g. ``{_target_: diffdenoise.progress.TrainingProgress, desc: BSN training}``.

    Args:
        desc: what is trained, first on every line.
        interval: seconds between log lines when stderr is not a terminal.
    """

    def __init__(self, desc: str = "training", interval: float = 60.0):
        self.desc, self.interval = desc, interval
        self.progress: Progress | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self._completed)

    def _iteration_started(self, engine: Engine) -> None:
        if self.progress is None:  # here, not at STARTED: a resumed state is loaded by then
            total = engine.state.max_epochs * engine.state.epoch_length
            self.progress = Progress(total, self.desc, "iteration", engine.state.iteration - 1, self.interval)

    def _iteration_completed(self, engine: Engine) -> None:
        self.progress.update(engine.state.iteration - self.progress.n)

    def _completed(self, engine: Engine) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
