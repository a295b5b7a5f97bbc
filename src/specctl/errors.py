"""One error table: every failure a user can cause or fix is a `SpecctlError` with a hint.

The CLI turns these into a single `Error: ...` line on stderr (exit 1); tracebacks only
with SPECCTL_DEBUG=1. Role packages raise the most specific subclass they can.
"""

from __future__ import annotations


class SpecctlError(Exception):
    """Base class. `hint` names what to do or which command fixes it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(SpecctlError):
    """Bad flags or flag combinations (exit 2, like typer's own usage errors)."""

    exit_code = 2


class NotBuiltError(UsageError):
    """A command or option that exists in the design but is not implemented yet."""


class ConfigError(UsageError):
    """A YAML file or `--set key=value` override that does not match the config schema."""


class InputError(SpecctlError):
    """Missing or malformed input files, models or datasets."""


class StoreError(SpecctlError):
    """The store (control plane or Mooncake data plane) failed or is unreachable."""


class StoreUnavailable(StoreError):
    """Nothing answers at the store address."""


class RecordError(SpecctlError):
    """A record on the wire failed validation (magic, version, sizes, CRC)."""


class CheckpointError(SpecctlError):
    """A checkpoint is missing, incomplete or does not match the run."""
