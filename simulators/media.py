"""Live video from simulated devices: one shared H.264/H.265 clip, PS over RTP at real-time pace.

A camera answering a live INVITE (§9.2, Annex F) sends one PS packet per frame (C.1) over RTP
(PT 96, 90 kHz, marker on the last packet of a frame), by UDP or by TCP with the RFC 4571
length (Annex L). This module is the media half of that; ``fleet.py`` does the SIP half and
hands each accepted call a :class:`SimStream`.

Cost is what matters with hundreds of streams, so nothing is encoded per stream:

- :func:`get_clip` encodes ONE looping clip per process and video parameters with PyAV
  (libx264/libx265, ultrafast, zero latency, no B-frames, a keyframe every ``gop`` frames,
  Annex-B with the parameter sets before every IDR) from a generated pattern: a moving
  gradient and a row of big blocks spelling the clip frame number in binary. It is cached at
  module level and shared by every fleet, device and stream.
- :class:`MediaSender` (one per fleet) ticks at the frame rate. Each tick it stamps the frame
  with a simulator SEI (:data:`SIM_SEI_UUID`: the global frame counter and the send
  wall-clock time, which viewers read back with :func:`parse_sim_sei` to check continuity and
  measure latency), muxes it into one PS packet (``media.ps.PsMuxer``) and slices it into RTP
  payloads (``media.rtp.packetize``) ONCE; every stream then only writes its own 12-byte
  header (sequence number, SSRC) in front of the shared payloads.
- A stream joins at the next keyframe of the shared clip, as a camera's stream starts with
  an IDR; the wait is at most ``gop / fps`` seconds.

RTP timestamps are the frame PTS mod 2^32 (§6.2), the same for every stream of a fleet.
Loss and reordering (``FleetConfig.loss``/``reorder``) are drawn per packet from a RNG seeded
by the stream, so a test run is reproducible. Audio (G.711A, a 1 kHz tone in 20 ms frames) goes
in PS packets of its own (C.1), PSM listing both streams.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from media.nal import escape_rbsp, iter_nal_units
from media.ps import PsMuxer
from media.rtp import packetize

__all__ = [
    "MediaSender",
    "SIM_SEI_UUID",
    "SimStream",
    "VideoClip",
    "alaw_encode",
    "build_sim_sei",
    "check_video_codec",
    "format_line",
    "get_clip",
    "parse_sim_sei",
    "parse_video_size",
    "tone_frame",
]

log = logging.getLogger("gb28181.sim.media")

#: UUID of the simulator's user_data_unregistered SEI (H.264 D.1.6 / H.265 D.2.7, payload type
#: 5); no zero byte, so it never needs emulation prevention and shows up verbatim in an AU.
SIM_SEI_UUID = bytes.fromhex("6b1f3a52c8d44e97b2a59d6e8f7c1b34")
_SEI_PAYLOAD = struct.Struct(">QQ")  # frame counter, send time (ns since the epoch)
_SEI_SIZE = len(SIM_SEI_UUID) + _SEI_PAYLOAD.size
_START4 = b"\x00\x00\x00\x01"

VIDEO_CODECS = {"h264": "libx264", "h265": "libx265"}
_HDR = struct.Struct("!BBHII")  # RTP fixed header, RFC 3550 5.1
_U16 = struct.Struct("!H")
PT_PS = 96  # Annex F: a=rtpmap:96 PS/90000
CLOCK = 90_000
#: Audio: G.711A at 8 kHz in 20 ms frames (C.1 puts each in its own PS packet).
AUDIO_RATE = 8000
AUDIO_FRAME_SAMPLES = 160
AUDIO_FRAME_TICKS = CLOCK * AUDIO_FRAME_SAMPLES // AUDIO_RATE  # 1800
#: A TCP peer that stops reading gets frames dropped (then a restart at the next keyframe)
#: once this much is queued, rather than an ever-growing buffer.
TCP_BACKLOG_LIMIT = 2 << 20
#: First PTS: well clear of 0, so the PS SCR (PTS - 3600) never goes negative.
_PTS_BASE = CLOCK


# -- SEI ------------------------------------------------------------------------------------

def build_sim_sei(counter: int, time_ns: int, codec: str = "h264") -> bytes:
    """The simulator SEI NAL unit, with a 4-byte start code, carrying ``counter`` and ``time_ns``.

    H.264: NAL type 6; H.265: prefix SEI, NAL type 39. One user_data_unregistered message:
    :data:`SIM_SEI_UUID`, then the counter and the time as big-endian uint64.
    """
    rbsp = bytes((5, _SEI_SIZE)) + SIM_SEI_UUID + _SEI_PAYLOAD.pack(
        counter & 0xFFFFFFFFFFFFFFFF, time_ns & 0xFFFFFFFFFFFFFFFF) + b"\x80"
    header = b"\x4e\x01" if codec == "h265" else b"\x06"
    return _START4 + header + escape_rbsp(rbsp)


def _ff_coded(rbsp: bytes, pos: int) -> tuple[int, int]:
    """An SEI payloadType/payloadSize (H.264 7.3.2.3.1): 0xFF bytes add 255 each, then the last
    byte. Returns (value, next position); the position passes the end on truncated input."""
    value, n = 0, len(rbsp)
    while pos < n and rbsp[pos] == 0xFF:
        value += 255
        pos += 1
    if pos >= n:
        return value, n + 1
    return value + rbsp[pos], pos + 1


def _sei_messages(rbsp: bytes):
    """(payloadType, payload) of each message in an SEI RBSP, up to the trailing bits."""
    pos, n = 0, len(rbsp)
    while pos < n and rbsp[pos] != 0x80:
        ptype, pos = _ff_coded(rbsp, pos)
        size, pos = _ff_coded(rbsp, pos)
        if pos > n or pos + size > n:
            return
        yield ptype, rbsp[pos:pos + size]
        pos += size


def parse_sim_sei(access_unit: bytes, codec: str | None = None) -> tuple[int, int] | None:
    """(frame counter, send time in ns since the epoch) from the simulator SEI of an Annex-B
    access unit, or None when it has none. ``codec`` ("h264"/"h265") is guessed when omitted."""
    if SIM_SEI_UUID not in access_unit:  # cheap rejection: the UUID is stored unescaped
        return None
    for nal in iter_nal_units(access_unit):
        b0 = nal[0]
        if b0 & 0x80:
            continue
        if codec != "h265" and b0 & 0x1F == 6:
            body = nal[1:]
        elif codec != "h264" and (b0 >> 1) & 0x3F == 39 and len(nal) > 2:
            body = nal[2:]
        else:
            continue
        if SIM_SEI_UUID not in body:
            continue
        rbsp = body.replace(b"\x00\x00\x03", b"\x00\x00")
        for ptype, payload in _sei_messages(rbsp):
            if ptype == 5 and len(payload) >= _SEI_SIZE and payload[:16] == SIM_SEI_UUID:
                return _SEI_PAYLOAD.unpack_from(payload, 16)
    return None


# -- audio ----------------------------------------------------------------------------------

_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def alaw_encode(samples: np.ndarray) -> bytes:
    """G.711 A-law of 16-bit linear PCM (the segment coder of ITU-T G.711 / Sun ``g711.c``)."""
    pcm = np.asarray(samples, dtype=np.int32) >> 3  # 13-bit magnitude range
    positive = pcm >= 0
    mag = np.where(positive, pcm, -pcm - 1)
    mask = np.where(positive, 0xD5, 0x55)
    seg = np.searchsorted(_ALAW_SEG_END, mag)  # first segment whose end >= mag
    shift = np.where(seg < 2, 1, seg)
    aval = (np.minimum(seg, 7) << 4) | ((mag >> shift) & 0x0F)
    aval = np.where(seg >= 8, 0x7F, aval)
    return (aval ^ mask).astype(np.uint8).tobytes()


def tone_frame(frequency: float = 1000.0, amplitude: float = 0.3) -> bytes:
    """20 ms of a sine at ``frequency``, A-law encoded. At 1 kHz every frame is the same
    (20 whole periods), so one frame serves the whole stream."""
    t = np.arange(AUDIO_FRAME_SAMPLES) / AUDIO_RATE
    pcm = np.round(np.sin(2 * np.pi * frequency * t) * amplitude * 32767).astype(np.int16)
    return alaw_encode(pcm)


# -- the clip -------------------------------------------------------------------------------

def parse_video_size(text: str) -> tuple[int, int]:
    """'640x360' → (640, 360); both even (4:2:0) and at least 16."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.strip().isdigit() or not h.strip().isdigit():
        raise ValueError(f"video size {text!r} is not WIDTHxHEIGHT (e.g. 640x360)")
    width, height = int(w), int(h)
    if width < 16 or height < 16 or width % 2 or height % 2 or width > 7680 or height > 4320:
        raise ValueError(f"video size {text!r}: width and height must be even, 16..7680x4320")
    return width, height


def check_video_codec(codec: str) -> None:
    """ValueError unless PyAV here can encode ``codec`` ("h264" or "h265")."""
    encoder = VIDEO_CODECS.get(codec)
    if encoder is None:
        raise ValueError(f"video codec {codec!r} is not one of {', '.join(VIDEO_CODECS)}")
    import av
    try:
        av.codec.Codec(encoder, "w")
    except Exception:
        raise ValueError(f"video codec {codec!r} needs the {encoder} encoder, which the FFmpeg "
                         f"build inside PyAV {av.__version__} does not have") from None


@dataclass(slots=True, frozen=True)
class VideoClip:
    """A looping encoded clip: Annex-B access units, keyframe flags, and where each AU's
    first slice starts (the SEI goes there)."""

    codec: str
    width: int
    height: int
    fps: int
    gop: int
    bitrate_kbps: int
    frames: tuple[bytes, ...]
    keyframes: tuple[bool, ...]
    slice_at: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.frames)

    def access_unit(self, index: int, counter: int, time_ns: int) -> bytes:
        """Frame ``index`` of the loop with the simulator SEI before its first slice."""
        au = self.frames[index]
        at = self.slice_at[index]
        return b"".join((au[:at], build_sim_sei(counter, time_ns, self.codec), au[at:]))


def _pattern(index: int, count: int, width: int, height: int) -> np.ndarray:
    """One yuv420p picture: a diagonal gradient moving one full cycle per loop (so the loop is
    seamless) and 16 big blocks near the top spelling ``index`` in binary, white for 1."""
    phase = 256.0 * index / count
    x = np.arange(width, dtype=np.float32)[None, :] * (256.0 / width)
    y = np.arange(height, dtype=np.float32)[:, None] * (128.0 / height)
    luma = ((x + y + phase) % 256).astype(np.uint8)
    block = max(4, width // 20) & ~1
    top = max(2, height // 12) & ~1
    for bit in range(16):
        x0 = block // 2 + bit * block
        if x0 + block > width:
            break
        on = (index >> (15 - bit)) & 1
        luma[top:top + block, x0:x0 + block - 2] = 235 if on else 16
    cw, ch = width // 2, height // 2
    u = np.full((ch, cw), 128, np.uint8)
    v = np.full((ch, cw), 128, np.uint8)
    u[:, :] = (np.arange(cw, dtype=np.uint16)[None, :] * 128 // cw + 64).astype(np.uint8)
    v[:, :] = (np.arange(ch, dtype=np.uint16)[:, None] * 128 // ch + 64).astype(np.uint8)
    return np.concatenate((luma, u.reshape(-1, width), v.reshape(-1, width)))


def _first_slice(au: bytes, codec: str) -> int:
    """Offset of the start code of the AU's first VCL NAL unit (len(au) if none)."""
    i = au.find(b"\x00\x00\x01")
    while 0 <= i < len(au) - 3:
        b = au[i + 3]
        t = (b >> 1) & 0x3F if codec == "h265" else b & 0x1F
        vcl = t <= 31 if codec == "h265" else 1 <= t <= 5
        if vcl:
            return i - 1 if i > 0 and au[i - 1] == 0 else i
        i = au.find(b"\x00\x00\x01", i + 3)
    return len(au)


def _strip_sei(au: bytes, codec: str) -> bytes:
    """Drop the encoder's own SEI (x264's settings banner): ours is the only one on the wire."""
    sei = (39, 40) if codec == "h265" else (6,)
    parts = []
    for nal in iter_nal_units(au):
        t = (nal[0] >> 1) & 0x3F if codec == "h265" else nal[0] & 0x1F
        if t not in sei:
            parts.append(_START4 + nal)
    return b"".join(parts)


def encode_clip(codec: str, width: int, height: int, fps: int, gop: int,
                bitrate_kbps: int, phase: int = 0) -> VideoClip:
    """Encode the loop: a whole number of GOPs, about four seconds (at least one GOP).

    ``phase`` shifts the keyframes: the encoder starts at picture ``phase`` of the loop, so
    keyframes fall on loop indices ``phase + k * gop``. Frames are stored by loop index either
    way, so every variant shows the same picture at the same index.
    """
    import av
    check_video_codec(codec)
    gops = max(1, round(4 * fps / gop))
    count = gops * gop
    cc = av.CodecContext.create(VIDEO_CODECS[codec], "w")
    assert isinstance(cc, av.VideoCodecContext)  # an encoder named in VIDEO_CODECS is a video one
    cc.width, cc.height, cc.pix_fmt = width, height, "yuv420p"
    cc.time_base = Fraction(1, fps)
    cc.framerate = Fraction(fps, 1)
    cc.bit_rate = bitrate_kbps * 1000
    cc.gop_size = gop
    cc.max_b_frames = 0
    common = f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:repeat-headers=1:aud=1"
    if codec == "h264":
        cc.options = {"preset": "ultrafast", "tune": "zerolatency", "x264-params": common}
    else:
        cc.options = {"preset": "ultrafast", "tune": "zerolatency",
                      "x265-params": f"{common}:open-gop=0:info=0:log-level=none:pools=none:frame-threads=1"}
    frames: list[bytes] = []
    keys: list[bool] = []

    def take(packets) -> None:
        for p in packets:
            frames.append(_strip_sei(bytes(p), codec))
            keys.append(bool(p.is_keyframe))

    phase %= count
    for i in range(count):
        picture = (phase + i) % count
        frame = av.VideoFrame.from_ndarray(_pattern(picture, count, width, height), format="yuv420p")
        frame.pts = i
        take(cc.encode(frame))
    take(cc.encode(None))
    if len(frames) != count or not keys[0]:
        raise RuntimeError(f"{codec} encoder gave {len(frames)} frames for {count} pictures")
    # Back to loop order: encoded frame i shows picture phase + i.
    frames = frames[count - phase:] + frames[:count - phase]
    keys = keys[count - phase:] + keys[:count - phase]
    return VideoClip(codec, width, height, fps, gop, bitrate_kbps, tuple(frames), tuple(keys),
                     tuple(_first_slice(au, codec) for au in frames))


_clips: dict[tuple, VideoClip] = {}
_clips_lock = threading.Lock()


def get_clip(codec: str = "h264", size: str | tuple[int, int] = "640x360", fps: int = 25,
             gop: int = 50, bitrate_kbps: int = 1000, phase: int = 0) -> VideoClip:
    """The shared clip for these parameters, encoded on first use (thread-safe, once per process)."""
    width, height = parse_video_size(size) if isinstance(size, str) else size
    key = (codec, width, height, int(fps), int(gop), int(bitrate_kbps), int(phase))
    clip = _clips.get(key)
    if clip is not None:
        return clip
    with _clips_lock:
        clip = _clips.get(key)
        if clip is None:
            started = time.perf_counter()
            clip = _clips[key] = encode_clip(*key)
            log.info("encoded the %s %dx%d clip (%d frames) in %.2f s", codec, width, height,
                     len(clip), time.perf_counter() - started)
    return clip


def resolution_code(width: int, height: int) -> int:
    """The f= resolution code (Annex F): 1 QCIF, 2 CIF, 3 4CIF, 4 D1, 5 720P, 6 1080P."""
    if height >= 1080:
        return 6
    if height >= 720:
        return 5
    if height >= 576:
        return 4 if width >= 720 else 3
    if height >= 288:
        return 2
    return 1


def format_line(codec: str, size: tuple[int, int], fps: int, bitrate_kbps: int, audio: bool) -> str:
    """The answer's ``f=`` value: ``v/<codec>/<res>/<fps>/<rate type>/<kbps>a/<codec>/<rate>/<Hz>``.

    Annex F knows video codec 2 (H.264) but no H.265 code, so H.265 leaves it empty; audio is
    G.711 at 64 kbps (8) and 8 kHz (1), or empty fields when the stream has none.
    """
    video = "2" if codec == "h264" else ""
    tail = "a/1/8/1" if audio else "a///"
    return f"v/{video}/{resolution_code(*size)}/{fps}/1/{bitrate_kbps}{tail}"


# -- streams --------------------------------------------------------------------------------

class _TcpMedia(asyncio.Protocol):
    """The device end of a TCP media connection: writes only; whatever arrives is discarded."""

    def __init__(self, stream: SimStream) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.stream._attached(transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        pass  # RTCP or keep-alives from the platform: not used

    def connection_lost(self, exc: Exception | None) -> None:
        self.stream._connection_lost(self)


class SimStream:
    """One live stream of one call: where it goes, its RTP state and its counters.

    ``transport`` is "udp" or "tcp"; ``setup`` is the device's TCP role as its answer says it:
    "active" (the device connects to the platform) or "passive" (the device listens on
    ``local_port`` and the platform connects). ``state`` goes "pending" (answered, no media yet)
    → "sending" → "closed"; ``silent`` streams stay "pending" although their media path is up.
    ``started_at`` is ``time.monotonic()`` when media started (0.0 before).
    """

    def __init__(self, *, channel_id: str, call_id: str, transport: str, ssrc: int,
                 remote: tuple[str, int], setup: str | None = None, bind_host: str = "127.0.0.1",
                 loss: float = 0.0, reorder: float = 0.0, silent: bool = False,
                 seed: str | None = None) -> None:
        self.channel_id = channel_id
        self.call_id = call_id
        self.transport = transport
        self.setup = setup
        self.ssrc = ssrc & 0xFFFFFFFF
        self.remote = remote
        self.bind_host = bind_host
        self.loss = loss
        self.reorder = reorder
        self.silent = silent
        self.state = "pending"
        self.started_at = 0.0
        self.frames_sent = 0
        self.audio_frames_sent = 0
        self.packets_sent = 0
        self.bytes_sent = 0
        self.packets_lost = 0      # dropped on purpose (``loss``) or during a link outage
        self.packets_reordered = 0
        self.frames_dropped = 0    # TCP peer not reading: dropped, restart at a keyframe
        self.error = ""
        self.seq = random.Random(f"seq:{seed or call_id}").randrange(0x10000)
        self._rng = random.Random(f"impair:{seed or call_id}")
        self._held: bytes | None = None
        self.waiting_key = True
        self.variant: int | None = None   # which copy of the clip (see MediaSender.start_variants)
        self._sock: socket.socket | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Transport | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sender: MediaSender | None = None
        #: Called once when the TCP connection goes away while the stream is live.
        self.on_lost: Callable[[SimStream], Any] | None = None
        self.local_port = self._open()

    def __repr__(self) -> str:
        return (f"<SimStream {self.channel_id} {self.transport}"
                f"{'/' + self.setup if self.setup else ''} ssrc={self.ssrc} {self.state} "
                f"frames={self.frames_sent} packets={self.packets_sent}>")

    # -- set-up ------------------------------------------------------------------------------
    def _open(self) -> int:
        """Bind the device-side socket now, so the answer can name its port."""
        kind = socket.SOCK_DGRAM if self.transport == "udp" else socket.SOCK_STREAM
        sock = socket.socket(socket.AF_INET, kind)
        try:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.bind_host, 0))
            if self.transport == "tcp" and self.setup == "passive":
                sock.listen(4)  # connections queue here until start() accepts them
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        return sock.getsockname()[1]

    async def listen(self, sender: MediaSender) -> None:
        """TCP passive role: accept the platform's connection; media starts when it arrives."""
        assert self.setup == "passive" and self._sock is not None
        self._sender = sender
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _TcpMedia(self), sock=self._sock)
        self._sock = None  # owned by the server now

    async def start(self, sender: MediaSender, timeout: float = 5.0) -> None:
        """After the ACK: UDP starts sending; TCP active role connects first, then sends.
        Raises OSError/TimeoutError when the platform cannot be reached."""
        if self.state == "closed":
            return
        self._sender = sender
        loop = asyncio.get_running_loop()
        sock = self._sock
        assert sock is not None
        if self.transport == "udp":
            sock.connect(self.remote)
            self._udp, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, sock=sock)
            self._sock = None
            self._go()
            return
        await asyncio.wait_for(loop.sock_connect(sock, self.remote), timeout)
        self._sock = None
        if self.state == "closed":
            sock.close()
            return
        await loop.create_connection(lambda: _TcpMedia(self), sock=sock)

    def _attached(self, transport: asyncio.Transport) -> None:
        if self._tcp is not None or self.state == "closed":
            transport.abort()  # one media connection per stream
            return
        self._tcp = transport
        if self._server is not None:
            self._server.close()  # stop listening; the accepted connection stays
            self._server = None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._go()

    def _go(self) -> None:
        if self.state == "closed":
            return
        self.started_at = time.monotonic()
        if self.silent or self._sender is None:
            return
        self.state = "sending"
        self._sender.add(self)

    def _connection_lost(self, proto: _TcpMedia) -> None:
        if self.state == "closed" or proto.transport is not self._tcp:
            return  # ours already closed, or a surplus connection we refused
        self.error = "TCP media connection closed by the peer"
        self._tcp = None
        self.close()
        if self.on_lost is not None:
            self.on_lost(self)

    def close(self) -> None:
        """Stop sending and release the socket(s); idempotent."""
        if self.state == "closed":
            return
        self.state = "closed"
        if self._sender is not None:
            self._sender.discard(self)
        for closable in (self._udp, self._tcp, self._server, self._sock):
            if closable is not None:
                closable.close()
        self._udp = self._tcp = self._server = self._sock = None
        self._held = None

    # -- sending (called by MediaSender every tick) ---------------------------------------------
    def deliver(self, bursts: list[tuple[int, list[tuple[int, bytes, bytes]], bool]],
                keyframe: bool, lost: bool) -> None:
        """Send one tick's PS packets: ``bursts`` of (timestamp, [(byte1, payload, tcp length)],
        is_video). A stream still waiting for a keyframe skips ticks without one; ``lost``
        (a link outage) burns the sequence numbers without sending."""
        if self.waiting_key:
            if not keyframe:
                return
            self.waiting_key = False
        tcp = self._tcp
        if tcp is not None and tcp.get_write_buffer_size() > TCP_BACKLOG_LIMIT:
            self.frames_dropped += 1
            self.waiting_key = True
            return
        for ts, packets, video in bursts:
            if lost:
                self.seq = (self.seq + len(packets)) & 0xFFFF
                self.packets_lost += len(packets)
            elif self.loss or self.reorder or self._held is not None:
                self._send_impaired(ts, packets)
            elif tcp is not None:
                self._send_tcp(tcp, ts, packets)
            elif self._udp is not None:
                self._send_udp(self._udp, ts, packets)
            if video:
                self.frames_sent += 1
            else:
                self.audio_frames_sent += 1

    def _send_udp(self, udp: asyncio.DatagramTransport, ts: int,
                  packets: list[tuple[int, bytes, bytes]]) -> None:
        pack = _HDR.pack
        seq, ssrc = self.seq, self.ssrc
        sent = 0
        for b1, payload, _ in packets:
            data = pack(0x80, b1, seq, ts, ssrc) + payload
            udp.sendto(data)
            sent += len(data)
            seq = (seq + 1) & 0xFFFF
        self.seq = seq
        self.packets_sent += len(packets)
        self.bytes_sent += sent

    def _send_tcp(self, tcp: asyncio.Transport, ts: int,
                  packets: list[tuple[int, bytes, bytes]]) -> None:
        pack = _HDR.pack
        seq, ssrc = self.seq, self.ssrc
        parts: list[bytes] = []
        for b1, payload, lead in packets:
            parts += (lead, pack(0x80, b1, seq, ts, ssrc), payload)
            seq = (seq + 1) & 0xFFFF
        data = b"".join(parts)
        tcp.write(data)
        self.seq = seq
        self.packets_sent += len(packets)
        self.bytes_sent += len(data) - 2 * len(packets)

    def _send_impaired(self, ts: int, packets: list[tuple[int, bytes, bytes]]) -> None:
        """The slow path: per-packet loss and reordering (swap with the next packet)."""
        pack = _HDR.pack
        rnd = self._rng.random
        out: list[bytes] = []
        for b1, payload, _ in packets:
            data = pack(0x80, b1, self.seq, ts, self.ssrc) + payload
            self.seq = (self.seq + 1) & 0xFFFF
            if self.loss and rnd() < self.loss:
                self.packets_lost += 1
                continue
            if self._held is not None:
                out += (data, self._held)
                self._held = None
            elif self.reorder and rnd() < self.reorder:
                self._held = data
                self.packets_reordered += 1
            else:
                out.append(data)
        if not out:
            return
        if self._tcp is not None:
            self._tcp.write(b"".join(_U16.pack(len(p)) + p for p in out))
        elif self._udp is not None:
            for p in out:
                self._udp.sendto(p)
        self.packets_sent += len(out)
        self.bytes_sent += sum(len(p) for p in out)


class MediaSender:
    """The one pacing task of a fleet: every 1/fps s it builds the next frame's RTP payloads
    once and hands them to every live stream (see the module docstring).

    ``counter`` is the global frame counter written into the SEI; it only grows. The task
    runs while there are streams and is started again by the next ``add``.
    """

    def __init__(self, *, codec: str = "h264", size: tuple[int, int] = (640, 360), fps: int = 25,
                 gop: int = 50, bitrate_kbps: int = 1000, audio: bool = False,
                 running: asyncio.Event | None = None,
                 spawn: Callable[[Any], asyncio.Task] | None = None,
                 start_variants: int = 1) -> None:
        self.codec = codec
        self.size = size
        self.fps = fps
        self.gop = gop
        self.bitrate_kbps = bitrate_kbps
        self.audio = audio
        self.running = running
        self._spawn = spawn or (lambda coro: asyncio.get_running_loop().create_task(coro))
        self.muxer = PsMuxer(codec, "g711a" if audio else None)
        self.streams: dict[SimStream, None] = {}  # insertion-ordered set
        self.counter = 0
        self.ticks = 0
        self.late_ticks = 0
        self._audio_next = _PTS_BASE
        self._audio_frame = tone_frame() if audio else b""
        self._task: asyncio.Task | None = None
        self.clip: VideoClip | None = None
        # Copies of the clip with their keyframes spread over the GOP: a new stream joins the
        # copy whose keyframe comes first, so it starts within gop / start_variants frames, as a
        # camera that sends an IDR on INVITE would, instead of up to a whole GOP later.
        self.start_variants = max(1, min(int(start_variants), gop))
        self.clips: list[VideoClip] = []
        self._muxers: list[PsMuxer] = []

    def add(self, stream: SimStream) -> None:
        stream.waiting_key = True
        self.streams[stream] = None
        if self._task is None or self._task.done():
            self._task = self._spawn(self._run())

    def discard(self, stream: SimStream) -> None:
        self.streams.pop(stream, None)

    async def prepare(self) -> VideoClip:
        """Encode (or fetch from the cache) the clip and its variants, off the event loop."""
        if self.clip is None:
            phases = sorted({round(v * self.gop / self.start_variants)
                             for v in range(self.start_variants)})
            clips = []
            for phase in phases:
                clips.append(await asyncio.to_thread(get_clip, self.codec, self.size, self.fps,
                                                     self.gop, self.bitrate_kbps, phase))
            self.clips = clips
            self._muxers = [self.muxer] + [PsMuxer(self.codec, "g711a" if self.audio else None)
                                           for _ in clips[1:]]
            self.clip = clips[0]
        return self.clip

    def _variant_for(self, n: int) -> int:
        """The clip copy whose next keyframe is nearest to tick ``n``."""
        count = len(self.clips[0])
        best, wait = 0, count
        for v, clip in enumerate(self.clips):
            for ahead in range(count):
                if clip.keyframes[(n + ahead) % count]:
                    break
            if ahead < wait:
                best, wait = v, ahead
        return best

    def pts(self, counter: int) -> int:
        return _PTS_BASE + counter * CLOCK // self.fps

    async def _run(self) -> None:
        try:
            clip = await self.prepare()
        except Exception as exc:
            log.error("cannot encode the simulator clip: %s", exc)
            for stream in list(self.streams):
                stream.error = f"no video: {exc}"
                stream.close()
            return
        # A (re)started sender jumps to the next keyframe of the loop, so the streams that woke
        # it up start at once; the counter never goes back.
        self.counter += (-self.counter) % clip.gop
        self._audio_next = max(self._audio_next, self.pts(self.counter))
        loop = asyncio.get_running_loop()
        start = loop.time()
        ticks = 0
        while self.streams:
            self._tick(clip)
            ticks += 1
            delay = start + ticks / self.fps - loop.time()
            if delay < -1.0:  # more than a second behind (an overloaded host): slip, don't burst
                self.late_ticks += 1
                start = loop.time() - ticks / self.fps
                delay = 0.0
            await asyncio.sleep(max(0.0, delay))
        self._task = None

    def _tick(self, clip: VideoClip) -> None:
        n = self.counter
        self.counter += 1
        self.ticks += 1
        index = n % len(clip)
        pts = self.pts(n)
        now_ns = time.time_ns()
        # Audio of this frame interval follows its video: timestamps never go back, and a
        # stream that joins at this keyframe gets the PSM before its first audio packet.
        audio = []
        end = self.pts(n + 1)
        while self.audio and self._audio_next < end:
            audio.append((self._audio_next & 0xFFFFFFFF,
                          _template(self.muxer.mux_audio(self._audio_frame, self._audio_next)),
                          False))
            self._audio_next += AUDIO_FRAME_TICKS
        built: dict[int, tuple[list, bool]] = {}   # per clip copy in use, built once this tick
        lost = self.running is not None and not self.running.is_set()
        for stream in list(self.streams):
            variant = getattr(stream, "variant", None)
            if variant is None or variant >= len(self.clips):
                variant = stream.variant = self._variant_for(n) if stream.waiting_key else 0
            entry = built.get(variant)
            if entry is None:
                vclip = self.clips[variant] if self.clips else clip
                keyframe = vclip.keyframes[index]
                au = vclip.access_unit(index, n, now_ns)
                video = _template(self._muxers[variant].mux_video(au, pts, keyframe=keyframe)) \
                    if self._muxers else _template(self.muxer.mux_video(au, pts, keyframe=keyframe))
                entry = built[variant] = ([(pts & 0xFFFFFFFF, video, True), *audio], keyframe)
            bursts, keyframe = entry
            try:
                stream.deliver(bursts, keyframe, lost)
            except Exception as exc:  # one broken socket must not stop the others
                stream.error = f"send failed: {exc}"
                log.warning("stream %s: %s", stream.call_id, stream.error)
                stream.close()


def _template(ps: bytes) -> list[tuple[int, bytes, bytes]]:
    """Slice a PS packet once: per RTP packet its second header byte (marker + PT), its payload
    and its RFC 4571 length prefix (Annex L); streams add their own seq/SSRC header."""
    packets, _ = packetize(ps, ssrc=0, seq=0, timestamp=0, payload_type=PT_PS)
    return [(p[1], p[12:], _U16.pack(len(p))) for p in packets]
