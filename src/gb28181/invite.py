"""Live-video INVITE dialogs to devices (§9.2, Annex F, Annex L; PROTOCOL.md §5).

``InviteManager.open`` plays one channel: it allocates a ``y=`` SSRC (Annex F), prepares the
media receiver for the chosen transport, sends the INVITE with an Annex F offer and a
``Subject`` (Annex K), follows provisional responses (Dahua's 101 carries a To tag), reads the
answer leniently, ACKs, and waits for the first RTP packet. Three media transports:

- ``udp``: RTP to our one shared UDP port, told apart by SSRC (with a fallback for devices
  that ignore the offered SSRC: the first unknown SSRC from the device's address);
- ``tcp-passive``: we listen (``a=setup:passive``), the device connects after the ACK;
- ``tcp-active``: we connect (``a=setup:active``) to the port in the device's answer.

No RTP within ``media.stream_timeout`` seconds of the ACK tears the dialog down (BYE) and the
caller gets an error; so does any failure answer, with the device's status and reason. A BYE
from the device ends the session at once. Whatever happens, the dialog, the SSRC and the
receiver are released exactly once (``MediaSession.close``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from media.ingest import RtpIngest
from media.packet import MediaPacket
from media.receiver import MediaReceiver
from registry.models import Channel, Device

from .config import Config
from .sdp import MediaDescription, SdpError, SessionDescription, SsrcAllocator, build_sdp, parse_sdp
from .sip.endpoint import SipEndpoint, SipTimeoutError, SipTransportError
from .sip.message import (
    SipParseError,
    SipRequest,
    SipResponse,
    make_response,
    new_call_id,
    new_request,
    new_tag,
    parse_name_addr,
)
from .sip.transaction import RequestReceived

__all__ = ["InviteError", "InviteManager", "MediaSession", "TRANSPORTS"]

log = logging.getLogger("gb28181.invite")

TRANSPORTS = ("udp", "tcp-passive", "tcp-active")


class InviteError(RuntimeError):
    """Playing failed; ``status`` is the SIP status when the device answered with one."""

    def __init__(self, text: str, status: int | None = None) -> None:
        super().__init__(text)
        self.status = status


@dataclass(slots=True)
class MediaSession:
    """One live INVITE dialog with its media receiver."""

    channel_id: str
    device_id: str
    transport: str
    ssrc: str
    call_id: str
    local_tag: str
    request_uri: str
    addr: tuple[str, int]
    sip_transport: str
    on_packet: Callable[[MediaPacket], None]
    remote_tag: str = ""
    remote_target: str = ""
    cseq: int = 1
    answer: SessionDescription | None = None
    ingest: RtpIngest | None = None
    handle: object | None = None
    ack: bytes = b""
    started_at: float = field(default_factory=time.time)
    established_at: float = 0.0
    closed: bool = False
    close_reason: str = ""
    on_close: Callable[[MediaSession], None] | None = None

    def as_dict(self) -> dict:
        return {"channel_id": self.channel_id, "device_id": self.device_id,
                "transport": self.transport, "ssrc": self.ssrc, "call_id": self.call_id,
                "answer_ssrc": self.answer.ssrc if self.answer else None,
                "media_from": getattr(self.handle, "peer", None)}


class InviteManager:
    """See the module docstring."""

    def __init__(self, *, config: Config, endpoint: SipEndpoint, receiver: MediaReceiver) -> None:
        self.config = config
        self.endpoint = endpoint
        self.receiver = receiver
        self.ssrcs = SsrcAllocator(config.server.domain)
        self.sessions: dict[str, MediaSession] = {}      # by Call-ID
        self.invites_sent = 0
        self.failures: dict[int, int] = {}               # SIP status (0: no answer) -> count
        endpoint.on_invite_2xx_retransmit = self._re_ack

    # -- helpers -------------------------------------------------------------------------
    @property
    def media_host(self) -> str:
        return self.receiver.advertised_host

    def _server_uri(self) -> str:
        s = self.config.server
        return f"sip:{s.id}@{s.domain}"

    def _contact(self) -> str:
        return f"sip:{self.config.server.id}@{self.endpoint.advertised_host}:{self.endpoint.port}"

    def _offer(self, channel_id: str, transport: str, port: int, ssrc: str) -> bytes:
        if transport == "udp":
            media = MediaDescription(port=port, proto="RTP/AVP", formats=[96, 97, 98],
                                     rtpmap={96: "PS/90000", 97: "MPEG4/90000", 98: "H264/90000"},
                                     direction="recvonly")
        else:
            media = MediaDescription(port=port, proto="TCP/RTP/AVP", formats=[96, 97, 98],
                                     rtpmap={96: "PS/90000", 97: "MPEG4/90000", 98: "H264/90000"},
                                     direction="recvonly",
                                     setup="passive" if transport == "tcp-passive" else "active",
                                     connection="new")
        sd = SessionDescription(origin_user=self.config.server.id, origin_addr=self.media_host,
                                session_name="Play", connection_addr=self.media_host,
                                media=[media], ssrc=ssrc)
        return build_sdp(sd)

    # -- opening ---------------------------------------------------------------------------
    async def open(self, channel: Channel, device: Device, transport: str,
                   on_packet: Callable[[MediaPacket], None]) -> MediaSession:
        """Play ``channel`` of ``device``; returns once the first RTP packet has arrived."""
        if transport not in TRANSPORTS:
            raise InviteError(f"unknown media transport {transport!r}; use one of {', '.join(TRANSPORTS)}")
        if not device.online or not device.host:
            raise InviteError(f"device {device.device_id} is offline", 480)
        media_cfg = self.config.media
        ssrc = self.ssrcs.allocate()
        session = MediaSession(
            channel_id=channel.channel_id, device_id=device.device_id, transport=transport,
            ssrc=ssrc, call_id=new_call_id(), local_tag=new_tag(),
            request_uri=f"sip:{channel.channel_id}@{device.host}:{device.port}",
            addr=(device.host, device.port), sip_transport=device.transport, on_packet=on_packet)
        session.ingest = RtpIngest(on_packet, expected_ssrc=int(ssrc))
        try:
            if transport == "udp":
                session.handle = self.receiver.expect_udp(int(ssrc), session.ingest, source_host=device.host)
                port = self.receiver.udp_port
            elif transport == "tcp-passive":
                session.handle = await self.receiver.listen_tcp(session.ingest, source_host=device.host)
                port = session.handle.port  # type: ignore[attr-defined]
            else:
                port = 9  # we connect; the port in our offer is not used (RFC 4145)
            invite = new_request(
                "INVITE", session.request_uri, via=self.endpoint.via(device.transport),
                from_uri=self._server_uri(), from_tag=session.local_tag,
                to_uri=f"sip:{channel.channel_id}@{channel.channel_id[:10]}",
                call_id=session.call_id, cseq=1, contact=self._contact(),
                headers={"subject": f"{channel.channel_id}:{ssrc},{self.config.server.id}:0"},
                body=self._offer(channel.channel_id, transport, port, ssrc),
                content_type="APPLICATION/SDP", user_agent="gb28181")
            self.sessions[session.call_id] = session
            self.invites_sent += 1
            resp = await self._invite(session, invite, media_cfg.invite_timeout)
            self._established(session, invite, resp)
            if transport == "tcp-active":
                video = session.answer.video if session.answer else None
                if video is None or not video.port:
                    raise InviteError("the device's answer has no media port to connect to", 488)
                host = session.answer.connection_addr if session.answer.connection_addr not in (
                    "", "0.0.0.0") else device.host
                try:
                    session.handle = await self.receiver.connect_tcp(host, video.port, session.ingest,
                                                                     timeout=5.0)
                except OSError as exc:
                    raise InviteError(f"cannot connect to the device's media port {host}:{video.port}: {exc}")
            first = session.handle.first_packet  # type: ignore[attr-defined]
            try:
                await asyncio.wait_for(first.wait(), media_cfg.stream_timeout)
            except TimeoutError:
                raise InviteError(f"{device.device_id} accepted the INVITE for {channel.channel_id} "
                                  f"but sent no RTP within {media_cfg.stream_timeout:g} s "
                                  f"({transport})", 408) from None
            return session
        except BaseException as exc:
            reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else str(exc)
            status = getattr(exc, "status", None) or 0
            self.failures[status] = self.failures.get(status, 0) + 1
            await self.close(session, reason)
            raise

    async def _invite(self, session: MediaSession, invite: SipRequest, timeout: float) -> SipResponse:
        def provisional(resp: SipResponse) -> None:
            # Dahua's 101 already carries the To tag of the dialog to come.
            if resp.to_tag and not session.remote_tag:
                session.remote_tag = resp.to_tag

        try:
            resp = await self.endpoint.request(invite, session.addr, session.sip_transport,
                                               timeout=timeout, on_provisional=provisional)
        except SipTimeoutError:
            await self._cancel(session, invite)
            raise InviteError(f"no answer to the INVITE from {session.device_id} within {timeout:g} s",
                              408) from None
        except SipTransportError as exc:
            raise InviteError(str(exc), 503) from None
        except asyncio.CancelledError:
            await self._cancel(session, invite)
            raise
        if resp.status >= 300:
            raise InviteError(f"{session.device_id} refused to play {session.channel_id}: "
                              f"{resp.status} {resp.reason}", resp.status)
        return resp

    async def _cancel(self, session: MediaSession, invite: SipRequest) -> None:
        """CANCEL a pending INVITE (RFC 3261 §9.1): same branch, Call-ID, From, To, CSeq number."""
        h = invite.headers
        cancel = SipRequest("CANCEL", invite.uri, {
            "via": [h["via"][0]], "from": list(h["from"]), "to": list(h["to"]),
            "call-id": list(h["call-id"]), "cseq": [f"{invite.cseq[0]} CANCEL"],
            "max-forwards": ["70"]})
        try:
            await self.endpoint.request(cancel, session.addr, session.sip_transport, timeout=5.0)
        except (SipTimeoutError, SipTransportError, ValueError):
            pass

    def _established(self, session: MediaSession, invite: SipRequest, resp: SipResponse) -> None:
        session.remote_tag = resp.to_tag or session.remote_tag
        contact = resp.get("contact")
        session.remote_target = session.request_uri
        if contact:
            try:
                session.remote_target = parse_name_addr(contact).uri
            except SipParseError:
                pass
        # The ACK goes out before we look at the answer: the dialog exists either way, and
        # a bad answer is then ended with a BYE.
        h = invite.headers
        ack = SipRequest("ACK", session.remote_target, {
            "via": [self.endpoint.via(session.sip_transport)], "from": list(h["from"]),
            "to": list(resp.headers["to"]), "call-id": list(h["call-id"]),
            "cseq": [f"{invite.cseq[0]} ACK"], "max-forwards": ["70"]})
        session.ack = ack.serialize()
        self.endpoint.layer.send_stateless(session.ack, session.addr, session.sip_transport)
        self.endpoint.flush()
        session.established_at = time.time()
        if not resp.body.strip():
            raise InviteError(f"{session.device_id} answered 200 without SDP", 488)
        try:
            session.answer = parse_sdp(resp.body)
        except SdpError as exc:
            raise InviteError(f"{session.device_id} answered with unusable SDP: {exc}", 488) from None
        answered = session.answer.ssrc_value
        if answered is not None and session.ingest is not None and answered != int(session.ssrc):
            # Annex F note 4 allows the callee to choose; keep receiving either way.
            log.info("%s answered y=%s to our y=%s", session.device_id, session.answer.ssrc, session.ssrc)

    def _re_ack(self, call_id: str) -> None:
        session = self.sessions.get(call_id)
        if session is not None and session.ack:
            self.endpoint.layer.send_stateless(session.ack, session.addr, session.sip_transport)
            self.endpoint.flush()

    # -- closing ---------------------------------------------------------------------------
    async def close(self, session: MediaSession, reason: str, *, send_bye: bool = True,
                    bye_timeout: float = 5.0) -> None:
        """Release everything of ``session`` once; BYE the device if the dialog was up."""
        if session.closed:
            return
        session.closed = True
        session.close_reason = reason
        self.sessions.pop(session.call_id, None)
        if session.handle is not None:
            session.handle.close()  # type: ignore[attr-defined]
        self.ssrcs.release(session.ssrc)
        if session.on_close is not None:
            try:
                session.on_close(session)
            except Exception:
                log.exception("on_close of %s", session.channel_id)
        if send_bye and session.established_at:
            session.cseq += 1
            bye = new_request(
                "BYE", session.remote_target or session.request_uri,
                via=self.endpoint.via(session.sip_transport), from_uri=self._server_uri(),
                from_tag=session.local_tag,
                to_uri=f"sip:{session.channel_id}@{session.channel_id[:10]}",
                to_tag=session.remote_tag or None, call_id=session.call_id, cseq=session.cseq,
                user_agent="gb28181")
            try:
                await self.endpoint.request(bye, session.addr, session.sip_transport, timeout=bye_timeout)
            except (SipTimeoutError, SipTransportError):
                pass
        log.info("closed %s (%s): %s", session.channel_id, session.transport, reason)

    def handle_bye(self, ev: RequestReceived) -> None:
        """A BYE from the device: 200, then tear the session down."""
        req = ev.request
        assert ev.transaction is not None
        session = self.sessions.get(req.call_id)
        if session is None:
            self.endpoint.respond(ev.transaction, make_response(req, 481, "Call Does Not Exist",
                                                                to_tag=new_tag()))
            return
        self.endpoint.respond(ev.transaction, make_response(req, 200, to_tag=session.remote_tag))
        asyncio.get_running_loop().create_task(self.close(session, "the device sent BYE",
                                                          send_bye=False))

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(self.close(s, reason) for s in list(self.sessions.values())),
                             return_exceptions=True)
