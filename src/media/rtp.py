"""RTP (RFC 3550) packets for PS-over-RTP media: parse, build, reorder, group.

Sans-IO stages for the receive path, in the order a stream flows through them:
`parse_rtp` turns a datagram (or a packet from `media.rtp_tcp.TcpRtpFramer`)
into an `RtpPacket`; `RtpReorderer` puts packets back in sequence order and
flags losses; `FrameAssembler` joins the payloads of one frame (GB/T 28181
Annex C.1: one PS packet per frame, all RTP packets of a frame share the
timestamp, marker on the last) into the bytes that `media.ps.PsDemuxer` reads.
The send path is `packetize`, which slices one PS packet into RTP packets.

Nothing here touches sockets or clocks; every limit is counted in packets or
bytes so that behaviour is deterministic and testable.
"""

from __future__ import annotations

import struct

__all__ = [
    "RtpError",
    "RtpPacket",
    "parse_rtp",
    "packetize",
    "RtpReorderer",
    "RtpFrame",
    "FrameAssembler",
    "RTP_HEADER_SIZE",
    "DEFAULT_MTU",
]

RTP_HEADER_SIZE = 12  # RFC 3550 5.1, fixed part
# GB/T 28181 C.1 / ZLM videoMtuSize: a whole RTP packet stays within 1400 bytes.
DEFAULT_MTU = 1400
# RFC 3550 A.1 constants for sequence validation.
MAX_DROPOUT = 3000
MAX_MISORDER = 100

_HDR = struct.Struct("!BBHII")
_pack_hdr = _HDR.pack
_unpack_hdr = _HDR.unpack_from
_EXT_HDR = struct.Struct("!HH")


class RtpError(ValueError):
    """A datagram is not a well-formed RTP packet."""


class RtpPacket:
    """One RTP packet (RFC 3550 5.1).

    `padding` is the number of padding octets (0 when the P bit is clear); they
    are stripped from `payload` on parse and re-added by `serialize`.
    `extension` is the header-extension data without its 4-byte preamble, or
    None; its 16-bit profile is `extension_profile`. `payload` is a slice of the
    parsed buffer (bytes for bytes input). `gap` is set by `RtpReorderer` to the
    number of packets missing just before this one; it is not on the wire.
    """

    __slots__ = (
        "version",
        "padding",
        "marker",
        "payload_type",
        "sequence",
        "timestamp",
        "ssrc",
        "csrc",
        "extension_profile",
        "extension",
        "payload",
        "gap",
    )

    def __init__(
        self,
        *,
        payload_type: int = 96,
        sequence: int = 0,
        timestamp: int = 0,
        ssrc: int = 0,
        marker: bool = False,
        payload: bytes | bytearray | memoryview = b"",
        csrc: list[int] | None = None,
        extension: bytes | None = None,
        extension_profile: int = 0,
        padding: int = 0,
        version: int = 2,
    ) -> None:
        self.version = version
        self.padding = padding
        self.marker = marker
        self.payload_type = payload_type
        self.sequence = sequence
        self.timestamp = timestamp
        self.ssrc = ssrc
        self.csrc = csrc if csrc is not None else []
        self.extension_profile = extension_profile
        self.extension = extension
        self.payload = payload
        self.gap = 0

    def __repr__(self) -> str:
        return (
            f"RtpPacket(pt={self.payload_type}, seq={self.sequence}, ts={self.timestamp}, "
            f"ssrc={self.ssrc}, marker={self.marker}, payload={len(self.payload)}B)"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RtpPacket):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__ if n != "gap")

    __hash__ = None  # type: ignore[assignment]  # mutable

    def serialize(self) -> bytes:
        """The packet as wire bytes."""
        csrc = self.csrc
        if len(csrc) > 15:
            raise RtpError("at most 15 CSRC identifiers fit in the CC field")
        if not 0 <= self.padding <= 255:
            raise RtpError("padding must be 0..255 octets")
        b0 = (self.version << 6) | len(csrc)
        if self.padding:
            b0 |= 0x20
        ext = self.extension
        if ext is not None:
            if len(ext) % 4 or len(ext) > 0xFFFF * 4:
                raise RtpError("header extension length must be a multiple of 4 bytes")
            b0 |= 0x10
        parts: list[bytes | bytearray | memoryview] = [
            _pack_hdr(
                b0,
                (0x80 if self.marker else 0) | (self.payload_type & 0x7F),
                self.sequence & 0xFFFF,
                self.timestamp & 0xFFFFFFFF,
                self.ssrc & 0xFFFFFFFF,
            )
        ]
        if csrc:
            parts.append(struct.pack(f"!{len(csrc)}I", *csrc))
        if ext is not None:
            parts.append(_EXT_HDR.pack(self.extension_profile, len(ext) // 4))
            parts.append(ext)
        parts.append(self.payload)
        if self.padding:
            parts.append(bytes(self.padding - 1) + bytes((self.padding,)))
        return b"".join(parts)


def parse_rtp(data: bytes | bytearray | memoryview) -> RtpPacket:
    """Parse one RTP packet; raises RtpError if it is short or malformed."""
    n = len(data)
    if n < RTP_HEADER_SIZE:
        raise RtpError(f"RTP packet too short: {n} bytes < 12-byte header")
    b0, b1, seq, ts, ssrc = _unpack_hdr(data)
    if b0 >> 6 != 2:
        raise RtpError(f"unsupported RTP version {b0 >> 6} (expected 2)")
    pkt = RtpPacket.__new__(RtpPacket)
    pkt.version = 2
    pkt.marker = b1 >= 0x80
    pkt.payload_type = b1 & 0x7F
    pkt.sequence = seq
    pkt.timestamp = ts
    pkt.ssrc = ssrc
    pkt.gap = 0
    if b0 & 0x3F == 0:
        # Fast path for what GB/T 28181 devices send (C.1): no CSRC, X or P.
        pkt.padding = 0
        pkt.csrc = []
        pkt.extension_profile = 0
        pkt.extension = None
        pkt.payload = data[RTP_HEADER_SIZE:]
        return pkt
    off = RTP_HEADER_SIZE
    cc = b0 & 0x0F
    if cc:
        off += 4 * cc
        if n < off:
            raise RtpError(f"RTP packet too short for {cc} CSRC identifiers: {n} bytes")
        pkt.csrc = list(struct.unpack_from(f"!{cc}I", data, RTP_HEADER_SIZE))
    else:
        pkt.csrc = []
    if b0 & 0x10:
        if n < off + 4:
            raise RtpError("RTP packet too short for its header extension")
        profile, words = _EXT_HDR.unpack_from(data, off)
        off += 4
        end = off + 4 * words
        if n < end:
            raise RtpError(f"RTP header extension of {4 * words} bytes overruns the packet")
        pkt.extension_profile = profile
        pkt.extension = bytes(data[off:end])
        off = end
    else:
        pkt.extension_profile = 0
        pkt.extension = None
    end = n
    if b0 & 0x20:
        # RFC 3550 5.1: the last octet counts the padding, itself included.
        pad = data[n - 1]
        if pad == 0 or off + pad > n:
            raise RtpError(f"invalid RTP padding length {pad}")
        end = n - pad
        pkt.padding = pad
    else:
        pkt.padding = 0
    pkt.payload = data[off:end]
    return pkt


def packetize(
    payload: bytes | memoryview,
    *,
    ssrc: int,
    seq: int,
    timestamp: int,
    payload_type: int = 96,
    mtu: int = DEFAULT_MTU,
) -> tuple[list[bytes], int]:
    """Slice one PS packet (one frame) into RTP packets of at most `mtu` bytes.

    GB/T 28181 C.1: raw consecutive slices, one timestamp for the whole frame,
    marker on the last packet, sequence +1 per packet. Returns the packets and
    the sequence number to use next (mod 2^16). An empty payload yields nothing.
    """
    chunk = mtu - RTP_HEADER_SIZE
    if chunk <= 0:
        raise ValueError(f"mtu {mtu} leaves no room for payload")
    n = len(payload)
    if n == 0:
        return [], seq & 0xFFFF
    mv = memoryview(payload)
    ts = timestamp & 0xFFFFFFFF
    ssrc &= 0xFFFFFFFF
    pt = payload_type & 0x7F
    seq &= 0xFFFF
    last = (n - 1) // chunk * chunk
    out: list[bytes] = []
    append = out.append
    for off in range(0, last, chunk):
        append(_pack_hdr(0x80, pt, seq, ts, ssrc) + mv[off : off + chunk])
        seq = (seq + 1) & 0xFFFF
    append(_pack_hdr(0x80, pt | 0x80, seq, ts, ssrc) + mv[last:])
    return out, (seq + 1) & 0xFFFF


class RtpReorderer:
    """Reorder buffer keyed on 16-bit sequence numbers (with wraparound).

    A packet is held until the ones before it arrive, or until a packet
    `window` sequence numbers ahead arrives: then the missing ones are given up
    as lost (`lost` grows and the next emitted packet's `gap` says how many were
    skipped). So the extra delay is at most `window` packets and memory at most
    `window` packets. Dropped packets are counted: `duplicates` (already held)
    and `late` (behind the playout point: already emitted or given up). A jump
    of more than MAX_DROPOUT, confirmed by a second packet in sequence (RFC 3550
    A.1 probation), is treated as a sender restart: buffered packets are flushed
    and ordering restarts from the new number.
    """

    __slots__ = (
        "window",
        "_next",
        "_buf",
        "_pending_gap",
        "_probation",
        "received",
        "emitted",
        "lost",
        "duplicates",
        "late",
        "resets",
    )

    def __init__(self, window: int = 32) -> None:
        if not 1 <= window <= MAX_DROPOUT:
            raise ValueError(f"window must be 1..{MAX_DROPOUT} packets")
        self.window = window
        self._next: int | None = None  # next sequence number to emit
        self._buf: dict[int, RtpPacket] = {}
        self._pending_gap = 0
        self._probation: RtpPacket | None = None
        self.received = 0
        self.emitted = 0
        self.lost = 0
        self.duplicates = 0
        self.late = 0
        self.resets = 0

    @property
    def buffered(self) -> int:
        """Packets held waiting for an earlier one."""
        return len(self._buf)

    def push(self, packet: RtpPacket) -> list[RtpPacket]:
        """Add a packet; returns the packets that are now ready, in order."""
        self.received += 1
        seq = packet.sequence
        nxt = self._next
        if nxt is None:
            self._next = nxt = seq
        delta = (seq - nxt) & 0xFFFF
        if delta == 0 and not self._buf:
            # In-order packet with nothing held: the common case, no dict work.
            self._probation = None
            self._next = (seq + 1) & 0xFFFF
            self.emitted += 1
            if self._pending_gap:
                packet.gap = self._pending_gap
                self._pending_gap = 0
            return [packet]
        out: list[RtpPacket] = []
        if delta < self.window:
            self._probation = None
            if seq in self._buf:
                self.duplicates += 1
                return out
            self._buf[seq] = packet
        elif delta < MAX_DROPOUT:
            # Ahead of the window: give up on the oldest missing packets.
            self._probation = None
            self._advance_to((seq - self.window + 1) & 0xFFFF, out)
            self._buf[seq] = packet
        elif delta < 0x10000 - MAX_MISORDER:
            # A large jump either way: a restarted sender, or a stray packet.
            prev = self._probation
            if prev is not None and ((prev.sequence + 1) & 0xFFFF) == seq:
                self._restart(prev, out)
                self._buf[seq] = packet
            else:
                self._probation = packet
                return out
        else:
            # Behind the playout point: a duplicate or a packet given up on.
            self._probation = None
            self.late += 1
            return out
        self._drain(out)
        return out

    def flush(self) -> list[RtpPacket]:
        """Emit everything held, in order, counting the holes as lost."""
        out: list[RtpPacket] = []
        nxt = self._next
        if self._buf and nxt is not None:
            last = max(self._buf, key=lambda s: (s - nxt) & 0xFFFF)
            self._advance_to((last + 1) & 0xFFFF, out)
        return out

    def _emit(self, packet: RtpPacket, out: list[RtpPacket]) -> None:
        if self._pending_gap:
            packet.gap = self._pending_gap
            self._pending_gap = 0
        self.emitted += 1
        out.append(packet)

    def _drain(self, out: list[RtpPacket]) -> None:
        buf = self._buf
        nxt = self._next
        while nxt in buf:
            self._emit(buf.pop(nxt), out)
            nxt = (nxt + 1) & 0xFFFF
        self._next = nxt

    def _advance_to(self, target: int, out: list[RtpPacket]) -> None:
        """Emit held packets before `target`, counting missing ones as lost."""
        buf = self._buf
        nxt = self._next
        assert nxt is not None
        span = (target - nxt) & 0xFFFF
        if not buf:
            self.lost += span
            self._pending_gap += span
            self._next = target
            return
        for _ in range(span):
            pkt = buf.pop(nxt, None)
            if pkt is None:
                self.lost += 1
                self._pending_gap += 1
            else:
                self._emit(pkt, out)
            nxt = (nxt + 1) & 0xFFFF
        self._next = nxt
        self._drain(out)

    def _restart(self, first: RtpPacket, out: list[RtpPacket]) -> None:
        out.extend(self.flush())
        self.resets += 1
        self._buf.clear()
        self._probation = None
        # A discontinuity, not a measurable loss: flag it with gap=1.
        self._pending_gap = max(self._pending_gap, 1)
        self._next = first.sequence
        self._buf[first.sequence] = first


class RtpFrame:
    """The joined RTP payloads of one frame (one PS packet in GB/T 28181).

    `damaged` is True when a sequence gap may have removed part of it;
    `marker` tells whether the marker bit closed it (else a timestamp change or
    flush did).
    """

    __slots__ = ("timestamp", "payload", "damaged", "marker", "packets", "first_sequence")

    def __init__(
        self,
        timestamp: int,
        payload: bytes,
        damaged: bool,
        marker: bool,
        packets: int,
        first_sequence: int,
    ) -> None:
        self.timestamp = timestamp
        self.payload = payload
        self.damaged = damaged
        self.marker = marker
        self.packets = packets
        self.first_sequence = first_sequence

    def __repr__(self) -> str:
        return (
            f"RtpFrame(ts={self.timestamp}, {len(self.payload)}B, packets={self.packets}, "
            f"damaged={self.damaged}, marker={self.marker})"
        )


class FrameAssembler:
    """Group in-order RTP packets into frames.

    A frame ends when the timestamp changes (GB/T 28181 C.1 and ZLM
    `CommonRtpDecoder` split on timestamp, since markers get lost), or early on
    a packet with the marker bit. A `gap` on an incoming packet damages the
    frame it lands in; if it arrives with a new timestamp while the previous
    frame was not closed by a marker, the lost packets could belong to either
    frame, so both are marked damaged. A frame growing past `max_frame_size`
    is discarded (counted in `oversized`), so memory stays bounded.
    """

    __slots__ = (
        "max_frame_size",
        "_chunks",
        "_size",
        "_ts",
        "_damaged",
        "_first_seq",
        "_count",
        "_discarding",
        "frames",
        "damaged_frames",
        "oversized",
    )

    def __init__(self, max_frame_size: int = 4 << 20) -> None:
        self.max_frame_size = max_frame_size
        self._chunks: list = []
        self._ts: int | None = None  # timestamp of the open frame
        self._size = 0
        self._damaged = False
        self._first_seq = 0
        self._count = 0
        self._discarding = False
        self.frames = 0
        self.damaged_frames = 0
        self.oversized = 0

    def push(self, packet: RtpPacket) -> list[RtpFrame]:
        """Add the next in-order packet; returns frames completed by it (0 to 2)."""
        out: list[RtpFrame] = []
        ts = packet.timestamp
        if self._ts is not None and ts != self._ts:
            if packet.gap:
                self._damaged = True
            frame = self._close(False)
            if frame is not None:
                out.append(frame)
        if self._ts is None:
            self._ts = ts
            self._first_seq = packet.sequence
            self._damaged = bool(packet.gap)
        elif packet.gap:
            self._damaged = True
        self._count += 1
        if not self._discarding:
            payload = packet.payload
            self._size += len(payload)
            if self._size > self.max_frame_size:
                self._discarding = True
                self._chunks = []
            else:
                self._chunks.append(payload)
        if packet.marker:
            frame = self._close(True)
            if frame is not None:
                out.append(frame)
        return out

    def flush(self) -> list[RtpFrame]:
        """Close the open frame, if any (end of stream)."""
        if self._ts is not None:
            frame = self._close(False)
            if frame is not None:
                return [frame]
        return []

    def _close(self, marker: bool) -> RtpFrame | None:
        """End the open frame; None if it was discarded as oversized."""
        frame = None
        if self._discarding:
            self.oversized += 1
        else:
            chunks = self._chunks
            payload = chunks[0] if len(chunks) == 1 and type(chunks[0]) is bytes else b"".join(chunks)
            self.frames += 1
            if self._damaged:
                self.damaged_frames += 1
            frame = RtpFrame(self._ts, payload, self._damaged, marker, self._count, self._first_seq)  # type: ignore[arg-type]
        self._chunks = []
        self._size = 0
        self._count = 0
        self._ts = None
        self._damaged = False
        self._discarding = False
        return frame
