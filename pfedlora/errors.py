"""Exceptions raised by pfedlora; the CLI turns each into one line and exit status 2."""


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
