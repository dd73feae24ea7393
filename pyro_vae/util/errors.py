"""Errors a user can cause and fix: the CLI prints their message and exits non-zero."""

ELLIPSIS = "..."


def shorten(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters at a word boundary, ending in an ellipsis
    (for quoting a library's long message inside one error line)."""
    if len(text) <= limit:
        return text
    head = text[: limit - len(ELLIPSIS) + 1]
    cut = head.rfind(" ")
    head = head[:cut] if cut > 0 else head[:-1]
    return head.rstrip(" ,;:.") + ELLIPSIS


class PyroVAEError(ValueError):
    """Base class of the package's user-facing errors.

    ``per_rank``: under torchrun, whether the error is this rank's own (every rank reports it)
    rather than one that every rank meets alike (rank 0 alone reports it)."""

    per_rank = False


class ConfigError(PyroVAEError):
    """An option or a combination of options that cannot work."""


class DataError(PyroVAEError):
    """Missing, corrupt or invalid data (files, values, shapes, labels)."""


class CheckpointError(PyroVAEError):
    """A run folder or checkpoint that cannot be read or resumed."""


class TrainingDiverged(PyroVAEError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def check_count(name: str, value: object, minimum: int = 1, optional: bool = False) -> int | None:
    """``value`` if it is a whole number (an ``int``, not a ``bool``) of at least ``minimum``,
    or ``None`` where ``optional``; else a :class:`ConfigError` naming the parameter ``name``:
    ``num_particles must be an integer >= 1, got 0``."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = " or None" if optional else ""
        raise ConfigError(f"{name} must be an integer >= {minimum}{allowed}, got {value!r}")
    return value
