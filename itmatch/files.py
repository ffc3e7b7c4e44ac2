"""Files written whole or not at all: a reader (a resumed run, a restored search, another process)
never sees half of one after a kill or a full disk. One mechanism for every writer (text, bytes,
Parquet tables, torch checkpoints)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` fills a temporary file beside `path`, which then replaces `path` in one rename
    (atomic on POSIX); whatever fails, the temporary does not stay behind (a full disk must not
    leave .name.* files)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    # Created as open() creates files, so the kernel applies the umask (mkstemp's 0600 would make
    # every written file private, and reading the umask means setting it, process-wide); O_EXCL:
    # never another writer's temporary.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already once it has been renamed


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
