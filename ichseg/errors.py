"""Exceptions raised by ichseg for problems a user can fix (bad data, bad paths, bad config).

Every message is one sentence that names the file and what is wrong; the command-line entry points
print it and exit with status 2 instead of showing a traceback.
"""

from __future__ import annotations

from os import PathLike


class IchsegError(Exception):
    """Base class of every user-facing ichseg error."""


class DatasetError(IchsegError):
    """A dataset on disk is missing, incomplete or malformed.

    ``path`` is the file or folder the problem is about (also part of the message).
    """

    def __init__(self, message: str, path: str | PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


class DatasetProblems(DatasetError):
    """Several dataset problems found at once (by the dataset check);
    ``problems`` lists them all.
    """

    def __init__(self, problems: list[DatasetError]) -> None:
        self.problems = list(problems)
        lines = "\n".join(str(p) for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) found:\n{lines}")


class DatasetWarning(UserWarning):
    """A file in a dataset that a reader skips (e.g. ``ct_scans/abc.nii``, not a patient number);
    the message names the file. The dataset check lists these as warning lines."""


class ConfigError(IchsegError):
    """A configuration value is invalid or inconsistent."""


class ReportError(IchsegError):
    """Evaluation results on disk are missing, unreadable or inconsistent (e.g. a patient tested
    twice across folds); ``path`` is the file or folder concerned."""

    def __init__(self, message: str, path: str | PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): how a
    third-party error is quoted inside ichseg's one-sentence messages."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


class TrainingDiverged(IchsegError):
    """Training produced NaN or infinite values (loss, network outputs or weights); raised before
    a checkpoint of that epoch is kept."""
