"""Expanding what the user typed (files, folders, globs, lists, URLs) into image sources."""

from __future__ import annotations

import glob
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ddetr_cli.data.images import ImageReadError, decode_image, read_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jfif", ".pgm", ".ppm"}


class SourceError(ValueError):
    """A source argument that names nothing usable."""


def is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def expand_sources(sources: Sequence[str], recursive: bool = False) -> Iterator[tuple[str, str]]:
    """Yield (path or URL, name) in a stable order; name is the path relative to a given folder,
    else the file name (what labeling tools match). Raises SourceError for a source that
    matches nothing."""
    for src in sources:
        if is_url(src):
            yield src, Path(urllib.parse.urlparse(src).path).name or "image"
            continue
        p = Path(src).expanduser()
        if p.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(f for f in p.glob(pattern) if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            if not files:
                raise SourceError(f"{src}: folder has no images" + ("" if recursive else " (try --recursive)"))
            yield from ((str(f), f.relative_to(p).as_posix()) for f in files)
        elif p.is_file() and p.suffix.lower() == ".txt":
            lines = [ln.strip() for ln in p.read_text(errors="replace").splitlines()]
            entries = [ln for ln in lines if ln and not ln.startswith("#")]
            if not entries:
                raise SourceError(f"{src}: list file is empty")
            for e in entries:
                if is_url(e):
                    yield e, Path(urllib.parse.urlparse(e).path).name or "image"
                else:
                    f = Path(e) if Path(e).is_absolute() else p.parent / e
                    yield str(f), f.name
        elif p.is_file():
            yield str(p), p.name
        elif any(ch in src for ch in "*?["):
            files = sorted(f for f in glob.glob(src, recursive=True) if Path(f).suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise SourceError(f"{src}: pattern matches no images")
            yield from ((f, Path(f).name) for f in files)
        else:
            raise SourceError(f"{src}: no such file, folder, pattern or URL")


def fetch_url(url: str, timeout: float = 20.0, headers: dict[str, str] | None = None) -> np.ndarray:
    """Download an image over http(s) -> (H, W, 3) uint8 RGB; errors (unreachable, an HTTP error
    status, not an image) become ImageReadError. ``headers`` (e.g. ``Authorization``) go to
    ``url`` only: a redirect (to a presigned storage URL, say) is followed without them."""
    try:
        req = urllib.request.Request(url, headers={"User-Agent": "ddetr"})
        for k, v in (headers or {}).items():
            req.add_unredirected_header(k, v)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
    except urllib.error.HTTPError as e:
        raise ImageReadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise ImageReadError(f"{url}: unreachable ({reason})") from None
    try:
        return decode_image(data, url)
    except ImageReadError as e:
        raise ImageReadError(f"{url}: not a readable image ({str(e).removeprefix(url + ': ')})") from None


def load_source(src: str) -> np.ndarray:
    return fetch_url(src) if is_url(src) else read_image(src)
