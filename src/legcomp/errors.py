"""Exceptions that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class LegcompInputError(ValueError):
    """Bad input: a missing, unreadable or inconsistent file, or an invalid option.

    The message is one line that names the file (where there is one) and the problem.
    """

    def __init__(self, message: str, path: object | None = None):
        self.path = path
        super().__init__(f"{path}: {message}" if path is not None else message)
