"""Channel registry against real SQLite files: upserts and locked tiers, effective
state following the device, counts, queries, persistence across restarts, the
schema 1 -> 2 migration, store failures and a 100k-channel round trip."""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from collections import Counter
from collections.abc import Sequence

import pytest

from registry import (
    CHANNEL_STATES,
    Channel,
    ChannelEvent,
    ChannelRegistry,
    Device,
    DeviceRegistry,
    SqliteStore,
    StatusEvent,
    Store,
    StoreError,
)
from registry.sqlite import SCHEMA_VERSION
from registry.store import StoreBatch
from registry.writebehind import Persistence

T0 = 1_700_000_000.0
NVR = "34020000001180000001"
NVR2 = "34020000001180000002"


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ch_id(n: int, centre: str = "34020000", type_code: str = "132") -> str:
    # centre code, industry 00, type code (132 = IPC), 7-digit serial
    return f"{centre}00{type_code}{n:07d}"


def make_channel(n: int, device_id: str = NVR, **kw) -> Channel:
    kw.setdefault("name", f"Camera {n}")
    return Channel(channel_id=kw.pop("channel_id", ch_id(n)), device_id=device_id, **kw)


class Registries:
    """A DeviceRegistry and a ChannelRegistry over one store, started and stopped as the server does."""

    def __init__(self, store: Store, clock: FakeClock | None = None) -> None:
        self.store = store
        self.clock = clock or FakeClock()
        persistence = Persistence(store, flush_interval=3600)
        self.devices = DeviceRegistry(store, clock=self.clock, persistence=persistence)
        self.channels = ChannelRegistry(store, clock=self.clock, persistence=persistence)

    async def start(self) -> Registries:
        await self.devices.start()
        await self.channels.start()
        return self

    async def stop(self) -> None:
        await self.channels.stop()
        await self.devices.stop()


async def open_channels(path, clock: FakeClock | None = None) -> Registries:
    return await Registries(SqliteStore(path), clock).start()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "data" / "registry.db"


@pytest.fixture
async def regs(db_path, clock):
    r = await open_channels(db_path, clock)
    yield r
    await r.stop()


def test_ids_look_like_gb28181_ids():
    assert len(ch_id(1)) == 20 and ch_id(1).isdigit() and ch_id(1)[10:13] == "132"


async def test_upsert_inserts_then_updates_catalog_fields_and_keeps_a_locked_tier(regs, clock):
    reg = regs.channels
    reg.set_device_online(NVR, True)
    first = make_channel(1, manufacturer="Hikvision", civil_code="340200", tier=2,
                         info={"PTZType": "1"}, raw={"DeviceID": ch_id(1), "StreamNum": "2"})
    stored, created = reg.upsert(first, at=T0 - 5)
    assert created and stored is first
    assert stored.state == "ON" and stored.state_changed_at == T0 - 5 and stored.seen_at == T0 - 5
    assert stored.created_at == stored.updated_at == T0

    # An update takes every catalog field, the tier too while it is not locked.
    clock.now += 10
    stored, created = reg.upsert(make_channel(1, name="Gate", manufacturer="Dahua", tier=1,
                                              longitude=117.2, latitude=31.8, raw={"X": "1"}))
    assert not created and stored is first
    assert (stored.name, stored.manufacturer, stored.tier, stored.civil_code) == ("Gate", "Dahua", 1, "")
    assert (stored.longitude, stored.raw, stored.info) == (117.2, {"X": "1"}, {})
    assert stored.created_at == T0 and stored.updated_at == stored.seen_at == T0 + 10
    assert stored.state_changed_at == T0 - 5  # state did not change

    # Locked through the API: rules (the incoming tier) leave it alone.
    stored.tier, stored.tier_locked = 1, True
    reg.touch(stored)
    stored, _ = reg.upsert(make_channel(1, name="Gate 2", tier=3, tier_locked=False))
    assert (stored.name, stored.tier, stored.tier_locked) == ("Gate 2", 1, True)
    # The incoming object's own state fields are ignored.
    stored, _ = reg.upsert(make_channel(1, state="DEFECT", created_at=1.0, state_changed_at=2.0))
    assert (stored.state, stored.created_at, stored.state_changed_at) == ("ON", T0, T0 - 5)

    assert len(reg) == 1 and reg.get(ch_id(1)) is first and ch_id(1) in reg
    assert await reg.events() == [ChannelEvent(ch_id(1), "ON", T0 - 5, "catalog")]


async def test_upsert_rejects_an_unknown_status(regs):
    with pytest.raises(ValueError, match="ONLINE"):
        regs.channels.upsert(make_channel(1, status="ONLINE"))
    assert len(regs.channels) == 0


async def test_a_new_channel_gets_a_first_event_with_its_effective_state(regs):
    reg = regs.channels
    # Device state unknown: OFF, and the channel exists from here on.
    a, _ = reg.upsert(make_channel(1, device_id=NVR), at=T0)
    reg.set_device_online(NVR2, True)
    b, _ = reg.upsert(make_channel(2, device_id=NVR2, status="VLOST"), at=T0 + 1)
    reg.set_device_online("34020000001180000003", False)
    c, _ = reg.upsert(make_channel(3, device_id="34020000001180000003"), at=T0 + 2)
    assert (a.state, b.state, c.state) == ("OFF", "VLOST", "OFF")
    assert await reg.events() == [
        ChannelEvent(ch_id(1), "OFF", T0, "catalog"),
        ChannelEvent(ch_id(2), "VLOST", T0 + 1, "catalog"),
        ChannelEvent(ch_id(3), "OFF", T0 + 2, "catalog"),
    ]


async def test_effective_state_follows_the_device_online_and_offline(regs, clock):
    reg = regs.channels
    chans = [reg.upsert(make_channel(i, status=s))[0] for i, s in enumerate(("ON", "ON", "VLOST", "OFF", "DEFECT"))]
    other, _ = reg.upsert(make_channel(9, device_id=NVR2))
    assert [c.state for c in chans] == ["OFF"] * 5

    # The OFF channel stays OFF: four change.
    assert reg.set_device_online(NVR, True, at=T0 + 10) == 4
    assert [c.state for c in chans] == ["ON", "ON", "VLOST", "OFF", "DEFECT"]
    assert reg.set_device_online(NVR, True, at=T0 + 11) == 0
    assert other.state == "OFF"

    assert reg.set_device_online(NVR, False, at=T0 + 20) == 4
    assert [c.state for c in chans] == ["OFF"] * 5
    # Their own status is kept and comes back with the device.
    assert [c.status for c in chans] == ["ON", "ON", "VLOST", "OFF", "DEFECT"]
    assert reg.set_device_online(NVR, True, at=T0 + 30) == 4
    assert chans[2].state == "VLOST" and chans[2].state_changed_at == T0 + 30
    assert reg.set_device_online("34020000001180000099", True) == 0  # no channels: fine

    events = await reg.events(channel_id=ch_id(2))
    assert [(e.state, e.at, e.reason) for e in events] == [
        ("OFF", T0, "catalog"),
        ("VLOST", T0 + 10, "device-online"),
        ("OFF", T0 + 20, "device-offline"),
        ("VLOST", T0 + 30, "device-online"),
    ]
    assert await reg.events(channel_id=ch_id(3)) == [ChannelEvent(ch_id(3), "OFF", T0, "catalog")]
    # A channel added later under a device known online starts in its own status.
    late, _ = reg.upsert(make_channel(7, status="DEFECT"), at=T0 + 40)
    assert late.state == "DEFECT"


async def test_device_registry_transitions_drive_channels_through_a_listener(regs):
    # How the server wires them: the device registry's listener calls set_device_online.
    devices, reg = regs.devices, regs.channels
    devices.add_listener(lambda d, e: reg.set_device_online(d.device_id, e.online, at=e.at))
    nvr = devices.add(Device(device_id=NVR, kind="nvr"))
    c, _ = reg.upsert(make_channel(1))
    devices.set_online(nvr, True, "register", at=T0 + 1)
    assert c.state == "ON"
    devices.set_online(nvr, False, "keepalive-timeout", at=T0 + 2)
    assert c.state == "OFF"
    assert [(e.state, e.reason) for e in await reg.events()] == [
        ("OFF", "catalog"), ("ON", "device-online"), ("OFF", "device-offline")]


async def test_set_status_transitions(regs, clock):
    reg = regs.channels
    reg.set_device_online(NVR, True)
    c, _ = reg.upsert(make_channel(1), at=T0)
    steps = [("VLOST", True), ("VLOST", False), ("DEFECT", True), ("OFF", True), ("OFF", False), ("ON", True)]
    for i, (status, changed) in enumerate(steps, 1):
        assert reg.set_status(c, status, "notify", at=T0 + i) is changed
        assert c.status == c.state == status
    with pytest.raises(ValueError):
        reg.set_status(c, "ONLINE", "notify")
    with pytest.raises(ValueError):
        reg.set_status(c, "on", "notify")
    assert c.status == "ON"

    # Device offline: the status is recorded, the effective state stays OFF, no event ...
    reg.set_device_online(NVR, False, at=T0 + 10)
    assert reg.set_status(c, "VLOST", "notify", at=T0 + 11) is False
    assert (c.status, c.state) == ("VLOST", "OFF")
    # ... until the device is back.
    reg.set_device_online(NVR, True, at=T0 + 12)
    assert c.state == "VLOST"

    events = await reg.events()
    assert [(e.state, e.at) for e in events] == [
        ("ON", T0), ("VLOST", T0 + 1), ("DEFECT", T0 + 3), ("OFF", T0 + 4), ("ON", T0 + 6),
        ("OFF", T0 + 10), ("VLOST", T0 + 12)]
    assert {e.reason for e in events[1:5]} == {"notify"}
    # A status change carried by a catalog goes through upsert too.
    stored, _ = reg.upsert(make_channel(1, status="ON"), at=T0 + 20, reason="catalog")
    assert stored.state == "ON" and (await reg.events(newest_first=True, limit=1))[0] == ChannelEvent(
        ch_id(1), "ON", T0 + 20, "catalog")


async def test_counts_match_the_channels_through_random_operations(regs):
    reg = regs.channels
    rng = random.Random(7)
    devices = [f"3402000000118000000{i}" for i in range(4)]
    for step in range(3000):
        op = rng.random()
        n = rng.randrange(60)
        if op < 0.35:
            reg.upsert(make_channel(n, device_id=rng.choice(devices), status=rng.choice(CHANNEL_STATES)))
        elif op < 0.65:
            c = reg.get(ch_id(n))
            if c is not None:
                reg.set_status(c, rng.choice(CHANNEL_STATES), "notify")
        elif op < 0.85:
            reg.set_device_online(rng.choice(devices), rng.random() < 0.6)
        elif op < 0.97:
            reg.remove(ch_id(n))
        else:
            reg.remove_device(rng.choice(devices))
        if step % 100 == 0:
            expected = Counter(c.state for c in reg)
            assert reg.counts() == {s: expected.get(s, 0) for s in CHANNEL_STATES}
    expected = Counter(c.state for c in reg)
    assert reg.counts() == {s: expected.get(s, 0) for s in CHANNEL_STATES}
    assert sum(reg.counts().values()) == len(reg)
    for c in reg:
        assert c in reg.of_device(c.device_id)
    assert sum(len(reg.of_device(d)) for d in devices) == len(reg)


async def test_query_filters_and_paging(regs):
    reg = regs.channels
    reg.set_device_online(NVR, True)
    specs = [
        # n, device, civil_code, tier, status, kind, name, address, parent_id, lon, lat
        (5, NVR, "340201", 1, "ON", "channel", "North Gate", "No. 1 Road", NVR, 117.2, 31.8),
        (3, NVR, "340202", 2, "VLOST", "channel", "Lobby", "Hall B, Gate side", f"{NVR}/21500000002160000001",
         0.0, 31.8),
        (9, NVR, "350100", 1, "ON", "channel", "Yard", "", "34020000002160000001/34020000002160000002", None, None),
        (1, NVR2, "", 3, "ON", "channel", "gatehouse", "", "", 200.0, 10.0),
        (7, NVR2, "340201", 3, "ON", "alarm", "Door", "", NVR2, 117.0, 31.0),
    ]
    for n, dev, civil, tier, status, kind, name, addr, parent, lon, lat in specs:
        reg.upsert(make_channel(n, device_id=dev, civil_code=civil, tier=tier, status=status, kind=kind,
                                name=name, address=addr, parent_id=parent, longitude=lon, latitude=lat))

    def ids(result):
        total, page = result
        assert total == len(page)
        return [int(c.channel_id[-7:]) for c in page]

    assert ids(reg.query()) == [1, 3, 5, 7, 9]
    assert ids(reg.query(device_id=NVR)) == [3, 5, 9]
    assert ids(reg.query(device_id="nobody")) == []
    # Civil code is a prefix; an empty one falls back to the ID's centre code.
    assert ids(reg.query(civil_code="3402")) == [1, 3, 5, 7]
    assert ids(reg.query(civil_code="340201")) == [5, 7]
    assert ids(reg.query(civil_code="35")) == [9]
    assert ids(reg.query(civil_code="34020000")) == [1]
    assert ids(reg.query(tier=1)) == [5, 9]
    # State is the effective one: NVR2 is not known online.
    assert ids(reg.query(state="ON")) == [5, 9]
    assert ids(reg.query(state="OFF")) == [1, 7]
    assert ids(reg.query(state="VLOST")) == [3]
    assert ids(reg.query(kind="alarm")) == [7]
    # Text: case-insensitive, in the ID, name or address.
    assert ids(reg.query(text="GATE")) == [1, 3, 5]
    assert ids(reg.query(text="road")) == [5]
    assert ids(reg.query(text="1320000009")) == [9]
    # Parent: any element of a '/'-joined ParentID, whole elements only.
    assert ids(reg.query(parent_id=NVR)) == [3, 5]
    assert ids(reg.query(parent_id="34020000002160000002")) == [9]
    assert ids(reg.query(parent_id="3402000000216")) == []
    # Location: missing, zero or off the globe counts as missing.
    assert ids(reg.query(missing_location=True)) == [1, 3, 9]
    assert ids(reg.query(missing_location=False)) == [5, 7]
    # Filters combine.
    assert ids(reg.query(civil_code="3402", kind="channel", missing_location=False)) == [5]
    assert ids(reg.query(device_id=NVR, tier=1, text="yard")) == [9]

    # Paging keeps the total.
    assert reg.query(offset=1, limit=2)[0] == 5
    assert ids((2, reg.query(offset=1, limit=2)[1])) == [3, 5]
    total, page = reg.query(civil_code="3402", offset=3, limit=10)
    assert total == 4 and [c.channel_id for c in page] == [ch_id(7)]
    assert reg.query(offset=10) == (5, [])
    with pytest.raises(ValueError):
        reg.query(limit=-1)

    # The order stays right across adds and removes after a query.
    reg.remove(ch_id(3))
    reg.upsert(make_channel(2))
    reg.upsert(make_channel(42))
    assert ids(reg.query()) == [1, 2, 5, 7, 9, 42]
    reg.remove(ch_id(42))
    assert ids(reg.query()) == [1, 2, 5, 7, 9]


async def test_of_device_remove_and_moving_to_another_device(regs, clock):
    reg = regs.channels
    reg.set_device_online(NVR, True)
    for n in (3, 1, 2):
        reg.upsert(make_channel(n))
    reg.upsert(make_channel(4, device_id=NVR2))
    assert [c.channel_id for c in reg.of_device(NVR)] == [ch_id(1), ch_id(2), ch_id(3)]
    assert reg.of_device("nobody") == []

    # The channel now comes from NVR2's catalog (offline device): it moves, and goes OFF.
    moved, created = reg.upsert(make_channel(2, device_id=NVR2), at=T0 + 5)
    assert not created and moved.state == "OFF"
    assert [c.channel_id for c in reg.of_device(NVR)] == [ch_id(1), ch_id(3)]
    assert [c.channel_id for c in reg.of_device(NVR2)] == [ch_id(2), ch_id(4)]

    # Removing records an OFF "removed" event, also for a channel already OFF.
    assert reg.remove(ch_id(1), at=T0 + 6)
    assert not reg.remove(ch_id(1))
    assert reg.remove_device(NVR2, at=T0 + 7) == 2
    assert reg.remove_device(NVR2) == 0
    assert [c.channel_id for c in reg] == [ch_id(3)]
    assert reg.counts() == {"ON": 1, "OFF": 0, "VLOST": 0, "DEFECT": 0}
    removed = sorted((e for e in await reg.events() if e.reason == "removed"), key=lambda e: (e.at, e.channel_id))
    assert removed == [ChannelEvent(ch_id(1), "OFF", T0 + 6, "removed"),
                       ChannelEvent(ch_id(2), "OFF", T0 + 7, "removed"),
                       ChannelEvent(ch_id(4), "OFF", T0 + 7, "removed")]

    # The hot path refuses objects that are not the live ones.
    stale = make_channel(3)
    with pytest.raises(KeyError):
        reg.touch(stale)
    with pytest.raises(KeyError):
        reg.set_status(stale, "OFF", "notify")
    gone = reg.get(ch_id(3))
    reg.remove(ch_id(3))
    with pytest.raises(KeyError):
        reg.touch(gone)

    # Re-adding a removed channel starts it again.
    again, created = reg.upsert(make_channel(1), at=T0 + 8)
    assert created and again.state == "ON"


async def test_channels_events_and_state_survive_a_restart(db_path, clock):
    r = await open_channels(db_path, clock)
    reg = r.channels
    reg.set_device_online(NVR, True)
    full = make_channel(
        1, kind="channel", name="北门 Gate", manufacturer="Hikvision", model="DS-2CD", owner="Owner",
        civil_code="340201", block="B1", address="1 Road", parental=0, parent_id=f"{NVR}/34020000002160000001",
        business_group_id="34020000002150000001", safety_way=0, register_way=1, secrecy=0,
        ip_address="10.0.0.5", port=8000, status="VLOST", longitude=117.25, latitude=31.85, ptz_type=1,
        info={"PTZType": "1", "Resolution": "6/4"},
        raw={"DeviceID": ch_id(1), "Name": "北门 Gate", "StreamNum": "2", "Info": {"PTZType": "1"}},
        tier=1, tier_locked=True)
    reg.upsert(full, at=T0 - 1)
    reg.upsert(make_channel(2, status="ON"), at=T0)
    bare, _ = reg.upsert(make_channel(3, device_id=NVR2), at=T0)  # device unknown: OFF
    reg.upsert(make_channel(4), at=T0)
    reg.remove(ch_id(4), at=T0 + 1)
    clock.now += 3
    reg.set_status(reg.get(ch_id(2)), "DEFECT", "notify", at=T0 + 2)
    before = {c.channel_id: c.copy() for c in reg}
    await r.stop()

    r2 = await open_channels(db_path, FakeClock(T0 + 100))
    try:
        reg2 = r2.channels
        assert len(reg2) == 3 and reg2.get(ch_id(4)) is None
        for channel_id, old in before.items():
            new = reg2.get(channel_id)
            assert new == old and new is not old
        c1 = reg2.get(ch_id(1))
        assert c1.raw == {"DeviceID": ch_id(1), "Name": "北门 Gate", "StreamNum": "2", "Info": {"PTZType": "1"}}
        assert c1.safety_way == 0 and reg2.get(ch_id(2)).safety_way is None and bare.longitude is None
        assert c1.tier_locked is True and c1.state == "VLOST"
        assert reg2.counts() == {"ON": 0, "OFF": 1, "VLOST": 1, "DEFECT": 1}
        assert [c.channel_id for c in reg2.of_device(NVR)] == [ch_id(1), ch_id(2)]

        events = await reg2.events()
        assert [(e.channel_id[-1], e.state, e.at, e.reason) for e in events] == [
            ("1", "VLOST", T0 - 1, "catalog"), ("2", "ON", T0, "catalog"), ("3", "OFF", T0, "catalog"),
            ("4", "ON", T0, "catalog"), ("4", "OFF", T0 + 1, "removed"), ("2", "DEFECT", T0 + 2, "notify")]
        assert await reg2.events(channel_id=ch_id(2)) == [events[1], events[5]]
        assert await reg2.events(since=T0, until=T0 + 2) == events[1:5]
        assert await reg2.events(limit=2, newest_first=True) == [events[5], events[4]]

        # NVR's channels were stored not-OFF, so it counts as online until told otherwise:
        # a status change now is not mistaken for the device going away.
        assert reg2.set_status(reg2.get(ch_id(2)), "ON", "notify")
        assert reg2.get(ch_id(2)).state == "ON"
        assert reg2.set_device_online(NVR, False) == 2
    finally:
        await r2.stop()


async def test_device_status_events_newest_first(regs, clock):
    devices = regs.devices
    d = devices.add(Device(device_id=NVR, kind="nvr"))
    for i in range(5):
        devices.set_online(d, i % 2 == 0, f"r{i}", at=T0 + i)
    latest = await devices.status_events(device_id=NVR, limit=2, newest_first=True)
    assert latest == [StatusEvent(NVR, True, T0 + 4, "r4"), StatusEvent(NVR, False, T0 + 3, "r3")]
    assert [e.reason for e in await devices.status_events(limit=2)] == ["r0", "r1"]
    events = await regs.store.status_events(newest_first=True, since=T0 + 1, until=T0 + 3)
    assert [e.reason for e in events] == ["r2", "r1"]


# Schema 1 exactly as the first release wrote it (copied from such a file, not
# from _MIGRATIONS, so that an edit there cannot make this test agree with itself).
V1_SCHEMA = """
CREATE TABLE schema_version (version INTEGER NOT NULL);
CREATE TABLE devices (
    device_id         TEXT    NOT NULL PRIMARY KEY,
    kind              TEXT    NOT NULL DEFAULT '',
    name              TEXT    NOT NULL DEFAULT '',
    manufacturer      TEXT    NOT NULL DEFAULT '',
    model             TEXT    NOT NULL DEFAULT '',
    firmware          TEXT    NOT NULL DEFAULT '',
    transport         TEXT    NOT NULL DEFAULT 'udp',
    host              TEXT    NOT NULL DEFAULT '',
    port              INTEGER NOT NULL DEFAULT 0,
    contact           TEXT    NOT NULL DEFAULT '',
    expires           INTEGER NOT NULL DEFAULT 0,
    registered_at     REAL    NOT NULL DEFAULT 0,
    expires_at        REAL    NOT NULL DEFAULT 0,
    last_seen         REAL    NOT NULL DEFAULT 0,
    keepalive_at      REAL    NOT NULL DEFAULT 0,
    online            INTEGER NOT NULL DEFAULT 0,
    status_changed_at REAL    NOT NULL DEFAULT 0,
    password          TEXT,
    created_at        REAL    NOT NULL DEFAULT 0,
    updated_at        REAL    NOT NULL DEFAULT 0,
    extra             TEXT    NOT NULL DEFAULT '{}'
) WITHOUT ROWID;
CREATE TABLE status_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id TEXT    NOT NULL,
    online    INTEGER NOT NULL,
    at        REAL    NOT NULL,
    reason    TEXT    NOT NULL DEFAULT ''
);
CREATE INDEX status_events_device_at ON status_events (device_id, at);
CREATE INDEX status_events_at ON status_events (at);
INSERT INTO schema_version (version) VALUES (1);
INSERT INTO devices (device_id, kind, name, online, status_changed_at, password, created_at, updated_at, extra)
    VALUES ('34020000001180000001', 'nvr', 'NVR', 1, 1700000000.5, 'pw', 1699999999.0, 1700000000.5, '{"channels":4}');
INSERT INTO status_events (device_id, online, at, reason) VALUES ('34020000001180000001', 1, 1700000000.5, 'register');
"""


async def test_a_schema_1_database_migrates_to_the_latest_and_keeps_its_devices(db_path, clock):
    assert SCHEMA_VERSION >= 2
    db_path.parent.mkdir(parents=True)
    con = sqlite3.connect(db_path)
    con.executescript(V1_SCHEMA)
    con.execute("PRAGMA journal_mode = WAL")
    con.close()

    r = await open_channels(db_path, clock)
    try:
        d = r.devices.get(NVR)
        assert d.online and d.password == "pw" and d.extra == {"channels": 4} and d.status_changed_at == 1700000000.5
        assert await r.devices.status_events() == [StatusEvent(NVR, True, 1700000000.5, "register")]
        assert len(r.channels) == 0
        r.channels.set_device_online(NVR, d.online)
        r.channels.upsert(make_channel(1, raw={"a": "b"}))
    finally:
        await r.stop()

    con = sqlite3.connect(db_path)
    try:
        assert con.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
        indexes = {row[1] for row in con.execute("PRAGMA index_list(channel_events)")}
        assert {"channel_events_channel_at", "channel_events_at"} <= indexes
        assert con.execute("SELECT channel_id, state, raw FROM channels").fetchall() == [(ch_id(1), "ON", '{"a":"b"}')]
        assert con.execute("SELECT channel_id, state, reason FROM channel_events").fetchall() == [
            (ch_id(1), "ON", "catalog")]
    finally:
        con.close()

    # And it opens again at the latest version without migrating twice.
    r = await open_channels(db_path, clock)
    try:
        assert [c.channel_id for c in r.channels] == [ch_id(1)] and len(r.devices) == 1
    finally:
        await r.stop()


class FlakyStore(SqliteStore):
    """Fails the next `fail` channel batch writes, like a full disk or a dropped connection."""

    def __init__(self, path, fail: int = 1) -> None:
        super().__init__(path)
        self.fail = fail
        self.batches: list[tuple[int, int, int]] = []

    async def write_all(self, batches: Sequence[StoreBatch]) -> None:
        self.batches += [(len(b.records), len(b.deleted_ids), len(b.events))
                         for b in batches if b.kind == "channels"]
        if self.fail:
            self.fail -= 1
            raise StoreError("disk full")
        await super().write_all(batches)


async def test_pending_channels_and_events_survive_a_failing_store(db_path, clock, caplog):
    seed = await open_channels(db_path, clock)
    seed.channels.upsert(make_channel(90))
    await seed.stop()

    r = await Registries(FlakyStore(db_path, fail=2), clock).start()
    store, reg = r.store, r.channels
    try:
        reg.set_device_online(NVR, True, at=T0 + 1)  # channel 90 goes ON
        a, _ = reg.upsert(make_channel(1, name="A"), at=T0 + 1)
        reg.remove(ch_id(90), at=T0 + 2)

        await reg.flush()  # fails
        assert "registry flush" in caplog.text and "disk full" in caplog.text
        assert "2 channel changes and 3 channel events" in caplog.text
        assert reg.pending() == (2, 3)
        assert [c.channel_id for c in await store.load_channels()] == [ch_id(90)]

        # Changes made after the failed flush are merged, not lost or reordered.
        clock.now += 5
        b, _ = reg.upsert(make_channel(2), at=T0 + 3)
        reg.set_status(a, "VLOST", "notify", at=T0 + 4)
        a.name = "A2"
        reg.touch(a)
        assert reg.pending() == (3, 5)

        await reg.flush()  # fails again, same merge
        await reg.flush()
        assert reg.pending() == (0, 0)
        assert store.batches == [(1, 1, 3), (2, 1, 5), (2, 1, 5)]
    finally:
        await r.stop()

    r2 = await open_channels(db_path)
    try:
        assert {c.channel_id for c in r2.channels} == {ch_id(1), ch_id(2)}
        assert r2.channels.get(ch_id(1)) == a and r2.channels.get(ch_id(1)).name == "A2"
        assert [(e.channel_id[-2:], e.state, e.reason) for e in await r2.channels.events()] == [
            ("90", "OFF", "catalog"), ("90", "ON", "device-online"), ("01", "ON", "catalog"),
            ("90", "OFF", "removed"), ("02", "ON", "catalog"), ("01", "VLOST", "notify")]
    finally:
        await r2.stop()


async def test_stop_logs_unwritten_changes_and_lets_the_device_registry_close(db_path, clock, caplog):
    r = await Registries(FlakyStore(db_path, fail=1), clock).start()
    r.channels.upsert(make_channel(1))
    await r.channels.stop()  # does not raise ...
    assert "1 channel changes and 1 channel events not written" in caplog.text
    await r.devices.stop()  # ... so this still runs and closes the store
    assert r.store._db is None


class GatedStore(SqliteStore):
    """Holds each channel batch until released, to change channels mid-flush."""

    def __init__(self, path) -> None:
        super().__init__(path)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    def snapshots_needed(self, records: int) -> bool:
        return True  # it reads the records after an await: they must be copies

    async def write_all(self, batches) -> None:
        if any(b.kind == "channels" for b in batches):
            self.entered.set()
            await self.release.wait()
        await super().write_all(batches)


async def test_a_flush_writes_a_snapshot_while_the_hot_path_continues(db_path, clock):
    r = await Registries(GatedStore(db_path), clock).start()
    store, reg = r.store, r.channels
    try:
        reg.set_device_online(NVR, True)
        c, _ = reg.upsert(make_channel(1, raw={"v": "1"}))
        flush = asyncio.create_task(reg.flush())
        await store.entered.wait()
        reg.upsert(make_channel(1, name="renamed", raw={"v": "2"}))
        reg.set_status(c, "DEFECT", "notify")
        store.release.set()
        await flush
        (on_disk,) = await store.load_channels()
        assert on_disk.name == "Camera 1" and on_disk.raw == {"v": "1"} and on_disk.state == "ON"
        await reg.flush()
        (on_disk,) = await store.load_channels()
        assert on_disk == c and on_disk.raw == {"v": "2"} and on_disk.state == "DEFECT"
    finally:
        store.release.set()
        await r.stop()


async def test_the_flush_loop_writes_in_the_background(db_path):
    store = SqliteStore(db_path)
    devices = DeviceRegistry(store, flush_interval=3600)
    reg = ChannelRegistry(store, flush_interval=0.01)
    await devices.start()
    await reg.start()
    try:
        with pytest.raises(RuntimeError):
            await reg.start()
        reg.upsert(make_channel(1))
        for _ in range(200):
            if reg.pending() == (0, 0):
                break
            await asyncio.sleep(0.01)
        assert reg.pending() == (0, 0)
        assert [c.channel_id for c in await store.load_channels()] == [ch_id(1)]
    finally:
        await reg.stop()
        await devices.stop()


async def test_live_ratios_and_archive_report(regs):
    reg = regs.channels
    reg.set_device_online(NVR, True)
    complete = dict(manufacturer="Hik", model="M", owner="O", address="A")
    reg.upsert(make_channel(1, tier=1, civil_code="340201", longitude=117.1, latitude=31.1, **complete))
    reg.upsert(make_channel(2, tier=1, civil_code="340202", status="VLOST", **complete))
    reg.upsert(make_channel(3, tier=1, civil_code="340201", status="OFF", name=" ", **complete))
    reg.upsert(make_channel(4, tier=2, device_id=NVR2, civil_code="", longitude=117.0, latitude=0.0))
    reg.upsert(make_channel(5, tier=2, kind="civil-code", channel_id="340201"))

    assert reg.live_ratios() == {(1, ""): (2, 3), (2, ""): (0, 1)}
    assert reg.live_ratios(group_by="civil_code") == {
        (1, "340201"): (1, 2), (1, "340202"): (1, 1), (2, "340200"): (0, 1)}
    assert reg.live_ratios(group_by="civil_code", civil_code_digits=4) == {(1, "3402"): (2, 3), (2, "3402"): (0, 1)}
    assert reg.live_ratios(kinds=("channel", "civil-code")) == {(1, ""): (2, 3), (2, ""): (1, 2)}
    with pytest.raises(ValueError):
        reg.live_ratios(group_by="all")

    report = reg.archive_report()
    assert report == {
        "channels": 4, "complete": 1, "complete_ratio": 0.25, "missing_location": 3,
        "incomplete": [
            {"channel_id": ch_id(2), "device_id": NVR, "name": "Camera 2", "missing": ["location"]},
            {"channel_id": ch_id(3), "device_id": NVR, "name": " ", "missing": ["name", "location"]},
            {"channel_id": ch_id(4), "device_id": NVR2, "name": "Camera 4",
             "missing": ["manufacturer", "model", "owner", "civil_code", "address", "location"]},
        ],
    }
    # Location left out of completeness: still counted apart.
    report = reg.archive_report(require_location=False)
    assert (report["complete"], report["missing_location"]) == (2, 3)
    assert [(x["channel_id"], x["missing"]) for x in report["incomplete"]] == [
        (ch_id(3), ["name"]), (ch_id(4), ["manufacturer", "model", "owner", "civil_code", "address"])]
    capped = reg.archive_report(limit=1, mandatory=("name", "owner"), require_location=False)
    assert capped["complete"] == 2 and [x["channel_id"] for x in capped["incomplete"]] == [ch_id(3)]
    assert reg.archive_report(kinds=("civil-code",), mandatory=("name",))["missing_location"] == 1
    report = reg.archive_report(kinds=("civil-code",), mandatory=("name",), require_location=False)
    assert report["complete_ratio"] == 1.0
    assert reg.archive_report(kinds=("nothing",))["complete_ratio"] == 1.0
    with pytest.raises(ValueError):
        reg.archive_report(mandatory=("colour",))


class DeviceOnlyStore(Store):
    """A store from before channels: the device half of the interface only."""

    async def open(self): pass
    async def close(self): pass
    async def load_devices(self): return []
    async def save_devices(self, devices): pass
    async def delete_devices(self, ids): pass
    async def add_status_events(self, events): pass
    async def status_events(self, device_id=None, since=None, until=None, limit=1000): return []


async def test_a_store_without_channels_still_serves_devices_and_says_what_is_missing():
    store = DeviceOnlyStore()
    devices = DeviceRegistry(store, flush_interval=3600)
    await devices.start()
    assert await devices.status_events() == []
    with pytest.raises(NotImplementedError, match="DeviceOnlyStore does not store channels"):
        await ChannelRegistry(store).start()
    await devices.stop()


async def test_flush_and_reload_100k_channels(db_path, clock):
    n = 100_000
    devices = [f"340200000011800{i:05d}" for i in range(n // 64 + 1)]
    r = await open_channels(db_path, clock)
    reg = r.channels
    for d in devices[::2]:
        reg.set_device_online(d, True)
    for i in range(n):
        reg.upsert(make_channel(i, device_id=devices[i // 64], civil_code=f"3402{i % 10:02d}", tier=i % 3 + 1,
                                status="VLOST" if i % 7 == 0 else "ON", longitude=117.0 + i / n,
                                latitude=31.0, raw={"DeviceID": ch_id(i), "Name": f"Camera {i}"}), at=T0)
    counts = reg.counts()
    await r.stop()

    r2 = await open_channels(db_path)
    try:
        reg2 = r2.channels
        assert len(reg2) == n and reg2.counts() == counts
        for i in (0, 1, 7, 4_242, n - 1):
            c = reg2.get(ch_id(i))
            online = (i // 64) % 2 == 0
            assert c.state == (("VLOST" if i % 7 == 0 else "ON") if online else "OFF")
            assert c.raw == {"DeviceID": ch_id(i), "Name": f"Camera {i}"} and c.longitude == 117.0 + i / n
            assert c.tier == i % 3 + 1 and c.device_id == devices[i // 64]
        assert len(reg2.of_device(devices[3])) == 64
        total, page = reg2.query(civil_code="340203", tier=1, offset=2, limit=2)
        assert total == len([i for i in range(n) if i % 10 == 3 and i % 3 == 0])
        assert [c.channel_id for c in page] == [ch_id(63), ch_id(93)]
        assert len(await reg2.events(limit=2 * n)) == n
    finally:
        await r2.stop()


def test_channel_copy_is_detached():
    c = make_channel(1, info={"a": "1"}, raw={"b": "2"})
    snap = c.copy()
    assert snap == c and snap is not c
    c.info["a"] = "x"
    c.raw["b"] = "y"
    c.name = "other"
    assert snap.info == {"a": "1"} and snap.raw == {"b": "2"} and snap.name == "Camera 1"


def test_location_and_area_code_rules():
    assert make_channel(1, longitude=117.0, latitude=31.0).has_location
    for lon, lat in ((None, 31.0), (117.0, None), (0.0, 31.0), (117.0, 0.0), (181.0, 31.0), (117.0, -91.0),
                     (float("nan"), 31.0)):
        assert not make_channel(1, longitude=lon, latitude=lat).has_location, (lon, lat)
    assert make_channel(1, civil_code="350100").area_code == "350100"
    assert make_channel(1).area_code == "34020000"
    assert Channel(channel_id="3402", device_id=NVR).area_code == "3402"


async def test_logging_is_quiet_on_the_happy_path(regs, caplog):
    caplog.set_level(logging.WARNING)
    regs.channels.upsert(make_channel(1))
    await regs.channels.flush()
    assert caplog.records == []
