"""Stream hub: one upstream per stream, shared by every consumer (ZLMediaKit style).

The ingest path (RTP -> PS demux) `publish`es each `MediaPacket` into a `Stream`; every
output (HTTP-FLV, WS-FLV, RTP forward for cascade, health checks) `subscribe`s and reads
the same packet objects at its own pace. Nothing is copied per consumer.

How it works — one ring of packet references shared by all consumers:

* The ring holds the **GOP cache** (from the last keyframe, up to `gop_cache_packets`
  packets) plus the **lag window** (the last `max_lag_packets` packets / `max_lag_bytes`
  bytes). Memory is bounded by the ring, whatever the number of consumers, and a consumer
  that never reads holds nothing: it is only a cursor (a sequence number) into the ring.
* A new consumer starts at the cached keyframe, so it can decode at once instead of
  waiting for the next GOP. With no keyframe cached it starts live and skips packets until
  a keyframe arrives (audio-only streams are delivered as they come).
* A consumer that fell behind — more than `max_lag_packets` / `max_lag_bytes` behind, or
  its next packet already trimmed from the ring — drops what it missed and resumes at the
  first keyframe that is within the lag limits (or in the GOP cache), else at the next
  keyframe published. Skipped packets are counted in `Consumer.dropped`. A consumer
  reading inside the current cached GOP is never dropped: those packets are held anyway.
* `publish` never awaits: it appends to the ring, trims it (amortised O(1)) and wakes the
  consumers waiting in `get()` — O(waiting consumers).
* A consumer may instead `listen`: publish then calls its callback at once, and the callback
  takes what it can with `get_nowait()` (the HTTP-FLV writer muxes and writes it in the same
  call). That saves a task switch per packet; lag handling is the same.

Everything runs on one event loop; `publish` and `close` must be called from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .packet import MediaPacket

__all__ = ["StreamClosed", "Stream", "StreamStats", "Consumer"]

log = logging.getLogger(__name__)


class StreamClosed(Exception):
    """The stream was closed (or the consumer left): no more packets will come."""


@dataclass(slots=True)
class StreamStats:
    """Counters of one stream since it was created."""

    packets: int = 0                        # packets published
    bytes: int = 0                          # PS bytes published
    keyframes: int = 0                      # keyframe packets published
    last_keyframe_at: float | None = None   # time.monotonic() of the last keyframe publish
    consumers_total: int = 0                # subscriptions since creation
    video_codec: str | None = None          # learned from PsFrame.codec ("h264", "h265", ...)
    audio_codec: str | None = None          # "g711a", "g711u", ...


class Stream:
    """One live stream: a publisher, a GOP cache and any number of consumers."""

    def __init__(
        self,
        key: str,
        *,
        max_lag_packets: int = 256,
        max_lag_bytes: int = 16 * 2**20,
        gop_cache_packets: int = 600,
        on_idle: Callable[[Stream], None] | None = None,
    ) -> None:
        if max_lag_packets < 1 or max_lag_bytes < 1 or gop_cache_packets < 0:
            raise ValueError("max_lag_packets and max_lag_bytes must be >= 1, gop_cache_packets >= 0")
        self.key = key
        self.created_at = time.monotonic()
        self.closed = False
        self.close_reason = ""
        self.max_lag_packets = max_lag_packets
        self.max_lag_bytes = max_lag_bytes
        self.gop_cache_packets = gop_cache_packets
        self.on_idle = on_idle
        self.stats = StreamStats()
        # Ring of (packet, bytes published before it); entry i has sequence number _base + i.
        self._ring: deque[tuple[MediaPacket, int]] = deque()
        self._base = 0          # sequence number of _ring[0]
        self._head = 0          # sequence number the next published packet gets
        self._keys: deque[int] = deque()   # sequence numbers of the keyframes in the ring
        self._gop: int | None = None       # sequence number of the cached GOP's keyframe
        self._video_seen = False
        self._consumers: dict[Consumer, None] = {}  # insertion-ordered set
        self._waiters: list[asyncio.Future] = []
        self._key_waiters: list[asyncio.Future] = []
        self._listeners: dict[Consumer, Callable[[], None]] = {}
        self._notify: tuple[tuple[Consumer, Callable[[], None]], ...] = ()  # snapshot of _listeners

    def __repr__(self) -> str:
        state = f"closed {self.close_reason!r}" if self.closed else f"{len(self._consumers)} consumers"
        return f"Stream({self.key!r}, {state}, {self.stats.packets} packets)"

    # -- publisher side --

    def publish(self, packet: MediaPacket) -> None:
        """Add one packet; wakes waiting consumers. Never blocks. Ignored once closed."""
        if self.closed:
            return
        st = self.stats
        size = len(packet.ps)
        seq = self._head
        self._ring.append((packet, st.bytes))
        self._head = seq + 1
        st.packets += 1
        st.bytes += size
        for f in packet.frames:
            if f.stream == "video":
                self._video_seen = True
                st.video_codec = f.codec
            elif f.stream == "audio":
                st.audio_codec = f.codec
        if packet.keyframe:
            self._video_seen = True
            st.keyframes += 1
            st.last_keyframe_at = time.monotonic()
            self._keys.append(seq)
            self._gop = seq if self.gop_cache_packets > 0 else None
            if self._key_waiters:
                waiters, self._key_waiters = self._key_waiters, []
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(True)
        elif self._gop is not None and seq - self._gop >= self.gop_cache_packets:
            self._gop = None  # GOP longer than the cache: new consumers start live
        self._trim()
        if self._notify:
            self._call_listeners()
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def _call_listeners(self) -> None:
        for c, callback in self._notify:
            try:
                callback()
            except Exception:
                # The publisher must not fail for a consumer's sake: that listener is dropped.
                log.exception("listener of consumer %s on stream %s failed", c.name, self.key)
                self._set_listener(c, None)

    def _set_listener(self, c: Consumer, callback: Callable[[], None] | None) -> None:
        if callback is None:
            self._listeners.pop(c, None)
        elif c in self._consumers:
            self._listeners[c] = callback
        self._notify = tuple(self._listeners.items())

    def _trim(self) -> None:
        """Drop ring entries that are neither in the GOP cache nor in the lag window."""
        head = self._head
        keep_from = head - 1  # always keep the newest packet
        gop = self._gop
        if gop is not None and gop < keep_from:
            keep_from = gop
        base = self._base
        if base >= keep_from:
            return  # the common case: the ring holds the cached GOP and nothing older
        ring = self._ring
        max_p, max_b, total = self.max_lag_packets, self.max_lag_bytes, self.stats.bytes
        # What no consumer will read and the GOP cache does not hold serves nobody: at
        # hundreds of streams the lag window must cost memory only while someone lags.
        oldest = keep_from
        for c in self._consumers:
            if c._cursor < oldest:
                oldest = c._cursor
        while base < keep_from and (base < oldest or head - base > max_p
                                    or total - ring[0][1] > max_b):
            ring.popleft()
            base += 1
        self._base = base
        keys = self._keys
        while keys and keys[0] < base:
            keys.popleft()

    def close(self, reason: str = "") -> None:
        """End the stream: every consumer's get() raises StreamClosed from now on."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self._ring.clear()
        self._keys.clear()
        self._gop = None
        self._base = self._head
        for c in list(self._consumers):
            c._closed = True
        self._consumers.clear()
        if self._notify:
            self._call_listeners()
            self._listeners.clear()
            self._notify = ()
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        waiters, self._key_waiters = self._key_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(False)

    # -- consumer side --

    def subscribe(self, name: str = "") -> Consumer:
        """A new consumer; it gets the cached GOP first (from its keyframe), then live packets.

        Raises StreamClosed if the stream is closed.
        """
        if self.closed:
            raise StreamClosed(self.close_reason or "stream closed")
        c = Consumer(self, name)
        if self._gop is not None:
            c._cursor = self._gop
        else:
            c._cursor = self._head
            c._need_key = True
        self._consumers[c] = None
        self.stats.consumers_total += 1
        return c

    @property
    def consumer_count(self) -> int:
        return len(self._consumers)

    def consumers(self) -> list[Consumer]:
        return list(self._consumers)

    @property
    def buffered_packets(self) -> int:
        """Packets held by the ring (GOP cache + lag window), shared by all consumers."""
        return len(self._ring)

    @property
    def buffered_bytes(self) -> int:
        ring = self._ring
        return self.stats.bytes - ring[0][1] if ring else 0

    async def wait_for_keyframe(self, timeout: float) -> bool:
        """True once a keyframe has been published (at once if one already was); False on
        timeout or close."""
        if self.stats.keyframes:
            return True
        if self.closed:
            return False
        fut = asyncio.get_running_loop().create_future()
        self._key_waiters.append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            if not fut.done():
                fut.cancel()
            try:
                self._key_waiters.remove(fut)
            except ValueError:
                pass

    def _leave(self, c: Consumer) -> None:
        if self._consumers.pop(c, 0) is None and not self._consumers and not self.closed:
            cb = self.on_idle
            if cb is not None:
                try:
                    cb(self)
                except Exception:
                    log.exception("on_idle callback of stream %s failed", self.key)

    def _next(self, c: Consumer) -> MediaPacket | None:
        """The consumer's next packet, or None if it is caught up (lag handling here)."""
        cur = c._cursor
        head = self._head
        if cur >= head:
            return None
        ring = self._ring
        base = self._base
        if cur < base or head - cur > self.max_lag_packets or (
            self.stats.bytes - ring[cur - base][1] > self.max_lag_bytes
        ):
            cur = self._catch_up(c, cur)
            if cur >= head:
                return None
            base = self._base
        # Skipping to a keyframe: after a drop, or a start with no cached GOP.
        if c._need_key:
            while cur < head:
                pkt = ring[cur - base][0]
                if pkt.keyframe or not self._video_seen:
                    c._need_key = False
                    break
                if c._counting:
                    c.dropped += 1
                cur += 1
            c._cursor = cur
            if cur >= head:
                return None
        c._cursor = cur + 1
        c.packets += 1
        return ring[cur - base][0]

    def _catch_up(self, c: Consumer, cur: int) -> int:
        """Cursor of a lagging consumer: still within limits, or moved to a keyframe."""
        head, base = self._head, self._base
        gop = self._gop
        if cur >= base and gop is not None and cur >= gop:
            return cur  # inside the cached GOP: held anyway, not a memory problem
        if cur >= base and head - cur <= self.max_lag_packets and (
            self.stats.bytes - self._ring[cur - base][1] <= self.max_lag_bytes
        ):
            return cur
        total, max_p, max_b, ring = self.stats.bytes, self.max_lag_packets, self.max_lag_bytes, self._ring
        for k in self._keys:
            if k <= cur:
                continue
            if (gop is not None and k >= gop) or (head - k <= max_p and total - ring[k - base][1] <= max_b):
                c.dropped += k - cur
                c._cursor = k
                c._need_key = False
                return k
        if not self._video_seen:
            # No keyframes to wait for (audio only): resume at the oldest packet in limits.
            pos = max(cur + 1, base, head - max_p)
            while pos < head - 1 and total - ring[pos - base][1] > max_b:
                pos += 1
            c.dropped += pos - cur
            c._cursor = pos
            return pos
        # No usable keyframe yet: skip everything up to now, wait for the next one.
        c.dropped += head - cur
        c._cursor = head
        c._need_key = self._video_seen
        c._counting = True
        return head


class Consumer:
    """One reader of a stream. `get()` returns the next packet; `close()` leaves."""

    __slots__ = ("_stream", "name", "dropped", "packets", "created_at", "_cursor", "_need_key",
                 "_counting", "_closed", "_waiter")

    def __init__(self, stream: Stream, name: str = "") -> None:
        self._stream = stream
        self.name = name
        self.dropped = 0        # packets skipped because it lagged
        self.packets = 0        # packets delivered
        self.created_at = time.monotonic()
        self._cursor = 0
        self._need_key = False  # skip packets until a keyframe
        self._counting = False  # ... and count them as dropped (after a lag, not at start)
        self._closed = False
        self._waiter: asyncio.Future | None = None

    def __repr__(self) -> str:
        return (f"Consumer({self.name!r}, stream={self._stream.key!r}, packets={self.packets}, "
                f"dropped={self.dropped}, lag={self.lag}{', closed' if self.closed else ''})")

    @property
    def stream(self) -> Stream:
        return self._stream

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def lag(self) -> int:
        """Packets published but not yet read by this consumer."""
        return 0 if self._closed else max(0, self._stream._head - self._cursor)

    def listen(self, callback: Callable[[], None] | None) -> None:
        """Have `callback()` called by every `publish`, synchronously, and once when the
        consumer or the stream closes; None stops it.

        For a reader that can take packets at once (`get_nowait`) without a task switch per
        packet. The callback must not raise (one that does is dropped) nor block.
        """
        if not self._closed:
            self._stream._set_listener(self, callback)

    def get_nowait(self) -> MediaPacket | None:
        """The next packet if one is ready, else None; raises StreamClosed once closed."""
        if self._closed:
            raise StreamClosed(self._stream.close_reason or "consumer closed")
        return self._stream._next(self)

    async def get(self) -> MediaPacket:
        """The next packet; waits for it. Raises StreamClosed when the stream or consumer
        is closed (pending packets are not drained)."""
        stream = self._stream
        while True:
            if self._closed:
                raise StreamClosed(stream.close_reason or "consumer closed")
            pkt = stream._next(self)
            if pkt is not None:
                return pkt
            fut = asyncio.get_running_loop().create_future()
            stream._waiters.append(fut)
            self._waiter = fut
            try:
                await fut
            except asyncio.CancelledError:
                try:
                    stream._waiters.remove(fut)
                except ValueError:
                    pass
                raise
            finally:
                self._waiter = None

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> MediaPacket:
        try:
            return await self.get()
        except StreamClosed:
            raise StopAsyncIteration from None

    def close(self) -> None:
        """Leave the stream (idempotent). A pending get() raises StreamClosed. When the last
        consumer leaves an open stream, its on_idle(stream) is called."""
        if self._closed:
            return
        self._closed = True
        stream = self._stream
        fut = self._waiter  # wake a get() that is waiting, so that it sees the close
        if fut is not None and not fut.done():
            fut.set_result(None)
        callback = stream._listeners.get(self)
        if callback is not None:
            stream._set_listener(self, None)
            try:
                callback()  # ... and a listener
            except Exception:
                log.exception("listener of consumer %s on stream %s failed", self.name, stream.key)
        stream._leave(self)

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
