"""Error types. The CLI turns every :class:`EdgeKDError` into a one-line message and its exit code.

Exit codes follow one rule across commands: 2 for bad input or usage (the user must change something),
1 for a check that ran and failed (a budget, a parity verification, an artifact whose sha256 changed since it
was written), 130 when interrupted, 0 for success.
"""

from __future__ import annotations


class EdgeKDError(Exception):
    """Base class of every error edgekd reports to a user.

    Args:
        message: What is wrong, in one line.
        hint: How to fix it, in one line (optional).
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class RecipeError(EdgeKDError):
    """A recipe file or a ``--set`` override is missing, malformed or invalid."""


class DataError(EdgeKDError):
    """A dataset cannot be found, read, or does not fit the model."""


class ModelError(EdgeKDError):
    """A model name, import path or factory call is invalid."""


class CheckpointError(EdgeKDError):
    """A checkpoint is missing, corrupt, or would need unsafe unpickling."""


class RunDirError(EdgeKDError):
    """A run directory is missing, incomplete, or an artifact in it was changed."""


class ArtifactChanged(RunDirError):
    """A file of the run was changed or truncated after edgekd wrote it (its sha256 no longer matches).

    Exit code 1, like a failed verification: the input was fine when written, the check against its record
    failed. Carries the run-relative file names in ``files``.
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, files: list[str] | None = None):
        super().__init__(message, hint)
        self.files = list(files or [])


class TrainingError(EdgeKDError):
    """Training cannot go on (for example the loss became NaN)."""


class ExportError(EdgeKDError):
    """A model could not be exported or an exported file is unusable."""


class CheckFailed(EdgeKDError):
    """A check ran and failed: a budget or a verification tolerance. Exit code 1."""

    exit_code = 1
