"""The one error type users see: bad input, named by file and problem, raised before anything is written."""


class InputError(ValueError):
    """Input that cannot be used, with the path and the problem in the message.

    The CLI prints the message as one line and exits with status 2; library callers catch it like a
    ValueError. Raise it before any output is written.
    """

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def raise_missing(key: str, path, hint: str):
    """Fail at a stage's start when a file it is handed is absent, naming the config key and the fix."""
    raise InputError(path, f"`{key}` does not exist: {hint}")


def one_line(exc: Exception) -> str:
    """A library exception as one line, to quote inside an InputError message."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
