"""User-facing errors: raised for bad input, printed by the CLI as one clear line (no traceback)."""

from __future__ import annotations


class SegueError(Exception):
    """Base class for errors the user can fix (bad file, bad value)."""


class InputError(SegueError, ValueError):
    """A bad argument or input file: says which one, which value, and what is allowed."""


class CheckpointError(InputError):
    """A checkpoint folder or weight file that cannot be used as given (missing, damaged or crafted): a bad
    input like any other, so ``except InputError`` catches it too."""


class OutputError(SegueError):
    """A result that cannot be written where asked (disk full, folder not writable); nothing is left half-written."""
