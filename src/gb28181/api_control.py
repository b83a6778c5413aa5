"""HTTP API for PTZ, device control and device configuration (GB/T 28181-2016 §9.3, A.2.3, A.3).

Channels (the camera is the body's DeviceID):

- ``POST /api/v1/channels/{id}/ptz`` ``{"command": "up|down|left|right|upleft|upright|downleft|
  downright|zoomin|zoomout|focusnear|focusfar|irisopen|irisclose|stop", "speed": 0-255}``: a move
  goes on until ``stop`` (or the server's ``ptz.auto_stop``);
- ``POST .../presets`` ``{"action": "set|call|delete", "index": 1-255}``;
- ``POST .../cruise`` ``{"action": "add|delete|speed|dwell|start|stop", "group", "preset",
  "speed", "dwell"}``; ``POST .../scan`` ``{"action": "start|left|right|speed|stop", "group",
  "speed"}``; ``POST .../aux`` ``{"action": "on|off", "switch"}``;
- ``POST .../home`` ``{"enabled", "reset_time", "preset"}`` (HomePosition, confirmed);
- ``POST .../dragzoom`` ``{"direction": "in|out", "length", "width", "mid_x", "mid_y",
  "length_x", "length_y"}``.

Devices: ``POST /api/v1/devices/{id}/control`` ``{"command": "teleboot|record|stoprecord|
setguard|resetguard|resetalarm|iframe", "channel_id": optional}`` and
``PUT /api/v1/devices/{id}/config/basic`` ``{"name", "expiration", "heartbeat_interval",
"heartbeat_count"}`` (DeviceConfig, always to the device ID).

Answers: 200 with ``result`` ``delivered`` (the device's 200, §9.3.1) or ``OK``; 502 when the
device answered ERROR; 504 when it could not be reached or did not confirm in time; 409 for an
offline device, 404 for an unknown one, 400 with the reason for a bad body. Every command is
audited with who sent it, from where, the target, the command and the result.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from registry.models import Channel, Device

from . import ptz
from .api import _bad, _body, _channel_or_404, _device_or_404, _error, _server, _who
from .control import ControlError, ControlResult
from .openapi import doc

__all__ = ["add_control_routes"]

_NOT_CAMERAS = ("civil-code", "system", "business-group", "virtual-org")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PtzBody(_Model):
    command: Literal["up", "down", "left", "right", "upleft", "upright", "downleft", "downright",
                     "zoomin", "zoomout", "focusnear", "focusfar", "irisopen", "irisclose", "stop"]
    speed: int = Field(128, ge=0, le=255, description="00-FF slow to fast (A.3.2 note 2); zoom "
                       "uses its high 4 bits (A.3.2 note 3)")


class PresetBody(_Model):
    action: Literal["set", "call", "delete"]
    index: int = Field(ge=1, le=255, description="A.3.4: preset 1-255 (0 is reserved)")


class CruiseBody(_Model):
    action: Literal["add", "delete", "speed", "dwell", "start", "stop"]
    group: int = Field(0, ge=0, le=255, description="cruise group (byte 5)")
    preset: int | None = Field(None, ge=0, le=255, description="add: the point; delete: the point, "
                               "0 or absent: the whole cruise")
    speed: int | None = Field(None, ge=1, le=4095)
    dwell: int | None = Field(None, ge=1, le=4095, description="seconds at each point")

    @model_validator(mode="after")
    def _needs(self) -> CruiseBody:
        need = {"add": "preset", "speed": "speed", "dwell": "dwell"}.get(self.action)
        if need and not getattr(self, need):
            raise ValueError(f"cruise {self.action} needs {need}")
        return self


class ScanBody(_Model):
    action: Literal["start", "left", "right", "speed", "stop"]
    group: int = Field(0, ge=0, le=255, description="scan group (byte 5)")
    speed: int | None = Field(None, ge=1, le=4095)

    @model_validator(mode="after")
    def _needs(self) -> ScanBody:
        if self.action == "speed" and self.speed is None:
            raise ValueError("scan speed needs speed")
        return self


class AuxBody(_Model):
    action: Literal["on", "off"]
    switch: int = Field(1, ge=0, le=255, description="A.3.7: switch number, 1 = wiper")


class HomeBody(_Model):
    enabled: bool
    reset_time: int | None = Field(None, ge=1, le=10**6, description="seconds idle before going home")
    preset: int | None = Field(None, ge=0, le=255, description="the home preset")


class DragZoomBody(_Model):
    direction: Literal["in", "out"]
    length: int = Field(ge=1, le=65535, description="player window width in pixels")
    width: int = Field(ge=1, le=65535, description="player window height in pixels")
    mid_x: int = Field(ge=0, le=65535)
    mid_y: int = Field(ge=0, le=65535)
    length_x: int = Field(ge=0, le=65535)
    length_y: int = Field(ge=0, le=65535)

    @model_validator(mode="after")
    def _inside(self) -> DragZoomBody:
        if self.mid_x > self.length or self.length_x > self.length:
            raise ValueError("mid_x and length_x must lie within length (the window's width)")
        if self.mid_y > self.width or self.length_y > self.width:
            raise ValueError("mid_y and length_y must lie within width (the window's height)")
        return self


class DeviceControlBody(_Model):
    command: Literal["teleboot", "record", "stoprecord", "setguard", "resetguard", "resetalarm", "iframe"]
    channel_id: str | None = Field(None, min_length=1, max_length=20)
    alarm_method: str | None = Field(None, max_length=16, description="resetalarm: Info/AlarmMethod")
    alarm_type: str | None = Field(None, max_length=16, description="resetalarm: Info/AlarmType")


class BasicParamBody(_Model):
    name: str | None = Field(None, min_length=1, max_length=64)
    expiration: int | None = Field(None, ge=3600, le=10**7, description="§9.1.1: at least 3600 s")
    heartbeat_interval: int | None = Field(None, ge=1, le=3600)
    heartbeat_count: int | None = Field(None, ge=1, le=100)

    @model_validator(mode="after")
    def _something(self) -> BasicParamBody:
        if all(v is None for v in self.model_dump().values()):
            raise ValueError("give at least one of name, expiration, heartbeat_interval, heartbeat_count")
        return self


#: What every command answers (see the module docstring).
_RESULTS = {200: "sent, and delivered or confirmed by the device (result)", 404: "no such channel or device",
            409: "the device is offline", 502: "the device answered ERROR",
            504: "the device could not be reached or did not confirm in time"}


#: Device commands: (A.2.3 element, value, addressed to the device only).
_DEVICE_COMMANDS: dict[str, tuple[str, str, bool]] = {
    "teleboot": ("TeleBoot", "Boot", True), "record": ("RecordCmd", "Record", False),
    "stoprecord": ("RecordCmd", "StopRecord", False), "setguard": ("GuardCmd", "SetGuard", False),
    "resetguard": ("GuardCmd", "ResetGuard", False), "resetalarm": ("AlarmCmd", "ResetAlarm", False),
    "iframe": ("IFameCmd", "Send", False),
}


def _camera(request: web.Request) -> tuple[Channel, Device]:
    """The channel in the path and its device; 404 unknown, 400 not a camera, 409 offline."""
    channel = _channel_or_404(request)
    if channel.kind in _NOT_CAMERAS:
        raise _bad(f"{channel.channel_id} is a {channel.kind} item, not a camera")
    device = _server(request).registry.get(channel.device_id)
    if device is None or not device.online:
        raise web.HTTPConflict(text=json.dumps({"error": f"device {channel.device_id} of channel "
                                                f"{channel.channel_id} is offline"}),
                               content_type="application/json")
    return channel, device


async def _run(request: web.Request, what: str, target: str, call: Awaitable[ControlResult],
               **detail: Any) -> web.Response:
    """Await the command, audit it, and answer: 200, 502 for Result ERROR, 4xx/504 for failures."""
    server = _server(request)
    who, source = _who(request)
    # The audit record's own "action" is ``what``; a body's action is the command there.
    audited = {"command" if k == "action" else k: v for k, v in detail.items()}
    try:
        result = await call
    except ControlError as exc:
        server.audit.record(what, who=who, source=source, target=target, result="failed",
                            error=str(exc), **audited)
        return _error(exc.status, str(exc))
    except ptz.PtzError as exc:
        return _error(400, str(exc))
    out = result.as_json()
    server.audit.record(what, who=who, source=source, target=target, result=out["result"], **audited)
    if not result.ok:
        return web.json_response({"error": f"the device answered {result.result} to {what}",
                                  **detail, **out}, status=502)
    return web.json_response({**detail, **out})


@doc(body=PtzBody, responses=_RESULTS)
async def channel_ptz(request: web.Request) -> web.Response:
    """A.3.2 pan/tilt/zoom and A.3.3 focus/iris moves, and stop."""
    channel, device = _camera(request)
    body = await _body(request, PtzBody)
    assert isinstance(body, PtzBody)
    control = _server(request).control
    cid, cmd, speed = channel.channel_id, body.command, body.speed
    detail: dict[str, Any] = {"channel_id": cid, "command": cmd}
    if cmd == "stop":
        return await _run(request, "ptz", cid, control.ptz_stop(device, cid), **detail)
    command: ptz.PtzCommand
    if cmd in ptz.DIRECTIONS:
        pan, tilt, zoom = ptz.DIRECTIONS[cmd]
        command = ptz.Motion(pan, tilt, zoom, pan_speed=speed if pan else 0,
                             tilt_speed=speed if tilt else 0, zoom_speed=speed >> 4 if zoom else 0)
    elif cmd.startswith("focus"):
        command = ptz.FocusIris(focus=1 if cmd == "focusfar" else -1, focus_speed=speed)
    else:
        command = ptz.FocusIris(iris=1 if cmd == "irisopen" else -1, iris_speed=speed)
    detail.update(speed=speed, auto_stop=control.config.ptz.auto_stop or None)
    return await _run(request, "ptz", cid, control.ptz(device, cid, command), **detail)


@doc(body=PresetBody, responses=_RESULTS, summary="A.3.4 presets: set, call or delete")
async def channel_preset(request: web.Request) -> web.Response:
    channel, device = _camera(request)
    body = await _body(request, PresetBody)
    assert isinstance(body, PresetBody)
    cid = channel.channel_id
    return await _run(request, "preset", cid,
                      _server(request).control.ptz(device, cid, ptz.Preset(body.action, body.index)),
                      channel_id=cid, action=body.action, index=body.index)


@doc(body=CruiseBody, responses=_RESULTS, summary="A.3.5 cruise: add or delete points, speed, dwell, start, stop")
async def channel_cruise(request: web.Request) -> web.Response:
    channel, device = _camera(request)
    body = await _body(request, CruiseBody)
    assert isinstance(body, CruiseBody)
    control, cid = _server(request).control, channel.channel_id
    detail = {"channel_id": cid, "action": body.action, "group": body.group}
    if body.action == "stop":  # A.3.5 note 4
        return await _run(request, "cruise", cid, control.ptz_stop(device, cid), **detail)
    value = {"speed": body.speed, "dwell": body.dwell}.get(body.action) or 0
    command = ptz.Cruise(body.action, body.group, preset=body.preset or 0, value=value)
    return await _run(request, "cruise", cid, control.ptz(device, cid, command),
                      **detail, preset=body.preset, value=value or None)


@doc(body=ScanBody, responses=_RESULTS, summary="A.3.6 auto scan: start, left and right limits, speed, stop")
async def channel_scan(request: web.Request) -> web.Response:
    channel, device = _camera(request)
    body = await _body(request, ScanBody)
    assert isinstance(body, ScanBody)
    control, cid = _server(request).control, channel.channel_id
    detail = {"channel_id": cid, "action": body.action, "group": body.group}
    if body.action == "stop":  # A.3.6 note 3
        return await _run(request, "scan", cid, control.ptz_stop(device, cid), **detail)
    command = ptz.Scan(body.action, body.group, value=(body.speed or 0) if body.action == "speed" else 0)
    return await _run(request, "scan", cid, control.ptz(device, cid, command), **detail,
                      speed=body.speed)


@doc(body=AuxBody, responses=_RESULTS, summary="A.3.7 auxiliary switches (1 = wiper) on or off")
async def channel_aux(request: web.Request) -> web.Response:
    channel, device = _camera(request)
    body = await _body(request, AuxBody)
    assert isinstance(body, AuxBody)
    cid = channel.channel_id
    return await _run(request, "aux", cid,
                      _server(request).control.ptz(device, cid, ptz.Aux(body.action == "on", body.switch)),
                      channel_id=cid, action=body.action, switch=body.switch)


@doc(body=HomeBody, responses=_RESULTS)
async def channel_home(request: web.Request) -> web.Response:
    """A.2.3 HomePosition; confirmed by the device (§9.3.1)."""
    channel, device = _camera(request)
    body = await _body(request, HomeBody)
    assert isinstance(body, HomeBody)
    cid = channel.channel_id
    fields = ptz.home_position_fields(body.enabled, body.reset_time, body.preset)
    return await _run(request, "home-position", cid, _server(request).control.send(device, cid, fields),
                      channel_id=cid, enabled=body.enabled, reset_time=body.reset_time, preset=body.preset)


@doc(body=DragZoomBody, responses=_RESULTS)
async def channel_dragzoom(request: web.Request) -> web.Response:
    """A.2.3 DragZoomIn/DragZoomOut; the device sends only its 200 (§9.3.1)."""
    channel, device = _camera(request)
    body = await _body(request, DragZoomBody)
    assert isinstance(body, DragZoomBody)
    cid = channel.channel_id
    fields = ptz.drag_zoom_fields(body.direction == "in", length=body.length, width=body.width,
                                  mid_x=body.mid_x, mid_y=body.mid_y, length_x=body.length_x,
                                  length_y=body.length_y)
    return await _run(request, "drag-zoom", cid, _server(request).control.send(device, cid, fields),
                      channel_id=cid, direction=body.direction)


@doc(body=DeviceControlBody, responses=_RESULTS)
async def device_control(request: web.Request) -> web.Response:
    """TeleBoot, RecordCmd, GuardCmd, AlarmCmd ResetAlarm, IFameCmd (A.2.3) to a device or one
    of its channels; RecordCmd, GuardCmd and AlarmCmd are confirmed (§9.3.1)."""
    device = _device_or_404(request)
    body = await _body(request, DeviceControlBody)
    assert isinstance(body, DeviceControlBody)
    server = _server(request)
    tag, value, device_only = _DEVICE_COMMANDS[body.command]
    target = device.device_id
    if body.channel_id and body.channel_id != device.device_id:
        if device_only:
            return _error(400, f"{body.command} restarts the whole device; leave out channel_id")
        channel = server.channels.get(body.channel_id)
        if channel is None or channel.device_id != device.device_id:
            return _error(404, f"no channel {body.channel_id} on device {device.device_id}")
        target = channel.channel_id
    if not device.online:
        return _error(409, f"device {device.device_id} is offline")
    fields: list[tuple[str, Any]] = [(tag, value)]
    if body.command == "resetalarm" and (body.alarm_method or body.alarm_type):
        # A.2.3: a ResetAlarm may carry the method and type of the alarm it resets.
        fields.append(("Info", [(k, v) for k, v in (("AlarmMethod", body.alarm_method),
                                                    ("AlarmType", body.alarm_type)) if v]))
    return await _run(request, "device-control", target, server.control.send(device, target, fields),
                      device_id=device.device_id, command=body.command)


@doc(body=BasicParamBody, responses=_RESULTS)
async def device_config_basic(request: web.Request) -> web.Response:
    """DeviceConfig BasicParam (A.2.3 b), addressed to the device ID; confirmed (§9.3.1)."""
    device = _device_or_404(request)
    body = await _body(request, BasicParamBody)
    assert isinstance(body, BasicParamBody)
    if not device.online:
        return _error(409, f"device {device.device_id} is offline")
    params = {k: v for k, v in body.model_dump().items() if v is not None}
    return await _run(request, "device-config", device.device_id,
                      _server(request).control.configure_basic(device, params),
                      device_id=device.device_id, basic_param=params)


def add_control_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/channels/{channel_id}/ptz", channel_ptz)
    r.add_post("/api/v1/channels/{channel_id}/presets", channel_preset)
    r.add_post("/api/v1/channels/{channel_id}/cruise", channel_cruise)
    r.add_post("/api/v1/channels/{channel_id}/scan", channel_scan)
    r.add_post("/api/v1/channels/{channel_id}/aux", channel_aux)
    r.add_post("/api/v1/channels/{channel_id}/home", channel_home)
    r.add_post("/api/v1/channels/{channel_id}/dragzoom", channel_dragzoom)
    r.add_post("/api/v1/devices/{device_id}/control", device_control)
    r.add_put("/api/v1/devices/{device_id}/config/basic", device_config_basic)
