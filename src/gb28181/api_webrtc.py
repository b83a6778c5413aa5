"""HTTP API for WebRTC viewers: WHEP (draft-ietf-wish-whep) on top of the live streams.

``POST /api/v1/channels/{id}/whep`` with an SDP offer (``application/sdp``) opens the channel's
live stream as a play does (one upstream INVITE, shared with every other viewer), then asks the
stream's media node for a WebRTC session (node command ``whep``, ``media/webrtc.py``): 201 with
the SDP answer and the session's resource in ``Location``. ``DELETE`` on that resource ends the
session (``whep_close``); the last viewer leaving starts the stream's idle grace as for FLV.
ICE is not trickled: the answer carries the node's one host candidate, so there is no PATCH.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .api import _error, _server, _who
from .nodes import NodeCallError
from .openapi import Media, doc
from .streams import PlayError

if TYPE_CHECKING:
    from .server import GbServer

__all__ = ["add_webrtc_routes"]

SDP_CONTENT_TYPE = "application/sdp"
_MAX_OFFER = 64 * 1024  # a browser's offer is a few kB


def _candidate_host(request: web.Request, server: GbServer, node_address: str | None) -> str:
    """The address viewers reach the node's WebRTC ports at (see media.webrtc.host)."""
    configured = server.config.media.webrtc.host
    return configured or node_address or server.invites.media_addresses.for_peer(request.remote)


@doc(body=Media("application/sdp", "the viewer's SDP offer (WHEP)"),
     responses={201: Media("application/sdp", "the SDP answer; Location: the session to DELETE"),
                400: "not an SDP offer with video", 415: "not application/sdp",
                406: "no H.264 the stream can be sent as (H.265 channels are refused)"})
async def whep_offer(request: web.Request) -> web.Response:
    server = _server(request)
    channel_id = request.match_info["channel_id"]
    who, source = _who(request)
    if request.content_type != SDP_CONTENT_TYPE:
        return _error(415, f"a WHEP offer is {SDP_CONTENT_TYPE}, not {request.content_type or 'nothing'}")
    raw = await request.content.read(_MAX_OFFER + 1)
    if len(raw) > _MAX_OFFER:
        return _error(400, f"the SDP offer is larger than {_MAX_OFFER} bytes")
    try:
        offer = raw.decode()
    except UnicodeDecodeError:
        return _error(400, "the SDP offer is not UTF-8 text")
    if not offer.lstrip().startswith("v=0") or "\nm=video " not in offer.replace("\r", ""):
        # Refused before an INVITE is spent on it; the node checks the rest.
        return _error(400, "the body is not an SDP offer with video (v=0 ... m=video)")
    try:
        live = await server.streams.play(channel_id)
    except PlayError as exc:
        server.audit.record("play-failed", who=who, source=source, target=channel_id, error=str(exc),
                            output="webrtc")
        return _error(exc.http_status, str(exc))
    leg = live.leg
    webrtc = server.config.media.webrtc
    try:
        result = await leg.call("whep", offer=offer, host=_candidate_host(request, server, leg.node.media_address()),
                                ports=[webrtc.port_min, webrtc.port_max])
    except NodeCallError as exc:
        return _error(503, str(exc))
    if "refused" in result:
        return _error(int(result.get("status") or 400), str(result["refused"]))
    server.streams.viewer_joined(channel_id)
    server.audit.record("view", who=who, source=source, target=channel_id, output="webrtc",
                        session=result["session"])
    resource = f"/api/v1/whep/{leg.node.node_id}:{result['session']}"
    return web.Response(status=201, body=result["answer"].encode(), content_type=SDP_CONTENT_TYPE,
                        headers={"Location": resource})


@doc(responses={200: "ended", 404: "no such WHEP session"})
async def whep_delete(request: web.Request) -> web.Response:
    server = _server(request)
    node_id, _, session = request.match_info["session_id"].rpartition(":")
    node = server.nodes.nodes.get(node_id)
    if node is None or not session:
        return _error(404, f"no WebRTC session {request.match_info['session_id']}")
    try:
        closed = (await node.call("whep_close", {"session": session})).get("closed")
    except NodeCallError as exc:
        return _error(503, str(exc))
    if not closed:
        return _error(404, f"no WebRTC session {request.match_info['session_id']}")
    return web.Response(status=200)


def add_webrtc_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/channels/{channel_id}/whep", whep_offer)
    app.router.add_delete("/api/v1/whep/{session_id}", whep_delete)
