"""Keeping the device archive in step with the devices: DeviceInfo, Catalog, subscriptions.

After a device registers (and on demand through the API, and every ``catalog.refresh_interval``
as a fallback for NVRs that drop subscriptions, PROTOCOL.md §4) ``DeviceSync`` asks it for its
DeviceInfo and its Catalog, folds the catalog into the channel registry (new channels added,
known ones updated, tiers applied by rule, channels a *complete* catalog no longer lists
removed) and subscribes to catalog changes. Catalog changes that arrive later, as NOTIFYs of
the subscription or as ``Notify/Catalog`` MESSAGEs, go through ``apply_notify``.

After a power cut thousands of devices register within seconds, and many answer queries
slowly or not at all. So syncs are not started per registration but queued (one entry per
device, however often it registers) and started at ``catalog.sync_rate`` devices per second:
the query load stays bounded, REGISTER and keepalive handling never starve behind it, and a
silent device costs one waiting task, never a slot another device needs (``DeviceQueries``
serialises queries per device only). A sync asked for through the API starts at once.
The DeviceInfo query is followed by ConfigDownload/BasicParam, whose HeartBeatInterval and
HeartBeatCount give the device its own offline deadline (§9.6.1, A.2.4 ``BasicParam``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from registry.channels import ChannelRegistry
from registry.devices import DeviceRegistry
from registry.models import CHANNEL_STATES, Channel, Device

from . import manscdp
from .catalog import CatalogCollector, CatalogResult, channel_kind, item_to_channel
from .config import Config
from .queries import DeviceQueries, QueryError
from .tiers import apply_tier

if TYPE_CHECKING:
    from .subscriptions import SubscriptionManager

__all__ = ["DeviceSync", "SyncResult"]

log = logging.getLogger("gb28181.sync")


@dataclass(slots=True)
class SyncResult:
    device_id: str
    items: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    complete: bool = False
    parts: int = 0
    seconds: float = 0.0
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


class DeviceSync:
    """See the module docstring."""

    def __init__(self, *, config: Config, registry: DeviceRegistry, channels: ChannelRegistry,
                 queries: DeviceQueries, collector: CatalogCollector) -> None:
        self.config = config
        self.registry = registry
        self.channels = channels
        self.queries = queries
        self.collector = collector
        self.subscriptions: SubscriptionManager | None = None
        self._tasks: set[asyncio.Task] = set()
        self._running: dict[str, asyncio.Task] = {}
        #: Devices waiting for their sync, oldest first (each at most once).
        self._queue: OrderedDict[str, None] = OrderedDict()
        #: Devices queued again while their sync ran (a reboot mid-sync): synced once more after.
        self._again: set[str] = set()
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None
        self._loop_task: asyncio.Task | None = None
        self.last: dict[str, SyncResult] = {}
        #: Called with (channel, "ADD" | "UPDATE") when a catalog or notify adds a channel or
        #: changes its fields (the cascade tells its upper platforms, Annex P.4).
        self.on_change: Callable[[Channel, str], None] | None = None

    # -- scheduling --------------------------------------------------------------------------
    def on_registered(self, device: Device) -> None:
        """A device (re)registered: sync it in the background, at the paced rate."""
        cfg = self.config
        if cfg.registration.query_device_info or cfg.catalog.query_on_register:
            self.enqueue(device)

    def resume(self) -> int:
        """After a restart: the devices whose registration outlived it are synced again, at the
        paced rate. Their subscriptions lived in this process and are gone, and their catalogs
        may have changed meanwhile; a lower platform, for one, keeps its registration and would
        otherwise never tell us of its changes again. Returns how many were queued."""
        cfg = self.config
        if not (cfg.catalog.query_on_register or cfg.registration.query_device_info):
            return 0
        online = [d for d in self.registry if d.online]
        for device in online:
            self.enqueue(device)
        return len(online)

    def enqueue(self, device: Device) -> None:
        """Queue a background sync of ``device`` (a no-op if it is queued already)."""
        self._queue[device.device_id] = None
        if self._wake is not None:
            self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def schedule(self, device: Device, *, asked: bool = False) -> asyncio.Task:
        """Start a sync of ``device`` now unless one is already running; returns its task."""
        running = self._running.get(device.device_id)
        if running is not None and not running.done():
            return running
        self._queue.pop(device.device_id, None)
        task = asyncio.get_running_loop().create_task(self._guarded(device, asked))
        self._running[device.device_id] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guarded(self, device: Device, asked: bool = False) -> SyncResult:
        try:
            return await self.sync(device, asked=asked)
        except Exception as exc:  # keep the scheduler alive whatever a device does
            log.exception("sync of %s failed", device.device_id)
            return SyncResult(device.device_id, error=str(exc))
        finally:
            self._running.pop(device.device_id, None)
            if device.device_id in self._again:
                self._again.discard(device.device_id)
                self.enqueue(device)

    async def _dispatch(self) -> None:
        """Start queued syncs at ``catalog.sync_rate`` per second (0: as fast as they come)."""
        assert self._wake is not None
        rate = self.config.catalog.sync_rate
        next_at = time.monotonic()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                device_id, _ = self._queue.popitem(last=False)
                device = self.registry.get(device_id)
                if device is None or not device.online:
                    continue
                if device_id in self._running:
                    self._again.add(device_id)
                    continue
                self.schedule(device)
                if rate > 0:
                    next_at = max(next_at + 1.0 / rate, time.monotonic() - 1.0)
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self._queue:
            self._wake.set()
        self._dispatcher = loop.create_task(self._dispatch(), name="sync-dispatch")
        if self.config.catalog.refresh_interval > 0:
            self._loop_task = loop.create_task(self._refresh_loop())

    async def stop(self) -> None:
        tasks = list(self._tasks) + [t for t in (self._loop_task, self._dispatcher) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _refresh_loop(self) -> None:
        interval = self.config.catalog.refresh_interval
        while True:
            # Wake every so often and sync the devices whose catalog is due, a few at a time.
            await asyncio.sleep(min(interval, 30.0) * random.uniform(0.8, 1.2))
            now = time.time()
            for device in list(self.registry):
                if not device.online:
                    continue
                done = device.extra.get("catalog_at", 0.0)
                if now - done >= interval:
                    self.enqueue(device)

    # -- the sync itself ------------------------------------------------------------------------
    async def sync(self, device: Device, *, asked: bool = False) -> SyncResult:
        """DeviceInfo, BasicParam and Catalog as configured; ``asked`` (through the API): the
        Catalog whatever ``catalog.query_on_register`` says, since that is what was asked for."""
        started = time.monotonic()
        result = SyncResult(device.device_id)
        cfg = self.config
        if cfg.registration.query_device_info:
            try:
                await self.device_info(device)
            except QueryError as exc:
                log.info("DeviceInfo of %s: %s", device.device_id, exc)
        if cfg.registration.query_basic_param:
            try:
                await self.basic_param(device)
            except QueryError as exc:
                log.info("BasicParam of %s: %s", device.device_id, exc)
        if cfg.catalog.query_on_register or asked:
            try:
                catalog = await self.catalog(device)
            except (QueryError, TimeoutError) as exc:
                result.error = str(exc)
                log.info("Catalog of %s: %s", device.device_id, exc)
            else:
                self.apply_catalog(device, catalog, result)
                if cfg.catalog.subscribe and self.subscriptions is not None and device.online:
                    try:
                        await self.subscriptions.subscribe(device)
                    except QueryError as exc:
                        log.info("catalog subscription to %s: %s", device.device_id, exc)
        result.seconds = round(time.monotonic() - started, 3)
        self.last[device.device_id] = result
        return result

    async def device_info(self, device: Device) -> manscdp.Manscdp:
        info = await self.queries.query(device, "DeviceInfo", timeout=10.0)
        device.name = info.text("DeviceName") or device.name
        device.manufacturer = info.text("Manufacturer") or device.manufacturer
        device.model = info.text("Model") or device.model
        device.firmware = info.text("Firmware") or device.firmware
        channels = info.text("Channel")
        if channels.isdigit():
            device.extra["channels"] = int(channels)
        self.registry.touch(device)
        return info

    async def basic_param(self, device: Device) -> manscdp.Manscdp:
        """ConfigDownload/BasicParam: the device's own heartbeat interval and count set its
        offline deadline (``Presence.deadline``)."""
        msg = await self.queries.query(device, "ConfigDownload", (("ConfigType", "BasicParam"),),
                                       timeout=10.0)
        for tag, key in (("HeartBeatInterval", "heartbeat_interval"),
                         ("HeartBeatCount", "heartbeat_count")):
            text = msg.text(f"BasicParam/{tag}")
            if text.isascii() and text.isdigit() and 0 < int(text) <= 3600:
                device.extra[key] = int(text)
        self.registry.touch(device)
        return msg

    async def catalog(self, device: Device) -> CatalogResult:
        """Query the Catalog and collect every part (see ``CatalogCollector``)."""
        async with self.queries.exclusive(device.device_id):
            sn = self.queries.next_sn()
            future = self.collector.begin(device.device_id, sn)
            try:
                await self.queries.send(device, "Catalog", sn=sn)
            except QueryError:
                self.collector.cancel(device.device_id, sn)
                future.cancel()
                raise
            return await future

    def apply_catalog(self, device: Device, catalog: CatalogResult,
                      result: SyncResult | None = None) -> SyncResult:
        result = result or SyncResult(device.device_id)
        now = time.time()
        tiers = self.config.tiers
        listed = set()
        for item in catalog.items.values():
            channel = item_to_channel(item, device.device_id)
            if not channel.channel_id or channel.channel_id == device.device_id and channel.kind != "channel":
                continue  # a device listing itself (not as a camera) adds nothing
            listed.add(channel.channel_id)
            apply_tier(channel, tiers)  # an operator-locked tier survives the upsert
            before = _fields(self.channels.get(channel.channel_id))
            stored, created = self.channels.upsert(channel, at=now, reason="catalog")
            if created:
                result.added += 1
            else:
                result.updated += 1
            self._changed(stored, before)
        result.items = len(listed)
        result.parts = catalog.parts
        result.complete = catalog.complete
        if catalog.complete and self.config.catalog.remove_missing:
            for old in self.channels.of_device(device.device_id):
                if old.channel_id not in listed:
                    self.channels.remove(old.channel_id)
                    result.removed += 1
        device.extra["catalog_at"] = now
        device.extra["catalog_items"] = len(listed)
        self.registry.touch(device)
        return result

    def apply_notify(self, device: Device, msg: manscdp.Manscdp) -> int:
        """Catalog changes (ON/OFF/VLOST/DEFECT/ADD/DEL/UPDATE); returns items applied."""
        now = time.time()
        applied = 0
        for item in msg.items("DeviceList"):
            channel_id = item.get("DeviceID")
            event = item.get("Event")
            if not isinstance(channel_id, str) or not channel_id or not isinstance(event, str):
                continue
            event = event.strip().upper()
            stored = self.channels.get(channel_id)
            if event in ("ADD", "UPDATE"):
                channel = item_to_channel(item, device.device_id)
                apply_tier(channel, self.config.tiers)
                before = _fields(stored)
                stored, _ = self.channels.upsert(channel, at=now, reason="notify")
                self._changed(stored, before)
            elif event == "DEL":
                if stored is None or not self.channels.remove(channel_id):
                    continue
            elif event in CHANNEL_STATES:
                if stored is None:
                    # A change for a channel we have not seen in a catalog yet: keep its state
                    # now, the next catalog fills in the rest.
                    stub = Channel(channel_id=channel_id, device_id=device.device_id,
                                   kind=channel_kind(channel_id))
                    apply_tier(stub, self.config.tiers)
                    stored, _ = self.channels.upsert(stub, at=now, reason="notify")
                self.channels.set_status(stored, event, "notify", at=now)
            else:
                continue
            applied += 1
        return applied

    def _changed(self, channel: Channel, before: tuple | None) -> None:
        if self.on_change is None:
            return
        if before is None:
            self.on_change(channel, "ADD")
        elif before != _fields(channel):
            self.on_change(channel, "UPDATE")


def _fields(channel: Channel | None) -> tuple | None:
    """What an upper platform sees of a channel besides its state (its catalog item)."""
    if channel is None:
        return None
    return (channel.name, channel.civil_code, channel.parent_id, channel.business_group_id,
            channel.address, channel.longitude, channel.latitude, channel.manufacturer,
            channel.model, channel.ptz_type, channel.device_id)
