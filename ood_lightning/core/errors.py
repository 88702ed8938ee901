"""Errors that carry one clear line naming the fix, so a user never has to read a torch traceback."""


class OODLightningError(Exception):
    """Base class: the message is the whole story (where we looked, what to pass)."""

    #: the process's exit status when this error ends a single run
    exit_code: int = 1
    #: whether a multirun sweep carries on with its next job after this error
    sweep_continues: bool = True

    def failure_fields(self) -> dict:
        """What ``failed.json`` records besides the error line (e.g. how to resume)."""
        return {}


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


class RunTerminated(OODLightningError):
    """SIGTERM (a scheduler's notice before preemption) ended the run: where and how to resume."""

    exit_code = 143  # 128 + SIGTERM, as a shell reports a terminated process
    sweep_continues = False  # the scheduler is taking the machine: the next job would be killed too

    def __init__(self, checkpoint, command: str):
        self.checkpoint, self.command = checkpoint, command
        where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint yet (training had not started)"
        super().__init__(f"terminated by SIGTERM; {where}; resume with: {command}")

    def failure_fields(self) -> dict:
        return {"reason": "terminated", "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
                "resume_command": self.command}
