"""Errors a user can cause and fix: the CLI prints their message and exits non-zero."""


class PyroVAEError(ValueError):
    """Base class of the package's user-facing errors."""


class ConfigError(PyroVAEError):
    """An option or a combination of options that cannot work."""


class DataError(PyroVAEError):
    """Missing, corrupt or invalid data (files, values, shapes, labels)."""


class CheckpointError(PyroVAEError):
    """A run folder or checkpoint that cannot be read or resumed."""


class TrainingDiverged(PyroVAEError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
