"""Files and folders every layer writes: the ddetr home folder, atomic writes (readers never see
half a file; an interrupted write leaves the old file), and run folders that are never reused."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def home() -> Path:
    """Where named weights, converted models and datasets are kept (``DDETR_HOME``)."""
    return Path(os.environ.get("DDETR_HOME", Path.home() / ".cache" / "ddetr"))


def _umask() -> int:
    """The process's umask, read without changing it where the system says (Linux), else by the
    usual set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder (same suffix, for writers that look at it) that
    replaces ``path`` when the block ends without an error; removed otherwise.

    The file ends with the mode a plain ``open(path, "w")`` would give it (0o666 less the umask),
    not mkstemp's private 0o600; a hard link the block put there keeps its file's own mode (a
    chmod would change the user's original)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        if os.stat(tmp).st_nlink == 1:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str | bytes) -> None:
    """Write text (UTF-8) or bytes atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)


RUN_MARKER = ".ddetr-run"  # in every run folder: which process owns it


_claimed: list[Path] = []


class RunFolderError(Exception):
    """A run folder that cannot be used (not empty, owned by another process); one line."""


def _claim(folder: Path) -> None:
    # O_EXCL: of two processes claiming one folder, exactly one succeeds
    try:
        fd = os.open(folder / RUN_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise RunFolderError(f"{folder} is in use by another ddetr run") from None
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    _claimed.append(folder)


def _owner_alive(folder: Path) -> bool:
    try:
        pid = int((folder / RUN_MARKER).read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return pid != os.getpid()


def next_run_dir(parent: Path, stem: str = "exp") -> Path:
    """parent/exp, then exp2, exp3, ... (never an existing folder); created empty and claimed."""
    parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        d = parent / (stem if n == 1 else f"{stem}{n}")
        try:
            d.mkdir()
        except FileExistsError:
            n += 1
            continue
        _claim(d)
        return d


def claim_run_dir(folder: Path, exist_ok: bool = False) -> Path:
    """Take ``folder`` (a user's ``--out``) as this process's run folder, never mixing runs: it is
    created if missing; an existing one must be empty, or with ``exist_ok`` an earlier ddetr run
    folder whose process has ended, which is cleared first. Raises RunFolderError otherwise."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        if not exist_ok:
            raise RunFolderError(f"--out {folder} is not empty (an earlier run?): choose another folder, "
                                 "or add --exist-ok to replace that run")
        if not (folder / RUN_MARKER).is_file():
            raise RunFolderError(f"--out {folder} is not empty and not a ddetr run folder: --exist-ok only "
                                 "replaces earlier runs")
        if _owner_alive(folder):
            raise RunFolderError(f"{folder} is in use by another ddetr run")
        for p in folder.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    _claim(folder)
    return folder


def drop_empty_runs() -> None:
    """Remove the run folders this process claimed that hold nothing but their marker: a command
    that failed before writing leaves no empty ``expN`` behind."""
    while _claimed:
        folder = _claimed.pop()
        try:
            if {p.name for p in folder.iterdir()} <= {RUN_MARKER}:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass
