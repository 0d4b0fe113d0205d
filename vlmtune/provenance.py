"""What produced an artifact: the project's git commit and the versions of the libraries that matter.

Written into every manifest, so a result can be traced to code and environment (LLaMA-Factory #8652).
"""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

LIBRARIES = ("torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes", "dagster", "pyarrow", "pillow")


@functools.cache
def provenance() -> dict:
    return {"git_commit": _git_commit(), "python": platform.python_version(), "libraries": _versions()}


def _versions() -> dict[str, str | None]:
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10)
    return result.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
