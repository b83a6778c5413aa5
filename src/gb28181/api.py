"""HTTP API (aiohttp): devices, their passwords and status history, health and metrics.

Every ``/api/`` route wants ``Authorization: Bearer <token>``; ``/healthz`` is open and
``/metrics`` is open unless ``api.metrics_public`` is false. Request bodies are pydantic
models; every error is JSON ``{"error": "..."}`` whose text says what was wrong and how to fix
it. Passwords are write-only: the API says whether a device has its own password, never what
it is.
"""

from __future__ import annotations

import hmac
import logging
import json
import re
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from registry.models import Device

from .ids import IdError, parse_id
from .metrics import CONTENT_TYPE, render
from .registrar import BEIJING

if TYPE_CHECKING:
    from .server import GbServer

__all__ = ["make_app"]

log = logging.getLogger("gb28181.api")

SERVER_KEY = web.AppKey("server", object)


def _iso(ts: float) -> str | None:
    return datetime.fromtimestamp(ts, BEIJING).isoformat(timespec="seconds") if ts else None


def device_json(d: Device) -> dict[str, Any]:
    return {
        "device_id": d.device_id, "kind": d.kind, "name": d.name,
        "manufacturer": d.manufacturer, "model": d.model, "firmware": d.firmware,
        "status": "online" if d.online else "offline",
        "transport": d.transport, "host": d.host, "port": d.port, "contact": d.contact,
        # A registration that has run out is not one (the messages handler agrees: 403).
        "expires": d.expires, "registered": d.expires_at > time.time(),
        "registered_at": _iso(d.registered_at), "expires_at": _iso(d.expires_at),
        "last_seen": _iso(d.last_seen), "keepalive_at": _iso(d.keepalive_at),
        "status_changed_at": _iso(d.status_changed_at),
        "has_password": d.password is not None,
    }


class PasswordBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: str = Field(min_length=1, max_length=64)


class NewDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: str
    password: str | None = Field(None, min_length=1, max_length=64)
    name: str = Field("", max_length=128)


def _error(status: int, text: str) -> web.Response:
    return web.json_response({"error": text}, status=status)


async def _body(request: web.Request, model: type[BaseModel]) -> BaseModel:
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise web.HTTPBadRequest(text=json.dumps({"error": "request body is not valid JSON"}),
                                 content_type="application/json") from None
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        faults = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise web.HTTPBadRequest(text=json.dumps({"error": f"invalid body: {faults}"}),
                                 content_type="application/json") from None


def _server(request: web.Request) -> GbServer:
    return request.app[SERVER_KEY]  # type: ignore[return-value]


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,9}", raw) or not lo <= int(raw) <= hi:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"query parameter {name} must be an integer from {lo} to {hi}"}),
            content_type="application/json")
    return int(raw)


def _device_or_404(request: web.Request) -> Device:
    device_id = request.match_info["device_id"]
    device = _server(request).registry.get(device_id)
    if device is None:
        raise web.HTTPNotFound(text=json.dumps({"error": f"no device {device_id}"}),
                               content_type="application/json")
    return device


@web.middleware
async def _auth_and_errors(request: web.Request, handler):
    server = _server(request)
    path = request.path
    public = path == "/healthz" or (path == "/metrics" and server.config.api.metrics_public)
    if not public:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.query.get("token", "")
        if not token or not hmac.compare_digest(token.encode(), server.api_token.encode()):
            return web.json_response(
                {"error": "missing or wrong API token: send 'Authorization: Bearer <token>' "
                          "(the token is api.token in the config, or DATA_DIR/api-token)"},
                status=401, headers={"WWW-Authenticate": 'Bearer realm="gb28181"'})
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type != "application/json" and exc.status >= 400:
            return _error(exc.status, exc.reason)
        raise
    except Exception:  # a bug must still answer in the API's JSON shape, and be logged
        log.exception("error serving %s %s", request.method, request.path)
        return _error(500, "internal error; the server log has the details")


async def healthz(request: web.Request) -> web.Response:
    server = _server(request)
    total, online = server.registry.counts()
    return web.json_response({"status": "ok", "devices": total, "online": online})


async def metrics(request: web.Request) -> web.Response:
    body = render(_server(request).metrics_registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def list_devices(request: web.Request) -> web.Response:
    status = request.query.get("status")
    if status not in (None, "online", "offline"):
        return _error(400, "status must be 'online' or 'offline'")
    offset = _int_param(request, "offset", 0, 0, 10**9)
    limit = _int_param(request, "limit", 100, 1, 1000)
    kind = request.query.get("kind") or None
    online = None if status is None else status == "online"
    total, devices = _server(request).registry.query(online=online, kind=kind, offset=offset, limit=limit)
    return web.json_response({"total": total, "offset": offset, "limit": limit,
                              "devices": [device_json(d) for d in devices]})


async def get_device(request: web.Request) -> web.Response:
    return web.json_response(device_json(_device_or_404(request)))


async def create_device(request: web.Request) -> web.Response:
    body = await _body(request, NewDevice)
    assert isinstance(body, NewDevice)
    try:
        gid = parse_id(body.device_id)
    except IdError as exc:
        return _error(400, str(exc))
    registry = _server(request).registry
    if registry.get(body.device_id) is not None:
        return _error(409, f"device {body.device_id} exists; use PUT .../password to change its password")
    device = registry.add(Device(device_id=body.device_id, kind=gid.kind, name=body.name,
                                 password=body.password))
    return web.json_response(device_json(device), status=201)


async def set_password(request: web.Request) -> web.Response:
    body = await _body(request, PasswordBody)
    assert isinstance(body, PasswordBody)
    device_id = request.match_info["device_id"]
    registry = _server(request).registry
    device = registry.get(device_id)
    if device is None:
        try:
            gid = parse_id(device_id)
        except IdError as exc:
            return _error(400, str(exc))
        device = registry.add(Device(device_id=device_id, kind=gid.kind, password=body.password))
        return web.json_response(device_json(device), status=201)
    device.password = body.password
    registry.touch(device)
    return web.json_response(device_json(device))


async def delete_device(request: web.Request) -> web.Response:
    device = _device_or_404(request)
    server = _server(request)
    server.presence.forget(device.device_id)
    server.registry.remove(device.device_id)
    return web.json_response({"deleted": device.device_id})


async def device_events(request: web.Request) -> web.Response:
    device = _device_or_404(request)
    limit = _int_param(request, "limit", 100, 1, 10000)
    events = await _server(request).registry.status_events(device_id=device.device_id, limit=limit)
    return web.json_response({"device_id": device.device_id, "events": [
        {"status": "online" if e.online else "offline", "at": _iso(e.at), "reason": e.reason}
        for e in events]})


def make_app(server: GbServer) -> web.Application:
    app = web.Application(middlewares=[_auth_and_errors], client_max_size=1024 * 1024)
    app[SERVER_KEY] = server
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/devices", list_devices)
    app.router.add_post("/api/v1/devices", create_device)
    app.router.add_get("/api/v1/devices/{device_id}", get_device)
    app.router.add_delete("/api/v1/devices/{device_id}", delete_device)
    app.router.add_put("/api/v1/devices/{device_id}/password", set_password)
    app.router.add_get("/api/v1/devices/{device_id}/events", device_events)
    return app
