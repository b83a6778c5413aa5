"""The index of platform recordings: segment rows in the database kept equal to the files.

Neighbours: the media nodes write the segments (``media.recording``) and report each one
(``segment`` events, forwarded here by ``recording.RecordingManager``); ``record_storage`` says
where their bytes are; the API searches and exports from this index (``api_recording``).

Three jobs:

- **upkeep**: a ``segment`` event upserts its row (by path: the open segment's row becomes the
  closed one's when the node renames ``.mp4.part`` to ``.mp4``);
- **reconciliation** at start (and for segments whose writer vanished): a ``.part`` file, cut
  by a crash, is repaired (its readable fragments remuxed into a clean ``.mp4``,
  ``media.recording.repair_segment``) or deleted; a file the index lacks is probed and added;
  a row whose file is gone is removed. After a SIGKILL the index matches the files again;
- **retention and low space** (``plan_sweep``, pure, with an injected ``now``): segments older
  than their tier's ``retention_days`` go; when free space falls under ``low_space_percent``
  the oldest segments go in the order of the field's plans (tier 3, then tier 2 inside their
  retention), never tier 1 inside its retention: that shortfall is reported (an alert)
  instead. Open segments are never deleted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from media.recording import segment_start_from_name
from registry.store import RecordSegment, Store

from .config import RecordingSection
from .record_storage import PART, RecordStorage, StorageUsage

__all__ = ["SegmentIndex", "SweepPlan", "daily_rate", "plan_sweep", "segment_of_event"]

log = logging.getLogger("gb28181.recording")

DAY = 86400.0
#: Rows one sweep reads per tier and step; a backlog larger than this is worked off over sweeps.
SWEEP_BATCH = 5000
#: A ``.part`` nobody writes to any more (its node died) is repaired once it is this old.
ORPHAN_AGE = 30.0


def segment_of_event(ev: dict[str, Any], key: str, tier: int, now: float) -> RecordSegment:
    """The index row of a node's ``segment`` event (its path already made a key)."""
    state = str(ev.get("state") or "closed")
    if state not in ("open", "closed", "failed"):
        state = "failed"
    start = float(ev.get("start") or 0.0)
    return RecordSegment(channel_id=str(ev.get("channel") or ""), path=key, start=start,
                         end=max(start, float(ev.get("end") or start)),
                         bytes=int(ev.get("bytes") or 0), frames=int(ev.get("frames") or 0),
                         codec=str(ev.get("codec") or ""), gap_before=bool(ev.get("gap_before")),
                         tier=tier, state=state, created_at=now)


# -- retention and low space: a pure planner ------------------------------------------------------

@dataclass(slots=True)
class SweepPlan:
    """What one sweep deletes, and why; ``short_bytes`` is space still missing after every
    deletion the policy allows (tier 1 inside retention is protected: raise the alert)."""

    expired: list[RecordSegment] = field(default_factory=list)
    low_space: list[RecordSegment] = field(default_factory=list)
    short_bytes: int = 0
    low: bool = False

    @property
    def deletions(self) -> list[RecordSegment]:
        return self.expired + self.low_space


def plan_sweep(candidates: Mapping[int, Sequence[RecordSegment]], usage: StorageUsage,
               config: RecordingSection, now: float) -> SweepPlan:
    """Which segments to delete: ``candidates`` are each tier's oldest segments, oldest first.

    1. every segment of a tier whose end is older than the tier's ``retention_days``;
    2. if free space is under ``low_space_percent``: more of the oldest, tier 3 then tier 2,
       until the free share is back above the threshold; tier 1 inside retention never.
    """
    plan = SweepPlan()
    freed = 0
    kept: dict[int, list[RecordSegment]] = {}
    for tier, segs in candidates.items():
        cutoff = now - config.retention_days.of(tier) * DAY
        for seg in segs:
            if seg.state == "open":
                continue
            if seg.end < cutoff:
                plan.expired.append(seg)
                freed += seg.bytes
            else:
                kept.setdefault(tier, []).append(seg)
    threshold = usage.capacity * config.low_space_percent / 100
    missing = int(threshold - (usage.free + freed))
    if missing <= 0:
        return plan
    plan.low = True
    for tier in (3, 2):
        for seg in kept.get(tier, ()):
            if missing <= 0:
                break
            plan.low_space.append(seg)
            missing -= seg.bytes
    plan.short_bytes = max(0, missing)
    return plan


# -- the index ---------------------------------------------------------------------------------

#: Seconds between full recounts of the index. A recount reads every row (about a second for
#: 2.4 million segments, in the database's thread, where it holds up other writes), so the
#: totals are kept up to date from the segment events and deletions in between.
RECOUNT_INTERVAL = 3600.0


class SegmentIndex:
    """The segment rows of ``store`` over the files of ``storage`` (see the module docstring)."""

    def __init__(self, store: Store, storage: RecordStorage, config: RecordingSection, *,
                 tier_of: Callable[[str], int], clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.storage = storage
        self.config = config
        self.tier_of = tier_of
        self.clock = clock
        self.deleted_total = 0
        self.deleted_low_space = 0
        self.repaired_total = 0
        self.last_sweep: SweepPlan | None = None
        self.usage: StorageUsage | None = None
        self.totals: dict[int, tuple[int, int]] = {}  # tier -> (segments, bytes), kept up to date
        self.day_bytes = 0.0  # bytes per day at the current rate (daily_rate), as of the last recount
        self._counted_at = float("-inf")

    # -- upkeep ----------------------------------------------------------------------------------
    async def on_segment(self, ev: dict[str, Any]) -> RecordSegment | None:
        try:
            key = self.storage.key_of(str(ev.get("path") or ""))
        except ValueError as exc:
            log.error("segment event not indexed: %s", exc)
            return None
        channel = str(ev.get("channel") or "")
        if not channel or not key:
            return None
        seg = segment_of_event(ev, key, self.tier_of(channel), self.clock())
        if seg.state == "closed" and key.endswith(".mp4"):
            await self.store.delete_segments([key + PART])  # the open row of the same segment
            self._count(seg.tier, 1, seg.bytes)
        await self.store.save_segments([seg])
        return seg

    def _count(self, tier: int, segments: int, size: int) -> None:
        n, b = self.totals.get(tier, (0, 0))
        self.totals[tier] = (max(0, n + segments), max(0, b + size))

    async def search(self, channel_id: str, start: float, end: float, *, offset: int = 0,
                     limit: int = 100, count: bool = True) -> tuple[int, list[RecordSegment]]:
        return await self.store.segments(channel_id, start, end, offset=offset, limit=limit, count=count)

    # -- reconciliation ----------------------------------------------------------------------------
    async def reconcile(self, *, busy: Callable[[str], bool] = lambda key: False,
                        only_parts: bool = False) -> dict[str, int]:
        """Make the index match the files; ``busy(key)``: a segment being written now (left alone).
        Returns counts of what was done."""
        loop = asyncio.get_running_loop()
        indexed = await self.store.segment_paths()
        on_disk = await loop.run_in_executor(None, lambda: set(self.storage.scan()))
        done = {"repaired": 0, "dropped": 0, "added": 0, "removed": 0}
        now = self.clock()
        for key in sorted(k for k in on_disk if k.endswith(PART)):
            if busy(key) or (only_parts and now - self._mtime(key) < ORPHAN_AGE):
                continue
            from media.recording import repair_segment  # PyAV, loaded when there is work
            info = await loop.run_in_executor(None, repair_segment, self.storage.path_for(key))
            await self.store.delete_segments([key])
            indexed.pop(key, None)
            if info is None:
                done["dropped"] += 1
                log.warning("segment %s cut by a crash had no readable frame: deleted", key)
                continue
            fixed = self.storage.key_of(info["path"])
            on_disk.add(fixed)
            await self._add(fixed, info, now)
            indexed[fixed] = "closed"
            done["repaired"] += 1
            self.repaired_total += 1
            log.info("segment %s cut by a crash repaired: %s, %.1f s", key, fixed,
                     float(info.get("end", 0)) - float(info.get("start", 0)))
        if only_parts:
            return done
        for key in sorted(k for k in on_disk if not k.endswith(PART)):
            if indexed.get(key) == "closed" or busy(key):
                continue
            from media.recording import probe_segment
            info = await loop.run_in_executor(None, probe_segment, self.storage.path_for(key))
            if info is None:
                log.warning("segment %s cannot be read: left out of the index", key)
                continue
            await self._add(key, info, now)
            done["added"] += 1
        gone = [key for key in indexed if key not in on_disk and not busy(key)]
        if gone:
            await self.store.delete_segments(gone)
            done["removed"] = len(gone)
        if any(done.values()):
            log.info("record index reconciled with %s: %s", self.storage.root if hasattr(
                self.storage, "root") else "the storage", done)
        return done

    def _mtime(self, key: str) -> float:
        try:
            return self.storage.path_for(key).stat().st_mtime
        except OSError:
            return 0.0

    async def _add(self, key: str, info: dict[str, Any], now: float) -> None:
        named = segment_start_from_name(key)
        channel = str(info.get("channel") or (named[0] if named else key.split("/", 1)[0]))
        start = float(info.get("start") or (named[1] if named else 0.0))
        ev = {**info, "channel": channel, "start": start, "state": "closed"}  # probe_segment's dict
        seg = segment_of_event(ev, key, self.tier_of(channel), now)
        await self.store.save_segments([seg])
        self._count(seg.tier, 1, seg.bytes)

    # -- retention and low space -------------------------------------------------------------------
    async def sweep(self) -> SweepPlan:
        """One retention pass (see ``plan_sweep``); deletes files first, then their rows."""
        now = self.clock()
        if now - self._counted_at >= RECOUNT_INTERVAL:
            await self._refresh_totals()
        used = sum(b for _, b in self.totals.values())
        usage = self.storage.usage(used)
        candidates: dict[int, list[RecordSegment]] = {}
        for tier in (1, 2, 3):
            _, oldest = await self.store.segments(tier=tier, limit=SWEEP_BATCH, count=False)
            candidates[tier] = oldest
        plan = plan_sweep(candidates, usage, self.config, now)
        deleted: list[str] = []
        for seg in plan.deletions:
            self.storage.delete(seg.path)
            deleted.append(seg.path)
        if deleted:
            await self.store.delete_segments(deleted)
            self.deleted_total += len(deleted)
            self.deleted_low_space += len(plan.low_space)
            log.info("retention: %d segments past their tier's retention deleted, %d more for "
                     "low space", len(plan.expired), len(plan.low_space))
            for seg in plan.deletions:
                self._count(seg.tier, -1, -seg.bytes)
            usage = self.storage.usage(sum(b for _, b in self.totals.values()))
        self.usage = usage
        self.last_sweep = plan
        return plan

    async def _refresh_totals(self) -> None:
        """Count the whole index again (a scan of every row: at start and every
        ``RECOUNT_INTERVAL``; in between the totals follow the segments closed and deleted)."""
        self._counted_at = self.clock()
        rows = await self.store.segment_summary(self.clock() - DAY, self.clock())
        totals: dict[int, tuple[int, int]] = {}
        for row in rows:
            tier, count, size = int(row[1]), int(row[2]), int(row[3] or 0)
            n, b = totals.get(tier, (0, 0))
            totals[tier] = (n + count, b + size)
        self.totals = totals
        self.day_bytes = daily_rate(rows, self.clock())


def daily_rate(rows: Sequence[tuple], now: float) -> float:
    """Bytes per day at the current rate, from ``Store.segment_summary`` rows of the last day:
    what the last day's segments hold, scaled up when recording began less than a day ago."""
    window = sum(int(row[9] or 0) for row in rows)
    starts = [float(row[4]) for row in rows if row[4] is not None]
    if not window or not starts:
        return 0.0
    span = min(DAY, now - max(min(starts), now - DAY))
    return window * DAY / span if span >= 60 else 0.0
