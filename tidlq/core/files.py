"""Atomic file and folder writes, and content digests.

Every write in tidlq goes through here: a temporary sibling is written completely, then renamed into place, so an
interrupted run leaves either the old file or the new one, never half of one. Temporary names carry the host and the
PID of their writer (`.<name>.p<pid>@<host>.<random>.tmp`): what a killed process leaves behind is swept by the next
write into the same folder, and never what a live one is writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock

# `.<name>.p<pid>@<host>.<anything>.tmp`: a temporary file or folder, and who writes it.
_TEMP_NAME = re.compile(r"^\..*\.p(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]+)\..*\.tmp$")


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """SHA-256 of the canonical JSON of `obj` (sorted keys, no whitespace)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def canonical_json(obj: Any) -> str:
    """The one JSON form used for hashing: sorted keys, compact separators."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` to `path` atomically (temporary file in the same folder, fsync, rename); `mode`: its
    permissions (e.g. 0o600 for keys) before it appears under its name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: Path, text: str, mode: int | None = None) -> None:
    """Write `text` (UTF-8) atomically (`write_bytes`)."""
    write_bytes(path, text.encode(), mode)


def write_json(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it replaces `final` in one rename.

    On an exception the temporary folder is removed and `final` is left as it was. Temporary folders that killed
    processes left beside `final` are removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final), suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, final: Path) -> None:
    """Move folder `src` to `final`, replacing any folder there; readers never see a partial `final`.

    Replacing takes two renames, so writers of the same `final` (other processes too) take turns on its lock.
    """
    with lock(final):
        if final.exists():
            old = final.with_name(f"{temp_prefix(final)}old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(src, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, final)


def lock(path: Path) -> FileLock:
    """The lock of `path` (a stage or output folder): a file `.<name>.lock` beside it, held with flock, which the
    kernel releases when its holder dies. Other processes and threads wait for it; the holding thread may take it
    again. Different paths never wait on each other."""
    path = Path(path)
    return FileLock(path.with_name(f".{path.name}.lock"), is_singleton=True)


def temp_prefix(path: Path) -> str:
    """The name prefix of this process's temporary siblings of `path`."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()) or "host"
    return f".{Path(path).name}.p{os.getpid()}@{host}."


def sweep_stale(folder: Path) -> list[Path]:
    """Remove the temporary files and folders in `folder` whose writer, a process on this host, is gone; return them.

    Those of other hosts (a shared `output_dir`) are left alone: their writers may be alive."""
    host = temp_prefix(folder).rsplit("@", 1)[1].rstrip(".")
    removed: list[Path] = []
    stale: list[Path] = []
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        stale = [Path(e.path) for e in entries if (m := _TEMP_NAME.match(e.name)) and m["host"] == host
                 and not pid_alive(int(m["pid"]))]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
