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


class DiskFullError(OODLightningError, OSError):
    """No space left where a file was being written: the folder, the space needed and what is free."""

    @classmethod
    def of(cls, path, needed: int | None = None, at_least: bool = False) -> "DiskFullError":
        import shutil
        from pathlib import Path

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        try:
            free = f", {_size(shutil.disk_usage(folder).free)} free"
        except OSError:
            free = ""
        need = f"{'at least ' * at_least}{_size(needed)} needed" if needed else "more space needed"
        return cls(f"no space left on the device of {folder} while writing {path.name} ({need}{free}): free space "
                   "there, or write elsewhere (paths.log_dir=... for runs, paths.cache_dir=... for caches)")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


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
    """SIGTERM (a scheduler's notice before preemption) or Ctrl-C ended the run: its folder, the
    checkpoint to resume from, and the command that does it."""

    sweep_continues = False  # the scheduler is taking the machine (or the user stopped): the next job would be too

    def __init__(self, checkpoint, command: str, out_dir=None, signal_name: str = "SIGTERM", trains: bool = True):
        self.checkpoint, self.command, self.signal_name = checkpoint, command, signal_name
        self.reason = "interrupted" if signal_name == "SIGINT" else "terminated"
        #: 128 + the signal's number, as a shell reports a process the signal ended
        self.exit_code = 130 if signal_name == "SIGINT" else 143
        what = "interrupted (Ctrl-C)" if signal_name == "SIGINT" else "terminated by SIGTERM"
        folder = f"; run folder {out_dir} (failed.json marks it {self.reason})" if out_dir is not None else ""
        if not trains:
            where, verb = "scoring had not finished", "re-run with"
        else:
            where = f"checkpoint {checkpoint}" if checkpoint is not None else "no checkpoint yet (it starts from the beginning)"
            verb = "resume with"
        super().__init__(f"{what}{folder}; {where}; {verb}: {command}")

    def failure_fields(self) -> dict:
        return {"reason": self.reason, "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
                "resume_command": self.command}
