"""Files written whole or not at all: a reader (a resumed run, a restored search, another process)
never sees half of one after a kill or a full disk. One mechanism for every writer (text, bytes,
Parquet tables, torch checkpoints)."""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


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


def staging_folder(folder: str | Path, what: str = "tmp") -> Path:
    """A fresh hidden sibling of `folder` (same file system: renamed into place in one step)."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.{what}-{secrets.token_hex(4)}")


def replace_folder(staged: str | Path, folder: str | Path) -> Path:
    """Put the complete folder `staged` in place of `folder` (if any) by renames: the old one moves
    aside first and is deleted only once the new one is in place, so a crash between the renames
    leaves it whole as `.<name>.old-*` and a reader never finds half of either."""
    staged, folder = Path(staged), Path(folder)
    old = staging_folder(folder, "old")
    if folder.exists():
        folder.rename(old)
    staged.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def read_problem(exc: BaseException) -> str:
    """What went wrong reading a file, in one line for an error message that names the file: a YAML
    error's problem and place (its own text spans several lines, quoting the file), an OS error's
    reason, else the message with its line breaks folded."""
    placed = _yaml_place(exc)
    if placed is not None:
        return f"{placed[0]}: not valid YAML: {placed[1]}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return " ".join(str(exc).split()) or type(exc).__name__


def yaml_problem(exc: BaseException) -> str:
    """A YAML error (yaml.YAMLError) in one line that says "not valid YAML" once: with its place
    where PyYAML knows it, else its folded text. Decided by the error's structure (a problem mark),
    not by reading back what read_problem wrote."""
    problem = read_problem(exc)
    return problem if _yaml_place(exc) is not None else f"not valid YAML: {problem}"


def _yaml_place(exc: BaseException) -> tuple[str, str] | None:
    """("line L, column C", problem) for a YAML error that knows where its problem is, else None."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return None
    return f"line {mark.line + 1}, column {mark.column + 1}", problem


def read_utf8(path: str | Path, error: type[Exception] = ValueError, limit: int | None = None) -> str:
    """A user's text file (captions, JSON, YAML); a byte-order mark (Windows editors write one) is not
    content. An unreadable file or bytes that are not UTF-8 raise `error` naming the file (and line);
    so does one over `limit` bytes, read no further (a settings file given as /dev/zero, or a
    data file by mistake, would fill the memory first)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if limit is not None and len(data) > limit:
        raise error(f"{path}: over {limit:,} bytes, too large for this kind of file (a data file or a device "
                    "given in its place?)")
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


class FolderError(RuntimeError):
    """The folder of a run (or search) cannot be this process's: `Busy`, `NotWritable`."""


class Busy(FolderError):
    """Another process holds the lock of the run (or search) this one would write."""


class NotWritable(FolderError):
    """The run's (or search's) folder is a file, or cannot be created where it is asked for."""


@contextmanager
def exclusive(folder: str | Path, what: str) -> Iterator[None]:
    """Hold `folder`'s lock (`.<name>.lock` beside it, so that taking it creates nothing inside a
    run folder that `run.resume=false` checks for) while the block runs, or raise Busy naming the
    holder. Two processes writing one run folder would interleave checkpoints and MLflow logging and
    resume each other's state. flock: released by the kernel when the holder dies, however it dies;
    on NFS it takes a lock on the server."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():  # else the run failed on it once it had started
        raise NotWritable(f"{folder}: a file, not {what}'s folder: pick another name, or move the file")
    path = folder.with_name(f".{folder.name}.lock")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:  # read-only, not a folder on the way, no space: a traceback after the checks
        raise NotWritable(f"{folder.parent}: cannot hold {what}'s folder ({exc.strerror or exc}: "
                          f"{exc.filename or path})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            raise Busy(f"{folder}: {what} is running already ({holder}; lock {path}): wait for it to end, "
                       "or pick another name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
