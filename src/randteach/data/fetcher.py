"""Download a data set from its official source, verify it, and unpack it safely into the data root.

Each file is streamed to a temporary file next to its destination, its MD5 computed on the way,
and renamed into place only if the checksum matches, so an interrupted or corrupted download never
looks like data. Archives are unpacked into a temporary folder inside the root, after every member
has been checked: an absolute name, a name that resolves outside the root (`../x`), a link that
points outside, or a device file refuses the whole archive before anything is written. The archive
is deleted afterwards (an archive placed by hand, once its checksum matches, is used and kept). A marker
with every unpacked file's MD5 is written after a verified extraction; a copy that no longer matches it
is unpacked again.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

from tqdm import tqdm

from ..errors import UserError
from ..files import CHUNK, file_digest, temporary_beside, written_whole
from .registry import DatasetInfo, Remote, dataset_info
from .roots import resolve_root

TIMEOUT_S = 60
ABANDONED_S = 600  # a live download writes a chunk at least every TIMEOUT_S


class FetchError(UserError):
    """A download that failed, did not match its checksum, or an archive that is unsafe to unpack."""


def fetch(name: str, root: str | None = None, *, base_url: str | None = None, progress: bool = True) -> Path:
    """Download data set `name` into the data root; returns the folder it is read from.

    Files already present with the right checksum (or archives already unpacked) are not
    downloaded again. `base_url` replaces the official host (a mirror, or a local server in tests).
    """
    info = dataset_info(name)
    base = resolve_root(root)
    if not info.remote:
        raise FetchError(f"nothing to fetch for {info.title}: "
                         + info.manual.format(folder=base / (info.folder or "")))
    target = base / info.folder
    if info.archive:
        _fetch_archive(info, base, target, base_url, progress)
    else:
        for remote in info.remote:
            dest = target / remote.filename
            if not (dest.is_file() and checksum_ok(dest, remote)):
                download(_urls(remote, base_url), dest, remote, progress=progress)
    return target


def _urls(remote: Remote, base_url: str | None) -> tuple[str, ...]:
    return (f"{base_url.rstrip('/')}/{remote.filename}",) if base_url else remote.urls


def _fetch_archive(info: DatasetInfo, base: Path, target: Path, base_url: str | None, progress: bool) -> None:
    if unpacked_intact(target):
        return
    remote = info.remote[0]
    by_hand = base / remote.filename  # the user's own copy, kept
    ours = base / f".{remote.filename}.fetched"  # a download of ours, removed once unpacked
    if by_hand.is_file() and checksum_ok(by_hand, remote):
        archive = by_hand
    elif ours.is_file() and checksum_ok(ours, remote):  # left by a fetch that could not unpack it
        archive = ours
    else:
        archive = download(_urls(remote, base_url), ours, remote, progress=progress, by_hand=by_hand)
    try:
        extract_archive(archive, base)
    except FetchError:  # not an archive we can unpack: of no use to keep
        ours.unlink(missing_ok=True)
        raise
    except OSError as e:  # a full disk, say: the verified download is kept for the next try
        raise FetchError(f"cannot unpack {remote.filename} into {base}: {e}. The verified download stays at "
                         f"{archive}; free the space (or mend the cause) and fetch again: it is unpacked "
                         "without downloading it again") from None
    ours.unlink(missing_ok=True)
    missing = [f for f in info.contents if not (target / f).exists()]
    if missing:
        raise FetchError(f"{remote.filename} unpacked, but {target / missing[0]} is missing: "
                         f"it is not the official {info.title} archive")
    _mark_intact(target)


# Written after a verified archive was unpacked: the MD5 of every file, so that a later fetch tells an intact
# copy from a truncated or altered one (and unpacks again) instead of saying "ready".
INTACT_MARKER = ".randteach-unpacked.json"


def _file_md5s(target: Path) -> dict[str, str]:
    return {str(p.relative_to(target)): file_md5(p) for p in sorted(target.rglob("*"))
            if p.is_file() and p.name != INTACT_MARKER}


def _mark_intact(target: Path) -> None:
    md5s = _file_md5s(target)  # before the temporary exists beside them
    with written_whole(target / INTACT_MARKER) as f:  # a name of its own: two fetches may finish at once
        f.write(json.dumps(md5s, indent=1))


def unpacked_intact(target: Path) -> bool:
    """Whether `target` holds every file of a verified extraction, each with its recorded MD5."""
    try:
        recorded = json.loads((target / INTACT_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and all(
        (target / name).is_file() and file_md5(target / name) == md5 for name, md5 in recorded.items())


# ------------------------------------------------------------------ checksums

def file_md5(path: Path) -> str:
    return file_digest(path, "md5")


def gunzip_md5(path: Path) -> str | None:
    """MD5 of the decompressed content of a gzip file, or None if it is not one."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return digest.hexdigest()


def checksum_ok(path: Path, remote: Remote) -> bool:
    """The file is the official one: its MD5 matches, or (gzip) the MD5 of its content does."""
    return file_md5(path) == remote.md5 or (remote.raw_md5 is not None and gunzip_md5(path) == remote.raw_md5)


# ------------------------------------------------------------------ download

def download(urls: tuple[str, ...] | list[str], dest: Path, remote: Remote, *, progress: bool = True,
             by_hand: Path | None = None) -> Path:
    """Fetch `remote` from the first of `urls` that delivers it with the right checksum, to `dest`; where
    none does, the error says to put the file at `by_hand` (default `dest`)."""
    _remove_abandoned_parts(Path(dest))
    problems = []
    for url in urls:
        try:
            return _download(url, Path(dest), remote, progress)
        except FetchError as e:
            problems.append(str(e))
        except urllib.error.HTTPError as e:
            problems.append(f"{url}: HTTP {e.code} {e.reason}")
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
            problems.append(f"{url}: {getattr(e, 'reason', None) or e}")
    raise FetchError(f"could not download {remote.filename}:\n" + "\n".join(f"  {p}" for p in problems)
                     + f"\nCheck the connection, or put the file there by hand: {by_hand or dest} (md5 {remote.md5}).")


def _abandoned(path: Path) -> bool:
    """Whether a killed fetch left `path` (a SIGKILL skips its cleanup): nothing was written to it, or in it,
    for ABANDONED_S. What another process is downloading or unpacking now is written more often."""
    try:
        written = max(p.stat().st_mtime for p in (path, *path.rglob("*")))
    except OSError:
        return False  # gone already, or not ours to read
    return time.time() - written > ABANDONED_S


def _remove_abandoned_parts(dest: Path) -> None:
    for part in dest.parent.glob(f".{dest.name}.*.part"):
        if _abandoned(part):
            part.unlink(missing_ok=True)


def _download(url: str, dest: Path, remote: Remote, progress: bool) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temporary_beside(dest, ".part")
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not progress) as bar:
                received = 0
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                    received += len(chunk)
        if total is not None and received < total:
            raise FetchError(f"{url}: the connection ended after {received:,} of {total:,} bytes; the partial "
                             "download was deleted: run the command again")
        got = digest.hexdigest()
        if got != remote.md5 and not (remote.raw_md5 and gunzip_md5(Path(tmp)) == remote.raw_md5):
            also = f" (or content md5 {remote.raw_md5})" if remote.raw_md5 else ""
            raise FetchError(f"{url}: checksum mismatch: expected md5 {remote.md5}{also}, got {got}; "
                             "the download was deleted")
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


# ------------------------------------------------------------------ safe extraction

def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def _check_name(name: str, root: str, archive: Path) -> None:
    if os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise FetchError(f"refusing to unpack {archive.name}: member {name!r} has an absolute path")
    if not _inside(root, os.path.join(root, name)):
        raise FetchError(f"refusing to unpack {archive.name}: member {name!r} would land outside the target folder")
    if ".." in name.replace("\\", "/").split("/"):  # even one that stays inside could overwrite a sibling
        raise FetchError(f"refusing to unpack {archive.name}: member {name!r} contains '..'")


def _through_link(path: str, links: set[str]) -> bool:
    """Whether `path` (not normalized) passes through one of the archive's symlinks on its way."""
    parts = path.split("/")[:-1]
    return any(os.path.normpath("/".join(parts[:i])) in links for i in range(1, len(parts) + 1))


def _checked_tar_members(tar: tarfile.TarFile, root: str, archive: Path) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    links: set[str] = set()
    for m in members:
        _check_name(m.name, root, archive)
        if _through_link(m.name, links):
            raise FetchError(f"refusing to unpack {archive.name}: member {m.name!r} lies behind a link")
        if m.issym() or m.islnk():
            # a symlink's target is relative to its folder, a hard link's to the archive root
            target = os.path.join(os.path.dirname(m.name) if m.issym() else "", m.linkname)
            if (os.path.isabs(m.linkname) or not _inside(root, os.path.join(root, target))
                    or _through_link(target + "/", links)):
                raise FetchError(f"refusing to unpack {archive.name}: link {m.name!r} -> {m.linkname!r} "
                                 "points outside the target folder")
            if m.issym():
                links.add(os.path.normpath(m.name))
        elif not (m.isfile() or m.isdir()):
            raise FetchError(f"refusing to unpack {archive.name}: {m.name!r} is a device or fifo")
    return members


def _unpack(archive: Path, into: str) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for item in zf.infolist():
                _check_name(item.filename, into, archive)
                if stat.S_ISLNK(item.external_attr >> 16):
                    raise FetchError(f"refusing to unpack {archive.name}: {item.filename!r} is a link")
            zf.extractall(into)
        return
    with tarfile.open(archive) as tar:
        members = _checked_tar_members(tar, into, archive)
        # Python's own "data" filter (3.10.12+/3.11.4+) re-checks every member as it is written.
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(into, members=members, **kwargs)


def _merge(src: Path, dst: Path) -> None:
    """Move the tree `src` into `dst`, replacing files of the same name and keeping the others."""
    for entry in os.scandir(src):
        target = dst / entry.name
        if entry.is_dir(follow_symlinks=False) and target.is_dir():
            _merge(Path(entry.path), target)
        else:
            os.replace(entry.path, target)


UNPACK_PREFIX = ".randteach-unpack-"


def _remove_abandoned_unpacks(dest: Path) -> None:
    for folder in dest.glob(UNPACK_PREFIX + "*"):
        if _abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)


def extract_archive(archive: Path, dest: Path) -> None:
    """Unpack a .tar(.gz) or .zip into `dest`, refusing it whole if any member would escape `dest`."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_unpacks(dest)
    tmp = tempfile.mkdtemp(dir=dest, prefix=UNPACK_PREFIX)
    try:
        _unpack(Path(archive), os.path.realpath(tmp))
        _merge(Path(tmp), dest)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise FetchError(f"cannot unpack {Path(archive).name}: {e}; delete it and fetch again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
