"""WebRTC out (WHEP): each viewer is one aiortc peer connection fed by one hub consumer.

A media node answers a viewer's SDP offer (``MediaNode`` command ``whep``) with an
``RTCPeerConnection`` whose tracks hand aiortc the stream's access units as they came from the
camera: ``av.Packet`` objects, which aiortc's H.264 and G.711 encoders pass through with
``pack()`` (RTP packetization only: no decode, no re-encode). The consumer starts at the hub's
cached GOP keyframe like every other output (``hub.Stream``), so a viewer sees a picture at once,
and a viewer that falls behind is skipped to a keyframe by the hub. The neighbours: ``node.py``
(the commands), ``hub.py`` (the packets), ``gb28181/api_webrtc.py`` (the WHEP HTTP resource).

What is negotiated, and why the offer is narrowed before aiortc sees it: aiortc sends with the
first codec both sides share and only knows H.264 constrained baseline, so ``plan_offer`` keeps
one H.264 payload type of the offer (packetization-mode 1, RFC 6184 §6.3; the profile closest to
the stream's SPS), tells aiortc it is constrained baseline, and ``finish_answer`` writes the
offer's own profile-level-id back into the answer (RFC 6184 §8.2.2: the answer keeps the
offered profile). Audio is kept only when the stream carries G.711 and the offer has the same
law (PCMA/PCMU, RFC 3551); H.265 streams are refused (aiortc has no H.265 packetizer).

ICE: host candidates only, one per peer connection (BUNDLE and rtcp-mux), on the address the
server names (the node's advertised media address), bound to a port of the configured UDP
range. aioice gathers on every interface with an ephemeral port and has no setting for either,
so ``PortRange.install`` replaces the gathering step of the one ``aioice.Connection`` of each
transport; nothing else of aioice changes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av
from aioice import Candidate
from aioice.candidate import candidate_foundation, candidate_priority
from aioice.ice import StunProtocol
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import H264Profile, parse_h264_profile_level_id

from .hub import Consumer, Stream, StreamClosed
from .nal import H264_NAL_SPS, find_nal
from .packet import MediaPacket
from .ps import PsFrame

__all__ = ["OfferPlan", "OfferRefused", "PortRange", "WebrtcOut", "WhepSession", "finish_answer",
           "plan_offer"]

log = logging.getLogger("media.webrtc")

_TIME_BASE = Fraction(1, 90000)  # PS timestamps (ISO 13818-1 2.4.3.7); aiortc rescales to RTP
# What aiortc's H.264 encoder is told the kept payload type is (its only profiles are baseline).
_AIORTC_PROFILE = "42e01f"
# Profiles in the order a decoder of the later one also decodes the earlier (roughly: Baseline's
# FMO/ASO are not in Main, but cameras do not use them).
_PROFILE_RANK = {H264Profile.PROFILE_CONSTRAINED_BASELINE: 0, H264Profile.PROFILE_BASELINE: 1,
                 H264Profile.PROFILE_MAIN: 2, H264Profile.PROFILE_CONSTRAINED_HIGH: 3,
                 H264Profile.PROFILE_HIGH: 4, H264Profile.PROFILE_PREDICTIVE_HIGH_444: 5}
_G711 = {"g711a": ("PCMA", 8), "g711u": ("PCMU", 0)}  # RFC 3551 table 4: static payload types
_AUDIO_QUEUE = 50  # G.711 frames (20-40 ms each) held for an audio track that reads slowly
_RTPMAP = re.compile(r"a=rtpmap:(\d+) ([^/\s]+)/(\d+)")
_PT_ATTR = re.compile(r"a=(?:rtpmap|fmtp|rtcp-fb):(\d+)[ \t]")


class OfferRefused(ValueError):
    """The offer cannot be answered; ``status`` is the HTTP status the WHEP resource gives."""

    def __init__(self, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.status = status


# -- the offer and the answer (pure text functions) --------------------------------------------

def _sections(sdp: str) -> list[list[str]]:
    """The session part, then one list of lines per m= section."""
    out: list[list[str]] = [[]]
    for line in sdp.replace("\r\n", "\n").split("\n"):
        if not line:
            continue
        if line.startswith("m="):
            out.append([])
        out[-1].append(line)
    return out


def _join(sections: list[list[str]]) -> str:
    return "\r\n".join(line for sec in sections for line in sec) + "\r\n"


def _fmtp(section: list[str], pt: int) -> dict[str, str]:
    prefix = f"a=fmtp:{pt} "
    for line in section:
        if line.startswith(prefix):
            return dict(p.strip().split("=", 1) for p in line[len(prefix):].split(";") if "=" in p)
    return {}


def _rtpmaps(section: list[str]) -> dict[int, str]:
    """Payload type → encoding name (upper case) of a media section, static ones included."""
    fmt = section[0].split()[3:]
    names = {pt: name for name, pt in _G711.values() if str(pt) in fmt}
    for line in section:
        if m := _RTPMAP.match(line):
            names[int(m.group(1))] = m.group(2).upper()
    return names


def _narrow(section: list[str], keep: list[int]) -> list[str]:
    """The section with only the payload types ``keep`` on its m= line and in its attributes."""
    parts = section[0].split()
    head = [" ".join(parts[:3] + [str(pt) for pt in keep])]
    wanted = {str(pt) for pt in keep}
    return head + [line for line in section[1:]
                   if not ((m := _PT_ATTR.match(line)) and m.group(1) not in wanted)]


def _with_param(section: list[str], pt: int, name: str, value: str) -> list[str]:
    """The section with fmtp parameter ``name`` of ``pt`` set to ``value``."""
    prefix = f"a=fmtp:{pt} "
    out, done = [], False
    for line in section:
        if line.startswith(prefix):
            params = [p for p in line[len(prefix):].split(";") if p.strip() and
                      p.strip().split("=", 1)[0] != name]
            line = prefix + ";".join([*params, f"{name}={value}"])
            done = True
        out.append(line)
    if not done:
        out.append(f"{prefix}{name}={value}")
    return out


@dataclass(slots=True, frozen=True)
class OfferPlan:
    """What ``plan_offer`` chose; ``offer`` is the narrowed offer to give aiortc."""

    offer: str
    video_pt: int
    profile_level_id: str       # the offer's, for the answer
    audio_pt: int | None        # None: no audio is sent
    audio: str | None           # "PCMA" / "PCMU"
    exact_profile: bool         # the offer has the stream's own H.264 profile


def sps_profile_level_id(access_unit: bytes) -> str | None:
    """profile_idc, the constraint flags and level_idc of the AU's SPS (H.264 7.3.2.1.1), as the
    six hex digits of an SDP profile-level-id (RFC 6184 §8.1); None without an SPS."""
    nal = find_nal(access_unit, "h264", H264_NAL_SPS)
    return nal[1:4].hex() if nal is not None and len(nal) >= 4 else None


def plan_offer(offer: str, video_codec: str | None, stream_profile: str | None = None,
               audio_codec: str | None = None) -> OfferPlan:
    """Choose what to send for a viewer's ``offer`` (see the module docstring).

    ``video_codec``/``audio_codec`` are the stream's (``hub.StreamStats``), ``stream_profile``
    the profile-level-id of its SPS. Raises OfferRefused (400: not SDP or no video; 406: no
    codec in common).
    """
    if not isinstance(offer, str) or not offer.lstrip().startswith("v=0"):
        raise OfferRefused("the body is not an SDP offer (RFC 8866: it starts with v=0)")
    sections = _sections(offer)
    media = [i for i, sec in enumerate(sections[1:], 1) if len(sec[0].split()) >= 4]
    videos = [i for i in media if sections[i][0].startswith("m=video ")]
    if not videos:
        raise OfferRefused("the SDP offer has no video (m=video) section")
    if video_codec == "h265":
        raise OfferRefused("the channel sends H.265, which this server's WebRTC output cannot carry "
                           "(H.264 only); play it over HTTP-FLV or WS-FLV", 406)
    if video_codec not in (None, "h264"):
        raise OfferRefused(f"the channel sends {video_codec} video; WebRTC carries H.264 only", 406)
    vi = videos[0]
    video = sections[vi]
    names = _rtpmaps(video)
    h264 = [pt for pt, name in names.items() if name == "H264"]
    if not h264:
        raise OfferRefused("the offer has no H.264 (a=rtpmap:<pt> H264/90000): the channel's "
                           "video is H.264 and is sent as it is, not re-encoded", 406)
    usable: list[tuple[int, str, H264Profile]] = []
    for pt in h264:
        params = _fmtp(video, pt)
        if params.get("packetization-mode", "0") != "1":
            continue
        plid = params.get("profile-level-id", "42e01f").lower()
        try:
            usable.append((pt, plid, parse_h264_profile_level_id(plid)[0]))
        except ValueError:
            continue
    if not usable:
        raise OfferRefused("the offer's H.264 lacks packetization-mode=1 (RFC 6184 §6.3: FU-A "
                           "fragments, needed for frames larger than a packet)", 406)
    wanted = None
    if stream_profile:
        try:
            wanted = parse_h264_profile_level_id(stream_profile)[0]
        except ValueError:
            wanted = None
    choice, exact = usable[0], False
    if wanted is not None:
        same = [u for u in usable if u[2] == wanted]
        above = sorted((u for u in usable if _PROFILE_RANK[u[2]] > _PROFILE_RANK[wanted]),
                       key=lambda u: _PROFILE_RANK[u[2]])
        if same:
            choice, exact = same[0], True
        elif above:
            choice = above[0]
    pt, plid, _profile = choice
    rtx = [p for p, name in names.items() if name == "RTX" and _fmtp(video, p).get("apt") == str(pt)]
    video = _narrow(video, [pt, *rtx])
    sections[vi] = _with_param(video, pt, "profile-level-id", _AIORTC_PROFILE)

    audio_pt, audio = None, None
    audios = [i for i in media if sections[i][0].startswith("m=audio ")]
    if audio_codec in _G711 and audios:
        name = _G711[audio_codec][0]
        ai = audios[0]
        pts = [p for p, n in _rtpmaps(sections[ai]).items() if n == name]
        if pts:
            audio_pt, audio = pts[0], name
            sections[ai] = _narrow(sections[ai], [audio_pt])
    return OfferPlan(_join(sections), pt, plid, audio_pt, audio, exact)


def finish_answer(answer: str, plan: OfferPlan) -> str:
    """aiortc's answer with the offer's profile-level-id on the video payload type."""
    sections = _sections(answer)
    for i, sec in enumerate(sections[1:], 1):
        if sec[0].startswith("m=video ") and _fmtp(sec, plan.video_pt):
            sections[i] = _with_param(sec, plan.video_pt, "profile-level-id", plan.profile_level_id)
    return _join(sections)


# -- ICE ports -------------------------------------------------------------------------------------

class PortRange:
    """Binds the UDP sockets of WebRTC sessions: ``host`` and a port of [``low``, ``high``]
    (both 0: any free port); each bind starts after the port last taken."""

    def __init__(self, host: str, low: int = 0, high: int = 0) -> None:
        if not (low == high == 0 or 1 <= low <= high <= 65535):
            raise ValueError(f"need 1 <= low <= high <= 65535 (or both 0), not [{low}, {high}]")
        self.host = host
        self.low, self.high = low, high
        self._next = low

    async def bind(self, factory: Callable[[], StunProtocol]) -> StunProtocol:
        loop = asyncio.get_running_loop()
        if self.low == 0:
            ports = [0]
        else:
            span = self.high - self.low + 1
            start = self._next - self.low
            ports = [self.low + (start + i) % span for i in range(span)]
        last: OSError | None = None
        for port in ports:
            try:
                transport, protocol = await loop.create_datagram_endpoint(factory, local_addr=(self.host, port))
            except OSError as exc:
                last = exc
                continue
            if port:
                self._next = port + 1 if port < self.high else self.low
            sock = transport.get_extra_info("socket")
            if sock is not None:  # as aioice does: a keyframe burst must not overflow the buffer
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            return protocol
        raise OSError(f"no free UDP port for WebRTC in [{self.low}, {self.high}] on {self.host}: {last}; "
                      "widen media.webrtc.port_min/port_max")

    def install(self, pc: RTCPeerConnection, advertised: str) -> None:
        """Make the ICE gathering of ``pc``'s transports bind here and advertise ``advertised``.

        Call between setRemoteDescription (the transports exist) and setLocalDescription (it
        gathers).
        """
        for transceiver in pc.getTransceivers():
            dtls = transceiver.sender.transport
            if dtls is None:
                continue
            # aiortc keeps the aioice Connection on the gatherer; its gathering step is the one
            # thing replaced (an instance attribute shadows the method).
            connection = dtls.transport.iceGatherer._connection
            if getattr(connection, "_gb_ports", None) is self:
                continue

            async def gather(component: int, addresses: list[str], timeout: int = 5,
                             connection: Any = connection) -> list[Candidate]:
                protocol = await self.bind(lambda: StunProtocol(connection))
                port = protocol.transport.get_extra_info("sockname")[1]
                protocol.local_candidate = Candidate(
                    foundation=candidate_foundation("host", "udp", advertised), component=component,
                    transport="udp", priority=candidate_priority(component, "host"),
                    host=advertised, port=port, type="host")
                connection._protocols.append(protocol)
                return [protocol.local_candidate]

            connection.get_component_candidates = gather  # type: ignore[method-assign]
            connection._gb_ports = self  # type: ignore[attr-defined]


# -- tracks and sessions ---------------------------------------------------------------------------

def _av_packet(frame: PsFrame, timestamp: int) -> av.Packet:
    """The frame as aiortc's encoders take it: its bytes, stamped on the PS clock."""
    out = av.Packet(frame.data)
    out.pts = frame.pts if frame.pts is not None else timestamp
    out.time_base = _TIME_BASE
    return out


class _AudioTrack(MediaStreamTrack):
    """G.711 frames the video track found in the stream's packets."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.queue: deque[av.Packet] = deque(maxlen=_AUDIO_QUEUE)
        self.ready = asyncio.Event()

    def push(self, packet: av.Packet) -> None:
        self.queue.append(packet)
        self.ready.set()

    async def recv(self) -> av.Packet:
        while not self.queue:
            if self.readyState != "live":
                raise MediaStreamError
            self.ready.clear()
            await self.ready.wait()
        return self.queue.popleft()

    def stop(self) -> None:
        super().stop()
        self.ready.set()


class _VideoTrack(MediaStreamTrack):
    """The stream's H.264 access units from one hub consumer, as ``av.Packet``s; the G.711
    frames of the same packets go to ``audio``."""

    kind = "video"

    def __init__(self, consumer: Consumer, first: MediaPacket | None, audio: _AudioTrack | None,
                 on_end: Callable[[str], None]) -> None:
        super().__init__()
        self.consumer = consumer
        self.audio = audio
        self.on_end = on_end
        self.pending: deque[av.Packet] = deque()
        self.frames_sent = 0
        if first is not None:
            self._take(first)

    def _take(self, packet: MediaPacket) -> None:
        for frame in packet.frames:
            if frame.stream == "video":
                if frame.codec == "h264":
                    self.pending.append(_av_packet(frame, packet.timestamp))
            elif self.audio is not None and frame.codec in _G711:
                self.audio.push(_av_packet(frame, packet.timestamp))

    async def recv(self) -> av.Packet:
        while not self.pending:
            if self.readyState != "live":
                raise MediaStreamError
            try:
                packet = await self.consumer.get()
            except StreamClosed as exc:
                self.on_end(f"stream ended: {exc}")
                raise MediaStreamError from None
            self._take(packet)
        self.frames_sent += 1
        return self.pending.popleft()


class WhepSession:
    """One viewer: its peer connection, its hub consumer and its tracks."""

    def __init__(self, sid: str, stream: Stream, pc: RTCPeerConnection, consumer: Consumer,
                 on_closed: Callable[[WhepSession], None]) -> None:
        self.id = sid
        self.stream = stream
        self.pc = pc
        self.consumer = consumer
        self.on_closed = on_closed
        self.video: _VideoTrack | None = None
        self.audio: _AudioTrack | None = None
        self.closed = False
        self.close_reason = ""
        self._tasks: set[asyncio.Task] = set()

    def close_soon(self, reason: str) -> None:
        if not self.closed:
            task = asyncio.get_running_loop().create_task(self.close(reason))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.consumer.close()
        for track in (self.video, self.audio):
            if track is not None:
                track.stop()
        self.on_closed(self)
        try:
            await self.pc.close()
        except Exception:  # aiortc may fail closing a transport that never started
            log.debug("closing WebRTC session %s", self.id, exc_info=True)
        log.info("WebRTC session %s of %s closed: %s", self.id, self.stream.key, reason)

    def as_dict(self) -> dict:
        return {"session": self.id, "stream": self.stream.key, "state": self.pc.connectionState,
                "frames_sent": self.video.frames_sent if self.video else 0,
                "dropped": self.consumer.dropped}


class WebrtcOut:
    """The WebRTC sessions of one media node."""

    def __init__(self, bind_host: str, *, keyframe_timeout: float = 5.0,
                 connect_timeout: float = 20.0) -> None:
        self.bind_host = bind_host
        self.keyframe_timeout = keyframe_timeout
        self.connect_timeout = connect_timeout
        self.sessions: dict[str, WhepSession] = {}
        self._ranges: dict[tuple[int, int], PortRange] = {}

    def _ports(self, low: int, high: int) -> PortRange:
        ports = self._ranges.get((low, high))
        if ports is None:
            ports = self._ranges[(low, high)] = PortRange(self.bind_host, low, high)
        return ports

    async def open(self, stream: Stream, offer: str, advertised: str,
                   port_range: tuple[int, int] = (0, 0)) -> tuple[WhepSession, str]:
        """A session for ``offer`` on ``stream``: (session, SDP answer). OfferRefused when the
        offer cannot be answered, OSError when no port is free, TimeoutError without video."""
        plan_offer(offer, None)  # refuse a malformed offer before waiting for the stream
        if not await stream.wait_for_keyframe(self.keyframe_timeout):
            if stream.closed:
                raise StreamClosed(stream.close_reason or "stream closed")
            raise TimeoutError(f"no keyframe from {stream.key} within {self.keyframe_timeout:g} s")
        consumer = stream.subscribe("webrtc")
        try:
            first = consumer.get_nowait()  # the cached GOP's keyframe: its SPS tells the profile
            profile = None
            if first is not None:
                profile = next((sps_profile_level_id(f.data) for f in first.frames
                                if f.stream == "video" and f.codec == "h264"), None)
            plan = plan_offer(offer, stream.stats.video_codec, profile, stream.stats.audio_codec)
            if not plan.exact_profile:
                log.info("WebRTC viewer of %s: offer lacks profile %s; sending it as %s",
                         stream.key, profile, plan.profile_level_id)
            pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))  # host candidates only
            sid = secrets.token_hex(6)
            session = WhepSession(sid, stream, pc, consumer, self._forget)
            try:
                answer = await self._negotiate(session, plan, first, advertised, port_range)
            except BaseException:
                await session.close("negotiation failed")
                raise
        except BaseException:
            consumer.close()
            raise
        self.sessions[sid] = session
        timer = asyncio.get_running_loop().call_later(
            self.connect_timeout, lambda: session.close_soon("ICE/DTLS did not connect in time")
            if session.pc.connectionState != "connected" else None)

        @pc.on("connectionstatechange")
        def state() -> None:
            if pc.connectionState == "connected":
                timer.cancel()
            elif pc.connectionState in ("failed", "closed"):
                timer.cancel()
                session.close_soon(f"peer connection {pc.connectionState}")

        return session, answer

    async def _negotiate(self, session: WhepSession, plan: OfferPlan, first: MediaPacket | None,
                         advertised: str, port_range: tuple[int, int]) -> str:
        pc = session.pc
        await pc.setRemoteDescription(RTCSessionDescription(sdp=plan.offer, type="offer"))
        if plan.audio is not None:
            session.audio = _AudioTrack()
            pc.addTrack(session.audio)
        session.video = _VideoTrack(session.consumer, first, session.audio, session.close_soon)
        pc.addTrack(session.video)
        self._ports(*port_range).install(pc, advertised)
        await pc.setLocalDescription(await pc.createAnswer())
        return finish_answer(pc.localDescription.sdp, plan)

    def _forget(self, session: WhepSession) -> None:
        self.sessions.pop(session.id, None)

    async def close(self, sid: str, reason: str) -> bool:
        session = self.sessions.get(sid)
        if session is None:
            return False
        await session.close(reason)
        return True

    async def close_stream(self, key: str, reason: str) -> None:
        await asyncio.gather(*(s.close(reason) for s in list(self.sessions.values()) if s.stream.key == key))

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(s.close(reason) for s in list(self.sessions.values())))
