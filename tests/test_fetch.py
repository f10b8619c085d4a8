"""The fetcher against a real HTTP server on 127.0.0.1: checksums, atomic downloads, safe unpacking."""
import dataclasses
import hashlib
import io
import os
import shutil
import tarfile
import threading
import time
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from randteach.data import DATASETS, FetchError, extract_archive, fetch, load_dataset
from randteach.data.fetcher import ABANDONED_S, checksum_ok, download
from randteach.data.registry import DEBIAN_FASHION_MNIST, Remote
from randteach.files import FILE_MODE

SERVER_LIFETIME_S = 60  # the server stops itself after this, whatever happens to the test


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if not self.path.endswith("/truncated.bin"):
            return super().do_GET()
        self.send_response(200)  # declares 1,000 bytes, sends 10, closes: a dropped connection
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 10)
        self.close_connection = True


@pytest.fixture
def server(tmp_path):
    """(base URL, folder it serves)."""
    served = tmp_path / "served"
    served.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    deadline = threading.Timer(SERVER_LIFETIME_S, httpd.shutdown)
    deadline.daemon = True
    deadline.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    deadline.cancel()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def use_archive(monkeypatch, name: str, archive: Path) -> None:
    """Point data set `name` at a test archive of ours (same file name, its own checksum)."""
    info = DATASETS[name]
    remote = dataclasses.replace(info.remote[0], md5=md5(archive))
    monkeypatch.setitem(DATASETS, name, dataclasses.replace(info, remote=(remote,)))


# ------------------------------------------------------------------ downloads

@pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST).is_dir(), reason="needs the Debian Fashion-MNIST files")
def test_fetch_fashion_mnist_from_local_mirror(server, tmp_path):
    url, served = server
    for remote in DATASETS["fashion-mnist"].remote:
        os.symlink(Path(DEBIAN_FASHION_MNIST) / remote.filename, served / remote.filename)
    root = tmp_path / "root"
    folder = fetch("fashion-mnist", str(root), base_url=url, progress=False)
    assert folder == root / "fashion-mnist"
    assert all_files(folder) == sorted(r.filename for r in DATASETS["fashion-mnist"].remote)
    # Debian re-compressed the files: the archive md5 differs, the content md5 matches
    assert all(checksum_ok(folder / r.filename, r) for r in DATASETS["fashion-mnist"].remote)
    # readable as a plain new file would be (a shared data root), not mkstemp's owner-only 0600
    assert {(folder / r.filename).stat().st_mode & 0o777 for r in DATASETS["fashion-mnist"].remote} == {FILE_MODE}
    shutil.rmtree(served)  # a second fetch finds the files in place and downloads nothing
    assert fetch("fashion-mnist", str(root), base_url=url, progress=False) == folder
    assert len(load_dataset("fashion-mnist", "test", root=str(root))) == 10000


def test_good_archive_is_fetched_verified_and_unpacked(server, tmp_path, monkeypatch, write_cifar10):
    url, served = server
    written = write_cifar10(tmp_path / "build" / "cifar-10-batches-py")
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    use_archive(monkeypatch, "cifar10", archive)
    root = tmp_path / "root"
    assert fetch("cifar10", str(root), base_url=url, progress=False) == root / "cifar-10-batches-py"
    assert all_files(root)[0] == "cifar-10-batches-py" and not (root / "cifar-10-python.tar.gz").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary files left
    data = load_dataset("cifar10", "test", root=str(root))
    assert data.labels.tolist() == written["test"][1].tolist()


def test_wrong_checksum_is_refused_and_leaves_nothing(server, tmp_path):
    url, served = server
    (served / "cifar-10-python.tar.gz").write_bytes(b"not the CIFAR-10 archive" * 1000)
    root = tmp_path / "root"
    with pytest.raises(FetchError) as e:
        fetch("cifar10", str(root), base_url=url, progress=False)
    msg = str(e.value)
    assert "expected md5 c58f30108f718f92721af3b95e74349a" in msg
    assert f"got {md5(served / 'cifar-10-python.tar.gz')}" in msg
    assert all_files(root) == []


def test_download_tries_the_next_mirror(server, tmp_path):
    url, served = server
    (served / "f.bin").write_bytes(b"payload")
    remote = Remote("f.bin", (), hashlib.md5(b"payload").hexdigest())
    dest = tmp_path / "out" / "f.bin"
    download([f"{url}/missing/f.bin", f"{url}/f.bin"], dest, remote, progress=False)
    assert dest.read_bytes() == b"payload"
    with pytest.raises(FetchError, match="404"):
        download([f"{url}/missing/f.bin"], tmp_path / "out" / "g.bin", remote, progress=False)
    assert all_files(tmp_path / "out") == ["f.bin"]


def test_a_dropped_connection_is_named_and_abandoned_parts_are_removed(server, tmp_path):
    url, _ = server
    remote = Remote("truncated.bin", (), hashlib.md5(b"x" * 1000).hexdigest())
    out = tmp_path / "out"
    out.mkdir()
    abandoned, live = out / ".truncated.bin.killed.part", out / ".truncated.bin.other.part"
    abandoned.write_bytes(b"x" * 5)  # what a SIGKILL left an hour ago, and a download of another process
    os.utime(abandoned, (time.time() - 3600, time.time() - 3600))
    live.write_bytes(b"x" * 5)
    with pytest.raises(FetchError, match="the connection ended after 10 of 1,000 bytes"):  # "checksum mismatch"
        download([f"{url}/truncated.bin"], out / "truncated.bin", remote, progress=False)
    assert all_files(out) == [live.name]


def test_nothing_to_fetch(tmp_path):
    with pytest.raises(FetchError, match="github.com/preetum/cifar5m"):
        fetch("cifar5m", str(tmp_path))
    with pytest.raises(FetchError, match="scikit-learn"):
        fetch("digits", str(tmp_path))


# ------------------------------------------------------------------ unsafe archives

def add_bytes(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_link(tar: tarfile.TarFile, name: str, target: str, kind=tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tar.addfile(info)


class _Formatting:
    """Passes add calls to a tar, substituting {outside} in member and link names."""

    def __init__(self, tar, outside):
        self.tar, self.outside = tar, outside

    def addfile(self, info, fileobj=None):
        info.name = info.name.format(outside=self.outside)
        info.linkname = info.linkname.format(outside=self.outside)
        self.tar.addfile(info, fileobj)


EVIL_TARS = {  # each adds one member that must not be unpacked
    "dotdot": lambda tar: add_bytes(tar, "data/../../evil"),
    "absolute": lambda tar: add_bytes(tar, "{outside}/evil"),
    "symlink": lambda tar: add_link(tar, "data/link", "../../evil"),
    "absolute-symlink": lambda tar: add_link(tar, "data/link", "{outside}/evil"),
    "hardlink": lambda tar: add_link(tar, "data/hard", "../evil", tarfile.LNKTYPE),
    "through-symlink": lambda tar: (add_link(tar, "data/up", ".."), add_bytes(tar, "data/up/../evil")),
}


@pytest.mark.parametrize("kind", sorted(EVIL_TARS))
def test_unsafe_tar_is_refused(tmp_path, kind):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        add_bytes(tar, "data/good.txt", b"fine")
        EVIL_TARS[kind](_Formatting(tar, str(outside)))
    with pytest.raises(FetchError, match="refusing to unpack"):
        extract_archive(archive, target)
    assert all_files(outside) == [] and not (tmp_path / "evil").exists()
    assert all_files(target) == []  # refused whole: not even the good member was written


def test_unsafe_zip_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n0\n")
        zf.writestr("../evil.txt", "boo")
    with pytest.raises(FetchError, match="outside the target folder"):
        extract_archive(archive, tmp_path / "target")
    assert not (tmp_path / "evil.txt").exists() and all_files(tmp_path / "target") == []


def test_unsafe_archive_via_fetch_is_deleted(server, tmp_path, monkeypatch):
    url, served = server
    archive = served / "stl10_binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_bytes(tar, "stl10_binary/../../evil")
    use_archive(monkeypatch, "stl10", archive)
    root = tmp_path / "root"
    with pytest.raises(FetchError, match="refusing to unpack"):
        fetch("stl10", str(root), base_url=url, progress=False)
    assert all_files(root) == [] and not (tmp_path / "evil").exists()


def test_internal_symlink_is_allowed(tmp_path):
    archive = tmp_path / "ok.tar"
    with tarfile.open(archive, "w") as tar:
        add_bytes(tar, "data/a.txt", b"a")
        add_link(tar, "data/b.txt", "a.txt")
    extract_archive(archive, tmp_path / "target")
    assert (tmp_path / "target" / "data" / "b.txt").read_bytes() == b"a"


# ------------------------------------------------------------------ hand-placed archives, damaged copies

def _cifar_archive(tmp_path: Path, write_cifar10, folder: Path) -> Path:
    write_cifar10(tmp_path / "build" / "cifar-10-batches-py")
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_an_archive_placed_by_hand_is_verified_and_used(server, tmp_path, monkeypatch, write_cifar10):
    url, served = server  # serves nothing: a download would fail with 404
    root = tmp_path / "root"
    root.mkdir()
    archive = _cifar_archive(tmp_path, write_cifar10, root)
    use_archive(monkeypatch, "cifar10", archive)
    assert fetch("cifar10", str(root), base_url=url, progress=False) == root / "cifar-10-batches-py"
    assert archive.exists() and len(load_dataset("cifar10", "test", root=str(root))) == 4
    archive.write_bytes(b"damaged")  # a hand-placed file with the wrong checksum is not used
    shutil.rmtree(root / "cifar-10-batches-py")
    with pytest.raises(FetchError, match="404"):
        fetch("cifar10", str(root), base_url=url, progress=False)


def test_a_damaged_unpacked_copy_is_unpacked_again(server, tmp_path, monkeypatch, write_cifar10):
    url, served = server
    archive = _cifar_archive(tmp_path, write_cifar10, served)
    use_archive(monkeypatch, "cifar10", archive)
    root = tmp_path / "root"
    folder = fetch("cifar10", str(root), base_url=url, progress=False)
    good = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(good[: len(good) // 2])  # truncated, as by a full disk
    fetch("cifar10", str(root), base_url=url, progress=False)
    assert (folder / "test_batch").read_bytes() == good
    archive.unlink()  # intact now: a fetch needs nothing from the server
    assert fetch("cifar10", str(root), base_url=url, progress=False) == folder


def test_a_member_with_dotdot_inside_the_folder_is_refused(tmp_path):
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        add_bytes(tar, "cifar-10-batches-py/data_batch_1", b"fine")
        add_bytes(tar, "cifar-10-batches-py/../victim.txt", b"overwritten")
    target = tmp_path / "target"
    target.mkdir()
    (target / "victim.txt").write_text("mine")
    with pytest.raises(FetchError, match="contains '..'"):
        extract_archive(archive, target)
    assert (target / "victim.txt").read_text() == "mine"


def test_data_on_disk_outside_the_root_is_listed_and_not_fetched_again(tmp_path, monkeypatch, capsys):
    """A complete copy in a system folder (the Debian package's): `data list` shows it, `data fetch` names it
    without going to the network (there is none here: a download attempt would fail the test)."""
    from randteach.cli import main
    from randteach.data import registry
    system = tmp_path / "system"
    system.mkdir()
    info = registry.DATASETS["fashion-mnist"]
    for f in info.contents:
        (system / f).write_bytes(b"x")
    monkeypatch.setitem(registry.DATASETS, "fashion-mnist", dataclasses.replace(info, system_dirs=(str(system),)))
    monkeypatch.setenv("RANDTEACH_DATA", str(tmp_path / "root"))
    assert main(["data", "list"]) == 0
    assert f"fashion-mnist  {system}" in capsys.readouterr().out
    assert main(["data", "list", "mnist"]) == 2 and "takes no name" in capsys.readouterr().err
    assert main(["data", "fetch", "fashion-mnist"]) == 0
    assert f"ready in {system} (already on disk; nothing fetched)" in capsys.readouterr().out
    assert not (tmp_path / "root").exists()


def test_uncompressed_idx_files_in_the_root_are_the_copy_listed(tmp_path, monkeypatch, capsys):
    """The IDX reader takes `name` before `name.gz`: `data list` names the folder that loading reads."""
    import gzip

    from randteach.cli import main
    root = tmp_path / "root"
    (root / "fashion-mnist").mkdir(parents=True)
    for f in DATASETS["fashion-mnist"].contents:
        (root / "fashion-mnist" / f.removesuffix(".gz")).write_bytes(gzip.open(Path(DEBIAN_FASHION_MNIST) / f).read())
    monkeypatch.setenv("RANDTEACH_DATA", str(root))
    assert main(["data", "list"]) == 0
    assert f"fashion-mnist  {root / 'fashion-mnist'}" in capsys.readouterr().out
    assert len(load_dataset("fashion-mnist", "test")) == 10000


def test_quiet_fetch_draws_no_progress_bar(server, tmp_path, capfd):
    from randteach.cli import main
    url, served = server
    for remote in DATASETS["fashion-mnist"].remote:
        os.symlink(Path(DEBIAN_FASHION_MNIST) / remote.filename, served / remote.filename)
    args = ["data", "fetch", "fashion-mnist", "--base-url", url, "--data.root"]
    assert main(["--quiet", *args, str(tmp_path / "a")]) == 0
    quiet = capfd.readouterr()
    assert "ready in" in quiet.out and "idx3-ubyte" not in quiet.err, quiet.err
    assert main([*args, str(tmp_path / "b")]) == 0
    assert "train-images-idx3-ubyte.gz" in capfd.readouterr().err  # the bars name the files


@pytest.mark.parametrize("hand", [False, True])
def test_an_unpack_that_fails_on_the_disk_keeps_the_verified_download(server, tmp_path, monkeypatch, write_cifar10,
                                                                     hand):
    url, served = server
    archive = _cifar_archive(tmp_path, write_cifar10, served)
    use_archive(monkeypatch, "cifar10", archive)
    root = tmp_path / "root"
    root.mkdir()
    (root / "cifar-10-batches-py").write_text("a file in the way of the folder")  # an OSError, as a full disk
    kept = root / ".cifar-10-python.tar.gz.fetched"
    with pytest.raises(FetchError, match=f"The verified download stays at {kept}; .*it is unpacked without"):
        fetch("cifar10", str(root), base_url=url, progress=False)
    assert kept.is_file()
    (root / "cifar-10-batches-py").unlink()
    if hand:  # the user's own copy, placed as the download error says: used and kept
        shutil.copy(archive, root / "cifar-10-python.tar.gz")
    shutil.rmtree(served)  # the next fetch downloads nothing: it unpacks a kept archive
    assert fetch("cifar10", str(root), base_url=url, progress=False) == root / "cifar-10-batches-py"
    assert all_files(root) == sorted(["cifar-10-batches-py", *(["cifar-10-python.tar.gz"] if hand else [])]
                                     + [f"cifar-10-batches-py/{f}" for f in os.listdir(root / "cifar-10-batches-py")])
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # our download is gone either way


def test_an_unpack_folder_a_killed_fetch_left_is_removed_once_abandoned(server, tmp_path, monkeypatch, write_cifar10):
    url, served = server
    use_archive(monkeypatch, "cifar10", _cifar_archive(tmp_path, write_cifar10, served))
    root = tmp_path / "root"
    old, live = root / ".randteach-unpack-killed", root / ".randteach-unpack-live"
    for folder in (old, live):
        (folder / "cifar-10-batches-py").mkdir(parents=True)
        (folder / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half")
    long_ago = time.time() - 2 * ABANDONED_S
    for p in (old, *old.rglob("*")):
        os.utime(p, (long_ago, long_ago))
    fetch("cifar10", str(root), base_url=url, progress=False)
    assert not old.exists() and live.exists()  # another process may be unpacking into the live one


@pytest.mark.parametrize("by", ["environment", "option"])
def test_torchvisions_copy_under_the_root_is_used_not_fetched(tmp_path, monkeypatch, capsys, by):
    """`data list` names torchvision's MNIST/raw under the root, so `data fetch` must not go to the network
    (there is none here: the base URL serves nothing) and leave an empty mnist/ behind."""
    from test_data_readers import write_mnist

    from randteach.cli import main
    root = tmp_path / "root"
    write_mnist(root / "MNIST" / "raw", n_train=4, n_test=2)
    monkeypatch.setenv("RANDTEACH_DATA", str(root if by == "environment" else tmp_path / "elsewhere"))
    option = ["--data.root", str(root)] if by == "option" else []
    assert main(["data", "fetch", "mnist", "--base-url", "http://127.0.0.1:9/nothing", *option]) == 0
    assert f"mnist: ready in {root / 'MNIST' / 'raw'} (already on disk" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["MNIST"]


def test_data_list_hints_the_fetch_into_the_root_it_was_given(tmp_path, capsys):
    from randteach.cli import main
    assert main(["data", "list", "--data.root", str(tmp_path / "r")]) == 0
    assert f"`randteach data fetch cifar10 --data.root {tmp_path / 'r'}` gets it" in capsys.readouterr().out
