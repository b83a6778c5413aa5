"""Alarms devices report (GB/T 28181-2016 §9.4, Annex A.2.5 Notify Alarm, A.2.6 Response) and
alarm subscriptions (§9.11.1, J.18).

The flow of §9.4.2: the device sends a MESSAGE ``Notify/Alarm``; we answer it 200 at once
(steps 1-2) and then send our own MESSAGE ``Response/Alarm`` with ``Result`` OK and the alarm's
SN (step 3; A.1: a reply carries the request's SN), which the device answers 200 (step 4).
The Response goes out once the alarm is committed to the database (the registry's group commit,
``DeviceRegistry.after_commit``), so "OK" means "kept"; the alarm is published on the event bus
(events.py: SSE clients and webhooks) at the same moment, so whatever the feed shows,
``GET /api/v1/alarms`` shows too. A body that cannot be an alarm is answered 400 with the reason
instead of the 200. Alarms of a subscription arrive as NOTIFYs in its dialog (§9.11.1; the
SubscriptionManager with ``kind="Alarm"`` in subscriptions.py answers them 200); they are parsed,
stored and published the same way, without the Response MESSAGE, which belongs to §9.4's MESSAGE
flow. Resetting an alarm (DeviceControl AlarmCmd, A.2.3) is control.py's.

``parse_alarm`` is lenient where devices differ and strict where a value is unusable: AlarmType
is read from ``Info/AlarmType`` (2016) or a top-level ``AlarmType`` (2011-style firmware), a time
with a space, milliseconds or a zone is accepted and an unreadable one left out, 0/0 coordinates
mean "no position"; a missing DeviceID, a priority other than 1-4 or a method other than 1-7
are refused with a reason.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from registry.devices import DeviceRegistry
from registry.models import AlarmEvent, Device

from . import manscdp
from .events import EventBus, iso
from .queries import DeviceQueries, QueryError

__all__ = ["ALARM_METHODS", "ALARM_TYPES", "AlarmError", "AlarmService", "alarm_json",
           "parse_alarm", "subscription_fields"]

log = logging.getLogger("gb28181.alarms")

#: AlarmMethod (A.2.5 note 1).
ALARM_METHODS = {1: "phone", 2: "device", 3: "sms", 4: "gps", 5: "video", 6: "device-fault",
                 7: "other"}
#: AlarmType by AlarmMethod (A.2.5 note 2): device alarms, video analysis, device faults.
ALARM_TYPES: dict[int, dict[int, str]] = {
    2: {1: "video-loss", 2: "tamper", 3: "disk-full", 4: "high-temperature", 5: "low-temperature"},
    5: {1: "manual", 2: "motion", 3: "left-object", 4: "object-removed", 5: "tripwire",
        6: "intrusion", 7: "retrograde", 8: "loitering", 9: "flow-count", 10: "density",
        11: "video-anomaly", 12: "fast-movement"},
    6: {1: "disk-fault", 2: "fan-fault"},
}
#: AlarmTypeParam/EventType (A.2.5 note 3): intrusion entering or leaving the area.
EVENT_TYPES = {1: "enter", 2: "leave"}

_ID = re.compile(r"[0-9A-Za-z_.:@-]{1,64}")
_KNOWN = frozenset({"CmdType", "SN", "DeviceID", "AlarmPriority", "AlarmMethod", "AlarmTime",
                    "AlarmDescription", "Longitude", "Latitude", "AlarmType", "Info"})
#: Response MESSAGEs waiting for their 200 at most; beyond, an alarm is kept and published but
#: not answered (a storm of alarms from devices that do not answer must not pile up tasks).
MAX_RESPONSES = 10_000


class AlarmError(ValueError):
    """The body cannot be taken as an alarm; the message says why, ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _small_int(msg: manscdp.Manscdp, path: str, lo: int, hi: int, what: str) -> int | None:
    text = msg.text(path)
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or not lo <= int(text) <= hi:
        raise AlarmError(what, f"{what} must be {lo}-{hi}, got {text[:20]!r}")
    return int(text)


def _coordinate(text: str, limit: float) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and abs(value) <= limit else None


def parse_alarm(msg: manscdp.Manscdp, sender: str, received_at: float) -> AlarmEvent:
    """The alarm of a ``Notify/Alarm`` body sent by device ``sender``; AlarmError if unusable."""
    if msg.cmd_type != "Alarm":
        raise AlarmError("CmdType", f"not an alarm: CmdType {msg.cmd_type!r}")
    channel_id = msg.device_id
    if not channel_id:
        raise AlarmError("DeviceID", "Notify Alarm without DeviceID")
    if not _ID.fullmatch(channel_id):
        raise AlarmError("DeviceID", f"DeviceID {channel_id[:30]!r} is not a device code")
    priority = _small_int(msg, "AlarmPriority", 1, 4, "AlarmPriority")
    method = _small_int(msg, "AlarmMethod", 1, 7, "AlarmMethod")
    info: dict[str, Any] = {}
    type_text = msg.text("Info/AlarmType") or msg.text("AlarmType")
    alarm_type = int(type_text) if type_text.isascii() and type_text.isdigit() and len(type_text) < 6 else None
    if type_text and alarm_type is None:
        info["AlarmType"] = type_text[:64]
    if alarm_type is not None and method in ALARM_TYPES and alarm_type in ALARM_TYPES[method]:
        info["type_name"] = ALARM_TYPES[method][alarm_type]
    event_type = msg.text("Info/AlarmTypeParam/EventType") or msg.text("AlarmTypeParam/EventType")
    if event_type:
        info["event_type"] = EVENT_TYPES.get(int(event_type), event_type) if event_type.isdigit() else event_type[:16]
    time_text = msg.text("AlarmTime")
    when = manscdp.parse_time(time_text) if time_text else None
    if time_text and when is None:
        info["AlarmTime"] = time_text[:64]  # unreadable: kept as sent, not guessed
    longitude = _coordinate(msg.text("Longitude"), 180.0)
    latitude = _coordinate(msg.text("Latitude"), 90.0)
    if not longitude and not latitude:
        longitude = latitude = None  # devices without a position send 0/0 or nothing
    # Vendor extras (scalar children we do not read) are kept as sent.
    for el in msg.element:
        if el.tag not in _KNOWN and len(el) == 0 and el.text and len(info) < 16:
            info[el.tag[:32]] = el.text[:256]
    return AlarmEvent(
        device_id=sender, channel_id=channel_id, priority=priority, method=method,
        alarm_type=alarm_type, alarm_time=when.timestamp() if when is not None else None,
        description=msg.text("AlarmDescription")[:1024], longitude=longitude, latitude=latitude,
        received_at=received_at, info=info)


def alarm_json(a: AlarmEvent) -> dict[str, Any]:
    """An alarm as the API and the event feed show it."""
    return {
        "device_id": a.device_id, "channel_id": a.channel_id, "priority": a.priority,
        "method": a.method, "method_name": ALARM_METHODS.get(a.method or 0),
        "type": a.alarm_type, "type_name": a.info.get("type_name"),
        "alarm_time": iso(a.alarm_time), "description": a.description,
        "longitude": a.longitude, "latitude": a.latitude, "received_at": iso(a.received_at),
        "info": {k: v for k, v in a.info.items() if k != "type_name"},
    }


def subscription_fields(*, start_priority: int | None = None, end_priority: int | None = None,
                        method: str | None = None, alarm_type: str | None = None,
                        start_time: float | None = None,
                        end_time: float | None = None) -> list[tuple[str, Any]]:
    """The filter of a ``Query/Alarm`` subscription body (A.2.4 alarm query), in schema order;
    absent values are left out (the device sends every alarm)."""
    fields: list[tuple[str, Any]] = []
    if start_priority is not None:
        fields.append(("StartAlarmPriority", start_priority))
    if end_priority is not None:
        fields.append(("EndAlarmPriority", end_priority))
    if method:
        fields.append(("AlarmMethod", method))
    if alarm_type:
        fields.append(("AlarmType", alarm_type))
    if start_time is not None:
        fields.append(("StartAlarmTime", manscdp.format_time(datetime.fromtimestamp(start_time, manscdp.BEIJING))))
    if end_time is not None:
        fields.append(("EndAlarmTime", manscdp.format_time(datetime.fromtimestamp(end_time, manscdp.BEIJING))))
    return fields


class AlarmService:
    """Takes alarms from MESSAGEs and subscription NOTIFYs; see the module docstring."""

    def __init__(self, *, registry: DeviceRegistry, queries: DeviceQueries, bus: EventBus,
                 clock: Callable[[], float] = time.time, max_responses: int = MAX_RESPONSES) -> None:
        self.registry = registry
        self.queries = queries
        self.bus = bus
        self.clock = clock
        self.max_responses = max_responses
        self.received: Counter[str] = Counter()   # by how: "message", "notify"
        self.rejected: Counter[str] = Counter()   # by reason
        self.responses: Counter[str] = Counter()  # sent, failed, skipped
        self._responding: set[asyncio.Task] = set()

    def on_message(self, device: Device, msg: manscdp.Manscdp,
                   reply: Callable[..., None]) -> None:
        """A MESSAGE ``Notify/Alarm`` (§9.4.2): 200 (or 400 with the reason), store, Response."""
        try:
            alarm = parse_alarm(msg, device.device_id, self.clock())
        except AlarmError as exc:
            self.rejected[exc.field] += 1
            reply(400, f"Bad Request: {exc}"[:120].replace("\r", " ").replace("\n", " "))
            return
        reply(200)
        self.received["message"] += 1
        self._keep(device, alarm, msg.sn)

    def on_notify(self, device: Device, msg: manscdp.Manscdp) -> None:
        """A NOTIFY of an alarm subscription, already answered 200 (§9.11.1)."""
        if msg.cmd_type != "Alarm":
            return
        try:
            alarm = parse_alarm(msg, device.device_id, self.clock())
        except AlarmError as exc:
            self.rejected[exc.field] += 1
            log.info("alarm NOTIFY from %s ignored: %s", device.device_id, exc)
            return
        self.received["notify"] += 1
        self._keep(device, alarm, None)

    def _keep(self, device: Device, alarm: AlarmEvent, sn: int | None) -> None:
        self.registry.record_alarm(alarm)

        def committed(ok: bool) -> None:
            if not ok:
                # Still pending in the registry: it goes with the next flush that succeeds.
                self.registry.after_commit(committed)
                return
            self.bus.publish("alarm", alarm_json(alarm), at=alarm.received_at)
            if sn is not None:
                self._respond(device, alarm, sn)

        self.registry.after_commit(committed)

    def _respond(self, device: Device, alarm: AlarmEvent, sn: int) -> None:
        if len(self._responding) >= self.max_responses:
            self.responses["skipped"] += 1
            return
        task = asyncio.get_running_loop().create_task(self._send_response(device, alarm, sn))
        self._responding.add(task)
        task.add_done_callback(self._responding.discard)

    async def _send_response(self, device: Device, alarm: AlarmEvent, sn: int) -> None:
        # §9.4.2 step 3, A.2.6: Response/Alarm with the alarm's SN and DeviceID, Result OK.
        try:
            await self.queries.send(device, "Alarm", [("Result", "OK")], sn=sn, root="Response",
                                    target=alarm.channel_id)
        except QueryError as exc:
            self.responses["failed"] += 1
            log.info("alarm Response to %s not delivered: %s", device.device_id, exc)
            return
        self.responses["sent"] += 1

    async def stop(self) -> None:
        for task in list(self._responding):
            task.cancel()
        if self._responding:
            await asyncio.gather(*self._responding, return_exceptions=True)

    def metrics(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily
        received = CounterMetricFamily("gb28181_alarms_received", "Alarms received, by how",
                                       labels=["via"])
        for via in ("message", "notify"):
            received.add_metric([via], self.received[via])
        yield received
        rejected = CounterMetricFamily("gb28181_alarms_rejected", "Alarm bodies refused, by field",
                                       labels=["reason"])
        for reason, n in sorted(self.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        responses = CounterMetricFamily("gb28181_alarm_responses",
                                        "Response MESSAGEs to alarms (§9.4.2), by outcome",
                                        labels=["result"])
        for result in ("sent", "failed", "skipped"):
            responses.add_metric([result], self.responses[result])
        yield responses
