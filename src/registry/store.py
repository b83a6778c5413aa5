"""Persistence interface behind the device registry.

`DeviceRegistry` (devices.py) keeps every device in memory and calls a `Store`
only from its background flush, with batches of detached `Device` snapshots,
so a store may be slow or networked without touching the SIP hot path.
`SqliteStore` (sqlite.py) is the implementation today; a PostgreSQL or Redis
store implements the same methods later.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from .models import Device, StatusEvent


class StoreError(RuntimeError):
    """The store cannot be opened, read or written; the message says what to fix."""


class Store(abc.ABC):
    """Durable home of devices and their status history.

    Callers hand in objects they will not mutate until the call returns, so an
    implementation may read them from another thread while it awaits.
    Failures are raised as `StoreError`.
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
    ) -> list[StatusEvent]:
        """Transitions ordered by time, oldest first; `since` <= at < `until`."""

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
