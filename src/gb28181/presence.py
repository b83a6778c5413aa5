"""Online tracking: when does a registered device stop being online (§9.1.1, §9.6.1)?

A device is online from its successful REGISTER (or a keepalive within a live registration)
until the earlier of: its registration running out, or ``interval × count`` seconds without a
keepalive (the device's own HeartBeatInterval × HeartBeatCount once its BasicParam is known,
else the configured 60 s × 3). The registrar and the keepalive handler call ``seen``; a
periodic ``check(now)`` turns devices whose deadline has passed offline, recording each
transition (with the time the deadline actually passed) through the registry, which is what
the online-rate reports are computed from.

There is no timer per device. One heap holds one entry per online device with the deadline it
had when pushed; keepalives only move ``keepalive_at`` forward, and an entry popped early is
pushed again with the real deadline. So 100k devices cost a few heap operations per device
per timeout period, not a timer per keepalive.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable

from registry.devices import DeviceRegistry
from registry.models import Device

__all__ = ["Presence"]

log = logging.getLogger("gb28181.presence")


class Presence:
    """Deadlines for every online device; see the module docstring."""

    def __init__(self, registry: DeviceRegistry, *, interval: float, count: int,
                 clock: Callable[[], float] = time.time, check_every: float = 1.0) -> None:
        self.registry = registry
        self.interval = interval
        self.count = count
        self.clock = clock
        self.check_every = min(check_every, interval)
        self._heap: list[tuple[float, str]] = []
        # Device ID -> deadline of its one live heap entry. Entries that do not match (left
        # behind by forget() followed by seen()) are dropped when popped, so a device that
        # unregisters and registers again does not leave a copy cycling in the heap.
        self._scheduled: dict[str, float] = {}
        self._task: asyncio.Task | None = None

    @property
    def timeout(self) -> float:
        return self.interval * self.count

    def deadline(self, device: Device) -> float:
        """When ``device`` goes offline unless it is heard from again: after its own heartbeat
        interval × count when it told us (BasicParam, §9.6.1), else the configured ones."""
        heard = max(device.keepalive_at, device.registered_at)
        extra = device.extra
        if "heartbeat_interval" in extra:
            timeout = extra["heartbeat_interval"] * extra.get("heartbeat_count", self.count)
        else:
            timeout = self.timeout
        return min(device.expires_at, heard + timeout)

    def seen(self, device: Device) -> None:
        """Make sure an online device has a deadline entry (cheap when it already has one)."""
        due = self.deadline(device)
        scheduled = self._scheduled.get(device.device_id)
        # A later deadline is found when the entry pops; an earlier one (a refresh with a
        # shorter Expires) needs an entry of its own or the device would stay online too long.
        if scheduled is None or due < scheduled:
            self._scheduled[device.device_id] = due
            heapq.heappush(self._heap, (due, device.device_id))

    def forget(self, device_id: str) -> None:
        # The heap entry stays and is dropped when popped; only the marker goes now.
        self._scheduled.pop(device_id, None)

    def resume(self, now: float | None = None) -> int:
        """After a restart: devices stored as online either still are (their deadline is ahead)
        or went offline while we were down, at their deadline. Returns how many went offline."""
        now = self.clock() if now is None else now
        gone = 0
        for device in list(self.registry):
            if not device.online:
                continue
            due = self.deadline(device)
            if due <= now:
                reason = "expired" if device.expires_at <= due else "keepalive-timeout"
                self.registry.set_online(device, False, reason, at=due)
                gone += 1
            else:
                self.seen(device)
        return gone

    def check(self, now: float | None = None) -> int:
        """Turn every device whose deadline has passed offline; returns how many."""
        now = self.clock() if now is None else now
        heap = self._heap
        registry = self.registry
        gone = 0
        while heap and heap[0][0] <= now:
            pushed, device_id = heapq.heappop(heap)
            if self._scheduled.get(device_id) != pushed:
                continue  # a stale entry: the device's live one is elsewhere in the heap, or gone
            device = registry.get(device_id)
            if device is None or not device.online:
                del self._scheduled[device_id]
                continue
            due = self.deadline(device)
            if due > now:
                self._scheduled[device_id] = due
                heapq.heappush(heap, (due, device_id))
                continue
            del self._scheduled[device_id]
            reason = "expired" if device.expires_at <= due else "keepalive-timeout"
            registry.set_online(device, False, reason, at=due)
            gone += 1
        return gone

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.check_every)
            try:
                gone = self.check()
                if gone:
                    log.info("%d device(s) went offline", gone)
            except Exception:  # keep checking: one bad record must not stop online tracking
                log.exception("presence check failed")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="presence")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
