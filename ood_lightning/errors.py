"""Errors that carry one clear line naming the fix, so a user never has to read a torch traceback."""


class OODLightningError(Exception):
    """Base class: the message is the whole story (where we looked, what to pass)."""


class DatasetNotFoundError(OODLightningError, FileNotFoundError):
    pass


class ConfigError(OODLightningError, ValueError):
    pass


class CheckpointMismatchError(OODLightningError):
    pass


class NonFiniteLossError(OODLightningError, FloatingPointError):
    pass


class CheckpointNotFoundError(OODLightningError, FileNotFoundError):
    pass


class InvalidCheckpointError(OODLightningError):
    """Truncated, corrupt or not a checkpoint at all: "not a valid checkpoint: <path> (<reason>)"."""


class UnsafeCheckpointError(OODLightningError):
    """The file holds objects that only full unpickling (which can run code) would rebuild."""
