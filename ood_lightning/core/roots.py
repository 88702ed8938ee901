"""Where offline data and models are found: an environment variable, else ``shared/`` beside the project."""

from __future__ import annotations

import os
from pathlib import Path


def shared_root(env_var: str, name: str) -> str:
    """``$<env_var>``, else ``shared/<name>`` beside the project (or the working directory), else
    ``<project>/<name>``: where offline data and models are found."""
    env = os.environ.get(env_var)
    if env:
        return env
    project = Path(__file__).resolve().parents[2]
    for candidate in (project.parent / "shared" / name, Path.cwd().parent / "shared" / name):
        if candidate.is_dir():
            return str(candidate)
    return str(project / name)
