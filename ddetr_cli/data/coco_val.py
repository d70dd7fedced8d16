"""COCO val2017 for ``ddetr eval coco``: use a folder the user has, or download it once.

The cache is ``$DDETR_HOME/datasets/coco`` laid out as the official archives unpack::

    val2017/000000000139.jpg ...
    annotations/instances_val2017.json

Downloads resume from a ``.part`` file with an HTTP Range request, are checked against the
known sizes and MD5 sums, and are unpacked only once they verify. ``DDETR_COCO_URL`` replaces
the server (``http://images.cocodataset.org``), e.g. for a mirror or for tests.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ddetr_cli.files import home

DEFAULT_URL = "http://images.cocodataset.org"
ANNOTATIONS = "annotations/instances_val2017.json"
IMAGES = "val2017"

Progress = Callable[[str, int, "int | None"], None]  # (file name, bytes done, bytes total)


@dataclass(frozen=True)
class RemoteFile:
    """One archive on the COCO server. ``extract``: member prefixes to unpack (others skipped)."""

    name: str
    path: str
    size: int | None
    md5: str | None
    extract: tuple[str, ...]


VAL2017: tuple[RemoteFile, ...] = (
    RemoteFile("val2017.zip", "zips/val2017.zip", 815_585_330, "442b8da7639aecaf257c1dceb8ba8c80", (IMAGES + "/",)),
    # the archive also holds train annotations, captions and keypoints: only the one file is kept
    RemoteFile("annotations_trainval2017.zip", "annotations/annotations_trainval2017.zip", 252_907_541,
               "f4bbac642086de4f52a3fdda2de5fa2c", (ANNOTATIONS,)),
)

HOW_TO = ("To evaluate offline, download val2017.zip and annotations_trainval2017.zip from https://cocodataset.org/#download, "
          "unzip both into one folder and pass it with --data FOLDER (it needs val2017/ and "
          f"{ANNOTATIONS})")


class CocoUnavailable(RuntimeError):
    """COCO cannot be found or fetched; the message is one line saying how to provide it."""


class DownloadError(CocoUnavailable):
    """A download that failed part-way or did not verify; the message says what to do next.

    ``resumable``: the partial file was kept and another try continues where this one stopped.
    """

    def __init__(self, message: str, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


def base_url() -> str:
    return os.environ.get("DDETR_COCO_URL", "").strip().rstrip("/") or DEFAULT_URL


def cache_dir() -> Path:
    return home() / "datasets" / "coco"


def missing_parts(root: Path) -> list[str]:
    """What a COCO val2017 folder lacks ([] when it is usable)."""
    root = Path(root)
    missing = []
    if not (root / IMAGES).is_dir():
        missing.append(f"{IMAGES}/")
    if not (root / ANNOTATIONS).is_file():
        missing.append(ANNOTATIONS)
    return missing


def check_folder(root: Path) -> Path:
    """``root`` if it holds val2017/ and the annotations; CocoUnavailable naming what is missing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise CocoUnavailable(f"--data {root}: no such folder; it should hold {IMAGES}/ and {ANNOTATIONS}")
    missing = missing_parts(root)
    if missing:
        raise CocoUnavailable(f"--data {root} is not a COCO val2017 folder: missing {' and '.join(missing)}")
    return root


def _md5(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(url: str, dest: Path, *, size: int | None = None, md5: str | None = None,
             progress: Progress | None = None, timeout: float = 30.0, chunk: int = 1 << 16) -> Path:
    """Fetch ``url`` into ``dest`` through ``dest.part``, resuming a previous partial download.

    The finished file must have ``size`` bytes (or the server's length when size is None) and,
    when given, the MD5 ``md5``; a mismatching file is deleted. Raises CocoUnavailable when the
    server cannot be reached, DownloadError when the transfer breaks or does not verify (the
    partial file is kept, so running again resumes).
    """
    dest = Path(dest)
    if dest.is_file() and (size is None or dest.stat().st_size == size):
        return dest  # verified before it was renamed into place
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    total = size
    if size is None or have < size:
        headers = {"User-Agent": "ddetr"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            if not (e.code == 416 and have):  # 416 with a partial file: it is already whole
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CocoUnavailable(f"cannot reach {url} ({_why(reason)})") from None
        else:
            with resp:
                length = resp.headers.get("Content-Length")
                length = int(length) if length and length.isdigit() else None
                if resp.status == 206 and _range_start(resp.headers.get("Content-Range")) == have:
                    mode = "ab"
                else:  # the server ignored the Range header: start over
                    mode, have = "wb", 0
                if length is not None:
                    if size is not None and have + length != size:
                        raise DownloadError(f"{url}: the server sends {have + length} bytes, expected {size}; "
                                            "is DDETR_COCO_URL pointing at the right files?")
                    total = have + length
                done = have
                if progress:
                    progress(dest.name, done, total)
                try:
                    with open(part, mode) as f:
                        while block := resp.read(chunk):
                            f.write(block)
                            done += len(block)
                            if progress:
                                progress(dest.name, done, total)
                except (OSError, http.client.HTTPException) as e:
                    raise DownloadError(f"download of {dest.name} broke off at {done} of {total or '?'} bytes "
                                        f"({_why(e)}); run the command again to resume", resumable=True) from None
    got = part.stat().st_size if part.is_file() else 0
    if total is not None and got != total:
        raise DownloadError(f"download of {dest.name} stopped at {got} of {total} bytes; run the command again "
                            "to resume", resumable=True)
    if md5 is not None:
        digest = _md5(part)
        if digest != md5.lower():
            part.unlink()
            raise DownloadError(f"{dest.name} failed its checksum (md5 {digest}, expected {md5}); the file was "
                                "deleted, run the command again to download it afresh")
    os.replace(part, dest)
    return dest


def _range_start(content_range: str | None) -> int | None:
    # "bytes 100-199/200" -> 100
    try:
        return int(content_range.split()[1].split("-")[0])  # type: ignore[union-attr]
    except (AttributeError, IndexError, ValueError):
        return None


def _why(e: object) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, socket.gaierror):
        return "no network or unknown host"
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def extract(archive: Path, dest: Path, prefixes: Sequence[str]) -> None:
    """Unpack the members of ``archive`` under ``prefixes`` into ``dest``, all or nothing.

    Members go to a temporary folder first and are moved into place only when every one has
    been read (a damaged archive leaves nothing half-unpacked); paths leaving ``dest`` are refused.
    """
    tmp = dest / f".unpack-{archive.stem}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if any(n == p or n.startswith(p) for p in prefixes)]
            for n in names:
                if n.startswith("/") or ".." in Path(n).parts:
                    raise DownloadError(f"{archive.name}: unsafe path {n!r} in the archive")
            if not names:
                raise DownloadError(f"{archive.name} holds none of {', '.join(prefixes)}; delete it and run again")
            for n in names:
                zf.extract(n, tmp)
    except zipfile.BadZipFile as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DownloadError(f"{archive.name} is not a readable zip ({e}); delete it and run again") from None
    for p in prefixes:
        src = tmp / p.rstrip("/")
        if src.exists():
            target = dest / p.rstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(src, target)
    shutil.rmtree(tmp, ignore_errors=True)


def ensure_val2017(data: Path | None = None, *, cache: Path | None = None, files: Sequence[RemoteFile] | None = None,
                   url: str | None = None, progress: Progress | None = None, retries: int = 3,
                   keep_archives: bool = False) -> Path:
    """A folder with val2017/ and annotations/instances_val2017.json.

    ``data`` given: it is checked and returned. Otherwise the cache is used, downloading what
    is missing from ``url`` (default ``DDETR_COCO_URL`` or the COCO server); a broken transfer
    is resumed up to ``retries`` times. ``files`` defaults to ``VAL2017`` (the official archives).
    Raises CocoUnavailable with one line on failure.
    """
    if data is not None:
        return check_folder(data)
    root = Path(cache) if cache is not None else cache_dir()
    if not missing_parts(root):
        return root
    base = (url or base_url()).rstrip("/")
    todo = [f for f in (VAL2017 if files is None else files) if not _unpacked(root, f)]
    _check_space(root, todo)
    for f in todo:
        archive = root / f.name
        for attempt in range(retries + 1):
            try:
                download(f"{base}/{f.path}", archive, size=f.size, md5=f.md5, progress=progress)
                break
            except DownloadError as e:
                if attempt == retries or not e.resumable:
                    raise
            except CocoUnavailable as e:
                raise CocoUnavailable(f"COCO val2017 is not in {root} and {e}. {HOW_TO}") from None
        extract(archive, root, f.extract)
        if not keep_archives:
            archive.unlink()
    missing = missing_parts(root)
    if missing:
        raise CocoUnavailable(f"{root}: the downloaded archives did not provide {' and '.join(missing)}")
    return root


def _unpacked(root: Path, f: RemoteFile) -> bool:
    return all((root / p.rstrip("/")).exists() for p in f.extract)


def _check_space(root: Path, todo: Sequence[RemoteFile]) -> None:
    # archive plus its unpacked copy; partial downloads already on disk count as done
    need = 0
    for f in todo:
        if f.size is None:
            continue
        part = root / (f.name + ".part")
        have = part.stat().st_size if part.is_file() else 0
        need += 2 * f.size - have
    if not need:
        return
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < need:
        raise CocoUnavailable(f"{root}: {free / 1e9:.1f} GB free, COCO val2017 needs about {need / 1e9:.1f} GB; "
                              f"set DDETR_HOME to a larger disk. {HOW_TO}")
