"""The channel registry: every catalog item ("one device, one file") in memory,
its effective state, and the history that availability reports read.

The catalog handling (gb28181/sync.py) feeds it items from Catalog responses
and NOTIFYs through `upsert`, `set_status` and `remove`; the server forwards
each device's online/offline transition from `DeviceRegistry` (devices.py)
through `set_device_online`. A channel's *effective* state is OFF while its
device is offline and its own reported status (ON, OFF, VLOST, DEFECT)
otherwise; every change of it is a `ChannelEvent`. Like the device registry,
these calls are synchronous dict operations, and the `Persistence` loop
(writebehind.py) shared with the device registry writes changed channels,
removals and events to the shared `Store` in the same transaction as the
devices' changes, keeping them through store failures.

Availability (`availability`) is computed from that history: a channel's
time counts from its first event (it is created with one) until its "removed"
event, and each second counts as online when the effective state was not OFF
and as working when it was ON. Live figures (`counts`, `live_ratios`) come
from memory.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import operator
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

from .models import CHANNEL_FIELDS, CHANNEL_STATES, Channel, ChannelEvent
from .store import Store
from .writebehind import Persistence, SortedIds, WriteBehind

log = logging.getLogger(__name__)

# What upsert copies from a catalog item onto the stored channel: everything
# but the identity, the tier (handled apart, for locks) and what the registry
# itself keeps (effective state and timestamps).
_CATALOG_FIELDS: tuple[str, ...] = tuple(
    name
    for name in CHANNEL_FIELDS
    if name not in ("channel_id", "tier", "tier_locked", "state", "state_changed_at",
                    "seen_at", "created_at", "updated_at")
)
_catalog_values = operator.attrgetter(*_CATALOG_FIELDS)

_GROUP_BY = ("tier", "civil_code", "all")

# Channels aggregated per event-loop turn by availability() (~10 ms).
_YIELD_EVERY = 5_000

REMOVED = "removed"
"""The reason of the event a channel leaves with; its time stops counting there."""


class ChannelRegistry:
    """In-memory source of truth for channels, with write-behind persistence.

    Shares its `Store` with `DeviceRegistry`, which opens it before
    `start()` and closes it after `stop()`. Channel objects returned by
    `get`, `query`, `of_device` and iteration are the live ones: change
    descriptive fields (name, address, tier, location ...) and call `touch`;
    `status`, `state` and `device_id` change only through `set_status`,
    `set_device_online` and `upsert`, so counts, the per-device index and the
    history stay right.
    """

    def __init__(
        self,
        store: Store,
        *,
        flush_interval: float = 0.5,
        clock: Callable[[], float] = time.time,
        max_pending_events: int = 1_000_000,
        max_removed: int = 100_000,
        persistence: Persistence | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._channels: dict[str, Channel] = {}
        # device_id -> {channel_id: channel}; a dict per device so that
        # removing one channel of a 256-channel NVR is O(1).
        self._by_device: dict[str, dict[str, Channel]] = {}
        # What set_device_online last said per device; absent means unknown,
        # which counts as offline.
        self._device_online: dict[str, bool] = {}
        self._counts: dict[str, int] = dict.fromkeys(CHANNEL_STATES, 0)
        self._order = SortedIds(self._channels)
        # Removed channels' (tier, area code, kind), newest last: availability
        # still groups their history until this process restarts. Bounded.
        self._removed: OrderedDict[str, tuple[int, str, str]] = OrderedDict()
        self._max_removed = max_removed
        self._pending: WriteBehind[Channel, ChannelEvent] = WriteBehind(
            kind="channels",
            lookup=self._channels.get,
            copy=Channel.copy,
            what="channel",
            events_what="channel events",
            max_pending_events=max_pending_events,
        )
        self.persistence = persistence or Persistence(store, flush_interval=flush_interval)
        self.persistence.add(self._pending)
        self._started = False
        self._listeners: list[Callable[[Channel, ChannelEvent], None]] = []

    @property
    def store(self) -> Store:
        return self._store

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Load every channel and start the flush loop; the store must be open."""
        if self._started:
            raise RuntimeError("ChannelRegistry already started")
        if self._channels:
            raise RuntimeError("ChannelRegistry.start() must come before any upsert()")
        channels = await self._store.load_channels()
        for channel in channels:
            self._channels[channel.channel_id] = channel
            self._by_device.setdefault(channel.device_id, {})[channel.channel_id] = channel
            self._counts[channel.state] = self._counts.get(channel.state, 0) + 1
            # A channel stored as not OFF had its device online when last
            # written; until the server says otherwise, assume it still is, so
            # a status change now is not mistaken for the device going away.
            if channel.state != "OFF":
                self._device_online[channel.device_id] = True
        self._order = SortedIds(self._channels)
        self._started = True
        self.persistence.start("channel-registry-flush")
        log.info(
            "channel registry loaded %d channels (%s) from %r",
            len(channels),
            ", ".join(f"{n} {state}" for state, n in self._counts.items() if n),
            self._store,
        )

    async def stop(self) -> None:
        """Stop the flush loop and write what is pending; the store stays open.

        A failed final write is logged, not raised, so the `DeviceRegistry.stop()`
        that follows still runs and closes the store.
        """
        ok = await self.persistence.stop() if self._started else await self.persistence.flush()
        self._started = False
        if not ok:
            changes, events = self.pending()
            log.error(
                "channel registry stopped with %d channel changes and %d channel events not "
                "written to %r; see the errors logged before",
                changes,
                events,
                self._store,
            )

    # -- hot path: synchronous ---------------------------------------------

    def get(self, channel_id: str) -> Channel | None:
        return self._channels.get(channel_id)

    def __contains__(self, channel_id: object) -> bool:
        return channel_id in self._channels

    def __len__(self) -> int:
        return len(self._channels)

    def __iter__(self) -> Iterator[Channel]:
        # Over a copy, so a consumer that awaits mid-iteration survives a
        # catalog arriving meanwhile.
        return iter(list(self._channels.values()))

    def of_device(self, device_id: str) -> list[Channel]:
        """The channels whose catalog came from this device, by channel_id."""
        channels = self._by_device.get(device_id)
        if not channels:
            return []
        return [channels[i] for i in sorted(channels)]

    def upsert(self, channel: Channel, *, at: float | None = None, reason: str = "catalog") -> tuple[Channel, bool]:
        """Add a catalog item, or update the stored channel from it; (stored, created).

        A new channel is stored as the object given, with its effective state
        computed and a first event recording it: its time counts from there.
        An existing one takes every catalog field of `channel` (the tier too,
        unless the stored tier is locked); a status or device change moves
        its effective state, with an event. Either way the registry takes
        `channel` and its dicts over (`Channel.share_strings` runs on it), and
        `at` (default now) stamps the events and `seen_at`.
        """
        if channel.status not in CHANNEL_STATES:
            raise ValueError(f"channel status must be one of {', '.join(CHANNEL_STATES)}, got {channel.status!r}")
        now = self._clock()
        at = now if at is None else at
        channel_id = channel.channel_id
        stored = self._channels.get(channel_id)
        if stored is not channel:
            channel.share_strings()
        if stored is None:
            if not channel.created_at:
                channel.created_at = now
            channel.updated_at = now
            channel.seen_at = at
            state = self._effective(channel.device_id, channel.status)
            channel.state = state
            channel.state_changed_at = at
            self._counts[state] += 1
            self._channels[channel_id] = channel
            self._by_device.setdefault(channel.device_id, {})[channel_id] = channel
            self._order.add(channel_id)
            self._removed.pop(channel_id, None)
            self._pending.added(channel_id, channel)
            self._event(channel, ChannelEvent(channel_id, state, at, reason))
            return channel, True

        old_device = stored.device_id
        if stored is not channel:
            for name, value in zip(_CATALOG_FIELDS, _catalog_values(channel)):
                setattr(stored, name, value)
            if not stored.tier_locked:
                stored.tier = channel.tier
                stored.tier_locked = channel.tier_locked
        if stored.device_id != old_device or stored is channel:
            self._reindex(stored, old_device)
        stored.seen_at = at
        stored.updated_at = now
        self._pending.changed(channel_id, stored)
        self._update_state(stored, at, reason)
        return stored, False

    def touch(self, channel: Channel) -> None:
        """Mark a changed channel for the next flush."""
        self._check_current(channel)
        channel.updated_at = self._clock()
        self._pending.changed(channel.channel_id, channel)

    def set_status(self, channel: Channel, status: str, reason: str, at: float | None = None) -> bool:
        """Set the channel's own reported status; True if its effective state changed.

        The effective state follows only while the device is online; the
        status is kept either way and applies when the device comes back.
        """
        if status not in CHANNEL_STATES:
            raise ValueError(f"channel status must be one of {', '.join(CHANNEL_STATES)}, got {status!r}")
        self._check_current(channel)
        now = self._clock()
        if channel.status != status:
            channel.status = status
            channel.updated_at = now
            self._pending.changed(channel.channel_id, channel)
        return self._update_state(channel, now if at is None else at, reason)

    def set_device_online(self, device_id: str, online: bool, at: float | None = None) -> int:
        """A device went online or offline: its channels' effective states follow.

        Returns how many channels changed state. The device's state is
        remembered for channels its later catalogs add.
        """
        online = bool(online)
        self._device_online[device_id] = online
        channels = self._by_device.get(device_id)
        if not channels:
            return 0
        at = self._clock() if at is None else at
        reason = "device-online" if online else "device-offline"
        update = self._update_state
        return sum(update(channel, at, reason) for channel in channels.values())

    def remove(self, channel_id: str, *, at: float | None = None) -> bool:
        """Forget a channel; False if unknown.

        It leaves with an OFF event, reason "removed", even when it already
        was OFF: availability stops counting its time there, and the history
        says so after a restart too.
        """
        channel = self._channels.pop(channel_id, None)
        if channel is None:
            return False
        at = self._clock() if at is None else at
        self._counts[channel.state] -= 1
        devices = self._by_device.get(channel.device_id)
        if devices is not None:
            devices.pop(channel_id, None)
            if not devices:
                del self._by_device[channel.device_id]
        self._order.discard(channel_id)
        self._pending.removed(channel_id)
        self._event(channel, ChannelEvent(channel_id, "OFF", at, REMOVED))
        self._removed[channel_id] = (channel.tier, channel.area_code, channel.kind)
        if len(self._removed) > self._max_removed:
            self._removed.popitem(last=False)
        return True

    def remove_device(self, device_id: str, *, at: float | None = None) -> int:
        """Forget every channel of a device; how many there were."""
        at = self._clock() if at is None else at
        return sum(self.remove(channel_id, at=at) for channel_id in list(self._by_device.get(device_id, ())))

    def add_listener(self, fn: Callable[[Channel, ChannelEvent], None]) -> None:
        """Call ``fn(channel, event)`` synchronously on every change of a channel's effective
        state (removal included: an OFF event with reason "removed")."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[Channel, ChannelEvent], None]) -> None:
        self._listeners.remove(fn)

    def _event(self, channel: Channel, event: ChannelEvent) -> None:
        self._pending.event(event)
        for listener in self._listeners:
            try:
                listener(channel, event)
            except Exception:
                # A broken event feed must not fail catalog handling.
                log.exception("channel state listener %r failed", listener)

    def counts(self) -> dict[str, int]:
        """Channels per effective state (every state present, zeros included)."""
        return dict(self._counts)

    def pending(self) -> tuple[int, int]:
        """(channel changes, channel events) not yet written to the store."""
        return self._pending.pending()

    def _effective(self, device_id: str, status: str) -> str:
        return status if self._device_online.get(device_id) else "OFF"

    def _update_state(self, channel: Channel, at: float, reason: str) -> bool:
        state = self._effective(channel.device_id, channel.status)
        if state == channel.state:
            return False
        self._counts[channel.state] -= 1
        self._counts[state] += 1
        channel.state = state
        channel.state_changed_at = at
        self._pending.changed(channel.channel_id, channel)
        self._event(channel, ChannelEvent(channel.channel_id, state, at, reason))
        return True

    def _reindex(self, channel: Channel, old_device: str) -> None:
        channel_id = channel.channel_id
        if channel_id in self._by_device.get(channel.device_id, ()):
            return
        old = self._by_device.get(old_device)
        if old is None or channel_id not in old:
            # The caller changed device_id on the live object itself; find
            # where it was filed (rare, so a scan is fine).
            old_device = next(d for d, chans in self._by_device.items() if channel_id in chans)
            old = self._by_device[old_device]
        del old[channel_id]
        if not old:
            del self._by_device[old_device]
        self._by_device.setdefault(channel.device_id, {})[channel_id] = channel

    def _check_current(self, channel: Channel) -> None:
        if self._channels.get(channel.channel_id) is not channel:
            raise KeyError(f"channel {channel.channel_id} is not in the registry (never added, or removed)")

    # -- reads for the HTTP API --------------------------------------------

    def query(
        self,
        *,
        device_id: str | None = None,
        civil_code: str | None = None,
        tier: int | None = None,
        state: str | None = None,
        kind: str | None = None,
        text: str | None = None,
        parent_id: str | None = None,
        missing_location: bool | None = None,
        offset: int = 0,
        limit: int = 100,
    ) -> tuple[int, list[Channel]]:
        """(number matching, one page of them sorted by channel_id).

        `civil_code` is a prefix of the channel's civil code (its ID's centre
        code when the catalog gave none); `text` a case-insensitive substring
        of its ID, name or address; `parent_id` one element of its
        '/'-separated ParentID; `state` its effective state;
        `missing_location` whether it lacks a usable longitude/latitude.
        """
        if offset < 0 or limit < 0:
            raise ValueError(f"offset and limit must not be negative, got {offset}, {limit}")
        tests: list[Callable[[Channel], bool]] = []
        if civil_code is not None:
            tests.append(lambda c: c.area_code.startswith(civil_code))
        if tier is not None:
            tests.append(lambda c: c.tier == tier)
        if state is not None:
            tests.append(lambda c: c.state == state)
        if kind is not None:
            tests.append(lambda c: c.kind == kind)
        if text is not None:
            needle = text.casefold()
            tests.append(
                lambda c: needle in c.channel_id.casefold()
                or needle in c.name.casefold()
                or needle in c.address.casefold()
            )
        if parent_id is not None:
            tests.append(lambda c: parent_id in c.parent_id.split("/"))
        if missing_location is not None:
            tests.append(lambda c: c.has_location != missing_location)

        if device_id is not None:
            candidates: Iterable[Channel] = self.of_device(device_id)
        else:
            order = self._order.ids()
            if not tests:
                return len(order), [self._channels[i] for i in order[offset : offset + limit]]
            candidates = map(self._channels.__getitem__, order)
        matching = [c for c in candidates if all(test(c) for test in tests)]
        return len(matching), matching[offset : offset + limit]

    async def events(
        self,
        channel_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[ChannelEvent]:
        """Effective-state history from the store (see `Store.channel_events`),
        including the changes just made."""
        await self.flush()
        return await self._store.channel_events(channel_id, since, until, limit, newest_first)

    # -- reports -----------------------------------------------------------

    async def availability(
        self,
        since: float,
        until: float,
        *,
        group_by: str = "tier",
        civil_code_digits: int = 6,
        kinds: tuple[str, ...] = ("channel",),
        tier: int | None = None,
        civil_code: str | None = None,
    ) -> list[dict]:
        """Time-weighted online and working shares over [since, until), per group.

        Groups are the channels' current tier (int), the first
        `civil_code_digits` of their civil code, or "all"; a removed channel
        is grouped as it was when removed if this process still knows it,
        and skipped otherwise. Only channels of `kinds` count, optionally
        only one `tier` and civil code prefix. One dict per group that had
        channel time in the window, sorted by group:
        `group`, `channels` (how many existed in the window), `online_ratio`
        (share of channel-time not OFF), `working_ratio` (share ON),
        `online_seconds`, `working_seconds`, `total_seconds` and
        `currently_online` (channels of the group not OFF now).
        """
        if until <= since:
            raise ValueError(f"until must be after since, got {since} .. {until}")
        key_of = self._group_key(group_by, civil_code_digits)
        await self.flush()
        history = await self._store.channel_history(since, until)

        wanted = self._wanted(kinds, tier, civil_code)
        groups: dict[object, list] = {}
        by_channel = itertools.groupby(history, operator.attrgetter("channel_id"))
        for i, (channel_id, events) in enumerate(by_channel):
            if i and not i % _YIELD_EVERY:
                await asyncio.sleep(0)  # 100k channels take ~0.3 s: let the SIP side in
            meta = self._meta(channel_id)
            if meta is None or not wanted(*meta):
                continue
            online, working, total = _exposure(list(events), since, until)
            if total <= 0:
                continue
            acc = groups.get(key := key_of(meta[0], meta[1]))
            if acc is None:
                acc = groups[key] = [0, 0.0, 0.0, 0.0, 0]
            acc[0] += 1
            acc[1] += online
            acc[2] += working
            acc[3] += total
        for channel in self._channels.values():
            if channel.state != "OFF" and wanted(channel.tier, channel.area_code, channel.kind):
                acc = groups.get(key_of(channel.tier, channel.area_code))
                if acc is not None:
                    acc[4] += 1
        return [
            {
                "group": key,
                "channels": n,
                "online_ratio": online / total,
                "working_ratio": working / total,
                "online_seconds": online,
                "working_seconds": working,
                "total_seconds": total,
                "currently_online": now_online,
            }
            for key, (n, online, working, total, now_online) in sorted(groups.items())
        ]

    def live_ratios(
        self,
        *,
        group_by: str = "tier",
        civil_code_digits: int = 6,
        kinds: tuple[str, ...] = ("channel",),
    ) -> dict[tuple[int, str], tuple[int, int]]:
        """{(tier, civil code prefix): (not OFF now, total)} from memory, for metrics.

        Keys are always (tier, civil_code) pairs so metric labels stay the
        same; grouped by "tier" the civil code part is "". O(channels).
        """
        if group_by not in ("tier", "civil_code"):
            raise ValueError(f"group_by must be 'tier' or 'civil_code', got {group_by!r}")
        by_civil = group_by == "civil_code"
        acc: dict[tuple[int, str], list[int]] = {}
        for c in self._channels.values():
            if c.kind not in kinds:
                continue
            key = (c.tier, c.area_code[:civil_code_digits] if by_civil else "")
            pair = acc.get(key)
            if pair is None:
                pair = acc[key] = [0, 0]
            pair[1] += 1
            if c.state != "OFF":
                pair[0] += 1
        return {key: (online, total) for key, (online, total) in acc.items()}

    def archive_report(
        self,
        *,
        mandatory: tuple[str, ...] = ("name", "manufacturer", "model", "owner", "civil_code", "address"),
        kinds: tuple[str, ...] = ("channel",),
        limit: int = 1000,
        require_location: bool = True,
    ) -> dict:
        """How complete the archive is: every channel of `kinds` needs the
        `mandatory` fields non-blank and, with `require_location`, a usable
        longitude/latitude (`Channel.has_location`; listed as "location").

        {channels, complete, complete_ratio (1.0 when there are none),
        missing_location, incomplete: [{channel_id, device_id, name, missing}]}
        with `incomplete` sorted by channel_id and cut at `limit` entries;
        the counts cover all.
        """
        unknown = [name for name in mandatory if name not in CHANNEL_FIELDS]
        if unknown:
            raise ValueError(f"unknown channel fields {unknown}")
        if limit < 0:
            raise ValueError(f"limit must not be negative, got {limit}")
        total = complete = no_location = 0
        incomplete: list[Channel] = []
        missing_of: dict[str, list[str]] = {}
        for c in self._channels.values():
            if c.kind not in kinds:
                continue
            total += 1
            missing = [name for name in mandatory if _blank(getattr(c, name))]
            if not c.has_location:
                no_location += 1
                if require_location:
                    missing.append("location")
            if missing:
                incomplete.append(c)
                missing_of[c.channel_id] = missing
            else:
                complete += 1
        incomplete.sort(key=operator.attrgetter("channel_id"))
        return {
            "channels": total,
            "complete": complete,
            "complete_ratio": complete / total if total else 1.0,
            "missing_location": no_location,
            "incomplete": [
                {"channel_id": c.channel_id, "device_id": c.device_id, "name": c.name,
                 "missing": missing_of[c.channel_id]}
                for c in incomplete[:limit]
            ],
        }

    def _meta(self, channel_id: str) -> tuple[int, str, str] | None:
        channel = self._channels.get(channel_id)
        if channel is not None:
            return channel.tier, channel.area_code, channel.kind
        return self._removed.get(channel_id)

    @staticmethod
    def _group_key(group_by: str, digits: int) -> Callable[[int, str], object]:
        if group_by == "tier":
            return lambda tier, area: tier
        if group_by == "civil_code":
            if digits < 1:
                raise ValueError(f"civil_code_digits must be positive, got {digits}")
            return lambda tier, area: area[:digits]
        if group_by == "all":
            return lambda tier, area: "all"
        raise ValueError(f"group_by must be one of {', '.join(_GROUP_BY)}, got {group_by!r}")

    @staticmethod
    def _wanted(kinds: tuple[str, ...], tier: int | None, civil_code: str | None) -> Callable[[int, str, str], bool]:
        def wanted(channel_tier: int, area: str, kind: str) -> bool:
            return (
                kind in kinds
                and (tier is None or channel_tier == tier)
                and (civil_code is None or area.startswith(civil_code))
            )
        return wanted

    # -- persistence -------------------------------------------------------

    async def flush(self) -> None:
        """Write changed channels, removals and pending events as one batch.

        A store failure is logged and everything stays pending for the next
        flush; nothing is raised, since the loop will retry anyway.
        """
        await self.persistence.flush()


def _exposure(events: list[ChannelEvent], since: float, until: float) -> tuple[float, float, float]:
    """(online, working, existing) seconds of one channel in [since, until),
    from its events ordered by time (the first at or before `since`, if any)."""
    online = working = total = 0.0
    last = len(events) - 1
    for i, event in enumerate(events):
        if event.reason == REMOVED:
            continue  # not there until its next event
        start = event.at if event.at > since else since
        end = events[i + 1].at if i < last else until
        if end > until:
            end = until
        if end <= start:
            continue
        span = end - start
        total += span
        if event.state != "OFF":
            online += span
            if event.state == "ON":
                working += span
    return online, working, total


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())
