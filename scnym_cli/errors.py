"""The one exception type users see.

Every problem caused by the user's input (files, columns, config values, gene overlap ...)
is raised as :class:`ScnymError` with a single line that names the problem and the fix.
The CLI prints it without a traceback and exits non-zero; anything else that escapes is a
bug and keeps its traceback.
"""


class ScnymError(Exception):
    """A problem with the user's input, explained in one line."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: callers may build messages from file contents.
        super().__init__(" ".join(str(message).split()))


class RunInterrupted(ScnymError):
    """A run stopped on request (SIGUSR1 / SIGTERM from a batch system) after writing a checkpoint: the
    unfinished run is kept, to be continued with --resume."""

    exit_code = 75   # EX_TEMPFAIL: try again
