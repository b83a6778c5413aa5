"""The device registry: every known device in memory, persisted behind it.

The SIP registrar and keepalive handling call `get`, `add`, `touch` and
`set_online` thousands of times a second; those are plain dict operations
with no awaits. Each write marks the device dirty, and a background task
writes the dirty devices, removals and pending `StatusEvent`s to a `Store`
(store.py, sqlite.py) as one batch every `flush_interval` seconds. A flush
that fails keeps everything for the next one, so a store outage costs memory,
not data. Listeners (metrics, alerting) hear each online/offline transition
synchronously.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator

from .models import Device, StatusEvent
from .store import Store, StoreError

log = logging.getLogger(__name__)

Listener = Callable[[Device, StatusEvent], None]

# Devices copied per event-loop turn when a flush snapshots them (~3 ms).
_COPY_CHUNK = 2_000

# While the store keeps failing, repeat the error at most this often.
_ERROR_LOG_INTERVAL = 60.0


class DeviceRegistry:
    """In-memory source of truth for devices, with write-behind persistence.

    Device objects returned by `get`, `query` and iteration are the live ones:
    change their fields, then call `touch` (or `set_online` for the online
    flag, which must only change through it so counts and history stay right).
    """

    def __init__(
        self,
        store: Store,
        *,
        flush_interval: float = 0.5,
        clock: Callable[[], float] = time.time,
        max_pending_events: int = 1_000_000,
    ) -> None:
        self._store = store
        self._flush_interval = flush_interval
        self._clock = clock
        self._devices: dict[str, Device] = {}
        self._online = 0
        # Dirty devices keyed by ID, holding the live object: marking is O(1)
        # and a device changed many times between flushes is written once.
        self._dirty: dict[str, Device] = {}
        self._deleted: set[str] = set()
        # Bounded so a long store outage under device flapping cannot exhaust
        # memory; the oldest history goes first and is counted.
        self._max_pending_events = max_pending_events
        self._events: deque[StatusEvent] = deque(maxlen=max_pending_events)
        self._dropped_events = 0
        self._listeners: list[Listener] = []
        # Device IDs for paging; rebuilt or re-sorted lazily by `query` so
        # that `add` on the hot path stays O(1).
        self._order: list[str] | None = []
        self._order_sorted = True
        self._flush_lock = asyncio.Lock()
        self._stopping: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._failures = 0
        self._last_error_log = 0.0

    @property
    def store(self) -> Store:
        return self._store

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the store, load every device and start the flush loop."""
        if self._task is not None:
            raise RuntimeError("DeviceRegistry already started")
        if self._devices:
            raise RuntimeError("DeviceRegistry.start() must come before any add()")
        await self._store.open()
        try:
            devices = await self._store.load_devices()
        except BaseException:
            await self._store.close()
            raise
        self._devices = {d.device_id: d for d in devices}
        self._online = sum(1 for d in devices if d.online)
        self._order = None
        self._stopping = asyncio.Event()
        self._task = asyncio.create_task(self._flush_loop(), name="registry-flush")
        log.info("device registry loaded %d devices (%d online) from %r", len(devices), self._online, self._store)

    async def stop(self) -> None:
        """Stop the flush loop, write what is pending and close the store.

        Raises StoreError after closing if the final flush failed, because
        whatever was pending is then lost.
        """
        if self._task is not None:
            assert self._stopping is not None
            # Signalled rather than cancelled, so a flush in progress finishes.
            self._stopping.set()
            await self._task
            self._task = None
        async with self._flush_lock:
            ok = await self._flush_locked()
        lost = self.pending()
        await self._store.close()
        if not ok:
            raise StoreError(
                f"device registry stopped with {lost[0]} device changes and {lost[1]} status "
                f"events not written to {self._store!r}; see the errors logged before"
            )

    # -- hot path: synchronous, O(1) ---------------------------------------

    def get(self, device_id: str) -> Device | None:
        return self._devices.get(device_id)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[Device]:
        # Over a copy, so a consumer that awaits mid-iteration (a keepalive
        # sweep) does not die when a REGISTER adds a device meanwhile.
        return iter(list(self._devices.values()))

    def add(self, device: Device) -> Device:
        """Register a new device; ValueError if its ID is already known."""
        device_id = device.device_id
        if device_id in self._devices:
            raise ValueError(f"device {device_id} is already in the registry")
        now = self._clock()
        if not device.created_at:
            device.created_at = now
        device.updated_at = now
        self._devices[device_id] = device
        if device.online:
            self._online += 1
        self._dirty[device_id] = device
        # The upsert rewrites the whole row, so a pending delete of an earlier
        # device with this ID is moot; keeping both would make order matter.
        self._deleted.discard(device_id)
        if self._order is not None:
            self._order.append(device_id)
            self._order_sorted = False
        return device

    def touch(self, device: Device) -> None:
        """Mark a changed device for the next flush."""
        self._check_current(device)
        device.updated_at = self._clock()
        self._dirty[device.device_id] = device

    def set_online(self, device: Device, online: bool, reason: str, at: float | None = None) -> bool:
        """Move a device online or offline; False if it already was in that state."""
        self._check_current(device)
        online = bool(online)
        if device.online == online:
            return False
        now = self._clock()
        at = now if at is None else at
        device.online = online
        device.status_changed_at = at
        device.updated_at = now
        self._online += 1 if online else -1
        self._dirty[device.device_id] = device
        event = StatusEvent(device.device_id, online, at, reason)
        if len(self._events) == self._max_pending_events:
            self._dropped_events += 1
        self._events.append(event)
        for listener in self._listeners:
            try:
                listener(device, event)
            except Exception:
                # A broken metrics hook must not fail a REGISTER.
                log.exception("device status listener %r failed", listener)
        return True

    def _check_current(self, device: Device) -> None:
        # A device never added, or removed meanwhile, would otherwise be
        # silently not persisted and skew the online count.
        if self._devices.get(device.device_id) is not device:
            raise KeyError(f"device {device.device_id} is not in the registry (never added, or removed)")

    def remove(self, device_id: str) -> bool:
        """Forget a device; an online one first goes offline with reason "removed"."""
        device = self._devices.get(device_id)
        if device is None:
            return False
        # Through set_online so listeners and the history see it leave.
        self.set_online(device, False, "removed")
        del self._devices[device_id]
        self._dirty.pop(device_id, None)
        self._deleted.add(device_id)
        if self._order is not None and self._order_sorted:
            i = bisect.bisect_left(self._order, device_id)
            if i < len(self._order) and self._order[i] == device_id:
                del self._order[i]
        else:
            self._order = None
        return True

    def add_listener(self, fn: Listener) -> None:
        """Call `fn(device, event)` synchronously on every online/offline transition."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        self._listeners.remove(fn)

    def counts(self) -> tuple[int, int]:
        """(total, online)."""
        return len(self._devices), self._online

    def pending(self) -> tuple[int, int]:
        """(device changes, status events) not yet written to the store."""
        return len(self._dirty) + len(self._deleted), len(self._events)

    # -- reads for the HTTP API --------------------------------------------

    def query(
        self,
        *,
        online: bool | None = None,
        kind: str | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> tuple[int, list[Device]]:
        """(number matching, one page of them sorted by device_id)."""
        if offset < 0 or limit < 0:
            raise ValueError(f"offset and limit must not be negative, got {offset}, {limit}")
        if self._order is None:
            self._order = sorted(self._devices)
            self._order_sorted = True
        elif not self._order_sorted:
            # Timsort merges the appended tail into the sorted run in ~O(n).
            self._order.sort()
            self._order_sorted = True
        devices = self._devices
        if online is None and kind is None:
            return len(self._order), [devices[i] for i in self._order[offset : offset + limit]]
        matching = [
            d
            for d in map(devices.__getitem__, self._order)
            if (online is None or d.online == online) and (kind is None or d.kind == kind)
        ]
        return len(matching), matching[offset : offset + limit]

    async def status_events(
        self,
        device_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
    ) -> list[StatusEvent]:
        """Status history from the store, oldest first, including transitions just made."""
        await self.flush()
        return await self._store.status_events(device_id, since, until, limit)

    # -- persistence -------------------------------------------------------

    async def flush(self) -> None:
        """Write dirty devices, removals and pending events as one batch.

        A store failure is logged and everything stays pending for the next
        flush; nothing is raised, since the loop will retry anyway.
        """
        async with self._flush_lock:
            await self._flush_locked()

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
            await self._store.write_batch(snapshot, list(deleted), list(events))
        except BaseException as e:
            self._restore(dirty, deleted, events)
            if not isinstance(e, Exception):
                raise
            self._log_failure(e, len(dirty) + len(deleted), len(events))
            return False
        if self._failures:
            log.warning("device registry store %r is writable again after %d failed flushes", self._store, self._failures)
            self._failures = 0
        if self._dropped_events:
            log.warning("device registry dropped %d status events while the store was failing", self._dropped_events)
            self._dropped_events = 0
        return True

    @staticmethod
    async def _snapshot(dirty: dict[str, Device]) -> list[Device]:
        # Copies, because the store may read them on another thread while the
        # registrar keeps mutating the live objects. Copying yields between
        # chunks so a registration storm's 100k-device flush does not stall
        # the loop for its whole length; a device changed meanwhile is dirty
        # again and simply written once more next time.
        devices = list(dirty.values())
        snapshot: list[Device] = []
        for start in range(0, len(devices), _COPY_CHUNK):
            if start:
                await asyncio.sleep(0)
            snapshot.extend(d.copy() for d in devices[start : start + _COPY_CHUNK])
        return snapshot

    def _restore(self, dirty: dict[str, Device], deleted: set[str], events: deque[StatusEvent]) -> None:
        for device_id, device in dirty.items():
            # Skip devices removed or replaced since the snapshot: their newer
            # state is already pending.
            if self._devices.get(device_id) is device:
                self._dirty.setdefault(device_id, device)
        for device_id in deleted:
            if device_id not in self._devices:
                self._deleted.add(device_id)
        # Older events go back in front so history stays in order.
        merged = deque(events, maxlen=self._max_pending_events)
        overflow = len(events) + len(self._events) - self._max_pending_events
        merged.extend(self._events)
        if overflow > 0:
            self._dropped_events += overflow
        self._events = merged

    def _log_failure(self, error: Exception, devices: int, events: int) -> None:
        self._failures += 1
        now = time.monotonic()
        if self._failures == 1 or now - self._last_error_log >= _ERROR_LOG_INTERVAL:
            self._last_error_log = now
            log.error(
                "device registry flush to %r failed (%d in a row); keeping %d device changes "
                "and %d status events for the next try",
                self._store,
                self._failures,
                devices,
                events,
                exc_info=error,
            )

    async def _flush_loop(self) -> None:
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
                log.exception("device registry flush loop error")
