"""The HTTP API against a real server on loopback, with simulated devices registering over SIP:
the token, paging and filters, device and password management, status history and metrics."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from gb28181.config import load_config
from gb28181.server import GbServer
from simulators.fleet import Fleet, FleetConfig

TOKEN = "test-token-123"
DEFAULT_PASSWORD = "12345678"


@pytest.fixture(autouse=True)
def _no_gb28181_env(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("GB28181_"):
            monkeypatch.delenv(name)


def make_config(tmp_path, **overrides):
    sections: dict[str, Any] = {
        "sip": {"host": "127.0.0.1", "port": 0},
        "http": {"host": "127.0.0.1", "port": 0},
        "api": {"token": TOKEN},
        "keepalive": {"interval": 0.5, "count": 3},
        "media": {"host": "127.0.0.1", "rtp_port": 0, "workers": 0},
    }
    for key, value in overrides.items():
        sections[key] = {**sections.get(key, {}), **value}
    return load_config(None, data_dir=str(tmp_path / "data"), **sections)


class Api:
    """A client for one server that keeps every response body it saw."""

    def __init__(self, session: aiohttp.ClientSession, server: GbServer) -> None:
        self.session = session
        self.server = server
        self.base = f"http://127.0.0.1:{server.http_port}"
        self.bodies: list[str] = []

    async def call(self, method: str, path: str, *, token: str | None = TOKEN,
                   headers: dict[str, str] | None = None, **kw) -> tuple[int, Any, Any]:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, self.base + path, headers=hdrs, **kw) as resp:
            text = await resp.text()
            self.bodies.append(text + "\n" + "\n".join(f"{k}: {v}" for k, v in resp.headers.items()))
            body: Any = text
            if resp.content_type == "application/json":
                body = json.loads(text)
            return resp.status, body, resp.headers

    async def get(self, path: str, **kw):
        return await self.call("GET", path, **kw)

    async def device(self, device_id: str) -> dict:
        status, body, _ = await self.get(f"/api/v1/devices/{device_id}")
        assert status == 200, body
        return body

    async def events(self, device_id: str) -> list[dict]:
        status, body, _ = await self.get(f"/api/v1/devices/{device_id}/events")
        assert status == 200, body
        assert body["device_id"] == device_id
        return body["events"]

    async def metrics(self) -> dict[tuple[str, tuple], float]:
        status, text, headers = await self.get("/metrics", token=None)
        assert status == 200, text
        assert headers["Content-Type"].startswith("text/plain")
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out


@pytest_asyncio.fixture
async def server(tmp_path):
    server = GbServer(make_config(tmp_path))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest_asyncio.fixture
async def api(server):
    async with aiohttp.ClientSession() as session:
        yield Api(session, server)


@pytest_asyncio.fixture
async def fleets():
    """``fleets(first_id=..., devices=..., ...)`` → a started Fleet, stopped at teardown."""
    started: list[Fleet] = []

    async def start(server: GbServer, **kw) -> Fleet:
        kw.setdefault("keepalive_interval", 0.5)
        kw.setdefault("retry_min", 0.2)
        kw.setdefault("register_rate", 2000)
        fleet = Fleet(FleetConfig(server_port=server.sip_port, **kw))
        await fleet.start()
        started.append(fleet)
        return fleet

    yield start
    for fleet in started:
        await fleet.stop()


async def until(predicate, timeout: float = 5.0, what: str = "condition"):
    """Poll ``predicate`` (sync or async) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def dev(serial: int, type_code: str = "132") -> str:
    return f"3402000000{type_code}0{serial:06d}"


# -- the token ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path", [
    ("GET", "/api/v1/devices"),
    ("POST", "/api/v1/devices"),
    ("GET", f"/api/v1/devices/{dev(1)}"),
    ("DELETE", f"/api/v1/devices/{dev(1)}"),
    ("PUT", f"/api/v1/devices/{dev(1)}/password"),
    ("GET", f"/api/v1/devices/{dev(1)}/events"),
])
async def test_api_routes_need_the_token(api, method, path):
    for token, headers, params in [
        (None, None, None),                                       # nothing
        ("wrong-token-456", None, None),                          # wrong bearer
        (TOKEN[:-1], None, None),                                 # a prefix of the right one
        (None, {"Authorization": f"Basic {TOKEN}"}, None),        # not a bearer
        (None, None, {"token": "wrong-token-456"}),               # wrong query token
        ("wrong-token-456", None, {"token": TOKEN}),              # a wrong header is not rescued
    ]:
        status, body, headers_in = await api.call(method, path, token=token, headers=headers,
                                                  params=params, json={"password": "x" * 8})
        assert status == 401, (token, headers, params, body)
        assert "Authorization: Bearer" in body["error"]          # says how to fix it
        assert "api-token" in body["error"] or "api.token" in body["error"]
        assert headers_in["WWW-Authenticate"].startswith("Bearer")
    # Nothing was created or deleted by the refused calls.
    assert api.server.registry.counts() == (0, 0)


async def test_token_accepted_as_bearer_or_query(api):
    assert (await api.get("/api/v1/devices"))[0] == 200
    assert (await api.get("/api/v1/devices", token=None,
                          headers={"Authorization": f"bearer {TOKEN}"}))[0] == 200
    status, body, _ = await api.get("/api/v1/devices", token=None, params={"token": TOKEN})
    assert status == 200 and body["total"] == 0


async def test_healthz_and_metrics_are_public(api):
    status, body, _ = await api.get("/healthz", token=None)
    assert status == 200
    assert body == {"status": "ok", "devices": 0, "online": 0,
                    "sip_address": "127.0.0.1", "media_address": "127.0.0.1"}
    status, text, _ = await api.get("/metrics", token=None)
    assert status == 200
    assert "gb28181_devices_online 0.0" in text


async def test_metrics_can_require_the_token(tmp_path):
    server = GbServer(make_config(tmp_path, api={"metrics_public": False}))
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(session, server)
            assert (await api.get("/metrics", token=None))[0] == 401
            assert (await api.get("/metrics"))[0] == 200
            assert (await api.get("/healthz", token=None))[0] == 200
    finally:
        await server.stop()


async def test_unknown_route_and_method_are_json_errors(api):
    status, body, _ = await api.get("/api/v1/nothing-here")
    assert status == 404 and "error" in body
    status, body, _ = await api.call("PATCH", "/api/v1/devices")
    assert status == 405 and "error" in body


# -- listing --------------------------------------------------------------------------------------

async def test_list_paging_and_status_filter(api, server, fleets):
    offline_ids = [dev(1000 + i) for i in range(12)]
    for device_id in offline_ids:
        status, body, _ = await api.call("POST", "/api/v1/devices", json={"device_id": device_id})
        assert status == 201, body
    nvr = dev(2000, "118")
    assert (await api.call("POST", "/api/v1/devices", json={"device_id": nvr}))[0] == 201
    fleet = await fleets(server, first_id=dev(1), devices=5)
    assert await fleet.wait_registered(10)
    online_ids = sorted(fleet.devices)
    await until(lambda: server.registry.counts() == (18, 5), what="5 devices online")
    all_ids = sorted(offline_ids + [nvr] + online_ids)

    seen: list[str] = []
    for offset in range(0, 20, 5):
        status, body, _ = await api.get("/api/v1/devices", params={"offset": offset, "limit": 5})
        assert status == 200
        assert (body["total"], body["offset"], body["limit"]) == (18, offset, 5)
        assert len(body["devices"]) == min(5, 18 - offset)
        seen += [d["device_id"] for d in body["devices"]]
    assert seen == all_ids                                       # sorted, no gaps, no repeats

    status, body, _ = await api.get("/api/v1/devices")
    assert (body["total"], body["offset"], body["limit"]) == (18, 0, 100)
    assert [d["device_id"] for d in body["devices"]] == all_ids

    status, body, _ = await api.get("/api/v1/devices", params={"status": "online"})
    assert body["total"] == 5
    assert [d["device_id"] for d in body["devices"]] == online_ids
    assert all(d["status"] == "online" and d["registered"] for d in body["devices"])
    assert all(d["host"] == "127.0.0.1" and d["port"] > 0 for d in body["devices"])

    status, body, _ = await api.get("/api/v1/devices", params={"status": "offline"})
    assert body["total"] == 13
    assert {d["device_id"] for d in body["devices"]} == set(offline_ids) | {nvr}
    assert all(d["status"] == "offline" for d in body["devices"])

    status, body, _ = await api.get("/api/v1/devices",
                                    params={"status": "offline", "offset": 10, "limit": 5})
    assert body["total"] == 13 and len(body["devices"]) == 3

    status, body, _ = await api.get("/api/v1/devices", params={"kind": "nvr"})
    assert body["total"] == 1 and body["devices"][0]["device_id"] == nvr

    status, body, _ = await api.get("/api/v1/devices", params={"offset": 100})
    assert status == 200 and body["total"] == 18 and body["devices"] == []

    status, body, _ = await api.get("/healthz", token=None)
    assert (body["status"], body["devices"], body["online"]) == ("ok", 18, 5)


@pytest.mark.parametrize("params, name", [
    ({"offset": "-1"}, "offset"),
    ({"offset": "abc"}, "offset"),
    ({"offset": "1.5"}, "offset"),
    ({"limit": "0"}, "limit"),
    ({"limit": "1001"}, "limit"),
    ({"limit": ""}, "limit"),
    ({"limit": "99999999999999999999"}, "limit"),
    ({"status": "maybe"}, "status"),
    ({"status": "ONLINE"}, "status"),
])
async def test_list_bad_params(api, params, name):
    status, body, headers = await api.get("/api/v1/devices", params=params)
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert name in body["error"]


# -- creating, reading, deleting ------------------------------------------------------------------

async def test_create_get_and_duplicate(api):
    device_id = dev(7)
    status, body, _ = await api.call("POST", "/api/v1/devices",
                                     json={"device_id": device_id, "name": "Gate 1"})
    assert status == 201
    assert body["device_id"] == device_id
    assert body["kind"] == "ipc"
    assert body["name"] == "Gate 1"
    assert body["status"] == "offline" and body["registered"] is False
    assert body["has_password"] is False
    assert await api.device(device_id) == body

    status, body, _ = await api.call("POST", "/api/v1/devices", json={"device_id": device_id})
    assert status == 409
    assert device_id in body["error"] and "password" in body["error"]

    status, body, _ = await api.get(f"/api/v1/devices/{dev(8)}")
    assert status == 404 and dev(8) in body["error"]


@pytest.mark.parametrize("device_id", [
    "3402000000132000001",            # 19 digits
    "340200000013200000011",          # 21 digits
    "3402000000132000000x",           # not all digits
    "３４０２０００００００１３２００００００１",  # full-width digits
    "",
])
async def test_create_bad_id(api, device_id):
    status, body, _ = await api.call("POST", "/api/v1/devices", json={"device_id": device_id})
    assert status == 400
    assert "20" in body["error"] and "digits" in body["error"]
    assert api.server.registry.counts() == (0, 0)


@pytest.mark.parametrize("kw, expect", [
    ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, "not valid JSON"),
    ({"data": b""}, "not valid JSON"),
    ({"data": b"\xff\xfe\x00{"}, "not valid JSON"),
    ({"json": {"device_id": dev(9), "pasword": "secret-1"}}, "pasword"),
    ({"json": {}}, "device_id"),
    ({"json": {"device_id": 34020000001320000009}}, "device_id"),
    ({"json": [dev(9)]}, "invalid body"),
    ({"json": {"device_id": dev(9), "password": ""}}, "password"),
    ({"json": {"device_id": dev(9), "password": "x" * 65}}, "password"),
    ({"json": {"device_id": dev(9), "name": "n" * 129}}, "name"),
])
async def test_create_bad_body(api, kw, expect):
    status, body, headers = await api.call("POST", "/api/v1/devices", **kw)
    assert status == 400, body
    assert headers["Content-Type"].startswith("application/json")
    assert expect in body["error"]
    assert api.server.registry.counts() == (0, 0)


async def test_password_put_bad_bodies(api):
    path = f"/api/v1/devices/{dev(3)}/password"
    for kw in ({"json": {}}, {"json": {"password": ""}}, {"json": {"password": "p" * 65}},
               {"json": {"password": "good-pass", "extra": 1}}, {"data": b"nope"}):
        status, body, _ = await api.call("PUT", path, **kw)
        assert status == 400 and "error" in body, kw
    status, body, _ = await api.call("PUT", "/api/v1/devices/12345/password",
                                     json={"password": "good-pass"})
    assert status == 400 and "20 digits" in body["error"]
    assert api.server.registry.counts() == (0, 0)


async def test_delete(api, server, fleets):
    keep, gone = dev(21), dev(22)
    for device_id in (keep, gone):
        assert (await api.call("POST", "/api/v1/devices", json={"device_id": device_id}))[0] == 201
    status, body, _ = await api.call("DELETE", f"/api/v1/devices/{gone}")
    assert status == 200 and body == {"deleted": gone}
    assert (await api.get(f"/api/v1/devices/{gone}"))[0] == 404
    assert (await api.get(f"/api/v1/devices/{gone}/events"))[0] == 404
    status, body, _ = await api.call("DELETE", f"/api/v1/devices/{gone}")
    assert status == 404 and gone in body["error"]
    status, body, _ = await api.get("/api/v1/devices")
    assert [d["device_id"] for d in body["devices"]] == [keep]

    # Deleting an online device takes it offline at once; the device, refused on its next
    # keepalive, registers again (unknown devices are admitted by default).
    fleet = await fleets(server, first_id=dev(30), devices=1)
    assert await fleet.wait_registered(10)
    online = dev(30)
    await until(lambda: server.registry.counts()[1] == 1, what="device online")
    assert (await api.call("DELETE", f"/api/v1/devices/{online}"))[0] == 200
    assert server.registry.counts() == (1, 0)
    status, body, _ = await api.get("/api/v1/devices", params={"status": "online"})
    assert body["total"] == 0

    async def back() -> bool:
        status, body, _ = await api.get(f"/api/v1/devices/{online}")
        return status == 200 and body["status"] == "online"
    await until(back, what="the deleted device to register again")
    # History is kept by ID: the removal shows in it.
    events = await api.events(online)
    assert [(e["status"], e["reason"]) for e in reversed(events)] == [
        ("online", "register"), ("offline", "removed"), ("online", "register")]


# -- passwords -------------------------------------------------------------------------------------

async def test_per_device_password(api, server, fleets):
    dev_a, dev_b = dev(101), dev(201)
    secrets = ["pw-A-secret", "pw-B-secret", "pw-B-renewed"]

    # PUT on an unknown ID creates the device with its password ...
    status, body, _ = await api.call("PUT", f"/api/v1/devices/{dev_a}/password",
                                     json={"password": secrets[0]})
    assert status == 201 and body["device_id"] == dev_a and body["has_password"] is True
    # ... POST can set one too.
    status, body, _ = await api.call("POST", "/api/v1/devices",
                                     json={"device_id": dev_b, "password": secrets[1], "name": "B"})
    assert status == 201 and body["has_password"] is True

    # A device that knows its own password registers.
    fleet_a = await fleets(server, first_id=dev_a, devices=1, passwords={dev_a: secrets[0]})
    assert await fleet_a.wait_registered(10)
    # One that only knows the default password is refused for that ID.
    fleet_b = await fleets(server, first_id=dev_b, devices=1, retry_min=30)   # one try only
    sim_b = fleet_b.devices[dev_b]
    await until(lambda: sim_b.stats.register_failures >= 1, what="B's registration to fail")
    await fleet_b.stop()
    assert not sim_b.registered and sim_b.stats.registrations == 0
    assert "403" in sim_b.last_error and "password" in sim_b.last_error
    a, b = await api.device(dev_a), await api.device(dev_b)
    assert a["status"] == "online" and a["registered"] is True and a["has_password"] is True
    assert b["status"] == "offline" and b["registered"] is False and b["has_password"] is True
    metrics = await api.metrics()
    assert metrics[("gb28181_register_requests_total", (("result", "rejected:wrong-password"),))] \
        == sim_b.stats.register_failures
    assert metrics[("gb28181_auth_failures_total", (("reason", "wrong-password"),))] \
        == sim_b.stats.register_failures

    # A new password takes effect at once; the old one no longer works.
    status, body, _ = await api.call("PUT", f"/api/v1/devices/{dev_b}/password",
                                     json={"password": secrets[2]})
    assert status == 200 and body["has_password"] is True
    fleet_b2 = await fleets(server, first_id=dev_b, devices=1, passwords={dev_b: secrets[2]})
    assert await fleet_b2.wait_registered(10)
    assert (await api.device(dev_b))["status"] == "online"

    # Whatever we asked, no password ever came back.
    await api.get("/api/v1/devices")
    await api.get("/api/v1/devices", params={"status": "online"})
    await api.events(dev_a)
    await api.events(dev_b)
    await api.get("/healthz", token=None)
    await api.get("/metrics", token=None)
    await api.call("POST", "/api/v1/devices", json={"device_id": dev_a, "password": secrets[0]})
    await api.call("DELETE", f"/api/v1/devices/{dev_a}")
    assert len(api.bodies) > 10
    for text in api.bodies:
        for secret in secrets + [DEFAULT_PASSWORD]:
            assert secret not in text
        assert '"password"' not in text


# -- history and metrics ---------------------------------------------------------------------------

async def test_events_follow_online_offline_online(api, server, fleets):
    fleet = await fleets(server, first_id=dev(301), devices=1)
    device_id = dev(301)
    assert await fleet.wait_registered(10)
    events = await api.events(device_id)
    assert [(e["status"], e["reason"]) for e in reversed(events)] == [("online", "register")]

    # A link outage: keepalives stop, and interval × count later the device is offline.
    fleet.pause()
    paused_at = time.time()

    async def status() -> str:
        return (await api.device(device_id))["status"]
    await until(lambda: _is(status(), "offline"), timeout=6, what="keepalive timeout")
    assert time.time() - paused_at >= 0.5 * 3 - 0.6     # not before the last keepalive's deadline
    events = await api.events(device_id)
    assert [(e["status"], e["reason"]) for e in reversed(events)] == [
        ("online", "register"), ("offline", "keepalive-timeout")]
    assert events[1]["at"] <= events[0]["at"]  # newest first
    device = await api.device(device_id)
    assert device["status_changed_at"] == events[0]["at"]
    assert device["registered"] is True       # the registration itself has not run out

    # The link comes back: the next keepalive brings it online without a new REGISTER.
    registrations = fleet.devices[device_id].stats.registrations
    fleet.resume()
    await until(lambda: _is(status(), "online"), timeout=5, what="back online")
    events = await api.events(device_id)
    assert [(e["status"], e["reason"]) for e in reversed(events)] == [
        ("online", "register"), ("offline", "keepalive-timeout"), ("online", "keepalive")]
    assert fleet.devices[device_id].stats.registrations == registrations

    status_code, body, _ = await api.get(f"/api/v1/devices/{device_id}/events",
                                         params={"limit": "0"})
    assert status_code == 400 and "limit" in body["error"]
    status_code, body, _ = await api.get(f"/api/v1/devices/{device_id}/events",
                                         params={"limit": "2"})
    assert status_code == 200 and len(body["events"]) == 2


async def test_registration_expiry_shows_as_expired(tmp_path, fleets):
    # Short registrations and a long keepalive timeout, so the registration runs out first.
    server = GbServer(make_config(tmp_path, registration={"min_expires": 1},
                                  keepalive={"interval": 0.5, "count": 20}))
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(session, server)
            fleet = await fleets(server, first_id=dev(601), devices=1, expires=1)
            assert await fleet.wait_registered(10)
            device = await api.device(dev(601))
            assert device["status"] == "online" and device["registered"] is True
            assert device["expires"] == 1
            fleet.pause()                     # no refresh: the registration runs out

            async def offline():
                d = await api.device(dev(601))
                return d["status"] == "offline" and d
            device = await until(offline, timeout=5, what="registration expiry")
            assert device["registered"] is False
            assert device["status_changed_at"] == device["expires_at"]
            events = await api.events(dev(601))
            assert (events[0]["status"], events[0]["reason"]) == ("offline", "expired")
            await fleet.stop()
    finally:
        await server.stop()


async def _is(value_coro, want) -> bool:
    return (await value_coro) == want


async def test_metrics_match_what_happened(api, server, fleets):
    def value(metrics, name, **labels) -> float:
        return metrics.get((name, tuple(sorted(labels.items()))), 0.0)

    metrics = await api.metrics()
    assert value(metrics, "gb28181_devices_online") == 0
    assert value(metrics, "gb28181_register_requests_total", result="ok") == 0

    fleet = await fleets(server, first_id=dev(401), devices=4)
    assert await fleet.wait_registered(10)
    await until(lambda: server.registry.counts() == (4, 4), what="4 online")
    await until(lambda: sum(d.stats.keepalives_ok for d in fleet.devices.values()) >= 4,
                what="some keepalives")
    metrics = await api.metrics()
    assert value(metrics, "gb28181_devices_online") == 4
    assert value(metrics, "gb28181_devices_registered") == 4
    assert value(metrics, "gb28181_register_requests_total", result="ok") == 4
    assert value(metrics, "gb28181_register_requests_total", result="challenged") == 4
    assert value(metrics, "gb28181_keepalives_total", result="ok") >= 4
    assert value(metrics, "gb28181_sip_messages_total", direction="in") >= 8 + 4

    # They all go quiet: interval x count later they are offline.
    await fleet.stop()
    keepalives_sent = sum(d.stats.keepalives_sent for d in fleet.devices.values())
    await until(lambda: server.registry.counts() == (4, 0), timeout=6, what="all offline")
    metrics = await api.metrics()
    assert value(metrics, "gb28181_devices_online") == 0
    assert value(metrics, "gb28181_devices_registered") == 4
    assert value(metrics, "gb28181_register_requests_total", result="ok") == 4
    assert 4 <= value(metrics, "gb28181_keepalives_total", result="ok") <= keepalives_sent
    assert value(metrics, "gb28181_register_requests_total", result="rejected:wrong-password") == 0

    # A wrong password is counted as such.
    bad = await fleets(server, first_id=dev(501), devices=1, password="not-the-password",
                       retry_min=30)
    await until(lambda: bad.devices[dev(501)].stats.register_failures >= 1, what="a refusal")
    await bad.stop()
    failures = bad.devices[dev(501)].stats.register_failures
    metrics = await api.metrics()
    assert value(metrics, "gb28181_register_requests_total",
                 result="rejected:wrong-password") == failures
    assert value(metrics, "gb28181_register_requests_total", result="ok") == 4
    assert value(metrics, "gb28181_devices_registered") == 4    # a refused ID is not added
