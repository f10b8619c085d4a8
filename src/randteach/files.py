"""Files written whole or not at all: a temporary file beside the target, renamed over it when complete; and
one writer at a time for a file that several runs may want to compute (`exclusive`).

tempfile.mkstemp creates its file with mode 0600, which the rename would keep: on a shared data root or run
folder other users could then not read what randteach wrote. The temporary file gets the mode a plain new
file would get under the user's umask instead.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()  # what open() would give a new file
CHUNK = 1 << 20  # bytes read at a time where a whole file is hashed or copied


def temporary_beside(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """(fd, name) of a new file next to `path` for an atomic write, named `.<name>.*<suffix>` (a run folder
    removes `.*.tmp` files a kill left behind), with the permissions of a plain new file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.fchmod(fd, FILE_MODE)
    return fd, tmp


@contextmanager
def written_whole(path: Path, mode: str = "w"):
    """A file to write `path` through: a temporary beside it, renamed over `path` when the block ends. An error
    or a signal inside the block removes the temporary and leaves `path` as it was; a reader, even in another
    process, sees the old file or the whole new one."""
    fd, tmp = temporary_beside(path)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def exclusive(path: Path):
    """Hold an advisory lock on `path` plus ".lock" (it and its folder created if missing), waiting for whoever
    holds it: other processes and other threads of this one (flock locks an open file, and each holder opens
    its own). Where the lock file cannot be made (a read-only folder) there is no lock: nobody can write there."""
    lock = path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise
        fd = None  # the body runs outside this handler: its own errors are not reported as raised during it
    if fd is None:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def file_digest(path: Path, algorithm: str) -> str:
    """The hex digest of a file's bytes by `algorithm` (a hashlib name: md5 for the data sets' published
    checksums, sha256 elsewhere), read a chunk at a time."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
