"""HTTP API for voice broadcast (GB/T 28181-2016 §9.12.1); the work is done by ``broadcast.py``.

- ``POST /api/v1/channels/{id}/broadcast``: the body is an audio file in any format FFmpeg
  reads, either as a multipart form field ``file`` or as the raw body with its Content-Type
  (``audio/wav``, ``application/octet-stream``…). It is decoded at once (400 with the reason
  for something that is not audio, empty, larger than ``broadcast.max_upload_bytes`` or longer
  than ``broadcast.max_duration``), then the broadcast starts: 201 with its ``id`` and state
  while the device is being notified. 404 unknown channel, 409 device offline or the channel
  already receiving a broadcast.
- ``GET /api/v1/broadcasts[/{id}]``: ``state`` (notifying, waiting-invite, sending, done,
  failed), ``reason``, ``transport``, ``format`` (PCMA or PS), ``packets_sent``,
  ``bytes_sent``, ``audio_seconds``.
- ``DELETE /api/v1/broadcasts/{id}``: end it (BYE once the dialog is up); answers its final state.
- ``GET /api/v1/channels/{id}/broadcast/ws``: a WebSocket for push-to-talk. The client sends
  binary messages of 16-bit little-endian mono PCM at 8000 Hz (a browser's AudioWorklet output,
  downsampled), in any sizes; the server sends JSON text messages with the broadcast's state
  whenever it changes, and closes the socket when the broadcast ends. Closing the socket (or a
  text message ``stop``) ends the broadcast once the buffered audio is sent. The token goes in
  the ``Authorization`` header or ``?token=``, as elsewhere.

Every broadcast is audited once it ends (who, from where, the target, the result and why), and
so is every stop asked through the API.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from aiohttp import BodyPartReader, WSMsgType, web

from registry.models import Channel, Device

from .api import _bad, _channel_or_404, _error, _not_found, _server, _who
from .broadcast import AudioError, Broadcast, BroadcastError, FileSource, LiveSource, decode_audio_file
from .openapi import Media, doc

__all__ = ["add_broadcast_routes"]

_CHUNK = 64 * 1024


def _target(request: web.Request) -> tuple[Channel, Device]:
    """The channel in the path and its device; 404 unknown channel, 409 offline device."""
    channel = _channel_or_404(request)
    device = _server(request).registry.get(channel.device_id)
    if device is None or not device.online:
        raise web.HTTPConflict(text=json.dumps({"error": f"device {channel.device_id} of channel "
                                                f"{channel.channel_id} is offline"}),
                               content_type="application/json")
    return channel, device


async def _read_limited(read: Callable[[int], Awaitable[bytes]], limit: int) -> bytes:
    data = bytearray()
    while chunk := await read(_CHUNK):
        data += chunk
        if len(data) > limit:
            raise _bad(f"the upload is larger than broadcast.max_upload_bytes ({limit} bytes)")
    return bytes(data)


async def _upload(request: web.Request, limit: int) -> bytes:
    """The uploaded file: a multipart ``file`` field, or the raw body."""
    ctype = request.content_type
    if ctype.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            if isinstance(part, BodyPartReader) and part.name == "file":
                return await _read_limited(part.read_chunk, limit)
        raise _bad("the multipart upload has no 'file' field")
    if ctype in ("application/json", "application/x-www-form-urlencoded", "text/plain"):
        raise _bad(f"expected an audio file (multipart field 'file', or the raw body with an audio "
                   f"Content-Type), got {ctype}")
    return await _read_limited(request.content.read, limit)


@doc(summary="Broadcast an audio file to a channel (§9.12.1)",
     body=[Media("multipart/form-data", "the file in the field 'file'",
                 {"type": "object", "properties": {"file": {"type": "string", "contentMediaType":
                                                            "application/octet-stream"}}, "required": ["file"]}),
           Media("audio/*", "the raw file, any format FFmpeg reads"),
           Media("application/octet-stream", "the raw file")],
     responses={201: "the broadcast and its state", 400: "not audio, empty, too large or too long",
                404: "no such channel", 409: "the device is offline or the channel is receiving a broadcast"})
async def start_broadcast(request: web.Request) -> web.Response:
    server = _server(request)
    channel, device = _target(request)
    cfg = server.config.broadcast
    data = await _upload(request, cfg.max_upload_bytes)
    try:
        alaw = await asyncio.to_thread(decode_audio_file, data, max_seconds=cfg.max_duration)
    except AudioError as exc:
        return _error(400, str(exc))
    who, client = _who(request)
    try:
        b = server.broadcasts.start(channel, device, FileSource(alaw), who=who, client=client)
    except BroadcastError as exc:
        return _error(exc.status, str(exc))
    return web.json_response(_json(b), status=201)


def _json(b: Broadcast) -> dict:
    return {**b.as_json(), "url": f"/api/v1/broadcasts/{b.id}"}


def _broadcast_or_404(request: web.Request) -> Broadcast:
    broadcast_id = request.match_info["broadcast_id"]
    b = _server(request).broadcasts.get(broadcast_id)
    if b is None:
        raise _not_found(f"no broadcast {broadcast_id}")
    return b


@doc(summary="Broadcasts, newest first")
async def list_broadcasts(request: web.Request) -> web.Response:
    items = [_json(b) for b in reversed(_server(request).broadcasts.broadcasts.values())]
    return web.json_response({"broadcasts": items, "total": len(items)})


@doc(summary="One broadcast", responses={200: "the broadcast", 404: "no such broadcast"})
async def get_broadcast(request: web.Request) -> web.Response:
    return web.json_response(_json(_broadcast_or_404(request)))


@doc(summary="End a broadcast", responses={200: "its final state", 404: "no such broadcast"})
async def stop_broadcast(request: web.Request) -> web.Response:
    server = _server(request)
    b = _broadcast_or_404(request)
    was = b.state
    await server.broadcasts.stop(b)
    who, client = _who(request)
    server.audit.record("broadcast-stop", who=who, source=client, target=b.target_id,
                        broadcast_id=b.id, was=was, result=b.state)
    return web.json_response(_json(b))


@doc(responses={101: "WebSocket: send 16-bit LE mono PCM at 8000 Hz as binary messages, receive the "
                      "broadcast's state as JSON text", 404: "no such channel", 409: "the device is offline"})
async def talk(request: web.Request) -> web.StreamResponse:
    """Push-to-talk over a WebSocket (see the module docstring)."""
    server = _server(request)
    channel, device = _target(request)
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=1 << 20)
    await ws.prepare(request)
    who, client = _who(request)
    source = LiveSource(server.config.broadcast.ws_buffer)
    try:
        b = server.broadcasts.start(channel, device, source, who=who, client=client)
    except BroadcastError as exc:
        await ws.send_json({"state": "failed", "reason": str(exc)})
        await ws.close()
        return ws

    async def report() -> None:
        last = None
        while True:
            seen = (b.state, b.reason)
            if seen != last:
                last = seen
                await ws.send_json(_json(b))
            if not b.active:
                await ws.close()
                return
            await asyncio.sleep(0.1)

    reporter = asyncio.get_running_loop().create_task(report())
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                source.push(msg.data)
            elif msg.type == WSMsgType.TEXT and msg.data.strip().lower() == "stop":
                break
    finally:
        source.close()  # the buffered audio is still sent; the sender then ends the dialog
        if b.active and b.state != "sending":
            await server.broadcasts.stop(b, "the talker hung up before the device was ready")
        if ws.closed:
            reporter.cancel()
        await asyncio.gather(reporter, return_exceptions=True)
    return ws


def add_broadcast_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/channels/{channel_id}/broadcast", start_broadcast)
    app.router.add_get("/api/v1/channels/{channel_id}/broadcast/ws", talk)
    app.router.add_get("/api/v1/broadcasts", list_broadcasts)
    app.router.add_get("/api/v1/broadcasts/{broadcast_id}", get_broadcast)
    app.router.add_delete("/api/v1/broadcasts/{broadcast_id}", stop_broadcast)
