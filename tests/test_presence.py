"""Online tracking (§9.1.1, §9.6.1) with a real DeviceRegistry over SQLite and an injected clock:
keepalive timeouts, registration expiry, history stamped at the deadline, settling after a
restart, and a fleet of 10k devices."""

from __future__ import annotations

import pytest
import pytest_asyncio

from gb28181.ids import parse_id
from gb28181.presence import Presence
from registry.devices import DeviceRegistry
from registry.models import Device
from registry.sqlite import SqliteStore

T0 = 1_700_000_000.0     # exact in binary floating point, as are T0 + whole seconds
INTERVAL = 10.0
COUNT = 3
TIMEOUT = INTERVAL * COUNT


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def dev_id(n: int) -> str:
    return f"3402000000132{n:07d}"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "data" / "gb28181.db"


async def open_registry(path, clock) -> DeviceRegistry:
    # A long flush interval: flushes happen when the test asks (status_events, stop).
    registry = DeviceRegistry(SqliteStore(path), flush_interval=3600, clock=clock)
    await registry.start()
    return registry


@pytest_asyncio.fixture
async def registry(db_path, clock):
    registry = await open_registry(db_path, clock)
    yield registry
    await registry.stop()


def make_presence(registry, clock) -> Presence:
    return Presence(registry, interval=INTERVAL, count=COUNT, clock=clock)


def register(registry: DeviceRegistry, presence: Presence, n: int, at: float,
             expires: float = 3600.0) -> Device:
    """What the registrar does on a 200 to REGISTER."""
    device = registry.get(dev_id(n))
    if device is None:
        device = registry.add(Device(device_id=dev_id(n), kind=parse_id(dev_id(n)).kind))
    device.registered_at = at
    device.expires = int(expires)
    device.expires_at = at + expires
    device.last_seen = at
    registry.set_online(device, True, "register", at=at)
    registry.touch(device)
    presence.seen(device)
    return device


def keepalive(registry: DeviceRegistry, presence: Presence, device: Device, at: float) -> None:
    """What the MESSAGE handler does on a Keepalive."""
    device.keepalive_at = at
    device.last_seen = at
    if not device.online:
        registry.set_online(device, True, "keepalive", at=at)
    registry.touch(device)
    presence.seen(device)


async def history(registry: DeviceRegistry, n: int) -> list[tuple[bool, float, str]]:
    events = await registry.status_events(device_id=dev_id(n), limit=100)
    return [(e.online, e.at, e.reason) for e in events]


async def test_silent_device_goes_offline_at_interval_times_count(registry, clock):
    presence = make_presence(registry, clock)
    device = register(registry, presence, 1, T0)
    assert presence.deadline(device) == T0 + TIMEOUT

    assert presence.check(T0 + TIMEOUT - 0.001) == 0
    assert device.online
    assert presence.check(T0 + TIMEOUT) == 1
    assert not device.online
    assert device.status_changed_at == T0 + TIMEOUT
    assert registry.counts() == (1, 0)
    assert await history(registry, 1) == [(True, T0, "register"),
                                          (False, T0 + TIMEOUT, "keepalive-timeout")]
    # Nothing more happens to an offline device.
    assert presence.check(T0 + 10 * TIMEOUT) == 0


async def test_check_uses_the_injected_clock(registry, clock):
    presence = make_presence(registry, clock)
    device = register(registry, presence, 1, T0)
    clock.now = T0 + TIMEOUT - 1
    assert presence.check() == 0 and device.online
    clock.now = T0 + TIMEOUT
    assert presence.check() == 1 and not device.online


async def test_keepalives_postpone_the_deadline(registry, clock):
    presence = make_presence(registry, clock)
    device = register(registry, presence, 1, T0)
    for k in range(1, 6):                     # a keepalive every interval for 50 s
        at = T0 + k * INTERVAL
        assert presence.check(at) == 0
        keepalive(registry, presence, device, at)
        assert presence.deadline(device) == at + TIMEOUT
    last = T0 + 5 * INTERVAL
    for now in (T0 + TIMEOUT, last + TIMEOUT - 0.5):
        assert presence.check(now) == 0
        assert device.online
    assert presence.check(last + TIMEOUT) == 1
    assert await history(registry, 1) == [(True, T0, "register"),
                                          (False, last + TIMEOUT, "keepalive-timeout")]


async def test_re_register_also_postpones(registry, clock):
    presence = make_presence(registry, clock)
    device = register(registry, presence, 1, T0)
    register(registry, presence, 1, T0 + 20)
    assert presence.check(T0 + TIMEOUT) == 0
    assert presence.check(T0 + 20 + TIMEOUT) == 1
    assert device.status_changed_at == T0 + 20 + TIMEOUT


async def test_registration_expiry_before_keepalive_deadline_wins(registry, clock):
    presence = make_presence(registry, clock)
    device = register(registry, presence, 1, T0, expires=25)
    keepalive(registry, presence, device, T0 + 10)       # keepalive deadline T0 + 40
    assert presence.deadline(device) == T0 + 25
    assert presence.check(T0 + 24.999) == 0
    assert presence.check(T0 + 100) == 1
    assert device.status_changed_at == T0 + 25
    assert await history(registry, 1) == [(True, T0, "register"), (False, T0 + 25, "expired")]


async def test_keepalive_deadline_before_expiry_is_a_timeout(registry, clock):
    presence = make_presence(registry, clock)
    register(registry, presence, 1, T0, expires=60)
    assert presence.check(T0 + 100) == 1
    assert (await history(registry, 1))[-1] == (False, T0 + TIMEOUT, "keepalive-timeout")


async def test_event_is_stamped_at_the_deadline_not_the_check(registry, clock, db_path):
    presence = make_presence(registry, clock)
    a = register(registry, presence, 1, T0)
    b = register(registry, presence, 2, T0 + 7)
    clock.now = T0 + 1000                     # the check runs very late
    assert presence.check() == 2
    assert a.status_changed_at == T0 + TIMEOUT
    assert b.status_changed_at == T0 + 7 + TIMEOUT
    # ... and that is what lands in the database.
    await registry.flush()
    events = await registry.store.status_events(None, None, None, 100)
    offline = {(e.device_id, e.at, e.reason) for e in events if not e.online}
    assert offline == {(dev_id(1), T0 + TIMEOUT, "keepalive-timeout"),
                       (dev_id(2), T0 + 7 + TIMEOUT, "keepalive-timeout")}


async def test_unregistered_device_is_not_turned_offline_twice(registry, clock):
    presence = make_presence(registry, clock)
    device = register(registry, presence, 1, T0)
    # What the registrar does on Expires: 0.
    device.expires_at = 0.0
    registry.set_online(device, False, "unregister", at=T0 + 5)
    presence.forget(device.device_id)
    assert presence.check(T0 + 100) == 0
    # Registering again gets a fresh deadline.
    register(registry, presence, 1, T0 + 200)
    assert presence.check(T0 + 200 + TIMEOUT - 1) == 0
    assert presence.check(T0 + 200 + TIMEOUT) == 1
    assert [e[2] for e in await history(registry, 1)] == [
        "register", "unregister", "register", "keepalive-timeout"]


async def test_removed_device_is_skipped(registry, clock):
    presence = make_presence(registry, clock)
    register(registry, presence, 1, T0)
    register(registry, presence, 2, T0)
    presence.forget(dev_id(1))
    registry.remove(dev_id(1))
    assert presence.check(T0 + TIMEOUT) == 1
    assert registry.counts() == (1, 0)


async def test_device_back_online_by_keepalive_is_tracked_again(registry, clock):
    presence = make_presence(registry, clock)
    device = register(registry, presence, 1, T0)
    assert presence.check(T0 + TIMEOUT) == 1
    keepalive(registry, presence, device, T0 + 40)        # registration still valid
    assert device.online
    assert presence.check(T0 + 40 + TIMEOUT - 1) == 0
    assert presence.check(T0 + 40 + TIMEOUT) == 1
    assert await history(registry, 1) == [
        (True, T0, "register"), (False, T0 + TIMEOUT, "keepalive-timeout"),
        (True, T0 + 40, "keepalive"), (False, T0 + 40 + TIMEOUT, "keepalive-timeout")]


async def test_resume_after_restart(db_path, clock):
    registry = await open_registry(db_path, clock)
    presence = make_presence(registry, clock)
    stale = register(registry, presence, 1, T0)                     # deadline T0 + 30
    fresh = register(registry, presence, 2, T0)
    keepalive(registry, presence, fresh, T0 + 90)                   # deadline T0 + 120
    expiring = register(registry, presence, 3, T0, expires=50)      # deadline T0 + 50
    keepalive(registry, presence, expiring, T0 + 45)
    register(registry, presence, 4, T0)
    registry.set_online(registry.get(dev_id(4)), False, "admin", at=T0 + 1)
    presence.forget(dev_id(4))
    assert (stale.online, fresh.online, expiring.online) == (True, True, True)
    # The server goes down without a check ever running, and comes back at T0 + 100.
    await registry.stop()

    clock.now = T0 + 100
    registry = await open_registry(db_path, clock)
    try:
        assert registry.counts() == (4, 3)
        presence = make_presence(registry, clock)
        assert presence.resume(T0 + 100) == 2
        assert registry.counts() == (4, 1)
        assert not registry.get(dev_id(1)).online
        assert registry.get(dev_id(1)).status_changed_at == T0 + TIMEOUT
        assert not registry.get(dev_id(3)).online
        assert registry.get(dev_id(3)).status_changed_at == T0 + 50
        assert registry.get(dev_id(2)).online
        assert (await history(registry, 1))[-1] == (False, T0 + TIMEOUT, "keepalive-timeout")
        assert (await history(registry, 3))[-1] == (False, T0 + 50, "expired")
        assert (await history(registry, 4))[-1] == (False, T0 + 1, "admin")
        # The fresh one is still scheduled: it goes offline at its own deadline.
        assert presence.check(T0 + 119.5) == 0
        assert presence.check(T0 + 120) == 1
        assert (await history(registry, 2))[-1] == (False, T0 + 120, "keepalive-timeout")
        assert registry.counts() == (4, 0)
    finally:
        await registry.stop()


async def test_resume_uses_the_clock_by_default(db_path, clock):
    registry = await open_registry(db_path, clock)
    presence = make_presence(registry, clock)
    register(registry, presence, 1, T0)
    register(registry, presence, 2, T0 + 20)
    await registry.stop()
    clock.now = T0 + 40
    registry = await open_registry(db_path, clock)
    try:
        presence = make_presence(registry, clock)
        assert presence.resume() == 1
        assert not registry.get(dev_id(1)).online and registry.get(dev_id(2)).online
    finally:
        await registry.stop()


async def test_ten_thousand_devices(registry, clock):
    n_devices = 10_000
    presence = make_presence(registry, clock)
    devices = []
    for i in range(n_devices):
        expires = 3600.0 if i % 7 else float(i % 100 + 15)   # every 7th: a short registration
        devices.append(register(registry, presence, i, T0 + i % 100, expires=expires))
    # Every 3rd device keeps sending keepalives until T0 + 60.
    kept = [d for i, d in enumerate(devices) if i % 3 == 0]

    def expected(i: int) -> tuple[float, str]:
        heard = T0 + i % 100
        if i % 3 == 0:
            heard = max(heard, T0 + 60)
        expires_at = T0 + i % 100 + (3600.0 if i % 7 else float(i % 100 + 15))
        due = min(expires_at, heard + TIMEOUT)
        return due, "expired" if expires_at <= due else "keepalive-timeout"

    ka_times = [T0 + 20, T0 + 40, T0 + 60]
    went = 0
    for now in [T0 + s for s in range(0, 240, 5)]:
        while ka_times and ka_times[0] <= now:
            at = ka_times.pop(0)
            for d in kept:
                if d.online:
                    keepalive(registry, presence, d, at)
        went += presence.check(now)
        online = {d.device_id for d in devices if d.online}
        # Devices brought back online by a keepalive after a timeout are not in this model;
        # the schedule above keeps every kept device heard from before its deadline.
        want = {dev_id(i) for i in range(n_devices) if expected(i)[0] > now}
        assert online == want, f"at T0+{now - T0:g}: {len(online ^ want)} devices wrong"
        assert registry.counts() == (n_devices, len(want))
    assert went == n_devices
    for i in (0, 1, 2, 3, 6, 7, 14, 21, 99, 100, 4242, 9999):
        due, reason = expected(i)
        assert devices[i].status_changed_at == due, i
        assert (await history(registry, i))[-1] == (False, due, reason), i
    events = await registry.store.status_events(None, None, None, 100_000)
    offline = [e for e in events if not e.online]
    assert len(offline) == n_devices
    assert all(e.at == expected(int(e.device_id[13:]))[0] for e in offline)
    assert sum(e.reason == "expired" for e in offline) == sum(
        expected(i)[1] == "expired" for i in range(n_devices))


async def test_refresh_with_a_shorter_registration_moves_the_deadline_earlier(registry, clock):
    presence = make_presence(registry, clock)
    device = register(registry, presence, 1, T0)                  # deadline T0 + 30
    register(registry, presence, 1, T0 + 5, expires=10)           # now it runs out at T0 + 15
    assert presence.deadline(device) == T0 + 15
    assert presence.check(T0 + 14.5) == 0
    assert presence.check(T0 + 15) == 1
    assert (await history(registry, 1))[-1] == (False, T0 + 15, "expired")
    assert presence.check(T0 + 100) == 0


async def test_register_unregister_cycles_leave_one_heap_entry(registry, clock):
    presence = make_presence(registry, clock)
    for k in range(50):
        at = T0 + k
        device = register(registry, presence, 1, at)
        device.expires_at = 0.0
        registry.set_online(device, False, "unregister", at=at + 0.5)
        presence.forget(device.device_id)
    register(registry, presence, 1, T0 + 50)
    # Let every stale entry come due while the device stays online through keepalives.
    for at in range(60, 400, 10):
        presence.check(T0 + at)
        keepalive(registry, presence, registry.get(dev_id(1)), T0 + at)
    assert registry.get(dev_id(1)).online
    assert len(presence._heap) == 1     # white-box: no copies cycling for the flapping device
    assert presence.check(T0 + 390 + TIMEOUT) == 1
