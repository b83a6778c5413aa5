"""HTTP API for alarms and the live event feed (GB/T 28181-2016 §9.4 alarms, §9.11.1 alarm
subscriptions); the feed itself is events.py, alarm handling alarms.py.

- ``GET /api/v1/alarms?device_id=&since=&priority=&limit=``: stored alarms, newest first (by
  when they were received). ``since``: ``24h``, ``30m``, ``now``, Unix seconds or ISO 8601;
  ``priority``: ``1`` or a range ``1-2`` (1 is the most urgent, A.2.5).
- ``GET /api/v1/events?types=alarm,device,channel``: Server-Sent Events (``id:``, ``event:``
  alarm | device.online | device.offline | channel.state | gap, ``data:`` JSON), keep-alive
  comments; ``Last-Event-ID`` (header, or ``last_event_id=``) replays what the server still holds.
- ``GET /api/v1/webhooks``: each configured webhook's queue and delivery counts.
- ``PUT /api/v1/devices/{id}/alarm-subscription`` ``{"start_priority", "end_priority",
  "method", "type", "start_time", "end_time", "expires"}`` subscribes to the device's alarms
  (refreshed until deleted or the device goes offline); ``GET`` shows it, ``DELETE`` ends it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from registry.models import Device

from .alarms import alarm_json, subscription_fields
from .api import _body, _device_or_404, _error, _int_param, _server, scope_filter
from .events import TYPES, Event, serve_sse
from .openapi import Media, doc
from .queries import QueryError
from .subscriptions import Subscription, SubscriptionManager
from .timeparse import parse_when

__all__ = ["add_event_routes"]

#: What a PUT of a subscription (alarms here, positions in api_positions) answers.
SUBSCRIBE_RESPONSES = {200: "the subscription", 404: "no such device", 409: "the device is offline",
                       502: "the device refused"}
_WHEN = "24h, 30m, now, Unix seconds or ISO 8601"

_PRIORITY = re.compile(r"([1-4])(?:\s*-\s*([1-4]))?")


@doc(summary="Stored alarms, newest first (§9.4)", query={
    "device_id": ("string", "only this device's alarms"), "since": ("string", _WHEN),
    "priority": ("string", "1-4 (1 most urgent, A.2.5) or a range such as 1-2"),
    "limit": ({"type": "integer", "minimum": 1, "maximum": 10000, "default": 100}, "at most this many")})
async def list_alarms(request: web.Request) -> web.Response:
    q = request.query
    since = None
    if q.get("since"):
        try:
            since = parse_when(q["since"])
        except ValueError as exc:
            return _error(400, f"since: {exc}")
    priorities = None
    if q.get("priority"):
        m = _PRIORITY.fullmatch(q["priority"].strip())
        if m is None:
            return _error(400, "priority must be 1-4 (1 most urgent) or a range such as 1-2")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        priorities = (min(lo, hi), max(lo, hi))
    limit = _int_param(request, "limit", 100, 1, 10000)
    alarms = await _server(request).registry.alarm_events(q.get("device_id") or None, since,
                                                          priorities, limit)
    if (sees := scope_filter(request)) is not None:
        alarms = [a for a in alarms if sees(a.channel_id or "", a.device_id)]
    return web.json_response({"alarms": [alarm_json(a) for a in alarms], "count": len(alarms)})


@doc(summary="Live events as Server-Sent Events: alarms, devices online/offline, channel states",
     query={"types": ("string", "comma-separated: alarm, device, channel"),
            "last_event_id": ("string", "as the Last-Event-ID header")},
     headers={"Last-Event-ID": ("string", "replay the events after this one that the server still holds")},
     responses={200: Media("text/event-stream", "id:, event: (alarm | device.online | device.offline | "
                           "channel.state | gap) and data: JSON, with keep-alive comments")})
async def event_stream(request: web.Request) -> web.StreamResponse:
    types = None
    if request.query.get("types"):
        types = frozenset(t.strip() for t in request.query["types"].split(",") if t.strip())
        unknown = types - set(TYPES.values())
        if unknown:
            return _error(400, f"unknown event types {sorted(unknown)}: use alarm, device, channel")
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id") or ""
    last_id = None
    if raw.strip():
        if not raw.strip().isdigit():
            return _error(400, "Last-Event-ID must be the id of an event this server sent")
        last_id = int(raw.strip())
    visible = None
    if (sees := scope_filter(request)) is not None:
        def visible(event: Event) -> bool:
            data = event.data
            return sees(str(data.get("channel_id") or data.get("target_id") or ""),
                        str(data.get("device_id") or ""))
    return await serve_sse(_server(request).events, request, last_id=last_id, types=types,
                           visible=visible)


@doc(summary="Each configured webhook's queue and delivery counts")
async def list_webhooks(request: web.Request) -> web.Response:
    return web.json_response({"webhooks": [s.as_dict() for s in _server(request).events.sinks]})


class AlarmSubscriptionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start_priority: int | None = Field(None, ge=1, le=4)
    end_priority: int | None = Field(None, ge=1, le=4)
    method: str | None = Field(None, pattern=r"^[0-7/]{1,16}$",
                               description="AlarmMethod digits, e.g. '5' or '25' (A.2.4); none: all")
    type: str | None = Field(None, pattern=r"^[0-9/]{1,16}$", description="AlarmType")
    start_time: str | None = Field(None, description="as 'since' elsewhere: 24h, ISO 8601 ...")
    end_time: str | None = None
    expires: int = Field(3600, ge=30, le=86400, description="seconds; refreshed at 80 %")


def _subscription_json(sub: Subscription | None) -> dict:
    if sub is None:
        return {"subscribed": False}
    return {"subscribed": True, "device_id": sub.device_id, "event": sub.event,
            "expires": sub.expires, "remaining": max(0, round(sub.expires_at - time.monotonic())),
            "notifies": sub.notifies, "filter": dict(sub.fields)}


@doc(summary="Subscribe to a device's alarms (§9.11.1), refreshed until deleted", body=AlarmSubscriptionBody,
     responses=SUBSCRIBE_RESPONSES)
async def put_alarm_subscription(request: web.Request) -> web.Response:
    device = _device_or_404(request)
    body = await _body(request, AlarmSubscriptionBody)
    assert isinstance(body, AlarmSubscriptionBody)
    if not device.online:
        return _error(409, f"device {device.device_id} is offline")
    try:
        start = parse_when(body.start_time) if body.start_time else None
        end = parse_when(body.end_time) if body.end_time else None
    except ValueError as exc:
        return _error(400, str(exc))
    fields = subscription_fields(start_priority=body.start_priority, end_priority=body.end_priority,
                                 method=body.method, alarm_type=body.type, start_time=start,
                                 end_time=end)
    return await subscribe_anew(_server(request).alarm_subscriptions, device, fields, body.expires,
                                _subscription_json)


async def subscribe_anew(manager: SubscriptionManager, device: Device, fields: list, expires: int,
                         to_json: Callable[[Subscription], dict]) -> web.Response:
    """Subscribe ``device`` (a running subscription of the same kind is ended first, §9.11);
    502 when the device refuses. Shared by the alarm and position subscription APIs."""
    if device.device_id in manager.by_device:
        await manager.unsubscribe(device.device_id)
    try:
        sub = await manager.subscribe(device, fields, expires)
    except QueryError as exc:
        return _error(502, str(exc))
    return web.json_response(to_json(sub))


async def end_subscription(manager: SubscriptionManager, device: Device, what: str) -> web.Response:
    """End ``device``'s subscription of ``manager``'s kind; 404 when there is none."""
    if not await manager.unsubscribe(device.device_id):
        return _error(404, f"no {what} subscription to {device.device_id}")
    return web.json_response({"subscribed": False})


@doc(summary="A device's alarm subscription", responses={200: "the subscription (subscribed: false when none)",
                                                                      404: "no such device"})
async def get_alarm_subscription(request: web.Request) -> web.Response:
    device = _device_or_404(request)
    return web.json_response(_subscription_json(
        _server(request).alarm_subscriptions.by_device.get(device.device_id)))


@doc(summary="End a device's alarm subscription", responses={200: "subscribed: false",
                                                                             404: "no such device or subscription"})
async def delete_alarm_subscription(request: web.Request) -> web.Response:
    return await end_subscription(_server(request).alarm_subscriptions, _device_or_404(request), "alarm")


def add_event_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/alarms", list_alarms)
    app.router.add_get("/api/v1/events", event_stream)
    app.router.add_get("/api/v1/webhooks", list_webhooks)
    app.router.add_put("/api/v1/devices/{device_id}/alarm-subscription", put_alarm_subscription)
    app.router.add_get("/api/v1/devices/{device_id}/alarm-subscription", get_alarm_subscription)
    app.router.add_delete("/api/v1/devices/{device_id}/alarm-subscription", delete_alarm_subscription)
