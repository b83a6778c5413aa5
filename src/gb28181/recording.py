"""Platform recording: which channels record now, keeping their streams open, and the sweeper.

Neighbours: plans come from ``config.recording`` (a mode per tier) and a channel's own mode
(``record_plans`` in the database, set with ``PATCH /api/v1/channels/{id}``); the stream manager
(``streams.py``) opens the device's live stream as for any viewer, so one INVITE feeds viewers,
cascade and the recording; the media node that carries it writes the segments
(``media.recording``, commands ``record_start``/``record_stop``) and reports each one as a
``segment`` event, which goes to the index (``record_index``).

A channel records now when its mode says so (``wanted``): ``continuous`` always, ``schedule``
inside one of the Beijing-time windows (a window whose end is before its start runs over
midnight), ``alarm`` until ``alarm_postroll`` seconds after its last alarm (the node starts such
a recording at its cached GOP: the pre-roll). Every ``TICK`` seconds the manager arms the
channels that should record and are not, and disarms the ones that should not any more. A
recording is a consumer of the stream's hub on its node, so the stream manager's "no viewers"
check sees it and keeps the stream. When the stream closes (device offline, RTP stopped, node
lost) the recording is re-armed at the next tick; a failed arm (device offline, INVITE refused)
waits ``retry_min`` seconds, doubled per failure up to ``retry_max``, and its reason is kept
for the report and the API.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .config import RecordingSection
from .record_index import SegmentIndex
from .record_storage import PART, LocalDiskStorage
from .registrar import BEIJING

if TYPE_CHECKING:
    from .nodes import MediaLeg
    from .server import GbServer

__all__ = ["MODES", "RecordingManager", "in_schedule", "mode_for", "wanted"]

log = logging.getLogger("gb28181.recording")

MODES = ("continuous", "alarm", "schedule", "off")
TICK = 2.0  # seconds between plan evaluations
OFFLINE = "the channel is offline"


def mode_for(tier: int, override: str | None, config: RecordingSection) -> str:
    """A channel's recording mode: its own, else its tier's plan (a tier not planned: off)."""
    if override in MODES:
        return override
    return config.plans.of(tier)


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def in_schedule(windows: list[str], now: float) -> bool:
    """Whether Beijing wall time at ``now`` falls in one of ``HH:MM-HH:MM`` windows."""
    local = datetime.fromtimestamp(now, BEIJING)
    minute = local.hour * 60 + local.minute
    for window in windows:
        lo_text, hi_text = window.split("-")
        lo, hi = _minutes(lo_text), _minutes(hi_text)
        if lo <= hi:
            if lo <= minute < hi:
                return True
        elif minute >= lo or minute < hi:  # over midnight: 22:00-06:00
            return True
    return False


def wanted(mode: str, config: RecordingSection, now: float, alarm_until: float = 0.0) -> bool:
    """Whether a channel in ``mode`` records at ``now``."""
    if mode == "continuous":
        return True
    if mode == "schedule":
        return in_schedule(config.schedule, now)
    if mode == "alarm":
        return now < alarm_until
    return False


@dataclass(slots=True, eq=False)
class ChannelRecording:
    """A channel the manager records, or tried to."""

    channel_id: str
    mode: str
    state: str = "idle"  # idle | starting | recording | waiting (to retry) | stopping
    leg: MediaLeg | None = None
    since: float = 0.0
    failures: int = 0
    reason: str = ""
    retry_at: float = 0.0
    open_path: str = ""  # the key of the segment being written
    gap: bool = False  # the stream broke off: the next segment is marked gap_before

    def as_dict(self) -> dict[str, Any]:
        return {"channel_id": self.channel_id, "mode": self.mode, "state": self.state,
                "since": self.since or None, "failures": self.failures, "reason": self.reason or None,
                "retry_at": self.retry_at or None, "node": self.leg.node.name if self.leg else None,
                "segment": self.open_path or None}


class RecordingManager:
    """See the module docstring. ``await start()`` after the media nodes, ``stop()`` before."""

    def __init__(self, server: GbServer, store: Any, *, clock: Callable[[], float] = time.time) -> None:
        self.server = server
        self.config = server.config.recording
        self.root = server.config.records_dir
        self.storage = LocalDiskStorage(self.root, self.config.quota_bytes)
        self.index = SegmentIndex(store, self.storage, self.config, tier_of=self._tier, clock=clock)
        self.store = store
        self.clock = clock
        self.overrides: dict[str, str] = {}
        self.active: dict[str, ChannelRecording] = {}
        self.alarm_until: dict[str, float] = {}
        self.failures_total = 0
        self.bytes_total = 0  # bytes of the segments closed since start
        self.low_space_alerts = 0
        self.started = False
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self._wake = asyncio.Event()

    # -- plans --------------------------------------------------------------------------------------
    def _tier(self, channel_id: str) -> int:
        ch = self.server.channels.get(channel_id)
        return ch.tier if ch is not None else 3

    def mode(self, channel_id: str) -> str:
        return mode_for(self._tier(channel_id), self.overrides.get(channel_id), self.config)

    async def set_mode(self, channel_id: str, mode: str | None) -> None:
        """A channel's own mode (None: its tier's plan again); takes effect at the next tick."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"recording must be one of {', '.join(MODES)}, or null for the tier's plan")
        await self.store.save_record_plan(channel_id, mode, self.clock())
        if mode is None:
            self.overrides.pop(channel_id, None)
        else:
            self.overrides[channel_id] = mode
        self._wake.set()

    def planned(self) -> dict[str, str]:
        """Channels whose mode is not off, with their mode (the report's denominator)."""
        out = {}
        for ch in self.server.channels:
            if ch.kind != "channel":
                continue
            mode = mode_for(ch.tier, self.overrides.get(ch.channel_id), self.config)
            if mode != "off":
                out[ch.channel_id] = mode
        return out

    # -- life cycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.overrides = await self.store.load_record_plans()
        self.root.mkdir(parents=True, exist_ok=True)
        await self.index.reconcile()
        self.server.streams.on_closed.append(self._stream_closed)
        self.server.events.listeners.append(self._event)
        loop = asyncio.get_running_loop()
        self._loops.append(loop.create_task(self._sweeper()))
        if self.config.enabled:
            self._loops.append(loop.create_task(self._planner()))
        self.started = True

    async def stop(self) -> None:
        """Close every recording so its segment is finished cleanly (renamed ``.mp4``)."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self._disarm(rec, "server stopping") for rec in list(self.active.values())
                               if rec.state == "recording"), return_exceptions=True)
        if self._stream_closed in self.server.streams.on_closed:
            self.server.streams.on_closed.remove(self._stream_closed)
        if self._event in self.server.events.listeners:
            self.server.events.listeners.remove(self._event)
        self.started = False

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _planner(self) -> None:
        while True:
            try:
                self.evaluate()
            except Exception:
                log.exception("recording plan evaluation")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), TICK)
            except TimeoutError:
                pass

    async def _sweeper(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("recording retention sweep")
            await asyncio.sleep(self.config.sweep_interval)

    def evaluate(self) -> None:
        """Arm the channels that should record now and do not; disarm those that should not."""
        now = self.clock()
        planned = self.planned()
        recording_now = {channel_id: mode for channel_id, mode in planned.items()
                         if wanted(mode, self.config, now, self.alarm_until.get(channel_id, 0.0))}
        for channel_id, mode in recording_now.items():
            rec = self.active.get(channel_id)
            if rec is None:
                rec = self.active[channel_id] = ChannelRecording(channel_id, mode)
            rec.mode = mode
            if rec.state not in ("idle", "waiting"):
                continue
            channel = self.server.channels.get(channel_id)
            if channel is not None and channel.state == "OFF":
                # No INVITE to a device known to be offline; it is armed once it is back.
                if rec.reason != OFFLINE:
                    rec.reason, rec.state = OFFLINE, "waiting"
                    rec.failures += 1
                    self.failures_total += 1
                continue
            if now >= rec.retry_at:
                rec.state = "starting"
                self._spawn(self._arm(rec))
        for rec in list(self.active.values()):
            if rec.channel_id not in recording_now:
                mode = planned.get(rec.channel_id, "off")
                if rec.state == "recording":
                    self._spawn(self._disarm(rec, f"plan {mode}"))
                elif rec.state in ("idle", "waiting"):
                    del self.active[rec.channel_id]

    # -- arming ----------------------------------------------------------------------------------------
    async def _arm(self, rec: ChannelRecording) -> None:
        from .nodes import NodeCallError
        from .streams import PlayError
        streams = self.server.streams
        try:
            live = await streams.play(rec.channel_id)
            streams.viewer_joined(rec.channel_id)  # no grace-period BYE: the recording watches
            await live.leg.call("record_start", channel=rec.channel_id, root=str(self.root),
                                segment_seconds=self.config.segment_seconds, gap_before=rec.gap,
                                preroll=rec.mode == "alarm" and self.config.alarm_preroll)
        except (PlayError, NodeCallError) as exc:
            self._failed(rec, str(exc))
            return
        except asyncio.CancelledError:
            rec.state = "idle"
            raise
        rec.leg = live.leg
        rec.gap = False
        rec.state = "recording"
        rec.since = self.clock()
        rec.failures = 0
        rec.reason = ""
        log.info("recording %s (%s) on media node %s", rec.channel_id, rec.mode, live.leg.node.name)

    def _failed(self, rec: ChannelRecording, reason: str) -> None:
        rec.failures += 1
        self.failures_total += 1
        rec.reason = reason
        rec.leg = None
        rec.state = "waiting"
        delay = min(self.config.retry_max, self.config.retry_min * 2 ** (rec.failures - 1))
        rec.retry_at = self.clock() + delay
        log.warning("recording %s failed (%d in a row): %s; retrying in %.0f s", rec.channel_id,
                    rec.failures, reason, delay)

    async def _disarm(self, rec: ChannelRecording, why: str) -> None:
        from .nodes import NodeCallError
        leg, rec.leg = rec.leg, None
        rec.state = "stopping"
        segments: list[dict] = []
        if leg is not None and not leg.released:
            try:
                segments = (await leg.call("record_stop")).get("segments") or []
            except NodeCallError as exc:
                log.warning("record_stop of %s: %s", rec.channel_id, exc)
        for ev in segments:
            await self._index(leg, {"channel": rec.channel_id, **ev})
        self.active.pop(rec.channel_id, None)
        log.info("recording %s stopped: %s", rec.channel_id, why)
        # Without other viewers the stream goes after its grace period, as for any viewer.
        if leg is not None and not leg.released:
            self.server.streams.leg_idle(leg)

    def _stream_closed(self, channel_id: str, reason: str) -> None:
        rec = self.active.get(channel_id)
        if rec is None or rec.state != "recording":
            return
        rec.leg = None
        rec.open_path = ""
        rec.gap = True
        rec.state = "waiting"
        rec.reason = f"stream closed: {reason}"
        rec.retry_at = self.clock()  # the next tick opens it again (a gap, then a new segment)
        self._wake.set()

    # -- what the nodes and the event bus say ----------------------------------------------------------
    def on_segment(self, leg: MediaLeg | None, ev: dict) -> None:
        """A node's ``segment`` event (nodes.NodeManager routes them here)."""
        self._spawn(self._index(leg, ev))

    async def _index(self, leg: MediaLeg | None, ev: dict) -> None:
        rec = self.active.get(str(ev.get("channel") or ""))
        if ev.get("state") == "failed":
            self.failures_total += 1
            if rec is not None:
                rec.reason = str(ev.get("error") or "the media node could not write the segment")
        try:
            seg = await self.index.on_segment(ev)
        except Exception:
            log.exception("segment event %r not indexed", ev)
            return
        if seg is None:
            return
        if seg.state == "open":
            if rec is not None:
                rec.open_path = seg.path
        elif seg.state == "closed":
            self.bytes_total += seg.bytes
            if rec is not None and rec.open_path in (seg.path, seg.path + PART):
                rec.open_path = ""

    def _event(self, event) -> None:
        if event.type != "alarm":
            return
        data = event.data
        targets = [data.get("channel_id") or "", data.get("device_id") or ""]
        channels = self.server.channels
        until = self.clock() + self.config.alarm_postroll
        hit = False
        for target in targets:
            if not target:
                continue
            ids = [target] if channels.get(target) is not None else [
                c.channel_id for c in channels.of_device(target)]
            for cid in ids:
                if self.mode(cid) == "alarm":
                    self.alarm_until[cid] = max(self.alarm_until.get(cid, 0.0), until)
                    hit = True
        if hit:
            self._wake.set()

    async def segments(self, channel_id: str, start: float, end: float) -> list[dict]:
        """The channel's readable segments overlapping [start, end) as files a node plays
        (``file_play``; playback.py): ``{path, start, end}``, oldest first."""
        _, found = await self.index.search(channel_id, start, end, limit=10000, count=False)
        return [{"path": str(self.storage.path_for(s.path)), "start": s.start, "end": s.end}
                for s in found if s.state != "failed" and s.end > s.start]

    # -- retention ---------------------------------------------------------------------------------------
    def _busy(self, key: str) -> bool:
        return any(rec.open_path == key for rec in self.active.values())

    async def sweep(self):
        """Repair segments whose writer went away, then one retention/low-space pass."""
        await self.index.reconcile(busy=self._busy, only_parts=True)
        plan = await self.index.sweep()
        if plan.short_bytes > 0:
            self.low_space_alerts += 1
            usage = self.index.usage
            self.server.events.publish("storage.low", {
                "short_bytes": plan.short_bytes, "free_bytes": usage.free if usage else None,
                "reason": "free space is under recording.low_space_percent and only tier 1 "
                          "recordings inside their retention are left: add disk or lower retention"})
            log.error("recording storage low: %d bytes short and only tier 1 segments inside "
                      "their retention are left (never deleted): add disk, raise quota_bytes or "
                      "lower recording.retention_days", plan.short_bytes)
        return plan

    # -- status ------------------------------------------------------------------------------------------
    def states(self) -> dict[str, int]:
        counts = {"recording": 0, "starting": 0, "waiting": 0, "stopping": 0}
        for rec in self.active.values():
            counts[rec.state] = counts.get(rec.state, 0) + 1
        return counts

    def metrics(self):
        """Prometheus families (server._channel_metrics yields these)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        channels = GaugeMetricFamily("gb28181_recording_channels", "Channels the platform records, "
                                     "by state (waiting: to retry after a failure)", labels=["state"])
        for state, n in sorted(self.states().items()):
            channels.add_metric([state], n)
        yield channels
        written = CounterMetricFamily("gb28181_recording_bytes", "Bytes of recording segments "
                                      "closed since the server started")
        written.add_metric([], self.bytes_total)
        yield written
        failures = CounterMetricFamily("gb28181_recording_failures", "Recordings that could not "
                                       "start (device offline, INVITE refused) or segments that "
                                       "failed")
        failures.add_metric([], self.failures_total)
        yield failures
        segments = GaugeMetricFamily("gb28181_record_segments", "Indexed recording segments by "
                                     "tier (as of the last sweep)", labels=["tier"])
        seg_bytes = GaugeMetricFamily("gb28181_record_segment_bytes", "Bytes of indexed recording "
                                      "segments by tier", labels=["tier"])
        for tier in (1, 2, 3):
            count, size = self.index.totals.get(tier, (0, 0))
            segments.add_metric([str(tier)], count)
            seg_bytes.add_metric([str(tier)], size)
        yield segments
        yield seg_bytes
        usage = self.index.usage
        free = GaugeMetricFamily("gb28181_storage_free_bytes", "Room left for recordings (quota "
                                 "or disk), as of the last sweep")
        free.add_metric([], max(0, usage.free) if usage else 0)
        yield free
        rate = self.daily_bytes()
        left = GaugeMetricFamily("gb28181_storage_days_left", "Days until the recordings' storage "
                                 "is full at the current rate (+Inf: nothing is being written)")
        left.add_metric([], (max(0, usage.free) / rate) if usage and rate > 0 else float("inf"))
        yield left
        short = GaugeMetricFamily("gb28181_storage_low_space_short_bytes", "Bytes the low-space "
                                  "policy could not free without deleting tier 1 inside retention")
        short.add_metric([], self.index.last_sweep.short_bytes if self.index.last_sweep else 0)
        yield short
        planned = GaugeMetricFamily("gb28181_recording_planned_channels", "Channels whose plan "
                                    "records now, by tier", labels=["tier"])
        by_tier = {1: 0, 2: 0, 3: 0}
        now = self.clock()
        if self.config.enabled:
            for cid, mode in self.planned().items():
                if wanted(mode, self.config, now, self.alarm_until.get(cid, 0.0)):
                    tier = self._tier(cid)
                    by_tier[tier] = by_tier.get(tier, 0) + 1
        for tier, n in sorted(by_tier.items()):
            planned.add_metric([str(tier)], n)
        yield planned
        recording = GaugeMetricFamily("gb28181_recording_active_channels", "Channels recording "
                                      "now, by tier", labels=["tier"])
        active = {1: 0, 2: 0, 3: 0}
        for rec in self.active.values():
            if rec.state == "recording":
                tier = self._tier(rec.channel_id)
                active[tier] = active.get(tier, 0) + 1
        for tier, n in sorted(active.items()):
            recording.add_metric([str(tier)], n)
        yield recording

    def daily_bytes(self) -> float:
        """Bytes per day written at the current rate (``SegmentIndex.day_bytes``)."""
        return self.index.day_bytes
