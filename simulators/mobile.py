"""Moving devices (GB/T 28181-2016 §9.11.2, A.2.4 h MobilePosition query, A.2.5 e Notify
MobilePosition); fleet.py's ``SimDevice`` owns a ``DeviceMobility`` when it moves.

``FleetConfig.mobile`` picks the devices that move: a value below 1 is a share (chosen by a
stable hash of the device ID), 1 or more a count (the first devices of the fleet). A moving
device drives round a loop (``Loop``): a circle of 150-600 m about a point near the simulated
city centre at 20-60 km/h, drawn from ``random.Random(f"{mobile_seed}:{device_id}")``, with its
place a function of wall-clock time (``Loop.at``), so a test that knows the seed computes where
the device was at any Time it reported. Direction is the heading, clockwise from north;
Altitude wobbles a few metres round its base.

The platform subscribes with ``Query/MobilePosition`` and ``Interval`` (seconds, 5 when absent,
A.2.4 h): the device answers 200 (with a ``Response/MobilePosition`` OK body, as for alarms,
J.19.2) and then queues a ``Notify/MobilePosition`` in the dialog every Interval, on a fixed
schedule (no drift) until the subscription ends or expires; refreshes, expiry, unsubscription
and the NOTIFY queue are the catalog subscriptions' (fleet.py), marked
``kind="MobilePosition"``. With ``mobile_interval`` > 0 a moving device also reports by MESSAGE
every that many seconds while nobody subscribes (devices send the same body unsubscribed).
Time carries milliseconds, and the coordinates are the loop's at exactly that time. The dahua
personality writes Time with a space and leaves Altitude out, as vendor firmware does.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from gb28181 import manscdp
from gb28181.manscdp import BEIJING
from gb28181.sip.endpoint import SipTimeoutError, SipTransportError
from gb28181.sip.transaction import RequestReceived

if TYPE_CHECKING:
    from .fleet import CatalogSubscription, FleetConfig, SimDevice

__all__ = ["DeviceMobility", "Fix", "Loop", "is_mobile", "mobile_summary"]

#: Interval of a subscription whose query names none (A.2.4 h).
DEFAULT_INTERVAL = 5.0
#: Metres per degree of latitude; of longitude it is this times cos(latitude).
_M_PER_DEG = 111_320.0
#: Where loops are centred: the simulated catalog's city (catalog.py scatters channels there).
_CENTRE = (116.397, 39.908)


@dataclass(slots=True, frozen=True)
class Fix:
    """Where a device is at one moment; speed km/h, direction ° clockwise from north, altitude m."""

    longitude: float
    latitude: float
    speed: float
    direction: float
    altitude: float


@dataclass(slots=True, frozen=True)
class Loop:
    """A circle driven anticlockwise at a steady speed; ``at(t)`` is the fix at Unix time t."""

    longitude: float
    latitude: float
    radius: float      # m
    speed: float       # km/h
    phase: float       # rad at t = 0
    altitude: float    # m

    @classmethod
    def of(cls, seed: int, device_id: str) -> Loop:
        rng = random.Random(f"{seed}:{device_id}")
        return cls(longitude=_CENTRE[0] + rng.uniform(-0.1, 0.1),
                   latitude=_CENTRE[1] + rng.uniform(-0.08, 0.08),
                   radius=rng.uniform(150.0, 600.0), speed=rng.uniform(20.0, 60.0),
                   phase=rng.uniform(0.0, 2 * math.pi), altitude=rng.uniform(30.0, 80.0))

    def at(self, t: float) -> Fix:
        angle = self.phase + (self.speed / 3.6) / self.radius * t
        east, north = self.radius * math.cos(angle), self.radius * math.sin(angle)
        # Moving anticlockwise, the velocity is (-sin, cos) in (east, north): heading -angle.
        heading = math.degrees(math.atan2(-math.sin(angle), math.cos(angle))) % 360.0
        return Fix(longitude=self.longitude + east / (_M_PER_DEG * math.cos(math.radians(self.latitude))),
                   latitude=self.latitude + north / _M_PER_DEG, speed=self.speed,
                   direction=heading, altitude=self.altitude + 3.0 * math.sin(angle))


def is_mobile(cfg: FleetConfig, device_id: str) -> bool:
    """Whether ``device_id`` of a fleet with ``cfg`` moves (see the module docstring)."""
    if cfg.mobile <= 0:
        return False
    if cfg.mobile >= 1:
        return int(device_id[14:]) - int(cfg.first_id[14:]) < int(cfg.mobile)
    digest = hashlib.blake2b(device_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < cfg.mobile


@dataclass(slots=True)
class MobilityStats:
    notifies: int = 0
    messages: int = 0
    #: MESSAGEs the platform did not take (no 200, or an error status).
    refused: int = 0


class DeviceMobility:
    """One moving device's loop and its position reports; see the module docstring."""

    def __init__(self, device: SimDevice) -> None:
        self.device = device
        self.loop = Loop.of(device.cfg.mobile_seed, device.device_id)
        self.stats = MobilityStats()

    @classmethod
    def of(cls, device: SimDevice) -> DeviceMobility | None:
        return cls(device) if is_mobile(device.cfg, device.device_id) else None

    def body(self, sn: int, target: str, at: float) -> bytes:
        fix = self.loop.at(at)
        vendor = self.device.vendor
        stamp = datetime.fromtimestamp(at, BEIJING).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        if vendor.name == "dahua":
            stamp = stamp.replace("T", " ")
        fields: list[tuple[str, Any]] = [
            ("Time", stamp), ("Longitude", f"{fix.longitude:.7f}"), ("Latitude", f"{fix.latitude:.7f}"),
            ("Speed", f"{fix.speed:.1f}"), ("Direction", f"{fix.direction:.1f}")]
        if vendor.name != "dahua":
            fields.append(("Altitude", f"{fix.altitude:.1f}"))
        return vendor.body("Notify", "MobilePosition", sn, target, fields)

    # -- subscriptions (§9.11.2) --------------------------------------------------------------
    def on_subscribe(self, ev: RequestReceived, msg: manscdp.Manscdp, event: str,
                     expires: int) -> CatalogSubscription:
        device = self.device
        sub = device._new_subscription(ev, event, expires, msg.device_id or device.device_id)
        sub.kind = "MobilePosition"
        text = msg.text("Interval")
        interval = float(text) if text.isascii() and text.isdigit() else DEFAULT_INTERVAL
        interval = min(3600.0, max(1.0, interval))
        body = device.vendor.body("Response", "MobilePosition", msg.sn or 0, sub.query_id,
                                  [("Result", "OK")])
        device._reply(ev, 200, to_tag=sub.local_tag, body=body,
                      headers={"Expires": str(expires), "Contact": f"<{device._contact()}>"})
        if expires > 0:
            device.fleet.spawn(self._feed(sub, interval))
        else:
            device._end_subscription(sub)  # a fetch: accepted and over at once
        return sub

    async def _feed(self, sub: CatalogSubscription, interval: float) -> None:
        device = self.device
        fleet = device.fleet
        start = time.monotonic()
        n = 0
        while device.subscriptions.get(sub.call_id) is sub and not fleet.stopping:
            if fleet.running.is_set():
                sub.queue.put_nowait(self.body(device._next_sn(), sub.query_id, time.time()))
                self.stats.notifies += 1
            n += 1
            await fleet.sleep(start + n * interval - time.monotonic())

    # -- reports without a subscription -------------------------------------------------------
    def subscribed(self) -> bool:
        return any(s.kind == "MobilePosition" for s in self.device.subscriptions.values())

    async def run(self) -> None:
        """MESSAGE reports every ``mobile_interval`` seconds while nobody subscribes."""
        device = self.device
        fleet = device.fleet
        interval = device.cfg.mobile_interval
        while not fleet.stopping:
            await fleet.sleep(interval)
            if device.registered and fleet.running.is_set() and not self.subscribed():
                await self.report()

    async def report(self) -> bool:
        device = self.device
        body = self.body(device._next_sn(), device.device_id, time.time())
        self.stats.messages += 1
        try:
            resp = await device.ep.request(device._message(body), device.server_addr,
                                           device.cfg.transport, timeout=device.cfg.request_timeout)
        except (SipTimeoutError, SipTransportError):
            self.stats.refused += 1
            return False
        if resp.status >= 300:
            self.stats.refused += 1
            return False
        return True


def mobile_summary(mobiles: list[DeviceMobility]) -> dict[str, Any]:
    """The fleet's position figures for ``Fleet.summary``."""
    return {"mobile_devices": len(mobiles),
            "position_notifies": sum(m.stats.notifies for m in mobiles),
            "position_messages": sum(m.stats.messages for m in mobiles),
            "position_refused": sum(m.stats.refused for m in mobiles)}
