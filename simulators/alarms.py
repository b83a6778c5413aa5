"""Alarms of one simulated device (GB/T 28181-2016 §9.4, Annex A.2.5) and its alarm
subscriptions (§9.11.1, J.18); fleet.py's ``SimDevice`` owns one ``DeviceAlarms``.

With ``FleetConfig.alarm_interval`` set, a registered device raises an alarm now and then (an
exponential gap with that mean, so a fleet does not pulse). What it raises is pseudo-random but
deterministic: each device draws from ``random.Random(f"{alarm_seed}:{device_id}")``, so a run
with the same seed raises the same alarms (priority 1-4, method 2 device / 5 video / 6 fault
with a type from A.2.5's tables; video alarms name a camera, the others the device). AlarmTime
carries milliseconds (xs:dateTime allows them; the platform reads them), which is what lets a
benchmark measure alarm-to-webhook latency across processes.

An alarm goes as a MESSAGE ``Notify/Alarm`` to the platform (§9.4.2 step 1), whose
``Response/Alarm`` with the same SN (step 3) is counted with its delay; alarms matching the
filter of an alarm subscription the platform opened go as NOTIFYs in that dialog instead (the
subscription is the platform's request to get them that way). SUBSCRIBEs with a ``Query/Alarm``
body are accepted here when the fleet raises alarms (``alarm_interval`` > 0; otherwise 489);
refreshes, expiry, unsubscription and the NOTIFY queue are the catalog
subscriptions' (fleet.py), marked ``kind="Alarm"``.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from gb28181 import manscdp
from gb28181.manscdp import BEIJING
from gb28181.sip.endpoint import SipTimeoutError, SipTransportError
from gb28181.sip.transaction import RequestReceived

if TYPE_CHECKING:
    from .fleet import CatalogSubscription, SimDevice

__all__ = ["AlarmFilter", "AlarmStats", "DeviceAlarms", "alarm_summary"]

#: AlarmType values by AlarmMethod (A.2.5): 2 device, 5 video analysis, 6 device fault.
_TYPES = {2: (1, 2, 3, 4, 5), 5: tuple(range(1, 13)), 6: (1, 2)}
_DESCRIPTIONS = {2: "设备报警", 5: "视频报警", 6: "设备故障报警"}
#: Alarms sent whose Response we still wait for, per device, at most.
_PENDING = 256


@dataclass(slots=True)
class AlarmStats:
    sent: int = 0
    #: MESSAGEs the platform did not take (no 200, or an error status).
    refused: int = 0
    notifies: int = 0
    responses: int = 0
    response_delays: list[float] = field(default_factory=list)


@dataclass(slots=True)
class AlarmFilter:
    """The filter of a ``Query/Alarm`` subscription body (A.2.4); empty fields match all."""

    start_priority: int = 1
    end_priority: int = 4
    methods: str = ""
    types: str = ""
    start_time: float | None = None
    end_time: float | None = None

    @classmethod
    def of(cls, msg: manscdp.Manscdp) -> AlarmFilter:
        def number(tag: str, default: int) -> int:
            text = msg.text(tag)
            return int(text) if text.isdigit() and 1 <= int(text) <= 4 else default

        def when(tag: str) -> float | None:
            dt = manscdp.parse_time(msg.text(tag))
            return dt.timestamp() if dt is not None else None

        methods = msg.text("AlarmMethod")
        return cls(number("StartAlarmPriority", 1), number("EndAlarmPriority", 4),
                   "" if methods in ("", "0") else methods, msg.text("AlarmType"),
                   when("StartAlarmTime"), when("EndAlarmTime"))

    def matches(self, priority: int, method: int, alarm_type: int, at: float) -> bool:
        return (self.start_priority <= priority <= self.end_priority
                and (not self.methods or str(method) in self.methods)
                and (not self.types or str(alarm_type) in self.types.split("/"))
                and (self.start_time is None or at >= self.start_time)
                and (self.end_time is None or at <= self.end_time))


class DeviceAlarms:
    """Raises one device's alarms and answers its alarm subscriptions; see the module docstring."""

    def __init__(self, device: SimDevice) -> None:
        self.device = device
        self.rng = random.Random(f"{device.cfg.alarm_seed}:{device.device_id}")
        self.stats = AlarmStats()
        #: SN → when the alarm was sent, for alarms still waiting for their Response.
        self.pending: OrderedDict[int, float] = OrderedDict()
        #: Filters of the alarm subscriptions on this device, by Call-ID.
        self.filters: dict[str, AlarmFilter] = {}

    # -- raising alarms ----------------------------------------------------------------------
    async def run(self) -> None:
        device = self.device
        fleet = device.fleet
        interval = device.cfg.alarm_interval
        while not fleet.stopping:
            await fleet.sleep(self.rng.expovariate(1.0 / interval))
            if device.registered and fleet.running.is_set():
                await self.raise_alarm()

    def draw(self) -> tuple[int, int, int, str]:
        """(priority, method, type, DeviceID) of the next alarm."""
        rng = self.rng
        method = rng.choice((2, 5, 5, 5, 6))
        alarm_type = rng.choice(_TYPES[method])
        priority = rng.randint(1, 4)
        cameras = self.device.channels
        target = rng.choice(cameras).channel_id if method == 5 and cameras else self.device.device_id
        return priority, method, alarm_type, target

    def body(self, root: str, sn: int, priority: int, method: int, alarm_type: int, target: str,
             at: float) -> bytes:
        stamp = datetime.fromtimestamp(at, BEIJING).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        fields: list[tuple[str, Any]] = [
            ("AlarmPriority", priority), ("AlarmMethod", method), ("AlarmTime", stamp),
            ("AlarmDescription", f"{_DESCRIPTIONS[method]} {alarm_type}"),
            ("Longitude", "116.397"), ("Latitude", "39.908"),
            ("Info", manscdp.Node({}, [("AlarmType", alarm_type)]
                                  + ([("AlarmTypeParam", manscdp.Node({}, [("EventType", 1)]))]
                                     if (method, alarm_type) == (5, 6) else [])))]
        return self.device.vendor.body(root, "Alarm", sn, target, fields)

    async def raise_alarm(self) -> bool:
        """Send one alarm (MESSAGE, or NOTIFY in matching subscriptions); True if delivered."""
        device = self.device
        priority, method, alarm_type, target = self.draw()
        now = time.time()
        sn = device._next_sn()
        subs = [sub for sub in device.subscriptions.values()
                if sub.kind == "Alarm" and sub.call_id in self.filters
                and self.filters[sub.call_id].matches(priority, method, alarm_type, now)]
        self.stats.sent += 1
        if subs:
            body = self.body("Notify", sn, priority, method, alarm_type, target, now)
            for sub in subs:
                sub.queue.put_nowait(body)
            self.stats.notifies += len(subs)
            return True
        body = self.body("Notify", sn, priority, method, alarm_type, target, now)
        self.pending[sn] = time.monotonic()
        while len(self.pending) > _PENDING:
            self.pending.popitem(last=False)
        try:
            resp = await device.ep.request(device._message(body), device.server_addr,
                                           device.cfg.transport, timeout=device.cfg.request_timeout)
        except (SipTimeoutError, SipTransportError):
            self.stats.refused += 1
            return False
        if resp.status >= 300:
            self.stats.refused += 1
            self.pending.pop(sn, None)
            return False
        return True

    def on_response(self, msg: manscdp.Manscdp) -> None:
        """The platform's ``Response/Alarm`` (§9.4.2 step 3), already answered 200."""
        sent = self.pending.pop(msg.sn, None) if msg.sn is not None else None
        if sent is None:
            return  # not one we wait for (a duplicate, or an SN we gave up on)
        self.stats.responses += 1
        delays = self.stats.response_delays
        if len(delays) < 10_000:
            delays.append(time.monotonic() - sent)

    # -- alarm subscriptions (§9.11.1) --------------------------------------------------------
    def on_subscribe(self, ev: RequestReceived, msg: manscdp.Manscdp, event: str,
                     expires: int) -> CatalogSubscription:
        """Accept a new alarm subscription: 200 with a ``Response/Alarm`` OK body (J.19.2)."""
        device = self.device
        sub = device._new_subscription(ev, event, expires, msg.device_id or device.device_id)
        sub.kind = "Alarm"
        self.filters[sub.call_id] = AlarmFilter.of(msg)
        body = device.vendor.body("Response", "Alarm", msg.sn or 0, sub.query_id, [("Result", "OK")])
        device._reply(ev, 200, to_tag=sub.local_tag, body=body,
                      headers={"Expires": str(expires), "Contact": f"<{device._contact()}>"})
        return sub


def alarm_summary(alarms: list[DeviceAlarms]) -> dict[str, Any]:
    """The fleet's alarm figures for ``Fleet.summary``."""
    delays = sorted(d for a in alarms for d in a.stats.response_delays)

    def pct(p: float) -> float | None:
        return round(delays[min(len(delays) - 1, int(p * len(delays)))] * 1000, 2) if delays else None

    return {"alarms_sent": sum(a.stats.sent for a in alarms),
            "alarms_refused": sum(a.stats.refused for a in alarms),
            "alarm_notifies": sum(a.stats.notifies for a in alarms),
            "alarm_responses": sum(a.stats.responses for a in alarms),
            "alarm_response_ms": {"p50": pct(0.5), "p99": pct(0.99)}}
