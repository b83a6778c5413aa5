"""Live-video INVITE dialogs to devices (§9.2, Annex F, Annex L; PROTOCOL.md §5).

``InviteManager.open`` plays one channel: it allocates a ``y=`` SSRC (Annex F), has the media
node chosen for the stream (``nodes.MediaLeg``) prepare its receive path, sends the INVITE with an Annex F offer and a
``Subject`` (Annex K), follows provisional responses (Dahua's 101 carries a To tag), reads the
answer leniently, ACKs, and waits for the first RTP packet. Three media transports:

- ``udp``: RTP to the node's one shared UDP port, told apart by SSRC (with a fallback for
  devices that ignore the offered SSRC: the first unknown SSRC from the device's address);
- ``tcp-passive``: we listen (``a=setup:passive``), the device connects after the ACK;
- ``tcp-active``: we connect (``a=setup:active``) to the port in the device's answer.

The SIP side is a ``sip.dialog.Dialog`` built from the 200 (its Contact is the remote target,
its Record-Route the route set); ACK and BYE are built by it and sent where ``routing`` says.
The SSRC of the answer's ``y=``, when it differs from the offer (Annex F note 4 lets the callee
choose), is routed to its stream the moment the 200 arrives, so two INVITEs to one NVR never
swap channels whichever stream's RTP comes first. Real devices answer TCP offers loosely: an
answer that says ``setup:passive`` to our passive offer is met by connecting to it, and a
``tcp-active`` connection that fails at the answer's ``c=`` is tried at the device's signalling
address.

No RTP within ``media.stream_timeout`` seconds of the ACK tears the dialog down (BYE) and the
caller gets an error; so does any failure answer, with the device's status and reason. An
INVITE that gets no answer in ``media.invite_timeout`` is CANCELled; an answer that still comes
(a 2xx after the CANCEL or the timeout) is ACKed and then BYE'd (RFC 3261 §13.2.2.4), so the
device does not stream into a session nobody holds. A BYE from the device ends the session at
once. Whatever happens, the dialog, the SSRC and the node's stream are released exactly once
(``InviteManager.close``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from registry.devices import DeviceRegistry
from registry.models import Channel, Device

from .config import Config
from .nodes import MediaLeg, NodeCallError
from .routing import Target, device_target, dialog_target
from .sdp import MediaDescription, SdpError, SessionDescription, SsrcAllocator, build_sdp, parse_sdp
from .sip.dialog import Dialog, DialogError
from .sip.endpoint import SipEndpoint, SipTimeoutError, SipTransportError
from .sip.message import SipRequest, SipResponse, make_response, new_call_id, new_request, new_tag
from .sip.netroute import LocalAddresses
from .sip.transaction import Addr, RequestReceived

__all__ = ["History", "InviteError", "InviteManager", "MediaSession", "NODE_LOST", "TRANSPORTS"]

log = logging.getLogger("gb28181.invite")

TRANSPORTS = ("udp", "tcp-passive", "tcp-active")
NODE_LOST = 1  # InviteError.status when the media node went away, not the device


@dataclass(slots=True, frozen=True)
class History:
    """What a Playback or Download INVITE asks for: a recorded range (Unix seconds)."""

    kind: str  # Playback | Download
    start: int
    end: int
    speed: int = 1  # a=downloadspeed (Download only)


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
    target: Target
    leg: MediaLeg
    invite: SipRequest | None = None
    dialog: Dialog | None = None
    answer: SessionDescription | None = None
    ack: bytes = b""
    ack_target: Target | None = None
    started_at: float = field(default_factory=time.time)
    established_at: float = 0.0
    closed: bool = False
    close_reason: str = ""
    on_close: Callable[[MediaSession], None] | None = None
    kind: str = "Play"  # Play | Playback | Download (Annex F s=)
    #: MediaStatus 121 arrived in this dialog (the device sent the whole range, §9.8.2).
    on_file_end: Callable[[MediaSession], None] | None = None
    file_ended: bool = False

    @property
    def sip_transport(self) -> str:
        return self.target.transport

    def as_dict(self) -> dict:
        return {"channel_id": self.channel_id, "device_id": self.device_id,
                "transport": self.transport, "ssrc": self.ssrc, "call_id": self.call_id,
                "answer_ssrc": self.answer.ssrc if self.answer else None,
                "media_from": self.leg.peer, "media_node": self.leg.node.name}


class InviteManager:
    """See the module docstring."""

    def __init__(self, *, config: Config, endpoint: SipEndpoint,
                 registry: DeviceRegistry | None = None) -> None:
        self.config = config
        self.endpoint = endpoint
        self.registry = registry
        media = config.media
        #: The address devices send media to (SDP ``c=``), per device: see ``sip.netroute``.
        self.media_addresses = LocalAddresses(media.host, media.advertised_host or config.sip.external_host)
        self.ssrcs = SsrcAllocator(config.server.domain)
        self.sessions: dict[str, MediaSession] = {}      # by Call-ID
        self.invites_sent = 0
        self.late_answers = 0                            # 2xx after CANCEL/timeout: ACKed, BYE'd
        self.failures: dict[int, int] = {}               # SIP status (0: no answer) -> count
        self._tasks: set[asyncio.Task] = set()
        endpoint.on_invite_2xx = self._invite_2xx

    # -- helpers -------------------------------------------------------------------------
    def _server_uri(self) -> str:
        s = self.config.server
        return f"sip:{s.id}@{s.domain}"

    def _offer(self, transport: str, port: int, ssrc: str, media_host: str, history: History | None,
               channel_id: str) -> bytes:
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
        sd = SessionDescription(origin_user=self.config.server.id, origin_addr=media_host,
                                session_name="Play", connection_addr=media_host,
                                media=[media], ssrc=ssrc)
        if history is not None:
            # Annex F: s=Playback|Download, u=<channel>:0, t=<start> <end> in Unix seconds,
            # and for a download a=downloadspeed (§9.9).
            sd.session_name, sd.uri = history.kind, f"{channel_id}:0"
            sd.start, sd.stop = history.start, history.end
            if history.kind == "Download":
                media.attributes.append(("downloadspeed", str(history.speed)))
        return build_sdp(sd)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send_ack(self, session: MediaSession) -> None:
        if session.ack and session.ack_target is not None:
            t = session.ack_target
            self.endpoint.layer.send_stateless(session.ack, t.addr, t.transport)
            self.endpoint.flush()

    # -- opening ---------------------------------------------------------------------------
    async def open(self, channel: Channel, device: Device, transport: str, leg: MediaLeg,
                   history: History | None = None) -> MediaSession:
        """Play ``channel`` of ``device`` (live, or the ``history`` range) into ``leg``; returns
        once the first RTP packet arrived."""
        if transport not in TRANSPORTS:
            raise InviteError(f"unknown media transport {transport!r}; use one of {', '.join(TRANSPORTS)}")
        if not device.online or not device.host:
            raise InviteError(f"device {device.device_id} is offline", 480)
        media_cfg = self.config.media
        ssrc = self.ssrcs.allocate(history=history is not None)  # Annex F: y= 1... for history
        target = device_target(device)
        session = MediaSession(
            channel_id=channel.channel_id, device_id=device.device_id, transport=transport,
            ssrc=ssrc, call_id=new_call_id(), target=target, leg=leg,
            kind=history.kind if history else "Play")
        try:
            try:
                opened = await leg.call("open", transport=transport, ssrc=int(ssrc), source_host=device.host)
            except NodeCallError as exc:
                raise InviteError(f"media node {leg.node.name} cannot take the stream: {exc}", 503) from None
            port = int(opened["port"])
            peer = device.host
            sip_transport = target.transport
            session.invite = new_request(
                "INVITE", f"sip:{channel.channel_id}@{device.host}:{device.port}",
                via=self.endpoint.via(sip_transport, peer=peer),
                from_uri=self._server_uri(), from_tag=new_tag(),
                to_uri=f"sip:{channel.channel_id}@{channel.channel_id[:10]}",
                call_id=session.call_id, cseq=1,
                contact=self.endpoint.contact(self.config.server.id, sip_transport, peer=peer),
                headers={"subject": f"{channel.channel_id}:{ssrc},{self.config.server.id}:0"},
                body=self._offer(transport, port, ssrc,
                                 leg.node.media_address() or self.media_addresses.for_peer(peer),
                                 history, channel.channel_id),
                content_type="APPLICATION/SDP", user_agent="gb28181")
            self.sessions[session.call_id] = session
            self.invites_sent += 1
            resp = await self._invite(session, session.invite, media_cfg.invite_timeout)
            self._established(session, device, resp)
            await self._route_answered_ssrc(session)
            await self._media_connection(session, device)
            try:
                await asyncio.wait_for(leg.first_packet.wait(), media_cfg.stream_timeout)
            except TimeoutError:
                raise InviteError(f"{device.device_id} accepted the INVITE for {channel.channel_id} "
                                  f"but sent no RTP within {media_cfg.stream_timeout:g} s "
                                  f"({transport})", 408) from None
            if leg.node_lost:
                raise InviteError(f"media node {leg.node.name} was lost while {channel.channel_id} "
                                  "was being opened", NODE_LOST)
            if session.file_ended and leg.peer is None:
                raise InviteError(f"{device.device_id} reports the end of the range (MediaStatus 121) "
                                  f"without sending any media: nothing of {channel.channel_id} is "
                                  "recorded there", 404)
            return session
        except BaseException as exc:
            reason = "cancelled" if isinstance(exc, asyncio.CancelledError) else str(exc)
            status = getattr(exc, "status", None) or 0
            self.failures[status] = self.failures.get(status, 0) + 1
            await self.close(session, reason)
            raise

    async def _invite(self, session: MediaSession, invite: SipRequest, timeout: float) -> SipResponse:
        def provisional(resp: SipResponse) -> None:
            # Dahua's 101 already carries the To tag of the dialog to come (an early dialog).
            if resp.to_tag and session.dialog is None:
                try:
                    session.dialog = Dialog.from_response(resp, fallback_target=invite.uri)
                except DialogError:
                    pass

        t = session.target
        try:
            resp = await self.endpoint.request(invite, t.addr, t.transport, timeout=timeout,
                                               on_provisional=provisional, fallback=t.fallback)
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
        """CANCEL a pending INVITE (RFC 3261 §9.1): same branch, Call-ID, From, To, CSeq number.
        The INVITE's transaction lives on: a 487 is ACKed there, a 2xx reaches ``_invite_2xx``."""
        h = invite.headers
        cancel = SipRequest("CANCEL", invite.uri, {
            "via": [h["via"][0]], "from": list(h["from"]), "to": list(h["to"]),
            "call-id": list(h["call-id"]), "cseq": [f"{invite.cseq[0]} CANCEL"],
            "max-forwards": ["70"]})
        t = session.target
        try:
            await self.endpoint.request(cancel, t.addr, t.transport, timeout=5.0, fallback=t.fallback)
        except (SipTimeoutError, SipTransportError, ValueError):
            pass

    def _device(self, device_id: str) -> Device | None:
        return self.registry.get(device_id) if self.registry is not None else None

    def _established(self, session: MediaSession, device: Device, resp: SipResponse) -> None:
        assert session.invite is not None
        try:
            session.dialog = Dialog.from_response(resp, fallback_target=session.invite.uri)
        except DialogError as exc:
            raise InviteError(f"{session.device_id} answered with an unusable 200: {exc}", 502) from None
        # The ACK goes out before we look at the answer: the dialog exists either way, and
        # a bad answer is then ended with a BYE.
        target = dialog_target(self.endpoint, device, session.dialog, session.sip_transport)
        session.ack_target = target
        ack = session.dialog.ack(session.invite.cseq[0],
                                 via=self.endpoint.via(target.transport, peer=target.addr[0]))
        session.ack = ack.serialize()
        self._send_ack(session)
        if session.kind == "Play" and self.config.media.iframe_after_ack:
            # A.2.3 IFameCmd: an IDR now rather than at the camera's next GOP; never awaited.
            from .control import iframe_after_ack
            self._spawn(iframe_after_ack(self.endpoint, self.config, device, session.channel_id))
        session.established_at = time.time()
        if not resp.body.strip():
            raise InviteError(f"{session.device_id} answered 200 without SDP", 488)
        try:
            session.answer = parse_sdp(resp.body)
        except SdpError as exc:
            raise InviteError(f"{session.device_id} answered with unusable SDP: {exc}", 488) from None

    async def _route_answered_ssrc(self, session: MediaSession) -> None:
        """Annex F note 4 lets the callee choose its SSRC: route the answer's to this stream
        now, before any RTP, so that no other stream of the same device can be given it."""
        answered = session.answer.ssrc_value if session.answer else None
        if answered is None or answered == int(session.ssrc):
            return
        try:
            taken = (await session.leg.call("add_ssrc", ssrc=answered)).get("taken")
        except NodeCallError as exc:
            raise InviteError(str(exc), 503) from None
        if not taken:
            log.warning("%s answered y=%s, which another stream already uses", session.device_id,
                        session.answer.ssrc if session.answer else answered)
        else:
            log.info("%s answered y=%s to our y=%s", session.device_id, answered, session.ssrc)

    async def _media_connection(self, session: MediaSession, device: Device) -> None:
        """Connect the media where we are the TCP client: tcp-active, or a passive offer that
        the device also answered passive (it listens: somebody has to connect)."""
        answer = session.answer
        video = answer.video if answer else None
        if session.transport == "udp" or video is None:
            return
        answered_setup = (video.setup or "").lower()
        if session.transport == "tcp-passive" and answered_setup != "passive":
            return
        if session.transport == "tcp-active" and answered_setup == "active":
            raise InviteError(f"{session.device_id} answered setup:active to our setup:active: "
                              "neither side would listen", 488)
        if not video.port:
            raise InviteError("the device's answer has no media port to connect to", 488)
        # The node's listener (a passive offer) held the SSRC; the connection takes it over.
        hosts = [answer.connection_addr if answer else "", device.host]
        try:
            await session.leg.call("connect", hosts=hosts, port=video.port, timeout=5.0)
        except NodeCallError as exc:
            raise InviteError(str(exc), 502) from None
        await self._route_answered_ssrc(session)

    def _invite_2xx(self, resp: SipResponse, addr: Addr, transport: str) -> None:
        """A 2xx nobody waits for: our ACK was lost (send it again), or the answer came after
        a CANCEL or a timeout (accept the dialog, then end it: RFC 3261 §13.2.2.4)."""
        session = self.sessions.get(resp.call_id)
        if (session is not None and session.dialog is not None and session.ack
                and session.dialog.remote_tag == (resp.to_tag or "")):
            self._send_ack(session)
            return
        try:
            dialog = Dialog.from_response(resp)
        except DialogError:
            return
        self.late_answers += 1
        log.info("%s answered the INVITE %s after it was given up: ACK and BYE",
                 addr[0], resp.call_id)
        device = self._device(session.device_id) if session is not None else None
        target = dialog_target(self.endpoint, device, dialog, transport) if device else Target(addr, transport)
        ack = dialog.ack(resp.cseq[0], via=self.endpoint.via(target.transport, peer=target.addr[0]))
        self.endpoint.layer.send_stateless(ack.serialize(), target.addr, target.transport)
        self.endpoint.flush()
        self._spawn(self._bye(dialog, target, 5.0))

    async def _bye(self, dialog: Dialog, target: Target, timeout: float) -> int | None:
        bye = dialog.request("BYE", via=self.endpoint.via(target.transport, peer=target.addr[0]),
                             user_agent="gb28181")
        try:
            resp = await self.endpoint.request(bye, target.addr, target.transport, timeout=timeout,
                                               fallback=target.fallback)
        except (SipTimeoutError, SipTransportError):
            return None
        return resp.status

    # -- closing ---------------------------------------------------------------------------
    async def close(self, session: MediaSession, reason: str, *, send_bye: bool = True,
                    bye_timeout: float = 5.0) -> None:
        """Release everything of ``session`` once; BYE the device if the dialog was up."""
        if session.closed:
            return
        session.closed = True
        session.close_reason = reason
        self.sessions.pop(session.call_id, None)
        await session.leg.release(reason)
        self.ssrcs.release(session.ssrc)
        if session.on_close is not None:
            try:
                session.on_close(session)
            except Exception:
                log.exception("on_close of %s", session.channel_id)
        if send_bye and session.established_at and session.dialog is not None:
            device = self._device(session.device_id)
            target = dialog_target(self.endpoint, device, session.dialog, session.sip_transport) \
                if device is not None else (session.ack_target or session.target)
            await self._bye(session.dialog, target, bye_timeout)
        log.info("closed %s (%s): %s", session.channel_id, session.transport, reason)

    async def info(self, session: MediaSession, body: bytes, content_type: str,
                   timeout: float = 5.0) -> SipResponse:
        """An in-dialog INFO (playback control, Annex B); the device's final response."""
        if session.dialog is None or session.closed:
            raise InviteError(f"the dialog of {session.channel_id} is not up", 481)
        device = self._device(session.device_id)
        target = dialog_target(self.endpoint, device, session.dialog, session.sip_transport) \
            if device is not None else (session.ack_target or session.target)
        info = session.dialog.request("INFO", via=self.endpoint.via(target.transport, peer=target.addr[0]),
                                      body=body, content_type=content_type, user_agent="gb28181")
        try:
            return await self.endpoint.request(info, target.addr, target.transport, timeout=timeout,
                                               fallback=target.fallback)
        except SipTimeoutError:
            raise InviteError(f"{session.device_id} did not answer the INFO within {timeout:g} s", 408) from None
        except SipTransportError as exc:
            raise InviteError(str(exc), 503) from None

    def media_status(self, call_id: str, notify_type: str) -> bool:
        """A MediaStatus Notify inside one of our dialogs (matched by Call-ID: its From may not
        be a registered device); 121 = the device sent the whole range (§9.8.2). True if ours."""
        session = self.sessions.get(call_id)
        if session is None:
            return False
        if notify_type.strip() == "121" and not session.leg.first_packet.is_set():
            session.file_ended = True  # before any media: the INVITE gives up at once
            session.leg.first_packet.set()
            return True
        if notify_type.strip() == "121" and session.on_file_end is not None:
            try:
                session.on_file_end(session)
            except Exception:
                log.exception("on_file_end of %s", session.channel_id)
        return True

    def handle_bye(self, ev: RequestReceived) -> None:
        """A BYE from the device: 200, then tear the session down."""
        req = ev.request
        assert ev.transaction is not None
        session = self.sessions.get(req.call_id)
        if session is None or session.dialog is None or not session.dialog.matches(req):
            self.endpoint.respond(ev.transaction, make_response(req, 481, "Call Does Not Exist",
                                                                to_tag=new_tag()))
            return
        session.dialog.receive_request(req)
        self.endpoint.respond(ev.transaction, make_response(req, 200))
        self._spawn(self.close(session, "the device sent BYE", send_bye=False))

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(self.close(s, reason) for s in list(self.sessions.values())),
                             return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
