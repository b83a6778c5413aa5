"""Media ingest: RTP packets of one stream in, clean `MediaPacket`s out.

`RtpIngest` chains the sans-IO stages of the receive path for one device stream:
`parse_rtp` -> `RtpReorderer` -> `FrameAssembler` -> one `PsDemuxer` (fed and
flushed once per RTP frame, i.e. per PS packet, GB/T 28181 C.1) -> the
`on_packet` callback (the stream hub). `media.receiver` feeds it from sockets;
tests and benchmarks feed it bytes directly. It owns the stream's
`StreamStats`.

The one policy decided here is what a consumer may see after a loss. A decoder
fed a P-frame whose reference was lost shows smeared garbage until the next
IDR, and every viewer of the hub would see it, so after any loss (a sequence
gap, a frame damaged by one, a PS packet cut short, an oversized frame) no video
is handed over until the next keyframe; the withheld frames are counted in
`stats.dropped_until_keyframe`. The stream also starts gated: a device that
was already streaming starts mid-GOP. PS packets carrying only audio go
through regardless. Video whose codec the PSM does not name ("unknown") is
passed through ungated, since its keyframes cannot be recognised.

A frame the assembler marks damaged is normally dropped. One case is salvaged,
because it is common and costly: whole frames lost right before a keyframe
(one-packet P-frames, say) flag the keyframe as damaged, and dropping it would
cost a whole GOP. If the previous frame was closed by its marker, the damaged
frame is closed by its own marker, no sequence number inside it is missing,
it starts with a pack header and its video is a keyframe that carries its SPS,
then nothing of it can be missing and it is kept.

SSRC (PROTOCOL.md 5.2): a packet whose SSRC differs from `expected_ssrc` is not
dropped, only flagged in `stats.ssrc_mismatch`. A change of SSRC in the middle
of the stream is taken as a restarted sender: what is held of the old one is
flushed, sequence tracking starts afresh and video waits for a keyframe.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from .nal import NalError, sps_info
from .packet import MediaPacket
from .ps import PACK_START, PsDemuxer, PsFrame
from .rtp import FrameAssembler, RtpError, RtpFrame, RtpPacket, RtpReorderer, parse_rtp
from .stats import StreamStats

__all__ = ["RtpIngest"]

_GATED_CODECS = ("h264", "h265")
# RFC 3550 5.1 header after its first byte: marker|PT, sequence, timestamp, SSRC.
_unpack_rest = struct.Struct("!BHII").unpack_from
# Given-up sequence ranges remembered to tell a late packet from a duplicate.
_LOST_RANGES = 64


class RtpIngest:
    """One stream's receive path; see the module docstring.

    `feed` never raises on input bytes; exceptions raised by `on_packet`
    propagate to the caller of `feed`/`flush`.
    """

    __slots__ = (
        "on_packet",
        "expected_ssrc",
        "stats",
        "_clock",
        "_window",
        "_reorderer",
        "_assembler",
        "_demuxer",
        "_ssrc",
        "_highest",
        "_need_keyframe",
        "_prev_marker",
        "_lost_ranges",
        "_lost_base",
        "_oversized_seen",
        "_fast_seq",
        "_fast_ts",
        "_fast_room",
        "_fast_chunks",
        "_fast_run",
        "_lane",
    )

    def __init__(
        self,
        on_packet: Callable[[MediaPacket], None],
        *,
        expected_ssrc: int | None = None,
        reorder_window: int = 32,
        clock: Callable[[], float] = time.monotonic,
        max_frame_size: int = 4 << 20,
    ) -> None:
        self.on_packet = on_packet
        self.expected_ssrc = expected_ssrc
        self.stats = StreamStats(clock)
        self._clock = clock
        self._window = reorder_window
        self._reorderer = RtpReorderer(reorder_window)
        self._assembler = FrameAssembler(max_frame_size)
        self._demuxer = PsDemuxer(max_frame_size)
        self._ssrc: int | None = None
        self._highest: int | None = None  # highest sequence number seen, for `reordered`
        self._need_keyframe = True
        self._prev_marker = False  # the assembler's last frame was closed by its marker
        self._lost_ranges: deque[tuple[int, int]] = deque(maxlen=_LOST_RANGES)
        self._lost_base = 0  # `lost` of reorderers replaced after an SSRC change
        self._oversized_seen = 0
        # The in-order fast path (see `feed`): armed while `_fast_seq` >= 0.
        self._fast_seq = -1  # the sequence number it takes next
        self._fast_ts = -1  # timestamp of the open frame, -1 if none is open
        self._fast_room = 0  # payload bytes the open frame may still take (max_frame_size)
        self._fast_chunks: list = []  # the assembler's list of the open frame's payloads
        self._fast_run = 0  # packets taken since the stages were last brought up to date
        self._lane: Any = None  # media._fast.Lane: the same fast path, run in C (`attach_lane`)

    @property
    def learned_ssrc(self) -> int | None:
        """The SSRC of the packets being received (None before the first one)."""
        return self._ssrc

    @property
    def waiting_for_keyframe(self) -> bool:
        """True while video is withheld (at start and after a loss)."""
        return self._need_keyframe

    def feed(self, rtp: bytes | bytearray | memoryview) -> None:
        """Take one RTP packet (a datagram, or one packet out of a TCP framer)."""
        now = self._clock()
        if self._lane is not None and self._lane.run:
            self.lane_absorb()  # what C took comes first
        if type(rtp) is not bytes:
            rtp = bytes(rtp)  # packets are held (reordering): never keep views of a caller's buffer
        n = len(rtp)
        if n > 12 and rtp[0] == 0x80:
            # Fast path, what a GB/T 28181 device sends almost always (C.1): a plain 12-byte
            # header (RFC 3550 5.1: V=2, no padding, extension or CSRC), the SSRC being
            # received, the very next sequence number with nothing held for reordering, and
            # the timestamp of the open frame (or none open). The payload goes straight into
            # the assembler's frame; the reorderer's and assembler's counters are brought up
            # to date (`_settle`) when the frame closes or another packet needs them, so the
            # effect is exactly that of the general path below. Stats are kept per packet.
            b1, seq, ts, ssrc = _unpack_rest(rtp, 1)
            open_ts = self._fast_ts
            if seq == self._fast_seq and ssrc == self._ssrc and (ts == open_ts or open_ts < 0):
                room = self._fast_room - n + 12
                if room >= 0:
                    self._fast_room = room
                    self._fast_seq = (seq + 1) & 0xFFFF
                    self._fast_run += 1
                    stats = self.stats
                    stats.packets += 1
                    stats.bytes += n
                    stats.last_packet_at = now
                    if stats._cur_start <= now < stats._cur_end:
                        stats._cur[1] += n
                    else:
                        stats._bucket(now)[1] += n
                    if open_ts < 0:  # the first packet of a frame
                        self._fast_ts = ts
                        asm = self._assembler
                        asm._ts = ts
                        asm._first_seq = seq
                    self._fast_chunks.append(rtp[12:])
                    if b1 >= 0x80:  # marker: the frame is complete
                        self._close_fast(seq, now)
                    return
        self._settle()
        self._fast_seq = -1
        try:
            pkt = parse_rtp(rtp)
        except RtpError:
            self.stats.invalid += 1
        else:
            self._general(pkt, n, now)
        finally:
            self._arm()

    def _close_fast(self, seq: int, now: float) -> None:
        """The fast path took the packet with the marker bit (`seq`): close the frame."""
        self._settle()
        asm = self._assembler
        frame = asm._close(True)
        self._fast_ts = -1
        self._fast_room = asm.max_frame_size
        self._fast_chunks = asm._chunks
        if frame is not None:
            self._frame(frame, seq, now)

    def _settle(self) -> None:
        """Bring the reorderer and assembler up to date with what the fast path took."""
        if self._lane is not None and self._lane.run:
            self.lane_absorb()
        k = self._fast_run
        if k:
            self._fast_run = 0
            nxt = self._fast_seq
            r = self._reorderer
            r.received += k
            r.emitted += k
            r._next = nxt
            r._probation = None
            self._highest = (nxt - 1) & 0xFFFF
            asm = self._assembler
            asm._count += k
            asm._size = asm.max_frame_size - self._fast_room

    def _arm(self) -> None:
        """Enable the fast path if the stages are in the state it assumes (see `feed`)."""
        r = self._reorderer
        asm = self._assembler
        nxt = r._next
        if (
            nxt is not None
            and self._ssrc is not None
            and not r._buf
            and not r._pending_gap
            and not asm._discarding
            and self._highest == (nxt - 1) & 0xFFFF
        ):
            self._fast_seq = nxt
            self._fast_ts = -1 if asm._ts is None else asm._ts
            self._fast_room = asm.max_frame_size - asm._size
            self._fast_chunks = asm._chunks
        else:
            self._fast_seq = -1
        if self._lane is not None:
            self.lane_sync()

    # -- the fast path in C (media._fast.recv, driven by media.receiver) --

    def attach_lane(self, lane: Any) -> None:
        """Let `lane` (a `media._fast.Lane`) take this stream's in-order packets in C.

        The lane runs the fast path of `feed` on the receiver's batches; what it took is
        taken over here (`lane_absorb`) before any other packet is fed, and a frame it
        completed is handed over by `lane_frame`. `feed` itself stays the way in for
        everything else, with `lane_sync` after it.
        """
        self._lane = lane
        self.lane_sync()

    def lane_absorb(self) -> None:
        """Take over the packets the lane took since the last sync (their payloads are
        already in the assembler's open frame: the lane appends to the same list)."""
        lane = self._lane
        k = lane.run
        if not k:
            return
        lane.run = 0
        self._fast_run += k
        self._fast_seq = lane.seq
        self._fast_room = lane.room
        if self._fast_ts < 0 and lane.ts >= 0:  # the lane opened the frame
            self._fast_ts = lane.ts
            asm = self._assembler
            asm._ts = lane.ts
            asm._first_seq = lane.first_seq
        self.stats.record_packets(k, lane.nbytes, lane.last_at)
        lane.nbytes = 0

    def lane_sync(self) -> None:
        """Hand the fast path's state to the lane, armed if the fast path is."""
        lane = self._lane
        lane.run = 0
        lane.nbytes = 0
        lane.first_seq = -1
        if self._fast_seq < 0 or self._ssrc is None:
            lane.armed = 0
            return
        lane.seq = self._fast_seq
        lane.ts = self._fast_ts
        lane.room = self._fast_room
        lane.ssrc = self._ssrc
        lane.chunks = self._fast_chunks
        lane.armed = 1

    def lane_frame(self) -> None:
        """The lane took a packet with the marker bit: close its frame, as `feed` does."""
        lane = self._lane
        now = lane.last_at
        self.lane_absorb()
        try:
            self._close_fast((self._fast_seq - 1) & 0xFFFF, now)
        finally:
            self.lane_sync()

    def _general(self, pkt: RtpPacket, size: int, now: float) -> None:
        """Any packet: SSRC change, reordering, loss and duplicate accounting."""
        stats = self.stats
        stats.record_packet(size, now)
        if pkt.ssrc != self._ssrc:
            self._new_ssrc(pkt.ssrc)

        seq = pkt.sequence
        hi = self._highest
        behind = False
        if hi is None or 0 < ((seq - hi) & 0xFFFF) < 0x8000:
            self._highest = seq
        else:
            behind = True
        r = self._reorderer
        dups, late = r.duplicates, r.late
        ready = r.push(pkt)
        if r.late != late:
            # Behind the playout point: a copy of an emitted packet, or one given up on.
            if any((seq - start) & 0xFFFF < count for start, count in self._lost_ranges):
                stats.late += 1
            else:
                stats.duplicates += 1
        elif r.duplicates != dups:
            stats.duplicates += 1
        elif behind:
            stats.reordered += 1
        if ready:
            self._ordered(ready, now)
        stats.lost = self._lost_base + r.lost

    def flush(self) -> None:
        """End of stream: hand over everything held (holes count as lost)."""
        self._settle()
        self._fast_seq = -1  # `_arm` below, once the stages are flushed
        now = self._clock()
        try:
            self._ordered(self._reorderer.flush(), now)
            self.stats.lost = self._lost_base + self._reorderer.lost
            self._prev_marker = False
            for frame in self._assembler.flush():
                self._frame(frame, None, now)
        finally:
            self._arm()

    # -- stages --

    def _new_ssrc(self, ssrc: int) -> None:
        stats = self.stats
        if self._ssrc is not None:
            # A restarted sender: its sequence numbers have nothing to do with the old ones.
            stats.ssrc_changes += 1
            self.flush()
            self._lost_base += self._reorderer.lost
            self._reorderer = RtpReorderer(self._window)
            self._highest = None
            self._lost_ranges.clear()
            self._need_keyframe = True
        self._ssrc = ssrc
        stats.ssrc = ssrc
        if self.expected_ssrc is not None and ssrc != self.expected_ssrc:
            stats.ssrc_mismatch = True

    def _ordered(self, packets: list[RtpPacket], now: float) -> None:
        asm = self._assembler
        for p in packets:
            if p.gap:
                self._need_keyframe = True
                self._lost_ranges.append(((p.sequence - p.gap) & 0xFFFF, p.gap))
            frames = asm.push(p)
            if asm.oversized != self._oversized_seen:
                # A frame past max_frame_size was thrown away inside the assembler.
                self._oversized_seen = asm.oversized
                self._need_keyframe = True
                self._prev_marker = False
            for frame in frames:
                self._frame(frame, p.sequence, now)

    def _frame(self, frame: RtpFrame, last_seq: int | None, now: float) -> None:
        """One RTP frame (one PS packet, normally): demux, gate, hand over.

        `last_seq` is the sequence number of the packet that completed it (None at flush).
        """
        stats = self.stats
        prev_marker = self._prev_marker
        self._prev_marker = frame.marker
        salvage = False
        if frame.damaged:
            # See the module docstring: whole frames lost just before this one.
            salvage = (
                frame.marker
                and prev_marker
                and last_seq is not None
                and ((last_seq - frame.first_sequence) & 0xFFFF) + 1 == frame.packets
                and frame.payload[:4] == PACK_START
            )
            if not salvage:
                stats.damaged_frames += 1
                self._need_keyframe = True
                return
        dm = self._demuxer
        truncated, oversized = dm.truncated, dm.oversized
        frames = dm.feed(frame.payload)
        frames += dm.flush()
        if dm.truncated != truncated or dm.oversized != oversized:
            # A video frame of this PS packet was lost inside the demuxer (a PES cut
            # short by the device, or one past max_frame_size): the rest is suspect.
            self._need_keyframe = True
            if salvage:
                stats.damaged_frames += 1
            else:
                stats.dropped_until_keyframe += 1
            return
        if salvage and not self._complete_keyframe(frames):
            stats.damaged_frames += 1
            self._need_keyframe = True
            return
        if not frames:
            return

        keyframe = False
        video = 0
        first_video: PsFrame | None = None
        for f in frames:
            if f.stream == "video":
                video += 1
                if first_video is None:
                    first_video = f
                stats.record_video_frame(f.keyframe, frame.timestamp, now)
                if f.keyframe:
                    keyframe = True
                    self._video_info(f)
                elif stats.codec != f.codec:
                    stats.codec = f.codec
            else:
                stats.audio_frames += 1
                stats.audio_codec = f.codec

        if first_video is not None and first_video.codec in _GATED_CODECS:
            if self._need_keyframe and not first_video.keyframe:
                stats.dropped_until_keyframe += video
                return
            self._need_keyframe = False
        stats.delivered += 1
        self.on_packet(MediaPacket(frame.payload, frame.timestamp, frames, keyframe, now, False))

    def _complete_keyframe(self, frames: list[PsFrame]) -> bool:
        """A salvaged frame is kept if it is audio only or its video is a keyframe with SPS."""
        for f in frames:
            if f.stream == "video":
                if not f.keyframe:
                    return False
                try:
                    if sps_info(f.data, f.codec) is None:
                        return False
                except NalError:
                    return False
        return True

    def _video_info(self, f: PsFrame) -> None:
        stats = self.stats
        stats.codec = f.codec
        # Every keyframe, not only the first: a device may change resolution mid-stream.
        try:
            info = sps_info(f.data, f.codec)
        except NalError:
            return
        if info is not None:
            stats.width, stats.height = info.width, info.height
