"""files.py: atomic writes end with the ordinary file mode (not mkstemp's 0600) and leave
nothing behind on failure."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ddetr_cli.files import atomic_path, atomic_write_text


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_atomic_write_gets_the_umask_mode(mask: int, tmp_path: Path) -> None:
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"x")
        plain = tmp_path / "plain"
        plain.write_text("")  # what open() gives under this umask
    finally:
        os.umask(old)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want == 0o666 & ~mask
    for name in ("a.json", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


def test_atomic_path_failure_keeps_the_old_file(tmp_path: Path) -> None:
    atomic_write_text(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert (tmp_path / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_hard_link_keeps_the_originals_mode(tmp_path):
    """detect links source images into its run folder: the user's file must keep its mode."""
    import os
    import stat

    from ddetr_cli.files import atomic_path

    src = tmp_path / "photo.jpg"
    src.write_bytes(b"jpeg")
    src.chmod(0o600)
    with atomic_path(tmp_path / "run" / "images" / "photo.jpg") as tmp:
        tmp.unlink()
        os.link(src, tmp)
    assert stat.S_IMODE(src.stat().st_mode) == 0o600
    assert (tmp_path / "run" / "images" / "photo.jpg").read_bytes() == b"jpeg"
