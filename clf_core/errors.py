"""Errors a user can act on. Each message names the bad value, what is allowed and the fix."""


class ClfError(ValueError):
    """Base class: a problem with the user's input, config or files (not a bug in this code)."""


class ConfigError(ClfError):
    """A config field holds a value that is not allowed."""


class DataError(ClfError):
    """Input data cannot be used as given (missing column, unknown label, empty file, ...)."""


class ArtifactError(ClfError):
    """A model artifact is missing, incomplete or does not match its manifest."""


class CheckpointError(ClfError):
    """A training checkpoint is incomplete or altered, so it is not restored."""


class TableError(ClfError):
    """The output table exists but cannot be read (unreadable metadata, an unreachable store):
    a run-time failure (exit 1), named with the object and the fix, never a traceback."""
