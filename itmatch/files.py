"""Files written whole or not at all: a reader (a resumed run, a restored search, another process)
never sees half of one after a kill or a full disk. One mechanism for every writer (text, bytes,
Parquet tables, torch checkpoints)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


_UMASK = os.umask(0o022)  # read once (umask can only be read by setting it), then put back
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` in one rename
    (atomic on POSIX); whatever fails, the temporary does not stay behind (a full disk must not
    leave .name.* files)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would make every written file private
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already once it has been renamed


def read_utf8(path: str | Path, error: type[Exception] = ValueError) -> str:
    """A user's text file (captions, JSON, YAML); a byte-order mark (Windows editors write one) is not
    content. An unreadable file or bytes that are not UTF-8 raise `error` naming the file (and line)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise error(f"{path}: line {line}: bytes {data[exc.start:exc.end]!r} at offset {exc.start} "
                    "are not UTF-8 (re-encode the file as UTF-8)") from exc


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
