"""A mistyped top-level key on the command line (``lamda=3.5e-3``), named with the closest real one
before anything slow is imported: Hydra's own error ("Key 'lamda' is not in struct") suggests
nothing and comes after seconds of start-up. Only the first part of a key is checked here (the
keys inside a config group depend on the option chosen, and Hydra names those)."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path

import yaml

CONF = Path(__file__).resolve().parents[2] / "conf"
#: the config groups each entrypoint composes (evaluate.py's defaults list)
GROUPS = {"train": None, "evaluate": ("data", "ood", "detectors", "logger", "paths")}


def known_keys(entry: str) -> list[str]:
    """The top-level keys of ``conf/<entry>.yaml``, the config groups it uses, and ``hydra``."""
    doc = yaml.safe_load((CONF / f"{entry}.yaml").read_text()) or {}
    groups = GROUPS[entry] or [p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra"]
    return sorted({*(k for k in doc if k != "defaults"), *groups, "hydra"})


def group_options(entry: str) -> str:
    """The help page's list of config groups ``entry`` uses and their options (the files under conf/;
    the data schema every data config extends is not an option)."""
    groups = GROUPS[entry] or sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
    lines = []
    for group in groups:
        folders = [CONF / group, *sorted(p for p in (CONF / group).iterdir() if p.is_dir())]
        for folder in folders:
            options = sorted(p.stem for p in folder.glob("*.yaml"))
            lines.append(f"{folder.relative_to(CONF).as_posix()}: {', '.join(options)}")
    return "\n".join(lines)


def unknown_key(argv: list[str], entry: str) -> str | None:
    """The one-line message for the first override whose top-level key ``entry`` does not have, or None."""
    known = None
    for arg in argv:
        if arg.startswith("-") or "=" not in arg or arg.startswith("+"):  # flags; +key adds a key on purpose
            continue
        name = arg.split("=", 1)[0].lstrip("~").split("@", 1)[0]
        first = name.split(".", 1)[0].split("/", 1)[0]
        known = known if known is not None else known_keys(entry)
        if first and first not in known:
            close = difflib.get_close_matches(first, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else f"the top-level keys are: {', '.join(known)}"
            return f"unknown key {first} ({arg}); {hint} (python {entry}.py --help lists them)"
    return None


def exit_on_unknown_key(entry: str) -> None:
    """Check ``sys.argv``; exit 1 with one line on a mistyped top-level key."""
    message = unknown_key(sys.argv[1:], entry)
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1)
