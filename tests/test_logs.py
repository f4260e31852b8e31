"""What a command prints at each verbosity, and that MONAI's known notices never reach the user."""

import logging

import monai.bundle  # noqa: F401 - creates MONAI's loggers with their own stdout handlers, as a command run does
import pytest
from monai.handlers import StatsHandler

from diffdenoise.logs import KNOWN_NOTICES, NORMAL, QUIET, VERBOSE, configure


@pytest.fixture
def restore_logging():
    """configure() changes the process's loggers; every logger's handlers, level and propagation are put back."""
    StatsHandler()  # its logger, as a stage makes it: after the imports
    loggers = [logging.root, *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    saved = [(logger, list(logger.handlers), logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


def _emit():
    logging.getLogger("diffdenoise.fit").info("ours")
    logging.getLogger("diffdenoise.data").warning("our warning")
    logging.getLogger("ignite.engine.engine.SupervisedTrainer").info("Engine run starting with max_epochs=3.")
    StatsHandler().logger.info("Epoch[1] Metrics -- val_loss: 0.1")  # made after configure(), as in a stage
    logging.getLogger("monai.bundle.scripts").info("--- input summary of monai.bundle.scripts.run ---")
    for name, text in KNOWN_NOTICES:
        logging.getLogger(name).warning(text + " ... (the rest of MONAI's message)")


@pytest.mark.parametrize("verbosity, shown, hidden", [
    (QUIET, ["our warning"], ["ours", "Engine run", "Epoch[1]", "input summary"]),
    (NORMAL, ["ours", "our warning"], ["Engine run", "Epoch[1]", "input summary"]),
    (VERBOSE, ["ours", "our warning", "Engine run", "Epoch[1]", "input summary"], []),
])
def test_verbosity_sets_what_is_printed(restore_logging, capsys, verbosity, shown, hidden):
    configure(verbosity)
    _emit()
    out, err = capsys.readouterr()
    assert out == "" and all(text in err for text in shown) and not any(text in err for text in hidden), err
    assert not any(text in err for _, text in KNOWN_NOTICES)
    assert all(line[:2].isdigit() and line[2] == ":" for line in err.splitlines())  # every line starts with the time


def test_configuring_twice_prints_each_line_once(restore_logging, capsys):
    configure(NORMAL)
    configure(NORMAL)
    logging.getLogger("diffdenoise.fit").info("once")
    assert capsys.readouterr().err.count("once") == 1
