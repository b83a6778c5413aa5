"""The unit that flows from ingest through the stream hub to every output.

One ``MediaPacket`` is one PS packet as the device sent it — normally one video frame
(GB/T 28181 C.1), or one audio frame — together with what the PS demuxer found in it. The
PS bytes are kept so that an RTP/PS forward (cascade) can re-packetize them without re-muxing;
the demuxed frames feed FLV and the other containers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .ps import PsFrame

__all__ = ["MediaPacket"]


@dataclass(slots=True)
class MediaPacket:
    """One PS packet (one frame) of a live stream."""

    ps: bytes                           # the PS packet bytes, as received
    timestamp: int                      # its RTP timestamp (90 kHz, wraps at 2**32)
    frames: list[PsFrame] = field(default_factory=list)   # demuxed video AU / audio frames
    keyframe: bool = False              # carries a video keyframe (IDR / IRAP): a GOP starts here
    received_at: float = 0.0            # time.monotonic() when the last RTP packet of it arrived
    damaged: bool = False               # a sequence gap fell inside it (dropped before the hub)

    @property
    def size(self) -> int:
        return len(self.ps)
