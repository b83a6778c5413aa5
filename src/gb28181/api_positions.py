"""HTTP API for mobile positions (GB/T 28181-2016 §9.11.2, A.2.4 h, A.2.5 e); handling is
positions.py, the subscription dialogs subscriptions.py.

- ``GET /api/v1/devices/{id}/positions?since=&until=&limit=``: the device's stored track, oldest
  first (by when each fix was received), at most ``limit`` (default 1000, up to 10000) fixes.
  ``since``/``until``: ``24h``, ``30m``, ``now``, Unix seconds or ISO 8601; without ``since`` the
  track starts at the oldest fix kept (``positions.keep_days``).
- ``PUT /api/v1/devices/{id}/position-subscription`` ``{"interval": s, "expires": s}`` subscribes
  to the device's positions every ``interval`` seconds (A.2.4 h; 5 by default), refreshed until
  deleted or the device goes offline; ``GET`` shows it, ``DELETE`` ends it.

The device's latest fix is ``position`` in ``GET /api/v1/devices/{id}``.
"""

from __future__ import annotations

import time

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from .api import _body, _device_or_404, _error, _int_param, _server
from .api_events import _WHEN, SUBSCRIBE_RESPONSES, end_subscription, subscribe_anew
from .openapi import doc
from .positions import DEFAULT_INTERVAL, position_json
from .subscriptions import Subscription
from .timeparse import parse_when

__all__ = ["add_position_routes"]


@doc(summary="A device's stored track, oldest first (§9.11.2)", query={
    "since": ("string", _WHEN), "until": ("string", _WHEN),
    "limit": ({"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000}, "at most this many fixes")},
     responses={404: "no such device"})
async def device_positions(request: web.Request) -> web.Response:
    device = _device_or_404(request)
    q = request.query
    bounds: dict[str, float | None] = {"since": None, "until": None}
    for name in bounds:
        if q.get(name):
            try:
                bounds[name] = parse_when(q[name])
            except ValueError as exc:
                return _error(400, f"{name}: {exc}")
    limit = _int_param(request, "limit", 1000, 1, 10000)
    track = await _server(request).registry.position_events(
        device.device_id, bounds["since"], bounds["until"], limit)
    return web.json_response({"device_id": device.device_id, "count": len(track),
                              "positions": [position_json(p) for p in track]})


class PositionSubscriptionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    interval: int = Field(DEFAULT_INTERVAL, ge=1, le=3600,
                          description="seconds between the device's NOTIFYs (A.2.4 Interval)")
    expires: int = Field(3600, ge=30, le=86400, description="seconds; refreshed at 80 %")


def _subscription_json(sub: Subscription | None) -> dict:
    if sub is None:
        return {"subscribed": False}
    fields = dict(sub.fields)
    return {"subscribed": True, "device_id": sub.device_id, "event": sub.event,
            "interval": fields.get("Interval"), "expires": sub.expires,
            "remaining": max(0, round(sub.expires_at - time.monotonic())), "notifies": sub.notifies}


@doc(summary="Subscribe to a device's positions (A.2.4 h), refreshed until deleted",
     body=PositionSubscriptionBody, responses=SUBSCRIBE_RESPONSES)
async def put_position_subscription(request: web.Request) -> web.Response:
    device = _device_or_404(request)
    body = await _body(request, PositionSubscriptionBody)
    assert isinstance(body, PositionSubscriptionBody)
    if not device.online:
        return _error(409, f"device {device.device_id} is offline")
    return await subscribe_anew(_server(request).position_subscriptions, device,
                                [("Interval", body.interval)], body.expires, _subscription_json)


@doc(summary="A device's position subscription",
     responses={200: "the subscription (subscribed: false when none)", 404: "no such device"})
async def get_position_subscription(request: web.Request) -> web.Response:
    device = _device_or_404(request)
    return web.json_response(_subscription_json(
        _server(request).position_subscriptions.by_device.get(device.device_id)))


@doc(summary="End a device's position subscription",
     responses={200: "subscribed: false", 404: "no such device or subscription"})
async def delete_position_subscription(request: web.Request) -> web.Response:
    return await end_subscription(_server(request).position_subscriptions, _device_or_404(request),
                                  "position")


def add_position_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/devices/{device_id}/positions", device_positions)
    path = "/api/v1/devices/{device_id}/position-subscription"
    app.router.add_put(path, put_position_subscription)
    app.router.add_get(path, get_position_subscription)
    app.router.add_delete(path, delete_position_subscription)
