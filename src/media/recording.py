"""Recording on a media node: the platform's own segments of a live stream, and downloads.

``SegmentRecorder`` is one hub consumer per recorded stream, a viewer like any other: the
device's one stream is shared with the live viewers and the cascade forwards. It writes the
video to fragmented MP4 segments through ``mp4.Mp4Writer`` (PyAV's muxer; ISO/IEC 14496-12
§8.8, one fragment per GOP), one file per channel per ``segment_seconds`` of wall clock:

    <root>/<channel>/<YYYYMMDD>/<channel>_<YYYYMMDDTHHMMSS>.mp4

named by the Beijing time of the segment's first frame (GB/T 28181-2016 §9.7 gives record
times in local time; this module may not import ``gb28181``, hence its own UTC+8). A segment
is ``<name>.mp4.part`` while it is written and renamed to ``<name>.mp4`` when closed cleanly, so
a ``.part`` found at start-up was cut by a crash: ``repair_segment`` keeps its whole fragments.
Audio is not recorded: G.711 has no MP4 sample entry (see ``mp4.py``).

Segments start at a keyframe: the cached GOP's with ``preroll`` (the seconds before an alarm),
else the next one. A segment ends at the first keyframe at or after the next whole
``segment_seconds`` of wall clock (Beijing time, so hourly files are the clock's hours), at a
codec or parameter-set change (same time, no gap), on a gap — no packet for ``GAP_SECONDS`` —
after which the next segment is ``gap_before``, and when the hub stream closes (the server
starts a new recorder on the new stream, with ``gap_before``). A write that fails (a full disk)
ends the segment as ``failed`` with the error and stops the recorder; nothing is raised into the
hub. Each segment is reported as node events ``{"event": "segment", stream, channel, path (the
.mp4 name, the index's key), part (the .part holding the bytes while open, or after a failure),
start, end, bytes, frames, codec, gap_before, state, error}``: ``open`` when its file is created,
then ``closed`` or ``failed``.

Packets are written in the hub's publish call (``Consumer.listen``): PyAV buffers a fragment in
memory and writes it once per GOP, some tens of kilobytes, which the page cache takes at once.

``probe_segment`` and ``repair_segment`` read files back (PyAV) for the server's index.
The node's ``record``, ``record_start`` and ``record_stop`` commands are carried out here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .beijing import BEIJING
from .hub import Stream, StreamClosed
from .mp4 import FRAGMENTED, DownloadRecorder, Mp4Writer, parameter_sets
from .packet import MediaPacket

if TYPE_CHECKING:
    from .node import MediaNode

__all__ = ["BEIJING", "GAP_SECONDS", "SegmentRecorder", "complete_prefix", "probe_segment",
           "record", "record_start", "record_stop", "recorder_from_args", "repair_segment",
           "segment_path", "segment_start_from_name"]

log = logging.getLogger(__name__)

GAP_SECONDS = 5.0  # no packet for this long closes the segment: the next one has gap_before
_OFFSET = 8 * 3600  # Beijing time minus UTC, in seconds: segment boundaries are local
_NAME = re.compile(r"(?P<channel>[A-Za-z0-9_-]{1,64})_(?P<time>\d{8}T\d{6})(?:-\d+)?\.mp4(?:\.part)?")
_FILE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TAG = "comment"  # the FFmpeg metadata tag (©cmt in udta) carrying the segment's JSON facts
_KEPT = 200  # closed segments a recorder remembers for record_stop (the events told them all)


def segment_path(root: str | os.PathLike[str], channel: str, start: float) -> Path:
    """Where the segment of ``channel`` starting at Unix time ``start`` goes (without .part)."""
    local = datetime.fromtimestamp(start, BEIJING)
    return Path(root) / channel / local.strftime("%Y%m%d") / f"{channel}_{local:%Y%m%dT%H%M%S}.mp4"


def segment_start_from_name(path: str | os.PathLike[str]) -> tuple[str, float] | None:
    """(channel, Unix start to the second) read from a segment's file name, or None."""
    m = _NAME.fullmatch(Path(path).name)
    if m is None:
        return None
    local = datetime.strptime(m["time"], "%Y%m%dT%H%M%S").replace(tzinfo=BEIJING)
    return m["channel"], local.timestamp()


def _boundary(start: float, seconds: int) -> float:
    """The first whole ``seconds`` of Beijing wall clock after ``start`` (Unix seconds)."""
    return (math.floor((start + _OFFSET) / seconds) + 1) * seconds - _OFFSET


class SegmentRecorder:
    """See the module docstring. ``start()`` on the event loop, ``await stop()`` to finish.

    ``clock`` is the wall clock (Unix seconds); ``tick(now)`` checks for a gap (the recorder's
    own task calls it every second; tests call it with an injected time).
    """

    def __init__(self, hub: Stream, channel: str, root: str | os.PathLike[str], *,
                 stream_key: str | None = None, segment_seconds: int = 3600, preroll: bool = False,
                 gap_before: bool = False, gap_seconds: float = GAP_SECONDS,
                 on_event: Callable[[dict], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if not _FILE_NAME.fullmatch(channel):
            raise ValueError(f"channel {channel!r} cannot name a file: use 1-64 letters, digits, '-' or '_'")
        if segment_seconds < 1:
            raise ValueError(f"segment_seconds must be at least 1, not {segment_seconds}")
        self.hub = hub
        self.channel = channel
        self.root = Path(root)
        self.stream_key = stream_key or hub.key
        self.segment_seconds = segment_seconds
        self.preroll = preroll
        self.gap_seconds = gap_seconds
        self.on_event = on_event
        self.clock = clock
        self.closed: list[dict] = []  # the segments finished (closed or failed), oldest first
        self.error = ""  # why recording stopped by itself (a write failed), else ""
        self.stopped = False
        self._gap_next = gap_before  # the next segment follows a gap
        self._writer: Mp4Writer | None = None
        self._final: Path | None = None  # the open segment's .mp4 name
        self._start = 0.0  # wall time of the open segment's first frame
        self._until = 0.0  # the wall-clock boundary that ends the open segment
        self._last_at: float | None = None  # wall time of the newest packet
        self._consumer = hub.subscribe(f"record {channel}")
        self._task: asyncio.Task | None = None

    # -- life ------------------------------------------------------------------------------
    def start(self) -> None:
        """Take the cached GOP (``preroll``) or skip it, then follow the stream."""
        consumer = self._consumer
        cached: list[MediaPacket] = []
        try:
            while (pkt := consumer.get_nowait()) is not None:
                cached.append(pkt)
        except StreamClosed:
            self._end("the stream closed before recording started")
            return
        if self.preroll and cached:
            # The cache came before now: date each packet back by its media time to the newest.
            now = self.clock()
            newest = cached[-1].timestamp
            for pkt in cached:
                back = ((newest - pkt.timestamp) & 0xFFFFFFFF) / 90000
                self._packet(pkt, now - (back if back < 60 else 0.0))
                if self.stopped:
                    return
        consumer.listen(self._on_publish)
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> list[dict]:
        """Close the open segment and leave the stream; every segment this recorder finished."""
        self._end("")
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return list(self.closed)

    def _end(self, error: str) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.error = error
        self._consumer.listen(None)
        self._consumer.close()
        self._close_segment("closed")

    async def _watch(self) -> None:
        while not self.stopped:
            await asyncio.sleep(min(1.0, self.gap_seconds / 2))
            self.tick(self.clock())

    def tick(self, now: float) -> None:
        """Close the open segment when no packet came for ``gap_seconds``."""
        if self._writer is not None and self._last_at is not None and now - self._last_at > self.gap_seconds:
            log.info("recording %s: no packet for %.1f s, segment closed", self.channel, now - self._last_at)
            self._close_segment("closed")
            self._gap_next = True

    def progress(self) -> dict:
        w = self._writer
        return {"channel": self.channel, "recording": not self.stopped, "error": self.error or None,
                "path": str(self._final) if self._final else None,
                "frames": w.frames if w else 0, "seconds": round(w.duration, 3) if w else 0.0,
                "segments": len(self.closed)}

    # -- packets ---------------------------------------------------------------------------
    def _on_publish(self) -> None:
        """The hub's listener: take what is ready; never raises into the publisher."""
        try:
            while (pkt := self._consumer.get_nowait()) is not None:
                self._packet(pkt, self.clock())
                if self.stopped:
                    return
        except StreamClosed:
            self._end("")  # the stream ended (a restart is a new recorder, with gap_before)
        except Exception as exc:  # a bug, not the disk (_write catches that): stop, say why
            log.exception("recording %s failed", self.channel)
            self._fail(f"{type(exc).__name__}: {exc}")

    def _packet(self, pkt: MediaPacket, now: float) -> None:
        if self._writer is not None and self._last_at is not None and now - self._last_at > self.gap_seconds:
            self.tick(now)  # the watch task has not seen the gap yet
        self._last_at = now
        for f in pkt.frames:
            if f.stream != "video" or not f.data:
                continue
            w = self._writer
            if w is not None and f.keyframe and (
                    now >= self._until or f.codec != w.codec or self._new_parameters(f.data, f.codec)):
                self._close_segment("closed")
                w = None
            if w is None:
                if not f.keyframe or f.codec not in ("h264", "h265"):
                    continue  # a segment starts at a keyframe
                w = self._open_segment(now)
            try:
                w.write_frame(f, pkt.timestamp)
            except Exception as exc:  # ENOSPC, EACCES, a vanished directory: FFmpeg's error
                self._fail(str(exc) or type(exc).__name__)
                return
            if not w.opened:
                self._writer = None  # no SPS in the keyframe to open the file with: the next one
            elif w.frames == 1:
                self._emit(self._segment("open"))

    def _new_parameters(self, au: bytes, codec: str) -> bool:
        w = self._writer
        if w is None or not w.config:
            return False
        sets = parameter_sets(au, codec)
        return bool(sets) and sets != w.config

    def _open_segment(self, now: float) -> Mp4Writer:
        final = base = segment_path(self.root, self.channel, now)
        n = 1
        while final.exists() or final.with_name(final.name + ".part").exists():
            n += 1  # two segments in one second (a gap or a codec change): a suffix tells them apart
            final = base.with_name(f"{base.stem}-{n}.mp4")
        facts = {"channel": self.channel, "start": round(now, 6), "gap_before": self._gap_next}
        self._writer = Mp4Writer(final.with_name(final.name + ".part"), fragmented=True,
                                 metadata={_TAG: json.dumps(facts)})
        self._final, self._start = final, now
        self._until = _boundary(now, self.segment_seconds)
        return self._writer

    def _segment(self, state: str, error: str = "") -> dict:
        w, final = self._writer, self._final
        assert w is not None and final is not None
        part = None if state == "closed" else w.path
        try:
            size = (part or final).stat().st_size
        except OSError:
            size = 0
        return {"event": "segment", "stream": self.stream_key, "channel": self.channel,
                "path": str(final), "part": str(part) if part else None,
                "start": self._start, "end": self._start + w.duration,
                "bytes": size, "frames": w.frames, "codec": w.codec, "gap_before": self._gap_next,
                "state": state, "error": error or None}

    def _close_segment(self, state: str, error: str = "") -> None:
        """Finish the open segment (if its file was made) and report it."""
        w = self._writer
        if w is None:
            return
        if not w.opened:
            self._writer = None
            return
        done = w.close()
        if state == "closed" and done["error"] is None:
            try:
                assert self._final is not None
                os.replace(w.path, self._final)
            except OSError as exc:
                error = f"cannot rename {w.path.name}: {exc}"
        if state == "closed" and (done["error"] or error):
            state, error = "failed", done["error"] or error
        event = self._segment(state, error)
        self._writer, self._final = None, None
        self._gap_next = False
        self.closed.append(event)
        del self.closed[:-_KEPT]
        self._emit(event)
        if state == "failed":
            self.error = error
            log.warning("recording %s: segment %s failed: %s", self.channel, event["path"], error)

    def _fail(self, error: str) -> None:
        if self._writer is not None and self._writer.opened:
            # What can still be finished is (_close_segment closes it); the .part stays for repair.
            self._close_segment("failed", error)
        else:
            # The file could not even be made (a read-only or full directory): say so all the same.
            path = self._final or self.root
            self._writer = self._final = None
            event = {"event": "segment", "stream": self.stream_key, "channel": self.channel,
                     "path": str(path), "part": None, "start": self._start, "end": self._start, "bytes": 0,
                     "frames": 0, "codec": None, "gap_before": self._gap_next, "state": "failed",
                     "error": error}
            self.closed.append(event)
            self._emit(event)
        self._end(error)

    def _emit(self, event: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("segment event handler of %s", self.channel)


# -- reading segments back -----------------------------------------------------------------

def probe_segment(path: str | os.PathLike[str]) -> dict | None:
    """What a segment file holds, read with PyAV: ``{path, channel, start, end, bytes, frames,
    codec, gap_before}``; None when it is not a readable MP4 with video. ``start`` comes from the
    facts the recorder stored in the file, else from its name (to the second)."""
    import av

    p = Path(path)
    try:
        container = av.open(str(p))
    except (av.FFmpegError, OSError):
        return None
    with container:
        if not container.streams.video:
            return None
        vs = container.streams.video[0]
        facts: dict[str, Any] = {}
        try:
            facts = json.loads(container.metadata.get(_TAG, "") or "{}")
        except ValueError:
            pass
        first = last = None
        frames = 0
        try:
            for pkt in container.demux(vs):
                if pkt.size == 0 or pkt.pts is None:
                    continue
                frames += 1
                first = pkt.pts if first is None else min(first, pkt.pts)
                last = pkt.pts if last is None else max(last, pkt.pts)
        except (av.FFmpegError, OSError):
            pass  # a broken tail: what came before it counts
        if frames == 0 or first is None or last is None or vs.time_base is None:
            return None
        tb = float(vs.time_base)
        step = (last - first) / (frames - 1) if frames > 1 else 0.04 / tb
        codec = "h265" if vs.codec_context.name == "hevc" else vs.codec_context.name
    named = segment_start_from_name(p)
    start = facts.get("start")
    if not isinstance(start, (int, float)):
        if named is None:
            return None
        start = named[1]
    channel = facts.get("channel") or (named[0] if named else None)
    return {"path": str(p), "channel": channel, "start": float(start),
            "end": float(start) + (last - first + step) * tb, "bytes": p.stat().st_size,
            "frames": frames, "codec": codec, "gap_before": bool(facts.get("gap_before"))}


def complete_prefix(path: str | os.PathLike[str]) -> int:
    """Bytes of the file made of whole top-level boxes (ISO/IEC 14496-12 §4.2), a ``moof`` only
    with its ``mdat`` after it: where a file cut mid-fragment is trimmed to."""
    good = pos = 0
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        while pos + 8 <= size:
            f.seek(pos)
            head = f.read(16)
            box = int.from_bytes(head[:4], "big")
            kind = head[4:8]
            if box == 1 and len(head) == 16:  # a 64-bit largesize follows the type
                box = int.from_bytes(head[8:16], "big")
            elif box == 0:  # "to the end of the file": a muxer that never came back to it
                box = size - pos
            if box < 8 or pos + box > size:
                break
            pos += box
            if kind != b"moof":
                good = pos
    return good


def repair_segment(part_path: str | os.PathLike[str]) -> dict | None:
    """Turn a ``.part`` cut by a crash into a clean ``.mp4`` (its whole fragments remuxed with
    PyAV, the broken tail dropped), delete the ``.part`` and return ``probe_segment`` of the new
    file; None (the .part deleted too) when nothing in it was readable."""
    import av

    part = Path(part_path)
    if not part.name.endswith(".part"):
        raise ValueError(f"{part} is not a .part segment: only files cut while open are repaired")
    final = part.with_name(part.name[: -len(".part")])
    temp = part.with_name(final.name + ".repairing")  # a crash here leaves the .part to redo it
    try:
        keep = complete_prefix(part)
        if keep < os.path.getsize(part):
            os.truncate(part, keep)
        copied = _remux(part, temp) if keep else 0
    except (av.FFmpegError, OSError) as exc:
        log.warning("segment %s cannot be repaired: %s", part, exc)
        copied = 0
    if copied:
        os.replace(temp, final)
    else:
        temp.unlink(missing_ok=True)
    part.unlink(missing_ok=True)
    return probe_segment(final) if copied else None


def _remux(source: Path, target: Path) -> int:
    """Copy the video packets of ``source`` to a fragmented ``target`` until the first read
    error; the packets copied."""
    import av

    copied = 0
    with av.open(str(source)) as src:
        if not src.streams.video:
            return 0
        vin = src.streams.video[0]
        out = av.open(str(target), "w", format="mp4", options=dict(FRAGMENTED))
        try:
            for key, value in src.metadata.items():
                if key not in ("major_brand", "minor_version", "compatible_brands", "encoder"):
                    out.metadata[key] = value
            vout = out.add_stream_from_template(vin)
            try:
                for pkt in src.demux(vin):
                    if pkt.dts is None or pkt.size == 0:
                        continue
                    pkt.stream = vout
                    out.mux(pkt)
                    copied += 1
            except (av.FFmpegError, OSError) as exc:
                log.info("segment %s: read stopped after %d frames: %s", source, copied, exc)
        finally:
            out.close()
    return copied


# -- node commands ---------------------------------------------------------------------------

def recorder_from_args(hub: Stream, args: dict, on_event: Callable[[dict], None]) -> SegmentRecorder:
    """A started ``SegmentRecorder`` from the ``record_start`` command's arguments
    ``{stream, channel, root, segment_seconds, preroll, gap_before}``; ValueError says which
    argument is wrong."""
    channel, root = args.get("channel"), args.get("root")
    if not isinstance(channel, str) or not _FILE_NAME.fullmatch(channel):
        raise ValueError(f"command argument 'channel' must be 1-64 letters, digits, '-' or '_', not {channel!r}")
    if not isinstance(root, str) or not root:
        raise ValueError(f"command argument 'root' must be the records directory, not {root!r}")
    seconds = args.get("segment_seconds", 3600)
    if not isinstance(seconds, int) or isinstance(seconds, bool) or not 1 <= seconds <= 86400:
        raise ValueError(f"command argument 'segment_seconds' must be an integer from 1 to 86400, not {seconds!r}")
    flags = {name: args.get(name, False) for name in ("preroll", "gap_before")}
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"command argument {name!r} must be true or false, not {value!r}")
    rec = SegmentRecorder(hub, channel, root, stream_key=hub.key, segment_seconds=seconds,
                          on_event=on_event, **flags)
    rec.start()
    return rec


def record(node: MediaNode, args: dict) -> dict:
    """``record {stream, name}``: the stream's video to ``<data_dir>/downloads/<name>.mp4``
    until it closes (a download of device recordings)."""
    from .node import NodeError, _str

    ns = node.stream(_str(args, "stream"))
    name = _str(args, "name")
    if not _FILE_NAME.fullmatch(name):
        raise NodeError("command argument 'name' must be 1-64 letters, digits, '-' or '_'")
    if ns.recorder is not None:
        raise NodeError(f"stream {ns.key} is already being recorded")
    ns.recorder = DownloadRecorder(ns.hub, node.data_dir / "downloads" / f"{name}.mp4")
    return {"path": str(ns.recorder.writer.path)}


def record_start(node: MediaNode, args: dict) -> dict:
    """``record_start``: record the stream into segments; again while it records: nothing more."""
    from .node import NodeError, _str

    ns = node.stream(_str(args, "stream"))
    if ns.segments is None or ns.segments.stopped:
        try:
            ns.segments = recorder_from_args(ns.hub, args, node._emit)
        except (ValueError, StreamClosed) as exc:
            raise NodeError(f"cannot record {ns.key}: {exc}") from None
    return {"recording": True}


async def record_stop(node: MediaNode, args: dict) -> dict:
    """``record_stop {stream}`` → ``{segments}``: the segments the recorder finished."""
    from .node import _str

    ns = node.streams.get(_str(args, "stream"))
    rec = ns.segments if ns is not None else None
    if ns is None or rec is None:
        return {"segments": []}
    ns.segments = None
    return {"segments": await rec.stop()}
