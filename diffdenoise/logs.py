"""What a long command prints: its own lines with the time, and of the libraries only what the verbosity asks for.

A user of ``diffdenoise fit`` reads its output to learn what is happening and when it ends, on a terminal or in a
redirected file. The libraries it runs (MONAI's bundle runner and handlers, ignite's engines) print through one
handler whose level the verbosity sets: on the root logger, and in place of the stdout handler MONAI's
``monai.apps.utils.get_logger`` gives its own loggers. Verbosity 0 (``--quiet``): warnings and errors only; 1 (the
default): also diffdenoise's own lines (the plan, progress, summary); 2 (``--verbose``): also the libraries' (MONAI's
per-epoch metrics and run summaries).

Known harmless notices are dropped here, once, instead of once per stage:

- MONAI's ConfigWorkflow warns "Not all config files are in <dir>" whenever overlays from ``configs/`` follow a
  bundle config, which is how every stage runs, and "Default logging file ... does not exist": no logging config is
  given on purpose, since MONAI would apply it at every stage and so reset the process's logging six times a fit.
- "nvImageCodec is not available": MONAI builds its GPU DICOM reader inside every ``LoadImage``, even one reading
  ``.npy`` slices; the project's DICOM is read by pydicom (``diffdenoise.io``).
"""

from __future__ import annotations

import logging
import sys
import warnings

KNOWN_NOTICES = (
    ("monai.bundle.workflows", "Not all config files are in"),
    ("monai.bundle.workflows", "Default logging file in"),
    ("monai.data.nvimgcodec_pydicom_plugin", "nvImageCodec is not available"),
)
QUIET, NORMAL, VERBOSE = 0, 1, 2
# MONAI loggers made by get_logger only when a stage builds a handler, after configure(): made here first, as
# get_logger adds its stdout handler only to a logger that does not exist yet
LATE_MONAI_LOGGERS = ("monai.handlers.StatsHandler",)


class _KnownNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(record.name == name and record.getMessage().startswith(text) for name, text in KNOWN_NOTICES)


def configure(verbosity: int = NORMAL) -> None:
    """Sets up the process's logging for a command; calling it again replaces what an earlier call set.

    Call it after the libraries are imported: MONAI's loggers exist from then on, and get their own handlers.
    """
    ours = logging.getLogger("diffdenoise")
    ours.setLevel(logging.INFO if verbosity >= NORMAL else logging.WARNING)
    ours.propagate = False
    _set_handler(ours, logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"), logging.NOTSET)
    libraries = logging.INFO if verbosity >= VERBOSE else logging.WARNING
    theirs = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s", "%H:%M:%S")
    monai_own = {name for name, logger in logging.root.manager.loggerDict.items()
                 if name.startswith("monai") and isinstance(logger, logging.Logger) and logger.handlers}
    for name in sorted(monai_own | set(LATE_MONAI_LOGGERS)):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        _set_handler(logger, theirs, libraries)
        logger.propagate = False
    _set_handler(logging.root, theirs, libraries)
    if logging.root.level > libraries:
        logging.root.setLevel(libraries)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader: nvImageCodec decoder plugin")


def _set_handler(logger: logging.Logger, formatter: logging.Formatter, level: int) -> None:
    """One stderr handler of this module on ``logger``, replacing an earlier one; other handlers stay. It drops
    the known notices."""
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler(level)
    handler.setFormatter(formatter)
    handler.addFilter(_KnownNotices())
    logger.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each record (a test's capture, a redirection made after setup)."""

    def __init__(self, level: int):
        logging.Handler.__init__(self, level)

    @property
    def stream(self):
        return sys.stderr
