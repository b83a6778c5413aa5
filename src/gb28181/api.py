"""HTTP API (aiohttp): devices, their passwords and status history, health and metrics.

Every ``/api/`` route wants ``Authorization: Bearer <token>``; ``/healthz`` is open and
``/metrics`` is open unless ``api.metrics_public`` is false. Request bodies are pydantic
models; every error is JSON ``{"error": "..."}`` whose text says what was wrong and how to fix
it. Passwords are write-only: the API says whether a device has its own password, never what
it is.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from media.node_service import LINK_PATH
from media.playurl import check_play
from registry.models import CHANNEL_STATES, Channel, Device

from .ids import IdError, parse_id
from .metrics import CONTENT_TYPE, render
from .openapi import DOCS_PATH, OPENAPI_PATH
from .queries import QueryError
from .registrar import BEIJING
from .timeparse import parse_when
from .users import API_TOKEN, PLAY_URL, PRINCIPAL, SESSION_COOKIE, Scope, needed_role

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
        "auth_username": d.extra.get("auth_username"),
        "fault": _fault_json(d),
        "heartbeat": {"interval": d.extra["heartbeat_interval"],
                      "count": d.extra.get("heartbeat_count")} if "heartbeat_interval" in d.extra else None,
        "position": d.extra.get("position"),  # the latest mobile position fix (positions.py)
    }


class PasswordBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: str = Field(min_length=1, max_length=64)


AUTH_USERNAME = Field(None, max_length=64, pattern=r"^[^\s\"\\]*$",
                      description="digest username the device must use; empty or absent: any "
                                  "(Hikvision's 'SIP user authentication ID' may differ from the "
                                  "device ID)")


class NewDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    device_id: str
    password: str | None = Field(None, min_length=1, max_length=64)
    name: str = Field("", max_length=128)
    auth_username: str | None = AUTH_USERNAME


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
        raise _not_found(f"no device {device_id}")
    return device


def _scope(request: web.Request) -> Scope | None:
    """The scope of the user asking, or None when it sees everything (no user, or no scope)."""
    principal = request.get(PRINCIPAL)
    return None if principal is None or principal.scope.everything else principal.scope


@web.middleware
async def _count_requests(request: web.Request, handler):
    """Every answer counted by method, route (its template, so IDs do not make new series) and
    status: ``gb28181_http_requests_total`` (API errors in the dashboards and alerts)."""
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "(no route)"
        _server(request).http_requests[(request.method, route, status)] += 1


@web.middleware
async def _auth_and_errors(request: web.Request, handler):
    """Who is asking (``request[users.PRINCIPAL]``), may they (users.RULES, users.Scope), and
    every error as JSON."""
    server = _server(request)
    path = request.path
    # The node link checks the node token itself (nodes.NodeManager.link). The console's static
    # files, the API description and the sign-in hold no data, and must load before one signs in.
    public = (path in ("/healthz", LINK_PATH, "/", DOCS_PATH, OPENAPI_PATH)
              or path.startswith("/console/")
              or (path == "/api/v1/session" and request.method == "POST")
              or (path == "/metrics" and server.config.api.metrics_public))
    principal = None
    if not public and path.startswith("/live/") and "sig" in request.query:
        if not check_play(server.api_token, request.match_info.get("channel_id", ""), request.query):
            return web.json_response({"error": "play URL signature is wrong or expired: ask "
                                      "POST /api/v1/channels/{id}/play for a new URL"}, status=403)
        public, principal = True, PLAY_URL
    if not public:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.query.get("token", "")
        cookie = request.cookies.get(SESSION_COOKIE, "")
        users = server.users
        user, via = None, "token"
        if token:
            if hmac.compare_digest(token.encode(), server.api_token.encode()):
                principal = API_TOKEN
            else:
                user = users.by_token(token)
        elif cookie:
            user, via = users.session(cookie), "session"
        if user is not None:
            if user.disabled:
                return _error(403, f"user {user.name} is disabled; an admin enables it with "
                                   f"PATCH /api/v1/users/{user.name} {{\"disabled\": false}}")
            principal = users.principal(user.name, via)
        if principal is None:
            return web.json_response(
                {"error": "missing or wrong credentials: send 'Authorization: Bearer <token>' (the "
                          "API token is api.token in the config, or DATA_DIR/api-token; a user's "
                          "from POST /api/v1/users/{name}/tokens), or sign in with POST "
                          "/api/v1/session"},
                status=401, headers={"WWW-Authenticate": 'Bearer realm="gb28181"'})
        # An unknown route or method keeps its 404/405: there is nothing to authorise.
        if request.match_info.http_exception is None:
            needed = needed_role(request.method, path)
            if not principal.may(needed):
                return _error(403, f"{request.method} {path} needs the {needed} role; "
                                   f"{principal.name} has the {principal.role} role (an admin "
                                   f"changes it: PATCH /api/v1/users/{principal.name})")
        if not principal.scope.everything:
            # Out of scope is as if unknown (404): a viewer learns nothing of other areas.
            cid = request.match_info.get("channel_id") or request.match_info.get("stream_id")
            channel = server.channels.get(cid) if cid else None
            if channel is not None and not principal.scope.covers(channel):
                return _error(404, f"no channel {cid}")
            did = request.match_info.get("device_id")
            if did and not principal.scope.covers_device(did, server.channels.of_device(did)):
                return _error(404, f"no device {did}")
    if principal is not None:
        request[PRINCIPAL] = principal
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
    return web.json_response({"status": "ok", "devices": total, "online": online,
                              **server.addresses()})


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
    server = _server(request)
    if (scope := _scope(request)) is not None:
        # A user's scope is no store query: filter the devices in memory, then page.
        seen = [d for d in server.registry if (online is None or d.online == online)
                and (kind is None or d.kind == kind)
                and scope.covers_device(d.device_id, server.channels.of_device(d.device_id))]
        seen.sort(key=lambda d: d.device_id)
        return web.json_response({"total": len(seen), "offset": offset, "limit": limit,
                                  "devices": [device_json(d) for d in seen[offset:offset + limit]]})
    total, devices = server.registry.query(online=online, kind=kind, offset=offset, limit=limit)
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
    device = Device(device_id=body.device_id, kind=gid.kind, name=body.name, password=body.password)
    if body.auth_username:
        device.extra["auth_username"] = body.auth_username
    registry.add(device)
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
    events = await _server(request).registry.status_events(device_id=device.device_id, limit=limit,
                                                           newest_first=True)
    return web.json_response({"device_id": device.device_id, "events": [
        {"status": "online" if e.online else "offline", "at": _iso(e.at), "reason": e.reason}
        for e in events]})


async def device_faults(request: web.Request) -> web.Response:
    device = _device_or_404(request)
    limit = _int_param(request, "limit", 100, 1, 10000)
    events = await _server(request).registry.fault_events(device.device_id, limit=limit)
    return web.json_response({"device_id": device.device_id, "fault": _fault_json(device),
                              "events": [{"status": e.status, "devices": list(e.devices),
                                          "at": _iso(e.at)} for e in events]})


def _fault_json(d: Device) -> dict[str, Any] | None:
    fault = d.extra.get("fault")
    if not fault:
        return None
    return {"status": fault.get("status"), "devices": fault.get("devices", []),
            "since": _iso(fault.get("since", 0.0))}


# -- channels, tree, sync, live queries, reports (the device archive) --------------------------

def channel_json(c: Channel) -> dict[str, Any]:
    return {
        "channel_id": c.channel_id, "device_id": c.device_id, "kind": c.kind, "name": c.name,
        "manufacturer": c.manufacturer, "model": c.model, "owner": c.owner,
        "civil_code": c.civil_code, "block": c.block, "address": c.address,
        "parental": c.parental, "parent_id": c.parent_id, "business_group_id": c.business_group_id,
        "safety_way": c.safety_way, "register_way": c.register_way, "secrecy": c.secrecy,
        "ip_address": c.ip_address, "port": c.port, "reported_status": c.status,
        "state": c.state, "status": "offline" if c.state == "OFF" else "online",
        "longitude": c.longitude, "latitude": c.latitude, "ptz_type": c.ptz_type,
        "info": c.info, "tier": c.tier, "tier_locked": c.tier_locked,
        "state_changed_at": _iso(c.state_changed_at), "seen_at": _iso(c.seen_at),
        "created_at": _iso(c.created_at), "updated_at": _iso(c.updated_at),
    }


def _channel_or_404(request: web.Request) -> Channel:
    channel_id = request.match_info["channel_id"]
    channel = _server(request).channels.get(channel_id)
    if channel is None:
        raise _not_found(f"no channel {channel_id}")
    return channel


def _bad(text: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": text}), content_type="application/json")


def _not_found(text: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(text=json.dumps({"error": text}), content_type="application/json")


async def list_channels(request: web.Request, device_id: str | None = None) -> web.Response:
    q = request.query
    offset = _int_param(request, "offset", 0, 0, 10**9)
    limit = _int_param(request, "limit", 100, 1, 1000)
    tier = _int_param(request, "tier", 0, 1, 3) if "tier" in q else None
    state = q.get("state")
    if state is not None and state.upper() not in CHANNEL_STATES:
        raise _bad(f"state must be one of {', '.join(CHANNEL_STATES)}")
    status = q.get("status")
    if status not in (None, "online", "offline"):
        raise _bad("status must be 'online' or 'offline'")
    if status == "offline":
        state = "OFF"
    missing = q.get("missing_location")
    if missing not in (None, "true", "false"):
        raise _bad("missing_location must be 'true' or 'false'")
    filters: dict[str, Any] = dict(device_id=device_id or q.get("device_id") or None,
                   civil_code=q.get("civil_code") or None,
                   tier=tier, state=state.upper() if state else None, kind=q.get("kind") or None,
                   text=q.get("text") or None, parent_id=q.get("parent_id") or None,
                   missing_location=None if missing is None else missing == "true")
    channels = _server(request).channels
    scope = _scope(request)
    if status == "online" or scope is not None:
        # "online" spans three states (ON, VLOST, DEFECT), and a user's scope is no store
        # filter: both are applied to the full match here, in memory.
        _, everything = channels.query(**filters, offset=0, limit=10**9)
        matching = [c for c in everything if (status != "online" or c.state != "OFF")
                    and (scope is None or scope.covers(c))]
        total, page = len(matching), matching[offset:offset + limit]
    else:
        total, page = channels.query(**filters, offset=offset, limit=limit)
    return web.json_response({"total": total, "offset": offset, "limit": limit,
                              "channels": [channel_json(c) for c in page]})


async def device_channels(request: web.Request) -> web.Response:
    device = _device_or_404(request)
    return await list_channels(request, device.device_id)


async def get_channel(request: web.Request) -> web.Response:
    return web.json_response(channel_json(_channel_or_404(request)))


class ChannelPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tier: int | None = Field(None, ge=1, le=3, description="1-3 locks the tier; null with unlock_tier")
    unlock_tier: bool = False
    name: str | None = Field(None, max_length=128)
    address: str | None = Field(None, max_length=256)
    longitude: float | None = Field(None, ge=-180, le=180)
    latitude: float | None = Field(None, ge=-90, le=90)
    recording: Literal["continuous", "alarm", "schedule", "off", "tier"] | None = Field(
        None, description="the channel's own recording mode; 'tier': back to its tier's plan")


async def patch_channel(request: web.Request) -> web.Response:
    channel = _channel_or_404(request)
    body = await _body(request, ChannelPatch)
    assert isinstance(body, ChannelPatch)
    server = _server(request)
    if body.tier is not None:
        channel.tier = body.tier
        channel.tier_locked = True
    if body.unlock_tier:
        from .tiers import apply_tier
        channel.tier_locked = False
        apply_tier(channel, server.config.tiers)
    for key in ("name", "address", "longitude", "latitude"):
        value = getattr(body, key)
        if value is not None:
            setattr(channel, key, value)
    if body.recording is not None:
        await server.recordings.set_mode(channel.channel_id, None if body.recording == "tier" else body.recording)
    server.channels.touch(channel)
    return web.json_response(channel_json(channel))


class DevicePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=128)
    charset: str | None = Field(None, pattern="^(GB2312|GB18030|UTF-8)$",
                                description="charset of bodies sent to this device")
    media_transport: str | None = Field(None, pattern="^(udp|tcp-passive|tcp-active)$",
                                        description="default media transport for this device")
    auth_username: str | None = AUTH_USERNAME


async def patch_device(request: web.Request) -> web.Response:
    device = _device_or_404(request)
    body = await _body(request, DevicePatch)
    assert isinstance(body, DevicePatch)
    if body.name is not None:
        device.name = body.name
    if body.charset is not None:
        device.extra["charset"] = body.charset
    if body.media_transport is not None:
        device.extra["media_transport"] = body.media_transport
    if body.auth_username is not None:
        if body.auth_username:
            device.extra["auth_username"] = body.auth_username
        else:
            device.extra.pop("auth_username", None)
    _server(request).registry.touch(device)
    out = device_json(device)
    out["charset"] = device.extra.get("charset")
    out["media_transport"] = device.extra.get("media_transport")
    return web.json_response(out)


async def sync_device(request: web.Request) -> web.Response:
    device = _device_or_404(request)
    if not device.online:
        return _error(409, f"device {device.device_id} is offline; it must register before a sync")
    result = await _server(request).sync.schedule(device, asked=True)
    return web.json_response(result.as_dict(), status=200 if not result.error else 502)


_LIVE = {"info": ("DeviceInfo", ()), "status": ("DeviceStatus", ()),
         "config": ("ConfigDownload", (("ConfigType", "BasicParam"),)),
         "presets": ("PresetQuery", ())}


async def live_query(request: web.Request) -> web.Response:
    device = _device_or_404(request)
    what = request.match_info["what"]
    cmd_type, fields = _LIVE[what]
    target = request.query.get("channel_id") or device.device_id
    if not device.online:
        return _error(409, f"device {device.device_id} is offline")
    server = _server(request)
    try:
        msg = await server.queries.query(device, cmd_type, fields, timeout=10.0, target=target)
    except QueryError as exc:
        return _error(504, str(exc))
    from .manscdp import element_to_dict
    return web.json_response({"device_id": device.device_id, "cmd_type": msg.cmd_type,
                              "response": element_to_dict(msg.element)})


async def channel_records(request: web.Request) -> web.Response:
    """Record search (RecordInfo, GB/T 28181-2016 §9.7): the device's recordings of a channel,
    or with ``source=platform`` the platform's own (api_recording.py)."""
    from .records import RecordQuery, RecordSearch
    source = request.query.get("source", "device")
    if source == "platform":
        from .api_recording import platform_records
        return await platform_records(request)
    if source != "device":
        raise _bad("source must be 'device' (the device's recordings, RecordInfo) or 'platform'")
    server = _server(request)
    channel = _channel_or_404(request)
    device = server.registry.get(channel.device_id)
    if device is None or not device.online:
        return _error(409, f"device {channel.device_id} of channel {channel.channel_id} is offline; "
                           "records can be searched once it is back online")
    search = RecordSearch(server.queries, server.config.records)
    try:
        query = RecordQuery.from_params(channel.channel_id, request.query)
        search.windows(query)
    except ValueError as exc:
        return _error(400, str(exc))
    who, source = _who(request)
    span = {"start": _iso(query.start.timestamp()), "end": _iso(query.end.timestamp()), "type": query.type}
    try:
        result = await search.search(device, query)
    except QueryError as exc:
        server.audit.record("record-search-failed", who=who, source=source,
                            target=channel.channel_id, error=str(exc), **span)
        return _error(504, str(exc))
    server.audit.record("record-search", who=who, source=source, target=channel.channel_id,
                        items=len(result.records), **span)
    return web.json_response(result.as_json())


def _node(node_id: str, name: str, kind: str) -> dict[str, Any]:
    return {"id": node_id, "name": name, "kind": kind, "channels": 0, "children": []}


async def tree(request: web.Request) -> web.Response:
    """Civil-code (province/city/district/unit) or business-group/virtual-org tree with counts."""
    by = request.query.get("by", "civil")
    if by not in ("civil", "group"):
        raise _bad("by must be 'civil' or 'group'")
    leaves = request.query.get("channels") == "true"
    channels = list(_server(request).channels)
    names = {c.channel_id: c.name for c in channels if c.kind in ("civil-code", "business-group", "virtual-org")}
    if (scope := _scope(request)) is not None:
        channels = [c for c in channels if scope.covers(c)]  # counts in scope only
    root = _node("", "root", "root")
    index: dict[str, dict] = {"": root}

    def ensure(node_id: str, kind: str, parent: str) -> dict:
        node = index.get(node_id)
        if node is None:
            node = index[node_id] = _node(node_id, names.get(node_id, node_id), kind)
            index[parent]["children"].append(node)
        return node

    for c in channels:
        if c.kind != "channel":
            continue
        path: list[dict] = [root]
        if by == "civil":
            code = c.civil_code if c.civil_code.isdigit() else c.channel_id[:8]
            parent = ""
            for n in (2, 4, 6, 8):
                if len(code) >= n and (n == 2 or code[n - 2:n] != "00"):
                    path.append(ensure(code[:n], "civil-code", parent))
                    parent = code[:n]
        else:
            parent = ""
            groups = [p for p in c.parent_id.split("/") if len(p) == 20 and p[10:13] in ("215", "216")]
            bg = c.business_group_id or next((g for g in groups if g[10:13] == "215"), "")
            if bg:
                path.append(ensure(bg, "business-group", parent))
                parent = bg
            for vo in (g for g in groups if g[10:13] == "216"):
                path.append(ensure(vo, "virtual-org", parent))
                parent = vo
            if len(path) == 1:
                path.append(ensure("ungrouped", "none", ""))
        for node in path:
            node["channels"] += 1
        if leaves:
            path[-1]["children"].append({"id": c.channel_id, "name": c.name, "kind": "channel",
                                         "state": c.state, "tier": c.tier})
    return web.json_response({"by": by, "tree": root})


async def archive_report(request: web.Request) -> web.Response:
    limit = _int_param(request, "limit", 1000, 0, 100000)
    return web.json_response(_server(request).channels.archive_report(limit=limit))


async def online_report(request: web.Request) -> web.Response:
    server = _server(request)
    q = request.query
    try:
        until = parse_when(q.get("until", "now"))
        since = parse_when(q.get("since", "24h"), now=until)
    except ValueError as exc:
        raise _bad(str(exc)) from None
    if since >= until:
        raise _bad("since must be before until")
    group_by = q.get("group_by", "tier")
    if group_by not in ("tier", "civil_code", "all"):
        raise _bad("group_by must be 'tier', 'civil_code' or 'all'")
    digits = _int_param(request, "civil_code_digits", server.config.reports.civil_code_digits, 2, 8)
    rows = await server.channels.availability(since, until, group_by=group_by, civil_code_digits=digits)
    return web.json_response({"since": _iso(since), "until": _iso(until), "group_by": group_by,
                              "groups": rows})


# -- live video: play, streams, HTTP-FLV / WS-FLV, RTP forward, audit ---------------------------

def scope_filter(request: web.Request) -> Callable[[str, str], bool] | None:
    """For a user with a scope: whether (channel ID, device ID) is in it (either may be ""); None
    for everyone else. Alarms, streams and the event feed of other areas are left out with it."""
    scope = _scope(request)
    if scope is None:
        return None
    channels = _server(request).channels

    def sees(channel_id: str, device_id: str) -> bool:
        channel = channels.get(channel_id) if channel_id else None
        if channel is not None:
            return scope.covers(channel) if channel.kind == "channel" else \
                scope.covers_device(channel.device_id, channels.of_device(channel.device_id))
        device = device_id or channel_id
        return bool(device) and scope.covers_device(device, channels.of_device(device))
    return sees


def _who(request: web.Request) -> tuple[str, str]:
    """(who, from where) for the audit log: the user's name, or the credential used
    ("api-token", "play-url"), and the client address."""
    principal = request.get(PRINCIPAL)
    if principal is not None:
        return principal.name, request.remote or ""
    who = "play-url" if "sig" in request.query else "api-token"
    return who, request.remote or ""


async def audit_log(request: web.Request) -> web.Response:
    limit = _int_param(request, "limit", 100, 1, 1000)
    recent = list(_server(request).audit.recent)[-limit:]
    return web.json_response({"entries": recent[::-1]})


def make_app(server: GbServer) -> web.Application:
    app = web.Application(middlewares=[_count_requests, _auth_and_errors], client_max_size=1024 * 1024)
    app[SERVER_KEY] = server
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/v1/devices", list_devices)
    app.router.add_post("/api/v1/devices", create_device)
    app.router.add_get("/api/v1/devices/{device_id}", get_device)
    app.router.add_delete("/api/v1/devices/{device_id}", delete_device)
    app.router.add_put("/api/v1/devices/{device_id}/password", set_password)
    app.router.add_get("/api/v1/devices/{device_id}/events", device_events)
    app.router.add_get("/api/v1/devices/{device_id}/faults", device_faults)
    app.router.add_patch("/api/v1/devices/{device_id}", patch_device)
    app.router.add_get("/api/v1/devices/{device_id}/channels", device_channels)
    app.router.add_post("/api/v1/devices/{device_id}/sync", sync_device)
    app.router.add_get("/api/v1/devices/{device_id}/{what:info|status|config|presets}", live_query)
    app.router.add_get("/api/v1/channels", list_channels)
    app.router.add_get("/api/v1/channels/{channel_id}", get_channel)
    app.router.add_get("/api/v1/channels/{channel_id}/records", channel_records)
    app.router.add_patch("/api/v1/channels/{channel_id}", patch_channel)
    app.router.add_get("/api/v1/tree", tree)
    app.router.add_get("/api/v1/reports/archive", archive_report)
    app.router.add_get("/api/v1/reports/online", online_report)
    app.router.add_get("/api/v1/audit", audit_log)
    from .api_video import add_video_routes  # play, playback, downloads, FLV, forwards, nodes
    add_video_routes(app)
    from .api_control import add_control_routes  # PTZ, device control and config (§9.3)
    add_control_routes(app)
    from .api_events import add_event_routes  # alarms, SSE event feed, webhooks (§9.4)
    add_event_routes(app)
    from .api_broadcast import add_broadcast_routes  # voice broadcast (§9.12.1)
    add_broadcast_routes(app)
    from .api_positions import add_position_routes  # tracks, position subscriptions (§9.11.2)
    add_position_routes(app)
    from .api_upstreams import add_upstream_routes  # cascade: the upper platforms (Annex J)
    add_upstream_routes(app)
    from .api_console import add_console_routes  # the web console at / (static files)
    add_console_routes(app)
    from .openapi import add_openapi_routes  # GET /api/v1/openapi.json (every route above), /api/docs
    add_openapi_routes(app)
    from .api_users import add_user_routes  # accounts, tokens, console sessions
    add_user_routes(app)
    from .api_webrtc import add_webrtc_routes  # WebRTC viewers (WHEP)
    add_webrtc_routes(app)
    from .api_recording import add_recording_routes  # platform recordings: export, storage report
    add_recording_routes(app)
    return app
