"""Input files named in params (`data.source`, `model.weights`): their content fingerprint, which is part of the
stage cache key (a changed file reruns its stage), and their local path (an `s3://` URI is downloaded once)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tidlq.core import files, s3
from tidlq.core.errors import UserError


def fingerprint(source: str | None, field: str) -> str:
    """A digest of what `source` holds: SHA-256 of a file, of every file in a folder, or an S3 object's ETag."""
    if source is None or source == "digits":
        return str(source)
    if source.startswith("s3://"):
        return f"etag:{s3.etag(source, field)}"
    path = Path(source)
    try:
        if path.is_file():
            return files.sha256_file(path)
        if path.is_dir():
            h = hashlib.sha256()
            for p in sorted(q for q in path.rglob("*") if q.is_file()):
                h.update(f"{p.relative_to(path).as_posix()}\0{files.sha256_file(p)}\0".encode())
            return h.hexdigest()
    except OSError as exc:
        name = f" ({exc.filename})" if exc.filename and str(exc.filename) != source else ""
        raise UserError(f"{field} {source!r} cannot be read{name}: {exc.strerror or exc}. Make it readable, or point "
                        f"{field} at another file.") from None
    return "missing"  # the stage itself explains what is wrong


def resolve(source: str, field: str) -> Path:
    """The local path of `source`; an `s3://` object is fetched into the download cache first."""
    if source.startswith("s3://"):
        return s3.fetch(source, download_cache(), field)
    return Path(source)


def download_cache() -> Path:
    """Where `s3://` inputs are kept: `$TIDLQ_CACHE_DIR`, default `~/.cache/tidlq/downloads`."""
    return Path(os.environ.get("TIDLQ_CACHE_DIR", Path.home() / ".cache" / "tidlq")) / "downloads"
