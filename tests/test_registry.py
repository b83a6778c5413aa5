"""Device registry against real SQLite files: persistence round trips, counts,
paging, failure recovery and schema checks."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence

import pytest

from registry import Device, DeviceRegistry, SqliteStore, StatusEvent, Store, StoreError
from registry.sqlite import SCHEMA_VERSION
from registry.store import StoreBatch


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def dev_id(n: int, type_code: str = "132") -> str:
    # centre code 34020000, industry 00, type code (132 = IPC), 7-digit serial
    return f"3402000000{type_code}{n:07d}"


def make_device(n: int, **kw) -> Device:
    kw.setdefault("kind", "ipc")
    return Device(device_id=dev_id(n), host="10.0.0.1", port=5060 + n % 1000, **kw)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "data" / "registry.db"


async def open_registry(path, clock=None, **kw) -> DeviceRegistry:
    reg = DeviceRegistry(SqliteStore(path), flush_interval=kw.pop("flush_interval", 3600), clock=clock or FakeClock(),
                         **kw)
    await reg.start()
    return reg


def test_device_ids_are_20_digits():
    assert len(dev_id(1)) == 20 and dev_id(1).isdigit()


async def test_round_trip_devices_flags_passwords_extra_and_events(db_path, clock):
    reg = await open_registry(db_path, clock)
    a = reg.add(make_device(1, name="Gate", manufacturer="Hik", model="DS-2CD", firmware="V5.7",
                            transport="tcp", contact="sip:34020000001320000001@10.0.0.1:5060",
                            expires=3600, password="s3cret", extra={"channels": 4, "tags": ["gate"]}))
    b = reg.add(make_device(2, kind="nvr"))
    c = reg.add(make_device(3))
    assert a.created_at == a.updated_at == clock.now

    clock.now += 1
    a.registered_at = clock.now
    a.expires_at = clock.now + 3600
    a.last_seen = clock.now
    reg.touch(a)
    assert reg.set_online(a, True, "register")
    clock.now += 1
    assert reg.set_online(b, True, "register")
    clock.now += 1
    assert reg.set_online(b, False, "keepalive-timeout")
    assert reg.set_online(c, True, "register", at=clock.now + 0.5)
    await reg.stop()

    clock2 = FakeClock(clock.now + 100)
    reg2 = await open_registry(db_path, clock2)
    try:
        assert len(reg2) == 3
        assert reg2.counts() == (3, 2)
        for orig in (a, b, c):
            assert reg2.get(orig.device_id) == orig
        a2 = reg2.get(a.device_id)
        assert a2 is not a
        assert a2.password == "s3cret" and reg2.get(b.device_id).password is None
        assert a2.extra == {"channels": 4, "tags": ["gate"]}
        assert a2.online and a2.transport == "tcp" and a2.expires == 3600

        events = await reg2.status_events()
        t = clock.now
        assert events == [
            StatusEvent(a.device_id, True, t - 2, "register"),
            StatusEvent(b.device_id, True, t - 1, "register"),
            StatusEvent(b.device_id, False, t, "keepalive-timeout"),
            StatusEvent(c.device_id, True, t + 0.5, "register"),
        ]
        assert await reg2.status_events(device_id=b.device_id) == events[1:3]
        assert await reg2.status_events(since=t - 1, until=t) == events[1:2]
        assert await reg2.status_events(limit=2) == events[:2]
    finally:
        await reg2.stop()


async def test_counts_follow_transitions(db_path, clock):
    reg = await open_registry(db_path, clock)
    try:
        devs = [reg.add(make_device(i)) for i in range(10)]
        assert reg.counts() == (10, 0)
        for d in devs[:6]:
            assert reg.set_online(d, True, "register")
        assert reg.counts() == (10, 6)
        # No change, no event, no double counting.
        assert not reg.set_online(devs[0], True, "keepalive")
        assert not reg.set_online(devs[9], False, "expired")
        assert reg.counts() == (10, 6)
        assert reg.set_online(devs[0], False, "unregister")
        assert reg.counts() == (10, 5)
        # Removing an online device takes it offline first.
        assert reg.remove(devs[1].device_id)
        assert not reg.remove(devs[1].device_id)
        assert reg.counts() == (9, 4)
        # A device added as online counts from the start.
        reg.add(make_device(50, online=True))
        assert reg.counts() == (10, 5)
        assert sum(d.online for d in reg) == 5
        assert (await reg.status_events(device_id=devs[1].device_id))[-1].reason == "removed"
    finally:
        await reg.stop()
    reg2 = await open_registry(db_path)
    try:
        assert reg2.counts() == (10, 5)
        assert reg2.get(devs[1].device_id) is None
    finally:
        await reg2.stop()


async def test_listeners_hear_every_transition_and_failures_are_contained(db_path, clock):
    reg = await open_registry(db_path, clock)
    heard: list[tuple[Device, StatusEvent]] = []

    def broken(device, event):
        raise RuntimeError("metrics down")

    reg.add_listener(broken)
    reg.add_listener(lambda d, e: heard.append((d, e)))
    try:
        d = reg.add(make_device(1))
        assert reg.set_online(d, True, "register")
        assert not reg.set_online(d, True, "register")
        assert reg.set_online(d, False, "admin")
        assert [(x is d, e.online, e.reason) for x, e in heard] == [(True, True, "register"), (True, False, "admin")]
        assert d.online is False
    finally:
        await reg.stop()


async def test_query_paging_and_filters(db_path, clock):
    reg = await open_registry(db_path, clock)
    try:
        # Added out of order; results must come back sorted by device_id.
        order = [7, 3, 9, 1, 5, 0, 8, 2, 6, 4]
        devs = {i: reg.add(make_device(i, kind="nvr" if i % 3 == 0 else "ipc")) for i in order}
        for i in (1, 2, 3, 8):
            reg.set_online(devs[i], True, "register")

        total, page = reg.query(limit=4)
        assert total == 10 and [d.device_id for d in page] == [dev_id(i) for i in range(4)]
        total, page = reg.query(offset=8, limit=4)
        assert total == 10 and [d.device_id for d in page] == [dev_id(8), dev_id(9)]
        assert reg.query(offset=20) == (10, [])

        total, page = reg.query(online=True)
        assert total == 4 and [d.device_id for d in page] == [dev_id(i) for i in (1, 2, 3, 8)]
        total, page = reg.query(online=False, offset=1, limit=2)
        assert total == 6 and [d.device_id for d in page] == [dev_id(4), dev_id(5)]
        total, page = reg.query(kind="nvr")
        assert total == 4 and [d.device_id for d in page] == [dev_id(i) for i in (0, 3, 6, 9)]
        total, page = reg.query(kind="nvr", online=True)
        assert total == 1 and page == [devs[3]]
        assert reg.query(kind="platform") == (0, [])

        # The order stays right across adds and removes after a query.
        reg.remove(dev_id(0))
        reg.add(make_device(42))
        reg.add(make_device(11))
        total, page = reg.query(offset=8)
        assert total == 11 and [d.device_id for d in page] == [dev_id(9), dev_id(11), dev_id(42)]
        reg.remove(dev_id(42))
        assert [d.device_id for d in reg.query(offset=8)[1]] == [dev_id(9), dev_id(11)]
        assert [d.device_id for d in reg.query(limit=100)[1]] == sorted(d.device_id for d in reg)

        with pytest.raises(ValueError):
            reg.query(offset=-1)
    finally:
        await reg.stop()


class FlakyStore(SqliteStore):
    """Fails the next `fail` batch writes, like a full disk or a dropped connection."""

    def __init__(self, path, fail: int = 1) -> None:
        super().__init__(path)
        self.fail = fail
        self.batches: list[tuple[int, int, int]] = []

    async def write_all(self, batches: Sequence[StoreBatch]) -> None:
        self.batches += [(len(b.records), len(b.deleted_ids), len(b.events))
                         for b in batches if b.kind == "devices"]
        if self.fail:
            self.fail -= 1
            raise StoreError("disk full")
        await super().write_all(batches)


async def test_dirty_items_survive_a_failing_store(db_path, clock, caplog):
    # Devices that exist before the failure, so a pending delete can be tested.
    seed = await open_registry(db_path, clock)
    seed.add(make_device(90))
    await seed.stop()

    store = FlakyStore(db_path, fail=1)
    reg = DeviceRegistry(store, flush_interval=3600, clock=clock)
    await reg.start()
    try:
        a = reg.add(make_device(1, password="pw"))
        b = reg.add(make_device(2))
        reg.set_online(a, True, "register")
        reg.remove(dev_id(90))

        await reg.flush()  # fails
        assert "flush" in caplog.text and "disk full" in caplog.text
        assert reg.pending() == (3, 1)
        assert {d.device_id for d in await store.load_devices()} == {dev_id(90)}

        # Changes made after the failed flush are merged, not lost or reordered.
        clock.now += 5
        b.name = "Lobby"
        reg.touch(b)
        reg.set_online(b, True, "register")
        reg.set_online(a, False, "unregister")

        await reg.flush()
        assert reg.pending() == (0, 0)
        assert store.batches == [(2, 1, 1), (2, 1, 3)]
    finally:
        await reg.stop()

    reg2 = await open_registry(db_path)
    try:
        assert reg2.get(dev_id(90)) is None
        assert reg2.get(dev_id(1)) == a and reg2.get(dev_id(1)).password == "pw"
        assert reg2.get(dev_id(2)).name == "Lobby"
        assert reg2.counts() == (2, 1)
        events = await reg2.status_events()
        assert [(e.device_id, e.online, e.reason) for e in events] == [
            (dev_id(1), True, "register"),
            (dev_id(2), True, "register"),
            (dev_id(1), False, "unregister"),
        ]
    finally:
        await reg2.stop()


class GatedStore(SqliteStore):
    """Holds each batch write until released, to mutate devices mid-flush."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    def snapshots_needed(self, records: int) -> bool:
        return True  # it reads the records after an await: they must be copies

    async def write_all(self, batches) -> None:
        self.entered.set()
        await self.release.wait()
        await super().write_all(batches)


async def test_flush_writes_a_snapshot_while_the_hot_path_continues(db_path, clock):
    store = GatedStore(db_path)
    reg = DeviceRegistry(store, flush_interval=3600, clock=clock)
    await reg.start()
    try:
        d = reg.add(make_device(1, extra={"v": 1}))
        flush = asyncio.create_task(reg.flush())
        await store.entered.wait()
        # Mid-flush: the in-flight batch must keep the old values ...
        d.name = "renamed"
        d.extra["v"] = 2
        reg.touch(d)
        reg.set_online(d, True, "register")
        reg.add(make_device(2))
        assert reg.pending() == (2, 1)
        store.release.set()
        await flush
        on_disk = {x.device_id: x for x in await store.load_devices()}
        assert on_disk[d.device_id].name == "" and on_disk[d.device_id].extra == {"v": 1}
        assert dev_id(2) not in on_disk
        # ... and the next flush writes the new ones.
        await reg.flush()
        on_disk = {x.device_id: x for x in await store.load_devices()}
        assert on_disk[d.device_id] == d
        assert on_disk[d.device_id].extra == {"v": 2} and on_disk[d.device_id].online
        assert dev_id(2) in on_disk
    finally:
        store.release.set()
        await reg.stop()


async def test_a_small_flush_without_copies_still_writes_what_it_took(db_path, clock):
    # SqliteStore turns a small batch into rows at once instead of copying the devices; a
    # change made while that transaction runs on the worker thread belongs to the next one.
    reg = DeviceRegistry(SqliteStore(db_path), flush_interval=3600, clock=clock)
    await reg.start()
    try:
        assert not reg.store.snapshots_needed(1)
        d = reg.add(make_device(1, extra={"v": 1}))
        flush = asyncio.create_task(reg.flush())
        await asyncio.sleep(0)  # the flush has taken its batch and handed it to the thread
        d.name = "renamed"
        d.extra["v"] = 2
        reg.touch(d)
        await flush
        on_disk = {x.device_id: x for x in await reg.store.load_devices()}
        assert on_disk[d.device_id].name == "" and on_disk[d.device_id].extra == {"v": 1}
        await reg.flush()
        on_disk = {x.device_id: x for x in await reg.store.load_devices()}
        assert on_disk[d.device_id] == d
    finally:
        await reg.stop()


@pytest.mark.parametrize("count", [1, 2, 3, 41, 1024, 1365, 3200])
async def test_batches_of_any_size_are_written_whole(db_path, clock, count):
    # Rows go to SQLite as multi-row INSERTs of power-of-two sizes up to 1,024 rows: every
    # remainder must land, with its status events, and nothing twice.
    store = SqliteStore(db_path)
    await store.open()
    try:
        devices = [make_device(n, name=f"cam {n}", extra={"n": n}) for n in range(count)]
        events = [StatusEvent(d.device_id, True, clock.now + n, "register") for n, d in enumerate(devices)]
        await store.write_all([StoreBatch("devices", devices, [], events)])
        loaded = {d.device_id: d for d in await store.load_devices()}
        assert loaded == {d.device_id: d for d in devices}
        history = await store.status_events(since=0, limit=10_000)
        assert sorted((e.device_id, e.at) for e in history) == sorted((e.device_id, e.at) for e in events)
        # The same device twice in one batch (one statement): the later row wins.
        first, again = make_device(0, name="old"), make_device(0, name="new")
        await store.write_all([StoreBatch("devices", [first, again], [], [])])
        assert {d.device_id: d.name for d in await store.load_devices()}[first.device_id] == "new"
    finally:
        await store.close()


async def test_flush_loop_writes_in_the_background(db_path):
    reg = DeviceRegistry(SqliteStore(db_path), flush_interval=0.01)
    await reg.start()
    try:
        d = reg.add(make_device(1))
        reg.set_online(d, True, "register")
        for _ in range(200):
            if reg.pending() == (0, 0):
                break
            await asyncio.sleep(0.01)
        assert reg.pending() == (0, 0)
        assert [x.device_id for x in await reg.store.load_devices()] == [d.device_id]
    finally:
        await reg.stop()


async def test_hot_path_rejects_devices_not_in_the_registry(db_path, clock):
    reg = await open_registry(db_path, clock)
    try:
        stray = make_device(1)
        with pytest.raises(KeyError):
            reg.touch(stray)
        with pytest.raises(KeyError):
            reg.set_online(stray, True, "register")
        d = reg.add(stray)
        with pytest.raises(ValueError):
            reg.add(make_device(1))
        reg.remove(d.device_id)
        with pytest.raises(KeyError):
            reg.touch(d)
        assert reg.counts() == (0, 0)
    finally:
        await reg.stop()


async def test_pending_events_are_bounded(db_path, clock):
    store = FlakyStore(db_path, fail=1)
    reg = DeviceRegistry(store, flush_interval=3600, clock=clock, max_pending_events=4)
    await reg.start()
    try:
        d = reg.add(make_device(1))
        for i in range(3):
            clock.now += 1
            reg.set_online(d, not d.online, f"r{i}")
        await reg.flush()  # fails, 3 events kept
        for i in range(3, 6):
            clock.now += 1
            reg.set_online(d, not d.online, f"r{i}")
        assert reg.pending()[1] == 4
        await reg.flush()
        assert [e.reason for e in await reg.status_events()] == ["r2", "r3", "r4", "r5"]
    finally:
        await reg.stop()


async def test_schema_is_versioned_and_in_wal_mode(db_path):
    store = SqliteStore(db_path)
    await store.open()
    await store.close()
    await store.close()
    assert db_path.exists()  # parent directories were created
    con = sqlite3.connect(db_path)
    try:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {r[1] for r in con.execute("PRAGMA index_list(status_events)")}
        assert {"status_events_device_at", "status_events_at"} <= indexes
    finally:
        con.close()
    # Reopening an up-to-date file migrates nothing and keeps data.
    await store.open()
    await store.save_devices([make_device(1)])
    await store.close()
    await store.open()
    assert [d.device_id for d in await store.load_devices()] == [dev_id(1)]
    await store.close()


async def test_newer_schema_version_is_refused(db_path):
    store = SqliteStore(db_path)
    await store.open()
    await store.close()
    con = sqlite3.connect(db_path)
    con.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    con.commit()
    con.close()
    with pytest.raises(StoreError) as err:
        await SqliteStore(db_path).open()
    msg = str(err.value)
    assert str(db_path) in msg and "newer" in msg and "upgrade" in msg


async def test_garbage_file_is_refused(db_path):
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is a config file, not a database\n" * 100)
    reg = DeviceRegistry(SqliteStore(db_path))
    with pytest.raises(StoreError) as err:
        await reg.start()
    msg = str(err.value)
    assert str(db_path) in msg and "not a SQLite database" in msg and "new file" in msg


async def test_foreign_sqlite_database_is_refused(db_path):
    db_path.parent.mkdir(parents=True)
    con = sqlite3.connect(db_path)
    con.execute("CREATE TABLE devices (id INTEGER)")
    con.commit()
    con.close()
    with pytest.raises(StoreError, match="registry.db"):
        await SqliteStore(db_path).open()


async def test_store_errors_when_not_open(db_path):
    store = SqliteStore(db_path)
    with pytest.raises(StoreError, match="not open"):
        await store.load_devices()


async def test_flush_and_reload_100k_devices(db_path, clock):
    n = 100_000
    reg = await open_registry(db_path, clock)
    for i in range(n):
        d = reg.add(make_device(i, extra={"i": i}))
        if i % 3 == 0:
            reg.set_online(d, True, "register")
    await reg.stop()

    reg2 = await open_registry(db_path)
    try:
        assert reg2.counts() == (n, (n + 2) // 3)
        for i in (0, 1, 4_242, n - 1):
            d = reg2.get(dev_id(i))
            assert d.extra == {"i": i} and d.online == (i % 3 == 0) and d.port == 5060 + i % 1000
        total, page = reg2.query(online=True, offset=10, limit=2)
        assert total == (n + 2) // 3 and [d.device_id for d in page] == [dev_id(30), dev_id(33)]
        assert len(await reg2.status_events(limit=n)) == (n + 2) // 3
    finally:
        await reg2.stop()


async def test_cancelled_flush_keeps_its_batch(db_path, clock):
    store = GatedStore(db_path)
    reg = DeviceRegistry(store, flush_interval=3600, clock=clock)
    await reg.start()
    try:
        d = reg.add(make_device(1))
        reg.set_online(d, True, "register")
        flush = asyncio.create_task(reg.flush())
        await store.entered.wait()
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        assert reg.pending() == (1, 1)
        store.release.set()
        await reg.flush()
        assert reg.pending() == (0, 0)
        assert [x.device_id for x in await store.load_devices()] == [d.device_id]
    finally:
        store.release.set()
        await reg.stop()


class MemoryStore(Store):
    """The smallest Store: what a networked store has to provide."""

    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}
        self.events: list[StatusEvent] = []
        self.opened = False

    async def open(self) -> None:
        self.opened = True

    async def close(self) -> None:
        self.opened = False

    async def load_devices(self) -> list[Device]:
        return [d.copy() for d in self.devices.values()]

    async def save_devices(self, devices) -> None:
        self.devices.update((d.device_id, d.copy()) for d in devices)

    async def delete_devices(self, ids) -> None:
        for i in ids:
            self.devices.pop(i, None)

    async def add_status_events(self, events) -> None:
        self.events.extend(events)

    async def status_events(self, device_id=None, since=None, until=None, limit=1000):
        return sorted(
            (e for e in self.events
             if (device_id is None or e.device_id == device_id)
             and (since is None or e.at >= since)
             and (until is None or e.at < until)),
            key=lambda e: e.at,
        )[:limit]


async def test_registry_works_over_any_store(clock):
    store = MemoryStore()
    reg = DeviceRegistry(store, flush_interval=3600, clock=clock)
    await reg.start()
    d = reg.add(make_device(1))
    reg.add(make_device(2))
    reg.set_online(d, True, "register")
    reg.remove(dev_id(2))
    assert await reg.status_events() == [StatusEvent(d.device_id, True, clock.now, "register")]
    await reg.stop()
    assert not store.opened
    assert list(store.devices) == [d.device_id] and store.devices[d.device_id] == d


async def test_stop_reports_changes_it_could_not_write(db_path, clock):
    store = FlakyStore(db_path, fail=1)
    reg = DeviceRegistry(store, flush_interval=3600, clock=clock)
    await reg.start()
    reg.add(make_device(1))
    with pytest.raises(StoreError, match="1 device changes and 0 status events not written"):
        await reg.stop()
    assert store._db is None  # closed all the same
