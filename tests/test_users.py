"""User accounts against a real server on loopback: roles, scopes, console sessions, per-user
tokens, lockout, the audit log naming the user, and accounts surviving a restart."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from gb28181.server import GbServer
from gb28181.users import LockedOut, UserError, needed_role
from registry.models import Channel, Device
from simulators.fleet import Fleet, FleetConfig

from .conftest import TOKEN, wait_for

IPC = "34020000001320000001"          # the simulator's camera, civil code 3402...
OUTSIDE = "44010000001310000001"      # a camera in Guangzhou (4401), outside the viewer's scope
GROUP = "34020000002150000001"        # a business group (type 215)
GROUPED = "45010000001310000009"      # a camera in Nanning, but in GROUP
PASSWORD = "correct horse battery"


class Client:
    """One HTTP client with its own cookie jar (a browser) and optional bearer token."""

    def __init__(self, server: GbServer, token: str | None = None) -> None:
        self.base = f"http://127.0.0.1:{server.http_port}"
        self.token = token
        # unsafe: the jar keeps cookies of an IP address host (127.0.0.1) too
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def call(self, method: str, path: str, json: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with self.session.request(method, self.base + path, json=json, headers=headers) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body

    async def close(self) -> None:
        await self.session.close()


@pytest_asyncio.fixture
async def clients():
    made: list[Client] = []

    def factory(server: GbServer, token: str | None = None) -> Client:
        made.append(Client(server, token))
        return made[-1]

    yield factory
    for c in made:
        await c.close()


def add_channels(server: GbServer) -> None:
    """Catalog items as a device's catalog would bring them, without the device."""
    server.channels.upsert(Channel(OUTSIDE, "44010000001110000001", name="Guangzhou gate",
                                   civil_code="440100"))
    server.channels.upsert(Channel(GROUPED, "45010000001110000001", name="Nanning depot",
                                   civil_code="450100", business_group_id=GROUP))


async def make_user(admin: Client, name: str, role: str, **scopes: list[str]) -> dict:
    status, body = await admin.call("POST", "/api/v1/users", {
        "name": name, "password": PASSWORD, "role": role, "scopes": scopes})
    assert status == 201, body
    assert "password" not in body and "password_hash" not in body
    return body


async def login(c: Client, name: str, password: str = PASSWORD) -> tuple[int, Any]:
    return await c.call("POST", "/api/v1/session", {"username": name, "password": password})


def test_rule_table():
    assert needed_role("GET", "/api/v1/channels") == "viewer"
    assert needed_role("POST", "/api/v1/channels/1/play") == "viewer"
    assert needed_role("POST", "/api/v1/channels/1/playback") == "viewer"
    assert needed_role("POST", "/api/v1/channels/1/whep") == "viewer"
    assert needed_role("DELETE", "/api/v1/whep/abc") == "viewer"
    assert needed_role("POST", "/api/v1/channels/1/ptz") == "operator"
    assert needed_role("PUT", "/api/v1/devices/1/config/basic") == "operator"
    assert needed_role("DELETE", "/api/v1/streams/1") == "operator"
    assert needed_role("GET", "/api/v1/downloads/1/file") == "operator"
    assert needed_role("PATCH", "/api/v1/devices/1") == "admin"
    assert needed_role("PUT", "/api/v1/devices/1/password") == "admin"
    assert needed_role("GET", "/api/v1/users") == "admin"
    assert needed_role("GET", "/api/v1/audit") == "admin"
    assert needed_role("POST", "/api/v1/new-thing") == "admin"  # unknown: closed


async def test_viewer_plays_in_scope_only_and_is_audited_by_name(make_server, clients):
    server = await make_server()
    fleet = Fleet(FleetConfig(server_port=server.sip_port, devices=1, first_id=IPC,
                              keepalive_interval=1.0, retry_min=0.3, register_rate=2000,
                              video_size="320x240", fps=25, gop=25))
    await fleet.start()
    try:
        assert await fleet.wait_registered(10), fleet.summary()
        await wait_for(lambda: len(server.channels.of_device(IPC)) == 1, 10, what="the IPC's channel")
        cid = server.channels.of_device(IPC)[0].channel_id
        add_channels(server)
        admin = clients(server, TOKEN)
        await make_user(admin, "vera", "viewer", civil_codes=["3402"])
        viewer = clients(server)
        status, body = await login(viewer, "vera")
        assert status == 200 and body["user"]["role"] == "viewer", body

        status, body = await viewer.call("GET", "/api/v1/session")
        assert status == 200 and body["name"] == "vera" and body["via"] == "session", body
        status, body = await viewer.call("GET", "/api/v1/channels")
        assert status == 200, body
        assert {c["channel_id"] for c in body["channels"]} == {cid} and body["total"] == 1
        status, body = await viewer.call("GET", f"/api/v1/devices/{IPC}/channels")
        assert status == 200 and [c["channel_id"] for c in body["channels"]] == [cid]
        status, body = await viewer.call("GET", "/api/v1/tree")
        assert status == 200 and body["tree"]["channels"] == 1, body
        status, body = await admin.call("GET", "/api/v1/channels")
        assert body["total"] == 3  # the admin sees everything

        # out of scope: as if unknown
        for method, path in (("GET", f"/api/v1/channels/{OUTSIDE}"),
                             ("POST", f"/api/v1/channels/{OUTSIDE}/play"),
                             ("GET", f"/api/v1/channels/{OUTSIDE}/records"),
                             ("GET", f"/live/{OUTSIDE}.flv")):
            status, body = await viewer.call(method, path)
            assert status == 404 and OUTSIDE in body["error"], (method, path, body)

        # devices: only those with a channel in scope, or of an area in scope by their own ID
        server.registry.add(Device(device_id="44010000001110000001", kind="dvr"))
        status, body = await viewer.call("GET", "/api/v1/devices")
        assert status == 200 and [d["device_id"] for d in body["devices"]] == [IPC], body
        status, body = await admin.call("GET", "/api/v1/devices")
        assert {d["device_id"] for d in body["devices"]} == {IPC, "44010000001110000001"}, body
        status, body = await viewer.call("GET", "/api/v1/devices/44010000001110000001")
        assert status == 404 and "no device" in body["error"], body

        # watching is allowed; control and changes are not
        status, body = await viewer.call("POST", f"/api/v1/channels/{cid}/play", {"transport": "udp"})
        assert status == 200, body
        status, body = await viewer.call("GET", "/api/v1/streams")
        assert status == 200 and [s["channel_id"] for s in body["streams"]] == [cid], body
        status, body = await viewer.call("POST", f"/api/v1/channels/{cid}/ptz", {"command": "left"})
        assert status == 403 and "operator" in body["error"], body
        status, body = await viewer.call("PATCH", f"/api/v1/devices/{IPC}", {"name": "x"})
        assert status == 403 and "admin" in body["error"], body
        status, body = await viewer.call("DELETE", f"/api/v1/streams/{cid}")
        assert status == 403
        status, body = await viewer.call("GET", "/api/v1/audit")
        assert status == 403

        status, body = await admin.call("GET", "/api/v1/audit")
        plays = [e for e in body["entries"] if e["action"] == "play" and e["target"] == cid]
        assert plays and plays[0]["who"] == "vera", body["entries"]
        assert '"who": "vera"' in (server.config.data_dir / "audit.log").read_text()
    finally:
        await fleet.stop()


async def test_business_group_scope(make_server, clients):
    server = await make_server()
    add_channels(server)
    admin = clients(server, TOKEN)
    await make_user(admin, "gus", "viewer", business_groups=[GROUP])
    status, body = await admin.call("POST", "/api/v1/users/gus/tokens", {"label": "wall"})
    assert status == 201
    gus = clients(server, body["token"])
    status, body = await gus.call("GET", "/api/v1/channels")
    assert [c["channel_id"] for c in body["channels"]] == [GROUPED]
    status, _ = await gus.call("GET", f"/api/v1/channels/{GROUPED}")
    assert status == 200
    status, _ = await gus.call("GET", f"/api/v1/channels/{OUTSIDE}")
    assert status == 404
    status, body = await admin.call("POST", "/api/v1/users", {
        "name": "bad", "password": PASSWORD, "role": "viewer",
        "scopes": {"business_groups": ["44010000001310000001"]}})
    assert status == 400 and "215" in body["error"], body


async def test_operator_controls_but_does_not_administer(make_server, clients):
    server = await make_server()
    add_channels(server)
    admin = clients(server, TOKEN)
    await make_user(admin, "olga", "operator")
    status, body = await admin.call("POST", "/api/v1/users/olga/tokens", {"label": "script"})
    assert status == 201 and body["token"].startswith("gbu_") and body["id"], body
    olga = clients(server, body["token"])
    # PTZ passes authorisation and reaches the device (gone: 409/404, never 401/403)
    status, body = await olga.call("POST", f"/api/v1/channels/{OUTSIDE}/ptz", {"command": "left"})
    assert status not in (401, 403), body
    status, body = await olga.call("POST", "/api/v1/users", {"name": "x", "password": PASSWORD,
                                                              "role": "admin"})
    assert status == 403 and "admin" in body["error"], body
    status, body = await olga.call("GET", "/api/v1/users")
    assert status == 403


async def test_tokens_revoke_and_are_never_shown_again(make_server, clients):
    server = await make_server()
    admin = clients(server, TOKEN)
    await make_user(admin, "tom", "viewer")
    status, body = await admin.call("POST", "/api/v1/users/tom/tokens", {"label": "kiosk"})
    token, token_id = body["token"], body["id"]
    tom = clients(server, token)
    assert (await tom.call("GET", "/api/v1/session"))[1]["name"] == "tom"
    status, body = await admin.call("GET", "/api/v1/users/tom")
    assert body["tokens"] == [{"id": token_id, "label": "kiosk", "created_at": body["tokens"][0]["created_at"]}]
    assert token not in str(body)
    status, body = await admin.call("DELETE", f"/api/v1/users/tom/tokens/{token_id}")
    assert status == 200
    status, body = await tom.call("GET", "/api/v1/channels")
    assert status == 401, body
    status, body = await admin.call("DELETE", f"/api/v1/users/tom/tokens/{token_id}")
    assert status == 404
    status, body = await admin.call("GET", "/api/v1/audit")
    actions = {(e["action"], e["who"]) for e in body["entries"]}
    assert {("user-create", "api-token"), ("token-create", "api-token"),
            ("token-revoke", "api-token")} <= actions


async def test_login_logout_wrong_password_and_lockout(make_server, clients):
    server = await make_server()
    admin = clients(server, TOKEN)
    await make_user(admin, "lena", "viewer")
    browser = clients(server)
    status, body = await browser.call("GET", "/api/v1/channels")
    assert status == 401
    status, body = await login(browser, "lena", "wrong password")
    assert status == 401 and body["error"] == "wrong user name or password"
    status, body = await login(browser, "nobody", "wrong password")
    assert status == 401 and body["error"] == "wrong user name or password"  # no hint which
    status, body = await login(browser, "lena")
    assert status == 200
    assert (await browser.call("GET", "/api/v1/channels"))[0] == 200
    status, body = await browser.call("DELETE", "/api/v1/session")
    assert status == 200 and body["ended"]
    assert (await browser.call("GET", "/api/v1/channels"))[0] == 401

    # 5 wrong passwords within 5 minutes lock the name out at this address (1 so far, and a
    # success clears the count)
    for _ in range(4):
        status, body = await login(browser, "lena", "wrong password")
        assert status == 401
    status, body = await login(browser, "lena", "wrong password")
    assert status == 429 and 590 <= body["retry_after"] <= 600, body
    status, body = await login(browser, "lena")  # even the right password, while locked
    assert status == 429 and "try again in" in body["error"]
    # another source is not locked out
    user = await server.users.authenticate("lena", PASSWORD, "192.0.2.7")
    assert user.name == "lena"
    with pytest.raises(LockedOut):
        await server.users.authenticate("lena", PASSWORD, "127.0.0.1")
    with pytest.raises(UserError):
        await server.users.authenticate("lena", "nope", "192.0.2.7")


async def test_disabled_user_is_refused(make_server, clients):
    server = await make_server()
    admin = clients(server, TOKEN)
    await make_user(admin, "dan", "operator")
    browser = clients(server)
    assert (await login(browser, "dan"))[0] == 200
    _, body = await admin.call("POST", "/api/v1/users/dan/tokens", {})
    by_token = clients(server, body["token"])
    status, body = await admin.call("PATCH", "/api/v1/users/dan", {"disabled": True})
    assert status == 200 and body["disabled"]
    status, body = await browser.call("GET", "/api/v1/channels")
    assert status == 401  # the session ended with the account
    status, body = await by_token.call("GET", "/api/v1/channels")
    assert status == 403 and "disabled" in body["error"]
    status, body = await login(browser, "dan")
    assert status == 403 and "disabled" in body["error"]
    status, body = await admin.call("PATCH", "/api/v1/users/dan", {"disabled": False, "role": "viewer"})
    assert status == 200 and body["role"] == "viewer"
    assert (await login(browser, "dan"))[0] == 200


async def test_users_survive_a_restart_and_the_api_token_stays_admin(make_server, clients):
    server = await make_server()
    admin = clients(server, TOKEN)
    await make_user(admin, "rita", "operator", civil_codes=["3402"])
    _, body = await admin.call("POST", "/api/v1/users/rita/tokens", {"label": "cron"})
    token = body["token"]
    status, body = await admin.call("PATCH", "/api/v1/users/rita", {"password": "a new password"})
    assert status == 200
    await server.stop()

    server = await make_server()
    admin = clients(server, TOKEN)
    status, body = await admin.call("GET", "/api/v1/users")
    assert status == 200
    (rita,) = body["users"]
    assert rita["role"] == "operator" and rita["scopes"]["civil_codes"] == ["3402"]
    assert [t["label"] for t in rita["tokens"]] == ["cron"]
    status, body = await clients(server, token).call("GET", "/api/v1/session")
    assert status == 200 and body["name"] == "rita" and body["role"] == "operator"
    browser = clients(server)
    assert (await login(browser, "rita"))[0] == 401
    assert (await login(browser, "rita", "a new password"))[0] == 200
    status, body = await admin.call("DELETE", "/api/v1/users/rita")
    assert status == 200
    assert (await browser.call("GET", "/api/v1/channels"))[0] == 401
    assert (await admin.call("GET", "/api/v1/users/rita"))[0] == 404


async def test_bad_bodies_and_reserved_names(make_server, clients):
    server = await make_server()
    admin = clients(server, TOKEN)
    for body, text in (({"name": "a b", "password": PASSWORD, "role": "viewer"}, "name"),
                       ({"name": "ok", "password": "short", "role": "viewer"}, "password"),
                       ({"name": "ok", "password": PASSWORD, "role": "root"}, "role"),
                       ({"name": "ok", "password": PASSWORD, "role": "viewer", "extra": 1}, "extra"),
                       ({"name": "api-token", "password": PASSWORD, "role": "viewer"}, "reserved")):
        status, out = await admin.call("POST", "/api/v1/users", body)
        assert status == 400 and text in out["error"], (body, out)
    await make_user(admin, "dup", "viewer")
    status, out = await admin.call("POST", "/api/v1/users", {"name": "dup", "password": PASSWORD,
                                                            "role": "viewer"})
    assert status == 409
    status, out = await admin.call("GET", "/api/v1/users")
    assert status == 200 and all("password_hash" not in u for u in out["users"])


def test_a_scoped_event_feed_sees_only_its_area():
    from gb28181.config import EventsSection
    from gb28181.events import EventBus
    bus = EventBus(EventsSection())
    inside = {"channel_id": "34020000001310000001", "device_id": "34020000001110000001"}
    outside = {"channel_id": "44010000001310000001", "device_id": "44010000001110000001"}
    first = bus.publish("alarm", inside)
    bus.publish("alarm", outside)
    client, replay, _ = bus.attach(first.id - 1, None, lambda e: e.data["channel_id"].startswith("3402"))
    assert [e.data for e in replay] == [inside]
    bus.publish("alarm", outside)
    bus.publish("alarm", inside)
    assert [e.data for e in client.queue] == [inside]
