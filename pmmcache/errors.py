"""User-facing errors: raised for bad input or settings, printed by the CLI without a traceback."""
from __future__ import annotations


class PmmcacheError(Exception):
    """An error the user can fix (bad data, bad settings, missing model). Message says how."""


class DataError(PmmcacheError):
    """Malformed input data; names the file and, where known, the line."""

    def __init__(self, message: str, path: object = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}"
            if line is not None:
                where += f", line {line}"
            where += ": "
        super().__init__(where + message)
        self.path = path
        self.line = line


class ConfigError(PmmcacheError):
    """An unknown setting, a wrong type, or an invalid value."""


class CacheMismatchError(PmmcacheError):
    """A feature cache made with other settings than the ones asked for."""


class CacheCorruptError(PmmcacheError):
    """A feature cache whose stored bytes do not match their checksums, or hold non-finite states."""
