"""Errors a user can act on. Each message says what went wrong and what to change."""


class SpecpipeError(Exception):
    """Base class: the CLI prints these as one line instead of a traceback."""


class CheckpointError(SpecpipeError):
    """A checkpoint directory is missing, partial or malformed."""


class UnsupportedModelError(SpecpipeError):
    """The checkpoint's architecture or one of its settings is not implemented."""


class CacheCapacityError(SpecpipeError):
    """A request does not fit the preallocated KV cache."""


class DeviceError(SpecpipeError):
    """A device that does not exist or cannot be used."""
