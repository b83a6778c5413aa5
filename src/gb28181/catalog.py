"""Catalogs: collecting multi-part Catalog responses and turning items into channel records.

A Catalog response may come in many MESSAGEs (Annex N): each carries the query's SN, the total
``SumNum`` and some items. ``CatalogCollector`` gathers them per (device, SN). Parts may come
out of order or twice, so items are keyed by their DeviceID. A collection is complete when as
many distinct items as SumNum have arrived; because SumNum is unreliable (PROTOCOL.md §3.4,
Hik #853) it also ends after ``silence`` seconds without a new part, and fails when no part
arrives within ``first_part`` seconds. Only a complete catalog may be used to delete channels
the device no longer lists.

``item_to_channel`` maps one Item (A.2.1g, Annex O) onto the registry's ``Channel``, keeping
every field as received in ``raw`` ("one device, one file"): vendor extras included.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field
from typing import Any

from registry.models import Channel

from . import manscdp
from .ids import kind_of_type

__all__ = ["CatalogCollector", "CatalogResult", "channel_kind", "item_to_channel"]


@dataclass(slots=True)
class CatalogResult:
    """Items of one Catalog response, and whether all SumNum of them arrived."""

    device_id: str
    sn: int
    sum_num: int | None
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    parts: int = 0
    complete: bool = False
    started: float = 0.0
    finished: float = 0.0


class _Collection:
    __slots__ = ("result", "future", "last_part", "timer")

    def __init__(self, result: CatalogResult, future: asyncio.Future) -> None:
        self.result = result
        self.future = future
        self.last_part = 0.0
        self.timer: asyncio.TimerHandle | None = None


class CatalogCollector:
    """Gathers the parts of Catalog responses; see the module docstring."""

    def __init__(self, *, silence: float = 5.0, first_part: float = 120.0) -> None:
        self.silence = silence
        self.first_part = first_part
        self._open: dict[tuple[str, int], _Collection] = {}

    def begin(self, device_id: str, sn: int) -> asyncio.Future[CatalogResult]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[CatalogResult] = loop.create_future()
        col = _Collection(CatalogResult(device_id, sn, None, started=time.time()), future)
        self._open[(device_id, sn)] = col
        col.timer = loop.call_later(self.first_part, self._expire, (device_id, sn))
        return future

    def cancel(self, device_id: str, sn: int) -> None:
        col = self._open.pop((device_id, sn), None)
        if col is not None and col.timer is not None:
            col.timer.cancel()

    def feed(self, device_id: str, msg: manscdp.Manscdp) -> bool:
        """Take one Catalog Response part; False when nobody is collecting it."""
        if msg.sn is None:
            return False
        col = self._open.get((device_id, msg.sn))
        if col is None:
            return False
        result = col.result
        result.parts += 1
        sum_num = msg.text("SumNum")
        if sum_num.isdigit():
            result.sum_num = int(sum_num)
        for item in msg.items("DeviceList"):
            item_id = item.get("DeviceID")
            if isinstance(item_id, str) and item_id:
                result.items[item_id] = item
        loop = asyncio.get_running_loop()
        if col.timer is not None:
            col.timer.cancel()
        if result.sum_num is not None and len(result.items) >= result.sum_num:
            self._finish((device_id, msg.sn), complete=True)
        else:
            col.timer = loop.call_later(self.silence, self._finish, (device_id, msg.sn), False)
        return True

    def _finish(self, key: tuple[str, int], complete: bool) -> None:
        col = self._open.pop(key, None)
        if col is None:
            return
        if col.timer is not None:
            col.timer.cancel()
        col.result.complete = complete or (col.result.sum_num == 0)
        col.result.finished = time.time()
        if not col.future.done():
            col.future.set_result(col.result)

    def _expire(self, key: tuple[str, int]) -> None:
        col = self._open.pop(key, None)
        if col is not None and not col.future.done():
            col.future.set_exception(TimeoutError(
                f"no Catalog response part from {key[0]} within {self.first_part:.0f} s"))


def channel_kind(channel_id: str) -> str:
    """What a catalog item is, from its ID (Annex D, Annex O)."""
    if len(channel_id) in (2, 4, 6, 8) and channel_id.isdigit():
        return "civil-code"
    if len(channel_id) != 20 or not channel_id.isdigit():
        return "other"
    code = int(channel_id[10:13])
    if code in (131, 132):
        return "channel"
    if code == 200:
        return "system"
    if code == 215:
        return "business-group"
    if code == 216:
        return "virtual-org"
    if 111 <= code <= 130:
        return "device"
    if code in (134, 135):
        return "alarm"
    kind = kind_of_type(code)
    return "channel" if kind in ("camera", "ipc") else "other"


def _text(item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    return value.strip() if isinstance(value, str) else ""


def _int(item: dict[str, Any], key: str) -> int | None:
    value = _text(item, key)
    try:
        return int(value)
    except ValueError:
        return None


def _coord(item: dict[str, Any], key: str, limit: float) -> float | None:
    value = _text(item, key)
    try:
        number = float(value)
    except ValueError:
        return None
    # 0,0 is what devices send when nobody entered a location: treat it as missing.
    if not math.isfinite(number) or number == 0.0 or abs(number) > limit:
        return None
    return number


def item_to_channel(item: dict[str, Any], device_id: str) -> Channel:
    """A ``Channel`` from one catalog Item (the dict ``Manscdp.items()`` gives)."""
    channel_id = _text(item, "DeviceID")
    info = item.get("Info") if isinstance(item.get("Info"), dict) else {}
    status = manscdp.parse_status(_text(item, "Status"))
    ptz = _int(info, "PTZType") if info else None
    return Channel(
        channel_id=channel_id,
        device_id=device_id,
        kind=channel_kind(channel_id),
        name=_text(item, "Name"),
        manufacturer=_text(item, "Manufacturer"),
        model=_text(item, "Model"),
        owner=_text(item, "Owner"),
        civil_code=_text(item, "CivilCode"),
        block=_text(item, "Block"),
        address=_text(item, "Address"),
        parental=manscdp.parse_parental(_text(item, "Parental") or "0"),
        parent_id=_text(item, "ParentID"),
        business_group_id=_text(item, "BusinessGroupID") or (_text(info, "BusinessGroupID") if info else ""),
        safety_way=_int(item, "SafetyWay"),
        register_way=_int(item, "RegisterWay"),
        secrecy=_int(item, "Secrecy") or 0,
        ip_address=_text(item, "IPAddress"),
        port=_int(item, "Port") or 0,
        # Status is optional for groups and civil codes; absent means ON (Annex P).
        status="OFF" if status is False else "ON",
        longitude=_coord(item, "Longitude", 180.0),
        latitude=_coord(item, "Latitude", 90.0),
        ptz_type=ptz,
        info=dict(info) if info else {},
        raw=dict(item),
    )
