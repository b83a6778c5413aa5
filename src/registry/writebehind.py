"""Write-behind persistence shared by the registries, with group commit.

`DeviceRegistry` (devices.py) and `ChannelRegistry` (channels.py) keep their
records in memory and mark what changed in a `WriteBehind` each (changed
records keyed by ID, removed IDs, history events). One `Persistence` per store
owns the loop that writes them: every `flush_interval` seconds, and at once when
somebody waits for durability, it takes everything marked in every registry and
hands it to the store as one `write_all` call, which a transactional store
lands whole or not at all. So a device and its channels reach the disk in the
same transaction, never one without the other.

`durable()` is group commit: the caller (the registrar, before it answers a
REGISTER with 200) gets a future that resolves once the changes marked before
the call are committed. The registrations that arrive while one transaction
commits all go into the next one, so the cost of a commit is shared by however
many answers wait for it, and the throughput holds.

A flush that fails puts everything back for the next one, merged with what
changed meanwhile, so a store outage costs memory, not data (and durability
waiters hear False); history is bounded by `max_pending_events`, oldest dropped
first and counted. `SortedIds` keeps the ID order that paged queries need
without making adds pay for sorting.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from .store import Store, StoreBatch

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E")

# Records copied per event-loop turn when a flush snapshots them (~3 ms).
_COPY_CHUNK = 2_000

# While the store keeps failing, repeat the error at most this often.
_ERROR_LOG_INTERVAL = 60.0


class _Taken(Generic[T, E]):
    """What one flush took out of a WriteBehind, to write or to put back."""

    __slots__ = ("dirty", "deleted", "events")

    def __init__(self, dirty: dict[str, T], deleted: set[str], events: deque[E]) -> None:
        self.dirty = dirty
        self.deleted = deleted
        self.events = events

    def __len__(self) -> int:
        return len(self.dirty) + len(self.deleted) + len(self.events)


class WriteBehind(Generic[T, E]):
    """Pending changes of one registry.

    `kind` names the records for the store ("devices", "channels"); `lookup(id)`
    returns the registry's live record, so a record removed or replaced while
    its flush was failing is not resurrected; `copy(record)` detaches a
    snapshot the store may read from another thread. `what` and `events_what`
    name the records and events in log lines.
    """

    def __init__(
        self,
        *,
        kind: str,
        lookup: Callable[[str], T | None],
        copy: Callable[[T], T],
        what: str,
        events_what: str,
        max_pending_events: int,
    ) -> None:
        self.kind = kind
        self._lookup = lookup
        self._copy = copy
        self.what = what
        self.events_what = events_what
        # Dirty records keyed by ID, holding the live object: marking is O(1)
        # and a record changed many times between flushes is written once.
        self._dirty: dict[str, T] = {}
        self._deleted: set[str] = set()
        # Bounded so a long store outage under flapping cannot exhaust memory.
        self._max_pending_events = max_pending_events
        self._events: deque[E] = deque(maxlen=max_pending_events)
        self.dropped_events = 0

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
            self.dropped_events += 1
        self._events.append(event)

    def pending(self) -> tuple[int, int]:
        """(record changes, events) not yet written."""
        return len(self._dirty) + len(self._deleted), len(self._events)

    # -- flushing (called by Persistence) -----------------------------------

    def take(self) -> _Taken[T, E]:
        """Swap the pending sets out: the hot path keeps marking into fresh ones."""
        taken = _Taken(self._dirty, self._deleted, self._events)
        self._dirty, self._deleted = {}, set()
        self._events = deque(maxlen=self._max_pending_events)
        return taken

    async def batch(self, taken: _Taken[T, E], *, snapshot: bool = True) -> StoreBatch:
        records = list(taken.dirty.values())
        if not snapshot:
            # The store turns these into rows before it awaits anything (Store.write_all).
            return StoreBatch(self.kind, records, list(taken.deleted), list(taken.events))
        # Copies, because the store may read them on another thread while the
        # hot path keeps mutating the live objects. Copying yields between
        # chunks so a 100k-record flush does not stall the loop for its whole
        # length; a record changed meanwhile is dirty again and simply written
        # once more next time.
        copy = self._copy
        copies: list[T] = []
        for start in range(0, len(records), _COPY_CHUNK):
            if start:
                await asyncio.sleep(0)
            copies.extend(map(copy, records[start : start + _COPY_CHUNK]))
        return StoreBatch(self.kind, copies, list(taken.deleted), list(taken.events))

    def restore(self, taken: _Taken[T, E]) -> None:
        """Put back what a failed flush took, under what changed since."""
        lookup = self._lookup
        for key, record in taken.dirty.items():
            # Skip records removed or replaced since the snapshot: their newer
            # state is already pending.
            if lookup(key) is record:
                self._dirty.setdefault(key, record)
        for key in taken.deleted:
            if lookup(key) is None:
                self._deleted.add(key)
        # Older events go back in front so history stays in order.
        merged = deque(taken.events, maxlen=self._max_pending_events)
        overflow = len(taken.events) + len(self._events) - self._max_pending_events
        merged.extend(self._events)
        if overflow > 0:
            self.dropped_events += overflow
        self._events = merged


class Persistence:
    """The flush loop of one store, shared by its registries; see the module docstring."""

    def __init__(self, store: Store, *, flush_interval: float, commit_delay: float = 0.0) -> None:
        self._store = store
        self._flush_interval = flush_interval
        # A durability waiter's commit starts this long after it asked, so that the waiters
        # of a few milliseconds share one transaction (PostgreSQL's commit_delay, in effect).
        self._commit_delay = commit_delay
        self._parts: list[WriteBehind] = []
        self._lock = asyncio.Lock()
        self._users = 0
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._kick: asyncio.Event | None = None
        # Called (with True/False) when the next flush to *start* has committed or failed.
        self._waiters: list[Callable[[bool], None]] = []
        self._failures = 0
        self._last_error_log = 0.0
        #: Flushes that wrote something, for benchmarks and metrics.
        self.commits = 0

    def add(self, part: WriteBehind) -> None:
        self._parts.append(part)

    @property
    def running(self) -> bool:
        return self._task is not None

    # -- life cycle ----------------------------------------------------------

    def start(self, name: str = "registry-flush") -> None:
        """Start the loop for one more user (each registry is one); idempotent across users."""
        self._users += 1
        if self._task is None:
            self._stopping = False
            self._kick = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name=name)

    async def stop(self) -> bool:
        """One user is done: write what is pending; the last one also stops the loop.
        False if that write failed."""
        self._users = max(0, self._users - 1)
        if self._users == 0 and self._task is not None:
            self._stopping = True
            assert self._kick is not None
            self._kick.set()  # the loop finishes its flush in progress, then ends
            await self._task
            self._task = None
        return await self.flush()

    # -- writing ----------------------------------------------------------------

    def durable(self) -> asyncio.Future[bool]:
        """A future resolved once everything marked so far is committed (True), or the
        commit failed (False: everything stays pending for the next try)."""
        future: asyncio.Future[bool] = (self._loop or asyncio.get_running_loop()).create_future()

        def resolve(ok: bool) -> None:
            if not future.done():
                future.set_result(ok)

        self.after_commit(resolve)
        return future

    def after_commit(self, callback: Callable[[bool], None]) -> None:
        """Call ``callback(ok)`` once everything marked so far is committed (``ok`` True), or
        the commit failed (False: everything stays pending for the next try). The registrar
        answers a REGISTER this way: the callbacks of one commit run in one go, cheaper than
        a future each at thousands of registrations a second."""
        if self._task is None or self._kick is None or self._loop is None:
            # No loop (a registry used without start(), in tests): flush now.
            task = asyncio.ensure_future(self.flush())
            task.add_done_callback(lambda t: callback(not t.cancelled() and t.exception() is None
                                                      and t.result()))
            return
        self._waiters.append(callback)
        self._kick.set()

    async def flush(self) -> bool:
        """Write everything pending in one store call; False (logged, all kept) on failure."""
        async with self._lock:
            return await self._flush_locked()

    async def _flush_locked(self) -> bool:
        if not any(p.pending() != (0, 0) for p in self._parts):
            return True
        taken = [(part, part.take()) for part in self._parts]
        try:
            snapshot = self._store.snapshots_needed(sum(len(t.dirty) for _, t in taken))
            batches = [await part.batch(t, snapshot=snapshot) for part, t in taken if len(t)]
            await self._store.write_all(batches)
        except BaseException as e:
            for part, t in taken:
                part.restore(t)
            if not isinstance(e, Exception):
                raise
            self._log_failure(e, taken)
            return False
        self.commits += 1
        if self._failures:
            log.warning("registry store %r is writable again after %d failed flushes", self._store, self._failures)
            self._failures = 0
        for part in self._parts:
            if part.dropped_events:
                log.warning("%s registry dropped %d %s while the store was failing", part.what,
                            part.dropped_events, part.events_what)
                part.dropped_events = 0
        return True

    def _log_failure(self, error: Exception, taken: list) -> None:
        self._failures += 1
        now = time.monotonic()
        if self._failures == 1 or now - self._last_error_log >= _ERROR_LOG_INTERVAL:
            self._last_error_log = now
            kept = ", ".join(f"{len(t.dirty) + len(t.deleted)} {p.what} changes and "
                             f"{len(t.events)} {p.events_what}" for p, t in taken if len(t))
            log.error("registry flush to %r failed (%d in a row); keeping %s for the next try",
                      self._store, self._failures, kept, exc_info=error)

    async def _run(self) -> None:
        assert self._kick is not None
        kick = self._kick
        loop = asyncio.get_running_loop()
        while not self._stopping:
            timer = loop.call_later(self._flush_interval, kick.set)
            await kick.wait()
            timer.cancel()
            if self._waiters and self._commit_delay > 0 and not self._stopping:
                await asyncio.sleep(self._commit_delay)
            kick.clear()
            # Whoever asks for durability from here on waits for the next flush.
            waiters, self._waiters = self._waiters, []
            try:
                ok = await self.flush()
            except Exception:
                # flush() already handles store errors; this is a bug, and the
                # loop must survive it or nothing is ever persisted again.
                log.exception("registry flush loop error")
                ok = False
            self._run_waiters(waiters, ok)
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            self._run_waiters(waiters, await self.flush())

    @staticmethod
    def _run_waiters(waiters: list[Callable[[bool], None]], ok: bool) -> None:
        for callback in waiters:
            try:
                callback(ok)
            except Exception:  # one bad callback must not keep the others from running
                log.exception("after-commit callback %r failed", callback)


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
