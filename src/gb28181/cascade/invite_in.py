"""INVITEs from an upper platform: live, playback and download of shared channels (GB/T 28181-2016
§9.2, §9.8, §9.9, Annex F, Annex K, Annex L, Annex M, Annex B).

The channel is the Subject's sender ID (Annex K), else the ``u=`` of a playback, else the
Request-URI's user. 100 Trying goes at once; 404 if the channel is not shared; 488 for an offer
we cannot serve. Then the device's stream is got the usual way: a live channel through the
stream manager (a stream that is already up, for local viewers or another upper, is shared, and
its cached GOP starts the upper's picture), a playback or download through the playback manager
(a dialog of its own to the device, or the platform's own recordings when they cover the range:
``playback.py``). The media node that carries it sends the PS packets on as
RTP (Annex C) with the upper's ``y=`` SSRC, to the offer's address:

- ``RTP/AVP``: UDP, from the ACK on;
- ``TCP/RTP/AVP`` with ``a=setup:passive``: we connect (``setup:active`` in our answer), after the ACK;
- ``TCP/RTP/AVP`` with ``a=setup:active``: we listen before answering (our answer's port, with
  ``setup:passive``) and send once the upper connects (RFC 4145, Annex L).

Failing to get the stream is a 486 with the reason (404 when the device does not have it). The
200 carries ``a=sendonly``, ``y=`` and, for history, the offer's ``t=``. No ACK within
``ACK_TIMEOUT`` seconds ends the session with a BYE. A BYE from the upper ends it; so does the
device's stream ending (Annex M), a forward whose receiver went away, or the upper being lost:
then we BYE the upper. INFO (MANSRTSP, Annex B) in a playback dialog is relayed to the device's
dialog; the device's MediaStatus 121 (§9.8.2) is relayed up in the upper's dialog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import mansrtsp
from ..nodes import MediaLeg, NodeCallError
from ..queries import MANSCDP_CONTENT_TYPE
from ..sdp import MediaDescription, SdpError, SessionDescription, build_sdp, parse_sdp, sending_plan
from ..sip.dialog import Dialog, DialogError
from ..sip.endpoint import SipTimeoutError, SipTransportError
from ..sip.message import SipRequest, make_response, new_tag, parse_uri
from ..sip.transaction import RequestReceived
from ..streams import PlayError
from .uplink import Uplink

if TYPE_CHECKING:
    from .manager import CascadeManager

__all__ = ["UpperSessions", "UpSession"]

log = logging.getLogger("gb28181.cascade")

#: Our transports (``sdp.sending_plan``) as the media node's forward command names them.
FORWARD = {"udp": "udp", "tcp-active": "tcp", "tcp-passive": "tcp-passive"}
ACK_TIMEOUT = 32.0  # RFC 3261 Timer H (64 x T1): no ACK for our 200 by then ends the session


@dataclass(slots=True, eq=False)
class UpSession:
    uplink: Uplink
    call_id: str
    channel_id: str
    kind: str  # Play | Playback | Download
    transport: str  # udp | tcp-active (we connect) | tcp-passive (we listen)
    remote: tuple[str, int]
    ssrc: str
    sip_transport: str
    dialog: Dialog | None = None
    leg: MediaLeg | None = None
    stream_key: str = ""  # the live channel ID, or the playback's stream ID
    forward: str | None = None
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False
    reason: str = ""
    created_at: float = field(default_factory=time.time)

    def as_dict(self) -> dict[str, Any]:
        return {"call_id": self.call_id, "channel_id": self.channel_id, "kind": self.kind.lower(),
                "transport": self.transport, "to": f"{self.remote[0]}:{self.remote[1]}",
                "ssrc": self.ssrc, "stream": self.stream_key, "created_at": self.created_at}


def _plan(offer: SessionDescription) -> tuple[str, tuple[str, int], str | None]:
    """(forward transport, destination, y=) of an upper's offer; SdpError when unusable."""
    video = offer.video
    if video is None:
        raise SdpError("the offer has no m=video line")
    if "RTP/AVP" not in video.proto.upper():
        raise SdpError(f"m=video uses {video.proto}, not RTP/AVP or TCP/RTP/AVP")
    if not any(video.rtpmap.get(pt, "").upper().startswith("PS/") or pt == 96 for pt in video.formats):
        raise SdpError("PS (payload type 96, Annex F) is not offered")
    return sending_plan(offer, video)


def _channel_of(req: SipRequest, offer: SessionDescription) -> str:
    subject = req.get("subject") or ""
    sender = subject.split(",", 1)[0].split(":", 1)[0].strip()
    if len(sender) == 20 and sender.isdigit():
        return sender
    if offer.uri:
        uid = offer.uri.split(":", 1)[0].strip()
        if len(uid) == 20 and uid.isdigit():
            return uid
    try:
        return parse_uri(req.uri).user
    except ValueError:
        return ""


class UpperSessions:
    """See the module docstring."""

    def __init__(self, manager: CascadeManager, *, streams: Any, playbacks: Any, invites: Any) -> None:
        self.manager = manager
        self.streams = streams
        self.playbacks = playbacks
        self.invites = invites
        self.sessions: dict[str, UpSession] = {}  # by Call-ID
        self._tasks: set[asyncio.Task] = set()
        streams.on_closed.append(self._live_closed)
        playbacks.on_closed.append(self._playback_event)

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def owns(self, call_id: str) -> bool:
        return call_id in self.sessions

    def count(self, uplink: Uplink) -> int:
        return sum(1 for s in self.sessions.values() if s.uplink is uplink)

    def describe(self) -> list[dict]:
        return [s.as_dict() | {"upstream": s.uplink.id} for s in self.sessions.values()]

    async def stop(self) -> None:
        await asyncio.gather(*(self._end(s, "server stopping", bye=True, bye_timeout=1.0)
                               for s in list(self.sessions.values())), return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def end_for(self, uplink: Uplink, reason: str) -> None:
        for s in [s for s in self.sessions.values() if s.uplink is uplink]:
            self._spawn(self._end(s, reason, bye=True, bye_timeout=2.0))

    # -- requests -------------------------------------------------------------------------------------
    def handle(self, ev: RequestReceived) -> None:
        req = ev.request
        session = self.sessions.get(req.call_id)
        if req.method == "INVITE" and session is None:
            uplink = self.manager.uplink_of(ev)
            assert uplink is not None and ev.transaction is not None
            self._respond(ev, make_response(req, 100, "Trying"))
            self._spawn(self._answer(uplink, ev))
            return
        if session is None or (session.dialog is not None and not session.dialog.matches(req)):
            if ev.transaction is not None:
                self._respond(ev, make_response(req, 481, "Call/Transaction Does Not Exist", to_tag=new_tag()))
            return
        if req.method == "ACK":
            session.acked.set()
        elif req.method == "BYE":
            if session.dialog is not None:
                session.dialog.receive_request(req)
            self._respond(ev, make_response(req, 200, "OK"))
            self._spawn(self._end(session, f"upper platform {session.uplink.id} sent BYE", bye=False))
        elif req.method == "INFO":
            self._spawn(self._info(session, ev))
        elif req.method == "INVITE":  # a re-INVITE: keep the session as it is (RFC 3261 §14.2)
            self._respond(ev, make_response(req, 488, "Not Acceptable Here: re-INVITE is not supported"))
        elif ev.transaction is not None:
            self._respond(ev, make_response(req, 405, "Method Not Allowed"))

    def _respond(self, ev: RequestReceived, resp: Any) -> bool:
        if ev.transaction is None:
            return False
        try:
            self.manager.endpoint.respond(ev.transaction, resp)
        except ValueError:
            return False  # a CANCEL already had the INVITE answered 487
        return True

    def _refuse(self, ev: RequestReceived, status: int, text: str) -> None:
        log.info("INVITE from upper platform refused %d: %s", status, text)
        self._respond(ev, make_response(ev.request, status, text[:120].replace("\r", " ").replace("\n", " "),
                                        to_tag=new_tag()))

    async def _answer(self, uplink: Uplink, ev: RequestReceived) -> None:
        req = ev.request
        try:
            if not req.body.strip():
                raise SdpError("the INVITE carries no SDP offer")
            offer = parse_sdp(req.body)
            transport, remote, ssrc = _plan(offer)
        except SdpError as exc:
            self._refuse(ev, 488, f"Not Acceptable Here: {exc}")
            return
        channel_id = _channel_of(req, offer)
        if self.manager.answers.shared_channel(uplink, channel_id) is None:
            self._refuse(ev, 404, f"Not Found: channel {channel_id or '?'} is not shared with {uplink.local_id}")
            return
        kind = offer.session_name.strip().capitalize() if offer.session_name else "Play"
        if kind not in ("Play", "Playback", "Download"):
            self._refuse(ev, 488, f"Not Acceptable Here: s={offer.session_name} is not Play, Playback or Download")
            return
        if ssrc is None:
            ssrc = self.invites.ssrcs.allocate(history=kind != "Play")
        session = UpSession(uplink, req.call_id, channel_id, kind, transport, remote, ssrc, ev.transport)
        self.sessions[req.call_id] = session
        try:
            await self._open_stream(session, offer)
        except PlayError as exc:
            self.sessions.pop(req.call_id, None)
            self._refuse(ev, 404 if exc.http_status == 404 else 486, f"Busy Here: {exc}"
                         if exc.http_status != 404 else f"Not Found: {exc}")
            return
        except asyncio.CancelledError:
            self.sessions.pop(req.call_id, None)
            await self._release(session, "cancelled")
            raise
        try:
            port = 9  # RFC 4145: the port of an active TCP answer is not used
            if transport == "tcp-passive":
                port = await self._forward(session)
            elif transport == "udp":
                port = self._node_port(session)
        except NodeCallError as exc:
            self.sessions.pop(req.call_id, None)
            await self._release(session, str(exc))
            self._refuse(ev, 486, f"Busy Here: the media node cannot send the stream: {exc}")
            return
        local_tag = new_tag()
        try:
            session.dialog = Dialog.from_request(req, local_tag)
        except DialogError as exc:
            self.sessions.pop(req.call_id, None)
            await self._release(session, str(exc))
            self._refuse(ev, 400, f"Bad Request: {exc}")
            return
        assert session.leg is not None
        media_host = session.leg.node.media_address() or \
            self.invites.media_addresses.for_peer(uplink.config.host)
        body = self._answer_sdp(session, offer, media_host, port)
        resp = make_response(req, 200, "OK", to_tag=local_tag, body=body, content_type="APPLICATION/SDP")
        resp.set("Contact", f"<{self.manager.endpoint.contact(uplink.local_id, ev.transport, peer=ev.addr[0])}>")
        if not self._respond(ev, resp):
            self.sessions.pop(req.call_id, None)
            await self._release(session, "the upper platform cancelled its INVITE")
            return
        try:
            await asyncio.wait_for(session.acked.wait(), ACK_TIMEOUT)
        except TimeoutError:
            await self._end(session, f"no ACK for our 200 within {ACK_TIMEOUT:g} s", bye=True)
            return
        if session.ended:
            return
        if transport != "tcp-passive":
            try:
                await self._forward(session)
            except NodeCallError as exc:
                await self._end(session, f"cannot send to {remote[0]}:{remote[1]}: {exc}", bye=True)
                return
        self.manager.audit.record("view", who=f"upstream:{uplink.id}", source=ev.addr[0],
                                  target=channel_id, output=f"gb28181 {kind.lower()} {transport}",
                                  ssrc=ssrc, node=session.leg.node.name)
        log.info("%s of %s to upper platform %s: %s to %s:%d, SSRC %s", kind, channel_id, uplink.id,
                 transport, remote[0], remote[1], ssrc)

    async def _open_stream(self, session: UpSession, offer: SessionDescription) -> None:
        if session.kind == "Play":
            live = await self.streams.play(session.channel_id)
            session.leg = live.leg
            session.stream_key = live.channel_id
            self.streams.viewer_joined(live.channel_id)
            return
        if not offer.start or not offer.stop or offer.stop <= offer.start:
            raise PlayError(f"t={offer.start} {offer.stop} is not a range of recorded time", 400)
        speed = None
        if session.kind == "Download":
            video = offer.video
            values = [v or "" for k, v in (video.attributes if video else []) if k == "downloadspeed"]
            speed = int(values[0]) if values and values[0].strip().isdigit() else 1
            speed = max(1, min(speed, 32))
        pb = await self.playbacks.open(session.channel_id, offer.start, offer.stop, None,
                                       download_speed=speed, record=False,
                                       source=await self._history_source(session, offer))
        session.leg = pb.leg
        session.stream_key = pb.stream_id
        self.playbacks.viewer_joined(pb.stream_id)

    async def _history_source(self, session: UpSession, offer: SessionDescription) -> str:
        """Play the range from the platform's own recordings when they cover it (no INVITE to
        the device), unless ``recording.serve_cascade`` is off."""
        if not self.manager.config.recording.serve_cascade:
            return "device"
        try:
            return await self.playbacks.recorded_source(session.channel_id, offer.start, offer.stop)
        except Exception:  # the index unreadable: the device is asked, as without recordings
            log.exception("recordings of %s for upper platform %s", session.channel_id, session.uplink.id)
            return "device"

    def _node_port(self, session: UpSession) -> int:
        """The RTP port of the node that sends (that of the in-process relay when it names none), else 9."""
        assert session.leg is not None
        port = session.leg.node.as_dict().get("rtp_port")
        return (int(port) if port else self.manager.config.media.rtp_port) or 9

    async def _forward(self, session: UpSession) -> int:
        assert session.leg is not None
        host, port = session.remote
        result = await session.leg.call("forward", host=host, port=port if port else 9,
                                        transport=FORWARD[session.transport], ssrc=int(session.ssrc))
        session.forward = str(result.get("forward"))
        return int(result.get("port") or 9)

    def _answer_sdp(self, session: UpSession, offer: SessionDescription, media_host: str, port: int) -> bytes:
        tcp = session.transport != "udp"
        media = MediaDescription(
            port=port, proto="TCP/RTP/AVP" if tcp else "RTP/AVP", formats=[96], rtpmap={96: "PS/90000"},
            direction="sendonly",
            setup=("active" if session.transport == "tcp-active" else "passive") if tcp else None,
            connection="new" if tcp else None)
        sd = SessionDescription(origin_user=session.channel_id, origin_addr=media_host,
                                session_name=session.kind, connection_addr=media_host,
                                media=[media], ssrc=session.ssrc)
        if session.kind != "Play":
            sd.uri = offer.uri
            sd.start, sd.stop = offer.start, offer.stop
        return build_sdp(sd)

    # -- control and status ----------------------------------------------------------------------------
    async def _info(self, session: UpSession, ev: RequestReceived) -> None:
        req = ev.request
        if session.dialog is not None:
            session.dialog.receive_request(req)
        if session.kind == "Play":
            self._respond(ev, make_response(req, 405, "Method Not Allowed: INFO controls a playback"))
            return
        try:
            control = mansrtsp.parse(req.body)
        except mansrtsp.MansrtspError as exc:
            self._respond(ev, make_response(req, 400, f"Bad Request: {str(exc)[:100]}"))
            return
        action = control.action
        if action == "teardown":
            self._respond(ev, make_response(req, 200, "OK"))
            await self._end(session, "the upper platform sent TEARDOWN", bye=True)
            return
        if action == "play":
            action = "resume"
        try:
            await self.playbacks.control(session.stream_key, action, offset=control.npt, scale=control.scale)
        except PlayError as exc:
            status = {400: 400, 404: 481, 409: 481}.get(exc.http_status, 500)
            self._respond(ev, make_response(req, status, str(exc)[:100]))
            return
        self.manager.audit.record("playback-control", who=f"upstream:{session.uplink.id}",
                                  source=ev.addr[0], target=session.channel_id, control=action,
                                  offset=control.npt, scale=control.scale)
        self._respond(ev, make_response(req, 200, "OK"))

    async def _media_status(self, session: UpSession) -> None:
        """§9.8.2: the device sent the whole range; tell the upper in its dialog."""
        dialog = session.dialog
        if dialog is None or session.ended:
            return
        uplink = session.uplink
        endpoint = self.manager.endpoint
        body = self.manager.build("Notify", "MediaStatus", self.manager.answers.queries.next_sn(),
                                  session.channel_id, [("NotifyType", "121")])
        request = dialog.request("MESSAGE", via=endpoint.via(session.sip_transport, peer=uplink.config.host),
                                 body=body, content_type=MANSCDP_CONTENT_TYPE, user_agent="gb28181")
        with contextlib.suppress(SipTimeoutError, SipTransportError, OSError):
            await endpoint.request(request, uplink.addr, session.sip_transport, timeout=10.0)

    # -- ending ---------------------------------------------------------------------------------------
    def _live_closed(self, channel_id: str, reason: str) -> None:
        for s in [s for s in self.sessions.values() if s.kind == "Play" and s.stream_key == channel_id]:
            s.forward = None  # gone with the stream
            self._spawn(self._end(s, f"the device's stream ended: {reason}", bye=True))

    def _playback_event(self, stream_id: str, what: str) -> None:
        for s in [s for s in self.sessions.values() if s.kind != "Play" and s.stream_key == stream_id]:
            if what == "file-end":
                self._spawn(self._media_status(s))
            else:
                s.forward = None
                self._spawn(self._end(s, f"the device's playback ended: {what}", bye=True))

    def forward_ended(self, leg: MediaLeg, forward: str, reason: str) -> None:
        for s in [s for s in self.sessions.values() if s.leg is leg and s.forward == forward]:
            s.forward = None
            self._spawn(self._end(s, f"the upper's media receiver went away: {reason}", bye=True))

    async def _release(self, session: UpSession, reason: str) -> None:
        """Give back what the session holds on the device's stream."""
        leg, forward = session.leg, session.forward
        session.forward = None
        if leg is not None and forward is not None and not leg.released:
            with contextlib.suppress(NodeCallError):
                await leg.call("unforward", forward=forward)
        if session.kind != "Play" and session.stream_key:
            await self.playbacks.close(session.stream_key, reason)

    async def _end(self, session: UpSession, reason: str, *, bye: bool, bye_timeout: float = 5.0) -> None:
        if session.ended:
            return
        session.ended = True
        session.reason = reason
        session.acked.set()
        self.sessions.pop(session.call_id, None)
        await self._release(session, reason)
        log.info("%s of %s to upper platform %s ended: %s", session.kind, session.channel_id,
                 session.uplink.id, reason)
        if bye and session.dialog is not None:
            uplink = session.uplink
            endpoint = self.manager.endpoint
            request = session.dialog.request(
                "BYE", via=endpoint.via(session.sip_transport, peer=uplink.config.host), user_agent="gb28181")
            with contextlib.suppress(SipTimeoutError, SipTransportError, OSError):
                await endpoint.request(request, uplink.addr, session.sip_transport, timeout=bye_timeout)
