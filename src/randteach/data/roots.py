"""Where data sets live: the data root, and the command that fills it.

This is the one place of the data package that reads the environment.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path

ENV_VAR = "RANDTEACH_DATA"


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: `root` if given, else $RANDTEACH_DATA, else the per-user cache
    ($XDG_CACHE_HOME/randteach, by default ~/.cache/randteach)."""
    if root:
        return Path(root).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "randteach"


def fetch_command(name: str, root: Path) -> str:
    """The exact command that downloads data set `name` into `root`."""
    return f"randteach data fetch {name} --data.root {shlex.quote(str(root))}"
