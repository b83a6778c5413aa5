"""Mobile positions (GB/T 28181-2016 §9.11.2 event notification, Annex A.2.4 h) MobilePosition
query, A.2.5 e) Notify MobilePosition): a track per device, its latest fix on the device and
its channels.

Fixes arrive two ways. With a subscription (§9.11.1: ``SUBSCRIBE Event: presence`` with a
``Query/MobilePosition`` body carrying ``Interval``, seconds, 5 by default per A.2.4) the
device sends ``NOTIFY`` ``Notify/MobilePosition`` in the dialog every Interval; the
``SubscriptionManager`` with ``kind="MobilePosition"`` (subscriptions.py) opens, refreshes and
ends it and answers each NOTIFY 200 before ``on_notify`` here. Devices also send the same body
unsubscribed, as a MESSAGE (messages.py hands it to ``on_message``), which is answered 200, or
400 with the reason when the body cannot be a fix.

``parse_position`` is lenient where devices differ and strict where a value is unusable: Time
with a space, milliseconds or a zone is read, an unreadable or missing one left out (our
receive time orders the track anyway); Speed, Direction and Altitude are optional and an
unreadable one is left out; Longitude/Latitude both 0 (or both absent) mean "no fix" (GPS not
locked), answered 200 and counted, not stored. A missing or malformed DeviceID, a coordinate
that is not a number or out of range, or one coordinate without the other is refused.

A fix is kept in the device's history (``DeviceRegistry.record_position``: written with the
device batch, so it shares the group commit), becomes the device's latest position
(``device.extra["position"]``, shown by ``GET /api/v1/devices/{id}``, stored with the device so
it survives a restart) and is published on the event bus (type ``position``) once committed.
Channels follow the fix: a mobile device is one that reports positions, and its cameras move
with it, so a fix about the device itself sets the longitude/latitude of each of its physical
channels (cameras, alarm inputs, sub-devices; not civil-code, system, business-group or
virtual-organisation nodes, which are not things that move), and a fix about one of its
channels (a lower platform or an NVR reporting for a vehicle camera) sets that channel's. A
catalog refresh may put the catalog's own coordinates back until the next fix, one Interval
later for a subscribed device. Fixes older than ``positions.keep_days`` are pruned every
``positions.prune_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from registry.channels import ChannelRegistry
from registry.devices import DeviceRegistry
from registry.models import Device, PositionEvent
from registry.store import StoreError

from . import manscdp
from .config import PositionsSection
from .events import EventBus, iso

__all__ = ["DEFAULT_INTERVAL", "PositionError", "PositionService", "parse_position",
           "position_json"]

log = logging.getLogger("gb28181.positions")

#: Interval of a MobilePosition subscription when none is asked for (A.2.4 h): seconds.
DEFAULT_INTERVAL = 5
#: Channel kinds that are places in a tree, not equipment on the vehicle.
_NOT_MOVING = frozenset({"civil-code", "system", "business-group", "virtual-org"})
_ID = re.compile(r"[0-9A-Za-z_.:@-]{1,64}")


class PositionError(ValueError):
    """The body cannot be taken as a position; the message says why, ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _number(msg: manscdp.Manscdp, tag: str) -> float | None:
    text = msg.text(tag)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _coordinate(msg: manscdp.Manscdp, tag: str, limit: float) -> float | None:
    text = msg.text(tag)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise PositionError(tag, f"{tag} {text[:20]!r} is not a number") from None
    if not math.isfinite(value) or abs(value) > limit:
        raise PositionError(tag, f"{tag} must be within ±{limit:g} degrees, got {text[:20]!r}")
    return value


def parse_position(msg: manscdp.Manscdp, sender: str, received_at: float) -> PositionEvent | None:
    """The fix of a ``Notify/MobilePosition`` body sent by device ``sender``; None when the
    device says it has no fix (0/0 or no coordinates); PositionError if the body is unusable."""
    if msg.cmd_type != "MobilePosition":
        raise PositionError("CmdType", f"not a position: CmdType {msg.cmd_type!r}")
    target = msg.device_id
    if not target:
        raise PositionError("DeviceID", "Notify MobilePosition without DeviceID")
    if not _ID.fullmatch(target):
        raise PositionError("DeviceID", f"DeviceID {target[:30]!r} is not a device code")
    longitude = _coordinate(msg, "Longitude", 180.0)
    latitude = _coordinate(msg, "Latitude", 90.0)
    if not longitude and not latitude:
        return None  # 0/0 or nothing: the receiver has no fix
    if longitude is None or latitude is None:
        missing = "Longitude" if longitude is None else "Latitude"
        raise PositionError(missing, f"a position needs both coordinates; {missing} is missing")
    when = manscdp.parse_time(msg.text("Time"))
    speed = _number(msg, "Speed")
    direction = _number(msg, "Direction")
    if direction is not None:
        direction %= 360.0  # A.2.5: 0-360° clockwise from north; -90 is 270
        if direction >= 360.0:  # a tiny negative angle rounds up to 360.0: that is north
            direction = 0.0
    return PositionEvent(
        device_id=sender, target_id=target, time=when.timestamp() if when is not None else None,
        longitude=longitude, latitude=latitude,
        speed=speed if speed is not None and speed >= 0 else None, direction=direction,
        altitude=_number(msg, "Altitude"), received_at=received_at)


def position_json(p: PositionEvent) -> dict[str, Any]:
    """A fix as the API, the device and the event feed show it."""
    return {"device_id": p.device_id, "target_id": p.target_id, "time": iso(p.time),
            "longitude": p.longitude, "latitude": p.latitude, "speed": p.speed,
            "direction": p.direction, "altitude": p.altitude, "received_at": iso(p.received_at)}


class PositionService:
    """Takes fixes from MESSAGEs and subscription NOTIFYs; see the module docstring."""

    def __init__(self, *, config: PositionsSection, registry: DeviceRegistry,
                 channels: ChannelRegistry, bus: EventBus,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.registry = registry
        self.channels = channels
        self.bus = bus
        self.clock = clock
        self.received: Counter[str] = Counter()   # by how: "message", "notify"
        self.rejected: Counter[str] = Counter()   # by field
        self.no_fix = 0
        self.pruned = 0
        self._task: asyncio.Task | None = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._prune_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def prune(self) -> int:
        """Forget fixes older than ``keep_days``; returns how many."""
        n = await self.registry.prune_positions(self.clock() - self.config.keep_days * 86400.0)
        self.pruned += n
        if n:
            log.info("pruned %d positions older than %g days", n, self.config.keep_days)
        return n

    async def _prune_loop(self) -> None:
        while True:
            try:
                await self.prune()
            except StoreError as exc:
                log.warning("pruning positions: %s", exc)
            await asyncio.sleep(self.config.prune_interval)

    # -- fixes in -------------------------------------------------------------------------------
    def on_message(self, device: Device, msg: manscdp.Manscdp, reply: Callable[..., None]) -> None:
        """A MESSAGE ``Notify/MobilePosition`` sent without a subscription: 200 or 400."""
        try:
            fix = parse_position(msg, device.device_id, self.clock())
        except PositionError as exc:
            self.rejected[exc.field] += 1
            reply(400, f"Bad Request: {exc}"[:120].replace("\r", " ").replace("\n", " "))
            return
        reply(200)
        self._take(device, fix, "message")

    def on_notify(self, device: Device, msg: manscdp.Manscdp) -> None:
        """A NOTIFY of a MobilePosition subscription, already answered 200 (§9.11.2)."""
        if msg.cmd_type != "MobilePosition":
            return
        try:
            fix = parse_position(msg, device.device_id, self.clock())
        except PositionError as exc:
            self.rejected[exc.field] += 1
            log.info("position NOTIFY from %s ignored: %s", device.device_id, exc)
            return
        self._take(device, fix, "notify")

    def _take(self, device: Device, fix: PositionEvent | None, via: str) -> None:
        if fix is None:
            self.no_fix += 1
            return
        self.received[via] += 1
        self.registry.record_position(fix)
        data = position_json(fix)
        if self.registry.get(device.device_id) is device:
            device.extra["position"] = data
            self.registry.touch(device)
        self._move_channels(device, fix)

        def committed(ok: bool) -> None:
            if not ok:
                self.registry.after_commit(committed)  # goes with the next flush that succeeds
                return
            self.bus.publish("position", data, at=fix.received_at)

        self.registry.after_commit(committed)

    def _move_channels(self, device: Device, fix: PositionEvent) -> None:
        if fix.target_id == device.device_id:
            moving = [c for c in self.channels.of_device(device.device_id) if c.kind not in _NOT_MOVING]
        else:
            channel = self.channels.get(fix.target_id)
            moving = [channel] if channel is not None and channel.device_id == device.device_id else []
        for channel in moving:
            if (channel.longitude, channel.latitude) != (fix.longitude, fix.latitude):
                channel.longitude, channel.latitude = fix.longitude, fix.latitude
                self.channels.touch(channel)

    # -- metrics --------------------------------------------------------------------------------
    def metrics(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily
        received = CounterMetricFamily("gb28181_positions_received",
                                       "Mobile position fixes stored, by how they came", labels=["via"])
        for via in ("message", "notify"):
            received.add_metric([via], self.received[via])
        yield received
        rejected = CounterMetricFamily("gb28181_positions_rejected",
                                       "MobilePosition bodies refused, by field", labels=["reason"])
        for reason, n in sorted(self.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        no_fix = CounterMetricFamily("gb28181_positions_no_fix",
                                     "MobilePosition reports without a fix (0/0)")
        no_fix.add_metric([], self.no_fix)
        yield no_fix
