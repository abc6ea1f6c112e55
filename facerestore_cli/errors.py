"""The root of every error a user can cause (a bad file, option, config or missing weights).

The CLI turns a `FacerestoreError` into one line and an exit code; anything else is a bug and
surfaces with its traceback. `InputError` is for bad values: it is also a `ValueError`, so code
that validated with ValueError keeps working.
"""

from __future__ import annotations


class FacerestoreError(Exception):
    """Something the user can fix: the message is the one line they see."""


class InputError(FacerestoreError, ValueError):
    """A bad option, config value or argument."""


class MissingFileError(FacerestoreError, FileNotFoundError):
    """A file or folder the user named is not there (or is not the kind asked for); still a
    FileNotFoundError for code that caught that."""
