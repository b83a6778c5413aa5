"""Record search (RecordInfo, GB/T 28181-2016 §9.7, Annex A.2.4.5 / A.2.6.6): the collector on
crafted multi-part answers, range splitting, the simulator's recording index, a crafted device
over real sockets (out-of-order, repeated, GB2312 and malformed parts), and the shipped server
against the shipped simulator in every vendor personality."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from urllib.parse import quote

import aiohttp
import pytest

from gb28181 import manscdp
from gb28181.catalog import item_to_channel
from gb28181.config import RecordsSection
from gb28181.manscdp import BEIJING
from gb28181.records import (
    MAX_QUERIES,
    RecordCollector,
    RecordQuery,
    RecordSearch,
    merge,
    record_of,
    split_range,
)
from simulators.cli import config_from_args, parser
from simulators.probe import Probe, start_fleet
from simulators.records import SEGMENT_SECONDS, RecordIndex, record_bodies
from simulators.vendors import VENDORS

from .conftest import TOKEN, listed, wait_until
from .sipclient import RawSip

DEV = "34020000001320000001"
CH = "34020000001310000001"
NVR = "34020000001180000001"
QUIET = {"registration": {"query_device_info": False, "query_basic_param": False},
         "catalog": {"query_on_register": False, "subscribe": False}}


def bj(*args: int) -> datetime:
    return datetime(*args, tzinfo=BEIJING)  # type: ignore[misc]


def item(start: str, end: str, kind: str = "time", name: str = "f", **extra: str) -> list[tuple[str, str]]:
    return [("DeviceID", CH), ("Name", name), ("FilePath", f"/r/{start}"), ("Address", "addr"),
            ("StartTime", start), ("EndTime", end), ("Secrecy", "0"), ("Type", kind),
            ("RecorderID", CH), ("FileSize", "1000"), *extra.items()]


def part(sn: int, sum_num: int | str | None, items: list, *, encoding: str = "GB2312",
         with_list: bool = True) -> bytes:
    fields: list = [("Name", "通道一")]
    if sum_num is not None:
        fields.append(("SumNum", sum_num))
    if with_list:
        fields.append(("RecordList", manscdp.Node({"Num": len(items)}, [("Item", i) for i in items])))
    return manscdp.build("Response", "RecordInfo", sn, CH, fields, encoding=encoding)


A = item("2026-11-22T00:00:00", "2026-11-22T00:30:00")
B = item("2026-11-22T00:30:00", "2026-11-22T01:00:00", "alarm")
C = item("2026-11-22T00:45:00", "2026-11-22T01:15:00", "manual")  # overlaps B
D = item("2026-11-21T23:50:00", "2026-11-22T00:20:00")  # crosses midnight


# -- the collector, sans-IO ------------------------------------------------------------------------

def feed(collector: RecordCollector, body: bytes) -> bool:
    return collector.feed(manscdp.parse(body))


def test_parts_out_of_order_are_collected_until_sumnum_and_sorted_by_start():
    col = RecordCollector()
    assert not feed(col, part(7, 4, [B, C]))
    assert not feed(col, part(7, 4, [A]))
    assert feed(col, part(7, 4, [D]))
    assert col.parts == 3 and col.sum_num == 4
    records = merge([col.items])
    assert [r.start for r in records] == [bj(2026, 11, 21, 23, 50), bj(2026, 11, 22, 0, 0),
                                          bj(2026, 11, 22, 0, 30), bj(2026, 11, 22, 0, 45)]
    # Overlapping files stay as the device listed them.
    assert [r.type for r in records] == ["time", "time", "alarm", "manual"]
    assert records[2].end > records[3].start


def test_a_repeated_part_is_dropped_but_equal_items_in_different_parts_are_not():
    col = RecordCollector()
    feed(col, part(1, 4, [A, B]))
    assert not feed(col, part(1, 4, [A, B]))  # the same part again (a retransmission)
    assert col.repeats == 1 and len(col.items) == 2
    assert not feed(col, part(1, 4, [A]))  # a different part that happens to list A again
    assert feed(col, part(1, 4, [C]))
    assert len(col.items) == 4 and col.repeats == 1


def test_empty_lists_and_sumnum_zero():
    col = RecordCollector()
    assert not feed(col, part(2, 2, []))  # an empty part counts as a part, not as items
    assert not feed(col, part(2, 2, [], with_list=False))
    assert col.parts == 2 and col.items == [] and not col.complete
    assert feed(col, part(2, 2, [A, B]))
    zero = RecordCollector()
    assert feed(zero, part(3, 0, []))  # SumNum 0 with an empty list: done at once
    zero_no_list = RecordCollector()
    assert feed(zero_no_list, part(3, 0, [], with_list=False))
    assert zero.items == [] and zero.sum_num == 0


def test_a_gb2312_body_is_read_with_its_chinese_names():
    col = RecordCollector()
    body = part(4, 1, [item("2026-11-22T08:00:00", "2026-11-22T08:30:00", name="长江路与黄山路交叉口 报警录像")])
    assert body.startswith(b'<?xml version="1.0" encoding="GB2312"?>')
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")
    assert feed(col, body)
    rec = record_of(col.items[0])
    assert rec.name == "长江路与黄山路交叉口 报警录像"
    assert rec.start == bj(2026, 11, 22, 8) and rec.file_size == 1000 and rec.secrecy == 0


def test_unreadable_fields_become_blanks_never_errors():
    col = RecordCollector()
    bad = [("DeviceID", CH), ("StartTime", "yesterday"), ("EndTime", "2026-13-40T99:00:00"),
           ("FileSize", "-5"), ("Secrecy", "x" * 40), ("Name", [("Nested", "odd")])]
    feed(col, part(5, "many", [bad, A]))
    assert col.sum_num is None and not col.complete and len(col.items) == 2
    records = merge([col.items])
    assert records[0].start == bj(2026, 11, 22) and records[1].start is None  # unreadable ones last
    assert records[1].as_json() | {"device_id": None} == {
        "start": None, "end": None, "type": "", "name": "", "file_path": "", "address": "",
        "secrecy": None, "recorder_id": "", "file_size": None, "device_id": None}


def test_merge_drops_a_file_repeated_at_a_split_point_only():
    first = [dict(A), dict(B), dict(B)]  # the device itself listed B twice: kept
    second = [dict(B), dict(C)]  # B again because it crosses the split: dropped
    records = merge([[dict(x) for x in first], [dict(x) for x in second]])
    assert [r.start.minute for r in records if r.start] == [0, 30, 30, 45]


# -- the query and range splitting --------------------------------------------------------------

def test_split_range_covers_the_range_with_windows_of_at_most_the_span():
    start, end = bj(2026, 11, 20, 6), bj(2026, 11, 22, 18)  # 60 h
    windows = split_range(start, end, 86400)
    assert windows == [(bj(2026, 11, 20, 6), bj(2026, 11, 21, 6)),
                       (bj(2026, 11, 21, 6), bj(2026, 11, 22, 6)),
                       (bj(2026, 11, 22, 6), bj(2026, 11, 22, 18))]
    assert split_range(start, start + timedelta(hours=1), 86400) == [(start, start + timedelta(hours=1))]
    assert split_range(end, start, 3600) == []
    many = split_range(start, end, 3600)
    assert len(many) == 60 and all(b == c for (_, b), (c, _) in zip(many, many[1:]))
    search = RecordSearch(None, RecordsSection(max_query_span=3600))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"needs 60 queries .* at most {MAX_QUERIES}"):
        search.windows(RecordQuery(CH, start, end))


def test_query_fields_follow_a245_and_always_carry_type():
    q = RecordQuery(CH, bj(2026, 11, 22), bj(2026, 11, 23))
    body = manscdp.parse(manscdp.build("Query", "RecordInfo", 9, CH, q.fields()))
    assert [el.tag for el in body.element] == ["CmdType", "SN", "DeviceID", "StartTime", "EndTime", "Type"]
    assert body.text("StartTime") == "2026-11-22T00:00:00" and body.text("Type") == "all"
    full = RecordQuery(CH, bj(2026, 11, 22), bj(2026, 11, 23), "alarm", file_path="/x", address="a",
                       secrecy=1, recorder_id=DEV, indistinct=0)
    body = manscdp.parse(manscdp.build("Query", "RecordInfo", 9, CH, full.fields()))
    assert [el.tag for el in body.element][3:] == ["StartTime", "EndTime", "FilePath", "Address",
                                                   "Secrecy", "Type", "RecorderID", "IndistinctQuery"]


def test_query_parameters():
    now = bj(2026, 11, 22, 12).timestamp()
    q = RecordQuery.from_params(CH, {"start": "2026-11-22T00:00:00", "end": "2026-11-22T02:00:00+00:00",
                                     "type": "Alarm"}, now=now)
    assert q.start == bj(2026, 11, 22) and q.end == bj(2026, 11, 22, 10) and q.type == "alarm"
    # An unencoded "+" in a URL arrives as a space.
    q = RecordQuery.from_params(CH, {"start": "2026-11-22T00:00:00 08:00", "end": "2026-11-22T08:00:00 0000"})
    assert q.start == bj(2026, 11, 22) and q.end == bj(2026, 11, 22, 16)
    q = RecordQuery.from_params(CH, {"start": "24h"}, now=now)
    assert q.start == bj(2026, 11, 21, 12) and q.end == bj(2026, 11, 22, 12) and q.type == "all"
    q = RecordQuery.from_params(CH, {"start": "2026-11-22", "end": "now", "secrecy": "1"}, now=now)
    assert q.start == bj(2026, 11, 22) and q.secrecy == 1
    for params, cause in [({}, "start is required"), ({"start": "soon"}, "cannot read the time"),
                          ({"start": "2026-11-22T02:00:00", "end": "2026-11-22T01:00:00"}, "must be after"),
                          ({"start": "1h", "type": "motion"}, "type must be one of"),
                          ({"start": "1h", "secrecy": "2"}, "secrecy must be 0 or 1"),
                          ({"start": "1h", "address": "x" * 300}, "longer than")]:
        with pytest.raises(ValueError, match=cause):
            RecordQuery.from_params(CH, params, now=now)


# -- the simulator's recording index ---------------------------------------------------------------

def test_the_index_is_deterministic_with_gaps_types_and_midnight_crossings():
    now = bj(2026, 11, 22, 15, 7)
    index = RecordIndex(CH, 7, now)
    segs = index.segments()
    assert segs == RecordIndex(CH, 7, now.timestamp()).segments()  # same ID, same files
    assert segs != RecordIndex(DEV, 7, now).segments()
    assert segs[0].start >= bj(2026, 11, 15) and segs[-1].end <= now
    assert all(s.end - s.start <= timedelta(seconds=SEGMENT_SECONDS) for s in segs)
    assert all(a.end <= b.start for a, b in zip(segs, segs[1:]))
    gaps = [b.start - a.end for a, b in zip(segs, segs[1:]) if b.start > a.end]
    assert any(g >= timedelta(minutes=30) for g in gaps) and any(g < timedelta(minutes=30) for g in gaps)
    kinds = {s.type for s in segs}
    assert kinds == {"time", "alarm", "manual"}
    assert any(s.start.date() != s.end.date() for s in segs)  # a file across midnight
    day = index.segments(bj(2026, 11, 20), bj(2026, 11, 21))
    assert day[0].start < bj(2026, 11, 20) or day[0].start.hour == 0
    assert [s for s in segs if s.start < bj(2026, 11, 21) and s.end > bj(2026, 11, 20)] == day
    alarms = index.segments(bj(2026, 11, 20), bj(2026, 11, 21), "alarm")
    assert alarms == [s for s in day if s.type == "alarm"]
    mid = day[3].start + (day[3].end - day[3].start) / 2
    assert index.covering(mid) == day[3] and index.covering(now + timedelta(hours=1)) is None
    if gaps:
        first_gap = next(a.end for a, b in zip(segs, segs[1:]) if b.start > a.end)
        assert index.covering(first_gap) is None
    assert RecordIndex(CH, 0, now).segments() == [] and RecordIndex(CH, 0, now).covering(mid) is None


def test_record_bodies_are_multi_part_and_sumnum_zero_has_an_empty_list():
    segs = RecordIndex(CH, 1, bj(2026, 11, 22, 12)).segments()
    bodies = record_bodies(lambda f: manscdp.build("Response", "RecordInfo", 3, CH, f), CH, "ch",
                           segs, per=5, budget=60_000)
    assert len(bodies) == -(-len(segs) // 5)
    col = RecordCollector()
    done = [feed(col, b) for b in reversed(bodies)]
    assert done[-1] and not any(done[:-1])
    assert [r.start for r in merge([col.items])] == [s.start for s in segs]
    empty = record_bodies(lambda f: manscdp.build("Response", "RecordInfo", 3, CH, f), CH, "ch", [],
                          per=5, budget=60_000)
    (only,) = empty
    msg = manscdp.parse(only)
    assert msg.text("SumNum") == "0" and msg.element.find("RecordList").get("Num") == "0"


async def first_answer(probe: Probe, sn: int):
    parts = await probe.wait_for(lambda: probe.responses("RecordInfo", sn), 10, "an answer")
    return parts[0]


@pytest.mark.parametrize(("vendor", "per_part"), [("generic", 4), ("hikvision", 2), ("dahua", None)])
async def test_the_simulator_answers_in_its_vendors_parts(vendor, per_part):
    probe = await Probe(answer_delay=0.002).start()
    fleet = await start_fleet(probe, vendor=vendor, channels=2, records_days=2)
    try:
        channel = fleet.devices[NVR].channels[1]
        now = datetime.now(BEIJING)
        start, end = now - timedelta(days=1, hours=12), now - timedelta(hours=12)
        fields = [("StartTime", manscdp.format_time(start)), ("EndTime", manscdp.format_time(end)),
                  ("Type", "all")]
        sn = await probe.query(NVR, "RecordInfo", fields, target_id=channel.channel_id)
        segs = RecordIndex(channel.channel_id, 2, now).segments(start, end)

        def collected():
            col = RecordCollector()
            for p in probe.responses("RecordInfo", sn):
                col.feed(p.body)
            return col if col.complete else None

        col = await probe.wait_for(collected, 10, "the RecordInfo answer")
        parts = sorted(probe.responses("RecordInfo", sn), key=lambda p: p.at)
        sizes = [int(p.body.element.find("RecordList").get("Num")) for p in parts]
        if per_part is None:
            assert sizes == [len(segs)]
        else:
            whole, rest = divmod(len(segs), per_part)
            assert sizes == [per_part] * whole + ([rest] if rest else [])
        for p in parts:
            assert p.body.device_id == channel.channel_id and p.body.text("SumNum") == str(len(segs))
            assert p.body.text("Name") == channel.name
        assert [(r.start, r.end, r.type, r.name) for r in merge([col.items])] == [
            (s.start, s.end, s.type, s.name) for s in segs]
        assert all(r.address == channel.address and r.file_size == s.file_size
                   for r, s in zip(merge([col.items]), segs))

        # Without <Type>: Dahua lists nothing (SumNum 0, empty list); the others everything.
        answer = await first_answer(probe, await probe.query(NVR, "RecordInfo", fields[:2],
                                                             target_id=channel.channel_id))
        assert answer.body.text("SumNum") == ("0" if vendor == "dahua" else str(len(segs)))
        # An unknown channel or a range before the recordings: SumNum 0 with an empty list.
        for target, rng in [("34020000001310099999", fields), (channel.channel_id, [
                ("StartTime", manscdp.format_time(start - timedelta(days=9))),
                ("EndTime", manscdp.format_time(start - timedelta(days=8))), ("Type", "all")])]:
            answer = await first_answer(probe, await probe.query(NVR, "RecordInfo", rng, target_id=target))
            assert answer.body.text("SumNum") == "0"
            assert answer.body.element.find("RecordList").get("Num") == "0"
            assert answer.body.items("RecordList") == []
    finally:
        await fleet.stop()
        await probe.close()


def test_the_records_flag():
    assert config_from_args(parser().parse_args(["--records", "3"])).records_days == 3
    assert config_from_args(parser().parse_args([])).records_days == 0
    with pytest.raises(SystemExit, match="--records"):
        config_from_args(parser().parse_args(["--records", "-1"]))


# -- a crafted device over real sockets -------------------------------------------------------------

def message(dev: RawSip, body: bytes) -> bytes:
    """A MESSAGE from ``dev`` carrying ``body`` byte for byte (GB2312 included)."""
    return dev.message_bytes("").replace(b"Content-Length: 0", f"Content-Length: {len(body)}".encode()) + body


async def crafted_device(make_server, **overrides):
    server = await make_server(**QUIET, **overrides)
    dev = RawSip(server.sip_port)
    await dev.__aenter__()
    assert (await dev.register()).status == 200
    server.channels.upsert(item_to_channel({"DeviceID": CH, "Name": "cam"}, DEV))
    return server, dev


async def test_crafted_parts_out_of_order_repeated_gb2312_and_malformed(make_server):
    server, dev = await crafted_device(make_server, records={"timeout": 1.0})
    try:
        async with aiohttp.ClientSession() as http:
            url = (f"http://127.0.0.1:{server.http_port}/api/v1/channels/{CH}/records"
                   "?start=2026-11-21T12:00:00&end=2026-11-22T12:00:00&type=all")
            pending = asyncio.ensure_future(http.get(url, headers={"Authorization": f"Bearer {TOKEN}"}))
            query = await dev.request("MESSAGE", timeout=5)
            dev.reply(query, 200)
            q = manscdp.parse(query.body)
            assert (q.root, q.cmd_type, q.device_id) == ("Query", "RecordInfo", CH)
            assert (q.text("StartTime"), q.text("EndTime"), q.text("Type")) == (
                "2026-11-21T12:00:00", "2026-11-22T12:00:00", "all")
            sn = q.sn
            assert sn is not None
            other_sn = manscdp.build("Response", "RecordInfo", sn + 1000, CH, [("SumNum", 1)])
            no_sn = part(sn, 4, [A]).replace(f"<SN>{sn}</SN>".encode(), b"")
            junk_list = manscdp.build("Response", "RecordInfo", sn, CH, [
                ("SumNum", "lots"), ("RecordList", manscdp.Node({"Num": "zz"}, [("Junk", "1")]))])
            sends = [(part(sn, 4, [C]), 200), (b"not xml at all", 400), (part(sn, 4, [C]), 200),
                     (b"<Response><CmdType>RecordInfo</CmdType><SN>", 400),
                     (part(sn, 4, [D]), 200),
                     (b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><Response/>", 400),
                     (other_sn, 200), (no_sn, 200), (junk_list, 200), (part(sn, 4, []), 200),
                     (part(sn, 4, [A, B]), 200)]
            for body, status in sends:
                dev.send(message(dev, body))
                assert (await dev.recv()).status == status, body
            resp = await pending
            got = await resp.json()
        assert resp.status == 200, got
        assert got["sum_num"] == 4 and got["complete"] is True and got["queries"] == 1
        assert [(i["start"], i["type"]) for i in got["items"]] == [
            ("2026-11-21T23:50:00+08:00", "time"), ("2026-11-22T00:00:00+08:00", "time"),
            ("2026-11-22T00:30:00+08:00", "alarm"), ("2026-11-22T00:45:00+08:00", "manual")]
        first = got["items"][0]
        assert first == {"start": "2026-11-21T23:50:00+08:00", "end": "2026-11-22T00:20:00+08:00",
                         "type": "time", "name": "f", "file_path": "/r/2026-11-21T23:50:00",
                         "address": "addr", "secrecy": 0, "recorder_id": CH, "file_size": 1000,
                         "device_id": CH}
        audit = [e for e in server.audit.recent if e["action"] == "record-search"]
        assert audit and audit[-1]["target"] == CH and audit[-1]["items"] == 4
        assert audit[-1]["start"] == "2026-11-21T12:00:00+08:00"
    finally:
        await dev.__aexit__()


async def test_a_device_that_goes_quiet_gives_what_came_or_504(make_server):
    server, dev = await crafted_device(make_server, records={"timeout": 0.5})
    try:
        device = server.registry.get(DEV)
        search = RecordSearch(server.queries, server.config.records)
        query = RecordQuery(CH, bj(2026, 11, 22), bj(2026, 11, 23))
        task = asyncio.ensure_future(search.search(device, query))
        q = await dev.request("MESSAGE")
        dev.reply(q, 200)
        sn = manscdp.parse(q.body).sn
        dev.send(message(dev, part(sn, 3, [A])))
        result = await asyncio.wait_for(task, 5)
        assert not result.complete and result.sum_num == 3 and len(result.records) == 1

        started = time.monotonic()
        task = asyncio.ensure_future(search.search(device, query))
        dev.reply(await dev.request("MESSAGE"), 200)
        from gb28181.queries import QueryError
        with pytest.raises(QueryError, match="sent no answer within 0.5 s"):
            await asyncio.wait_for(task, 5)
        assert time.monotonic() - started >= 0.5
    finally:
        await dev.__aexit__()


async def test_api_errors_name_the_cause(make_server):
    server, dev = await crafted_device(make_server, records={"timeout": 0.3, "max_query_span": 3600})
    base = f"http://127.0.0.1:{server.http_port}/api/v1/channels"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        async with aiohttp.ClientSession() as http:
            async def get(path: str) -> tuple[int, dict]:
                async with http.get(base + path, headers=auth) as resp:
                    return resp.status, await resp.json()

            status, body = await get("/34020000001310009999/records?start=1h")
            assert status == 404 and "no channel" in body["error"]
            status, body = await get(f"/{CH}/records?start=tomorrowish")
            assert status == 400 and "start" in body["error"]
            status, body = await get(f"/{CH}/records?start=48h")
            assert status == 400 and "records.max_query_span" in body["error"]
            pending = asyncio.ensure_future(get(f"/{CH}/records?start=1h&type=alarm"))
            q = await dev.request("MESSAGE")
            dev.reply(q, 200)
            assert manscdp.parse(q.body).text("Type") == "alarm"
            status, body = await pending
            assert status == 504 and "no answer" in body["error"] and "records.timeout" in body["error"]
            server.registry.set_online(server.registry.get(DEV), False, "test")
            status, body = await get(f"/{CH}/records?start=1h")
            assert status == 409 and "offline" in body["error"]
        assert [e["action"] for e in server.audit.recent][-1:] == ["record-search-failed"]
    finally:
        await dev.__aexit__()


# -- the shipped server against the shipped simulator ---------------------------------------------

def expected(channel_id: str, address: str, start: datetime, end: datetime, kind: str = "all") -> list[dict]:
    segs = RecordIndex(channel_id, 2, time.time()).segments(start, end, kind)
    return [{"start": s.start.isoformat(), "end": s.end.isoformat(), "type": s.type, "name": s.name,
             "file_path": s.file_path, "address": address, "secrecy": 0, "recorder_id": channel_id,
             "file_size": s.file_size, "device_id": channel_id} for s in segs]


@pytest.mark.parametrize("vendor", VENDORS)
def test_a_days_search_returns_exactly_the_simulators_files(served, sims, vendor):
    # Split into 6-hour queries for one vendor: the merge must give the same list.
    env = {"GB28181_RECORDS__MAX_QUERY_SPAN": "21600"} if vendor == "generic" else {}
    server = served(**env)
    sim = sims(server, "--records", "2", "--nvr", "--channels", "2", "--vendor", vendor,
               "--keepalive-interval", "5")

    def channels():
        status, body = server.api(f"/api/v1/devices/{NVR}/channels")
        return status == 200 and len(listed(body)) == 2 and listed(body)

    chans = wait_until(channels, 30, "the NVR's catalog", sim.exited)
    today = datetime.now(BEIJING).replace(hour=0, minute=0, second=0, microsecond=0)
    yesterday = today - timedelta(days=1)
    for ch in chans:
        cid, address = ch["channel_id"], ch["address"]
        before = expected(cid, address, yesterday, today)
        status, got = server.api(f"/api/v1/channels/{cid}/records?start={quote(yesterday.isoformat())}"
                                 f"&end={today.strftime('%Y-%m-%dT%H:%M:%S')}")
        assert status == 200, got
        assert got["complete"] is True
        assert got["items"] in (before, expected(cid, address, yesterday, today)), vendor
        assert len(got["items"]) >= 36  # a day of 30-minute files, a few missing
        if vendor == "generic":
            assert got["queries"] == 4 and got["sum_num"] >= len(got["items"])
        else:
            assert got["queries"] == 1 and got["sum_num"] == len(got["items"])

    cid = chans[0]["channel_id"]
    status, got = server.api(f"/api/v1/channels/{cid}/records?start={yesterday.strftime('%Y-%m-%d')}"
                             f"&end={today.strftime('%Y-%m-%d')}&type=alarm")
    assert status == 200
    assert got["items"] == expected(cid, chans[0]["address"], yesterday, today, "alarm")
    assert all(i["type"] == "alarm" for i in got["items"])
    # Before the recordings began: the simulator answers SumNum 0 with an empty list.
    old = yesterday - timedelta(days=5)
    status, got = server.api(f"/api/v1/channels/{cid}/records?start={old.isoformat()}"
                             f"&end={quote((old + timedelta(hours=6)).isoformat())}")
    assert status == 200 and got == {"items": [], "sum_num": 0, "complete": True, "queries": 1}
    status, audit = server.api("/api/v1/audit")
    assert sum(1 for e in listed(audit) if e["action"] == "record-search") == 4
    assert not server.error_lines(), server.log()[-3000:]
