"""Where platform recordings live: a key per segment, behind an interface a scale-out store
can implement.

A segment's key is its path under the records root, ``<channel>/<YYYYMMDD>/<channel>_<YYYYMMDDTHHMMSS>.mp4``
(the layout the media nodes write, ``media.recording``); the index (``record_index``) stores
keys, never absolute paths, so the same index works over another root or an S3-compatible
bucket. ``LocalDiskStorage`` is the implementation today: the media nodes write the files
straight into its root (same host, or a shared mount). An object-store implementation would
upload closed segments and answer ``local_copy`` with a cached download for export/playback.
"""

from __future__ import annotations

import abc
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LocalDiskStorage", "RecordStorage", "StorageUsage"]

PART = ".part"  # a segment still being written (or cut by a crash) carries this suffix


class StorageUsage:
    """Bytes used by segments, the room left, and the limit the low-space policy works against."""

    __slots__ = ("used", "free", "capacity")

    def __init__(self, used: int, free: int, capacity: int) -> None:
        self.used = used
        self.free = free
        self.capacity = capacity

    @property
    def free_ratio(self) -> float:
        return self.free / self.capacity if self.capacity > 0 else 1.0

    def as_dict(self) -> dict:
        return {"used_bytes": self.used, "free_bytes": max(0, self.free), "capacity_bytes": self.capacity,
                "free_percent": round(100 * max(0.0, self.free_ratio), 2)}


class RecordStorage(abc.ABC):
    """Segments by key (see the module docstring)."""

    quota: int  # bytes segments may use at most; 0 = whatever the medium holds

    @abc.abstractmethod
    def path_for(self, key: str) -> Path:
        """A local file with the segment's bytes (for PyAV), or where it would be."""

    @abc.abstractmethod
    def key_of(self, path: str | os.PathLike[str]) -> str:
        """The key of a file a media node reported (ValueError if it is outside the root)."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool: ...

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Bytes of the segment; 0 when it is gone."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove a segment; False when it was already gone."""

    @abc.abstractmethod
    def scan(self) -> Iterator[str]:
        """Every key present, closed (``.mp4``) and cut (``.mp4.part``) ones."""

    @abc.abstractmethod
    def usage(self, indexed_bytes: int) -> StorageUsage:
        """Room left; ``indexed_bytes`` is what the index says segments use (cheaper than a walk)."""


class LocalDiskStorage(RecordStorage):
    """Segments as files under ``root``."""

    def __init__(self, root: str | os.PathLike[str], quota: int = 0) -> None:
        self.root = Path(root)
        self.quota = quota

    def path_for(self, key: str) -> Path:
        path = (self.root / key)
        if ".." in Path(key).parts or Path(key).is_absolute():
            raise ValueError(f"segment key {key!r} leaves the records root")
        return path

    def key_of(self, path: str | os.PathLike[str]) -> str:
        p = Path(path)
        if not p.is_absolute():
            return p.as_posix()
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            raise ValueError(f"segment {p} is outside the records root {self.root}: the media "
                             "node and the server must use the same recording.dir") from None

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self.path_for(key).stat().st_size
        except OSError:
            return 0

    def delete(self, key: str) -> bool:
        path = self.path_for(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        # An emptied day (then channel) directory goes too; a non-empty one stays.
        for parent in (path.parent, path.parent.parent):
            try:
                parent.rmdir()
            except OSError:
                break
        return True

    def scan(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for path in self.root.glob("*/*/*.mp4*"):
            if path.name.endswith((".mp4", ".mp4" + PART)) and path.is_file():
                yield path.relative_to(self.root).as_posix()

    def usage(self, indexed_bytes: int) -> StorageUsage:
        self.root.mkdir(parents=True, exist_ok=True)
        disk = shutil.disk_usage(self.root)
        if self.quota:
            # Negative over the quota: the policy then frees that much more than the threshold.
            return StorageUsage(indexed_bytes, min(self.quota - indexed_bytes, disk.free), self.quota)
        # Without a quota the disk is the limit: what segments use counts as theirs to free.
        return StorageUsage(indexed_bytes, disk.free, disk.total)
