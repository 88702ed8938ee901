"""A config read from a file (the run config a checkpoint stores) is data, never code.

Hydra's ``instantiate`` calls whatever a ``_target_`` names, so a tensors-only checkpoint could
still choose the callable (``_target_: torch.load`` on a second, pickled file runs its payload).
Before anything is built from a stored config, :func:`check_stored_targets` checks every
``_target_`` in it, nested ones too (the arguments of ``_partial_`` nodes), against what the
project's own config groups name: a ``_target_`` under a top-level key ``<key>`` must appear in
``conf/<key>/`` or under ``<key>`` in a global preset (``conf/experiment``, ``conf/debug``);
under ``method``, a ``torch.optim`` optimiser or learning-rate scheduler class is allowed too.
The strings are compared before any module is imported. ``allow_unsafe_checkpoint=true`` lifts
the check for a file the user trusts, with the same warning as for a pickle.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import yaml

from ood_lightning.core.errors import UnsafeCheckpointError

log = logging.getLogger(__name__)

#: the project's config groups, whose ``_target_`` values are the allow-list
CONF = Path(__file__).resolve().parents[2] / "conf"
#: preset folders whose files set keys of any group (``# @package _global_``)
GLOBAL_PRESETS = ("experiment", "debug")


def check_stored_targets(config: Mapping, source: str, allow_unsafe: bool = False,
                         opt_in: str = "allow_unsafe_checkpoint=true") -> None:
    """Refuse ``config`` (read from ``source``) if any ``_target_`` in it is not one the project names;
    ``allow_unsafe`` (the user's ``opt_in``) only warns."""
    allowed = allowed_targets()
    for where, target in _targets(config):
        top = where.split(".", 1)[0]
        if isinstance(target, str) and (target in allowed.get(top, ()) or (top == "method" and _is_optim_class(target))):
            continue
        if not allow_unsafe:
            raise UnsafeCheckpointError(
                f"{source}: its stored config names _target_={target} at {where}, which is not a class the project's "
                f"config groups name (conf/{top}/), so nothing was built from it (building it could run any code); "
                f"if you trust the file, pass {opt_in}")
        log.warning("%s: building _target_=%s at %s from the stored config (%s): it can run code",
                    source, target, where, opt_in)


@functools.cache
def allowed_targets() -> dict[str, frozenset[str]]:
    """Top-level key -> the ``_target_`` strings the project's config files name under it."""
    found: dict[str, set[str]] = {}
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.relative_to(CONF).parts[0]
        doc = yaml.safe_load(path.read_text()) or {}
        if group in GLOBAL_PRESETS and isinstance(doc, Mapping):
            items = [(str(key), node) for key, node in doc.items()]
        else:
            items = [(group, doc)]
        for key, node in items:
            found.setdefault(key, set()).update(t for _, t in _targets(node) if isinstance(t, str))
    return {key: frozenset(targets) for key, targets in found.items()}


def _targets(node: object, where: str = "") -> Iterator[tuple[str, object]]:
    """(dotted key, value) of every ``_target_`` in a nested dict/list."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            path = f"{where}.{key}" if where else str(key)
            if key == "_target_":
                yield where or "_target_", value
            else:
                yield from _targets(value, path)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _targets(value, f"{where}[{i}]")


def _is_optim_class(target: str) -> bool:
    """``torch.optim.<Optimizer>`` or ``torch.optim.lr_scheduler.<LRScheduler>`` (looked up in the
    already imported modules: nothing is imported)."""
    module, _, name = target.rpartition(".")
    owner, base = {"torch.optim": (torch.optim, torch.optim.Optimizer),
                   "torch.optim.lr_scheduler": (torch.optim.lr_scheduler, torch.optim.lr_scheduler.LRScheduler)
                   }.get(module, (None, None))
    if owner is None or name.startswith("_"):
        return False
    obj = vars(owner).get(name)
    return isinstance(obj, type) and issubclass(obj, base)
