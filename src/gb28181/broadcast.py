"""Voice broadcast to devices (GB/T 28181-2016 §9.12.1, A.2.5 d, A.2.6 l, Annex F, C.4).

The flow of §9.12.1.2 (figure 27), seen from this platform, which is both the SIP server and the
"voice input" (the sender of the audio):

1. we send a MESSAGE ``<Notify><CmdType>Broadcast</CmdType><SourceID/><TargetID/>`` to the
   device (A.2.5 d): SourceID is this platform's ID, TargetID the audio output (type 137), the
   camera or the device itself (the device then plays on all of its outputs, §9.12.1.1);
2. the device answers 200, then a ``<Response>`` Broadcast with the same SN and ``Result`` OK or
   ERROR (A.2.6 l); ERROR (or silence) ends the broadcast as failed, with that reason;
3. the device sends an INVITE *to us* (Request-URI and To: the SourceID; ``s=Play``; an
   ``m=audio`` line, ``a=recvonly``; PT 8 PCMA/8000 or PT 96 PS/90000; UDP or TCP with
   ``a=setup``; its ``y=`` SSRC). We answer 200 with our media address, ``a=sendonly``, the
   format we chose from its offer, the TCP role that completes its ``a=setup`` (RFC 4145) and
   its ``y=`` echoed; it ACKs;
4. we send G.711 A-law at real-time pace, 20 ms (160 samples) per RTP packet (C.4 allows 20 to
   180 ms), bare (PT 8, 8 kHz RTP clock) or in PS audio packets (PT 96, 90 kHz clock, Annex C:
   pack header + C0 PES, with a PSM that declares G.711A once a second), over UDP, or TCP
   with RFC 4571 framing (Annex L) where we connect (``tcp-active``: the device offered
   ``setup:passive``) or listen (``tcp-passive``: it offered ``setup:active``);
5. a BYE from either side ends it: ours when the source is exhausted or the API stops it.

The media server of figure 27 is this process: the sender is one small asyncio task per
broadcast, in the server process rather than a media node, because a voice stream is 64 kbit/s
and 50 packets a second (a few hundred run in a fraction of one core), it needs no fan-out, and
keeping it here means the dialog, the media socket and the source (an uploaded file or a
WebSocket) live and die together, with no node protocol to extend.

Sources are G.711 A-law at 8 kHz: an uploaded file in any format FFmpeg reads, decoded and
resampled by PyAV (:func:`decode_audio_file`), or a live push-to-talk WebSocket of 16-bit
little-endian PCM at 8 kHz (:class:`LiveSource`, silence while the talker pauses). The A-law
codec here (:func:`alaw_encode`, :func:`alaw_decode`) is the G.711 table written out, with no
numpy or audioop (gone from Python 3.13), so the server needs neither; the simulator reuses it.

The HTTP API is ``api_broadcast.py``; ``server.py`` routes INVITEs, and the ACKs and BYEs of
our broadcast dialogs, to :meth:`BroadcastManager.handle`.
"""

from __future__ import annotations

import array
import asyncio
import io
import logging
import secrets
import struct
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from media import ps
from media.rtp import RtpPacket, packetize
from media.rtp_tcp import frame_rfc4571
from registry.models import Channel, Device

from . import manscdp
from .queries import DeviceQueries
from .routing import device_target, dialog_target
from .sdp import MediaDescription, SdpError, SessionDescription, SsrcAllocator, build_sdp, parse_sdp, sending_plan
from .sip.dialog import Dialog, DialogError
from .sip.endpoint import SipEndpoint, SipTimeoutError, SipTransportError
from .sip.message import SipRequest, make_response, new_tag, user_of
from .sip.netroute import LocalAddresses
from .sip.transaction import RequestReceived

if TYPE_CHECKING:
    from .audit import AuditLog
    from .config import Config

__all__ = [
    "AudioError", "Broadcast", "BroadcastError", "BroadcastManager", "FileSource", "LiveSource",
    "MediaPlan", "STATES", "alaw_decode", "alaw_encode", "alaw_to_linear", "answer_sdp",
    "decode_audio_file", "linear_to_alaw", "plan_media",
]

log = logging.getLogger("gb28181.broadcast")

#: C.4 a): G.711 A-law, PT 8, 8 kHz, one channel.
SAMPLE_RATE = 8000
PCMA_PT = 8
#: Annex F / C.1: PS over RTP, 90 kHz clock.
PS_PT = 96
#: 20 ms per packet, the shortest C.4 allows: the lowest latency for push-to-talk.
FRAME_SAMPLES = 160
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
#: A-law of 0: what a paused talker sends.
ALAW_SILENCE = 0xD5
STATES = ("notifying", "waiting-invite", "sending", "done", "failed")
#: Finished broadcasts kept for ``GET /api/v1/broadcasts/{id}``.
KEEP_FINISHED = 200
#: Seconds to wait for the ACK of our 200 (RFC 3261 Timer H: 64 x T1).
ACK_TIMEOUT = 32.0
#: Seconds a TCP media connection may take (ours to the device, or the device's to us).
CONNECT_TIMEOUT = 10.0


# -- G.711 A-law (ITU-T G.711 table 1, the segment/quantisation of the 13-bit magnitude) ------

_SEG_END = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def linear_to_alaw(sample: int) -> int:
    """One 16-bit linear sample to its A-law code (even bits inverted, as on the wire)."""
    value = sample >> 3  # A-law codes 13 bits
    if value >= 0:
        mask = 0xD5
    else:
        mask = 0x55
        value = -value - 1
    seg = next((i for i, end in enumerate(_SEG_END) if value <= end), 8)
    if seg >= 8:
        return 0x7F ^ mask
    code = seg << 4
    code |= (value >> (seg if seg >= 2 else 1)) & 0x0F
    return code ^ mask


def alaw_to_linear(code: int) -> int:
    """One A-law code to the 16-bit linear value at the middle of its interval."""
    code ^= 0x55
    value = (code & 0x0F) << 4
    seg = (code & 0x70) >> 4
    if seg == 0:
        value += 8
    else:
        value = (value + 0x108) << (seg - 1)
    return value if code & 0x80 else -value


_ENCODE: bytes | None = None
_DECODE: tuple[bytes, ...] | None = None


def _encode_table() -> bytes:
    global _ENCODE
    if _ENCODE is None:  # indexed by the sample as an unsigned 16-bit value
        _ENCODE = bytes(linear_to_alaw(n - 65536 if n >= 32768 else n) for n in range(65536))
    return _ENCODE


def alaw_encode(pcm: bytes | bytearray | memoryview) -> bytes:
    """16-bit little-endian mono PCM to A-law bytes (one byte per sample)."""
    mv = memoryview(pcm).cast("B")
    samples = array.array("H")
    samples.frombytes(mv[:len(mv) - len(mv) % 2])
    if sys.byteorder == "big":
        samples.byteswap()
    return bytes(map(_encode_table().__getitem__, samples))


def alaw_decode(data: bytes | bytearray | memoryview) -> bytes:
    """A-law bytes to 16-bit little-endian mono PCM."""
    global _DECODE
    if _DECODE is None:
        _DECODE = tuple(struct.pack("<h", alaw_to_linear(n)) for n in range(256))
    return b"".join(map(_DECODE.__getitem__, bytes(data)))


# -- sources ----------------------------------------------------------------------------------

class AudioError(ValueError):
    """An upload that cannot be broadcast; the text says why (for a 400)."""


def decode_audio_file(data: bytes, *, max_seconds: float) -> bytes:
    """Decode any audio FFmpeg reads, resample to 8 kHz mono, and return it as A-law bytes.

    Blocking (run it in a thread). AudioError: empty, not audio, silent of samples, or longer
    than ``max_seconds``."""
    if not data:
        raise AudioError("the upload is empty")
    import av  # PyAV is a server dependency (downloads), loaded only when a file is broadcast
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        raise AudioError(f"not an audio file FFmpeg can read: {exc}") from None
    pcm = bytearray()
    limit = int(max_seconds * SAMPLE_RATE) * 2
    try:
        if not container.streams.audio:
            raise AudioError("the file has no audio stream")
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    pcm += bytes(out.planes[0])[: out.samples * 2]
                if len(pcm) > limit:
                    raise AudioError(f"the audio is longer than broadcast.max_duration "
                                     f"({max_seconds:g} s)")
            for out in resampler.resample(None):
                pcm += bytes(out.planes[0])[: out.samples * 2]
        except av.error.FFmpegError as exc:
            raise AudioError(f"the audio cannot be decoded: {exc}") from None
    finally:
        container.close()
    if len(pcm) > limit:
        raise AudioError(f"the audio is longer than broadcast.max_duration ({max_seconds:g} s)")
    if len(pcm) < 2 * FRAME_SAMPLES:
        raise AudioError("the file holds no audio samples (less than 20 ms)")
    return alaw_encode(pcm)


class FileSource:
    """A whole A-law recording, sent once, 160 samples a frame (the last one padded)."""

    kind = "file"

    def __init__(self, alaw: bytes) -> None:
        self.alaw = alaw
        self.pos = 0

    @property
    def seconds(self) -> float:
        return len(self.alaw) / SAMPLE_RATE

    def next_frame(self) -> bytes | None:
        if self.pos >= len(self.alaw):
            return None
        frame = self.alaw[self.pos:self.pos + FRAME_SAMPLES]
        self.pos += FRAME_SAMPLES
        return frame.ljust(FRAME_SAMPLES, bytes((ALAW_SILENCE,)))

    def close(self) -> None:
        self.pos = len(self.alaw)


class LiveSource:
    """Push-to-talk: 16-bit LE PCM at 8 kHz pushed as it comes (a WebSocket), A-law frames
    taken every 20 ms; silence while the buffer is empty, so the device's stream never stalls.
    At most ``max_seconds`` are held: a talker faster than real time loses the oldest audio
    rather than growing the latency without bound. ``close`` ends it once the buffer is sent."""

    kind = "websocket"

    def __init__(self, max_seconds: float = 2.0) -> None:
        self.buffer = bytearray()
        self.max_bytes = max(FRAME_SAMPLES, int(max_seconds * SAMPLE_RATE))
        self.closed = False
        self.received = 0  # samples pushed
        self.dropped = 0  # samples dropped for the bound
        self._odd = b""

    def push(self, pcm: bytes) -> None:
        if self.closed:
            return
        data = self._odd + pcm
        cut = len(data) - len(data) % 2
        self._odd = data[cut:]
        alaw = alaw_encode(data[:cut])
        self.received += len(alaw)
        self.buffer += alaw
        over = len(self.buffer) - self.max_bytes
        if over > 0:
            del self.buffer[:over]
            self.dropped += over

    def next_frame(self) -> bytes | None:
        if not self.buffer:
            return None if self.closed else bytes((ALAW_SILENCE,)) * FRAME_SAMPLES
        frame = bytes(self.buffer[:FRAME_SAMPLES])
        del self.buffer[:FRAME_SAMPLES]
        return frame.ljust(FRAME_SAMPLES, bytes((ALAW_SILENCE,)))

    def close(self) -> None:
        self.closed = True


Source = FileSource | LiveSource


# -- SDP (Annex F; §9.12.3.2) -------------------------------------------------------------------

@dataclass(slots=True, frozen=True)
class MediaPlan:
    """What the device's audio offer asks of us. ``transport`` is in our terms, as for live
    video: ``tcp-active`` we connect (it offered ``setup:passive``), ``tcp-passive`` we listen."""

    transport: str  # udp | tcp-active | tcp-passive
    payload_type: int  # 8 PCMA | 96 PS
    remote: tuple[str, int]
    ssrc: str | None  # the device's y=, echoed in the answer

    @property
    def format(self) -> str:
        return "PCMA" if self.payload_type == PCMA_PT else "PS"


def plan_media(offer: SessionDescription) -> MediaPlan:
    """Read the device's INVITE offer; SdpError (a 488) when it asks for nothing we send."""
    audio = next((m for m in offer.media if m.media == "audio"), None)
    if audio is None:
        raise SdpError("the offer has no m=audio line (§9.12.1.2: the device asks for audio)")
    if "RTP/AVP" not in audio.proto.upper():
        raise SdpError(f"m=audio uses {audio.proto}, not RTP/AVP or TCP/RTP/AVP")
    if audio.direction in ("sendonly", "inactive"):
        raise SdpError(f"a={audio.direction}: the device would not receive")
    chosen = None
    for pt in audio.formats:  # the offer's order is its preference (RFC 3264 §6.1)
        encoding = audio.rtpmap.get(pt, "PCMA/8000" if pt == PCMA_PT else "").upper()
        if encoding.startswith("PCMA/8000"):
            chosen = pt
            break
        if encoding.startswith("PS/"):
            chosen = pt
            break
    if chosen is None:
        raise SdpError("neither PCMA/8000 nor PS is offered (C.4: G.711 A-law, bare or in PS)")
    transport, remote, ssrc = sending_plan(offer, audio)
    return MediaPlan(transport, chosen, remote, ssrc)


def answer_sdp(plan: MediaPlan, *, origin: str, media_host: str, port: int, ssrc: str) -> bytes:
    """Our 200's SDP (§9.12.3.2, Annex F): we send (``a=sendonly``) the chosen format to the
    device, from ``media_host``:``port``; TCP says our role; the device's ``y=`` is echoed."""
    tcp = plan.transport != "udp"
    rtpmap = {PCMA_PT: "PCMA/8000"} if plan.payload_type == PCMA_PT else {plan.payload_type: "PS/90000"}
    media = MediaDescription(
        media="audio", port=port, proto="TCP/RTP/AVP" if tcp else "RTP/AVP",
        formats=[plan.payload_type], rtpmap=rtpmap, direction="sendonly",
        setup=("active" if plan.transport == "tcp-active" else "passive") if tcp else None,
        connection="new" if tcp else None)
    return build_sdp(SessionDescription(
        origin_user=origin, origin_addr=media_host, session_name="Play", connection_addr=media_host,
        media=[media], ssrc=ssrc, format="v/////a/1/8/1"))  # Annex F: G.711, 64 kbit/s, 8 kHz


# -- RTP (C.1, C.4) ------------------------------------------------------------------------------

def _audio_psm() -> bytes:
    """System header and PSM of an audio-only program (ISO 13818-1 2.5.3.5, 2.5.4.1): one
    stream, C0, stream_type 0x90 G.711A (Annex C). ``PsMuxer`` always declares a video stream,
    which a voice broadcast never has, so the pair is written here; the PES come from it."""
    rate = ps.DEFAULT_MUX_RATE
    body = bytes((0x80 | ((rate >> 15) & 0x7F), (rate >> 7) & 0xFF, ((rate << 1) & 0xFE) | 1,
                  0x04, 0xE0, 0x7F, ps.SID_AUDIO, 0xC0, 0x20))  # audio_bound 1, video_bound 0
    system = b"\x00\x00\x01\xbb" + struct.pack("!H", len(body)) + body
    psm_body = bytes((0xE0, 0xFF)) + struct.pack("!HH", 0, 4) + bytes((0x90, ps.SID_AUDIO, 0, 0))
    head = b"\x00\x00\x01\xbc" + struct.pack("!H", len(psm_body) + 4) + psm_body
    return system + head + ps.crc32_mpeg2(head).to_bytes(4, "big")


class AudioPacketizer:
    """A-law frames to RTP packets: bare PCMA (PT 8, timestamp += 160) or one PS audio packet
    per frame (PT 96, 90 kHz, timestamp = PTS, marker on its last packet, C.1), with the
    system header and PSM in the first packet and once a second (as IRE repeats them)."""

    PSM_EVERY = 50

    def __init__(self, payload_type: int, ssrc: int) -> None:
        self.payload_type = payload_type
        self.ssrc = ssrc & 0xFFFFFFFF
        self.seq = secrets.randbelow(0x10000)
        self.frames = 0
        self.ps = payload_type != PCMA_PT
        self._muxer = ps.PsMuxer("h264", "g711a") if self.ps else None
        self._psm = _audio_psm() if self.ps else b""

    def packets(self, frame: bytes) -> list[bytes]:
        n = self.frames
        self.frames += 1
        if self._muxer is None:
            pkt = RtpPacket(payload_type=PCMA_PT, sequence=self.seq, timestamp=n * FRAME_SAMPLES,
                            ssrc=self.ssrc, marker=n == 0, payload=frame)  # RFC 3551 §4.1
            self.seq = (self.seq + 1) & 0xFFFF
            return [pkt.serialize()]
        pts = n * FRAME_SAMPLES * 90000 // SAMPLE_RATE
        packet = self._muxer.mux_audio(frame, pts)
        if n % self.PSM_EVERY == 0:
            head = 14 + (packet[13] & 0x07)  # the pack header and its stuffing
            packet = packet[:head] + self._psm + packet[head:]
        out, self.seq = packetize(packet, ssrc=self.ssrc, seq=self.seq, timestamp=pts,
                                  payload_type=self.payload_type)
        return out


# -- the broadcast ----------------------------------------------------------------------------

class BroadcastError(RuntimeError):
    """A broadcast cannot start; ``status`` is for HTTP."""

    def __init__(self, text: str, status: int = 409) -> None:
        super().__init__(text)
        self.status = status


class _Ended(Exception):
    """Internal: the broadcast stops here with ``state`` and ``reason``."""

    def __init__(self, state: str, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason


@dataclass(slots=True, eq=False)
class Broadcast:
    """One voice broadcast to one target; see the module docstring for its life."""

    id: str
    channel_id: str
    device_id: str
    source_id: str
    target_id: str
    source: Source
    who: str = ""
    client: str = ""
    state: str = "notifying"
    reason: str = ""
    sn: int = 0
    transport: str = ""
    plan: MediaPlan | None = None
    ssrc: str = ""
    own_ssrc: bool = False
    call_id: str = ""
    dialog: Dialog | None = None
    sip_transport: str = "udp"
    packets_sent: int = 0
    bytes_sent: int = 0
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    ended_at: float = 0.0
    bye_from_device: bool = False
    stop_reason: str = ""
    invite: asyncio.Future | None = field(default=None, repr=False)
    acked: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        return self.state not in ("done", "failed")

    def as_json(self) -> dict[str, Any]:
        plan = self.plan
        out: dict[str, Any] = {
            "id": self.id, "channel_id": self.channel_id, "device_id": self.device_id,
            "source_id": self.source_id, "target_id": self.target_id, "source": self.source.kind,
            "state": self.state, "reason": self.reason, "transport": self.transport or None,
            "format": plan.format if plan else None,
            "payload_type": plan.payload_type if plan else None, "ssrc": self.ssrc or None,
            "remote": f"{plan.remote[0]}:{plan.remote[1]}" if plan and plan.remote[1] else None,
            "packets_sent": self.packets_sent, "bytes_sent": self.bytes_sent,
            "audio_seconds": round(self.packets_sent * FRAME_SECONDS, 2),
            "created_at": self.created_at, "started_at": self.started_at or None,
            "ended_at": self.ended_at or None, "who": self.who}
        if isinstance(self.source, FileSource):
            out["duration"] = round(self.source.seconds, 3)
        return out


class _MediaOut:
    """Where the packets go: a UDP socket, or a TCP connection (RFC 4571 framing, Annex L)."""

    def __init__(self) -> None:
        self.udp: asyncio.DatagramTransport | None = None
        self.remote: tuple[str, int] = ("", 0)
        self.writer: asyncio.StreamWriter | None = None
        self.server: asyncio.Server | None = None
        self.connected: asyncio.Future | None = None
        self.lost = ""
        self._reader_task: asyncio.Task | None = None

    @property
    def port(self) -> int:
        if self.udp is not None:
            return self.udp.get_extra_info("sockname")[1]
        if self.server is not None:
            return self.server.sockets[0].getsockname()[1]
        return 9  # RFC 4145 §4.1: the active side's port is not used; 9 (discard) says so

    async def open(self, plan: MediaPlan, bind_host: str) -> None:
        loop = asyncio.get_running_loop()
        if plan.transport == "udp":
            self.udp, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                              local_addr=(bind_host, 0))
            self.remote = plan.remote
        elif plan.transport == "tcp-passive":
            self.connected = loop.create_future()
            self.server = await asyncio.start_server(self._accepted, bind_host, 0)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connected is None or self.connected.done():
            writer.close()  # one device, one connection (a=connection:new)
            return
        self.connected.set_result(None)
        self._take(reader, writer)

    def _take(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self._reader_task = asyncio.get_running_loop().create_task(self._drain_incoming(reader))

    async def _drain_incoming(self, reader: asyncio.StreamReader) -> None:
        # The device may send RTCP on the connection; nothing here needs it. EOF: it hung up.
        try:
            while await reader.read(4096):
                pass
        except (ConnectionError, OSError):
            pass
        self.lost = "the device closed the media connection"

    async def connect(self, plan: MediaPlan, fallback_host: str) -> None:
        """tcp-active: connect to the offer's address (else the device's signalling address);
        tcp-passive: wait for the device's connection."""
        if plan.transport == "tcp-passive":
            assert self.connected is not None
            try:
                await asyncio.wait_for(self.connected, CONNECT_TIMEOUT)
            except TimeoutError:
                raise _Ended("failed", f"the device did not connect its TCP media within "
                             f"{CONNECT_TIMEOUT:g} s") from None
        elif plan.transport == "tcp-active":
            errors = []
            for host in dict.fromkeys(h for h in (plan.remote[0], fallback_host) if h):
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(host, plan.remote[1]), CONNECT_TIMEOUT)
                except (OSError, TimeoutError) as exc:
                    errors.append(f"{host}:{plan.remote[1]}: {exc or 'timeout'}")
                    continue
                self._take(reader, writer)
                return
            raise _Ended("failed", "cannot connect the TCP media: " + "; ".join(errors))

    async def send(self, packets: list[bytes]) -> int:
        sent = 0
        if self.udp is not None:
            for pkt in packets:
                self.udp.sendto(pkt, self.remote)
                sent += len(pkt)
            return sent
        if self.writer is None or self.lost:
            raise _Ended("failed", self.lost or "no media connection")
        data = b"".join(frame_rfc4571(p) for p in packets)
        self.writer.write(data)
        await self.writer.drain()
        return len(data)

    async def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.writer is not None:
            self.writer.close()
        if self.server is not None:
            self.server.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self.connected is not None and not self.connected.done():
            self.connected.cancel()


class BroadcastManager:
    """Every broadcast of this platform: start, follow, stop; the SIP side of §9.12.1."""

    def __init__(self, *, config: Config, endpoint: SipEndpoint, queries: DeviceQueries,
                 media_addresses: LocalAddresses, ssrcs: SsrcAllocator,
                 audit: AuditLog | None = None) -> None:
        self.config = config
        self.endpoint = endpoint
        self.queries = queries
        self.media_addresses = media_addresses
        self.ssrcs = ssrcs
        self.audit = audit
        self.broadcasts: OrderedDict[str, Broadcast] = OrderedDict()
        self._by_call: dict[str, Broadcast] = {}
        self.registry: Any = None  # DeviceRegistry, for in-dialog routing (set by the server)
        self.started = 0
        self.failed = 0

    # -- starting -----------------------------------------------------------------------------
    def start(self, channel: Channel, device: Device, source: Source, *, who: str = "",
              client: str = "") -> Broadcast:
        """Begin a broadcast of ``source`` to ``channel`` (its TargetID); returns at once, the
        rest happens in a task. BroadcastError when the device is offline or the target busy."""
        if not device.online or not device.host:
            raise BroadcastError(f"device {device.device_id} is offline", 409)
        busy = next((b for b in self.broadcasts.values()
                     if b.active and b.target_id == channel.channel_id), None)
        if busy is not None:
            raise BroadcastError(f"{channel.channel_id} is already receiving broadcast {busy.id}", 409)
        b = Broadcast(id=secrets.token_hex(8), channel_id=channel.channel_id,
                      device_id=device.device_id, source_id=self.config.server.id,
                      target_id=channel.channel_id, source=source, who=who, client=client)
        b.invite = asyncio.get_running_loop().create_future()
        self.broadcasts[b.id] = b
        self.started += 1
        b.task = asyncio.get_running_loop().create_task(self._run(b, device))
        return b

    def get(self, broadcast_id: str) -> Broadcast | None:
        return self.broadcasts.get(broadcast_id)

    async def stop(self, b: Broadcast, reason: str = "stopped through the API") -> None:
        """End ``b`` (BYE if its dialog is up) and wait until it has."""
        if not b.active:
            return
        b.stop_reason = reason
        b.source.close()
        if b.state != "sending" and b.task is not None:
            b.task.cancel()  # nothing on the wire yet: no need to wait for a pacing tick
        if b.task is not None:
            await asyncio.gather(b.task, return_exceptions=True)

    async def stop_all(self) -> None:
        await asyncio.gather(*(self.stop(b, "the server is stopping")
                               for b in list(self.broadcasts.values())), return_exceptions=True)

    # -- the flow ----------------------------------------------------------------------------------
    async def _run(self, b: Broadcast, device: Device) -> None:
        media = _MediaOut()
        try:
            await self._notify(b, device)
            b.state = "waiting-invite"
            assert b.invite is not None
            timeout = self.config.broadcast.invite_timeout
            try:
                ev = await asyncio.wait_for(asyncio.shield(b.invite), timeout)
            except TimeoutError:
                raise _Ended("failed", f"{device.device_id} accepted the broadcast but sent no "
                             f"INVITE within {timeout:g} s") from None
            await self._answer(b, device, ev, media)
            try:
                await asyncio.wait_for(b.acked.wait(), ACK_TIMEOUT)
            except TimeoutError:
                raise _Ended("failed", f"no ACK for our 200 within {ACK_TIMEOUT:g} s") from None
            assert b.plan is not None
            await media.connect(b.plan, device.host)
            b.state = "sending"
            b.started_at = time.time()
            log.info("broadcast %s to %s: sending %s over %s", b.id, b.target_id, b.plan.format,
                     b.transport)
            await self._send(b, media)
            raise _Ended("done", b.stop_reason or "the source is finished")
        except _Ended as end:
            self._finish(b, end.state, end.reason)
        except asyncio.CancelledError:
            self._finish(b, "done" if b.stop_reason and b.stop_reason != "the server is stopping"
                         else "failed", b.stop_reason or "cancelled")
        except Exception as exc:  # a bug must end the broadcast, not leave it "sending"
            log.exception("broadcast %s", b.id)
            self._finish(b, "failed", f"internal error: {exc}")
        finally:
            await media.close()
            self._unanswered(b)
            if b.dialog is not None and not b.bye_from_device:
                await self._bye(b)
            self._by_call.pop(b.call_id, None)
            if b.own_ssrc:
                self.ssrcs.release(b.ssrc)
            self._forget_old()

    async def _notify(self, b: Broadcast, device: Device) -> None:
        """A.2.5 d) Notify Broadcast, then the Response of A.2.6 l) (same SN)."""
        queries = self.queries
        b.sn = queries.next_sn()
        # manscdp.build always writes a <DeviceID>; A.2.5 d) has none (SourceID and TargetID
        # name the two ends), and strict devices refuse unknown elements, so it is taken out.
        body = manscdp.build("Notify", "Broadcast", b.sn, b.target_id,
                             [("SourceID", b.source_id), ("TargetID", b.target_id)],
                             encoding=queries.charset(device))
        body = body.replace(f"<DeviceID>{b.target_id}</DeviceID>\r\n".encode(), b"", 1)
        answer: asyncio.Future = asyncio.get_running_loop().create_future()

        def sink(msg: Any) -> None:
            if not answer.done():
                answer.set_result(msg)

        timeout = self.config.broadcast.response_timeout
        dest = device_target(device)
        with queries.parts(device.device_id, "Broadcast", b.sn, sink):
            try:
                resp = await self.endpoint.request(queries.message_to(device, body), dest.addr,
                                                   dest.transport, timeout=timeout,
                                                   fallback=dest.fallback)
            except (SipTimeoutError, SipTransportError) as exc:
                raise _Ended("failed", f"the Broadcast notify was not delivered: {exc}") from None
            if resp.status >= 300:
                raise _Ended("failed", f"{device.device_id} refused the Broadcast notify: "
                             f"{resp.status} {resp.reason}")
            try:
                msg = await asyncio.wait_for(answer, timeout)
            except TimeoutError:
                raise _Ended("failed", f"{device.device_id} accepted the Broadcast notify but sent "
                             f"no Response within {timeout:g} s") from None
        result = (msg.text("Result") or "missing").upper()
        if result != "OK":
            reason = msg.text("Reason") or msg.text("Info")
            raise _Ended("failed", f"{device.device_id} answered the Broadcast notify with Result "
                         f"{result}" + (f": {reason}" if reason else ""))

    async def _answer(self, b: Broadcast, device: Device, ev: RequestReceived,
                      media: _MediaOut) -> None:
        """Answer the device's INVITE: 488 for an offer we cannot serve, else 200 + SDP."""
        req = ev.request
        txn = ev.transaction
        assert txn is not None
        local_tag = new_tag()

        def refuse(status: int, text: str) -> _Ended:
            self._respond(ev, make_response(req, status, text[:120], to_tag=local_tag))
            return _Ended("failed", f"the device's audio INVITE was refused ({status}): {text}")

        try:
            if not req.body.strip():
                raise SdpError("the INVITE carries no SDP offer")
            plan = plan_media(parse_sdp(req.body))
        except SdpError as exc:
            raise refuse(488, f"Not Acceptable Here: {exc}") from None
        b.plan = plan
        b.transport = plan.transport
        try:
            await media.open(plan, self.config.media.host)
        except OSError as exc:
            raise refuse(500, f"Server Internal Error: no media socket: {exc}") from None
        # Annex F: the receiver (the device here) chooses y=; only without one do we.
        b.ssrc = plan.ssrc or self.ssrcs.allocate()
        b.own_ssrc = plan.ssrc is None
        media_host = self.media_addresses.for_peer(ev.addr[0])
        body = answer_sdp(plan, origin=self.config.server.id, media_host=media_host,
                          port=media.port, ssrc=b.ssrc)
        try:
            b.dialog = Dialog.from_request(req, local_tag)
        except DialogError as exc:
            raise refuse(400, f"Bad Request: {exc}") from None
        b.sip_transport = ev.transport
        resp = make_response(req, 200, "OK", to_tag=local_tag, body=body,
                             content_type="APPLICATION/SDP")
        resp.set("Contact", f"<{self.endpoint.contact(self.config.server.id, ev.transport, peer=ev.addr[0])}>")
        if not self._respond(ev, resp):
            b.dialog = None
            raise _Ended("failed", "the device cancelled its INVITE")

    def _unanswered(self, b: Broadcast) -> None:
        """An INVITE that came while the broadcast was failing or being stopped gets a 480."""
        invite = b.invite
        if invite is None or not invite.done() or invite.cancelled() or b.dialog is not None:
            return
        ev = invite.result()
        if ev.transaction is not None and not ev.transaction.answered:
            self._respond(ev, make_response(ev.request, 480, f"Temporarily Unavailable: {b.reason}"[:120],
                                            to_tag=new_tag()))

    def _respond(self, ev: RequestReceived, resp: Any) -> bool:
        assert ev.transaction is not None
        try:
            self.endpoint.respond(ev.transaction, resp)
        except ValueError:
            return False  # a CANCEL already had the INVITE answered 487
        return True

    async def _send(self, b: Broadcast, media: _MediaOut) -> None:
        """Pace the source in real time: packet n leaves at start + n x 20 ms, so a late tick
        (a busy loop) is caught up rather than stretching the audio."""
        assert b.plan is not None
        packetizer = AudioPacketizer(b.plan.payload_type, int(b.ssrc))
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while not b.bye_from_device:
            if b.stop_reason:
                return
            frame = b.source.next_frame()
            if frame is None:
                return
            b.bytes_sent += await media.send(packetizer.packets(frame))
            b.packets_sent += 1
            n += 1
            delay = start + n * FRAME_SECONDS - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if media.lost:
                raise _Ended("failed", media.lost)
        raise _Ended("done", "the device sent BYE")

    def _finish(self, b: Broadcast, state: str, reason: str) -> None:
        if not b.active:
            return
        b.state = state
        b.reason = reason
        b.ended_at = time.time()
        b.source.close()
        if b.invite is not None and not b.invite.done():
            b.invite.cancel()
        if state == "failed":
            self.failed += 1
        log.info("broadcast %s to %s %s: %s (%d packets)", b.id, b.target_id, state, reason,
                 b.packets_sent)
        if self.audit is not None:
            self.audit.record("broadcast", who=b.who, source=b.client, target=b.target_id,
                              result=state, reason=reason, broadcast_id=b.id, device_id=b.device_id,
                              input=b.source.kind, transport=b.transport or None,
                              format=b.plan.format if b.plan else None, packets=b.packets_sent)

    async def _bye(self, b: Broadcast) -> None:
        dialog = b.dialog
        assert dialog is not None
        device = self.registry.get(b.device_id) if self.registry is not None else None
        target = dialog_target(self.endpoint, device, dialog, b.sip_transport)
        bye = dialog.request("BYE", via=self.endpoint.via(target.transport, peer=target.addr[0]),
                             user_agent="gb28181")
        try:
            await self.endpoint.request(bye, target.addr, target.transport, timeout=5.0,
                                        fallback=target.fallback)
        except (SipTimeoutError, SipTransportError) as exc:
            log.info("BYE of broadcast %s: %s", b.id, exc)

    def _forget_old(self) -> None:
        finished = [k for k, b in self.broadcasts.items() if not b.active]
        for key in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self.broadcasts[key]

    # -- SIP from devices ------------------------------------------------------------------------
    def owns(self, call_id: str) -> bool:
        """Whether an in-dialog request with this Call-ID belongs to a broadcast."""
        return call_id in self._by_call

    def handle(self, ev: RequestReceived) -> None:
        """An INVITE (a device asking for the audio of a broadcast we notified), or an ACK or
        BYE in one of our broadcast dialogs."""
        req = ev.request
        if req.method == "INVITE":
            self._on_invite(ev)
            return
        b = self._by_call.get(req.call_id)
        if req.method == "ACK":
            if b is not None and b.dialog is not None and b.dialog.matches(req):
                b.acked.set()
            return
        if ev.transaction is None:
            return
        if b is None or b.dialog is None or not b.dialog.matches(req):
            self.endpoint.respond(ev.transaction, make_response(req, 481, "Call Does Not Exist",
                                                                to_tag=new_tag()))
            return
        refused = b.dialog.receive_request(req)
        if req.method == "BYE" and refused is None:
            self.endpoint.respond(ev.transaction, make_response(req, 200))
            b.bye_from_device = True
            b.acked.set()  # a BYE instead of an ACK ends the wait too
            if b.state != "sending" and b.task is not None:
                b.stop_reason = "the device sent BYE"
                b.task.cancel()
            return
        self.endpoint.respond(ev.transaction, make_response(req, refused or 405))

    def _on_invite(self, ev: RequestReceived) -> None:
        req = ev.request
        txn = ev.transaction
        assert txn is not None
        if req.to_tag:  # a re-INVITE: no session refresh for voice; the dialog stays as it is
            self.endpoint.respond(txn, make_response(req, 488 if self.owns(req.call_id) else 481))
            return
        b = self._waiting_for(req, ev.addr[0])
        if b is None:
            self.endpoint.respond(txn, make_response(
                req, 404, "Not Found: no voice broadcast waits for this INVITE", to_tag=new_tag()))
            return
        assert b.invite is not None
        b.call_id = req.call_id
        self._by_call[req.call_id] = b
        b.invite.set_result(ev)

    def _waiting_for(self, req: SipRequest, host: str) -> Broadcast | None:
        """The broadcast an INVITE is for (§9.12.1.2 step 5): To is our SourceID; From names the
        target or its device, else the INVITE comes from the device's address."""
        try:
            to_user = user_of(req.headers["to"][0]) or user_of(req.uri)
            from_user = user_of(req.headers["from"][0])
        except (KeyError, IndexError):
            return None
        # "notifying" too: a device's INVITE may overtake the task that saw its Response OK.
        waiting = [b for b in self.broadcasts.values()
                   if b.state in ("notifying", "waiting-invite") and b.invite is not None
                   and not b.invite.done()
                   and to_user in (b.source_id, user_of(req.uri))]
        for test in (lambda b: from_user == b.target_id, lambda b: from_user == b.device_id,
                     lambda b: self._device_host(b) == host):
            match = next((b for b in waiting if test(b)), None)
            if match is not None:
                return match
        return None

    def _device_host(self, b: Broadcast) -> str | None:
        device = self.registry.get(b.device_id) if self.registry is not None else None
        return device.host if device is not None else None

    def metrics(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        active = GaugeMetricFamily("gb28181_broadcasts_active", "Voice broadcasts not yet ended")
        active.add_metric([], sum(1 for b in self.broadcasts.values() if b.active))
        yield active
        started = CounterMetricFamily("gb28181_broadcasts", "Voice broadcasts started")
        started.add_metric([], self.started)
        yield started
        failed = CounterMetricFamily("gb28181_broadcasts_failed", "Voice broadcasts that failed")
        failed.add_metric([], self.failed)
        yield failed
