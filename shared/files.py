"""Crash-safe file writing and content hashing, used for shards, manifests and checkpoints.

A reader must never see a partial file: everything is written to a temporary name in the same
directory, fsynced, then renamed over the final name (rename is atomic on POSIX), and the
directory is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from kd_shards.shared.errors import UserError, one_line

TEMP_PREFIX = ".tmp-"
"""Temporary files start with this; leftovers from a killed process are safe to delete."""


def fsync_directory(directory: Path) -> None:
    """Make a rename inside `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _host_tag() -> str:
    # Ranks on several machines may share one output directory: a pid is only meaningful on
    # the host that owns it, so temporaries carry a short tag of the host name.
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temporary_path_for(path: Path) -> Path:
    """A temporary name beside `path`, unique to this process on this host."""
    return path.with_name(f"{TEMP_PREFIX}{os.getpid()}-{_host_tag()}-{path.name}")


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
DISK_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", "os error 28")


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from, says the device is full or over quota.

    Libraries report it differently: pyarrow and Python raise OSError(ENOSPC); safetensors raises
    its own error carrying the OS message; torch.save into a file object raises a RuntimeError
    whose context is the file's OSError."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(message in str(error) for message in DISK_FULL_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(path: Path, what: str | None = None) -> UserError:
    """The one-line error for a write that ran out of space (nothing partial was kept)."""
    path = Path(path)
    return UserError(
        f"no space left on the device of {path.parent} while writing {what or path.name}: "
        "nothing partial was kept; free space there and rerun the same command (it resumes)"
    )


def disk_full_exit(error: BaseException, fix: str) -> UserError | None:
    """For a command's last-resort handler: the one-line UserError when `error` is a full disk
    hit outside the writes that report it themselves (e.g. appending to a log), else None."""
    if not is_disk_full(error):
        return None
    return UserError(f"no space left on device ({one_line(error, 120)}): {fix}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(temp_path)`, then fsync and atomically rename the result to `path`.

    On any failure the temporary file is removed, so `path` is either the old file or the
    complete new one; a full disk becomes a one-line UserError."""
    path = Path(path)
    temp = temporary_path_for(path)
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except Exception as error:
        if is_disk_full(error):
            raise disk_full_error(path) from None
        raise
    finally:
        if temp.exists():
            temp.unlink()
    fsync_directory(path.parent)


@contextlib.contextmanager
def atomic_directory(final: Path, *, replace: bool = True) -> Iterator[Path]:
    """Build a directory under a temporary name beside `final`; publish it under `final` when
    the block ends without an exception (fsync of every file, rename, fsync of the parent).

    A reader therefore sees either no `final` (or the previous one) or the complete new one,
    never a partial one, whatever moment a kill comes. With replace=False an existing `final`
    is an error (raised by the rename); otherwise it is retired under a temporary name first and
    removed after the swap. On an exception the temporary directory is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path_for(final)
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
        _fsync_tree(temporary)
        if final.exists() and replace:
            retired = temporary_path_for(final.with_name(f"old-{final.name}"))
            os.rename(final, retired)
            os.rename(temporary, final)
            shutil.rmtree(retired, ignore_errors=True)
        elif final.exists():
            raise FileExistsError(final)
        else:
            os.rename(temporary, final)
        fsync_directory(final.parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def remove_directory_atomically(directory: Path) -> None:
    """Rename `directory` to a temporary name, then delete it: it disappears at once and a kill
    during the deletion leaves only a temporary that remove_stale_temporaries can clear."""
    retired = temporary_path_for(Path(directory).with_name(f"old-{Path(directory).name}"))
    os.rename(directory, retired)
    shutil.rmtree(retired, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [directory, *[p for p in directory.rglob("*") if p.is_dir()]]:
        fsync_directory(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically replace `path` with `text` (UTF-8)."""
    atomic_write(Path(path), lambda temp: temp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, value: object) -> None:
    """Atomically replace `path` with `value` as indented JSON."""
    atomic_write_text(path, json.dumps(value, indent=2, sort_keys=False) + "\n")


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete temporary files left by killed writers in `directory`; returns what was removed.

    Only files written on this host by a process that is gone are removed, so a concurrent
    writer (another rank sharing the directory, here or on another machine) keeps its file.
    """
    removed = []
    for temp in Path(directory).glob(f"{TEMP_PREFIX}*"):
        pid_text, host, *_ = temp.name[len(TEMP_PREFIX) :].split("-", 2) + ["", ""]
        if host != _host_tag() or not pid_text.isdigit():
            continue
        if int(pid_text) != os.getpid() and _process_alive(int(pid_text)):
            continue
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
            removed.append(temp)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sha256_of_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def directory_lock(directory: Path, name: str = ".lock", wait: bool = True) -> Iterator[None]:
    """Exclusive advisory lock shared by every process writing into `directory`.

    With wait=False, raises BlockingIOError at once when another process holds it."""
    with open(Path(directory) / name, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def hold_lock(path: Path):
    """Take an exclusive advisory lock on `path` (created if missing) without waiting.

    Returns the open handle, which holds the lock until it is closed (or the process ends, even
    by kill -9), or None when another process holds it."""
    handle = open(path, "a+")  # noqa: SIM115 - the handle is the lock; the caller closes it
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle
