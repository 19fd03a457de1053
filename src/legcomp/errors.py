"""Exceptions that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class LegcompInputError(ValueError):
    """Bad input: a missing, unreadable or inconsistent file, or an invalid option.

    The message is one line that names the file (where there is one) and the problem.
    """

    def __init__(self, message: str, path: object | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path is not None else message)


class Interrupted(KeyboardInterrupt):
    """A termination signal (e.g. SIGTERM from a batch scheduler) raised as an exception, so that clean-up
    runs as for Ctrl-C; the command then exits with ``exit_code`` (128 + the signal number)."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"signal {self.signum}")

    @property
    def exit_code(self) -> int:
        """The conventional exit code of a process ended by this signal (SIGTERM: 143)."""
        return 128 + self.signum
