"""RTP over TCP framing (GB/T 28181 Annex L, RFC 4571, RTSP interleaved).

Sits between a TCP stream and `media.rtp.parse_rtp`: `TcpRtpFramer.feed`
takes whatever the socket delivered (many packets per segment or one packet
over many segments) and returns whole RTP packets. Annex L prescribes the
RFC 4571 form, a 2-byte big-endian length before each packet; like ZLMediaKit's
`RtpSplitter` we also accept the RTSP interleaved form (RFC 2326 10.12:
`$`, channel, 2-byte length), chosen once by the first byte of the stream
(0x24). On a length that cannot be RTP, or a frame whose first byte is not
RTP version 2, the framer either raises `RtpFramingError` (strict) or drops
bytes until a plausible header and counts the event (default), so a peer
cannot make it buffer more than one maximal frame.
The send side is `frame_rfc4571` (or `frame_interleaved`).
"""

from __future__ import annotations

import re
import struct

from .rtp import RTP_HEADER_SIZE

__all__ = ["RtpFramingError", "TcpRtpFramer", "frame_rfc4571", "frame_interleaved", "MAX_RTP_SIZE"]

MAX_RTP_SIZE = 0xFFFF  # RFC 4571 2: the length field is 16 bits
_INTERLEAVED_MAGIC = 0x24  # '$', RFC 2326 10.12
_U16 = struct.Struct("!H")
_unpack_u16 = _U16.unpack_from
# RTCP may share the connection (an odd interleaved channel, or muxed as in
# RFC 5761 4, told apart by packet types 192..223); its packets can be 4 bytes.
_RTCP_TYPES = (192, 223)
_MIN_RTCP_SIZE = 4
_V2_BYTE = re.compile(rb"[\x80-\xbf]")  # RTP V=2 in the top two bits (RFC 3550 5.1)


class RtpFramingError(ValueError):
    """The TCP byte stream does not carry well-framed RTP packets."""


def frame_rfc4571(packet: bytes | memoryview) -> bytes:
    """Prefix an RTP packet with its RFC 4571 2-byte length."""
    n = len(packet)
    if not 0 < n <= MAX_RTP_SIZE:
        raise RtpFramingError(f"cannot frame a {n}-byte packet in RFC 4571 (1..65535)")
    return _U16.pack(n) + packet


def frame_interleaved(packet: bytes | memoryview, channel: int = 0) -> bytes:
    """Prefix an RTP packet with the RTSP interleaved header `$`, channel, length."""
    n = len(packet)
    if not 0 < n <= MAX_RTP_SIZE:
        raise RtpFramingError(f"cannot frame a {n}-byte packet (1..65535)")
    return bytes((_INTERLEAVED_MAGIC, channel & 0xFF)) + _U16.pack(n) + packet


class TcpRtpFramer:
    """Split a TCP byte stream into RTP packets.

    `mode` is None until the first byte is seen, then "rfc4571" or
    "interleaved". RTCP packets on the connection are counted in `rtcp` and
    not returned. With `channels` set, interleaved frames on other channels are
    dropped and counted in `skipped`. `max_packet_size` bounds the accepted
    length (and so the buffer); `strict=True` raises RtpFramingError on a bad
    frame instead of resynchronising (the connection is then unusable: close
    it). Counters: `packets`, `resyncs` (times bytes were dropped to find a
    header), `dropped_bytes`, `skipped`, `rtcp`.
    """

    __slots__ = (
        "mode",
        "strict",
        "max_packet_size",
        "channels",
        "_parts",
        "_have",
        "_need",
        "packets",
        "resyncs",
        "dropped_bytes",
        "skipped",
        "rtcp",
    )

    def __init__(
        self,
        *,
        mode: str | None = None,
        max_packet_size: int = MAX_RTP_SIZE,
        strict: bool = False,
        channels: frozenset[int] | set[int] | None = None,
    ) -> None:
        if mode not in (None, "rfc4571", "interleaved"):
            raise ValueError(f"unknown mode {mode!r}")
        if not RTP_HEADER_SIZE <= max_packet_size <= MAX_RTP_SIZE:
            raise ValueError("max_packet_size must be 12..65535")
        self.mode = mode
        self.strict = strict
        self.max_packet_size = max_packet_size
        self.channels = frozenset(channels) if channels is not None else None
        # Bytes of an incomplete frame, kept as a list so that a large packet
        # arriving in many segments is joined once, not once per segment.
        self._parts: list[bytes] = []
        self._have = 0
        self._need = 0  # bytes required before parsing can make progress
        self.packets = 0
        self.resyncs = 0
        self.dropped_bytes = 0
        self.skipped = 0
        self.rtcp = 0

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame (at most max_packet_size + 3)."""
        return self._have

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add received bytes; returns the complete RTP packets, in order."""
        if type(data) is not bytes:
            data = bytes(data)
        if not data:
            return []
        if self._parts:
            self._parts.append(data)
            self._have += len(data)
            if self._have < self._need:
                return []
            data = b"".join(self._parts)
            self._parts = []
        if self.mode is None:
            self.mode = "interleaved" if data[0] == _INTERLEAVED_MAGIC else "rfc4571"
        out: list[bytes] = []
        if self.mode == "rfc4571":
            pos, need = self._feed_rfc4571(data, out)
        else:
            pos, need = self._feed_interleaved(data, out)
        n = len(data)
        if pos < n:
            self._parts = [data[pos:] if pos else data]
            self._have = n - pos
            self._need = need
        else:
            self._have = self._need = 0
        self.packets += len(out)
        return out

    def _bad(self, why: str) -> None:
        if self.strict:
            raise RtpFramingError(why)
        self.resyncs += 1

    def _feed_rfc4571(self, data: bytes, out: list[bytes]) -> tuple[int, int]:
        """Parse frames from data; returns (bytes consumed, bytes needed to go on)."""
        n = len(data)
        pos = 0
        hi = self.max_packet_size
        append = out.append
        while pos + 2 <= n:
            length = _unpack_u16(data, pos)[0]
            body = pos + 2
            if _MIN_RTCP_SIZE <= length <= hi and (body >= n or data[body] >> 6 == 2):
                end = body + length
                if end > n:
                    return pos, end - pos
                if _RTCP_TYPES[0] <= data[body + 1] <= _RTCP_TYPES[1]:
                    self.rtcp += 1
                    pos = end
                    continue
                if length >= RTP_HEADER_SIZE:
                    append(data[body:end])
                    pos = end
                    continue
            self._bad(f"RFC 4571 frame length {length} or RTP version byte not plausible")
            # Next candidate: a byte that looks like an RTP version-2 first byte,
            # two bytes after a length field.
            m = _V2_BYTE.search(data, pos + 3)
            skip_to = m.start() - 2 if m else max(n - 2, pos + 1)
            self.dropped_bytes += skip_to - pos
            pos = skip_to
        return pos, 2

    def _feed_interleaved(self, data: bytes, out: list[bytes]) -> tuple[int, int]:
        """Parse frames from data; returns (bytes consumed, bytes needed to go on)."""
        n = len(data)
        pos = 0
        lo, hi = RTP_HEADER_SIZE, self.max_packet_size
        channels = self.channels
        append = out.append
        while pos + 4 <= n:
            if data[pos] == _INTERLEAVED_MAGIC:
                length = _unpack_u16(data, pos + 2)[0]
                if _MIN_RTCP_SIZE <= length <= hi:
                    end = pos + 4 + length
                    if end > n:
                        return pos, end - pos
                    if channels is not None and data[pos + 1] not in channels:
                        self.skipped += 1
                    elif _RTCP_TYPES[0] <= data[pos + 5] <= _RTCP_TYPES[1]:
                        self.rtcp += 1
                    elif length >= lo:
                        append(data[pos + 4 : end])
                    else:
                        self.skipped += 1
                    pos = end
                    continue
            self._bad(f"RTSP interleaved frame header {data[pos:pos + 4].hex()} not plausible")
            nxt = data.find(b"$", pos + 1)
            skip_to = nxt if nxt >= 0 else n
            self.dropped_bytes += skip_to - pos
            pos = skip_to
        return pos, 4
