"""MP4 files of a stream's video, written with PyAV's (FFmpeg's) muxer, not by hand.

``Mp4Writer`` takes the ``MediaPacket`` s of a hub stream (downloads of device recordings now,
platform recording later) and stores their H.264/H.265 access units as they came, without
re-encoding: the file starts at the first keyframe (its parameter sets become the track's
decoder configuration; FFmpeg's mov muxer turns the Annex-B units into the ISO/IEC 14496-15
length-prefixed form), timestamps are the PS PTS rebased to 0 (90 kHz, unwrapped, never
going back: the muxer wants rising DTS). Audio is left out: G.711 has no place in MP4.
``close`` finishes the file (the moov box) and reports what it holds.
"""

from __future__ import annotations

import fractions
import logging
import os
from pathlib import Path
from typing import Any

from .nal import NalError, iter_nal_units, nal_type, sps_info
from .packet import MediaPacket

__all__ = ["Mp4Writer"]

log = logging.getLogger(__name__)

_TIME_BASE = fractions.Fraction(1, 90000)
_PARAMETER_SETS = {"h264": (7, 8), "h265": (32, 33, 34)}  # SPS/PPS (and VPS for H.265)
_WRAP = 1 << 32
_JUMP = 10 * 90000  # a PTS step beyond 10 s is a discontinuity (a seek), not time passing


class Mp4Writer:
    """See the module docstring. ``write`` each packet, then ``close``; not thread-safe."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.frames = 0
        self.bytes_in = 0
        self.codec: str | None = None
        self._container: Any = None
        self._stream: Any = None
        self._last_raw: int | None = None
        self._ext = 0  # unwrapped PTS
        self._origin: int | None = None
        self._last_pts = -1
        self.closed = False

    @property
    def seconds(self) -> float:
        """Media time written so far."""
        return max(0, self._last_pts) / 90000

    def write(self, packet: MediaPacket) -> None:
        if self.closed:
            return
        for f in packet.frames:
            if f.stream != "video" or f.codec not in _PARAMETER_SETS or not f.data:
                continue
            if self._container is None:
                if not f.keyframe or not self._open(f.codec, f.data):
                    continue  # a file starts at a keyframe with its parameter sets
            elif f.codec != self.codec:
                continue  # a codec change inside one file is not followed
            self._mux(f.data, f.pts if f.pts is not None else packet.timestamp, f.keyframe)

    def _open(self, codec: str, au: bytes) -> bool:
        import av  # FFmpeg through PyAV; imported when the first file is written

        try:
            info = sps_info(au, codec)
        except NalError:
            info = None
        if info is None:
            return False
        sets = _PARAMETER_SETS[codec]
        config = b"".join(b"\x00\x00\x00\x01" + nal for nal in iter_nal_units(au)
                          if nal and nal_type(nal, codec) in sets)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        container = av.open(str(self.path), "w", format="mp4")
        stream = container.add_stream("hevc" if codec == "h265" else "h264")
        stream.width, stream.height = info.width, info.height
        stream.time_base = _TIME_BASE
        stream.codec_context.extradata = config
        if codec == "h265":
            stream.codec_tag = "hvc1"  # what QuickTime and browsers expect (ISO/IEC 14496-15 8.4)
        self._container, self._stream, self.codec = container, stream, codec
        return True

    def _pts(self, raw: int) -> int:
        raw &= _WRAP - 1
        if self._last_raw is not None:
            delta = (raw - self._last_raw) & (_WRAP - 1)
            if delta >= _WRAP // 2:
                delta -= _WRAP
            self._ext += delta if -_JUMP <= delta <= _JUMP else 3600  # a jump: one frame on
        else:
            self._ext = raw
        self._last_raw = raw
        if self._origin is None:
            self._origin = self._ext
        return self._ext - self._origin

    def _mux(self, au: bytes, raw_pts: int, keyframe: bool) -> None:
        import av

        pts = max(self._pts(raw_pts), self._last_pts + 1)
        self._last_pts = pts
        pkt = av.Packet(au)
        pkt.stream = self._stream
        pkt.pts = pkt.dts = pts
        pkt.time_base = _TIME_BASE
        pkt.is_keyframe = keyframe
        self._container.mux(pkt)
        self.frames += 1
        self.bytes_in += len(au)

    def close(self) -> dict:
        """Finish the file; what it holds (``path`` None when no keyframe ever came)."""
        if not self.closed:
            self.closed = True
            if self._container is not None:
                try:
                    self._container.close()
                except Exception as exc:  # a full disk, a vanished directory: say so, once
                    log.warning("MP4 %s could not be finished: %s", self.path, exc)
        written = self._container is not None and self.path.exists()
        return {"path": str(self.path) if written else None,
                "bytes": self.path.stat().st_size if written else 0,
                "frames": self.frames, "seconds": round(self.seconds, 3), "codec": self.codec}
