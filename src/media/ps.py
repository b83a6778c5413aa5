"""MPEG-2 program stream (ISO/IEC 13818-1 2.5) muxer and demuxer for GB/T 28181.

GB/T 28181 Annex C carries one video frame per PS packet over RTP. The receive
path is `media.rtp` (reorder, group by timestamp) -> `PsDemuxer.feed` ->
`PsFrame` (Annex-B access units and G.711 frames with 90 kHz timestamps), which
the relay's health checks and FLV/HTTP outputs consume; `media.nal` answers
questions about the video AUs. The send path (simulators, re-muxing) is
`PsMuxer` -> `media.rtp.packetize`.

The demuxer is a byte-level state machine: payload bytes are never scanned
byte by byte in Python, bounded PES payloads are sliced by their length, and
only length-0 (unbounded) video PES are searched for the next start code with
`bytes.find`. It tolerates what real devices send (IRE `mpeg-ps-dec.c`, ZLM):
garbage (resync on a pack start code), pack stuffing, MPEG-1 pack and PES
headers, missing PSM (E0 defaults to H.264), PSM-less P-frames, PES length 0,
frames split over many PES, per-NAL PES with a repeated PTS, and Hikvision's
truncated pack header (`00 00 01 BA` followed directly by `00 00 01 E0`).

Frame boundaries, in order of precedence:
1. a video PES carrying a PTS starts a new frame, unless it is in the same pack
   as the open frame and repeats its PTS (one PES per NAL unit);
2. a video PES without PTS continues the open frame (frames > 64 KB), except
   in PTS-less streams, where a pack header starts a new frame (C.1);
3. an audio PES is a frame of its own and closes the open video frame, since
   audio travels in its own pack (C.1);
4. `flush()` closes the open frame. Call it after feeding a complete RTP frame
   to get that frame at once instead of when the next one starts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import nal

__all__ = [
    "PsError",
    "PsFrame",
    "PsMuxer",
    "PsDemuxer",
    "crc32_mpeg2",
    "STREAM_TYPES",
]

# ISO 13818-1 Table 2-18 stream_id values used by GB/T 28181 (Annex C).
PACK_START = b"\x00\x00\x01\xba"
_START = b"\x00\x00\x01"
SID_PROGRAM_END = 0xB9
SID_PACK = 0xBA
SID_SYSTEM = 0xBB
SID_PSM = 0xBC
SID_VIDEO = 0xE0
SID_AUDIO = 0xC0

# PSM stream_type -> codec. GB/T 28181-2016 C.2 (0x1B, 0x90) and 2022 (0x24, 0x91);
# 0x10/0x80/0x92/0x93/0x99/0x9B/0x0F are recognised only as "unknown" payloads.
STREAM_TYPES = {0x1B: "h264", 0x24: "h265", 0x90: "g711a", 0x91: "g711u"}
_CODEC_STREAM_TYPE = {v: k for k, v in STREAM_TYPES.items()}
_VIDEO_CODECS = ("h264", "h265")
_AUDIO_CODECS = ("g711a", "g711u")

_MAX_PTS = 1 << 33  # PTS/DTS/SCR are 33-bit, 90 kHz (2.4.3.7)
# PES_packet_length counts the bytes after it (2.4.3.7), so it is 16 bits at most;
# IRE caps PES at 0xFF80, we keep whole PES packets within 0xFF00 bytes.
_MAX_PES_LENGTH = 0xFF00
# 6106 x 50 B/s is what IRE and camera firmware write in the pack header.
DEFAULT_MUX_RATE = 6106
# The SCR runs ahead of the DTS by 40 ms, like IRE, so a decoder buffers one frame.
_SCR_LEAD = 3600

_U16 = struct.Struct("!H")


class PsError(ValueError):
    """Invalid arguments to the PS muxer (the demuxer never raises on input)."""


@dataclass(slots=True)
class PsFrame:
    """One demuxed elementary-stream frame with 90 kHz timestamps."""

    stream: str  # "video" | "audio"
    codec: str  # "h264" | "h265" | "g711a" | "g711u" | "unknown"
    data: bytes  # Annex-B access unit for video, raw samples for audio
    pts: int | None
    dts: int | None
    keyframe: bool = False
    stream_id: int = SID_VIDEO


# -- CRC32/MPEG-2 (ISO 13818-1 Annex A: poly 0x04C11DB7, init ~0, no reflection) --


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else (c << 1)
        table.append(c & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc_table()


def crc32_mpeg2(data: bytes) -> int:
    """CRC32 as used by PSI sections and the PSM (ISO 13818-1 Annex A)."""
    crc = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[(crc >> 24) ^ b]
    return crc


# -- muxer --------------------------------------------------------------------


def _ts_bytes(prefix: int, ts: int) -> bytes:
    """5-byte PTS/DTS field (2.4.3.7): prefix nibble, 33 bits, marker bits."""
    ts %= _MAX_PTS
    return bytes(
        (
            (prefix << 4) | ((ts >> 29) & 0x0E) | 1,
            (ts >> 22) & 0xFF,
            ((ts >> 14) & 0xFE) | 1,
            (ts >> 7) & 0xFF,
            ((ts << 1) & 0xFE) | 1,
        )
    )


def _pack_header(scr: int, mux_rate: int) -> bytes:
    """14-byte MPEG-2 pack header (2.5.3.3) with SCR extension 0 and no stuffing."""
    scr %= _MAX_PTS
    return bytes(
        (
            0,
            0,
            1,
            SID_PACK,
            0x44 | ((scr >> 27) & 0x38) | ((scr >> 28) & 0x03),
            (scr >> 20) & 0xFF,
            ((scr >> 12) & 0xF8) | 0x04 | ((scr >> 13) & 0x03),
            (scr >> 5) & 0xFF,
            ((scr << 3) & 0xF8) | 0x04,  # SCR[4:0], marker, SCR_ext[8:7]=0
            0x01,  # SCR_ext[6:0]=0, marker
            (mux_rate >> 14) & 0xFF,
            (mux_rate >> 6) & 0xFF,
            ((mux_rate << 2) & 0xFC) | 0x03,
            0xF8,  # reserved + pack_stuffing_length 0
        )
    )


class PsMuxer:
    """Build GB/T 28181 PS packets: one per video frame, one per audio frame.

    Keyframes get pack header + system header + PSM + video PES (C.1); other
    frames only pack header + PES. Frames larger than one PES are split into
    consecutive PES packets, only the first carrying PTS/DTS.
    """

    __slots__ = ("video_codec", "audio_codec", "mux_rate", "_system_header", "_psm", "psm_version")

    def __init__(
        self,
        video_codec: str = "h264",
        audio_codec: str | None = None,
        *,
        mux_rate: int = DEFAULT_MUX_RATE,
        psm_version: int = 0,
    ) -> None:
        if video_codec not in _VIDEO_CODECS:
            raise PsError(f"unsupported video codec {video_codec!r}")
        if audio_codec is not None and audio_codec not in _AUDIO_CODECS:
            raise PsError(f"unsupported audio codec {audio_codec!r}")
        if not 0 < mux_rate < (1 << 22):
            raise PsError("mux_rate must fit in 22 bits")
        self.video_codec = video_codec
        self.audio_codec = audio_codec
        self.mux_rate = mux_rate
        self.psm_version = psm_version & 0x1F
        self._system_header = self._build_system_header()
        self._psm = self._build_psm()

    def _build_system_header(self) -> bytes:
        # 2.5.3.5; same layout as the camera firmware example in PROTOCOL.md 6.1.
        streams = [bytes((SID_VIDEO, 0xE0, 0xE8))]  # P-STD scale 1, 232 x 1024 B
        if self.audio_codec:
            streams.append(bytes((SID_AUDIO, 0xC0, 0x20)))  # scale 0, 32 x 128 B
        rate = self.mux_rate
        body = bytes(
            (
                0x80 | ((rate >> 15) & 0x7F),
                (rate >> 7) & 0xFF,
                ((rate << 1) & 0xFE) | 1,
                (1 if self.audio_codec else 0) << 2,  # audio_bound, fixed=0, CSPS=0
                0xE1,  # audio/video lock, marker, video_bound=1
                0x7F,  # packet_rate_restriction=0, reserved
            )
        ) + b"".join(streams)
        return b"\x00\x00\x01\xbb" + _U16.pack(len(body)) + body

    def _build_psm(self) -> bytes:
        # 2.5.4.1; computed once per muxer, so the bitwise CRC costs nothing per frame.
        entries = [bytes((_CODEC_STREAM_TYPE[self.video_codec], SID_VIDEO, 0, 0))]
        if self.audio_codec:
            entries.append(bytes((_CODEC_STREAM_TYPE[self.audio_codec], SID_AUDIO, 0, 0)))
        es_map = b"".join(entries)
        body = (
            bytes((0x80 | 0x20 | self.psm_version, 0xFF))  # current_next=1, reserved, marker
            + _U16.pack(0)  # program_stream_info_length
            + _U16.pack(len(es_map))
            + es_map
        )
        head = b"\x00\x00\x01\xbc" + _U16.pack(len(body) + 4) + body
        return head + crc32_mpeg2(head).to_bytes(4, "big")

    def _pes(self, sid: int, payload: bytes | memoryview, pts: int, dts: int | None, parts: list) -> None:
        if dts is None or dts == pts:
            ts_fields = b"\x80\x80\x05" + _ts_bytes(0x2, pts)
        else:
            ts_fields = b"\x80\xc0\x0a" + _ts_bytes(0x3, pts) + _ts_bytes(0x1, dts)
        mv = memoryview(payload)
        n = len(mv)
        first = min(n, _MAX_PES_LENGTH - len(ts_fields))
        parts.append(b"\x00\x00\x01" + bytes((sid,)) + _U16.pack(len(ts_fields) + first) + ts_fields)
        parts.append(mv[:first])
        # Continuation PES: no PTS, so demuxers join them to the frame (C.1).
        step = _MAX_PES_LENGTH - 3
        for off in range(first, n, step):
            chunk = mv[off : off + step]
            parts.append(b"\x00\x00\x01" + bytes((sid,)) + _U16.pack(3 + len(chunk)) + b"\x80\x00\x00")
            parts.append(chunk)

    def mux_video(
        self, access_unit: bytes | memoryview, pts: int, dts: int | None = None, keyframe: bool = False
    ) -> bytes:
        """One PS packet for one Annex-B access unit (timestamps in 90 kHz)."""
        scr = (dts if dts is not None else pts) - _SCR_LEAD
        parts: list = [_pack_header(scr, self.mux_rate)]
        if keyframe:
            parts.append(self._system_header)
            parts.append(self._psm)
        self._pes(SID_VIDEO, access_unit, pts, dts, parts)
        return b"".join(parts)

    def mux_audio(self, frame: bytes | memoryview, pts: int) -> bytes:
        """One PS packet (pack header + C0 PES) for one audio frame."""
        if self.audio_codec is None:
            raise PsError("muxer was created without an audio codec")
        parts: list = [_pack_header(pts - _SCR_LEAD, self.mux_rate)]
        self._pes(SID_AUDIO, frame, pts, None, parts)
        return b"".join(parts)


# -- demuxer ------------------------------------------------------------------


def _read_ts(b: bytes | memoryview, off: int) -> int:
    """33-bit PTS/DTS from the 5-byte field at off (marker bits ignored)."""
    return (
        ((b[off] & 0x0E) << 29)
        | (b[off + 1] << 22)
        | ((b[off + 2] & 0xFE) << 14)
        | (b[off + 3] << 7)
        | (b[off + 4] >> 1)
    )


class _OpenFrame:
    __slots__ = ("sid", "pts", "dts", "chunks", "size", "pack", "dropped")

    def __init__(self, sid: int, pts: int | None, dts: int | None, pack: int) -> None:
        self.sid = sid
        self.pts = pts
        self.dts = dts
        self.chunks: list = []
        self.size = 0
        self.pack = pack  # pack counter value when the frame started
        # Oversized: its bytes are discarded, but it stays open so that its
        # continuation PES are recognised and skipped rather than taken as frames.
        self.dropped = False


# What the parser is doing with the bytes at the current position.
_HEADERS = 0  # expecting a start code
_PAYLOAD = 1  # inside a PES/packet with a known number of bytes left
_UNBOUNDED = 2  # inside a length-0 video PES: runs to the next system start code


class PsDemuxer:
    """Incremental PS demuxer: `feed(bytes) -> [PsFrame]`, `flush() -> [PsFrame]`.

    Memory is bounded: held header bytes never exceed one PSM/system packet
    (64 KiB), and a frame growing past `max_frame_size` is dropped
    (`oversized`) with the rest of its payload skipped. Counters: `frames`,
    `resyncs` (runs of garbage skipped to find a pack header), `dropped_bytes`,
    `oversized`, `truncated` (frames dropped because a PES was cut short: a
    pack header inside video PES payload, or flush() in the middle of a PES).
    `codecs` maps stream_id to codec from the last PSM.
    """

    __slots__ = (
        "max_frame_size",
        "codecs",
        "_tail",
        "_tail_len",
        "_need",
        "_state",
        "_left",
        "_target",
        "_frame",
        "_pack",
        "_in_garbage",
        "frames",
        "resyncs",
        "dropped_bytes",
        "oversized",
        "truncated",
        "psm_seen",
    )

    def __init__(self, max_frame_size: int = 4 << 20) -> None:
        self.max_frame_size = max_frame_size
        # stream_id -> codec from the last PSM; E0 is H.264 until a PSM says otherwise.
        self.codecs: dict[int, str] = {SID_VIDEO: "h264"}
        # Unparsed bytes kept between feeds (an incomplete header), as a list so
        # that a large PSM arriving in pieces is joined once; `_need` is how many
        # bytes the header needs in total, when known.
        self._tail: list[bytes] = []
        self._tail_len = 0
        self._need = 0
        self._state = _HEADERS
        self._left = 0  # payload bytes left in the current PES/packet
        self._target: _OpenFrame | None = None  # where payload bytes go (None = skip)
        self._frame: _OpenFrame | None = None  # open video frame
        self._pack = 0  # pack headers seen; tells which pack a PES belongs to
        self._in_garbage = False
        self.frames = 0
        self.resyncs = 0
        self.dropped_bytes = 0
        self.oversized = 0
        self.truncated = 0
        self.psm_seen = False

    @property
    def buffered(self) -> int:
        """Bytes held by the demuxer: unparsed tail plus open frames."""
        n = self._tail_len
        f, t = self._frame, self._target
        if f is not None and not f.dropped:
            n += f.size
        if t is not None and t is not f and not t.dropped:
            n += t.size
        return n

    # -- public API --

    def feed(self, data: bytes | bytearray | memoryview) -> list[PsFrame]:
        """Add the PS bytes of one or more consecutive RTP payloads."""
        if type(data) is not bytes:
            data = bytes(data)
        if self._tail:
            self._tail.append(data)
            self._tail_len += len(data)
            if self._tail_len < self._need:
                return []
            data = b"".join(self._tail)
            self._tail = []
            self._tail_len = self._need = 0
        out: list[PsFrame] = []
        if data:
            self._parse(data, out)
        return out

    def flush(self) -> list[PsFrame]:
        """Emit the open frame (end of stream or end of an RTP frame) and reset
        the byte parser; codec knowledge from the PSM is kept."""
        out: list[PsFrame] = []
        if self._state == _UNBOUNDED and self._tail:
            # The held bytes were only kept in case they began a start code.
            self._append(b"".join(self._tail))
        elif self._state == _PAYLOAD and self._left and self._target is not None:
            # A PES cut short: the frame is incomplete, do not hand it out.
            self.truncated += 1
            if self._target is self._frame:
                self._frame = None
        self._set_tail(b"")
        self._state = _HEADERS
        self._left = 0
        self._target = None
        self._close_video(out)
        return out

    # -- parsing --

    def _set_tail(self, rest: bytes, need: int = 0) -> None:
        self._tail = [rest] if rest else []
        self._tail_len = len(rest)
        self._need = need

    def _parse(self, data: bytes, out: list[PsFrame]) -> None:
        n = len(data)
        mv = memoryview(data)
        pos = 0
        find = data.find
        while pos < n:
            state = self._state
            if state == _PAYLOAD:
                take = min(self._left, n - pos)
                target = self._target
                if target is not None:
                    end = pos + take
                    if (
                        target.sid >= SID_VIDEO
                        and self.codecs.get(target.sid) in _VIDEO_CODECS
                        # A PES that ends in this buffer right before a start code (the
                        # next PES or pack, ISO/IEC 13818-1 2.5.3) or at its end, as a whole
                        # RTP frame does (GB/T 28181 C.1), was not cut short: no scan.
                        and not (take == self._left and (end == n or data.startswith(_START, end)))
                    ):
                        # A pack start code cannot occur inside H.264/H.265 data
                        # (NAL header bytes are < 0x80): if one shows up, the rest of
                        # this PES was lost in transit and a new packet begins here.
                        cut = find(PACK_START, pos, end)
                        if cut >= 0:
                            self.truncated += 1
                            target.dropped = True
                            self._target = None
                            self._left = 0
                            self._state = _HEADERS
                            pos = cut
                            continue
                    self._append(mv[pos:end])
                self._left -= take
                pos += take
                if self._left == 0:
                    self._state = _HEADERS
                    self._end_pes(out)
                continue
            if state == _UNBOUNDED:
                end = self._find_system_start(data, pos)
                if end < 0:
                    # Keep 3 bytes back: they may begin the next start code.
                    keep = max(pos, n - 3)
                    if keep > pos:
                        self._append(mv[pos:keep])
                    self._set_tail(data[keep:])
                    return
                if end > pos:
                    self._append(mv[pos:end])
                pos = end
                self._state = _HEADERS
                self._end_pes(out)
                continue
            # _HEADERS
            if n - pos < 4:
                self._set_tail(data[pos:])
                return
            if data[pos] != 0 or data[pos + 1] != 0 or data[pos + 2] != 1 or data[pos + 3] < SID_PROGRAM_END:
                pos = self._resync(data, pos)
                continue
            self._in_garbage = False
            self._need = 0
            sid = data[pos + 3]
            if sid == SID_PACK:
                used = self._pack_header(data, pos)
            elif 0xC0 <= sid <= 0xEF:  # audio C0-DF, video E0-EF (Table 2-18)
                used = self._pes_header(data, pos, sid, out)
            elif sid == SID_PSM:
                used = self._psm(data, pos)
            elif sid == SID_PROGRAM_END:
                used = 4
            else:
                # System header, private/padding streams (BD/BE/BF), ECM/EMM,
                # DSM-CC, ...: every one of them is length-prefixed; skip it.
                if n - pos < 6:
                    used = 0
                else:
                    self._left = (data[pos + 4] << 8) | data[pos + 5]
                    self._target = None
                    self._state = _PAYLOAD
                    used = 6
            if used == 0:  # header incomplete: wait for more bytes
                self._set_tail(data[pos:], self._need)
                return
            if used < 0:  # header invalid: look for the next pack
                pos = self._resync(data, pos + 1)
                continue
            pos += used
            if self._state == _PAYLOAD and self._left == 0:
                self._state = _HEADERS
                self._end_pes(out)
        # Consumed exactly: nothing to keep.

    def _resync(self, data: bytes, pos: int) -> int:
        """Skip to the next pack start code; returns the new position."""
        if not self._in_garbage:
            self._in_garbage = True
            self.resyncs += 1
        i = data.find(PACK_START, pos)
        if i < 0:
            # Keep up to 3 bytes: they may be the start of a pack start code.
            i = max(pos, len(data) - 3)
            self.dropped_bytes += i - pos
            self._set_tail(data[i:])
            return len(data)
        self.dropped_bytes += i - pos
        return i

    @staticmethod
    def _find_system_start(data: bytes, pos: int) -> int:
        """Next `00 00 01 xx` with xx >= 0xB9 (a PS-layer start code) at or after pos.

        NAL header bytes after an Annex-B start code are < 0x80 (forbidden_zero_bit),
        so this never stops inside an H.264/H.265 elementary stream.
        """
        find = data.find
        n = len(data)
        i = find(_START, pos)
        while i >= 0:
            if i + 3 >= n:
                return -1
            if data[i + 3] >= SID_PROGRAM_END:
                return i
            i = find(_START, i + 3)
        return -1

    def _pack_header(self, data: bytes, pos: int) -> int:
        n = len(data)
        if n - pos < 5:
            return 0
        b4 = data[pos + 4]
        if b4 == 0:
            # Hikvision H.265 quirk: the pack header stops after its start code
            # and the next start code (usually a PES) follows at once.
            if n - pos < 7:
                return 0
            if data[pos + 5] == 0 and data[pos + 6] == 1:
                self._pack += 1
                return 4
            return -1
        if b4 & 0xC0 == 0x40:  # MPEG-2 (2.5.3.3): 14 bytes + stuffing
            if n - pos < 14:
                return 0
            size = 14 + (data[pos + 13] & 0x07)  # pack_stuffing_length
            if n - pos < size:
                return 0
            self._pack += 1
            return size
        if b4 & 0xF0 == 0x20:  # MPEG-1 (ISO 11172-1 2.4.3.2): 12 bytes
            if n - pos < 12:
                return 0
            self._pack += 1
            return 12
        return -1

    def _psm(self, data: bytes, pos: int) -> int:
        n = len(data)
        if n - pos < 6:
            return 0
        length = (data[pos + 4] << 8) | data[pos + 5]
        end = pos + 6 + length
        if end > n:
            self._need = end - pos
            return 0
        # 2.5.4.1: flags(2) info_length(2) descriptors, es_map_length(2), entries,
        # CRC. The CRC is not checked: IRE does not, and writes it little-endian.
        p = pos + 8
        if p + 2 <= end:
            p += 2 + ((data[p] << 8) | data[p + 1])
            if p + 2 <= end:
                map_end = min(end, p + 2 + ((data[p] << 8) | data[p + 1]))
                p += 2
                codecs: dict[int, str] = {}
                while p + 4 <= map_end:
                    stream_type, es_id = data[p], data[p + 1]
                    codecs[es_id] = STREAM_TYPES.get(stream_type, "unknown")
                    p += 4 + ((data[p + 2] << 8) | data[p + 3])
                if codecs:
                    self.codecs = codecs
                    self.psm_seen = True
        return 6 + length

    def _pes_header(self, data: bytes, pos: int, sid: int, out: list[PsFrame]) -> int:
        n = len(data)
        if n - pos < 9:
            return 0
        length = (data[pos + 4] << 8) | data[pos + 5]
        pts = dts = None
        b6 = data[pos + 6]
        if b6 & 0xC0 == 0x80:  # MPEG-2 PES header (2.4.3.7)
            hlen = data[pos + 8]
            hend = pos + 9 + hlen
            if hend > n:
                return 0
            flags = data[pos + 7] & 0xC0
            if flags & 0x80 and hlen >= 5:
                pts = _read_ts(data, pos + 9)
                if flags == 0xC0 and hlen >= 10:
                    dts = _read_ts(data, pos + 14)
        else:  # MPEG-1 PES header (ISO 11172-1 2.4.3.3)
            p = pos + 6
            limit = min(n, p + 17)  # at most 16 stuffing bytes before the rest
            while p < limit and data[p] == 0xFF:
                p += 1
            if p + 1 > n:
                return 0
            if data[p] & 0xC0 == 0x40:  # STD_buffer fields
                p += 2
            if p + 1 > n:
                return 0
            top = data[p] & 0xF0
            if top == 0x20:
                if p + 5 > n:
                    return 0
                pts = _read_ts(data, p)
                p += 5
            elif top == 0x30:
                if p + 10 > n:
                    return 0
                pts = _read_ts(data, p)
                dts = _read_ts(data, p + 5)
                p += 10
            elif data[p] == 0x0F:
                p += 1
            else:
                return -1
            hend = p
        header_bytes = hend - pos - 6
        if length:
            if length < header_bytes:
                return -1
            self._left = length - header_bytes
            self._state = _PAYLOAD
        elif sid >= SID_VIDEO:
            # 2.4.3.7: length 0 is allowed for video; it runs to the next start code.
            self._state = _UNBOUNDED
            self._left = 0
        else:
            return -1
        self._start_pes(sid, pts, dts, out)
        return hend - pos

    # -- frame assembly --

    def _start_pes(self, sid: int, pts: int | None, dts: int | None, out: list[PsFrame]) -> None:
        if sid < SID_VIDEO:  # audio: a frame of its own (rule 3)
            self._close_video(out)
            self._target = _OpenFrame(sid, pts, dts, self._pack)
            return
        f = self._frame
        if f is not None:
            if f.sid != sid:
                new = True
            elif pts is not None:
                new = not (f.pack == self._pack and f.pts == pts)  # rule 1
            else:
                new = f.pts is None and f.pack != self._pack  # rule 2
            if new:
                self._close_video(out)
                f = None
        if f is None:
            f = self._frame = _OpenFrame(sid, pts, dts, self._pack)
        elif f.dts is None and dts is not None:
            f.dts = dts
        self._target = f

    def _append(self, chunk: bytes | memoryview) -> None:
        f = self._target
        if f is None or f.dropped:
            return
        f.size += len(chunk)
        if f.size > self.max_frame_size:
            self.oversized += 1
            f.dropped = True
            f.chunks = []
            return
        f.chunks.append(chunk)

    def _end_pes(self, out: list[PsFrame]) -> None:
        f = self._target
        self._target = None
        if f is not None and f.sid < SID_VIDEO and not f.dropped:
            data = b"".join(f.chunks)
            self.frames += 1
            out.append(PsFrame("audio", self.codecs.get(f.sid, "unknown"), data, f.pts, f.dts, False, f.sid))

    def _close_video(self, out: list[PsFrame]) -> None:
        f = self._frame
        if f is None:
            return
        self._frame = None
        if self._target is f:
            self._target = None
        if f.dropped or not f.chunks:
            return
        data = b"".join(f.chunks)
        codec = self.codecs.get(f.sid, "unknown")
        self.frames += 1
        out.append(PsFrame("video", codec, data, f.pts, f.dts, nal.is_keyframe(data, codec), f.sid))
