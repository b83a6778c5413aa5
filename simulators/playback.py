"""History playback and download on a simulated device (GB/T 28181-2016 §9.8, §9.9, Annex B).

A ``Playback`` or ``Download`` INVITE asks for the recording of a channel between ``t=<start>
<end>`` (Unix seconds). The simulator "recorded" its looping clip all the time: recorded frame
``F`` (``F / fps`` seconds since the epoch) is clip picture ``F mod len(clip)``, so any range can
be played, and every frame's SEI carries its recorded time (``simulators.media`` SEI, whose time
field is the recorded time here, not the send time) so a test can check where a seek landed.

``PlaybackSender`` paces one such stream on its own (live streams share ``MediaSender``): it
starts at the keyframe at or before the asked time, sends ``fps × scale`` frames per second
(``a=downloadspeed:N`` for a download is a scale of N), obeys the MANSRTSP controls of Annex B
(``control``): PAUSE, PLAY to resume, PLAY with ``Range: npt=`` to seek (to the keyframe at or
before the target), PLAY with ``Scale``, TEARDOWN (stops sending), and calls ``on_end`` once
the range is sent, when the device reports MediaStatus 121 (§9.8.2 / A.2.5).

With a recording index (``--records``: ``spans`` are its files in the range, Unix seconds) the
device plays only what it recorded, as an NVR does: a gap between files is skipped to the next
file's first keyframe, a seek into a gap lands there too, and a range with no file left ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gb28181.mansrtsp import Control
from media.ps import PsMuxer

from .media import CLOCK, MediaSender, SimStream, VideoClip, _template

__all__ = ["PlaybackSender"]

log = logging.getLogger("simulators.playback")

_PTS_BASE = 10 * CLOCK  # PTS at the keyframe the stream starts from (clear of 0 after seeks back)


class PlaybackSender:
    """One playback/download stream's pacing; the ``sender`` a ``SimStream`` starts with."""

    def __init__(self, media: MediaSender, *, start: int, end: int, scale: float = 1.0,
                 on_end: Callable[[], None] | None = None,
                 spans: list[tuple[float, float]] | None = None) -> None:
        self.media = media
        self.fps = media.fps
        self.start_frame = start * self.fps
        self.end_frame = end * self.fps
        self.scale = scale
        self.paused = False
        self.stopped = False
        self.on_end = on_end
        self.frame: int | None = None  # recorded frame sent next (absolute, F)
        self.first_frame: int | None = None  # where the stream started (PTS origin)
        self.frames_sent = 0
        self.ended = False
        self.seek_to: float | None = None
        self._muxer = PsMuxer(media.codec, None)
        self._stream: SimStream | None = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self.spans = sorted(spans) if spans is not None else None
        self.skipped = 0  # gaps jumped over

    # -- the SimStream sender interface ----------------------------------------------------------
    def add(self, stream: SimStream) -> None:
        stream.waiting_key = True
        self._stream = stream
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def discard(self, stream: SimStream) -> None:
        if stream is self._stream:
            self._stream = None
            if self._task is not None:
                self._task.cancel()

    # -- control (Annex B) -------------------------------------------------------------------------
    def control(self, c: Control) -> None:
        action = c.action
        if action == "pause":
            self.paused = True
        elif action in ("resume", "play"):
            self.paused = False
        elif action == "seek":
            self.seek_to = c.npt
            self.paused = False
        elif action == "speed" and c.scale is not None:
            self.scale = abs(c.scale)  # reverse play is not simulated: forward at that speed
        elif action == "teardown":
            self.stopped = True
        self._wake.set()

    def recorded_time(self) -> float | None:
        """Recorded time (Unix seconds) of the next frame, None before the first."""
        return None if self.frame is None else self.frame / self.fps

    # -- pacing ------------------------------------------------------------------------------------
    def _recorded(self, clip: VideoClip, frame: int) -> int | None:
        """``frame`` if it was recorded, else the first keyframe of the next file (None: no
        file left in the range)."""
        if self.spans is None:
            return frame
        t = frame / self.fps
        for lo, hi in self.spans:
            if lo <= t < hi:
                return frame
            if lo > t:
                self.skipped += 1
                first = int(lo * self.fps)
                count = len(clip)
                ahead = next((n for n in range(count) if clip.keyframes[(first + n) % count]), 0)
                return first + ahead
        return None

    @staticmethod
    def _keyframe_at_or_before(clip: VideoClip, frame: int) -> int:
        count = len(clip)
        for back in range(count):
            if clip.keyframes[(frame - back) % count]:
                return frame - back
        return frame

    async def _run(self) -> None:
        try:
            clip = await self.media.prepare()
        except Exception as exc:
            log.error("cannot encode the simulator clip: %s", exc)
            return
        self.frame = self.first_frame = self._keyframe_at_or_before(clip, self.start_frame)
        loop = asyncio.get_running_loop()
        due = loop.time()
        while not self.stopped:
            if self.seek_to is not None:
                target = self.start_frame + int(self.seek_to * self.fps)
                self.seek_to = None
                self.frame = self._keyframe_at_or_before(clip, min(target, self.end_frame - 1))
            if self.paused:
                self._wake.clear()
                await self._wake.wait()
                due = loop.time()
                continue
            recorded = self._recorded(clip, self.frame)
            if recorded is None or recorded >= self.end_frame:
                self.frame = self.end_frame
            else:
                self.frame = recorded
            if self.frame >= self.end_frame:
                self.ended = True
                if self.on_end is not None:
                    self.on_end()
                return
            self._send(clip, self.frame)
            self.frame += 1
            self.frames_sent += 1
            due += 1.0 / (self.fps * self.scale)
            delay = due - loop.time()
            if delay < -1.0:
                due = loop.time()  # an overloaded host: slip, don't burst
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, delay))
                due = loop.time()  # a control arrived: act on it at once
            except TimeoutError:
                pass

    def _send(self, clip: VideoClip, frame: int) -> None:
        stream = self._stream
        if stream is None:
            return
        assert self.first_frame is not None
        index = frame % len(clip)
        keyframe = clip.keyframes[index]
        recorded_ns = frame * 1_000_000_000 // self.fps
        au = clip.access_unit(index, frame, recorded_ns)
        pts = _PTS_BASE + (frame - self.first_frame) * CLOCK // self.fps
        video = _template(self._muxer.mux_video(au, pts, keyframe=keyframe))
        try:
            stream.deliver([(pts & 0xFFFFFFFF, video, True)], keyframe, False)
        except Exception as exc:  # a broken socket ends this stream only
            stream.error = f"send failed: {exc}"
            stream.close()
