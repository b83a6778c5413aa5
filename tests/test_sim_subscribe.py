"""Catalog subscriptions on the simulator (§9.11, Annex P, RFC 3265): the 200, in-dialog NOTIFYs
for every channel change (sent one at a time), refresh, unsubscribe, expiry and 481s."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from gb28181 import manscdp
from gb28181.sip.message import new_tag, parse_name_addr
from simulators.probe import Probe, start_fleet

NVR = "34020000001180000001"


@pytest_asyncio.fixture
async def probe():
    p = await Probe().start()
    yield p
    await p.close()


@pytest_asyncio.fixture
async def fleet(probe):
    f = await start_fleet(probe, channels=8)
    yield f
    await f.stop()


def notify_items(rec) -> list[dict]:
    assert rec.body is not None and rec.body.root == "Notify" and rec.body.cmd_type == "Catalog"
    assert rec.body.device_id == NVR
    items = rec.body.items()
    assert rec.body.text("SumNum") == str(len(items))
    assert rec.body.element.find("DeviceList").get("Num") == str(len(items))
    return items


async def test_subscribe_is_answered_with_expires_and_a_result_body(probe, fleet):
    dialog = await probe.subscribe(NVR, expires=600, event_id=7, sn=4242)
    resp = dialog.response
    assert resp.status == 200 and resp.to_tag
    assert resp.get("expires") == "600"
    assert resp.content_type == "application/manscdp+xml"
    body = manscdp.parse(resp.body)
    assert (body.root, body.cmd_type, body.sn, body.device_id) == ("Response", "Catalog", 4242, NVR)
    assert body.text("Result") == "OK"
    (sub,) = fleet.devices[NVR].subscriptions.values()
    assert sub.call_id == dialog.call_id and sub.local_tag == resp.to_tag
    assert sub.dialog.remote_tag == dialog.local_tag and sub.event == "Catalog;id=7"
    assert sub.dialog.remote_target == f"sip:{probe.server_id}@127.0.0.1:{probe.port}"
    assert sub.addr == ("127.0.0.1", probe.port) and sub.expires == 600 and sub.dialog.local_cseq == 0


async def test_status_changes_arrive_as_in_dialog_notifies(probe, fleet):
    dialog = await probe.subscribe(NVR, event_id=3)
    cid = fleet.devices[NVR].channels[2].channel_id
    for n, status in enumerate(["OFF", "VLOST", "DEFECT", "ON"], 1):
        fleet.set_channel_status(cid, status)
        await probe.wait_for(lambda n=n: len(dialog.notifies) == n, 2, f"NOTIFY {status}")
        rec = dialog.notifies[-1]
        req = rec.request
        assert req.uri == f"sip:{probe.server_id}@127.0.0.1:{probe.port}", "sent to our Contact"
        assert req.call_id == dialog.call_id
        assert req.from_tag == dialog.remote_tag and req.to_tag == dialog.local_tag
        assert parse_name_addr(req.headers["from"][0]).uri == f"sip:{NVR}@{probe.domain}"
        assert req.cseq == (n, "NOTIFY")
        assert req.get("event") == "Catalog;id=3"
        state, _, expires = req.get("subscription-state").partition(";expires=")
        assert state == "active" and 590 <= int(expires) <= 600
        assert notify_items(rec) == [{"DeviceID": cid, "Event": status}]
    sub = fleet.devices[NVR].subscriptions[dialog.call_id]
    await probe.wait_for(lambda: sub.notifies_sent == 4, 2, "the 200s counted")


async def test_add_update_and_del_carry_the_right_fields(probe, fleet):
    dialog = await probe.subscribe(NVR)
    added = fleet.add_channel(NVR)
    await probe.wait_for(lambda: len(dialog.notifies) == 1, 2, "ADD")
    (item,) = notify_items(dialog.notifies[0])
    assert item["Event"] == "ADD" and item["DeviceID"] == added.channel_id
    assert item["Name"] == added.name and item["ParentID"] == NVR and item["Status"] == "ON"
    assert item["CivilCode"] == added.civil_code and "PTZType" in item["Info"]

    fleet.update_channel(added.channel_id, name="新名称 01", longitude=None, latitude=None)
    await probe.wait_for(lambda: len(dialog.notifies) == 2, 2, "UPDATE")
    (item,) = notify_items(dialog.notifies[1])
    assert item["Event"] == "UPDATE" and item["Name"] == "新名称 01" and "Longitude" not in item
    with pytest.raises(AttributeError):
        fleet.update_channel(added.channel_id, colour="red")

    fleet.remove_channel(added.channel_id)
    await probe.wait_for(lambda: len(dialog.notifies) == 3, 2, "DEL")
    assert notify_items(dialog.notifies[2]) == [{"DeviceID": added.channel_id, "Event": "DEL"}]
    assert fleet.channel(added.channel_id) is None


async def test_notifies_of_one_subscription_wait_for_each_200(probe, fleet):
    probe.answer_delay = 0.03
    dialog = await probe.subscribe(NVR)
    channels = [ch.channel_id for ch in fleet.devices[NVR].channels[:5]]
    for cid in channels:  # five changes at once
        fleet.set_channel_status(cid, "OFF")
    await probe.wait_for(lambda: len(dialog.notifies) == 5, 3, "5 NOTIFYs")
    recs = dialog.notifies
    assert [r.request.cseq[0] for r in recs] == [1, 2, 3, 4, 5]
    assert [notify_items(r)[0]["DeviceID"] for r in recs] == channels
    for prev, nxt in zip(recs, recs[1:]):
        assert nxt.at >= prev.answered_at


async def test_every_live_subscription_hears_a_change_and_presence_is_accepted(probe, fleet):
    a = await probe.subscribe(NVR, event_id=1)
    b = await probe.subscribe(NVR, event="presence")
    assert b.response.status == 200
    cid = fleet.devices[NVR].channels[0].channel_id
    fleet.set_channel_status(cid, "OFF")
    await probe.wait_for(lambda: a.notifies and b.notifies, 2, "both NOTIFYs")
    assert a.notifies[0].request.get("event") == "Catalog;id=1"
    assert b.notifies[0].request.get("event") == "presence"
    assert notify_items(b.notifies[0]) == [{"DeviceID": cid, "Event": "OFF"}]


async def test_refresh_then_unsubscribe_ends_with_a_terminated_notify(probe, fleet):
    dialog = await probe.subscribe(NVR, expires=600)
    resp = await probe.resubscribe(dialog, 120)
    assert resp.status == 200 and resp.get("expires") == "120" and resp.to_tag == dialog.remote_tag
    sub = fleet.devices[NVR].subscriptions[dialog.call_id]
    assert sub.expires == 120 and sub.dialog.remote_cseq == 2
    cid = fleet.devices[NVR].channels[1].channel_id
    fleet.set_channel_status(cid, "OFF")
    await probe.wait_for(lambda: len(dialog.notifies) == 1, 2, "NOTIFY after refresh")
    assert 110 <= int(dialog.notifies[0].request.get("subscription-state").split("expires=")[1]) <= 120

    resp = await probe.resubscribe(dialog, 0)
    assert resp.status == 200 and resp.get("expires") == "0"
    await probe.wait_for(lambda: len(dialog.notifies) == 2, 2, "final NOTIFY")
    final = dialog.notifies[1].request
    assert final.get("subscription-state").startswith("terminated")
    assert final.cseq == (2, "NOTIFY") and final.get("event") == dialog.event
    assert dialog.call_id not in fleet.devices[NVR].subscriptions
    fleet.set_channel_status(cid, "ON")
    await asyncio.sleep(0.2)
    assert len(dialog.notifies) == 2, "nothing after the subscription ended"
    assert (await probe.resubscribe(dialog, 600)).status == 481


async def test_an_unrefreshed_subscription_lapses_silently(probe, fleet):
    dialog = await probe.subscribe(NVR, expires=1)
    assert dialog.response.get("expires") == "1"
    await probe.wait_for(lambda: not fleet.devices[NVR].subscriptions, 3, "expiry")
    fleet.set_channel_status(fleet.devices[NVR].channels[0].channel_id, "OFF")
    await asyncio.sleep(0.2)
    assert dialog.notifies == [], "no NOTIFY, not even a terminated one"


async def test_unknown_dialogs_get_481_and_a_481_ends_the_subscription(probe, fleet):
    dialog = await probe.subscribe(NVR)
    assert (await probe.resubscribe(dialog, 600, call_id="no-such-call")).status == 481
    real_tag = dialog.remote_tag
    dialog.remote_tag = new_tag()  # right Call-ID, wrong To tag
    assert (await probe.resubscribe(dialog, 600)).status == 481
    dialog.remote_tag = real_tag
    assert dialog.call_id in fleet.devices[NVR].subscriptions

    probe.notify_status = 481  # the platform forgot the dialog
    fleet.set_channel_status(fleet.devices[NVR].channels[0].channel_id, "OFF")
    await probe.wait_for(lambda: not fleet.devices[NVR].subscriptions, 2, "subscription dropped")


async def test_other_event_packages_are_refused(probe, fleet):
    dialog = await probe.subscribe(NVR, event="dialog")
    assert dialog.response.status == 489
    alarm = manscdp.build("Query", "Alarm", 9, NVR, [("StartAlarmPriority", 0)])
    dialog = await probe.subscribe(NVR, event="presence", body=alarm)
    assert dialog.response.status == 489
    assert fleet.devices[NVR].subscriptions == {}
