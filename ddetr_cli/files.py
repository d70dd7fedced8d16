"""Files and folders every layer writes: the ddetr home folder, atomic writes (readers never see
half a file; an interrupted write leaves the old file), and run folders that are never reused."""

from __future__ import annotations

import contextlib
import os
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
    not mkstemp's private 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str | bytes) -> None:
    """Write text (UTF-8) or bytes atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)


def next_run_dir(parent: Path, stem: str = "exp") -> Path:
    """parent/exp, then exp2, exp3, ... (never an existing folder); created empty."""
    parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        d = parent / (stem if n == 1 else f"{stem}{n}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            n += 1
