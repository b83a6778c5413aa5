"""One MP4 of a time range of platform recordings, remuxed from its segments with PyAV.

Neighbours: the segments are the nodes' fragmented MP4 files (``media.recording``), found
through the index (``record_index``); ``api_recording`` serves the result with aiohttp's
FileResponse, so HTTP Range requests work on it.

No re-encoding: packets are copied. The export starts at the last keyframe at or before the
range's start (a decoder needs it; the file may so begin up to a GOP early) and ends before the
first frame at or after the range's end. Timestamps are wall clock from each segment's start
time, so a gap between segments stays a gap in time (one long frame), and the duration is the
range's. The output is a plain (not fragmented) MP4 with the moov in front (``faststart``,
ISO/IEC 14496-12 §8.2: a player can start before the whole file is there). Segments of another
codec than the first one's are left out: one MP4 track has one sample description here.
"""

from __future__ import annotations

import fractions
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ExportError", "export_range"]

_TB = fractions.Fraction(1, 90000)


class ExportError(RuntimeError):
    """Nothing in the range could be exported; the text says why."""


def export_range(segments: Sequence[tuple[str | os.PathLike[str], float]], start: float,
                 end: float, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Write ``[start, end)`` of ``segments`` ((file, Unix start of its first frame), in time
    order) to ``out``; returns {path, frames, start, end, seconds, codec, bytes}."""
    import av

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    container: Any = None
    ostream: Any = None
    codec = ""
    first_wall: float | None = None
    last_wall = start
    last_dts = -1
    frames = 0
    pending: list[tuple[Any, float]] = []  # the GOP before ``start``, held until start is reached
    try:
        for path, seg_start in segments:
            try:
                source = av.open(str(path))
            except (av.FFmpegError, OSError):
                continue  # deleted or unreadable meanwhile: the rest still exports
            with source:
                if not source.streams.video:
                    continue
                video = source.streams.video[0]
                name = video.codec_context.name
                if ostream is None:
                    container = av.open(str(tmp), "w", format="mp4", options={"movflags": "+faststart"})
                    ostream = container.add_stream_from_template(video)
                    ostream.time_base = _TB
                    if name == "hevc":
                        ostream.codec_tag = "hev1"  # ISO/IEC 14496-15 §8.4.1: parameter sets in-band
                    codec = name
                elif name != codec:
                    continue
                origin: int | None = None
                tb = video.time_base or _TB
                for packet in source.demux(video):
                    if packet.pts is None or packet.size == 0:
                        continue
                    if origin is None:
                        origin = packet.pts
                    wall = seg_start + float((packet.pts - origin) * tb)
                    if wall >= end:
                        break
                    if first_wall is None:
                        if wall < start:
                            if packet.is_keyframe:
                                pending.clear()
                            if packet.is_keyframe or pending:
                                pending.append((packet, wall))
                            continue
                        if packet.is_keyframe:
                            pending.clear()  # a keyframe right at the start needs no earlier GOP
                        elif not pending:
                            continue  # a file starts at a keyframe
                        pending.append((packet, wall))
                        first_wall = pending[0][1]
                        for held, held_wall in pending:
                            last_dts = _mux(container, ostream, held, held_wall - first_wall, last_dts)
                            frames += 1
                        pending.clear()
                        last_wall = wall
                        continue
                    last_dts = _mux(container, ostream, packet, wall - first_wall, last_dts)
                    frames += 1
                    last_wall = wall
        if container is None or frames == 0 or first_wall is None:
            raise ExportError("no recorded video in that range (the segments hold no keyframe "
                              "before its end)")
        container.close()
        container = None
        os.replace(tmp, out)
    finally:
        if container is not None:
            try:
                container.close()
            except Exception:
                pass
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "frames": frames, "start": first_wall, "end": last_wall,
            "seconds": round(last_wall - first_wall, 3), "codec": codec, "bytes": out.stat().st_size}


def _mux(container: Any, stream: Any, packet: Any, offset: float, last_dts: int) -> int:
    ts = max(round(offset * 90000), last_dts + 1)  # rising DTS: the muxer refuses anything else
    packet.stream = stream
    packet.pts = packet.dts = ts
    packet.time_base = _TB
    container.mux(packet)
    return ts
