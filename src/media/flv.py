"""Sans-IO FLV muxer for HTTP-FLV / WS-FLV: `MediaPacket` in, FLV bytes out.

Video (FLV 10.1 spec E.4.3, ISO/IEC 14496-15):

* H.264: CodecID 7 (AVC). An AVC sequence header (AVCPacketType 0,
  AVCDecoderConfigurationRecord built from the SPS/PPS of the Annex-B keyframe AU) goes
  before the first frame and again whenever the SPS/PPS change; frames (AVCPacketType 1)
  carry the NAL units with 4-byte lengths instead of start codes, without AUD/SPS/PPS (SEI
  and slices are kept), the keyframe flag and the composition time PTS - DTS.
* H.265: Enhanced RTMP/FLV (veovera enhanced-rtmp v1, read by FFmpeg >= 6, mpegts.js and
  the enhanced flv.js forks): the first byte has IsExHeader (0x80) | FrameType << 4 |
  PacketType, followed by the FourCC "hvc1". PacketType 0 SequenceStart carries an
  HEVCDecoderConfigurationRecord (ISO/IEC 14496-15 8.3.3) from VPS/SPS/PPS; frames are
  PacketType 3 CodedFramesX (composition time 0, omitted) or 1 CodedFrames (with SI24
  composition time), like FFmpeg's flvenc writes them.
* Video starts at the first keyframe whose parameter sets are known; earlier video frames
  are skipped (audio is written meanwhile).

Audio: G.711 A-law is SoundFormat 7, µ-law 8, with SoundRate 0 / 16-bit / mono (0x72 /
0x82) — the flags FFmpeg's flvenc writes for 8 kHz G.711; its flvdec sets 8 kHz for them.

Timestamps: milliseconds from the 90 kHz PTS (DTS for video) relative to the first tag
written, so every muxer starts at 0. Timestamps are unwrapped modulo 2**32, which covers
both the 33-bit PS clock and 32-bit RTP clocks, jumps of more than 10 s are treated as a
discontinuity, and each track is kept monotonic.
"""

from __future__ import annotations

import struct
from collections import deque

from . import nal
from .packet import MediaPacket
from .ps import PsFrame

__all__ = ["FlvMuxer", "flv_header", "avc_decoder_config", "hevc_decoder_config", "clear_parse_cache"]

TAG_AUDIO = 8
TAG_VIDEO = 9

_TAG_HEAD = struct.Struct(">II3x")  # type<<24 | size, ts24<<8 | ts_ext, stream id 0
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")

_WRAP = 1 << 32
_HALF = 1 << 31
_JUMP = 10 * 90000  # a timestamp step beyond +-10 s is a discontinuity, not time passing
_MAX_TAG = 0xFFFFFF  # DataSize is 24 bits

# FLV 10.1 E.4.2.1: SoundFormat << 4 | SoundRate 0 | SoundSize 16-bit | mono.
_AUDIO_FLAGS = {"g711a": bytes((0x72,)), "g711u": bytes((0x82,))}

# Parameter sets and delimiters that do not go into FLV frames (they are in the
# decoder configuration record); SEI and everything else stays.
_H264_SKIP = frozenset((nal.H264_NAL_SPS, nal.H264_NAL_PPS, nal.H264_NAL_AUD))
_H265_SKIP = frozenset((nal.H265_NAL_VPS, nal.H265_NAL_SPS, nal.H265_NAL_PPS, nal.H265_NAL_AUD))

# Enhanced RTMP PacketType.
_EX_SEQUENCE_START = 0
_EX_CODED_FRAMES = 1
_EX_CODED_FRAMES_X = 3


def flv_header(video: bool = True, audio: bool = False) -> bytes:
    """The 9-byte FLV file header followed by PreviousTagSize0."""
    return b"FLV\x01" + bytes(((0x04 if audio else 0) | (0x01 if video else 0),)) + b"\x00\x00\x00\x09" + b"\x00" * 4




# Parsed AUs, shared by every muxer in the process: N viewers of a stream mux the same
# AU objects (the hub hands out shared packets), so the start-code scan — most of the
# cost — is done once per AU instead of once per viewer. Keyed by id(au) with the AU
# itself held, so an id cannot be reused while its entry lives; FIFO-evicted through a
# deque of keys (taking a dict's first key costs a walk over the slots of every entry
# deleted before it, until the dict is rebuilt).
_PARSE_CACHE: dict[int, tuple] = {}
_PARSE_ORDER: deque[int] = deque()
_PARSE_CACHE_SIZE = 512


def clear_parse_cache() -> None:
    """Forget the shared parsed-AU cache (benchmarks measure the cold cost with it)."""
    _PARSE_CACHE.clear()
    _PARSE_ORDER.clear()


def _parse_au(au: bytes, hevc: bool) -> tuple[list[tuple[int, int]], dict[int, list[bytes]] | None]:
    """(spans of the NAL units that go into the FLV frame, {parameter-set type: [units]}).

    The result is shared: callers must not mutate it.
    """
    key = id(au)
    hit = _PARSE_CACHE.get(key)
    if hit is not None and hit[0] is au and hit[1] is hevc:
        return hit[2], hit[3]
    skip_types = _H265_SKIP if hevc else _H264_SKIP
    aud = nal.H265_NAL_AUD if hevc else nal.H264_NAL_AUD
    found: dict[int, list[bytes]] | None = None
    keep: list[tuple[int, int]] = []
    for s, e in nal.nal_spans(au):
        t = (au[s] >> 1) & 0x3F if hevc else au[s] & 0x1F
        if t not in skip_types:
            keep.append((s, e))
            continue
        if t == aud:
            continue
        if not (4 if t == nal.H264_NAL_SPS and not hevc else 3) <= e - s <= 0xFFFF:
            continue  # too short to be one, or too long for the record's 16-bit length
        if found is None:
            found = {}
        units = found.setdefault(t, [])
        unit = au[s:e]
        if unit not in units and len(units) < 31:
            units.append(unit)
    cache = _PARSE_CACHE
    if key not in cache:
        if len(cache) >= _PARSE_CACHE_SIZE:
            del cache[_PARSE_ORDER.popleft()]
        _PARSE_ORDER.append(key)
    cache[key] = (au, hevc, keep, found)
    return keep, found


def _unescape(nal_unit: bytes) -> bytes:
    """RBSP of a NAL unit payload: emulation_prevention_three_byte removed (7.4.1)."""
    return nal_unit.replace(b"\x00\x00\x03", b"\x00\x00")


def avc_decoder_config(sps_list: list[bytes], pps_list: list[bytes]) -> bytes:
    """AVCDecoderConfigurationRecord (ISO/IEC 14496-15 5.3.3.1), 4-byte NALU lengths."""
    sps0 = sps_list[0]
    out = [bytes((1, sps0[1], sps0[2], sps0[3], 0xFF, 0xE0 | len(sps_list)))]
    for s in sps_list:
        out.append(_U16.pack(len(s)))
        out.append(s)
    out.append(bytes((len(pps_list),)))
    for p in pps_list:
        out.append(_U16.pack(len(p)))
        out.append(p)
    if sps0[1] in (100, 110, 122, 144):
        # High profiles: chroma_format / bit depths, as FFmpeg's ff_isom_write_avcc writes.
        try:
            info = nal.parse_h264_sps(sps0)
            out.append(bytes((0xFC | info.chroma_format_idc, 0xF8 | (info.bit_depth - 8) & 7,
                              0xF8 | (info.bit_depth - 8) & 7, 0)))
        except nal.NalError:
            pass
    return b"".join(out)


def hevc_decoder_config(vps_list: list[bytes], sps_list: list[bytes], pps_list: list[bytes]) -> bytes:
    """HEVCDecoderConfigurationRecord (ISO/IEC 14496-15 8.3.3.1.2), 4-byte NALU lengths.

    The profile/tier/level bytes are copied from the SPS's profile_tier_level (they sit at
    a fixed position), chroma format and bit depth come from parsing the SPS.
    """
    sps0 = sps_list[0]
    rbsp = _unescape(sps0[2:])
    ptl = rbsp[1:13] if len(rbsp) >= 13 else bytes(12)  # profile byte, compat (4), constraint (6), level
    sub_layers = ((rbsp[0] >> 1) & 7) + 1 if rbsp else 1
    nested = rbsp[0] & 1 if rbsp else 0
    chroma, depth = 1, 8
    try:
        info = nal.parse_h265_sps(sps0)
        chroma, depth = info.chroma_format_idc, info.bit_depth
    except nal.NalError:
        pass
    head = bytes((1,)) + ptl + bytes((
        0xF0, 0x00,                     # reserved, min_spatial_segmentation_idc 0
        0xFC,                           # reserved, parallelismType 0 (unknown)
        0xFC | (chroma & 3),
        0xF8 | ((depth - 8) & 7),
        0xF8 | ((depth - 8) & 7),
        0, 0,                           # avgFrameRate unspecified
        (sub_layers & 7) << 3 | (nested & 1) << 2 | 3,  # constantFrameRate 0, lengthSizeMinusOne 3
    ))
    arrays = [(nal.H265_NAL_VPS, vps_list), (nal.H265_NAL_SPS, sps_list), (nal.H265_NAL_PPS, pps_list)]
    arrays = [(t, units) for t, units in arrays if units]
    out = [head, bytes((len(arrays),))]
    for t, units in arrays:
        out.append(bytes((0x80 | t,)))  # array_completeness 1
        out.append(_U16.pack(len(units)))
        for u in units:
            out.append(_U16.pack(len(u)))
            out.append(u)
    return b"".join(out)


def _tag(tag_type: int, ts: int, body_parts: list, size: int) -> list:
    """Tag header + body parts + PreviousTagSize, as a list of byte strings."""
    ts &= 0xFFFFFFFF
    head = _TAG_HEAD.pack((tag_type << 24) | size, ((ts & 0xFFFFFF) << 8) | (ts >> 24))
    body_parts.insert(0, head)
    body_parts.append(_U32.pack(size + 11))
    return body_parts


class FlvMuxer:
    """FLV muxer for one viewer: `header()` once, then `mux(packet)` per MediaPacket.

    `video` / `audio` choose the tracks written (and the header flags). `mux` returns all
    tags for the packet's frames (possibly b""). Invalid or unsupported frames are
    skipped, never raised on. Counters: `video_tags`, `audio_tags`, `skipped`
    (video frames dropped before the first usable keyframe or for an unknown codec).
    """

    __slots__ = ("video", "audio", "video_codec", "video_tags", "audio_tags", "skipped",
                 "_ps", "_config", "_started", "_last_raw", "_ext", "_origin",
                 "_last_video_ms", "_last_audio_ms")

    def __init__(self, *, video: bool = True, audio: bool = False) -> None:
        self.video = video
        self.audio = audio
        self.video_codec: str | None = None  # codec of the sequence header in force
        self.video_tags = 0
        self.audio_tags = 0
        self.skipped = 0
        # Last parameter sets seen: {nal type: [units]}; _config: the record in force.
        self._ps: dict[int, list[bytes]] = {}
        self._config: bytes | None = None
        self._started = False
        self._last_raw: int | None = None   # last 90 kHz timestamp seen, mod 2**32
        self._ext = 0                       # its unwrapped value
        self._origin: int | None = None     # unwrapped value of time 0
        self._last_video_ms = 0
        self._last_audio_ms = 0

    def header(self) -> bytes:
        """FLV header + PreviousTagSize0."""
        return flv_header(self.video, self.audio)

    def mux(self, packet: MediaPacket) -> bytes:
        """All FLV tags for the frames of one packet (b"" if none are written)."""
        parts: list = []
        self.mux_parts(packet, parts)
        return b"".join(parts)

    def mux_parts(self, packet: MediaPacket, parts: list) -> int:
        """Append the FLV tags of one packet to `parts` without joining them; returns their size.

        The parts are byte strings and memoryviews into the packet's access units (the NAL
        units are not copied): a socket's writelines takes them as they are.
        """
        size = 0
        for f in packet.frames:
            if f.stream == "video":
                if self.video:
                    size += self._mux_video(f, packet.timestamp, parts)
            elif f.stream == "audio" and self.audio:
                size += self._mux_audio(f, packet.timestamp, parts)
        return size

    def mux_frame(self, frame: PsFrame, timestamp: int = 0) -> bytes:
        """Tags for one frame; `timestamp` (90 kHz) is used when the frame has no PTS."""
        parts: list = []
        if frame.stream == "video" and self.video:
            self._mux_video(frame, timestamp, parts)
        elif frame.stream == "audio" and self.audio:
            self._mux_audio(frame, timestamp, parts)
        return b"".join(parts)

    # -- timestamps --

    def _unwrap(self, ts: int) -> int:
        """Unwrapped 90 kHz value of a 32/33-bit timestamp (compared modulo 2**32)."""
        raw = ts & 0xFFFFFFFF
        last = self._last_raw
        if last is None:
            self._last_raw = raw
            self._ext = raw
            return raw
        delta = (raw - last) & 0xFFFFFFFF
        if delta >= _HALF:
            delta -= _WRAP
        if -_JUMP <= delta <= _JUMP:
            self._ext += delta
        # else: a discontinuity (camera restart, clock jump): continue from where we were.
        self._last_raw = raw
        return self._ext

    def _ms(self, ext: int) -> int:
        origin = self._origin
        if origin is None:
            self._origin = origin = ext
        return max(0, (ext - origin) // 90)

    # -- audio --

    def _mux_audio(self, f: PsFrame, fallback_ts: int, parts: list) -> int:
        flags = _AUDIO_FLAGS.get(f.codec)
        if flags is None or not f.data or len(f.data) >= _MAX_TAG:
            return 0
        ts = self._ms(self._unwrap(f.pts if f.pts is not None else fallback_ts))
        if ts < self._last_audio_ms:
            ts = self._last_audio_ms
        self._last_audio_ms = ts
        data = f.data
        parts += _tag(TAG_AUDIO, ts, [flags, data], 1 + len(data))
        self.audio_tags += 1
        return 16 + len(data)  # tag header 11, flags 1, PreviousTagSize 4

    # -- video --

    def _mux_video(self, f: PsFrame, fallback_ts: int, parts: list) -> int:
        codec = f.codec
        if codec == "h264":
            hevc = False
        elif codec == "h265":
            hevc = True
        else:
            self.skipped += 1
            return 0
        au = f.data
        if type(au) is not bytes:
            au = bytes(au)
        if codec != self.video_codec:
            if self._started and not f.keyframe:
                self.skipped += 1  # a codec change takes effect at a keyframe
                return 0
            self._ps = {}
            self._config = None
            self._started = False
            self.video_codec = codec
        keep, found = _parse_au(au, hevc)
        if found:
            self._ps.update(found)
        if not self._started and not (f.keyframe and self._have_config(hevc)):
            self.skipped += 1
            return 0
        written = 0
        if found or not self._started:
            written = self._maybe_sequence_header(hevc, f, fallback_ts, parts)
        if not keep:
            return written  # parameter sets only
        self._started = True
        dts_raw = f.dts if f.dts is not None else (f.pts if f.pts is not None else fallback_ts)
        dts_ext = self._unwrap(dts_raw)
        ts = self._ms(dts_ext)
        if ts < self._last_video_ms:
            ts = self._last_video_ms
        self._last_video_ms = ts
        cts = 0
        if f.pts is not None and f.dts is not None:
            d = (f.pts - f.dts) & 0xFFFFFFFF
            if d >= _HALF:
                d -= _WRAP
            cts = max(-0x800000, min(0x7FFFFF, d // 90 if d >= 0 else -((-d) // 90)))
        frame_type = 0x10 if f.keyframe else 0x20
        body: list[bytes | memoryview]
        if hevc:
            if cts:
                body = [bytes((0x80 | frame_type | _EX_CODED_FRAMES,)) + b"hvc1" + (cts & 0xFFFFFF).to_bytes(3, "big")]
            else:
                body = [bytes((0x80 | frame_type | _EX_CODED_FRAMES_X,)) + b"hvc1"]
        else:
            body = [bytes((frame_type | 7, 1)) + (cts & 0xFFFFFF).to_bytes(3, "big")]
        size = len(body[0])
        mv = memoryview(au)
        pack = _U32.pack
        for s, e in keep:
            body.append(pack(e - s))
            body.append(mv[s:e])
            size += 4 + e - s
        if size > _MAX_TAG:
            self.skipped += 1
            return written
        parts += _tag(TAG_VIDEO, ts, body, size)
        self.video_tags += 1
        return written + size + 15

    def _have_config(self, hevc: bool) -> bool:
        ps = self._ps
        if hevc:
            return bool(ps.get(nal.H265_NAL_SPS) and ps.get(nal.H265_NAL_PPS) and ps.get(nal.H265_NAL_VPS))
        return bool(ps.get(nal.H264_NAL_SPS) and ps.get(nal.H264_NAL_PPS))

    def _maybe_sequence_header(self, hevc: bool, f: PsFrame, fallback_ts: int, parts: list) -> int:
        """Write a sequence header if the parameter sets differ from the one in force; its size."""
        if not self._have_config(hevc):
            return 0
        ps = self._ps
        if hevc:
            record = hevc_decoder_config(ps[nal.H265_NAL_VPS], ps[nal.H265_NAL_SPS], ps[nal.H265_NAL_PPS])
        else:
            record = avc_decoder_config(ps[nal.H264_NAL_SPS], ps[nal.H264_NAL_PPS])
        if record == self._config:
            return 0
        self._config = record
        raw = f.dts if f.dts is not None else (f.pts if f.pts is not None else fallback_ts)
        ts = self._ms(self._unwrap(raw))
        if ts < self._last_video_ms:
            ts = self._last_video_ms
        self._last_video_ms = ts
        if hevc:
            head = bytes((0x80 | 0x10 | _EX_SEQUENCE_START,)) + b"hvc1"
        else:
            head = b"\x17\x00\x00\x00\x00"  # keyframe | AVC, sequence header, cts 0
        parts += _tag(TAG_VIDEO, ts, [head, record], len(head) + len(record))
        return len(head) + len(record) + 15
