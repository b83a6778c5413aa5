"""Availability (time-weighted online and working shares) from the channel history in
SQLite: the field's canonical 99 % case, VLOST, channels added or removed mid-window,
grouping, and a property test against a brute-force per-second simulation."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registry import CHANNEL_STATES, SqliteStore

from .test_channels import NVR, NVR2, T0, FakeClock, Registries, ch_id, make_channel, open_channels

W = T0 + 1_000.0        # window start
WINDOW = 300.0
UNTIL = W + WINDOW


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
async def regs(tmp_path, clock):
    r = await open_channels(tmp_path / "registry.db", clock)
    yield r
    await r.stop()


def by_group(rows: list[dict]) -> dict:
    return {row["group"]: row for row in rows}


async def test_canonical_99_percent(regs, clock):
    """100 tier-1 channels online for the whole 300 s window, 10 of them OFF for 30 s in the middle."""
    reg = regs.channels
    reg.set_device_online(NVR, True, at=T0)
    chans = [reg.upsert(make_channel(i, tier=1), at=T0)[0] for i in range(100)]
    for c in chans[:10]:
        assert reg.set_status(c, "OFF", "notify", at=W + 135)
    for c in chans[:10]:
        assert reg.set_status(c, "ON", "notify", at=W + 165)
    clock.now = UNTIL + 50

    (row,) = await reg.availability(W, UNTIL)
    assert row == {
        "group": 1, "channels": 100, "online_ratio": 0.99, "working_ratio": 0.99,
        "online_seconds": 29_700.0, "working_seconds": 29_700.0, "total_seconds": 30_000.0,
        "currently_online": 100,
    }
    assert row["online_ratio"] == 0.99  # exactly, not approximately


async def test_vlost_lowers_working_but_not_online(regs, clock):
    reg = regs.channels
    reg.set_device_online(NVR, True, at=T0)
    chans = [reg.upsert(make_channel(i, tier=1), at=T0)[0] for i in range(100)]
    for c in chans[:10]:
        reg.set_status(c, "VLOST", "notify", at=W + 135)
        reg.set_status(c, "ON", "notify", at=W + 165)
    # DEFECT counts the same way: online, not working.
    reg.set_status(chans[50], "DEFECT", "notify", at=W + 270)
    (row,) = await reg.availability(W, UNTIL)
    assert row["online_ratio"] == 1.0
    assert row["working_seconds"] == 30_000 - 300 - 30
    assert row["working_ratio"] == (30_000 - 330) / 30_000
    assert row["currently_online"] == 100


async def test_device_offline_takes_its_channels_down(regs):
    reg = regs.channels
    reg.set_device_online(NVR, True, at=T0)
    reg.set_device_online(NVR2, True, at=T0)
    for i in range(4):
        reg.upsert(make_channel(i, device_id=NVR if i < 2 else NVR2, tier=2), at=T0)
    reg.set_device_online(NVR, False, at=W + 60)     # 2 channels down for 240 s
    (row,) = await reg.availability(W, UNTIL)
    assert row["total_seconds"] == 1200 and row["online_seconds"] == 1200 - 480
    assert row["online_ratio"] == 0.6 and row["currently_online"] == 2


async def test_channels_added_mid_window_count_from_their_first_event(regs):
    reg = regs.channels
    reg.set_device_online(NVR, True, at=T0)
    reg.upsert(make_channel(1), at=T0)
    reg.upsert(make_channel(2), at=W + 150)            # 150 s, all online
    reg.set_device_online(NVR2, False, at=T0)
    reg.upsert(make_channel(3, device_id=NVR2), at=W + 200)  # 100 s, offline
    reg.upsert(make_channel(4), at=UNTIL + 10)         # after the window: not in it
    (row,) = await reg.availability(W, UNTIL)
    assert row["channels"] == 3
    assert row["total_seconds"] == 300 + 150 + 100
    assert row["online_seconds"] == 300 + 150
    assert row["currently_online"] == 3  # channel 4 is online now, and tier 3 like the rest


async def test_events_before_the_window_carry_their_state_in(regs):
    reg = regs.channels
    reg.set_device_online(NVR, True, at=T0)
    c, _ = reg.upsert(make_channel(1), at=T0)
    reg.set_status(c, "VLOST", "notify", at=W - 100)
    reg.set_status(c, "OFF", "notify", at=W)           # exactly at since
    reg.set_status(c, "ON", "notify", at=W + 100)
    reg.set_status(c, "DEFECT", "notify", at=UNTIL)    # exactly at until: no time inside
    (row,) = await reg.availability(W, UNTIL)
    assert (row["online_seconds"], row["working_seconds"], row["total_seconds"]) == (200, 200, 300)
    (row,) = await reg.availability(W - 200, W)
    assert (row["online_seconds"], row["working_seconds"], row["total_seconds"]) == (200, 100, 200)


async def test_removed_channels_stop_counting_at_removal(tmp_path, clock):
    path = tmp_path / "registry.db"
    r = await open_channels(path, clock)
    reg = r.channels
    reg.set_device_online(NVR, True, at=T0)
    reg.set_device_online(NVR2, False, at=T0)
    reg.upsert(make_channel(1, tier=1), at=T0)
    reg.upsert(make_channel(2, tier=1), at=T0)                  # ON, removed at W+100
    reg.upsert(make_channel(3, tier=2, device_id=NVR2), at=T0)  # OFF, removed at W+100
    reg.upsert(make_channel(4, tier=1), at=T0)                  # removed before the window
    reg.remove(ch_id(4), at=W - 10)
    clock.now = W + 100
    assert reg.remove(ch_id(2)) and reg.remove(ch_id(3))
    # Re-added later: its gap does not count either.
    reg.upsert(make_channel(4, tier=1), at=W + 250)
    clock.now = UNTIL

    rows = by_group(await reg.availability(W, UNTIL))
    assert rows[1]["channels"] == 3
    assert rows[1]["total_seconds"] == 300 + 100 + 50
    assert rows[1]["online_ratio"] == 1.0 and rows[1]["currently_online"] == 2
    # The removed OFF channel still counts, as it was grouped when removed, until removal.
    assert rows[2] == {"group": 2, "channels": 1, "online_ratio": 0.0, "working_ratio": 0.0,
                       "online_seconds": 0.0, "working_seconds": 0.0, "total_seconds": 100.0,
                       "currently_online": 0}
    await r.stop()

    # After a restart the removed channels are unknown: their history is skipped.
    r = await open_channels(path, FakeClock(UNTIL))
    try:
        rows = by_group(await r.channels.availability(W, UNTIL))
        assert list(rows) == [1] and rows[1]["channels"] == 2 and rows[1]["total_seconds"] == 350
    finally:
        await r.stop()


async def test_grouping_by_tier_civil_code_and_all_with_filters(regs):
    reg = regs.channels
    reg.set_device_online(NVR, True, at=T0)
    layout = [
        # n, tier, civil_code, kind, off for (s)
        (1, 1, "34020101", "channel", 0),
        (2, 1, "34020102", "channel", 60),
        (3, 2, "340202", "channel", 150),
        (4, 2, "", "channel", 300),           # civil code from the ID: 34020000
        (5, 3, "35010001", "channel", 0),
        (6, 1, "34020101", "alarm", 300),     # not a channel: left out by default
    ]
    for n, tier, civil, kind, off in layout:
        c, _ = reg.upsert(make_channel(n, tier=tier, civil_code=civil, kind=kind), at=T0)
        if off:
            reg.set_status(c, "OFF", "notify", at=UNTIL - off)

    tiers = by_group(await reg.availability(W, UNTIL))
    assert sorted(tiers) == [1, 2, 3]
    assert tiers[1]["online_seconds"] == 540 and tiers[1]["online_ratio"] == 0.9
    assert tiers[2]["online_ratio"] == 0.25 and tiers[2]["currently_online"] == 0
    assert tiers[3]["online_ratio"] == 1.0 and tiers[3]["channels"] == 1

    civil = by_group(await reg.availability(W, UNTIL, group_by="civil_code"))
    assert sorted(civil) == ["340200", "340201", "340202", "350100"]
    assert civil["340201"]["channels"] == 2 and civil["340201"]["online_ratio"] == 0.9
    assert civil["340200"]["online_ratio"] == 0.0
    civil4 = by_group(await reg.availability(W, UNTIL, group_by="civil_code", civil_code_digits=4))
    assert sorted(civil4) == ["3402", "3501"] and civil4["3402"]["channels"] == 4
    civil8 = by_group(await reg.availability(W, UNTIL, group_by="civil_code", civil_code_digits=8))
    assert sorted(civil8) == ["34020000", "34020101", "34020102", "340202", "35010001"]

    (everything,) = await reg.availability(W, UNTIL, group_by="all")
    assert everything["group"] == "all" and everything["channels"] == 5
    assert everything["online_seconds"] == 1500 - 60 - 150 - 300
    assert everything["currently_online"] == 2

    (alarms,) = await reg.availability(W, UNTIL, group_by="all", kinds=("alarm",))
    assert alarms["channels"] == 1 and alarms["online_ratio"] == 0.0
    only = by_group(await reg.availability(W, UNTIL, group_by="civil_code", tier=1, civil_code="3402"))
    assert sorted(only) == ["340201"] and only["340201"]["channels"] == 2
    assert await reg.availability(W, UNTIL, civil_code="36") == []
    assert await reg.availability(UNTIL + 10, UNTIL + 20) != []  # state carries on after the last event
    assert await reg.availability(T0 - 20, T0 - 10) == []         # nothing existed yet

    # Current tier decides the group, not the tier at the time.
    c = reg.get(ch_id(5))
    c.tier = 1
    reg.touch(c)
    assert sorted(by_group(await reg.availability(W, UNTIL))) == [1, 2]

    with pytest.raises(ValueError):
        await reg.availability(UNTIL, W)
    with pytest.raises(ValueError):
        await reg.availability(W, UNTIL, group_by="device")


# -- property: the interval arithmetic equals a per-second simulation ---------------

SPAN = 60  # ops happen at whole seconds 0..SPAN after B
B = T0
DEVICES = (NVR, NVR2, "34020000001180000003")

op = st.one_of(
    st.tuples(st.just("upsert"), st.integers(0, 5), st.sampled_from(range(len(DEVICES))),
              st.sampled_from(CHANNEL_STATES), st.integers(1, 3)),
    st.tuples(st.just("status"), st.integers(0, 5), st.sampled_from(CHANNEL_STATES)),
    st.tuples(st.just("device"), st.sampled_from(range(len(DEVICES))), st.booleans()),
    st.tuples(st.just("remove"), st.integers(0, 5)),
)


class Model:
    """The availability rules restated per second, independently of the registry."""

    def __init__(self) -> None:
        self.device_online: dict[int, bool] = {}
        self.channels: dict[int, list] = {}   # n -> [device, status, tier]
        self.removed_tier: dict[int, int] = {}

    def apply(self, o: tuple) -> None:
        kind = o[0]
        if kind == "upsert":
            _, n, dev, status, tier = o
            self.channels[n] = [dev, status, tier]
        elif kind == "status":
            if o[1] in self.channels:
                self.channels[o[1]][1] = o[2]
        elif kind == "device":
            self.device_online[o[1]] = o[2]
        elif kind == "remove":
            gone = self.channels.pop(o[1], None)
            if gone is not None:
                self.removed_tier[o[1]] = gone[2]

    def states(self) -> dict[int, str]:
        return {n: status if self.device_online.get(dev) else "OFF"
                for n, (dev, status, _) in self.channels.items()}


def brute_force(timeline: list[tuple[int, tuple]], since: int, until: int) -> dict:
    model = Model()
    per_second: list[dict[int, str]] = []
    i = 0
    for s in range(until):
        while i < len(timeline) and timeline[i][0] <= s:
            model.apply(timeline[i][1])
            i += 1
        if s >= since:
            per_second.append(model.states())
    while i < len(timeline):
        model.apply(timeline[i][1])
        i += 1
    tier_of = {**model.removed_tier, **{n: c[2] for n, c in model.channels.items()}}
    groups: dict[int, list] = {}
    seen: dict[int, set] = {}
    for states in per_second:
        for n, state in states.items():
            acc = groups.setdefault(tier_of[n], [0, 0, 0])
            acc[0] += state != "OFF"
            acc[1] += state == "ON"
            acc[2] += 1
            seen.setdefault(tier_of[n], set()).add(n)
    now = model.states()
    return {
        tier: {"channels": len(seen[tier]), "online_seconds": on, "working_seconds": work,
               "total_seconds": total, "online_ratio": on / total, "working_ratio": work / total,
               "currently_online": sum(1 for n, st_ in now.items() if st_ != "OFF" and tier_of[n] == tier)}
        for tier, (on, work, total) in groups.items()
    }


async def run_registry(path: Path, timeline: list[tuple[int, tuple]], since: int, until: int) -> dict:
    clock = FakeClock(B)
    r = await Registries(SqliteStore(path), clock).start()
    reg = r.channels
    try:
        for t, o in timeline:
            at = clock.now = B + t
            kind = o[0]
            if kind == "upsert":
                _, n, dev, status, tier = o
                reg.upsert(make_channel(n, device_id=DEVICES[dev], status=status, tier=tier), at=at)
            elif kind == "status":
                c = reg.get(ch_id(o[1]))
                if c is not None:
                    reg.set_status(c, o[2], "notify", at=at)
            elif kind == "device":
                reg.set_device_online(DEVICES[o[1]], o[2], at=at)
            elif kind == "remove":
                reg.remove(ch_id(o[1]), at=at)
        rows = await reg.availability(B + since, B + until)
    finally:
        await r.stop()
    return {row.pop("group"): row for row in rows}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    timeline=st.lists(st.tuples(st.integers(0, SPAN), op), max_size=40).map(
        lambda ops: sorted(ops, key=lambda x: x[0])),
    bounds=st.tuples(st.integers(0, SPAN + 10), st.integers(1, SPAN + 10)),
)
def test_ratios_match_a_per_second_simulation(timeline, bounds):
    since, length = bounds
    until = since + length
    expected = brute_force(timeline, since, until)
    with tempfile.TemporaryDirectory() as tmp:
        got = asyncio.run(run_registry(Path(tmp) / "registry.db", timeline, since, until))
    assert sorted(got) == sorted(expected)
    for tier, row in got.items():
        want = expected[tier]
        assert 0.0 <= row["online_ratio"] <= 1.0 and 0.0 <= row["working_ratio"] <= row["online_ratio"]
        assert abs(row["online_ratio"] - want["online_ratio"]) <= 1e-9
        assert abs(row["working_ratio"] - want["working_ratio"]) <= 1e-9
        for key in ("channels", "online_seconds", "working_seconds", "total_seconds", "currently_online"):
            assert row[key] == want[key], (tier, key)
