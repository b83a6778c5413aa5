"""What a simulated device has recorded: a deterministic recording index per channel.

A channel records continuously into files of ``SEGMENT_SECONDS`` (30 min) on a grid shifted
by a per-channel number of minutes, so that one file of every day crosses midnight. Derived
from a stable hash of the channel ID and the slot number (never Python's salted ``hash``), so
a test computes the same list as the simulator without asking it:

- about one slot in ten has no file at all (recording was off: a gap of 30 min or more);
- about one file in six stops early (a gap of 1 to 20 min before the next file);
- about one file in eight is an ``alarm`` recording, one in twenty-five ``manual``, the rest
  ``time`` (the Type values of GB/T 28181-2016 Annex A.2.6.6).

``RecordIndex(channel_id, days, now)`` holds the files of the last ``days`` days (from Beijing
midnight ``days`` days before ``now``) that are finished by ``now``. ``segments(start, end,
type)`` lists those overlapping a range, ``covering(t)`` the file being played at ``t``
(playback uses it). The fleet (``fleet.py``) answers RecordInfo queries from it, in parts
shaped by the vendor (``vendors.py``) with :func:`record_bodies`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gb28181 import manscdp
from gb28181.manscdp import BEIJING

__all__ = [
    "SEGMENT_SECONDS",
    "RecordIndex",
    "Segment",
    "parts_within",
    "record_bodies",
    "record_item",
]

#: Length of one recorded file.
SEGMENT_SECONDS = 1800
#: Bytes a second of recording takes (a 2 Mbit/s stream), for ``<FileSize>``.
BYTES_PER_SECOND = 250_000
#: Where slot 0 of every channel starts, before the channel's shift.
_EPOCH = datetime(2020, 1, 1, tzinfo=BEIJING)
_LABELS = {"time": "定时录像", "alarm": "报警录像", "manual": "手动录像"}


@dataclass(frozen=True, slots=True)
class Segment:
    """One recorded file; times are aware datetimes in Beijing time."""

    start: datetime
    end: datetime
    type: str
    name: str
    file_path: str

    @property
    def seconds(self) -> int:
        return int((self.end - self.start).total_seconds())

    @property
    def file_size(self) -> int:
        return self.seconds * BYTES_PER_SECOND


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _aware(t: datetime | float) -> datetime:
    if isinstance(t, datetime):
        return t if t.tzinfo is not None else t.replace(tzinfo=BEIJING)
    return datetime.fromtimestamp(t, BEIJING)


class RecordIndex:
    """The recordings of one channel over the last ``days`` days up to ``now``."""

    def __init__(self, channel_id: str, days: int, now: datetime | float) -> None:
        self.channel_id = channel_id
        self.days = max(0, int(days))
        self.now = _aware(now).astimezone(BEIJING)
        midnight = self.now.replace(hour=0, minute=0, second=0, microsecond=0)
        #: Start of the index: files starting earlier are not kept.
        self.first = midnight - timedelta(days=self.days)
        #: This channel's grid: slot k starts at origin + k × SEGMENT_SECONDS.
        self.origin = _EPOCH + timedelta(minutes=1 + _digest(channel_id) % 29)

    def _slot_of(self, t: datetime) -> int:
        return int((t - self.origin).total_seconds() // SEGMENT_SECONDS)

    def _segment(self, k: int) -> Segment | None:
        """The file of slot ``k``, or None when that slot was not recorded."""
        r = _digest(f"{self.channel_id}/{k}")
        if r % 10 == 0:
            return None
        start = self.origin + timedelta(seconds=k * SEGMENT_SECONDS)
        end = start + timedelta(seconds=SEGMENT_SECONDS)
        if (r >> 8) % 6 == 0:
            end -= timedelta(minutes=1 + (r >> 16) % 20)
        pick = (r >> 24) % 200
        kind = "alarm" if pick < 25 else "manual" if pick < 33 else "time"
        return Segment(start, end, kind, f"{_LABELS[kind]} {start:%Y%m%d%H%M%S}",
                       f"/record/{self.channel_id}/{start:%Y%m%d}/{start:%H%M%S}.ps")

    def segments(self, start: datetime | float | None = None, end: datetime | float | None = None,
                 type: str = "all") -> list[Segment]:
        """Files overlapping ``[start, end]`` (default: the whole index) of ``type`` (all, time,
        alarm, manual), by start time."""
        if self.days == 0:
            return []
        lo = max(self.first, _aware(start)) if start is not None else self.first
        hi = min(self.now, _aware(end)) if end is not None else self.now
        if hi < lo:
            return []
        out = []
        for k in range(self._slot_of(lo) - 1, self._slot_of(hi) + 1):
            seg = self._segment(k)
            if seg is None or seg.start < self.first or seg.end > self.now:
                continue
            if seg.start < hi and seg.end > lo and type in ("all", seg.type):
                out.append(seg)
        return out

    def covering(self, t: datetime | float) -> Segment | None:
        """The file that holds instant ``t``, or None in a gap or outside the index."""
        t = _aware(t)
        if self.days == 0 or not self.first <= t < self.now:
            return None
        seg = self._segment(self._slot_of(t))
        if seg is None or seg.start < self.first or seg.end > self.now or not seg.start <= t < seg.end:
            return None
        return seg


# --------------------------------------------------------------------------- on the wire


def record_item(seg: Segment, channel_id: str, *, address: str = "", recorder_id: str = "") -> manscdp.Node:
    """A file's ``<Item>`` in the order of Annex A.2.6.6."""
    return manscdp.Node({}, [
        ("DeviceID", channel_id), ("Name", seg.name), ("FilePath", seg.file_path),
        ("Address", address), ("StartTime", manscdp.format_time(seg.start)),
        ("EndTime", manscdp.format_time(seg.end)), ("Secrecy", 0), ("Type", seg.type),
        ("RecorderID", recorder_id or channel_id), ("FileSize", seg.file_size)])


def parts_within(render: Callable[[Sequence[Any]], bytes], items: Sequence[Any], per: int,
                 budget: int) -> list[bytes]:
    """``items`` rendered ``per`` to a part (0: all), each part shrunk until it fits ``budget``
    bytes (a UDP datagram); Annex N's multi-part answers."""
    total = len(items)
    per = per or total
    bodies: list[bytes] = []
    start = 0
    while start < total:
        n = min(per, total - start)
        body = render(items[start:start + n])
        while len(body) > budget and n > 1:
            n = min(n - 1, max(1, n * budget // len(body)))
            body = render(items[start:start + n])
        bodies.append(body)
        start += n
    return bodies


def record_bodies(body: Callable[[list[tuple[str, Any]]], bytes], channel_id: str, name: str,
                  segments: Sequence[Segment], *, per: int, budget: int,
                  address: str = "") -> list[bytes]:
    """The Response parts of a RecordInfo answer (Annex A.2.6.6): ``SumNum`` and a
    ``<RecordList Num=…>`` in each; no files at all is SumNum 0 with an empty list.

    ``body(fields)`` writes one Response body in the vendor's shape.
    """
    total = len(segments)

    def render(chunk: Sequence[Segment]) -> bytes:
        items = [("Item", record_item(seg, channel_id, address=address)) for seg in chunk]
        return body([("Name", name), ("SumNum", total),
                     ("RecordList", manscdp.Node({"Num": len(items)}, items))])

    if not segments:
        return [render([])]
    return parts_within(render, segments, per, budget)
