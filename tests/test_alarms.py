"""Alarms (GB/T 28181-2016 §9.4, A.2.5, A.2.6), alarm subscriptions (§9.11.1), the SSE event
feed and webhooks: body parsing, signatures, back-off on a fake clock, storage, and end to end
on the shipped server with simulated devices and a webhook receiver in this process."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import socket
import time
from datetime import datetime

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gb28181 import manscdp
from gb28181.alarms import AlarmError, parse_alarm
from gb28181.config import EventsSection, Webhook
from gb28181.events import Backoff, EventBus, WebhookSink, sign, verify
from registry import AlarmEvent, DeviceRegistry, SqliteStore

from .conftest import TOKEN
from .sipclient import RawSip

DEV = "34020000001320000001"


def alarm_body(inner: str, *, device_id: str = DEV, sn: int = 7, root: str = "Notify",
               decl: str = '<?xml version="1.0" encoding="GB2312"?>') -> bytes:
    return (f"{decl}\r\n<{root}>\r\n<CmdType>Alarm</CmdType>\r\n<SN>{sn}</SN>\r\n"
            f"<DeviceID>{device_id}</DeviceID>\r\n{inner}</{root}>\r\n").encode("gb18030")


def parse(inner: str, **kw) -> AlarmEvent:
    return parse_alarm(manscdp.parse(alarm_body(inner, **kw)), DEV, 1000.0)


# -- parsing the Alarm body (A.2.5) --------------------------------------------------------------

def test_the_standards_example_j81():
    a = parse("<AlarmPriority>4</AlarmPriority>\r\n<AlarmTime>2009-12-04T16:23:32</AlarmTime>\r\n"
              "<AlarmMethod>2</AlarmMethod>\r\n", device_id="64010000001340000101")
    assert (a.device_id, a.channel_id, a.priority, a.method) == (DEV, "64010000001340000101", 4, 2)
    assert a.alarm_time == datetime.fromisoformat("2009-12-04T16:23:32+08:00").timestamp()
    assert a.alarm_type is None and a.longitude is None and a.received_at == 1000.0


def test_full_2016_body_with_info_and_event_type():
    a = parse("<AlarmPriority>1</AlarmPriority><AlarmMethod>5</AlarmMethod>"
              "<AlarmTime>2026-11-30T10:00:00.250</AlarmTime><AlarmDescription>区域入侵</AlarmDescription>"
              "<Longitude>116.397</Longitude><Latitude>39.908</Latitude>"
              "<Info><AlarmType>6</AlarmType><AlarmTypeParam><EventType>2</EventType></AlarmTypeParam></Info>")
    assert (a.priority, a.method, a.alarm_type) == (1, 5, 6)
    assert a.description == "区域入侵" and (a.longitude, a.latitude) == (116.397, 39.908)
    assert a.info == {"type_name": "intrusion", "event_type": "leave"}
    assert a.alarm_time is not None and a.alarm_time % 1 == pytest.approx(0.25)


@pytest.mark.parametrize("inner, check", [
    # 2011-style firmware: AlarmType at the top level, not under Info
    ("<AlarmPriority>2</AlarmPriority><AlarmMethod>2</AlarmMethod><AlarmType>1</AlarmType>",
     lambda a: a.alarm_type == 1 and a.info["type_name"] == "video-loss"),
    # a space for T, a zone, padding; Hikvision's 0/0 position for "none"
    (" <AlarmPriority> 3 </AlarmPriority>\n<AlarmTime>2026-11-30 10:00:00+08:00</AlarmTime>"
     "<Longitude>0.0</Longitude><Latitude>0</Latitude>",
     lambda a: a.priority == 3 and a.alarm_time is not None and a.longitude is None),
    # an empty Info (Hik sends <Info></Info>) and a vendor extra element, kept
    ("<AlarmPriority>1</AlarmPriority><Info></Info><ExtendInfo>abc</ExtendInfo>",
     lambda a: a.alarm_type is None and a.info == {"ExtendInfo": "abc"}),
    # only what the standard requires (DeviceID, AlarmPriority)
    ("<AlarmPriority>4</AlarmPriority>",
     lambda a: (a.method, a.alarm_time, a.description, a.longitude) == (None, None, "", None)),
    # an unreadable time is kept as sent, not guessed
    ("<AlarmPriority>4</AlarmPriority><AlarmTime>yesterday</AlarmTime>",
     lambda a: a.alarm_time is None and a.info["AlarmTime"] == "yesterday"),
    # a text AlarmType and an out-of-range latitude
    ("<AlarmPriority>4</AlarmPriority><Info><AlarmType>motion</AlarmType></Info><Latitude>95</Latitude>"
     "<Longitude>120</Longitude>",
     lambda a: a.alarm_type is None and a.info["AlarmType"] == "motion" and a.latitude is None
     and a.longitude == 120.0),
])
def test_vendor_variants(inner, check):
    assert check(parse(inner))


def test_dahua_indented_lf_body():
    body = alarm_body("<AlarmPriority>2</AlarmPriority>\n  <AlarmMethod>5</AlarmMethod>\n"
                      "  <Info>\n    <AlarmType>2</AlarmType>\n  </Info>\n",
                      decl='<?xml version="1.0" encoding="GB2312" ?>').replace(b"\r\n", b"\n")
    a = parse_alarm(manscdp.parse(body), DEV, 0.0)
    assert (a.priority, a.method, a.alarm_type, a.info["type_name"]) == (2, 5, 2, "motion")


@pytest.mark.parametrize("inner, kw, field, words", [
    ("<AlarmPriority>9</AlarmPriority>", {}, "AlarmPriority", "1-4"),
    ("<AlarmPriority>high</AlarmPriority>", {}, "AlarmPriority", "'high'"),
    ("<AlarmPriority>1</AlarmPriority><AlarmMethod>0</AlarmMethod>", {}, "AlarmMethod", "1-7"),
    ("<AlarmPriority>1</AlarmPriority><AlarmMethod>５</AlarmMethod>", {}, "AlarmMethod", "1-7"),
    ("<AlarmPriority>1</AlarmPriority>", {"device_id": ""}, "DeviceID", "without DeviceID"),
    ("<AlarmPriority>1</AlarmPriority>", {"device_id": "a b;c"}, "DeviceID", "not a device code"),
])
def test_garbage_is_refused_with_the_reason(inner, kw, field, words):
    with pytest.raises(AlarmError) as info:
        parse(inner, **kw)
    assert info.value.field == field and words in str(info.value)


_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<&"), max_size=30)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["AlarmPriority", "AlarmMethod", "AlarmTime", "AlarmDescription",
                                        "Longitude", "Latitude", "AlarmType", "Info"]), _TEXT),
       _TEXT)
def test_any_field_values_give_an_alarm_or_an_alarm_error(fields, device_id):
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in fields.items())
    try:
        msg = manscdp.parse(alarm_body(inner, device_id=device_id))
    except manscdp.ManscdpError:
        return
    try:
        a = parse_alarm(msg, DEV, 0.0)
    except AlarmError:
        return
    assert a.priority in (None, 1, 2, 3, 4) and a.method in (None, *range(1, 8))
    json.dumps(a.info)


# -- signatures, back-off, bounded queues ---------------------------------------------------------

def test_signature_is_hmac_sha256_of_the_body():
    body = b'{"id":1,"type":"alarm"}'
    expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert sign("s3cret", body) == expected
    assert verify("s3cret", body, expected)
    assert not verify("s3cret", body + b" ", expected)
    assert not verify("other", body, expected)


def test_backoff_doubles_up_to_the_cap_with_bounded_jitter():
    b = Backoff(1.0, 10.0, jitter=0.0)
    assert [b.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    low, high = Backoff(1.0, 10.0, jitter=0.2, rand=lambda: 0.0), Backoff(1.0, 10.0, jitter=0.2, rand=lambda: 1.0)
    assert (low.delay(3), high.delay(3)) == (pytest.approx(3.2), pytest.approx(4.8))


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def sink_with(answers: list[int], clock: FakeClock, **kw) -> tuple[WebhookSink, list]:
    calls: list = []

    async def post(url: str, body: bytes, headers: dict[str, str]) -> int:
        calls.append((clock.now, body, headers))
        return answers.pop(0)

    hook = Webhook(url="http://127.0.0.1:1/hook", secret="k", events=kw.pop("events", []))
    return WebhookSink(hook, post=post, backoff=Backoff(1.0, 8.0, jitter=0.0), sleep=clock.sleep,
                       clock=clock.time, **kw), calls


async def test_retries_with_exponential_backoff_on_a_fake_clock():
    clock = FakeClock()
    bus = EventBus(EventsSection(), clock=clock.time)
    event = bus.publish("alarm", {"device_id": DEV})
    sink, calls = sink_with([0, 503, 500, 429, 500, 502, 200], clock)
    start = clock.now
    assert await sink.deliver(event) is True
    assert clock.sleeps == [1, 2, 4, 8, 8, 8]
    assert [t - start for t, _, _ in calls] == [0, 1, 3, 7, 15, 23, 31]
    # every attempt carries the same body and delivery ID, signed, with its own timestamp
    assert {body for _, body, _ in calls} == {event.body}
    assert all(verify("k", event.body, h["X-GB28181-Signature"]) for _, _, h in calls)
    assert [int(h["X-GB28181-Timestamp"]) for _, _, h in calls] == [int(t) for t, _, _ in calls]
    assert {h["X-GB28181-Delivery"] for _, _, h in calls} == {str(event.id)}
    assert (sink.counts["delivered"], sink.counts["retried"], sink.counts["failed"]) == (1, 6, 0)


async def test_a_refusal_is_final():
    clock = FakeClock()
    bus = EventBus(EventsSection(), clock=clock.time)
    sink, calls = sink_with([400], clock)
    assert await sink.deliver(bus.publish("alarm", {})) is False
    assert len(calls) == 1 and clock.sleeps == [] and sink.counts["failed"] == 1


async def test_a_dead_receiver_costs_a_bounded_queue():
    clock = FakeClock()
    bus = EventBus(EventsSection(), clock=clock.time)
    sink, _ = sink_with([], clock, queue_size=5, events=["alarm"])
    for n in range(100):
        sink.offer(bus.publish("alarm", {"n": n}))
        sink.offer(bus.publish("device.online", {"n": n}))  # not wanted by this hook
    assert len(sink.queue) == 5 and sink.counts["dropped"] == 95
    assert [json.loads(e.body)["data"]["n"] for e in sink.queue] == [95, 96, 97, 98, 99]


async def test_sse_clients_resume_from_the_ring_and_slow_ones_are_dropped():
    bus = EventBus(EventsSection(history=10, sse_backlog=3))
    ids = [bus.publish("alarm", {"n": n}).id for n in range(15)]
    client, replay, gap = bus.attach(ids[9], None)
    assert [e.id for e in replay] == ids[10:] and not gap
    bus.detach(client)
    client, replay, gap = bus.attach(ids[2], None)  # 3..4 are no longer held
    assert [e.id for e in replay] == ids[5:] and gap
    bus.publish("device.offline", {})
    bus.publish("channel.state", {})
    bus.publish("alarm", {})
    assert len(client.queue) == 3 and not client.dropped and client in bus.clients
    bus.publish("alarm", {})
    assert client.dropped and client not in bus.clients and bus.clients_dropped == 1
    only, replay, _ = bus.attach(ids[-1], frozenset({"device"}))
    bus.publish("alarm", {})
    bus.publish("device.online", {})
    assert [e.type for e in only.queue] == ["device.online"]


# -- storage (schema version 4) -------------------------------------------------------------------

async def test_alarms_are_stored_and_queried(tmp_path):
    store = SqliteStore(tmp_path / "db.sqlite")
    registry = DeviceRegistry(store, flush_interval=0.05)
    await registry.start()
    for n in range(6):
        registry.record_alarm(AlarmEvent(f"3402000000132000000{n % 2}", f"ch{n}", n % 4 + 1, 5, 2,
                                         1000.0 + n, f"alarm {n}", 116.0, 39.0, 2000.0 + n,
                                         {"type_name": "motion"}))
    newest = await registry.alarm_events(limit=3)
    assert [a.channel_id for a in newest] == ["ch5", "ch4", "ch3"]
    assert newest[0].info == {"type_name": "motion"} and newest[0].alarm_time == 1005.0
    assert [a.channel_id for a in await registry.alarm_events("34020000001320000001")] == ["ch5", "ch3", "ch1"]
    assert [a.channel_id for a in await registry.alarm_events(since=2003.0)] == ["ch5", "ch4", "ch3"]
    assert [a.channel_id for a in await registry.alarm_events(priorities=(1, 2))] == ["ch5", "ch4", "ch1", "ch0"]
    await registry.stop()
    import sqlite3
    con = sqlite3.connect(tmp_path / "db.sqlite")
    assert con.execute("SELECT version FROM schema_version").fetchone()[0] >= 4  # 4 added alarms
    assert con.execute("SELECT COUNT(*) FROM alarms").fetchone() == (6,)
    con.close()


# -- a crafted device over real sockets: 200, then the Response MESSAGE (§9.4.2) ------------------

QUIET = {"registration": {"query_device_info": False, "query_basic_param": False},
         "catalog": {"query_on_register": False, "subscribe": False}}


async def test_alarm_gets_200_then_a_response_with_its_sn(make_server):
    server = await make_server(**QUIET)
    async with RawSip(server.sip_port) as dev:
        assert (await dev.register()).status == 200
        channel = "34020000001310000001"
        dev.send(dev.message_bytes(alarm_body("<AlarmPriority>1</AlarmPriority><AlarmMethod>5</AlarmMethod>"
                                              "<Info><AlarmType>2</AlarmType></Info>",
                                              device_id=channel, sn=4242).decode("gb18030")))
        ok = await dev.recv()
        assert ok.status == 200 and ok.body == b""
        response = await dev.request("MESSAGE", timeout=3.0)
        msg = manscdp.parse(response.body)
        assert (msg.root, msg.cmd_type, msg.sn, msg.device_id, msg.text("Result")) == \
            ("Response", "Alarm", 4242, channel, "OK")
        dev.reply(response, 200)
        # garbage is refused with the reason, and nothing is stored or answered
        dev.send(dev.message_bytes(alarm_body("<AlarmPriority>7</AlarmPriority>").decode()))
        bad = await dev.recv()
        assert bad.status == 400 and "AlarmPriority must be 1-4" in bad.reason
        with pytest.raises(TimeoutError):
            await dev.request("MESSAGE", timeout=0.5)
    stored = await server.registry.alarm_events()
    assert [(a.device_id, a.channel_id, a.priority, a.alarm_type) for a in stored] == [(DEV, channel, 1, 2)]
    assert server.alarms.responses["sent"] == 1 and server.alarms.rejected["AlarmPriority"] == 1


# -- end to end on the shipped server --------------------------------------------------------------

class Receiver:
    """A webhook receiver: an aiohttp server in this process, recording what arrives and when."""

    def __init__(self, port: int = 0, status: int = 200) -> None:
        self.port = port
        self.status = status
        self.got: list[tuple[float, dict, bytes, dict]] = []
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append((time.time(), json.loads(body), body, dict(request.headers)))
        return web.Response(status=self.status)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


class Feed:
    """An SSE client of GET /api/v1/events, recording (arrival time, id, event, data)."""

    def __init__(self, base: str, last_id: int | None = None) -> None:
        self.base = base
        self.last_id = last_id
        self.events: list[tuple[float, int, str, dict]] = []
        self.comments = 0
        self.content_type = ""
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        if self.last_id is not None:
            headers["Last-Event-ID"] = str(self.last_id)
        async with aiohttp.ClientSession() as session:
            async with session.get(self.base + "/api/v1/events", headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=None)) as resp:
                self.content_type = resp.headers.get("Content-Type", "")
                fields: dict[str, str] = {}
                async for raw in resp.content:
                    line = raw.decode().rstrip("\n")
                    if not line:
                        if "data" in fields:
                            payload = json.loads(fields["data"])
                            if "id" in fields:  # the frame's id: is the event's own
                                assert payload["id"] == int(fields["id"]) and payload["type"] == fields["event"]
                                payload = payload["data"]
                            self.events.append((time.time(), int(fields.get("id", "0")),
                                                fields.get("event", ""), payload))
                        fields = {}
                    elif line.startswith(":"):
                        self.comments += 1
                    else:
                        key, _, value = line.partition(":")
                        fields[key] = value.lstrip(" ")

    def start(self) -> Feed:
        self.task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def of(self, type_: str) -> list[tuple[float, int, str, dict]]:
        return [e for e in self.events if e[2] == type_]


async def until(predicate, timeout: float, what: str, check=None):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        problem = check() if check is not None else None
        if problem:
            pytest.fail(f"{problem} while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


async def api(server, path: str, method: str = "GET", body=None):
    """The blocking conftest ``http`` helper, off the event loop (the receiver runs on it)."""
    return await asyncio.to_thread(server.api, path, method, body)


def sim_counts(sim) -> dict[str, int]:
    lines = re.findall(r"alarms sent (\d+) responses (\d+) notifies (\d+)", sim.log())
    sent, responses, notifies = map(int, lines[-1]) if lines else (0, 0, 0)
    return {"sent": sent, "responses": responses, "notifies": notifies}


def alarm_ts(data: dict) -> float:
    return datetime.fromisoformat(data["alarm_time"]).timestamp()


FAST = {"GB28181_KEEPALIVE__INTERVAL": "1", "GB28181_KEEPALIVE__COUNT": "2",
        "GB28181_EVENTS__WEBHOOK_RETRY_MIN": "0.2", "GB28181_EVENTS__WEBHOOK_RETRY_MAX": "0.5",
        "GB28181_EVENTS__SSE_KEEPALIVE": "0.5"}


async def test_an_alarm_reaches_the_api_the_feed_and_a_webhook_within_a_second(served, sims):
    receiver = await Receiver().start()
    hooks = json.dumps([{"url": receiver.url, "secret": "hook-secret", "events": ["alarm", "device"]}])
    server = await asyncio.to_thread(served, GB28181_EVENTS__WEBHOOKS=hooks, **FAST)
    feed = Feed(server.base).start()
    try:
        sim = await asyncio.to_thread(sims, server, "--devices", "2", "--alarm-interval", "0.5",
                                      "--keepalive-interval", "0.5", "--progress", "0.2")
        await until(lambda: feed.of("alarm"), 20, "an alarm on the SSE feed", sim.exited)
        assert feed.content_type.startswith("text/event-stream")
        await until(lambda: [g for g in receiver.got if g[1]["type"] == "alarm"], 10, "the webhook")
        first = feed.of("alarm")[0]
        alarm = first[3]
        sent_at = alarm_ts(alarm)
        # the API has it as soon as the feed does (it is published once stored)
        status, listing = await api(server, f"/api/v1/alarms?device_id={alarm['device_id']}&since=10m")
        api_at = time.time()
        assert status == 200
        stored = [a for a in listing["alarms"] if a["alarm_time"] == alarm["alarm_time"]
                  and a["channel_id"] == alarm["channel_id"]]
        assert stored and stored[0]["priority"] in (1, 2, 3, 4) and stored[0]["method"] in (2, 5, 6)
        hook_at, hook_json, hook_body, hook_headers = next(
            g for g in receiver.got if g[1]["type"] == "alarm" and g[1]["id"] == first[1])
        assert hook_json["data"] == alarm
        assert verify("hook-secret", hook_body, hook_headers["X-GB28181-Signature"])
        assert abs(int(hook_headers["X-GB28181-Timestamp"]) - time.time()) < 30
        feed_ms, hook_ms, api_ms = ((t - sent_at) * 1000 for t in (first[0], hook_at, api_at))
        print(f"\nalarm (simulator AlarmTime) -> SSE {feed_ms:.1f} ms, webhook {hook_ms:.1f} ms, "
              f"GET /api/v1/alarms {api_ms:.1f} ms")
        assert max(feed_ms, hook_ms, api_ms) < 1000
        # the device got its Response (§9.4.2 step 3)
        await until(lambda: sim_counts(sim)["responses"] >= 3, 15, "Responses counted by the simulator",
                    sim.exited)
        status, metrics = await asyncio.to_thread(server.api, "/metrics")
        text = metrics.decode() if isinstance(metrics, bytes) else str(metrics)
        assert re.search(r'gb28181_webhook_deliveries_total\{result="delivered",url="[^"]+/hook"\} [1-9]', text)
        assert re.search(r'gb28181_alarm_responses_total\{result="sent"\} [1-9]', text)
        # a device going offline and coming back is on the feed and at the webhook
        await asyncio.to_thread(sim.stop)
        # The first device must be offline before it registers again (a device that is still
        # online when it re-registers has no online event to give).
        offline = await until(lambda: [e for e in feed.of("device.offline") if e[3]["device_id"] == DEV], 15,
                              "device.offline of the first device on the feed")
        await until(lambda: feed.of("channel.state") and any(e[3]["state"] == "OFF" for e in feed.of("channel.state")),
                    5, "channel OFF on the feed")
        await asyncio.to_thread(sims, server, "--devices", "1", "--keepalive-interval", "0.5")
        online = await until(lambda: [e for e in feed.of("device.online") if e[0] > offline[0][0]], 15,
                             "device.online on the feed")
        assert online[0][3]["device_id"] == DEV
        await until(lambda: [g for g in receiver.got if g[1]["type"] == "device.online"], 10,
                    "device.online at the webhook")
        assert not [g for g in receiver.got if g[1]["type"] == "channel.state"]  # not subscribed
        assert feed.comments >= 1  # keep-alive comments
        # Last-Event-ID resumes from the ring: what came after the first alarm, in order
        replay = Feed(server.base, last_id=first[1]).start()
        await until(lambda: len(replay.events) >= 3, 5, "the replay")
        assert [e[1] for e in replay.events[:3]] == [e[1] for e in feed.events if e[1] > first[1]][:3]
        await replay.stop()
        assert server.error_lines() == []
    finally:
        await feed.stop()
        await receiver.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_receiver_down_at_first_gets_the_alarm_when_it_comes_back(served, sims):
    port = free_port()
    hooks = json.dumps([{"url": f"http://127.0.0.1:{port}/hook", "secret": "s", "events": ["alarm"]}])
    server = await asyncio.to_thread(served, GB28181_EVENTS__WEBHOOKS=hooks, **FAST)
    feed = Feed(server.base).start()
    receiver = Receiver(port)
    try:
        sim = await asyncio.to_thread(sims, server, "--devices", "1", "--alarm-interval", "0.3")
        await until(lambda: feed.of("alarm"), 20, "an alarm", sim.exited)

        async def retried() -> bool:
            _, hooks_now = await api(server, "/api/v1/webhooks")
            return hooks_now["webhooks"][0]["retried"] >= 2

        deadline = time.monotonic() + 10
        while not await retried():
            assert time.monotonic() < deadline, "the webhook was never retried"
            await asyncio.sleep(0.1)
        missed = feed.of("alarm")[0]
        await receiver.start()
        got = await until(lambda: [g for g in receiver.got if g[1]["id"] == missed[1]], 10,
                          "the alarm raised while the receiver was down")
        assert got[0][1]["data"] == missed[3] and verify("s", got[0][2], got[0][3]["X-GB28181-Signature"])
        _, status = await api(server, "/api/v1/webhooks")
        assert status["webhooks"][0]["delivered"] >= 1 and status["webhooks"][0]["failed"] == 0
    finally:
        await feed.stop()
        await receiver.stop()


async def test_alarms_survive_a_crash_and_subscriptions_carry_alarms(served, sims, tmp_path):
    workdir = tmp_path / "crash"
    server = await asyncio.to_thread(served, workdir, **FAST)
    sim = await asyncio.to_thread(sims, server, "--devices", "2", "--alarm-interval", "0.3",
                                  "--keepalive-interval", "0.5", "--progress", "0.2")

    async def listing(srv, query: str = "") -> list[dict]:
        status, body = await api(srv, "/api/v1/alarms?limit=1000" + query)
        assert status == 200
        return body["alarms"]

    await until(lambda: sim_counts(sim)["responses"] >= 4, 20, "alarms answered", sim.exited)
    # an alarm subscription: matching alarms come as NOTIFYs in its dialog (§9.11.1)
    status, sub = await api(server, f"/api/v1/devices/{DEV}/alarm-subscription", "PUT",
                            {"start_priority": 1, "end_priority": 4, "expires": 60})
    assert status == 200 and sub["subscribed"] and sub["filter"]["StartAlarmPriority"] == 1
    notifies = sim_counts(sim)["notifies"]
    await until(lambda: sim_counts(sim)["notifies"] >= notifies + 3, 15, "alarm NOTIFYs")
    deadline = time.monotonic() + 10
    while True:
        _, state = await api(server, f"/api/v1/devices/{DEV}/alarm-subscription")
        if state["notifies"] >= 3:
            break
        assert time.monotonic() < deadline, f"NOTIFYs not received: {state}"
        await asyncio.sleep(0.1)
    status, _ = await api(server, f"/api/v1/devices/{DEV}/alarm-subscription", "DELETE")
    assert status == 200
    status, bad = await api(server, "/api/v1/alarms?priority=5")
    assert status == 400 and "priority" in bad["error"]
    status, bad = await api(server, "/api/v1/alarms?since=whenever")
    assert status == 400 and "24h" in bad["error"]
    top = await listing(server, "&priority=1-2")
    assert all(a["priority"] in (1, 2) for a in top)
    before = await listing(server)
    assert len(before) >= 6 and {a["device_id"] for a in before} == {DEV, "34020000001320000002"}
    assert before == sorted(before, key=lambda a: a["received_at"], reverse=True)
    await asyncio.to_thread(sim.stop)
    await asyncio.to_thread(server.kill)  # kill -9: what the API showed was on disk
    again = await asyncio.to_thread(served, workdir, **FAST)
    after = await listing(again)
    assert [a for a in after if a in before] == before
