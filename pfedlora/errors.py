"""Exceptions raised by pfedlora; the CLI turns each into one line and exit status 2."""

from __future__ import annotations


class PfedloraError(Exception):
    """Base class of every error pfedlora raises on purpose."""


class ConfigError(PfedloraError, ValueError):
    """A configuration value, key or combination is invalid."""


class AdapterMismatchError(ConfigError):
    """Adapter tensors differ in name or shape between clients, so they cannot be averaged."""


class DataError(PfedloraError):
    """A dataset cannot be found, read or verified."""


class DatasetNotFoundError(DataError):
    """A dataset's files are in none of the lookup locations and could not be downloaded."""


class ChecksumMismatchError(DataError):
    """A dataset file's checksum differs from the official one."""


class DiskWriteError(PfedloraError):
    """A file of a run could not be written (a full disk, a read-only or vanished folder): the path, the
    cause, and (``stopped``) where the run it belongs to stood when it stopped."""

    def __init__(self, path: str, reason: str, stopped: str = "") -> None:
        self.path, self.reason, self.stopped = path, reason, stopped
        super().__init__(f"cannot write {path}: {reason}" + (f"; {stopped}" if stopped else ""))

    @classmethod
    def of(cls, path: object, error: OSError) -> DiskWriteError:
        """The error of writing ``path`` (the file the caller was writing, whatever ``error`` names)."""
        return cls(str(path), error.strerror or str(error))

    def __reduce__(self) -> tuple[type[DiskWriteError], tuple[str, str, str]]:
        return type(self), (self.path, self.reason, self.stopped)
