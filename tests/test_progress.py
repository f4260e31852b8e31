"""Progress as a user sees it in a log: a plain line now and then with the time left, never a carriage return;
and the timings a plan is scaled from."""

import logging

import pytest
from ignite.engine import Engine

from diffdenoise.progress import Progress, Timing, TrainingProgress, duration, record


@pytest.fixture
def progress_lines(caplog):
    caplog.set_level(logging.INFO, logger="diffdenoise")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "diffdenoise.progress"]


def test_in_a_log_progress_is_plain_lines_with_the_time_left(progress_lines, capsys):
    with Progress(4, "bsn", "slice", interval=0) as progress:
        for _ in range(4):
            progress.update()
    lines = progress_lines()
    assert lines[0].startswith("bsn: 1/4 slices (25%), ") and lines[0].endswith(" left")
    assert len(lines) == 4 and lines[-1].startswith("bsn: 4 slices in ")
    assert "\r" not in capsys.readouterr().err  # stderr is no terminal here: no bar


def test_training_progress_spans_every_epoch_and_leaves_its_timing(progress_lines):
    engine = Engine(lambda engine, batch: None)
    TrainingProgress("toy training", interval=0).attach(engine)
    with record() as timings:
        engine.run(range(5), max_epochs=2)
    lines = progress_lines()
    assert lines[5].startswith("toy training: 6/10 iterations (60%)") and lines[-1].startswith("toy training: 10 ")
    (timing,) = timings
    assert (timing.desc, timing.unit, timing.count) == ("toy training", "iteration", 10)


def test_a_silent_record_shows_nothing_but_times_everything(progress_lines):
    with record(show=False) as timings:
        with Progress(3, "srds", "slice", interval=0) as progress:
            for _ in range(3):
                progress.update()
    assert progress_lines() == [] and timings[0].count == 3


def test_per_unit_is_the_median_after_the_first_unit_which_pays_for_warm_up():
    timing = Timing("t", "iteration", count=5, steps=(3.0, 1.0, 1.2, 0.9, 5.0), tail=2.0)
    assert timing.per_unit == 1.1 and timing.seconds == pytest.approx(11.1)
    assert Timing("t", "slice", count=1, steps=(2.0,), tail=0.0).per_unit == 2.0


@pytest.mark.parametrize("seconds, text", [(44.6, "45 s"), (200, "3 min 20 s"), (3900, "1 h 05 min")])
def test_duration_reads_as_a_person_says_it(seconds, text):
    assert duration(seconds) == text
