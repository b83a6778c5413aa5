"""HTTP API for video: live play, playback and its control, downloads, HTTP-FLV/WS-FLV, RTP
forwards and the media nodes (GB/T 28181-2016 §9.2, §9.8, §9.9).

Streams run on media nodes (``nodes``): the play and playback calls return signed URLs on the
node that carries the stream, and ``/live/{id}.flv`` on the server redirects there (or serves
the stream itself when the relay runs in this process). Every play, view, control, download
and export is audited.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from media.node_service import LINK_PATH
from media.playurl import play_query

from .api import _bad, _body, _error, _iso, _not_found, _server, _who, scope_filter
from .nodes import MediaLeg, NodeCallError
from .openapi import Media, Play, Playback, doc
from .streams import PlayError
from .timeparse import parse_when

if TYPE_CHECKING:
    from .server import GbServer

__all__ = ["add_video_routes"]


class PlayBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    transport: str | None = Field(None, pattern="^(udp|tcp-passive|tcp-active)$")


def _play_urls(request: web.Request, server: GbServer, leg: MediaLeg) -> dict[str, Any]:
    """Signed URLs of the stream on the node that carries it, and ``server_flv``, the server's
    URL that always leads to the stream's current node (reconnect there after a node loss)."""
    ttl = server.config.media.play_token_ttl
    expires = int(time.time()) + ttl
    key = leg.key
    server_flv = f"http://{request.host}/live/{key}.flv?{play_query(server.api_token, key, expires)}"
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    on_node = leg.play_url(host, ttl)
    return {"http_flv": on_node or server_flv,
            "ws_flv": leg.play_url(host, ttl, scheme="ws") or "ws" + server_flv[4:],
            "server_flv": server_flv, "node": leg.node.name, "expires_at": _iso(expires)}


@doc(summary="Play a channel live (GB/T 28181-2016 §9.2): signed HTTP-FLV/WS-FLV URLs",
     body=PlayBody, body_required=False,
     responses={200: Play, 404: "no such channel", 409: "the device is offline",
                502: "the device refused or did not answer", 503: "no media node can carry the stream"})
async def play_channel(request: web.Request) -> web.Response:
    server = _server(request)
    channel_id = request.match_info["channel_id"]
    body = PlayBody()
    if request.can_read_body:
        body = await _body(request, PlayBody)  # type: ignore[assignment]
    who, source = _who(request)
    try:
        live = await server.streams.play(channel_id, body.transport)
    except PlayError as exc:
        server.audit.record("play-failed", who=who, source=source, target=channel_id, error=str(exc))
        return _error(exc.http_status, str(exc))
    server.audit.record("play", who=who, source=source, target=channel_id, transport=live.transport)
    return web.json_response({"stream_id": live.stream_id, "channel_id": channel_id,
                              "transport": live.transport,
                              "urls": _play_urls(request, server, live.leg)})


@doc(summary="Live streams and playbacks being carried")
async def list_streams(request: web.Request) -> web.Response:
    server = _server(request)
    streams, playbacks = server.streams, server.playbacks
    live = [dict(s, kind="live") for s in await streams.describe(list(streams.live.values()))]
    every = live + await playbacks.describe(list(playbacks.active.values()))
    if (sees := scope_filter(request)) is not None:
        every = [s for s in every if sees(str(s.get("channel_id") or ""), str(s.get("device_id") or ""))]
    return web.json_response({"streams": every})


def _stream_or_404(request: web.Request):
    live = _server(request).streams.live.get(request.match_info["stream_id"])
    if live is None:
        raise _not_found(f"no live stream {request.match_info['stream_id']}")
    return live


@doc(summary="One live stream or playback", responses={200: "the stream", 404: "no such stream"})
async def get_stream(request: web.Request) -> web.Response:
    server = _server(request)
    playback = server.playbacks.get(request.match_info["stream_id"])
    if playback is not None:
        (out,) = await server.playbacks.describe([playback])
        return web.json_response(out)
    live = _stream_or_404(request)
    (out,) = await server.streams.describe([live])
    return web.json_response(dict(out, kind="live"))


@doc(summary="Stop a live stream or playback (BYE)",
     responses={200: ({"type": "object", "properties": {"stopped": {"type": "string"}}}, "the stopped stream"),
                404: "no such stream"})
async def stop_stream(request: web.Request) -> web.Response:
    server = _server(request)
    who, source = _who(request)
    stream_id = request.match_info["stream_id"]
    if stream_id in server.playbacks.active:
        await server.playbacks.close(stream_id, "stopped through the API")
        server.audit.record("stop", who=who, source=source, target=stream_id)
        return web.json_response({"stopped": stream_id})
    live = _stream_or_404(request)
    await server.streams.close(live.channel_id, "stopped through the API")
    server.audit.record("stop", who=who, source=source, target=live.channel_id)
    return web.json_response({"stopped": live.stream_id})


class PlaybackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: str = Field(min_length=1, max_length=40, description="ISO 8601 (no offset: Beijing time) "
                       "or Unix seconds")
    end: str = Field(min_length=1, max_length=40)
    transport: str | None = Field(None, pattern="^(udp|tcp-passive|tcp-active)$")
    source: str = Field("device", pattern="^(device|platform)$", description="device: its own "
                        "recording (a Playback INVITE); platform: this platform's recordings")


def _range(body: PlaybackBody) -> tuple[float, float]:
    try:
        return parse_when(body.start), parse_when(body.end)
    except ValueError as exc:
        raise _bad(str(exc)) from None


@doc(body=PlaybackBody, responses={200: Playback, 400: "bad range",
                                        404: "no such channel, or (platform) no recording in the range",
                                        409: "the device is offline", 502: "the device refused or did not answer",
                                        503: "no media node can carry the stream"})
async def open_playback(request: web.Request) -> web.Response:
    """GB/T 28181-2016 §9.8: play a recorded range of a channel, in a stream of its own."""
    server = _server(request)
    channel_id = request.match_info["channel_id"]
    body = await _body(request, PlaybackBody)
    assert isinstance(body, PlaybackBody)
    start, end = _range(body)
    who, source = _who(request)
    try:
        pb = await server.playbacks.open(channel_id, start, end, body.transport, source=body.source)
    except PlayError as exc:
        server.audit.record("playback-failed", who=who, source=source, target=channel_id,
                            error=str(exc))
        return _error(exc.http_status, str(exc))
    server.audit.record("playback", who=who, source=source, target=channel_id,
                        stream=pb.stream_id, start=_iso(pb.start), end=_iso(pb.end),
                        transport=pb.transport, recordings=pb.source)
    return web.json_response({"stream_id": pb.stream_id, "channel_id": channel_id,
                              "transport": pb.transport, "source": pb.source, "start": _iso(pb.start),
                              "end": _iso(pb.end), "position_offset": pb.offset,
                              "urls": _play_urls(request, server, pb.leg)})


class DownloadBody(PlaybackBody):
    speed: int = Field(4, ge=1, le=32, description="a=downloadspeed: times real time")


@doc(body=DownloadBody, responses={201: "the download and its state", 400: "bad range",
                                        404: "no such channel", 409: "the device is offline"})
async def open_download(request: web.Request) -> web.Response:
    """GB/T 28181-2016 §9.9: fetch a recorded range faster than real time into an MP4."""
    server = _server(request)
    channel_id = request.match_info["channel_id"]
    body = await _body(request, DownloadBody)
    assert isinstance(body, DownloadBody)
    start, end = _range(body)
    who, source = _who(request)
    try:
        pb = await server.playbacks.open(channel_id, start, end, body.transport, download_speed=body.speed,
                                         source=body.source)
    except PlayError as exc:
        server.audit.record("download-failed", who=who, source=source, target=channel_id, error=str(exc))
        return _error(exc.http_status, str(exc))
    server.audit.record("download", who=who, source=source, target=channel_id, id=pb.stream_id,
                        start=_iso(pb.start), end=_iso(pb.end), speed=pb.speed)
    (out,) = await server.playbacks.describe([pb])
    return web.json_response(out, status=201)


def _download_or_404(request: web.Request):
    pb = _server(request).playbacks.get(request.match_info["download_id"])
    if pb is None or pb.kind != "Download":
        raise _not_found(f"no download {request.match_info['download_id']}")
    return pb


@doc(summary="Downloads running and finished")
async def list_downloads(request: web.Request) -> web.Response:
    playbacks = _server(request).playbacks
    mine = [p for p in [*playbacks.active.values(), *playbacks.recent.values()] if p.kind == "Download"]
    return web.json_response({"downloads": await playbacks.describe(mine)})


@doc(summary="One download and its state", responses={200: "the download", 404: "no such download"})
async def get_download(request: web.Request) -> web.Response:
    pb = _download_or_404(request)
    (out,) = await _server(request).playbacks.describe([pb])
    return web.json_response(out)


@doc(responses={200: Media("video/mp4", "the recording (HTTP Range: 206 Partial Content)"),
                307: "on the media node that wrote it", 404: "no such download",
                409: "the download is not done", 410: "its file is gone"})
async def download_file(request: web.Request) -> web.StreamResponse:
    """The finished MP4, with HTTP Range; from the node that wrote it when not on this host."""
    from pathlib import Path
    server = _server(request)
    pb = _download_or_404(request)
    (out,) = await server.playbacks.describe([pb])
    if out["state"] != "done":
        return _error(409, f"download {pb.stream_id} is {out['state']}"
                           f"{': ' + str(out['ended_reason']) if out['ended_reason'] else ''}; "
                           "its file is there once the state is done")
    who, source = _who(request)
    server.audit.record("export", who=who, source=source, target=pb.channel_id, id=pb.stream_id)
    path = Path(str((pb.file or {}).get("path") or ""))
    name = f"{pb.channel_id}_{pb.start}_{pb.end}.mp4"
    if path.is_file():
        return web.FileResponse(path, headers={"Content-Type": "video/mp4",
                                               "Content-Disposition": f'attachment; filename="{name}"'})
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    base = pb.leg.node.viewer_base(host)
    if base is None or not pb.leg.node.alive:
        return _error(410, f"the file of download {pb.stream_id} is gone (media node {pb.leg.node.name})")
    expires = int(time.time()) + server.config.media.play_token_ttl
    raise web.HTTPTemporaryRedirect(
        f"{base}/downloads/{pb.stream_id}.mp4?{play_query(server.nodes.token, pb.stream_id, expires)}")


class ControlBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: str = Field(pattern="^(pause|resume|seek|speed)$")
    offset: float | None = Field(None, ge=0, description="seek: seconds from the start of the range")
    scale: float | None = Field(None, description="speed: 0.25 to 8")


@doc(body=ControlBody, responses={200: "the playback after the change", 404: "no such playback",
                                       409: "the stream is live video"})
async def control_stream(request: web.Request) -> web.Response:
    """Annex B: pause, resume, seek or change the speed of a playback."""
    server = _server(request)
    stream_id = request.match_info["stream_id"]
    body = await _body(request, ControlBody)
    assert isinstance(body, ControlBody)
    if stream_id in server.streams.live:
        return _error(409, f"{stream_id} is live video; only playbacks take pause, seek and speed")
    who, source = _who(request)
    try:
        pb = await server.playbacks.control(stream_id, body.action, offset=body.offset, scale=body.scale)
    except PlayError as exc:
        return _error(exc.http_status, str(exc))
    server.audit.record("control", who=who, source=source, target=stream_id, command=body.action,
                        offset=body.offset, scale=body.scale)
    (out,) = await server.playbacks.describe([pb])
    return web.json_response(out)


@doc(query={"exp": ("integer", "signed play URL: expiry, Unix seconds"),
            "sig": ("string", "signed play URL: the signature (instead of a token)")},
     responses={200: Media("video/x-flv", "HTTP-FLV, starting at the last keyframe"),
                101: "WS-FLV: a WebSocket of FLV tags, when asked for with Upgrade: websocket",
                307: "the media node carrying the stream", 403: "the play URL signature is wrong or expired",
                404: "no such channel or stream", 409: "the device is offline"})
async def live_flv(request: web.Request) -> web.StreamResponse:
    """HTTP-FLV (or WS-FLV when the request is a WebSocket upgrade), opened on demand: served
    here when the relay runs in this process, else a redirect to the node carrying it."""
    from media.http_flv import serve_http_flv, serve_ws_flv
    server = _server(request)
    channel_id = request.match_info["channel_id"]
    who, source = _who(request)
    playback = server.playbacks.active.get(channel_id)  # a playback's stream ID, not a channel
    try:
        live = playback or await server.streams.play(channel_id)
    except PlayError as exc:
        server.audit.record("view-failed", who=who, source=source, target=channel_id, error=str(exc))
        return _error(exc.http_status, str(exc))
    if playback is not None:
        server.playbacks.viewer_joined(channel_id)
    else:
        server.streams.viewer_joined(channel_id)
    websocket = request.headers.get("Upgrade", "").lower() == "websocket"
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    elsewhere = live.leg.play_url(host, server.config.media.play_token_ttl,
                                  scheme="ws" if websocket else "http")
    if elsewhere is not None:  # the node reports the view itself when the player gets there
        raise web.HTTPTemporaryRedirect(elsewhere)
    hub = server.nodes.local_stream(channel_id)
    if hub is None:
        return _error(404, f"stream {channel_id} ended while it was being opened; try again")
    server.audit.record("view", who=who, source=source, target=channel_id,
                        output="ws-flv" if websocket else "http-flv")
    if websocket:
        return await serve_ws_flv(request, hub)
    return await serve_http_flv(request, hub)


class ForwardBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    host: str = Field(min_length=1, max_length=255)
    port: int = Field(ge=1, le=65535)
    transport: str = Field("udp", pattern="^(udp|tcp)$")
    ssrc: int = Field(ge=0, le=2**32 - 1)


@doc(summary="Forward a live stream as RTP (PS) to a host and port", body=ForwardBody,
     responses={201: ({"type": "object", "properties": {"stream_id": {"type": "string"},
                                                         "forward": {"type": "integer"}}}, "the forward"),
                404: "no such live stream", 502: "the node could not forward"})
async def add_forward(request: web.Request) -> web.Response:
    live = _stream_or_404(request)
    body = await _body(request, ForwardBody)
    assert isinstance(body, ForwardBody)
    server = _server(request)
    try:
        result = await live.leg.call("forward", host=body.host, port=body.port,
                                     transport=body.transport, ssrc=body.ssrc)
    except NodeCallError as exc:
        return _error(502, f"cannot forward over {body.transport}: {exc}")
    server.streams.viewer_joined(live.channel_id)
    who, source = _who(request)
    server.audit.record("forward", who=who, source=source, target=live.channel_id,
                        to=f"{body.transport}://{body.host}:{body.port}", ssrc=body.ssrc)
    return web.json_response({"stream_id": live.stream_id, "forward": result.get("forward", 0)},
                             status=201)


@doc(summary="Media nodes, their load and the stream workers")
async def list_nodes(request: web.Request) -> web.Response:
    server = _server(request)
    workers = server.workers
    return web.json_response({"nodes": server.nodes.as_list(), "lost": server.nodes.lost_total,
                              "streams_moved": server.streams.moved,
                              "workers": None if workers is None else
                              {"count": workers.count, "pids": workers.pids(), "restarts": workers.restarts}})


@doc(public=True, summary="A media node joins (WebSocket; the node token as a Bearer token)",
     responses={101: "WebSocket of the node protocol", 401: "wrong or missing node token"})
async def _server_nodes_link(request: web.Request) -> web.StreamResponse:
    return await _server(request).nodes.link(request)


def add_video_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/channels/{channel_id}/play", play_channel)
    app.router.add_get("/api/v1/streams", list_streams)
    app.router.add_get("/api/v1/streams/{stream_id}", get_stream)
    app.router.add_delete("/api/v1/streams/{stream_id}", stop_stream)
    app.router.add_post("/api/v1/streams/{stream_id}/forwards", add_forward)
    app.router.add_post("/api/v1/streams/{stream_id}/control", control_stream)
    app.router.add_post("/api/v1/channels/{channel_id}/playback", open_playback)
    app.router.add_post("/api/v1/channels/{channel_id}/downloads", open_download)
    app.router.add_get("/api/v1/downloads", list_downloads)
    app.router.add_get("/api/v1/downloads/{download_id}", get_download)
    app.router.add_get("/api/v1/downloads/{download_id}/file", download_file)
    app.router.add_get("/api/v1/nodes", list_nodes)
    app.router.add_get(LINK_PATH, _server_nodes_link)
    app.router.add_get("/live/{channel_id}.flv", live_flv)
