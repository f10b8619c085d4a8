"""Files written whole or not at all: a temporary file beside the target, renamed over it when complete.

tempfile.mkstemp creates its file with mode 0600, which the rename would keep: on a shared data root or run
folder other users could then not read what randteach wrote. The temporary file gets the mode a plain new
file would get under the user's umask instead.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()  # what open() would give a new file


def temporary_beside(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """(fd, name) of a new file next to `path` for an atomic write, named `.<name>.*<suffix>` (a run folder
    removes `.*.tmp` files a kill left behind), with the permissions of a plain new file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    return fd, tmp
