"""Errors for bad input.

Every error a user can cause derives from `CLTError`; its message names the file, key or
value at fault and what would be valid. The CLI prints the message (no traceback) and exits
with status 2, so a typo never surfaces as a stack trace from deep inside a library.
"""

from __future__ import annotations


class CLTError(Exception):
    """Base class: a problem with the user's input, not a bug in the package."""


class ConfigError(CLTError, ValueError):
    """A configuration value or key is invalid."""


class DataNotFoundError(CLTError, FileNotFoundError):
    """A dataset root, weights file or other input file does not exist."""


class CacheError(CLTError):
    """An activation cache is missing, incomplete or made for something else."""


class CorruptShardError(CacheError):
    """A shard failed its checksum or could not be parsed; the message names the file."""


class DiskSpaceError(CLTError, OSError):
    """Not enough free disk space (the message gives the needed and free sizes)."""


class UnreadableImageError(CLTError):
    """An image file that does not decode."""


class CheckpointMismatchError(CLTError, ValueError):
    """A checkpoint or exported CLT does not fit the teacher or cache it is used with."""


class UnreadableCheckpointError(CheckpointMismatchError):
    """A checkpoint file that is truncated, not a torch checkpoint, or not weights-only."""


class NonFiniteLossError(CLTError, FloatingPointError):
    """Training produced a NaN or Inf; the message names the step and the layer."""
