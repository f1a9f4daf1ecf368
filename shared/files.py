"""Crash-safe file writing and content hashing, used for shards, manifests and checkpoints.

A reader must never see a partial file: everything is written to a temporary name in the same
directory, fsynced, then renamed over the final name (rename is atomic on POSIX), and the
directory is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

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


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(temp_path)`, then fsync and atomically rename the result to `path`."""
    path = Path(path)
    temp = temporary_path_for(path)
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
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
