"""Per-stream health of one ingested RTP/PS stream.

`media.ingest.RtpIngest` owns one `StreamStats` and updates it as packets and
frames go by; the stream manager and the HTTP API read it (`as_dict`) and the
idle watchdog asks `last_packet_age`. Rates are computed over a sliding window
of fixed-size time buckets, so memory stays a few dozen numbers per stream no
matter how many packets arrive, and a stream that stops decays to zero rates
instead of keeping its last figure.

Time is injected (`clock`, or `now` arguments) like everywhere in the sans-IO
media stages: tests drive it by hand.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

__all__ = ["StreamStats", "RATE_WINDOW"]

RATE_WINDOW = 2.0  # seconds over which bitrate_bps and fps are measured
_BUCKET = 0.25  # seconds per bucket: window / bucket = 8 buckets (+1 partial)
_NBUCKETS = int(RATE_WINDOW / _BUCKET)
_RTP_CLOCK = 90000  # GB/T 28181 C.1: PS over RTP runs a 90 kHz timestamp clock


class StreamStats:
    """Counters and rates of one stream (see the module docstring).

    Counters: `packets`/`bytes` (valid RTP packets and their size, duplicates
    included), `invalid` (datagrams that are not RTP), `frames`/`keyframes`
    (video frames received intact, delivered or not), `audio_frames`,
    `delivered` (MediaPackets handed downstream), `lost` (sequence numbers
    given up), `reordered` (packets that arrived behind a later one and were
    still used), `duplicates`, `late` (arrived after their slot was given up),
    `damaged_frames` (dropped because a gap fell inside them),
    `dropped_until_keyframe` (intact video frames withheld after a loss until
    the next keyframe), `ssrc_changes` (sender restarts with a new SSRC).
    """

    __slots__ = (
        "packets",
        "bytes",
        "invalid",
        "frames",
        "keyframes",
        "audio_frames",
        "delivered",
        "lost",
        "reordered",
        "duplicates",
        "late",
        "damaged_frames",
        "dropped_until_keyframe",
        "ssrc_changes",
        "codec",
        "audio_codec",
        "width",
        "height",
        "ssrc",
        "ssrc_mismatch",
        "first_packet_at",
        "last_packet_at",
        "keyframe_interval_frames",
        "keyframe_interval_s",
        "_last_key_frames",
        "_last_key_ts",
        "_buckets",
        "_cur",
        "_cur_start",
        "_cur_end",
        "_clock",
    )

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.packets = 0
        self.bytes = 0
        self.invalid = 0
        self.frames = 0
        self.keyframes = 0
        self.audio_frames = 0
        self.delivered = 0
        self.lost = 0
        self.reordered = 0
        self.duplicates = 0
        self.late = 0
        self.damaged_frames = 0
        self.dropped_until_keyframe = 0
        self.ssrc_changes = 0
        self.codec = "unknown"
        self.audio_codec: str | None = None
        self.width: int | None = None
        self.height: int | None = None
        self.ssrc: int | None = None
        self.ssrc_mismatch = False
        self.first_packet_at: float | None = None
        self.last_packet_at: float | None = None
        self.keyframe_interval_frames: int | None = None
        self.keyframe_interval_s: float | None = None
        self._last_key_frames: int | None = None
        self._last_key_ts: int | None = None
        # [bucket number, bytes, video frames]; at most _NBUCKETS + 1 entries.
        self._buckets: deque[list[int]] = deque()
        # The newest bucket and the times it covers: most updates land in it, and two float
        # comparisons are cheaper than working out the bucket number of every packet.
        self._cur: list[int] = [0, 0, 0]
        self._cur_start = 0.0
        self._cur_end = 0.0  # empty range: the first update makes a bucket
        self._clock = clock

    # -- updates (called by the ingest) --

    def _bucket(self, now: float) -> list[int]:
        if self._cur_start <= now < self._cur_end:
            return self._cur
        n = int(now / _BUCKET)
        b = self._buckets
        if b and b[-1][0] == n:
            cur = b[-1]
        else:
            cur = [n, 0, 0]
            b.append(cur)
            while b[0][0] <= n - _NBUCKETS - 1:
                b.popleft()
        self._cur = cur  # always the newest bucket
        self._cur_start = n * _BUCKET
        self._cur_end = (n + 1) * _BUCKET
        return cur

    def record_packet(self, size: int, now: float) -> None:
        """A valid RTP packet of `size` bytes arrived at `now`."""
        self.record_packets(1, size, now)

    def record_packets(self, count: int, size: int, now: float) -> None:
        """`count` valid RTP packets of `size` bytes in all, the last at `now`."""
        self.packets += count
        self.bytes += size
        if self.first_packet_at is None:
            self.first_packet_at = now
        self.last_packet_at = now
        if self._cur_start <= now < self._cur_end:
            self._cur[1] += size
        else:
            self._bucket(now)[1] += size

    def record_video_frame(self, keyframe: bool, rtp_timestamp: int, now: float) -> None:
        """An intact video frame was demuxed (delivered or withheld)."""
        self.frames += 1
        self._bucket(now)[2] += 1
        if not keyframe:
            return
        self.keyframes += 1
        if self._last_key_frames is not None:
            self.keyframe_interval_frames = self.frames - self._last_key_frames
            # RTP timestamps, not arrival times: a burst after a stall would distort those.
            delta = (rtp_timestamp - self._last_key_ts) & 0xFFFFFFFF  # type: ignore[operator]
            self.keyframe_interval_s = delta / _RTP_CLOCK
        self._last_key_frames = self.frames
        self._last_key_ts = rtp_timestamp

    # -- readings --

    def _rates(self, now: float) -> tuple[float, float]:
        """(bits/s, frames/s) over the last RATE_WINDOW seconds."""
        first = self.first_packet_at
        if first is None:
            return 0.0, 0.0
        lo = int(now / _BUCKET) - _NBUCKETS
        nbytes = nframes = 0
        for n, b, f in self._buckets:
            if n > lo:
                nbytes += b
                nframes += f
        # A young stream is measured over its age, not the full window; one bucket
        # at least, so the first packets do not read as an absurd rate.
        span = max(min(RATE_WINDOW, now - first), _BUCKET)
        return nbytes * 8 / span, nframes / span

    @property
    def bitrate_bps(self) -> float:
        """Received bits per second over the last ~2 s (RTP headers included)."""
        return self._rates(self._clock())[0]

    @property
    def fps(self) -> float:
        """Video frames per second over the last ~2 s."""
        return self._rates(self._clock())[1]

    def last_packet_age(self, now: float | None = None) -> float | None:
        """Seconds since the last RTP packet, or None before the first one."""
        if self.last_packet_at is None:
            return None
        return (self._clock() if now is None else now) - self.last_packet_at

    def as_dict(self, now: float | None = None) -> dict:
        """JSON-ready snapshot."""
        if now is None:
            now = self._clock()
        bps, fps = self._rates(now)
        age = self.last_packet_age(now)
        return {
            "ssrc": self.ssrc,
            "ssrc_mismatch": self.ssrc_mismatch,
            "codec": self.codec,
            "audio_codec": self.audio_codec,
            "width": self.width,
            "height": self.height,
            "bitrate_bps": round(bps),
            "fps": round(fps, 2),
            "packets": self.packets,
            "bytes": self.bytes,
            "invalid": self.invalid,
            "frames": self.frames,
            "keyframes": self.keyframes,
            "audio_frames": self.audio_frames,
            "delivered": self.delivered,
            "lost": self.lost,
            "reordered": self.reordered,
            "duplicates": self.duplicates,
            "late": self.late,
            "damaged_frames": self.damaged_frames,
            "dropped_until_keyframe": self.dropped_until_keyframe,
            "ssrc_changes": self.ssrc_changes,
            "keyframe_interval_frames": self.keyframe_interval_frames,
            "keyframe_interval_s": self.keyframe_interval_s,
            "last_packet_age": None if age is None else round(age, 3),
        }
