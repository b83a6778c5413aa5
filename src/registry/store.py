"""Persistence interface behind the device and channel registries.

`DeviceRegistry` (devices.py) and `ChannelRegistry` (channels.py) keep every
record in memory and call a `Store` only from their background flushes, with
batches of detached snapshots, so a store may be slow or networked without
touching the SIP hot path. Both registries share one store; the device
registry opens and closes it. `SqliteStore` (sqlite.py) is the implementation
today; a PostgreSQL or Redis store implements the same methods later.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .models import AlarmEvent, Channel, ChannelEvent, Device, FaultEvent, PositionEvent, StatusEvent


@dataclass(slots=True)
class StoreBatch:
    """One registry's part of a flush: records to insert or replace, IDs to delete, history
    events to append. ``kind`` is "devices" or "channels"."""

    kind: str
    records: Sequence
    deleted_ids: Sequence[str]
    events: Sequence


@dataclass(slots=True)
class UserRecord:
    """A console/API account as stored (gb28181.users keeps them in memory). ``scopes`` is
    ``{"civil_codes": [...], "business_groups": [...]}``; ``tokens`` holds one dict per API
    token, ``{"id", "hash" (SHA-256 hex), "created_at", "label"}``: the token itself is never
    stored. ``password_hash`` is an argon2id PHC string."""

    name: str
    role: str
    password_hash: str
    scopes: dict[str, Any] = field(default_factory=dict)
    tokens: list[dict[str, Any]] = field(default_factory=list)
    disabled: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(slots=True)
class RecordSegment:
    """One MP4 segment of a platform recording as indexed (gb28181/record_index.py): ``path``
    is its key under the records root, times are Unix seconds of its first and last frame,
    ``state`` open | closed | failed, ``gap_before`` the stream broke off just before it."""

    channel_id: str
    path: str
    start: float
    end: float
    bytes: int = 0
    frames: int = 0
    codec: str = ""
    gap_before: bool = False
    tier: int = 3
    state: str = "closed"
    created_at: float = 0.0
    id: int | None = None


class StoreError(RuntimeError):
    """The store cannot be opened, read or written; the message says what to fix."""


class Store(abc.ABC):
    """Durable home of devices, channels and their status histories.

    Callers hand in objects they will not mutate until the call returns, so an
    implementation may read them from another thread while it awaits.
    Failures are raised as `StoreError`.

    The device methods are abstract. The user methods (`load_users`, `save_user`,
    `delete_user`) raise NotImplementedError like the channel ones, for the same reason. The
    channel methods (`load_channels`,
    `write_channel_batch`, `channel_events`, `channel_history`) raise
    NotImplementedError here rather than being abstract, so a device-only
    store keeps working; a store given to a `ChannelRegistry` must implement
    all four.
    """

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema up to date."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection; closing twice is harmless."""

    @abc.abstractmethod
    async def load_devices(self) -> list[Device]:
        """Every stored device, in no particular order."""

    @abc.abstractmethod
    async def save_devices(self, devices: Sequence[Device]) -> None:
        """Insert or fully replace these devices, keyed by device_id."""

    @abc.abstractmethod
    async def delete_devices(self, ids: Sequence[str]) -> None:
        """Forget these devices; unknown IDs are ignored. Status history is kept."""

    @abc.abstractmethod
    async def add_status_events(self, events: Sequence[StatusEvent]) -> None:
        """Append transitions to the status history."""

    @abc.abstractmethod
    async def status_events(
        self,
        device_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[StatusEvent]:
        """Transitions with `since` <= at < `until`, ordered by time: the
        oldest `limit` oldest first, or with `newest_first` the latest `limit`
        newest first. Events with equal times keep the order they were added in."""

    async def write_batch(
        self,
        devices: Sequence[Device],
        deleted_ids: Sequence[str],
        events: Sequence[StatusEvent],
    ) -> None:
        """Apply one registry flush.

        A device ID never appears in both `devices` and `deleted_ids`, so the
        order of the three parts does not matter. This default is not atomic;
        stores with transactions override it so that a flush lands whole or not
        at all, which is what lets the registry retry a failed flush as is.
        """
        if deleted_ids:
            await self.delete_devices(deleted_ids)
        if devices:
            await self.save_devices(devices)
        if events:
            await self.add_status_events(events)

    async def fault_events(
        self,
        device_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[FaultEvent]:
        """Keepalive fault reports, ordered as `status_events` orders them."""
        raise NotImplementedError(f"{type(self).__name__} does not store device faults")

    async def alarm_events(
        self,
        device_id: str | None = None,
        since: float | None = None,
        priorities: tuple[int, int] | None = None,
        limit: int = 1000,
    ) -> list[AlarmEvent]:
        """Stored alarms received at or after `since` with a priority in the inclusive range
        `priorities`, newest first (by when they were received), at most `limit`."""
        raise NotImplementedError(f"{type(self).__name__} does not store alarms")

    async def position_events(
        self,
        device_id: str,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
    ) -> list[PositionEvent]:
        """The track of a device: fixes received with `since` <= at < `until`, oldest first,
        at most `limit`."""
        raise NotImplementedError(f"{type(self).__name__} does not store positions")

    async def prune_positions(self, before: float) -> int:
        """Forget the fixes received before `before`; returns how many."""
        raise NotImplementedError(f"{type(self).__name__} does not store positions")

    def snapshots_needed(self, records: int) -> bool:
        """Whether a flush of ``records`` records must hand over detached copies. A store that
        answers False for a batch turns its records into rows in ``write_all`` before its
        first await, while nothing else can change them, and so spares the copies."""
        return True

    async def write_all(self, batches: Sequence[StoreBatch]) -> None:
        """Apply one flush of every registry sharing this store.

        This default writes the batches one after the other; a store with transactions
        overrides it so that the flush lands whole or not at all (a device never on disk
        without the channels written with it, or the other way round).
        """
        for batch in batches:
            if batch.kind == "devices":
                await self.write_batch(batch.records, batch.deleted_ids, batch.events)
            elif batch.kind == "channels":
                await self.write_channel_batch(batch.records, batch.deleted_ids, batch.events)
            else:
                raise StoreError(f"{type(self).__name__} cannot store {batch.kind!r}")

    # -- channels ------------------------------------------------------------

    async def load_channels(self) -> list[Channel]:
        """Every stored channel, in no particular order."""
        raise NotImplementedError(f"{type(self).__name__} does not store channels")

    async def write_channel_batch(
        self,
        channels: Sequence[Channel],
        deleted_ids: Sequence[str],
        events: Sequence[ChannelEvent],
    ) -> None:
        """Apply one channel registry flush, whole or not at all: insert or
        fully replace `channels` (keyed by channel_id), forget `deleted_ids`
        (their history is kept) and append `events`. A channel ID never
        appears in both `channels` and `deleted_ids`."""
        raise NotImplementedError(f"{type(self).__name__} does not store channels")

    async def channel_events(
        self,
        channel_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 1000,
        newest_first: bool = False,
    ) -> list[ChannelEvent]:
        """Channel events with `since` <= at < `until`, ordered as `status_events` orders."""
        raise NotImplementedError(f"{type(self).__name__} does not store channels")

    async def channel_history(self, since: float, until: float) -> list[ChannelEvent]:
        """What availability over [since, until) needs: for every channel that
        has events, its last event at or before `since`, plus every event with
        `since` < at < `until`; ordered by (channel_id, at), equal times in the
        order they were added. Includes channels deleted since."""
        raise NotImplementedError(f"{type(self).__name__} does not store channels")

    # -- users (console and API accounts) --------------------------------------------------
    # Written through at once, not behind: there are few, they change rarely, and an admin who
    # was told "created" must find the account after a crash.

    async def load_users(self) -> list[UserRecord]:
        """Every stored user account, in no particular order."""
        raise NotImplementedError(f"{type(self).__name__} does not store users")

    async def save_user(self, user: UserRecord) -> None:
        """Insert or fully replace this account, keyed by name, durably before returning."""
        raise NotImplementedError(f"{type(self).__name__} does not store users")

    async def delete_user(self, name: str) -> None:
        """Forget this account; an unknown name is ignored."""
        raise NotImplementedError(f"{type(self).__name__} does not store users")

    # -- platform recordings: the segment index and channels' own recording modes ------------

    async def save_segments(self, segments: Sequence[RecordSegment]) -> None:
        """Insert segments, or update the ones whose ``path`` is stored (a segment that closed)."""
        raise NotImplementedError(f"{type(self).__name__} does not index recordings")

    async def delete_segments(self, paths: Sequence[str]) -> None:
        """Forget the segments at ``paths``; unknown ones are ignored."""
        raise NotImplementedError(f"{type(self).__name__} does not index recordings")

    async def segments(self, channel_id: str | None = None, start: float | None = None,
                       end: float | None = None, *, tier: int | None = None,
                       offset: int = 0, limit: int = 1000,
                       count: bool = True) -> tuple[int, list[RecordSegment]]:
        """(matching, a page of them): segments overlapping [start, end), of one channel or
        tier; by start time. Without ``count`` the first is the page's length: counting every
        match is a scan a caller that pages not need not pay."""
        raise NotImplementedError(f"{type(self).__name__} does not index recordings")

    async def segment_paths(self) -> dict[str, str]:
        """Every indexed path with its state (the start-up reconciliation)."""
        raise NotImplementedError(f"{type(self).__name__} does not index recordings")

    async def segment_summary(self, since: float, until: float) -> list[tuple]:
        """Per channel: (channel_id, tier, segments, bytes, earliest start, latest end, seconds
        covered in [since, until), and gaps, failed segments and bytes of the segments starting in it)."""
        raise NotImplementedError(f"{type(self).__name__} does not index recordings")

    async def load_record_plans(self) -> dict[str, str]:
        """Channels' own recording modes, by channel ID."""
        raise NotImplementedError(f"{type(self).__name__} does not index recordings")

    async def save_record_plan(self, channel_id: str, mode: str | None, at: float) -> None:
        """Set a channel's own recording mode; None: back to its tier's plan."""
        raise NotImplementedError(f"{type(self).__name__} does not index recordings")
