"""User-facing errors.

A :class:`CmpcError` is something the *user* can cause and fix (a bad path, a malformed
config, a raster that does not fit, an index built by another model). The CLI prints its
message on one line and exits non-zero; tracebacks are reserved for bugs.
"""

from __future__ import annotations


class CmpcError(Exception):
    """An error caused by user input; its message is one line saying what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class ConfigError(CmpcError):
    """Malformed, unknown or out-of-range experiment configuration."""


class DataError(CmpcError):
    """Bad dataset, annotation or raster input."""


class IndexMismatchError(CmpcError):
    """An index does not match the model or the queries it is used with."""


class CheckpointError(CmpcError):
    """A checkpoint that cannot be loaded safely or does not fit the model."""
