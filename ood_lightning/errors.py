"""Errors that carry one clear line naming the fix, so a user never has to read a torch traceback."""


class OODLightningError(Exception):
    """Base class: the message is the whole story (where we looked, what to pass)."""


class DatasetNotFoundError(OODLightningError, FileNotFoundError):
    pass


class CorruptDataError(DatasetNotFoundError):
    """A data file is there but cannot be read whole (truncated copy, bad CRC): name it and the check."""

    @classmethod
    def of(cls, path, reason: str) -> "CorruptDataError":
        from pathlib import Path

        path = Path(path)
        sums = next((d for d in path.parents[:3] if (d / "SHA256SUMS").is_file()), None)
        check = (f"check the copy with `cd {sums} && sha256sum -c SHA256SUMS`" if sums is not None
                 else f"compare `sha256sum {path}` with the checksum published with it (sha256sum -c SHA256SUMS)")
        return cls(f"{path} is corrupt ({reason}); {check}, then copy the file again")


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
