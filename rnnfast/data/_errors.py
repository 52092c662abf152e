"""The one exception the loaders raise for missing or malformed data."""

import os


class DataError(ValueError):
    """A data file or folder is missing or not in the expected format.

    ``str(err)`` is a complete, user-facing message: which path, what was
    expected, and (where known) where to get the data.
    """

    def __init__(self, path, problem, expected=None, hint=None):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        self.expected = expected
        self.hint = hint
        parts = []
        if self.path is not None:
            parts.append(f"{self.path}: {problem}")
        else:
            parts.append(problem)
        if expected:
            parts.append(f"expected {expected}")
        if hint:
            parts.append(hint)
        super().__init__(". ".join(p.rstrip(".") for p in parts) + ".")


def open_text(path, what, hint=None):
    """Open a text file for the csv module (universal newlines, utf-8 with a
    latin-1 fallback decided by the caller), or raise DataError."""
    if not os.path.exists(path):
        raise DataError(path, "file not found", what, hint)
    if os.path.isdir(path):
        raise DataError(path, "is a folder, not a file", what, hint)
    return open(path, "r", encoding="utf-8", errors="replace", newline="")
