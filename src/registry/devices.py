"""The device registry: every known device in memory, persisted behind it.

The SIP registrar and keepalive handling call `get`, `add`, `touch` and
`set_online` thousands of times a second; those are plain dict operations
with no awaits. Each write marks the device dirty, and the `Persistence` loop
(writebehind.py), shared with `ChannelRegistry`, writes dirty devices,
removals and pending `StatusEvent`s to a `Store` (store.py, sqlite.py) in one
transaction with the channels' changes, every `flush_interval` seconds or at
once for a `durable()` waiter (group commit: the registrar answers a REGISTER
only once the registration is on disk). A flush that fails keeps everything
for the next one, so a store outage costs memory, not data. Listeners
(metrics, alerting) hear each online/offline transition synchronously.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

from .models import AlarmEvent, Device, FaultEvent, PositionEvent, StatusEvent
from .store import Store, StoreError
from .writebehind import Persistence, SortedIds, WriteBehind

log = logging.getLogger(__name__)

Listener = Callable[[Device, StatusEvent], None]


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
        persistence: Persistence | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._devices: dict[str, Device] = {}
        self._online = 0
        self._started = False
        self._listeners: list[Listener] = []
        # Device IDs for paging, sorted lazily by `query` so `add` stays O(1).
        self._order = SortedIds(self._devices)
        self._pending: WriteBehind[Device, StatusEvent | FaultEvent | AlarmEvent | PositionEvent] = WriteBehind(
            kind="devices",
            lookup=self._devices.get,
            copy=Device.copy,
            what="device",
            events_what="status events",
            max_pending_events=max_pending_events,
        )
        #: Shared with the channel registry of the same store, so that both land in one
        #: transaction; a registry on its own gets its own.
        self.persistence = persistence or Persistence(store, flush_interval=flush_interval)
        self.persistence.add(self._pending)

    @property
    def store(self) -> Store:
        return self._store

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the store, load every device and start the flush loop."""
        if self._started:
            raise RuntimeError("DeviceRegistry already started")
        if self._devices:
            raise RuntimeError("DeviceRegistry.start() must come before any add()")
        await self._store.open()
        try:
            devices = await self._store.load_devices()
        except BaseException:
            await self._store.close()
            raise
        # Filled in place: the write-behind and the order hold this dict.
        self._devices.update((d.device_id, d) for d in devices)
        self._online = sum(1 for d in devices if d.online)
        self._order = SortedIds(self._devices)
        self._started = True
        self.persistence.start("registry-flush")
        log.info("device registry loaded %d devices (%d online) from %r", len(devices), self._online, self._store)

    async def stop(self) -> None:
        """Stop the flush loop, write what is pending and close the store.

        Raises StoreError after closing if the final flush failed, because
        whatever was pending is then lost.
        """
        ok = await self.persistence.stop() if self._started else await self.persistence.flush()
        self._started = False
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
        self._pending.added(device_id, device)
        self._order.add(device_id)
        return device

    def touch(self, device: Device) -> None:
        """Mark a changed device for the next flush."""
        self._check_current(device)
        device.updated_at = self._clock()
        self._pending.changed(device.device_id, device)

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
        self._pending.changed(device.device_id, device)
        event = StatusEvent(device.device_id, online, at, reason)
        self._pending.event(event)
        for listener in self._listeners:
            try:
                listener(device, event)
            except Exception:
                # A broken metrics hook must not fail a REGISTER.
                log.exception("device status listener %r failed", listener)
        return True

    def record_fault(self, device: Device, status: str, devices: tuple[str, ...], at: float | None = None) -> bool:
        """Note the fault state a keepalive reports ("ERROR" with the faulty sub-devices, or
        "OK"); only a change is written to the history. True if it changed."""
        self._check_current(device)
        current = device.extra.get("fault")
        if status == "OK" and current is None:
            return False
        if current is not None and current.get("status") == status and tuple(current.get("devices", ())) == devices:
            return False
        at = self._clock() if at is None else at
        if status == "OK":
            device.extra.pop("fault", None)
        else:
            device.extra["fault"] = {"status": status, "devices": list(devices), "since": at}
        self._pending.changed(device.device_id, device)
        self._pending.event(FaultEvent(device.device_id, at, status, devices))
        return True

    async def fault_events(self, device_id: str | None = None, limit: int = 1000) -> list[FaultEvent]:
        """Fault history from the store, newest first, including reports just made."""
        await self.flush()
        return await self._store.fault_events(device_id, limit=limit, newest_first=True)

    def record_alarm(self, alarm: AlarmEvent) -> None:
        """Keep an alarm in the device history; written with the next flush (``after_commit``
        tells when it is on disk)."""
        self._pending.event(alarm)

    async def alarm_events(self, device_id: str | None = None, since: float | None = None,
                           priorities: tuple[int, int] | None = None,
                           limit: int = 100) -> list[AlarmEvent]:
        """Stored alarms, newest first, including those just recorded."""
        await self.flush()
        return await self._store.alarm_events(device_id, since, priorities, limit)

    def record_position(self, position: PositionEvent) -> None:
        """Add a fix to the device's track; written with the next flush, like alarms."""
        self._pending.event(position)

    async def position_events(self, device_id: str, since: float | None = None,
                              until: float | None = None, limit: int = 1000) -> list[PositionEvent]:
        """A device's track, oldest first, including fixes just recorded."""
        await self.flush()
        return await self._store.position_events(device_id, since, until, limit)

    async def prune_positions(self, before: float) -> int:
        """Forget stored fixes received before ``before``; returns how many."""
        await self.flush()
        return await self._store.prune_positions(before)

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
        self._pending.removed(device_id)
        self._order.discard(device_id)
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
        return self._pending.pending()

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
        order = self._order.ids()
        devices = self._devices
        if online is None and kind is None:
            return len(order), [devices[i] for i in order[offset : offset + limit]]
        matching = [
            d
            for d in map(devices.__getitem__, order)
            if (online is None or d.online == online) and (kind is None or d.kind == kind)
        ]
        return len(matching), matching[offset : offset + limit]

    async def status_events(
        self,
        device_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[StatusEvent]:
        """Status history from the store, oldest first (or the latest `limit`,
        newest first), including transitions just made."""
        await self.flush()
        if newest_first:
            return await self._store.status_events(device_id, since, until, limit, newest_first=True)
        # Without the keyword, so stores written before it existed keep working.
        return await self._store.status_events(device_id, since, until, limit)

    # -- persistence -------------------------------------------------------

    async def flush(self) -> None:
        """Write dirty devices, removals and pending events (and the channel registry's, if it
        shares the persistence) as one batch.

        A store failure is logged and everything stays pending for the next
        flush; nothing is raised, since the loop will retry anyway.
        """
        await self.persistence.flush()

    def durable(self) -> asyncio.Future[bool]:
        """Resolved (True) once every change made so far is committed; False if the commit
        failed (the changes stay pending). See `Persistence.durable`."""
        return self.persistence.durable()

    def after_commit(self, callback: Callable[[bool], None]) -> None:
        """``callback(ok)`` once every change made so far is committed (or failed to be);
        see `Persistence.after_commit`."""
        self.persistence.after_commit(callback)
