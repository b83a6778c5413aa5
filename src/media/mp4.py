"""MP4 files of a stream's video, written with PyAV's (FFmpeg's) muxer, not by hand.

``Mp4Writer`` takes the ``MediaPacket`` s of a hub stream (downloads of device recordings, and
the platform's own recording segments: ``recording.py``) and stores their H.264/H.265 access
units as they came, without re-encoding: the file starts at the first keyframe (its parameter
sets become the track's decoder configuration; FFmpeg's mov muxer turns the Annex-B units into
the ISO/IEC 14496-15 length-prefixed form), timestamps are the PS PTS rebased to 0 (90 kHz,
unwrapped, never going back: the muxer wants rising DTS). Audio is left out: G.711 has no
sample entry in MP4 (FFmpeg's mp4 muxer refuses pcm_alaw/pcm_mulaw at any strictness).
``close`` finishes the file (the moov box) and reports what it holds. ``DownloadRecorder`` is
the hub consumer that feeds one (a download's ``record`` command on a media node).

``fragmented=True`` writes a fragmented MP4 (ISO/IEC 14496-12 §8.8: an empty ``moov`` up front,
then one ``moof``+``mdat`` per GOP, each flushed to the file when the next keyframe comes), so
a file cut by a crash keeps every whole GOP before the cut: what recording segments need.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import os
from pathlib import Path
from typing import Any

from .hub import Stream, StreamClosed
from .nal import NalError, iter_nal_units, nal_type, sps_info
from .packet import MediaPacket
from .ps import PsFrame

__all__ = ["FRAGMENTED", "DownloadRecorder", "Mp4Writer", "parameter_sets"]

log = logging.getLogger(__name__)

_TIME_BASE = fractions.Fraction(1, 90000)
_PARAMETER_SETS = {"h264": (7, 8), "h265": (32, 33, 34)}  # SPS/PPS (and VPS for H.265)
_WRAP = 1 << 32
_JUMP = 10 * 90000  # a PTS step beyond 10 s is a discontinuity (a seek), not time passing
_FRAME = 3600  # one frame at 25 fps, the duration guessed for a file of a single frame
#: Muxer options of a fragmented file: a fragment per keyframe, written out (flush_packets) as
#: soon as the muxer finishes it rather than when FFmpeg's 32 KB I/O buffer happens to fill.
FRAGMENTED = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1"}


def parameter_sets(au: bytes, codec: str) -> bytes:
    """The access unit's parameter sets (VPS/SPS/PPS) in Annex-B form; b"" if it has none."""
    sets = _PARAMETER_SETS[codec]
    return b"".join(b"\x00\x00\x00\x01" + nal for nal in iter_nal_units(au)
                    if nal and nal_type(nal, codec) in sets)


class Mp4Writer:
    """See the module docstring. ``write`` each packet, then ``close``; not thread-safe.

    ``metadata`` goes into the file's ``moov`` (``udta``) as FFmpeg metadata tags.
    """

    def __init__(self, path: str | os.PathLike[str], *, fragmented: bool = False,
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.fragmented = fragmented
        self.metadata = metadata or {}
        self.frames = 0
        self.bytes_in = 0
        self.codec: str | None = None
        self.config = b""  # the parameter sets the file was opened with
        self.error = ""  # why the file could not be finished, if it could not
        self._container: Any = None
        self._stream: Any = None
        self._last_raw: int | None = None
        self._ext = 0  # unwrapped PTS
        self._origin: int | None = None
        self._last_pts = -1
        self.closed = False

    @property
    def opened(self) -> bool:
        """The first keyframe came: the file exists."""
        return self._container is not None

    @property
    def seconds(self) -> float:
        """Media time written so far (to the last frame's start)."""
        return max(0, self._last_pts) / 90000

    @property
    def duration(self) -> float:
        """Media time the file covers: up to the end of its last frame (its duration taken as
        the mean frame interval)."""
        if self.frames == 0:
            return 0.0
        step = self._last_pts / (self.frames - 1) if self.frames > 1 else _FRAME
        return (max(0, self._last_pts) + step) / 90000

    def write(self, packet: MediaPacket) -> None:
        if self.closed:
            return
        for f in packet.frames:
            self.write_frame(f, packet.timestamp)

    def write_frame(self, f: PsFrame, timestamp: int) -> bool:
        """Mux one frame (``timestamp``: the packet's, when the frame has no PTS); False when it
        is not written: not video, before the first keyframe, or of another codec."""
        if self.closed or f.stream != "video" or f.codec not in _PARAMETER_SETS or not f.data:
            return False
        if self._container is None:
            if not f.keyframe or not self._open(f.codec, f.data):
                return False  # a file starts at a keyframe with its parameter sets
        elif f.codec != self.codec:
            return False  # a codec change inside one file is not followed
        pts = f.pts if f.pts is not None else timestamp
        # Decoding order is the order received; the composition offset (B-frames) is kept.
        offset = (pts - f.dts) & (_WRAP - 1) if f.dts is not None and f.pts is not None else 0
        self._mux(f.data, pts - offset, offset if offset <= _JUMP else 0, f.keyframe)
        return True

    def _open(self, codec: str, au: bytes) -> bool:
        import av  # FFmpeg through PyAV; imported when the first file is written

        try:
            info = sps_info(au, codec)
        except NalError:
            info = None
        if info is None:
            return False
        config = parameter_sets(au, codec)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        container = av.open(str(self.path), "w", format="mp4",
                            options=dict(FRAGMENTED) if self.fragmented else None)
        try:
            for key, value in self.metadata.items():
                container.metadata[key] = value
            stream = container.add_stream("hevc" if codec == "h265" else "h264")
            stream.width, stream.height = info.width, info.height
            stream.time_base = _TIME_BASE
            stream.codec_context.extradata = config
            if codec == "h265":
                # ISO/IEC 14496-15 §8.4.1: 'hev1', not 'hvc1': the access units keep the VPS/SPS/PPS
                # the device sends before each IDR, which only 'hev1' allows in the samples (with
                # 'hvc1' FFmpeg decodes streams whose parameter sets change with slice errors).
                stream.codec_tag = "hev1"
        except Exception:
            container.close()
            raise
        self._container, self._stream, self.codec, self.config = container, stream, codec, config
        return True

    def _pts(self, raw: int) -> int:
        raw &= _WRAP - 1
        if self._last_raw is not None:
            delta = (raw - self._last_raw) & (_WRAP - 1)
            if delta >= _WRAP // 2:
                delta -= _WRAP
            self._ext += delta if -_JUMP <= delta <= _JUMP else _FRAME  # a jump: one frame on
        else:
            self._ext = raw
        self._last_raw = raw
        if self._origin is None:
            self._origin = self._ext
        return self._ext - self._origin

    def _mux(self, au: bytes, raw_dts: int, offset: int, keyframe: bool) -> None:
        import av

        dts = max(self._pts(raw_dts), self._last_pts + 1)
        self._last_pts = dts
        pkt = av.Packet(au)
        pkt.stream = self._stream
        pkt.dts = dts
        pkt.pts = dts + offset
        pkt.time_base = _TIME_BASE
        pkt.is_keyframe = keyframe
        self._container.mux(pkt)
        self.frames += 1
        self.bytes_in += len(au)

    def close(self) -> dict:
        """Finish the file; what it holds (``path`` None when no keyframe ever came; ``error``
        why it could not be finished — a full disk, a vanished directory — else None)."""
        if not self.closed:
            self.closed = True
            if self._container is not None:
                try:
                    self._container.close()
                except Exception as exc:
                    self.error = str(exc) or type(exc).__name__
                    log.warning("MP4 %s could not be finished: %s", self.path, exc)
        written = self._container is not None and self.path.exists()
        return {"path": str(self.path) if written else None,
                "bytes": self.path.stat().st_size if written else 0,
                "frames": self.frames, "seconds": round(self.seconds, 3), "codec": self.codec,
                "error": self.error or None}


class DownloadRecorder:
    """A hub consumer that writes the stream's video to one MP4 file (the ``record`` command:
    a download of device recordings)."""

    def __init__(self, hub: Stream, path: Path) -> None:
        self.writer = Mp4Writer(path)
        self.consumer = hub.subscribe(f"mp4 {path.name}")
        self.error = ""
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        consumer, writer = self.consumer, self.writer
        try:
            while True:
                try:
                    packet = await consumer.get()
                except StreamClosed:
                    return
                writer.write(packet)
        except Exception as exc:  # FFmpeg refused (a full disk, say): keep the reason, stop
            self.error = str(exc)
            log.warning("MP4 %s: %s", writer.path, exc)
            consumer.close()

    def progress(self) -> dict:
        w = self.writer
        return {"path": str(w.path), "frames": w.frames, "seconds": round(w.seconds, 3),
                "bytes_in": w.bytes_in, "error": self.error or None}

    async def finish(self) -> dict:
        self.consumer.close()
        await asyncio.gather(self.task, return_exceptions=True)
        done = self.writer.close()
        return {**done, "error": self.error or done["error"]}
