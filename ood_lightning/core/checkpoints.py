"""Reading and writing checkpoint files: the one place the framework opens a weights file.

Unpickling a file can run code, so every file is read with ``torch.load(weights_only=True)``:
tensors and plain containers only. Every checkpoint this framework writes reads that way
(every method's ``last.ckpt`` holds plain dicts, lists, numbers, strings and tensors; the
run config is stored resolved, ``config.to_dict``), so ``SAFE_GLOBALS`` is empty. A file
that needs more is refused unless the run opts in with ``allow_unsafe_checkpoint=true``.

Third-party weights come in other layouts; ``to_project_layout`` is the single mapping to
the project's ``backbone.*`` / ``head.*`` names, and ``load_state_strict`` loads with a
mismatch message short enough to read.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ood_lightning.core.errors import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    InvalidCheckpointError,
    UnsafeCheckpointError,
)
from ood_lightning.core.io import atomic_write_bytes
from ood_lightning.core.pretrained import where_to_get

log = logging.getLogger(__name__)

#: classes (besides tensors and plain containers) the framework's own checkpoints need: none
SAFE_GLOBALS: tuple[type, ...] = ()
torch.serialization.add_safe_globals(list(SAFE_GLOBALS))  # also for Lightning's own resume load

#: the top-level config key that lets a run fully unpickle a trusted file (and build its stored config)
OPT_IN = "allow_unsafe_checkpoint"
#: the same opt-in as a flag of the study and benchmark scripts
SCRIPT_OPT_IN = "--allow-unsafe-checkpoint"
#: first-level module names third-party code gives the classifier head
HEAD_NAMES = ("linear", "fc")
#: keys a mismatch message lists per kind (the counts are always complete)
SHOWN_KEYS = 5

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_OPERAND = re.compile(r"Unsupported operand (\d+)")
_SIZE = re.compile(r"size mismatch for ([^:\s]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                   r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic on disk: the file is serialised in memory, written to a
    temporary file beside the target, flushed and renamed, so an earlier ``last.ckpt`` survives any
    failed write (a full disk ends in one line naming the folder and the space needed)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getbuffer())


def read_checkpoint(path: str | Path, allow_unsafe: bool = False, *, key: str = "checkpoint", hint: str = "") -> dict:
    """The dict in ``path`` (on the CPU), read without running code from it.

    ``key`` names the config entry the path came from and ``hint`` what to pass instead, for
    the one-line errors: missing (where it looked), invalid (truncated, corrupt, not a
    checkpoint) or unsafe (needs full unpickling; loaded only with ``allow_unsafe``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{key}={path}: no such file (looked for {path.resolve()})"
                                      + (where_to_get(path) or (f"; {hint}" if hint else "")))
    if path.stat().st_size == 0:
        raise InvalidCheckpointError(f"not a valid checkpoint: {path} (empty file)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as err:
        raise InvalidCheckpointError(f"cannot read checkpoint {path} ({err.strerror or err})") from None
    except Exception as err:  # noqa: BLE001 - torch raises anything from a bad file; each becomes one line
        found = _GLOBAL.search(str(err))
        if found is None:
            raise InvalidCheckpointError(f"not a valid checkpoint: {path} ({_reason(err)})") from None
        if not allow_unsafe:
            raise UnsafeCheckpointError(
                f"{key}={path} needs full unpickling (it holds {found.group(1)}, not only tensors and plain "
                f"containers), which can run arbitrary code, so it was not loaded; if you trust the file, pass "
                f"{OPT_IN}=true, or re-save its tensors (torch.save(state_dict)) where it is trusted") from None
        log.warning("%s: full unpickling (%s=true): %s can run code while it loads", path, OPT_IN, found.group(1))
        state = _read_unsafe(path)
    if not isinstance(state, Mapping):
        raise InvalidCheckpointError(f"not a valid checkpoint: {path} (it holds a {type(state).__name__}, not a dict "
                                     "of weights)")
    return dict(state)


def _read_unsafe(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise InvalidCheckpointError(f"not a valid checkpoint: {path} ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    """Why torch could not read a file, in a few words (its messages run to paragraphs)."""
    text = str(err)
    operand = _OPERAND.search(text)
    if operand:
        return f"not a file torch.save wrote: pickle opcode {operand.group(1)} is outside the weights format"
    if isinstance(err, EOFError):
        return "the file ends early: truncated"
    if isinstance(err, OSError):  # e.g. a seek past the end of a truncated zip archive
        return f"truncated or corrupt: {err.strerror or err}"
    first = re.split(r"\.\s|\n", text.strip(), maxsplit=1)[0].rstrip(".") if text.strip() else ""
    return first if isinstance(err, RuntimeError) and first else f"not a torch.save file: {type(err).__name__} {first}".strip()


def to_project_layout(state: Mapping, backbone_keys: Collection[str] = (), source: str = "state") -> dict:
    """Map the layouts third-party code saves to the project's names (``backbone.*``, ``head.*``).

    1. A top-level ``state_dict`` entry (Lightning, many training scripts) holds the weights;
       without one, ``state`` is the state_dict itself.
    2. ``module.`` prefixes (saved from ``DataParallel``/DDP wrappers) are dropped.
    3. A state_dict already in the project's layout (any ``backbone.`` key: a run of this
       framework) passes through unchanged.
    4. Otherwise the head keys (first name ``linear`` or ``fc``) become ``head.*`` and every
       other key ``backbone.*``; a head name among ``backbone_keys`` (a backbone's own ``fc``
       layer, as in the small CNN) stays in the backbone.
    """
    weights = state.get("state_dict", state)
    if not isinstance(weights, Mapping):
        raise InvalidCheckpointError(f"not a valid checkpoint: {source} (its state_dict is a {type(weights).__name__})")
    odd = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise InvalidCheckpointError(
            f"not a valid checkpoint: {source} (no state_dict: {odd[0]!r} holds a {type(weights[odd[0]]).__name__}, "
            f"not a tensor; top-level keys: {', '.join(map(str, list(state)[:SHOWN_KEYS]))})")
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    if any(k.startswith("backbone.") for k in weights):
        return weights
    own = set(backbone_keys)
    mapped: dict = {}
    for k, v in weights.items():
        first, _, rest = k.partition(".")
        name = f"head.{rest}" if first in HEAD_NAMES and rest and k not in own else f"backbone.{k}"
        if name in mapped:
            raise InvalidCheckpointError(f"not a valid checkpoint: {source} (two entries map to {name}: two heads?)")
        mapped[name] = v
    return mapped


def load_state_strict(module: torch.nn.Module, state: Mapping, path: str | Path, what: str,
                      fix: str = "pass the backbone/data it was trained with (its config is in the run's "
                                 ".hydra/config.yaml)") -> None:
    """``module.load_state_dict(state)`` where every key must match; otherwise one line with the
    counts and the first few missing, unexpected and size-mismatched keys, then ``fix``."""
    try:  # torch's own loading: it fills num_batches_tracked absent from old files, sizes lazy buffers
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # size mismatches; torch lists every key, so count and show a few
        own = module.state_dict()
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        sizes = [f"{k}: file [{a}] vs model [{b}]" for k, a, b in _SIZE.findall(str(err))]
        sizes = sizes or [str(err).strip().splitlines()[-1].strip()[:200]]
    else:
        missing, unexpected, sizes = list(result.missing_keys), list(result.unexpected_keys), []
        if not missing and not unexpected:
            return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key{'s' * (len(missing) > 1)} ({_first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{'s' * (len(unexpected) > 1)} ({_first(unexpected)})")
    if sizes:
        parts.append(f"{len(sizes)} size mismatch{'es' * (len(sizes) > 1)} ({_first(sizes)})")
    raise CheckpointMismatchError(f"{path} does not match the configured {what}: {'; '.join(parts)}; {fix}")


def _first(items: list[str]) -> str:
    return ", ".join(items[:SHOWN_KEYS]) + (", ..." if len(items) > SHOWN_KEYS else "")
