"""Record search: asking a device which recordings it holds for a channel (RecordInfo, §9.7).

A platform finds history video by sending ``<Query><CmdType>RecordInfo</CmdType>`` with the
channel as DeviceID, a time range and filters (GB/T 28181-2016 Annex A.2.4.5); the device
answers 200 and then sends the file list in one or more ``<Response>`` MESSAGEs with the
query's SN, the total ``SumNum`` and a ``<RecordList Num="n">`` of Items each (Annex A.2.6.6,
Annex N). This module has three parts:

- ``RecordQuery``: what is asked (range, type, the optional fields of A.2.4.5), read from
  the API's parameters, written as query fields, and ``split_range`` which cuts a range
  longer than ``records.max_query_span`` into several queries (NVRs refuse or truncate long
  ranges).
- ``RecordCollector``: sans-IO gathering of one answer's parts. Parts may come in any size,
  out of order or twice; an exact repeat of a part is dropped (UDP retransmission by the
  device's application), everything else is kept as the device sent it, overlapping files
  included. The answer is complete when SumNum items are in (SumNum 0: at once).
- ``RecordSearch``: the conversation, on top of ``DeviceQueries`` (SN, one conversation per
  device, part routing through ``DeviceQueries.parts``; the MESSAGE handler hands every
  Response there). An answer ends when complete or after ``records.timeout`` seconds without
  a part; no part at all is a ``QueryError``. The answers of a split range are merged, files
  repeated at a split point dropped, and sorted by start time.

Wire times are Beijing local time without an offset (``manscdp.parse_time``/``format_time``);
the API gives ISO 8601 with ``+08:00``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from registry.models import Device

from . import manscdp
from .config import RecordsSection
from .manscdp import BEIJING
from .queries import DeviceQueries, QueryError
from .timeparse import parse_when

__all__ = [
    "MAX_QUERIES",
    "RECORD_TYPES",
    "Record",
    "RecordCollector",
    "RecordQuery",
    "RecordResult",
    "RecordSearch",
    "record_of",
    "split_range",
]

log = logging.getLogger("gb28181.records")

CMD_TYPE = "RecordInfo"
#: Values of ``<Type>`` in a RecordInfo query (Annex A.2.4.5).
RECORD_TYPES = ("all", "time", "alarm", "manual")
#: Queries one search may be split into: a range needing more is refused (400), not sent as
#: a storm of queries to one device.
MAX_QUERIES = 31
_MAX_TEXT = 256


# --------------------------------------------------------------------------- the query


@dataclass(frozen=True, slots=True)
class RecordQuery:
    """One record search: channel, range (aware datetimes) and the filters of Annex A.2.4.5."""

    channel_id: str
    start: datetime
    end: datetime
    type: str = "all"
    file_path: str | None = None
    address: str | None = None
    secrecy: int | None = None
    recorder_id: str | None = None
    indistinct: int | None = None

    def fields(self, start: datetime | None = None, end: datetime | None = None) -> list[tuple[str, Any]]:
        """The query's fields after DeviceID, in schema order, for ``[start, end]`` (default: all).

        ``Type`` is always written: Dahua NVRs answer nothing without it.
        """
        return [("StartTime", manscdp.format_time(start or self.start)),
                ("EndTime", manscdp.format_time(end or self.end)),
                ("FilePath", self.file_path), ("Address", self.address),
                ("Secrecy", self.secrecy), ("Type", self.type),
                ("RecorderID", self.recorder_id), ("IndistinctQuery", self.indistinct)]

    @classmethod
    def from_params(cls, channel_id: str, params: Mapping[str, str], *,
                    now: float | None = None) -> RecordQuery:
        """A query from HTTP parameters; ValueError naming the parameter and the fix.

        ``start`` (required) and ``end`` (default now): ISO 8601 with or without an offset
        (without: Beijing time), or the forms of ``timeparse.parse_when`` (``24h`` ago, ``now``,
        Unix seconds). ``type``: all (default), time, alarm, manual. Optional ``file_path``,
        ``address``, ``secrecy`` (0/1), ``recorder_id``, ``indistinct`` (0/1).
        """
        if not params.get("start"):
            raise ValueError("query parameter start is required: the beginning of the range, e.g. "
                             "start=2026-11-22T00:00:00 (Beijing time) or start=24h")
        start = _when(params["start"], "start", now)
        end = _when(params["end"], "end", now) if params.get("end") else _when("now", "end", now)
        if end <= start:
            raise ValueError(f"end ({_iso(end)}) must be after start ({_iso(start)})")
        kind = params.get("type", "all").strip().lower() or "all"
        if kind not in RECORD_TYPES:
            raise ValueError(f"type must be one of {', '.join(RECORD_TYPES)}, not {params['type']!r}")
        return cls(channel_id, start, end, kind,
                   file_path=_text_param(params, "file_path"),
                   address=_text_param(params, "address"),
                   secrecy=_flag_param(params, "secrecy"),
                   recorder_id=_text_param(params, "recorder_id"),
                   indistinct=_flag_param(params, "indistinct"))


# "…T08:00:00 08:00": a "+08:00" whose "+" an unencoded URL turned into a space.
_PLUS_AS_SPACE = re.compile(r"(\d{2}:\d{2}:\d{2}(?:\.\d+)?) (\d{2}:?\d{2})$")


def _when(text: str, name: str, now: float | None) -> datetime:
    text = _PLUS_AS_SPACE.sub(r"\1+\2", text.strip())
    # Wire form first (it reads zoneless times as Beijing); then what operators type.
    dt = manscdp.parse_time(text)
    if dt is not None:
        return dt
    try:
        return datetime.fromtimestamp(parse_when(text, now=now), BEIJING)
    except (ValueError, OverflowError, OSError) as exc:
        raise ValueError(f"query parameter {name}: {exc}") from None


def _text_param(params: Mapping[str, str], name: str) -> str | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if len(value) > _MAX_TEXT:
        raise ValueError(f"query parameter {name} is longer than {_MAX_TEXT} characters")
    return value


def _flag_param(params: Mapping[str, str], name: str) -> int | None:
    value = params.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"query parameter {name} must be 0 or 1")
    return int(value)


def split_range(start: datetime, end: datetime, span: float) -> list[tuple[datetime, datetime]]:
    """``[start, end]`` cut into consecutive windows of at most ``span`` seconds.

    Wire times have whole seconds, so windows start on whole seconds and the last one ends
    at ``end``; a device lists a file in every window it overlaps (the merge drops those
    repeats).
    """
    if end <= start:
        return []
    step = timedelta(seconds=max(1, int(span)))
    start = start.replace(microsecond=0)
    windows = []
    lo = start
    while lo < end:
        hi = min(lo + step, end)
        windows.append((lo, hi))
        lo = hi
    return windows


# --------------------------------------------------------------------------- the answer


@dataclass(slots=True)
class Record:
    """One Item of a RecordInfo answer (Annex A.2.6.6); ``raw`` keeps every field as sent."""

    device_id: str
    name: str
    file_path: str
    address: str
    start: datetime | None
    end: datetime | None
    secrecy: int | None
    type: str
    recorder_id: str
    file_size: int | None
    raw: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"start": _iso(self.start), "end": _iso(self.end), "type": self.type,
                "name": self.name, "file_path": self.file_path, "address": self.address,
                "secrecy": self.secrecy, "recorder_id": self.recorder_id,
                "file_size": self.file_size, "device_id": self.device_id}


def _iso(dt: datetime | None) -> str | None:
    return dt.astimezone(BEIJING).isoformat(timespec="seconds") if dt is not None else None


def _text(item: Mapping[str, Any], key: str) -> str:
    value = item.get(key)
    return value if isinstance(value, str) else ""


def _int(item: Mapping[str, Any], key: str) -> int | None:
    value = _text(item, key)
    if not (value.isascii() and value.isdigit() and len(value) <= 19):
        return None
    return int(value)


def record_of(item: Mapping[str, Any]) -> Record:
    """A ``Record`` from one Item dict (``Manscdp.items``); unreadable fields become None/""."""
    return Record(
        device_id=_text(item, "DeviceID"), name=_text(item, "Name"),
        file_path=_text(item, "FilePath"), address=_text(item, "Address"),
        start=manscdp.parse_time(_text(item, "StartTime")),
        end=manscdp.parse_time(_text(item, "EndTime")),
        secrecy=_int(item, "Secrecy"), type=_text(item, "Type"),
        recorder_id=_text(item, "RecorderID"), file_size=_int(item, "FileSize"),
        raw=dict(item))


def _fingerprint(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


class RecordCollector:
    """The parts of one RecordInfo answer (one SN); see the module docstring.

    Sans-IO: ``feed`` takes a parsed Response and says whether the answer is complete.
    """

    __slots__ = ("sum_num", "parts", "repeats", "items", "_seen")

    def __init__(self) -> None:
        self.sum_num: int | None = None
        #: Parts received, repeats included.
        self.parts = 0
        #: Parts dropped as exact repeats of an earlier one.
        self.repeats = 0
        self.items: list[dict[str, Any]] = []
        self._seen: set[str] = set()

    def feed(self, msg: manscdp.Manscdp) -> bool:
        self.parts += 1
        sum_num = msg.text("SumNum")
        if sum_num.isascii() and sum_num.isdigit() and len(sum_num) <= 9:
            self.sum_num = int(sum_num)
        # An <Item> with nothing in it describes no file.
        items = [item for item in msg.items("RecordList") if item]
        if items:
            key = _fingerprint(items)
            if key in self._seen:
                self.repeats += 1
            else:
                self._seen.add(key)
                self.items.extend(items)
        return self.complete

    @property
    def complete(self) -> bool:
        return self.sum_num is not None and len(self.items) >= self.sum_num


@dataclass(slots=True)
class RecordResult:
    """A whole search: merged records, the devices' SumNums added up, and how it went."""

    channel_id: str
    records: list[Record] = field(default_factory=list)
    #: Sum of the SumNum of every query (a file listed at a split point counts twice here).
    sum_num: int = 0
    #: Every query got all the items its SumNum announced.
    complete: bool = True
    queries: int = 0
    parts: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"items": [r.as_json() for r in self.records], "sum_num": self.sum_num,
                "complete": self.complete, "queries": self.queries}


def merge(answers: Sequence[list[dict[str, Any]]]) -> list[Record]:
    """Items of consecutive windows as one list sorted by start time.

    An item exactly equal to one of an earlier window is the same file listed again because
    it crosses the split point, and is dropped; within one answer nothing is dropped.
    Items without a readable start time go last, in the order they came.
    """
    earlier: set[str] = set()
    records: list[Record] = []
    for items in answers:
        keys = [_fingerprint(item) for item in items]
        records += [record_of(item) for item, key in zip(items, keys, strict=True) if key not in earlier]
        earlier.update(keys)
    far = datetime.max.replace(tzinfo=BEIJING)
    records.sort(key=lambda r: (r.start is None, r.start or far, r.end or far))
    return records


# --------------------------------------------------------------------------- the conversation


class RecordSearch:
    """Runs record searches against devices through ``DeviceQueries``."""

    def __init__(self, queries: DeviceQueries, config: RecordsSection) -> None:
        self.queries = queries
        self.config = config

    def windows(self, query: RecordQuery) -> list[tuple[datetime, datetime]]:
        """The query's range split by ``records.max_query_span``; ValueError when too many."""
        windows = split_range(query.start, query.end, self.config.max_query_span)
        if len(windows) > MAX_QUERIES:
            raise ValueError(
                f"the range {_iso(query.start)} to {_iso(query.end)} needs {len(windows)} queries of "
                f"records.max_query_span ({self.config.max_query_span:g} s); at most {MAX_QUERIES}: "
                "search a shorter range")
        return windows

    async def search(self, device: Device, query: RecordQuery) -> RecordResult:
        """Ask ``device`` for ``query``'s records, one query per window; QueryError if one gets
        no answer at all (the device is unreachable, refuses, or stays silent)."""
        result = RecordResult(query.channel_id)
        answers: list[list[dict[str, Any]]] = []
        for lo, hi in self.windows(query):
            collector = await self.ask(device, query, lo, hi)
            answers.append(collector.items)
            result.queries += 1
            result.parts += collector.parts
            result.sum_num += collector.sum_num if collector.sum_num is not None else len(collector.items)
            result.complete = result.complete and collector.complete
        result.records = merge(answers)
        return result

    async def ask(self, device: Device, query: RecordQuery, start: datetime,
                  end: datetime) -> RecordCollector:
        """One RecordInfo query for ``[start, end]`` and its answer, complete or not."""
        collector = RecordCollector()
        arrived = asyncio.Event()
        timeout = self.config.timeout

        def sink(msg: manscdp.Manscdp) -> None:
            try:
                collector.feed(msg)
            except Exception:  # nothing a device sends may break the MESSAGE handler
                log.exception("unusable RecordInfo part from %s", device.device_id)
            arrived.set()

        queries = self.queries
        async with queries.exclusive(device.device_id):
            sn = queries.next_sn()
            # Parts are routed before the query goes out: a fast device answers before our 200.
            with queries.parts(device.device_id, CMD_TYPE, sn, sink):
                await queries.send(device, CMD_TYPE, query.fields(start, end), sn=sn,
                                   target=query.channel_id)
                while not collector.complete:
                    arrived.clear()
                    try:
                        await asyncio.wait_for(arrived.wait(), timeout)
                    except TimeoutError:
                        break
        if collector.parts == 0:
            queries.counters.queries_timed_out += 1
            raise QueryError(f"{device.device_id} accepted the RecordInfo query for channel "
                             f"{query.channel_id} but sent no answer within {timeout:g} s "
                             "(records.timeout)")
        if not collector.complete:
            log.info("RecordInfo from %s for %s ended after %g s of silence with %d of %s items",
                     device.device_id, query.channel_id, timeout, len(collector.items),
                     collector.sum_num)
        return collector
