"""Errors the app raises on purpose, each mapped to a BIDS execution-spec exit code."""


class DeepIslesError(Exception):
    """Base class: a one-line message and the exit code it maps to."""

    exit_code = 1


class UsageError(DeepIslesError):
    """Bad command line (64)."""

    exit_code = 64


class BIDSValidationError(DeepIslesError):
    """The input dataset is not a usable BIDS dataset (16)."""

    exit_code = 16


class NoDataError(DeepIslesError):
    """Labels or filters selected no data (18)."""

    exit_code = 18


class InputError(DeepIslesError):
    """An input file is missing or unusable (66). Message: ``'<file>: <problem>'``."""

    exit_code = 66

    def __init__(self, path, problem):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class OutputError(DeepIslesError):
    """The output (or work) directory cannot be created or written (73)."""

    exit_code = 73


class WeightsError(DeepIslesError):
    """Model weights missing or failing their checksum (66)."""

    exit_code = 66
