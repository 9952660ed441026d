"""Download the CIFAR-10 / CIFAR-100 python archives and extract them where ``--data cifar10:DIR`` reads.

``download(ARCHIVES["cifar10"], "data/")`` leaves ``data/cifar-10-batches-py/`` (the layout
`deepreduce.data` loads), then removes the archive. The steps, each safe to interrupt:

* fetch into ``DIR/<archive>.part`` (http://, https:// or file://, through urllib), with a progress bar;
  a dropped connection is resumed with an HTTP ``Range`` request (within the call while bytes keep
  coming, and by the next call from the same ``.part``); a server that ignores ``Range`` starts over;
* check the size and MD5 (also for a ``url`` override: a mirror or a local copy); a mismatch deletes
  the file;
* extract into a temporary folder inside DIR, refusing members with absolute paths, ``..``, links or
  devices, or outside the dataset's folder, then rename the folder into place.

A dataset already in place is left alone. Torch-free (standard library + tqdm).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from .errors import UserError

CHUNK = 1 << 16
TIMEOUT_S = 60.0   # per socket operation
REQUESTS = 100     # at most per call; each one after a dropped connection resumes from the .part file
STALLS = 5         # requests in a row that bring no byte: give up (the .part file is kept for the next call)
USER_AGENT = "deepreduce-data-download/1 (python-urllib)"
SCHEMES = ("http", "https", "file")
EXTRACT_PREFIX = ".deepreduce-extract-"
_sleep = time.sleep  # the back-off after a request that brought nothing (tests replace it)


@dataclass(frozen=True)
class Archive:
    """One downloadable dataset archive."""
    name: str                # "cifar10": the KIND of --data KIND:DIR
    url: str                 # the official location
    md5: str                 # of the whole archive
    size: int | None         # in bytes (None: not checked, no free-space estimate)
    folder: str              # the one top-level folder of the archive, e.g. "cifar-10-batches-py"
    files: tuple[str, ...]   # what a complete folder holds (checked after extraction and for "already there")

    @property
    def filename(self) -> str:
        return PurePosixPath(urllib.parse.urlsplit(self.url).path).name or f"{self.name}.tar.gz"


# The figures are torchvision's (torchvision/datasets/cifar.py: url, tgz_md5) and the official archives'.
ARCHIVES: dict[str, Archive] = {
    "cifar10": Archive("cifar10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "c58f30108f718f92721af3b95e74349a", 170498071, "cifar-10-batches-py",
                       tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")),
    "cifar100": Archive("cifar100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85", 169001437, "cifar-100-python",
                        ("train", "test", "meta")),
}


@dataclass
class DownloadResult:
    path: str            # DIR/<folder>, ready for --data <name>:DIR
    downloaded: bool     # False: it was already there and nothing was done
    resumed_from: int = 0  # bytes of an earlier .part file that were kept


def get_archive(name: str) -> Archive:
    try:
        return ARCHIVES[name]
    except KeyError:
        raise UserError(f"unknown dataset {name!r}: choose one of {', '.join(ARCHIVES)}") from None


def download(archive: Archive, dest: str | os.PathLike, url: str | None = None, progress: bool = True,
             echo: Callable[[str], None] | None = None) -> DownloadResult:
    """Make ``dest/archive.folder`` hold the extracted archive (see the module docstring).

    `url` overrides `archive.url` (a mirror, a local ``file://`` copy or a plain path); the checksum
    still applies. `echo` receives progress messages (None: silent). Raises UserError on bad input.
    """
    say = echo or (lambda _msg: None)
    dest_dir = Path(dest)
    target = dest_dir / archive.folder
    if complete(archive, dest_dir):
        return DownloadResult(str(target), downloaded=False)
    if target.exists() or target.is_symlink():
        missing = [f for f in archive.files if not (target / f).is_file() or not (target / f).stat().st_size]
        raise UserError(f"{target} exists but is incomplete (missing or empty: {', '.join(missing)}): "
                        f"remove it and run the command again")
    source = _source_url(url or archive.url, bool(url))
    created = [d for d in (dest_dir, *dest_dir.parents) if not d.exists()]  # the deepest first
    _prepare_dir(dest_dir)
    try:
        part = dest_dir / (archive.filename + ".part")
        _check_free_space(archive, dest_dir, part)
        resumed = _fetch(source, part, archive, progress, say)
        _verify(part, archive, source)
        if progress:
            say(f"extracting {archive.filename} into {dest_dir}")
        _extract(part, archive, dest_dir)
        part.unlink(missing_ok=True)
    except BaseException:
        for d in created:  # folders this call made and left empty go too (a kept .part stops it)
            try:
                d.rmdir()
            except OSError:
                break
        raise
    return DownloadResult(str(target), downloaded=True, resumed_from=resumed)


def complete(archive: Archive, dest: str | os.PathLike) -> bool:
    """Whether dest/archive.folder already holds every file of the dataset (non-empty)."""
    folder = Path(dest) / archive.folder
    return folder.is_dir() and all((folder / f).is_file() and (folder / f).stat().st_size > 0
                                   for f in archive.files)


# -- checks ---------------------------------------------------------------------------------------

def _source_url(url: str, overridden: bool) -> str:
    what = "--url" if overridden else "the archive URL"
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if not scheme and overridden:  # a plain local path
        if not os.path.isfile(url):
            raise UserError(f"--url {url}: no such file; pass an existing archive, or an http://, https:// or "
                            "file:// URL")
        return Path(url).resolve().as_uri()
    if scheme not in SCHEMES:
        raise UserError(f"{what} {url!r} is not an http://, https:// or file:// URL: pass e.g. "
                        "--url file:///path/to/cifar-10-python.tar.gz")
    return url


def _prepare_dir(dest: Path) -> None:
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} is not a directory: pass a directory to download into")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {dest} ({exc.strerror or exc}): pass a directory you can write to") from None
    if not os.access(dest, os.W_OK | os.X_OK):
        raise UserError(f"{dest} is not writable: pass a directory you can write to")


def _check_free_space(archive: Archive, dest: Path, part: Path) -> None:
    if archive.size is None:
        return
    have = part.stat().st_size if part.is_file() else 0
    need = max(0, archive.size - have) + int(archive.size * 1.15)  # the rest of the archive + its contents
    free = shutil.disk_usage(dest).free
    if free < need:
        raise UserError(f"not enough free space in {dest}: {archive.name} needs about {need / 1e6:.0f} MB, "
                        f"{free / 1e6:.0f} MB are free; free some space or pass another directory")


def _verify(part: Path, archive: Archive, source: str) -> None:
    md5 = hashlib.md5(usedforsecurity=False)
    with open(part, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
    if md5.hexdigest() != archive.md5.lower():
        part.unlink(missing_ok=True)
        raise UserError(f"checksum mismatch for {archive.filename} from {source}: MD5 {md5.hexdigest()}, expected "
                        f"{archive.md5} (a corrupt download or not the {archive.name} archive); the file was "
                        f"deleted: run the command again, or pass --url with the official archive")


# -- fetch ------------------------------------------------------------------------------------------

def _fetch(url: str, part: Path, archive: Archive, progress: bool, say: Callable[[str], None]) -> int:
    """Fill `part` with the whole archive; returns the bytes of an earlier .part that were kept."""
    size = archive.size
    kept, stalls = None, 0
    for attempt in range(REQUESTS):
        have = part.stat().st_size if part.is_file() else 0
        if size is not None and have > size:
            part.unlink()
            have = 0
        if size is not None and have == size:
            return have if kept is None else kept  # complete: the checksum decides
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # the range makes no sense to the server: start over
                say(f"the server refused to resume {part.name}: starting over")
                part.unlink()
                continue
            raise UserError(f"cannot download {url}: HTTP {exc.code} {exc.reason}; check the URL, or pass "
                            "--url with a mirror or a local copy (file:///path/to/archive)") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            if url.lower().startswith("file:"):
                raise UserError(f"cannot read {url} ({reason}): pass --url with an existing local copy of "
                                f"{archive.filename}") from None
            raise UserError(f"cannot reach {url} ({reason}): check the network connection, or pass --url "
                            "with a mirror or a local copy (file:///path/to/archive)") from None
        with response:
            first = _range_start(response)
            if first is not None and first != have:  # a partial answer to another question: ask afresh
                say(f"the server sent an unexpected range for {part.name}: starting over")
                part.unlink(missing_ok=True)
                continue
            start = have if first is not None else 0
            if have and not start:
                say(f"the server does not resume downloads: downloading {part.name} from the start")
            elif start and attempt == 0:
                say(f"resuming {part.name} at {start / 1e6:.1f} MB")
            if kept is None:
                kept = start
            length = response.headers.get("Content-Length")
            end = start + int(length) if length and length.isdigit() else None
            got, dropped = _copy(response, part, start, size, end, progress, archive.filename)
        if size is not None and got > size:
            part.unlink(missing_ok=True)
            raise UserError(f"{url} sent more than the {size} bytes of the {archive.name} archive: it is not "
                            f"that archive; check --url")
        if dropped is None and got >= (end if end is not None else size or 0):  # the response ended cleanly
            if size is not None and got != size:
                part.unlink(missing_ok=True)
                raise UserError(f"{url} sent {got} bytes but the {archive.name} archive has {size}: "
                                "a truncated or wrong file (or an error page); check --url")
            return kept
        say(f"connection lost at {got / 1e6:.1f} of {(size or end or 0) / 1e6:.1f} MB"
            f"{f' ({dropped})' if dropped else ''}: resuming")
        stalls = stalls + 1 if got <= start else 0
        if stalls >= STALLS:
            break
        if stalls:  # no progress at all: wait a little before the next try
            _sleep(min(2 ** stalls, 10))
    raise UserError(f"the download from {url} kept breaking off ({attempt + 1} requests); {part} holds what "
                    "arrived: run the command again to resume")


def _range_start(response) -> int | None:
    """The first byte of a 206 response's Content-Range (None: not a partial response)."""
    if getattr(response, "status", None) != 206:
        return None
    match = re.match(r"\s*bytes[ =](\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else -1


def _copy(response, part: Path, start: int, size: int | None, end: int | None, progress: bool,
          desc: str) -> tuple[int, str | None]:
    """Append the body to `part` (truncated to `start` bytes first) -> (bytes in part, why it broke off)."""
    limit = size if size is not None else end
    got, dropped = start, None
    try:
        f = open(part, "r+b" if start else "wb")
    except OSError as exc:
        raise UserError(f"cannot write {part} ({exc.strerror or exc}): pass a directory you can write to") from None
    with f, tqdm(total=size or end, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                 disable=not progress, mininterval=0.5, leave=False) as bar:
        f.truncate(start)
        f.seek(start)
        while True:
            try:
                chunk = response.read(CHUNK)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                dropped = type(exc).__name__
                break
            if not chunk:
                break
            try:
                f.write(chunk)
            except OSError as exc:
                raise UserError(f"cannot write {part} ({exc.strerror or exc}): free some space or pass another "
                                "directory") from None
            got += len(chunk)
            bar.update(len(chunk))
            if limit is not None and got > limit:
                break
    return got, dropped


# -- extract ----------------------------------------------------------------------------------------

def _extract(path: Path, archive: Archive, dest: Path) -> None:
    """Extract into a temporary folder in `dest` and rename `archive.folder` into place."""
    tmp = Path(tempfile.mkdtemp(prefix=EXTRACT_PREFIX, dir=dest))
    try:
        try:
            with tarfile.open(path, "r|*") as tar:  # one pass; a refused member stops it (tmp is removed)
                for member in tar:
                    if _checked(member, archive):
                        tar.extract(member, tmp, filter="data")
        except UserError:
            path.unlink(missing_ok=True)
            raise
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            path.unlink(missing_ok=True)
            raise UserError(f"{archive.filename} is not a readable tar.gz archive ({exc}): the file was deleted; "
                            "run the command again, or check --url") from None
        except OSError as exc:
            raise UserError(f"cannot extract into {dest} ({exc.strerror or exc}): free some space or pass "
                            "another directory; the verified archive is kept, run the command again") from None
        if not complete(archive, tmp):
            path.unlink(missing_ok=True)
            missing = [f for f in archive.files if not (tmp / archive.folder / f).is_file()]
            raise UserError(f"{archive.filename} lacks {archive.folder}/{', '.join(missing)}: it is not the "
                            f"{archive.name} archive; the file was deleted: check --url")
        try:
            os.rename(tmp / archive.folder, dest / archive.folder)
        except OSError as exc:
            raise UserError(f"cannot move the extracted {archive.folder} into {dest} ({exc.strerror or exc}): "
                            f"remove {dest / archive.folder} and run the command again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checked(member: tarfile.TarInfo, archive: Archive) -> bool:
    """True for a member to extract; raises UserError for one that could write outside the folder."""
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    drive = len(name) > 1 and name[0].isalpha() and name[1] == ":"
    if name.startswith(("/", "\\")) or drive or ".." in parts:
        raise UserError(f"{archive.filename} holds an unsafe member {name!r} (an absolute path or '..'): refused, "
                        "the file was deleted; check --url")
    if not (member.isfile() or member.isdir()):
        raise UserError(f"{archive.filename} holds {name!r}, a link or special file: refused, the file was deleted; "
                        "check --url")
    parts = tuple(p for p in parts if p != ".")
    if not parts:  # "." itself
        return False
    if parts[0] != archive.folder:
        raise UserError(f"{archive.filename} holds {name!r}, outside {archive.folder}/: it is not the {archive.name} "
                        "archive; the file was deleted: check --url")
    return True
