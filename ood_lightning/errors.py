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
