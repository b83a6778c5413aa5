"""Write-behind persistence and paging order shared by the registries.

`DeviceRegistry` (devices.py) and `ChannelRegistry` (channels.py) keep their
records in memory and mark what changed; a `WriteBehind` collects those marks
(changed records keyed by ID, removed IDs, history events) and hands them to
one store call per flush, every `flush_interval` seconds from a background
task. A flush that fails puts everything back for the next one, merged with
what changed meanwhile, so a store outage costs memory, not data; history is
bounded by `max_pending_events`, oldest dropped first and counted.
`SortedIds` keeps the ID order that paged queries need without making adds
pay for sorting.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E")

# Records copied per event-loop turn when a flush snapshots them (~3 ms).
_COPY_CHUNK = 2_000

# While the store keeps failing, repeat the error at most this often.
_ERROR_LOG_INTERVAL = 60.0


class WriteBehind(Generic[T, E]):
    """Pending changes of one registry and the loop that writes them.

    `write(records, deleted_ids, events)` is the store's batch call; it must
    land whole or not at all, because a failed batch is retried as is.
    `lookup(id)` returns the registry's live record, so a record removed or
    replaced while its flush was failing is not resurrected; `copy(record)`
    detaches a snapshot the store may read from another thread.
    `what` and `events_what` name the records and events in log lines.
    """

    def __init__(
        self,
        *,
        write: Callable[[list[T], list[str], list[E]], Awaitable[None]],
        lookup: Callable[[str], T | None],
        copy: Callable[[T], T],
        what: str,
        events_what: str,
        store: object,
        flush_interval: float,
        max_pending_events: int,
    ) -> None:
        self._write = write
        self._lookup = lookup
        self._copy = copy
        self._what = what
        self._events_what = events_what
        self._store = store
        self._flush_interval = flush_interval
        # Dirty records keyed by ID, holding the live object: marking is O(1)
        # and a record changed many times between flushes is written once.
        self._dirty: dict[str, T] = {}
        self._deleted: set[str] = set()
        # Bounded so a long store outage under flapping cannot exhaust memory.
        self._max_pending_events = max_pending_events
        self._events: deque[E] = deque(maxlen=max_pending_events)
        self._dropped_events = 0
        self._lock = asyncio.Lock()
        self._stopping: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._failures = 0
        self._last_error_log = 0.0

    # -- marking (hot path) ------------------------------------------------

    def changed(self, key: str, record: T) -> None:
        self._dirty[key] = record

    def added(self, key: str, record: T) -> None:
        self._dirty[key] = record
        # The upsert rewrites the whole row, so a pending delete of an earlier
        # record with this ID is moot; keeping both would make order matter.
        self._deleted.discard(key)

    def removed(self, key: str) -> None:
        self._dirty.pop(key, None)
        self._deleted.add(key)

    def event(self, event: E) -> None:
        if len(self._events) == self._max_pending_events:
            self._dropped_events += 1
        self._events.append(event)

    def pending(self) -> tuple[int, int]:
        """(record changes, events) not yet written."""
        return len(self._dirty) + len(self._deleted), len(self._events)

    # -- loop ----------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self, name: str) -> None:
        if self._task is not None:
            raise RuntimeError(f"{name} already running")
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name=name)

    async def stop(self) -> bool:
        """Stop the loop and write what is pending; False if that last write failed."""
        if self._task is not None:
            assert self._stopping is not None
            # Signalled rather than cancelled, so a flush in progress finishes.
            self._stopping.set()
            await self._task
            self._task = None
        return await self.flush()

    async def flush(self) -> bool:
        """Write pending changes as one batch; False (logged, all kept) if the store failed."""
        async with self._lock:
            return await self._flush_locked()

    async def _flush_locked(self) -> bool:
        if not (self._dirty or self._deleted or self._events):
            return True
        # Swap the pending sets out first: the hot path keeps marking into
        # fresh ones while the store awaits.
        dirty, self._dirty = self._dirty, {}
        deleted, self._deleted = self._deleted, set()
        events, self._events = self._events, deque(maxlen=self._max_pending_events)
        try:
            snapshot = await self._snapshot(dirty)
            await self._write(snapshot, list(deleted), list(events))
        except BaseException as e:
            self._restore(dirty, deleted, events)
            if not isinstance(e, Exception):
                raise
            self._log_failure(e, len(dirty) + len(deleted), len(events))
            return False
        if self._failures:
            log.warning("%s registry store %r is writable again after %d failed flushes", self._what, self._store, self._failures)
            self._failures = 0
        if self._dropped_events:
            log.warning("%s registry dropped %d %s while the store was failing", self._what, self._dropped_events, self._events_what)
            self._dropped_events = 0
        return True

    async def _snapshot(self, dirty: dict[str, T]) -> list[T]:
        # Copies, because the store may read them on another thread while the
        # hot path keeps mutating the live objects. Copying yields between
        # chunks so a 100k-record flush does not stall the loop for its whole
        # length; a record changed meanwhile is dirty again and simply written
        # once more next time.
        records = list(dirty.values())
        copy = self._copy
        snapshot: list[T] = []
        for start in range(0, len(records), _COPY_CHUNK):
            if start:
                await asyncio.sleep(0)
            snapshot.extend(map(copy, records[start : start + _COPY_CHUNK]))
        return snapshot

    def _restore(self, dirty: dict[str, T], deleted: set[str], events: deque[E]) -> None:
        lookup = self._lookup
        for key, record in dirty.items():
            # Skip records removed or replaced since the snapshot: their newer
            # state is already pending.
            if lookup(key) is record:
                self._dirty.setdefault(key, record)
        for key in deleted:
            if lookup(key) is None:
                self._deleted.add(key)
        # Older events go back in front so history stays in order.
        merged = deque(events, maxlen=self._max_pending_events)
        overflow = len(events) + len(self._events) - self._max_pending_events
        merged.extend(self._events)
        if overflow > 0:
            self._dropped_events += overflow
        self._events = merged

    def _log_failure(self, error: Exception, records: int, events: int) -> None:
        self._failures += 1
        now = time.monotonic()
        if self._failures == 1 or now - self._last_error_log >= _ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.error(
                "%s registry flush to %r failed (%d in a row); keeping %d %s changes "
                "and %d %s for the next try",
                self._what,
                self._store,
                self._failures,
                records,
                self._what,
                events,
                self._events_what,
                exc_info=error,
            )

    async def _loop(self) -> None:
        assert self._stopping is not None
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self._flush_interval)
                return
            except TimeoutError:
                pass
            try:
                await self.flush()
            except Exception:
                # flush() already handles store errors; this is a bug, and the
                # loop must survive it or nothing is ever persisted again.
                log.exception("%s registry flush loop error", self._what)


class SortedIds:
    """The keys of a registry's dict in sorted order, for paging.

    Adds append and leave the list unsorted until the next read, which re-sorts
    (Timsort merges the appended tail into the sorted run in ~O(n)); a removal
    from a sorted list is a bisect, otherwise the list is rebuilt on next read.
    So the hot path never sorts.
    """

    __slots__ = ("_source", "_ids", "_sorted")

    def __init__(self, source: Mapping[str, object]) -> None:
        self._source = source
        self._ids: list[str] | None = None
        self._sorted = True

    def add(self, key: str) -> None:
        if self._ids is not None:
            self._ids.append(key)
            self._sorted = False

    def discard(self, key: str) -> None:
        ids = self._ids
        if ids is not None and self._sorted:
            i = bisect.bisect_left(ids, key)
            if i < len(ids) and ids[i] == key:
                del ids[i]
        else:
            self._ids = None

    def ids(self) -> list[str]:
        """The sorted keys; the caller must not change the list."""
        if self._ids is None:
            self._ids = sorted(self._source)
            self._sorted = True
        elif not self._sorted:
            self._ids.sort()
            self._sorted = True
        return self._ids
