"""Where a dump lives: a local directory, or a folder in object storage named by a URL.

teacher-dump --out, student-train --shards/--eval-shards, kd-eval --teacher-shards and
teacher-dump inspect take either. A plain path or a file:// URL is a local directory and keeps
every local guarantee (shared/files.py): files are written under a temporary name, fsynced and
renamed, and writers coordinate through file locks. Any other URL (s3://, gs://, memory://,
...) goes through an fsspec filesystem (s3fs and gcsfs are installed separately: pip install
s3fs / gcsfs). Object stores have no rename and no locks, so there:

- a shard or the manifest is written in one request under its final name, only once its bytes
  are complete (the object appears whole or not at all: single-request PUT on S3 and GCS), and
  a shard counts for readers only once the manifest lists it (write, then publish);
- nothing is locked. One writer per --rank is the user's (or the scheduler's) promise, and when
  several ranks write into one folder their manifest updates are last-writer-wins: each update
  rebuilds the shard list from a listing of the folder, so the next update repairs a lost one,
  and rerunning any rank's command after all have finished (it finds nothing to do) writes the
  final manifest. The Ray executor has a single writer and no such race.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from kd_shards.shared.errors import UserError, one_line
from kd_shards.shared.files import atomic_write, directory_lock, sha256_of_file


def is_url(location: str | Path) -> bool:
    """Whether `location` names a filesystem by URL (file:// included)."""
    return isinstance(location, str) and "://" in location


class Folder:
    """One dump directory: local (a path or file:// URL) or a folder of an fsspec filesystem."""

    def __init__(self, location: str | Path):
        self.text = str(location)
        """The location as the user gave it (for messages)."""
        self.local: Path | None = None
        """The directory, when it is on the local filesystem."""
        self.filesystem = None
        """The fsspec filesystem of a remote folder."""
        self.root = ""
        """The folder's path inside `filesystem`."""
        if not is_url(location) or str(location).startswith("file://"):
            self.local = Path(str(location).removeprefix("file://"))
            return
        try:
            from fsspec.core import url_to_fs

            self.filesystem, self.root = url_to_fs(str(location))
        except (ImportError, ValueError) as error:
            raise UserError(
                f"{location}: no filesystem for this URL ({one_line(error, 120)}): install its "
                "fsspec package (s3fs for s3://, gcsfs for gs://) or pass a local directory"
            ) from None
        self.root = self.root.rstrip("/")

    def __str__(self) -> str:
        return self.text

    @property
    def is_local(self) -> bool:
        return self.local is not None

    def location_of(self, name: str) -> Path | str:
        """A file's path (local) or URL (remote), for opening and for messages."""
        if self.local is not None:
            return self.local / name
        return f"{self.text.rstrip('/')}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self) -> bool:
        """Whether the folder exists (an object-store folder: whether anything is in it)."""
        if self.local is not None:
            return self.local.is_dir()
        self.filesystem.invalidate_cache(self.root)
        return bool(self.filesystem.exists(self.root))

    def make(self) -> None:
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
        else:
            self.filesystem.makedirs(self.root, exist_ok=True)

    def is_file(self, name: str) -> bool:
        if self.local is not None:
            return (self.local / name).is_file()
        return bool(self.filesystem.isfile(self._path(name)))

    def names(self, suffix: str = "") -> list[str]:
        """The folder's file names ending in `suffix`, sorted (a fresh listing, not a cache)."""
        if self.local is not None:
            return sorted(path.name for path in self.local.glob(f"*{suffix}"))
        self.filesystem.invalidate_cache(self.root)
        try:
            listed = self.filesystem.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        names = (PurePosixPath(str(path)).name for path in listed)
        return sorted(name for name in names if name.endswith(suffix))

    def size(self, name: str) -> int:
        if self.local is not None:
            return (self.local / name).stat().st_size
        return int(self.filesystem.size(self._path(name)))

    def version(self, name: str) -> tuple:
        """What changes when the file is replaced: (size, modification time or ETag)."""
        if self.local is not None:
            status = (self.local / name).stat()
            return (status.st_size, status.st_mtime_ns)
        info = self.filesystem.info(self._path(name))
        stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("created")
        return (int(info["size"]), str(stamp))

    def open(self, name: str) -> BinaryIO:
        """The file opened for reading (binary), for pyarrow or hashing."""
        if self.local is not None:
            return open(self.local / name, "rb")  # noqa: SIM115 - the caller closes it
        return self.filesystem.open(self._path(name), "rb")

    def read_text(self, name: str) -> str:
        if self.local is not None:
            return (self.local / name).read_text(encoding="utf-8")
        return self.filesystem.cat_file(self._path(name)).decode("utf-8")

    def sha256(self, name: str) -> str:
        if self.local is not None:
            return sha256_of_file(self.local / name)
        digest = hashlib.sha256()
        with self.open(name) as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Publish `data` as file `name`: local, atomically (temp, fsync, rename); remote, in
        one request under the final name once complete."""
        if self.local is not None:
            atomic_write(self.local / name, lambda temporary: temporary.write_bytes(data))
        else:
            self.filesystem.pipe_file(self._path(name), data)

    def write_json(self, name: str, value: object) -> None:
        self.write_bytes(name, (json.dumps(value, indent=2) + "\n").encode("utf-8"))

    @contextlib.contextmanager
    def lock(self, name: str = ".lock") -> Iterator[None]:
        """The folder's writer lock: a file lock locally; nothing on an object store (see the
        module's docstring for what holds there instead)."""
        if self.local is None:
            yield
            return
        with directory_lock(self.local, name):
            yield


def as_folder(location: str | Path | Folder) -> Folder:
    return location if isinstance(location, Folder) else Folder(location)


def parquet_bytes(write) -> bytes:
    """What `write(sink)` writes into an in-memory file (a shard bound for object storage)."""
    sink = io.BytesIO()
    write(sink)
    return sink.getvalue()
