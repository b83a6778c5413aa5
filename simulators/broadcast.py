"""Voice broadcast reception of one simulated device (GB/T 28181-2016 §9.12.1, A.2.5 d, A.2.6 l,
C.4); fleet.py's ``SimDevice`` owns one ``DeviceBroadcasts``.

The device side of figure 27: a ``Notify/Broadcast`` MESSAGE (already answered 200 by the fleet)
is answered with a ``Response/Broadcast`` of the same SN, its ``Result`` OK, or ERROR with
``FleetConfig.broadcast_result`` (or for a TargetID that is neither the device nor one of its
channels), in the vendor's body shape. After OK the device sends its own INVITE to the SourceID
(§9.12.1.2 step 5): ``s=Play``, ``m=audio``, ``a=recvonly``, PT 8 PCMA/8000 or PT 96 PS/90000,
its ``y=``, over UDP or TCP. ``broadcast_transport`` is in the *device's* terms: ``tcp-active``
the device connects to the platform (``a=setup:active``), ``tcp-passive`` it listens
(``a=setup:passive``); the vendor chooses when the config does not (vendors.py). It ACKs the
200, receives the RTP (RFC 4571 framing on TCP, Annex L), takes the A-law from bare PCMA or
from the C0 PES of the PS (``media.ps.PsDemuxer``), decodes it, and places each packet's
samples at its RTP timestamp, so lost packets leave silence rather than shifting what follows.

What a device heard is kept: ``DeviceBroadcasts.heard`` in the process, and, with
``FleetConfig.broadcast_dir``, a WAV file (8 kHz, mono, 16-bit) per broadcast named
``<device ID>-<n>.wav``, written (atomically) when the broadcast ends, beside a JSON file with
what was negotiated. A BYE from the platform ends it, and so does the device itself after
``broadcast_hangup_after`` seconds of audio (a speaker that times out), with a BYE of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gb28181 import manscdp
from gb28181.broadcast import alaw_decode
from gb28181.sdp import MediaDescription, SdpError, SessionDescription, build_sdp, parse_sdp
from gb28181.sip.dialog import Dialog, DialogError
from gb28181.sip.endpoint import SipTimeoutError, SipTransportError
from gb28181.sip.message import new_request
from gb28181.sip.transaction import RequestReceived
from media.ps import PsDemuxer
from media.rtp import RtpError, parse_rtp
from media.rtp_tcp import TcpRtpFramer

if TYPE_CHECKING:
    from .fleet import SimDevice

__all__ = ["BROADCAST_FORMATS", "BROADCAST_TRANSPORTS", "DeviceBroadcasts", "Heard", "broadcast_summary"]

BROADCAST_TRANSPORTS = ("udp", "tcp-active", "tcp-passive")
BROADCAST_FORMATS = ("pcma", "ps")
SAMPLE_RATE = 8000
#: At most this much audio is kept per broadcast (15 minutes: 14 MB of PCM).
MAX_SAMPLES = 15 * 60 * SAMPLE_RATE
SDP_CONTENT_TYPE = "APPLICATION/SDP"


@dataclass(slots=True, eq=False)
class Heard:
    """One broadcast as the device received it."""

    source_id: str
    target_id: str
    transport: str  # the device's terms
    format: str  # pcma | ps
    ssrc: str
    call_id: str = ""
    pcm: bytearray = field(default_factory=bytearray, repr=False)  # s16le, 8 kHz, mono
    packets: int = 0
    bytes: int = 0
    ssrcs: set[int] = field(default_factory=set)
    payload_types: set[int] = field(default_factory=set)
    started_at: float = 0.0
    ended_by: str = ""
    error: str = ""
    path: str = ""

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / SAMPLE_RATE

    def summary(self) -> dict[str, Any]:
        return {"source_id": self.source_id, "target_id": self.target_id,
                "transport": self.transport, "format": self.format, "ssrc": self.ssrc,
                "call_id": self.call_id, "packets": self.packets, "bytes": self.bytes,
                "rtp_ssrcs": sorted(self.ssrcs), "payload_types": sorted(self.payload_types),
                "seconds": round(self.seconds, 3), "ended_by": self.ended_by, "error": self.error}


class _Receiver:
    """RTP in, PCM placed by timestamp (sans-IO apart from the counters it updates)."""

    def __init__(self, heard: Heard) -> None:
        self.heard = heard
        self.base: int | None = None
        self.demuxer = PsDemuxer()
        self.first_at = 0.0

    def packet(self, data: bytes) -> None:
        heard = self.heard
        try:
            pkt = parse_rtp(data)
        except RtpError:
            return
        heard.packets += 1
        heard.bytes += len(data)
        heard.ssrcs.add(pkt.ssrc)
        heard.payload_types.add(pkt.payload_type)
        if not self.first_at:
            self.first_at = time.monotonic()
        if self.base is None:
            self.base = pkt.timestamp
        if pkt.payload_type == 8:  # C.4: PCMA, 8 kHz clock
            self._place((pkt.timestamp - self.base) & 0xFFFFFFFF, bytes(pkt.payload))
            return
        frames = self.demuxer.feed(pkt.payload) + self.demuxer.flush()
        for frame in frames:
            if frame.stream != "audio":
                continue
            pts = frame.pts if frame.pts is not None else pkt.timestamp
            self._place(((pts - self.base) & 0xFFFFFFFF) * SAMPLE_RATE // 90000, frame.data)

    def _place(self, offset: int, alaw: bytes) -> None:
        pcm = self.heard.pcm
        if offset + len(alaw) > MAX_SAMPLES:
            return
        start = offset * 2
        end = start + 2 * len(alaw)
        if len(pcm) < end:
            pcm.extend(bytes(end - len(pcm)))
        pcm[start:end] = alaw_decode(alaw)


class _UdpIn(asyncio.DatagramProtocol):
    def __init__(self, receiver: _Receiver) -> None:
        self.receiver = receiver

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.receiver.packet(data)


@dataclass(slots=True, eq=False)
class _Session:
    heard: Heard
    receiver: _Receiver
    dialog: Dialog | None = None
    addr: tuple[str, int] = ("", 0)
    udp: asyncio.DatagramTransport | None = None
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    media_closed: asyncio.Event = field(default_factory=asyncio.Event)


class DeviceBroadcasts:
    """The broadcasts of one device; see the module docstring."""

    def __init__(self, device: SimDevice) -> None:
        self.device = device
        self.heard: list[Heard] = []
        self.sessions: dict[str, _Session] = {}  # by Call-ID
        self.notifies = 0
        self.errors = 0
        self._serial = 0

    @property
    def transport(self) -> str:
        return self.device.cfg.broadcast_transport or self.device.vendor.broadcast_transport

    @property
    def format(self) -> str:
        return self.device.cfg.broadcast_format or self.device.vendor.broadcast_format

    # -- the notify (A.2.5 d) and its Response (A.2.6 l) -----------------------------------------
    def on_notify(self, msg: manscdp.Manscdp) -> None:
        self.notifies += 1
        self.device.fleet.spawn(self._answer(msg))

    async def _answer(self, msg: manscdp.Manscdp) -> None:
        device = self.device
        source_id, target_id = msg.text("SourceID"), msg.text("TargetID")
        result = (device.cfg.broadcast_result or "OK").upper()
        if target_id != device.device_id and device.catalog.get(target_id) is None:
            result = "ERROR"  # no such audio output here
        if not source_id:
            result = "ERROR"
        body = device.vendor.body("Response", "Broadcast", msg.sn or 0, target_id or device.device_id,
                                  [("Result", result)])
        try:
            await device._send(device._message(body))
        except (SipTimeoutError, SipTransportError) as exc:
            device.last_error = f"broadcast Response: {exc}"
            return
        if result == "OK":
            await self._call(source_id, target_id)

    # -- the audio INVITE (§9.12.1.2 step 5) ------------------------------------------------------
    async def _call(self, source_id: str, target_id: str) -> None:
        device = self.device
        cfg = device.cfg
        ep = device.ep
        transport, fmt = self.transport, self.format
        heard = Heard(source_id, target_id, transport, fmt, device.fleet.new_ssrc(),
                      started_at=time.time())
        session = _Session(heard, _Receiver(heard))
        host = ep.advertised_host
        bind = device.fleet.media_bind_host
        loop = asyncio.get_running_loop()
        try:
            if transport == "udp":
                session.udp, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpIn(session.receiver), local_addr=(bind, 0))
                port = session.udp.get_extra_info("sockname")[1]
            elif transport == "tcp-passive":
                session.server = await asyncio.start_server(
                    lambda r, w: self._read_tcp(session, r, w), bind, 0)
                port = session.server.sockets[0].getsockname()[1]
            else:
                port = 9  # RFC 4145 §4.1: the active side's port is not used
        except OSError as exc:
            heard.error = f"no media socket: {exc}"
            self._keep(session)
            return
        pt = 8 if fmt == "pcma" else 96
        tcp = transport != "udp"
        offer = build_sdp(SessionDescription(
            origin_user=target_id, origin_addr=host, session_name="Play", connection_addr=host,
            media=[MediaDescription(
                media="audio", port=port, proto="TCP/RTP/AVP" if tcp else "RTP/AVP", formats=[pt],
                rtpmap={8: "PCMA/8000"} if pt == 8 else {96: "PS/90000"}, direction="recvonly",
                setup=("active" if transport == "tcp-active" else "passive") if tcp else None,
                connection="new" if tcp else None)],
            ssrc=heard.ssrc, format="v/////a/1/8/1"))
        uri = f"sip:{source_id}@{cfg.server_host}:{cfg.server_port}"
        invite = new_request(
            "INVITE", uri, via=ep.via(cfg.transport),
            from_uri=f"sip:{target_id}@{cfg.domain}", to_uri=f"sip:{source_id}@{cfg.domain}",
            contact=device._contact(), headers={"subject": f"{source_id}:0,{target_id}:0"},
            body=offer, content_type=SDP_CONTENT_TYPE)
        device.vendor.shape(invite)
        heard.call_id = invite.call_id
        self.sessions[invite.call_id] = session
        try:
            await self._dialog(session, invite)
        finally:
            self.sessions.pop(invite.call_id, None)
            await self._close(session)
            self._keep(session)

    async def _dialog(self, session: _Session, invite: Any) -> None:
        device = self.device
        cfg = device.cfg
        heard = session.heard
        try:
            resp = await device.ep.request(invite, device.server_addr, cfg.transport,
                                           timeout=cfg.request_timeout or 32.0)
        except (SipTimeoutError, SipTransportError) as exc:
            heard.error = f"INVITE: {exc}"
            return
        if resp.status != 200:
            heard.error = f"INVITE: {resp.status} {resp.reason}"
            return
        try:
            session.dialog = Dialog.from_response(resp, fallback_target=invite.uri)
            answer = parse_sdp(resp.body)
        except (DialogError, SdpError) as exc:
            heard.error = f"unusable 200: {exc}"
            return
        session.addr = device.server_addr
        audio = next((m for m in answer.media if m.media == "audio"), None)
        connect = self.transport == "tcp-active" and audio is not None
        if connect and device.vendor.broadcast_connect_before_ack:
            await self._connect(session, answer.connection_addr, audio.port)  # type: ignore[union-attr]
        ack = session.dialog.ack(resp.cseq[0], via=device.ep.via(cfg.transport))
        device.vendor.shape(ack)
        device.ep.send_stateless(ack, session.addr, cfg.transport)
        if connect and not device.vendor.broadcast_connect_before_ack:
            await self._connect(session, answer.connection_addr, audio.port)  # type: ignore[union-attr]
        hangup = cfg.broadcast_hangup_after
        while not session.ended.is_set():
            first = session.receiver.first_at
            if hangup > 0 and first and time.monotonic() - first >= hangup:
                await self._hang_up(session)
                return
            try:
                await asyncio.wait_for(session.ended.wait(), 0.05)
            except TimeoutError:
                pass

    async def _connect(self, session: _Session, host: str, port: int) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
        except (OSError, TimeoutError) as exc:
            session.heard.error = f"cannot connect the TCP media to {host}:{port}: {exc}"
            return
        self.device.fleet.spawn(self._read_tcp(session, reader, writer))

    async def _read_tcp(self, session: _Session, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        session.writers.append(writer)
        framer = TcpRtpFramer()
        try:
            while data := await reader.read(65536):
                for packet in framer.feed(data):
                    session.receiver.packet(packet)
        except (ConnectionError, OSError):
            pass
        finally:
            session.media_closed.set()

    async def _hang_up(self, session: _Session) -> None:
        """The device ends the broadcast itself: BYE in the dialog."""
        device = self.device
        session.heard.ended_by = "device-bye"
        session.ended.set()
        if session.dialog is None:
            return
        bye = session.dialog.request("BYE", via=device.ep.via(device.cfg.transport))
        device.vendor.shape(bye)
        try:
            await device.ep.request(bye, session.addr, device.cfg.transport,
                                    timeout=device.cfg.request_timeout or 32.0)
        except (SipTimeoutError, SipTransportError) as exc:
            session.heard.error = f"BYE: {exc}"

    # -- in-dialog requests from the platform ------------------------------------------------------
    def owns(self, call_id: str) -> bool:
        return call_id in self.sessions

    def on_request(self, ev: RequestReceived) -> None:
        """A BYE from the platform ends the broadcast; anything else in the dialog gets 405."""
        req = ev.request
        if ev.transaction is None:
            return
        session = self.sessions[req.call_id]
        if session.dialog is None or not session.dialog.matches(req):
            self.device._reply(ev, 481, "Call/Transaction Does Not Exist")
            return
        session.dialog.receive_request(req)
        if req.method != "BYE":
            self.device._reply(ev, 405)
            return
        self.device._reply(ev, 200)
        session.heard.ended_by = session.heard.ended_by or "platform-bye"
        session.ended.set()

    # -- keeping what was heard -------------------------------------------------------------------
    async def _close(self, session: _Session) -> None:
        if session.udp is not None:
            session.udp.close()
        if session.server is not None:
            session.server.close()
        for writer in session.writers:
            writer.close()

    def _keep(self, session: _Session) -> None:
        heard = session.heard
        if heard.error:
            self.errors += 1
        self.heard.append(heard)
        directory = self.device.cfg.broadcast_dir
        if not directory:
            return
        self._serial += 1
        path = Path(directory) / f"{self.device.device_id}-{self._serial}.wav"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".wav.tmp")
            with wave.open(str(tmp), "wb") as out:
                out.setnchannels(1)
                out.setsampwidth(2)
                out.setframerate(SAMPLE_RATE)
                out.writeframes(bytes(heard.pcm))
            path.with_suffix(".json").write_text(json.dumps(heard.summary(), indent=1))
            os.replace(tmp, path)  # the WAV appears whole, after its JSON
            heard.path = str(path)
        except OSError as exc:
            heard.error = heard.error or f"cannot write {path}: {exc}"


def broadcast_summary(all_broadcasts: list[DeviceBroadcasts]) -> dict[str, int]:
    """Fleet-wide counts for the simulator's summary."""
    return {"broadcast_notifies": sum(b.notifies for b in all_broadcasts),
            "broadcasts_heard": sum(len(b.heard) for b in all_broadcasts),
            "broadcast_errors": sum(b.errors for b in all_broadcasts)}
