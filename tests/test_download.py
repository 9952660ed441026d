"""`deepreduce data download`: fetch (file:// and a local HTTP server with Range), resume, checksum,
safe extraction and the one-line errors, against a small archive in the official CIFAR-10 layout
(this machine reaches no dataset host). Every server binds 127.0.0.1 only."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import re
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from deepreduce import download as dl
from deepreduce.cli import main
from deepreduce.data import load_dataset
from deepreduce.download import ARCHIVES, Archive, download
from deepreduce.errors import UserError
from support.datasets import make_tar, write_cifar_pickle
from support.env import CIFAR10_CLASSES

pytestmark = pytest.mark.usefixtures("deepreduce_env")

FOLDER = "cifar-10-batches-py"


# -- a small archive in the official layout -------------------------------------------------------------

def write_cifar10_folder(folder: Path, per_batch: int = 40, n_test: int = 20, seed: int = 0):
    """data_batch_1..5, test_batch, batches.meta as in the python release -> (train NCHW, labels, test...)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    write_cifar_pickle(folder / "batches.meta", {b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                                                 b"num_cases_per_batch": per_batch})
    train_x, train_y = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch).tolist()
        write_cifar_pickle(folder / f"data_batch_{i}", {b"batch_label": b"training batch %d" % i, b"data": x,
                                                        b"labels": y})
        train_x.append(x)
        train_y += y
    test_x = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_y = rng.integers(0, 10, n_test).tolist()
    write_cifar_pickle(folder / "test_batch", {b"batch_label": b"testing batch 1", b"data": test_x, b"labels": test_y})
    (folder / "readme.html").write_text("<html>the release also has this</html>")
    return np.concatenate(train_x).reshape(-1, 3, 32, 32), train_y, test_x.reshape(-1, 3, 32, 32), test_y


def archive_record(tar: Path, url: str | None = None, **changes) -> Archive:
    """The cifar10 record with this file's MD5 and size (and `changes`)."""
    blob = tar.read_bytes()
    fields = {"url": url or tar.as_uri(), "md5": hashlib.md5(blob).hexdigest(), "size": len(blob), **changes}
    return dataclasses.replace(ARCHIVES["cifar10"], **fields)


@pytest.fixture
def cifar_tar(tmp_path):
    """-> (path of cifar-10-python.tar.gz, the pixels and labels written into it)."""
    truth = write_cifar10_folder(tmp_path / "src" / FOLDER)
    tar = make_tar(tmp_path / "src" / FOLDER, tmp_path / "cifar-10-python.tar.gz", arcname=FOLDER)
    return tar, truth


def assert_loads(dest: Path, truth) -> None:
    train_x, train_y, test_x, test_y = truth
    d = load_dataset(f"cifar10:{dest}", progress=False)
    assert np.array_equal(d.train.images.numpy(), train_x) and d.train.labels.tolist() == train_y
    assert np.array_equal(d.test.images.numpy(), test_x) and d.test.labels.tolist() == test_y
    assert d.classes == CIFAR10_CLASSES


def listing(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.iterdir()) if dest.exists() else []


# -- a local HTTP server with Range support ----------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    timeout = 10

    def do_GET(self):  # noqa: N802 - http.server's name
        srv = self.server
        srv.ranges.append(self.headers.get("Range"))
        if self.path != "/cifar-10-python.tar.gz":
            self.send_error(404)
            return
        data, start = srv.blob, 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not srv.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if srv.always_drop or (srv.drop_first and len(srv.ranges) == 1):  # half, then the connection goes
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server(cifar_tar):
    """A server on 127.0.0.1 serving the archive at /cifar-10-python.tar.gz; `.ranges` records the Range
    header of every request; `.drop_first`, `.always_drop`, `.ignore_range` change its behaviour."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.blob = cifar_tar[0].read_bytes()
    server.ranges, server.drop_first, server.always_drop, server.ignore_range = [], False, False, False
    server.url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


# -- the happy paths -----------------------------------------------------------------------------------------

def test_file_url(tmp_path, cifar_tar):
    tar, truth = cifar_tar
    dest = tmp_path / "data"
    result = download(archive_record(tar), dest, progress=False)
    assert result.downloaded and result.path == str(dest / FOLDER)
    assert listing(dest) == [FOLDER]  # no .part, no temporary folder
    assert tar.is_file()  # the local source is never touched
    assert_loads(dest, truth)


def test_http_and_second_call_is_a_noop(tmp_path, cifar_tar, http_server):
    tar, truth = cifar_tar
    dest = tmp_path / "data"
    archive = archive_record(tar, url=http_server.url)
    messages = []
    assert download(archive, dest, progress=True, echo=messages.append).downloaded  # with the progress bar
    assert http_server.ranges == [None]
    assert_loads(dest, truth)
    before = {p.name: p.stat().st_mtime_ns for p in (dest / FOLDER).iterdir()}
    result = download(archive, dest, progress=False)
    assert not result.downloaded and result.path == str(dest / FOLDER)
    assert http_server.ranges == [None]  # no request at all
    assert {p.name: p.stat().st_mtime_ns for p in (dest / FOLDER).iterdir()} == before


def test_url_override_keeps_the_checksum(tmp_path, cifar_tar, http_server):
    tar, truth = cifar_tar
    dest = tmp_path / "data"
    archive = archive_record(tar, url="http://127.0.0.1:9/unreachable/cifar-10-python.tar.gz")
    assert download(archive, dest, url=http_server.url, progress=False).downloaded
    assert_loads(dest, truth)
    with pytest.raises(UserError, match="checksum mismatch"):  # the override is checked like the original
        download(dataclasses.replace(archive, md5="0" * 32), tmp_path / "other", url=str(tar), progress=False)


# -- resume --------------------------------------------------------------------------------------------------

def test_dropped_connection_is_resumed_with_range(tmp_path, cifar_tar, http_server):
    tar, truth = cifar_tar
    http_server.drop_first = True
    dest = tmp_path / "data"
    messages = []
    result = download(archive_record(tar, url=http_server.url), dest, progress=False, echo=messages.append)
    half = len(http_server.blob) // 2
    assert http_server.ranges == [None, f"bytes={half}-"]  # the second request continues at the bytes written
    assert result.downloaded and any("connection lost" in m for m in messages)
    assert listing(dest) == [FOLDER]
    assert_loads(dest, truth)


def test_part_file_from_an_earlier_run_is_resumed(tmp_path, cifar_tar, http_server):
    tar, truth = cifar_tar
    dest = tmp_path / "data"
    dest.mkdir()
    kept = len(http_server.blob) // 3
    (dest / "cifar-10-python.tar.gz.part").write_bytes(http_server.blob[:kept])
    result = download(archive_record(tar, url=http_server.url), dest, progress=False)
    assert http_server.ranges == [f"bytes={kept}-"]
    assert result.resumed_from == kept
    assert listing(dest) == [FOLDER]
    assert_loads(dest, truth)


def test_a_connection_that_keeps_dropping_is_given_up_and_resumed_later(tmp_path, cifar_tar, http_server,
                                                                       monkeypatch):
    tar, truth = cifar_tar
    waits = []
    monkeypatch.setattr(dl, "_sleep", waits.append)
    http_server.always_drop = True  # half of what is left, every time: the last byte never comes
    dest = tmp_path / "data"
    archive = archive_record(tar, url=http_server.url)
    assert_refused(lambda: download(archive, dest, progress=False), "kept breaking off .*run the command again")
    assert len(http_server.ranges) <= dl.REQUESTS and len(waits) == dl.STALLS - 1
    part = dest / "cifar-10-python.tar.gz.part"
    assert listing(dest) == [part.name] and part.read_bytes() == http_server.blob[:part.stat().st_size]
    kept = part.stat().st_size
    assert 0 < kept < len(http_server.blob)
    http_server.always_drop, http_server.ranges = False, []
    assert download(archive, dest, progress=False).resumed_from == kept  # the next call finishes it
    assert http_server.ranges == [f"bytes={kept}-"]
    assert_loads(dest, truth)


def test_server_ignoring_range_starts_over(tmp_path, cifar_tar, http_server):
    tar, truth = cifar_tar
    http_server.ignore_range = True
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "cifar-10-python.tar.gz.part").write_bytes(b"\xff" * 1000)  # wrong bytes: must not survive
    result = download(archive_record(tar, url=http_server.url), dest, progress=False)
    assert http_server.ranges == ["bytes=1000-"] and result.resumed_from == 0
    assert_loads(dest, truth)


def test_file_url_with_a_part_file_starts_over(tmp_path, cifar_tar):
    tar, truth = cifar_tar
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "cifar-10-python.tar.gz.part").write_bytes(b"\x00" * 100)
    assert download(archive_record(tar), dest, progress=False).resumed_from == 0  # file:// ignores Range
    assert_loads(dest, truth)


# -- refused ---------------------------------------------------------------------------------------------------

def assert_refused(call, match: str) -> str:
    with pytest.raises(UserError, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_checksum_mismatch_leaves_nothing(tmp_path, cifar_tar, http_server):
    tar, _ = cifar_tar
    dest = tmp_path / "data"
    for url in (tar.as_uri(), http_server.url):
        message = assert_refused(lambda: download(archive_record(tar, url=url, md5="0" * 32), dest, progress=False),
                                 "checksum mismatch")
        assert "0" * 32 in message and "deleted" in message
        assert not dest.exists()  # no archive, no .part, no extracted folder, not even the folder it made


def test_truncated_archive(tmp_path, cifar_tar):
    tar, _ = cifar_tar
    short = tmp_path / "short.tar.gz"
    short.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    dest = tmp_path / "data"
    # the size is known: the short file is refused before the checksum
    message = assert_refused(lambda: download(archive_record(tar), dest, url=short.as_uri(), progress=False),
                             "truncated or wrong file")
    assert str(tar.stat().st_size) in message and listing(dest) == []
    # a record whose checksum matches the truncated file: the archive itself cannot be read
    assert_refused(lambda: download(archive_record(short, size=None), dest, progress=False),
                   "not a readable tar.gz archive")
    assert listing(dest) == []


def unsafe_tar(tmp_path: Path, bad_name: str) -> Path:
    """A cifar-10 archive with one more member, `bad_name`."""
    tar = make_tar(tmp_path / "src" / FOLDER, tmp_path / "cifar-10-python.tar.gz", arcname=FOLDER)
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    with tarfile.open(tar, "w:gz") as out:
        for m, data in members:
            out.addfile(m, io.BytesIO(data) if data is not None else None)
        evil = tarfile.TarInfo(bad_name)
        evil.size = 5
        out.addfile(evil, io.BytesIO(b"evil\n"))
    return tar


@pytest.mark.parametrize("bad_name, match", [
    ("../evil", "unsafe member '../evil'"),
    (f"{FOLDER}/../../evil", "unsafe member"),
    ("/tmp/deepreduce-test-evil", "unsafe member"),
    ("evil", "outside cifar-10-batches-py/"),
])
def test_unsafe_member_is_refused(tmp_path, bad_name, match):
    write_cifar10_folder(tmp_path / "src" / FOLDER, per_batch=2, n_test=2)
    tar = unsafe_tar(tmp_path, bad_name)
    dest = tmp_path / "a" / "data"
    assert_refused(lambda: download(archive_record(tar), dest, progress=False), match)
    assert listing(dest) == []
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "evil").exists()
    assert not Path("/tmp/deepreduce-test-evil").exists()


def test_link_member_is_refused(tmp_path):
    write_cifar10_folder(tmp_path / "src" / FOLDER, per_batch=2, n_test=2)
    tar = make_tar(tmp_path / "src" / FOLDER, tmp_path / "cifar-10-python.tar.gz", arcname=FOLDER)
    with tarfile.open(tar) as src:
        members = [(m, src.extractfile(m).read() if m.isfile() else None) for m in src.getmembers()]
    with tarfile.open(tar, "w:gz") as out:
        link = tarfile.TarInfo(f"{FOLDER}/passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        out.addfile(link)
        for m, data in members:
            out.addfile(m, io.BytesIO(data) if data is not None else None)
    dest = tmp_path / "data"
    assert_refused(lambda: download(archive_record(tar), dest, progress=False), "a link or special file")
    assert listing(dest) == []


def test_unreachable_and_missing(tmp_path, cifar_tar, http_server):
    tar, _ = cifar_tar
    dest = tmp_path / "data"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/cifar-10-python.tar.gz"
    assert "--url" in assert_refused(lambda: download(archive_record(tar), dest, url=closed, progress=False),
                                     "cannot reach")
    assert_refused(lambda: download(archive_record(tar), dest, url=http_server.url + ".missing", progress=False),
                   "HTTP 404")
    assert_refused(lambda: download(archive_record(tar), dest, url=(tmp_path / "nope.tar.gz").as_uri(),
                                    progress=False), "cannot read .*existing local copy")
    assert_refused(lambda: download(archive_record(tar), dest, url="ftp://example.org/x.tar.gz", progress=False),
                   "not an http://, https:// or file:// URL")
    assert_refused(lambda: download(archive_record(tar), dest, url=str(tmp_path / "nope.tar.gz"), progress=False),
                   "no such file")
    assert not dest.exists()


def test_bad_destination(tmp_path, cifar_tar):
    tar, _ = cifar_tar
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_refused(lambda: download(archive_record(tar), blocker / "data", progress=False), "cannot create")
    assert_refused(lambda: download(archive_record(tar), blocker, progress=False), "is not a directory")
    incomplete = tmp_path / "data" / FOLDER
    incomplete.mkdir(parents=True)
    (incomplete / "data_batch_1").write_bytes(b"x")
    assert_refused(lambda: download(archive_record(tar), tmp_path / "data", progress=False),
                   "exists but is incomplete .*remove it")


def test_unknown_dataset():
    assert_refused(lambda: dl.get_archive("mnist"), "unknown dataset 'mnist': choose one of cifar10, cifar100")


def test_official_records():
    ten, hundred = ARCHIVES["cifar10"], ARCHIVES["cifar100"]
    assert (ten.filename, ten.md5, ten.size) == ("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                                                 170498071)
    assert (hundred.filename, hundred.md5, hundred.size) == ("cifar-100-python.tar.gz",
                                                             "eb9058c3a382ffc7106e4002c42a8d85", 169001437)
    assert (ten.folder, hundred.folder) == ("cifar-10-batches-py", "cifar-100-python")


# -- the command line ------------------------------------------------------------------------------------------

def test_cli(tmp_path, cifar_tar, capsys, monkeypatch):
    tar, truth = cifar_tar
    dest = tmp_path / "data"
    monkeypatch.setitem(ARCHIVES, "cifar10", archive_record(tar))
    assert main(["data", "download", "cifar10", str(dest), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"cifar10 downloaded to {dest / FOLDER}" in out and f"--data cifar10:{dest}" in out
    assert_loads(dest, truth)
    assert main(["data", "download", "cifar10", str(dest), "--no-progress"]) == 0
    assert "already in" in capsys.readouterr().out

    def one_error_line(argv: list[str]) -> str:
        assert main(argv) == 2
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err
        return lines[0]

    monkeypatch.setitem(ARCHIVES, "cifar10", archive_record(tar, md5="f" * 32))
    line = one_error_line(["data", "download", "cifar10", str(tmp_path / "bad"), "--url", tar.as_uri(),
                           "--no-progress"])
    assert "checksum mismatch" in line and not (tmp_path / "bad").exists()
    short = tmp_path / "short.tar.gz"
    short.write_bytes(tar.read_bytes()[:1000])
    monkeypatch.setitem(ARCHIVES, "cifar10", archive_record(tar))
    line = one_error_line(["data", "download", "cifar10", str(tmp_path / "bad"), "--url", str(short), "--no-progress"])
    assert "truncated or wrong file" in line and not (tmp_path / "bad").exists()
    write_cifar10_folder(tmp_path / "src2" / "src" / FOLDER, per_batch=2, n_test=2)
    evil = unsafe_tar(tmp_path / "src2", "../evil")
    monkeypatch.setitem(ARCHIVES, "cifar10", archive_record(evil))
    assert "unsafe member" in one_error_line(["data", "download", "cifar10", str(tmp_path / "bad"), "--no-progress"])
    assert not (tmp_path / "bad").exists() and not (tmp_path / "evil").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert "cannot create" in one_error_line(["data", "download", "cifar10", str(blocker / "d"), "--no-progress"])
    assert "unknown dataset 'mnist'" in one_error_line(["data", "download", "mnist", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()
