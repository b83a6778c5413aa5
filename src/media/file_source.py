"""Platform recordings played back into a hub stream, as if a device were sending its history.

The media node's ``file_play`` command (``node.py``) makes a stream whose publisher is a
``FileSource`` instead of an RTP ingest: the recorder's fragmented MP4 segments
(``recording.py``; ISO/IEC 14496-12 with ``frag_keyframe+empty_moov``) are read in order with
PyAV's demuxer (``SegmentReader``), each video access unit is turned back into Annex-B (FFmpeg's
``*_mp4toannexb`` filter puts the parameter sets before every IDR, as a device's PS does) and into
one GB/T 28181 PS packet (``ps.PsMuxer``, Annex C: one frame per PS packet), and published as the
``MediaPacket`` the RTP ingest would have made of it. So every consumer of the hub — HTTP-FLV,
WS-FLV, RTP/PS forward to an upper platform, WebRTC, the download recorder — works as with a
device's playback. The stored SEI (the simulator's carries the recorded time) is kept.

Timing follows a device's playback (GB/T 28181-2016 §9.8, Annex B): frames go out in real time
× ``speed`` (0.25–32: 8 is MANSRTSP's highest Scale, a download asks up to 32), and their 90 kHz
timestamps run in recorded time, monotonic across segment boundaries, gaps and seeks (a jump
continues one frame on, as the FLV muxer expects). ``seek`` lands on the keyframe at or before the
asked time; ``pause``/``resume`` stop and restart the clock. The node's ``elapsed`` is made to
count recorded seconds since the landing point, so a playback's position is right across gaps.
At the end of the range ``on_end`` is called and the stream is left open: the server ends it
like a device's MediaStatus 121.

Demuxing is blocking file I/O; it runs in the default executor a batch at a time, one call at a
time per source (the container is not thread-safe).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from . import nal
from .hub import Stream
from .packet import MediaPacket
from .ps import SID_AUDIO, SID_VIDEO, PsFrame, PsMuxer

if TYPE_CHECKING:
    from .node import MediaNode

__all__ = ["FileSource", "PlayedFile", "SegmentReader", "file_control", "file_play"]

log = logging.getLogger("media.file_source")

SPEED_MIN, SPEED_MAX = 0.25, 32.0
CLOCK = 90000  # GB/T 28181 Annex C: PS/RTP timestamps at 90 kHz
BATCH = 32  # frames demuxed per executor call
GAP = 5.0  # recorded seconds between frames that make a gap (the recorder's "no packet for > 5 s")
BEHIND = 1.0  # seconds late before the pacing clock gives up catching up
_VIDEO = {"h264": ("h264", "h264_mp4toannexb"), "hevc": ("h265", "hevc_mp4toannexb")}
_AUDIO = {"pcm_alaw": "g711a", "pcm_mulaw": "g711u"}  # what a PS packet may carry (C.2)
_WRAP = 0xFFFFFFFF


@dataclass(slots=True, frozen=True)
class PlayedFile:
    """One segment to play: its path and the Unix times of its first and last frame."""

    path: str
    start: float
    end: float


@dataclass(slots=True)
class Frame:
    """One demuxed frame: recorded time (Unix seconds, of its DTS), Annex-B or G.711 bytes."""

    t: float
    kind: str  # "video" | "audio"
    codec: str  # h264 | h265 | g711a | g711u
    data: bytes
    keyframe: bool = False
    cts: int = 0  # PTS - DTS, 90 kHz


class SegmentReader:
    """The frames of a list of segments in recorded order; blocking (run it in a thread)."""

    def __init__(self, files: list[PlayedFile]) -> None:
        self.files = sorted(files, key=lambda f: f.start)
        self._index = -1
        self._container: Any = None
        self._packets: Any = None
        self._bsf: Any = None
        self._origin: dict[int, tuple[float, int]] = {}  # stream index -> (Unix time, pts of it)
        self._held: deque[Frame] = deque()

    def close(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception as exc:  # closing a file cut short: nothing left to save
                log.debug("closing %s: %s", self.files[self._index].path, exc)
        self._container = self._packets = self._bsf = None

    def open_at(self, when: float) -> float | None:
        """Position at the keyframe at or before ``when`` (or the next segment's start when
        ``when`` falls in a gap); the recorded time of that keyframe, None if nothing after it
        is readable."""
        self.close()
        self._held.clear()
        ends = [f.end for f in self.files]
        i = bisect.bisect_right(ends, when)  # the first segment that ends after ``when``
        while i < len(self.files):
            if self._open(i, when):
                frame = self._first_keyframe()
                if frame is not None:
                    self._held.append(frame)
                    return frame.t
            i += 1
        self.close()
        return None

    def read(self, count: int) -> list[Frame]:
        """Up to ``count`` frames; an empty list at the end of the last segment."""
        out: list[Frame] = []
        while self._held and len(out) < count:
            out.append(self._held.popleft())
        while len(out) < count and self._container is not None:
            frame = self._next()
            if frame is not None:
                out.append(frame)
                continue
            # This segment is done (or unreadable from here on): the next one from its keyframe.
            i = self._index + 1
            self.close()
            while i < len(self.files):
                if self._open(i, None):
                    first = self._first_keyframe()
                    if first is not None:
                        out.append(first)
                        break
                i += 1
        return out

    def _open(self, i: int, when: float | None) -> bool:
        import av

        f = self.files[i]
        self._index = i
        try:
            container = av.open(f.path)
            video = container.streams.video[0] if container.streams.video else None
            if video is None or video.codec_context.name not in _VIDEO:
                container.close()
                log.warning("%s has no H.264/H.265 video track; skipped", f.path)
                return False
            self._container = container
            self._origin = {s.index: (f.start, s.start_time or 0) for s in container.streams}
            self._bsf = av.BitStreamFilterContext(_VIDEO[video.codec_context.name][1], video)
            if when is not None and when > f.start:
                tb = video.time_base or Fraction(1, CLOCK)
                container.seek(int((when - f.start) / tb) + (video.start_time or 0), stream=video,
                               backward=True, any_frame=False)
            wanted = [video] + [s for s in container.streams.audio if s.codec_context.name in _AUDIO]
            self._packets = container.demux(wanted)
        except (av.FFmpegError, OSError, ValueError) as exc:
            log.warning("recording %s cannot be read: %s; skipped", f.path, exc)
            self.close()
            return False
        return True

    def _first_keyframe(self) -> Frame | None:
        """Skip to the segment's (or the seek's) first video keyframe: a decoder starts there."""
        while True:
            frame = self._next()
            if frame is None:
                return None
            if frame.kind == "video" and frame.keyframe:
                return frame

    def _next(self) -> Frame | None:
        import av

        while True:
            try:
                packet = next(self._packets)
            except StopIteration:
                return None
            except (av.FFmpegError, OSError, ValueError) as exc:  # a segment cut by a crash
                log.warning("recording %s: %s; going on with the next segment",
                            self.files[self._index].path, exc)
                return None
            if packet.dts is None or not packet.size:
                continue
            stream = packet.stream
            origin, pts0 = self._origin.get(stream.index, (self.files[self._index].start, 0))
            t = origin + float((packet.dts - pts0) * packet.time_base)
            if stream.type == "audio":
                return Frame(t, "audio", _AUDIO[stream.codec_context.name], bytes(packet))
            codec = _VIDEO[stream.codec_context.name][0]
            cts = round(float((packet.pts - packet.dts) * packet.time_base) * CLOCK) if packet.pts is not None else 0
            data = b"".join(bytes(p) for p in self._bsf.filter(packet))
            if data:
                return Frame(t, "video", codec, data, nal.is_keyframe(data, codec), max(0, cts))


class FileSource:
    """See the module docstring. ``await open(from_time)``, ``start()``, then control it."""

    def __init__(self, reader: SegmentReader, *, start: float, end: float, speed: float = 1.0,
                 publish: Callable[[MediaPacket, float], None], on_end: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.reader = reader
        self.start_time, self.end_time = start, end
        self.speed = speed
        self.publish = publish  # (packet, recorded seconds since the landing point)
        self.on_end = on_end
        self.clock = clock
        self.paused = False
        self.position: float | None = None  # recorded time of the last frame sent
        self.frames = 0
        self.ended = ""
        self._mark = start  # recorded time of the open's or the last seek's keyframe
        self._queue: deque[Frame] = deque()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._epoch = 0  # bumped by a seek: a batch read before it is thrown away
        self._task: asyncio.Task | None = None
        self._pending: asyncio.Future | None = None
        self._pace: tuple[float, float] | None = None  # (wall clock, recorded time) anchor
        self._last_t: float | None = None
        self._ts_anchor: tuple[int, float] | None = None  # (90 kHz timestamp, recorded time)
        self._last_video_ts: int | None = None
        self._muxers: dict[tuple[str, str | None], PsMuxer] = {}
        self._video_codec = "h264"
        self._audio_codec: str | None = None

    async def _call(self, fn: Callable, *args: Any) -> Any:
        # Shielded: a cancelled caller must not free the container while a thread still reads it.
        self._pending = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        return await asyncio.shield(self._pending)

    async def open(self, when: float) -> float | None:
        """Position at ``when`` (the keyframe at or before it); the recorded time landed on."""
        async with self._lock:
            landed = await self._call(self.reader.open_at, when)
        self._epoch += 1
        self._queue.clear()
        self._pace = None
        self._ts_anchor = None  # the next frame continues one frame on
        if landed is not None:
            self._mark = landed
        self._wake.set()
        return landed

    def start(self) -> None:
        if self._task is None or self._task.done():
            self.ended = ""
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def seek(self, offset: float) -> float | None:
        """Seek to ``offset`` seconds from the range start; the offset landed on (a keyframe)."""
        landed = await self.open(self.start_time + offset)
        if landed is None:
            return None
        self.start()
        return landed - self.start_time

    def set_speed(self, speed: float) -> None:
        self.speed = speed
        self._pace = None
        self._wake.set()

    def pause(self) -> None:
        self.paused = True
        self._wake.set()

    def resume(self) -> None:
        self.paused = False
        self._pace = None
        self._wake.set()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._pending is not None:
            await asyncio.gather(self._pending, return_exceptions=True)
        self.reader.close()

    async def _run(self) -> None:
        try:
            why = await self._play()
        except Exception as exc:
            log.exception("playing recordings")
            why = f"the recordings could not be read: {exc}"
        self.ended = why
        self.on_end(why)

    async def _play(self) -> str:
        while True:
            if self.paused:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._queue:
                epoch = self._epoch
                async with self._lock:
                    batch = await self._call(self.reader.read, BATCH)
                if epoch != self._epoch:
                    continue  # a seek came in meanwhile
                if not batch:
                    return "end of the recordings"
                self._queue.extend(batch)
            frame = self._queue[0]
            if frame.t >= self.end_time:
                return "end of the recorded range"
            now = self.clock()
            if self._pace is None or (self._last_t is not None and not -1.0 <= frame.t - self._last_t <= GAP):
                self._pace = (now, frame.t)  # a gap is skipped, not waited for
            delay = self._pace[0] + (frame.t - self._pace[1]) / self.speed - now
            if delay < -BEHIND:
                self._pace = (now, frame.t)
            elif delay > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), delay)
                except TimeoutError:
                    pass
                continue  # paused, sought or re-timed meanwhile: look again
            self._queue.popleft()
            self._send(frame, now)

    def _send(self, f: Frame, now: float) -> None:
        if self._ts_anchor is None or self._last_t is None or not -1.0 <= f.t - self._last_t <= GAP:
            # Start, seek or gap: timestamps go on one frame (40 ms) after the last ones.
            base = 0 if self._last_video_ts is None else self._last_video_ts + CLOCK // 25
            self._ts_anchor = (base, f.t)
        self._last_t = f.t
        ts = (self._ts_anchor[0] + round((f.t - self._ts_anchor[1]) * CLOCK)) & _WRAP
        if f.kind == "video":
            if self._last_video_ts is not None and ts <= self._last_video_ts:
                ts = self._last_video_ts + 1  # DTS must rise (a rounding tie, a frame too close)
            self._last_video_ts = ts
            pts = (ts + f.cts) & _WRAP
            frame = PsFrame("video", f.codec, f.data, pts, ts if f.cts else None, f.keyframe, SID_VIDEO)
            self._video_codec = f.codec
            ps = self._muxer().mux_video(f.data, pts, ts if f.cts else None, f.keyframe)
            packet = MediaPacket(ps, ts, [frame], f.keyframe, now, False)
        else:
            self._audio_codec = f.codec
            frame = PsFrame("audio", f.codec, f.data, ts, None, False, SID_AUDIO)
            packet = MediaPacket(self._muxer().mux_audio(f.data, ts), ts, [frame], False, now, False)
        self.position = f.t
        self.frames += 1
        self.publish(packet, max(0.0, f.t - self._mark))

    def _muxer(self) -> PsMuxer:
        key = (self._video_codec, self._audio_codec)
        muxer = self._muxers.get(key)
        if muxer is None:
            muxer = self._muxers[key] = PsMuxer(*key)
        return muxer


# -- the node's commands (node.py registers them) ---------------------------------------------------

def _files(args: dict) -> list[PlayedFile]:
    from .node import NodeError

    raw = args.get("files")
    if not isinstance(raw, list) or not raw:
        raise NodeError("command argument 'files' must be a non-empty list of {path, start, end}")
    out = []
    for item in raw:
        try:
            out.append(PlayedFile(str(item["path"]), float(item["start"]), float(item["end"])))
        except (KeyError, TypeError, ValueError):
            raise NodeError(f"each of 'files' needs path, start and end (Unix seconds), not {item!r}") from None
    return out


def _number(args: dict, name: str, default: float | None, lo: float, hi: float) -> float:
    from .node import NodeError

    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise NodeError(f"command argument {name!r} must be a number from {lo:g} to {hi:g}, not {value!r}")
    return float(value)


async def file_play(node: MediaNode, args: dict) -> dict:
    """``file_play {stream, files, from_time, speed, start, end}``: a stream fed from recordings.
    ``start``/``end`` bound the range (seek offsets count from ``start``); by default the files'.
    → ``{port: null, offset, position}``: where it starts (a keyframe), from ``start`` and as time."""
    from .node import NodeError, NodeStream

    key = args.get("stream")
    if not isinstance(key, str) or not key:
        raise NodeError("command argument 'stream' must be a non-empty string")
    files = _files(args)
    start = _number(args, "start", min(f.start for f in files), 0, 1e11)
    end = _number(args, "end", max(f.end for f in files), start, 1e11)
    when = _number(args, "from_time", start, 0, 1e11)
    speed = _number(args, "speed", 1.0, SPEED_MIN, SPEED_MAX)
    if key in node.streams:
        await node._drop(key, "replaced by a new stream of the same key")
    if len(node.streams) >= node.max_streams:
        raise NodeError(f"media node {node.name} carries {len(node.streams)} streams, its limit")
    hub = Stream(key, on_idle=lambda _hub: node._emit({"event": "idle", "stream": key}))
    ns = NodeStream(key, "file", 0, None, hub)

    def publish(packet: MediaPacket, elapsed: float) -> None:
        ns.publish(packet)
        # ``elapsed`` in recorded seconds since the landing point, gaps included.
        ns.mark_ts = (packet.timestamp - round(elapsed * CLOCK)) & _WRAP

    def ended(why: str) -> None:
        # The server's playback ends as after a device's MediaStatus 121 (nodes.py: media_stopped).
        if node.streams.get(key) is ns:
            node._emit({"event": "media_stopped", "stream": key, "age": 0, "reason": why, "file_end": True})

    source = FileSource(SegmentReader(files), start=start, end=end, speed=speed, publish=publish,
                        on_end=ended)
    landed = await source.open(min(max(when, start), end))
    if landed is None or landed >= end:
        await source.stop()
        hub.close("nothing to play")
        raise NodeError(f"none of the {len(files)} recording files of {key} can be read from "
                        f"{when:.0f} on: check that they are on this node's disk")
    ns.source = source
    node.streams[key] = ns
    source.start()
    return {"port": None, "offset": round(landed - start, 3), "position": landed}


async def file_control(node: MediaNode, args: dict) -> dict:
    """``file_control {stream, action, offset, scale}`` (seek / speed / pause / resume)."""
    from .node import NodeError

    ns = node.stream(str(args.get("stream") or ""))
    source = ns.source
    if not isinstance(source, FileSource):
        raise NodeError(f"stream {ns.key} is not played from recordings")
    action = args.get("action")
    if action == "seek":
        offset = _number(args, "offset", None, 0, source.end_time - source.start_time)
        landed = await source.seek(offset)
        if landed is None:
            raise NodeError(f"nothing recorded from offset {offset:g} s of {ns.key} on")
        # `elapsed` counts from the next packet, the first from the new position (a separate
        # `mark` before this command would also count what was sent while the seek ran).
        ns.mark_ts = None
        return {"offset": round(landed, 3), "position": source.start_time + landed}
    if action == "speed":
        source.set_speed(_number(args, "scale", None, SPEED_MIN, SPEED_MAX))
    elif action == "pause":
        source.pause()
    elif action == "resume":
        source.resume()
    else:
        raise NodeError(f"command argument 'action' must be seek, speed, pause or resume, not {action!r}")
    return {"paused": source.paused, "scale": source.speed, "position": source.position}
