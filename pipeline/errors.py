"""Errors that reach the user as one clear line, never as a traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem the user can fix: bad input, missing file, unknown backend."""


class InputError(PipelineError):
    """A bad line or item in an input file; names the file and the line or item."""

    def __init__(self, where: str, what: str):
        self.where = where
        self.what = what
        super().__init__(f"{where}: {what}")
