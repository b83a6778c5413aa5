"""The catalog a lower platform shows its upper platform (cascade/share.py): share rules, the
Annex O tree (civil codes, business groups, virtual organisations, cameras) parents first,
multi-part Response bodies (Annex N), NOTIFY bodies (Annex P), and the round trip through the
real parser (``manscdp.parse``) and the upper platform's reader (``catalog.item_to_channel``)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gb28181 import manscdp
from gb28181.cascade.share import (
    Item,
    catalog_bodies,
    catalog_items,
    is_shared,
    item,
    notify_bodies,
    parent_of,
)
from gb28181.catalog import item_to_channel
from gb28181.config import UpstreamShare
from registry.models import Channel

LOCAL = "34020000002000000001"     # this instance, a lower platform (type 200)
LOWER = "34020100002000000009"     # our own lower platform
NVR = "34020000001180000001"
BG = "34020100002150000001"
VO1 = "34020100002160000001"       # under BG
VO2 = "34020100002160000002"       # under VO1 (the registry says so)
VO_UNUSED = "34020100002160000003"  # no camera hangs under it
CAM_A = "34020100001310000001"     # in VO2, via the lower platform
CAM_B = "34020100001310000002"     # in VO1
CAM_C = "34020000001320000003"     # on our NVR, in no group
ITEM_ORDER = ["DeviceID", "Event", "Name", "Manufacturer", "Model", "Owner", "CivilCode", "Block",
              "Address", "Parental", "ParentID", "SafetyWay", "RegisterWay", "Secrecy", "IPAddress",
              "Port", "Status", "Longitude", "Latitude", "Info"]


def cam(channel_id: str, device_id: str = LOWER, **kw: Any) -> Channel:
    fields: dict[str, Any] = dict(name=f"长江路与黄山路交叉口 {channel_id[-2:]}", manufacturer="Hikvision",
                                  model="DS-2CD", owner="公安", address="长江路3号", state="ON", status="ON",
                                  longitude=117.283, latitude=31.861, ip_address="192.168.1.10", port=8000,
                                  info={"PTZType": "1", "RoomType": "1", "Vendor": {"x": "y"}})
    fields.update(kw)
    return Channel(channel_id, device_id, kind="channel", **fields)


def registry() -> list[Channel]:
    return [
        Channel("34", LOWER, kind="civil-code", name="安徽省"),
        Channel("3402", LOWER, kind="civil-code", name="芜湖市"),
        Channel(BG, LOWER, kind="business-group", name="视频监控业务分组", parent_id=LOWER),
        Channel(VO1, LOWER, kind="virtual-org", name="镜湖分局", parent_id=BG, business_group_id=BG),
        Channel(VO2, LOWER, kind="virtual-org", name="重点路口", parent_id=VO1, business_group_id=BG),
        Channel(VO_UNUSED, LOWER, kind="virtual-org", name="空组织", parent_id=BG, business_group_id=BG),
        # A's ParentID names only its VO; the registry tells VO2 -> VO1 -> BG.
        cam(CAM_A, civil_code="340201", parent_id=f"{LOWER}/{VO2}"),
        cam(CAM_B, civil_code="34020102", parent_id=f"{LOWER}/{VO1}", business_group_id=BG),
        cam(CAM_C, NVR, civil_code="340200", parent_id=NVR, info={}),
        Channel(NVR, NVR, kind="device", name="NVR"),
    ]


def groups() -> dict[str, Channel]:
    return {c.channel_id: c for c in registry() if c.kind in ("business-group", "virtual-org")}


def ids(items: list[Item]) -> list[str]:
    return [dict(it)["DeviceID"] for it in items]


def read_back(bodies: list[bytes]) -> list[dict[str, Any]]:
    """Every item of every body, through the real parser."""
    out: list[dict[str, Any]] = []
    for body in bodies:
        out.extend(manscdp.parse(body).items("DeviceList"))
    return out


def shared_ids(share: Any) -> set[str]:
    items = catalog_items(registry(), local_id=LOCAL, share=share)
    return {i for i in ids(items) if len(i) == 20 and i[10:13] in ("131", "132")}


# ---------------------------------------------------------------- share rules


def test_share_all_lists_every_camera_and_nothing_else() -> None:
    assert shared_ids("all") == {CAM_A, CAM_B, CAM_C}
    assert NVR not in ids(catalog_items(registry(), local_id=LOCAL, share="all"))


def test_share_by_civil_code_prefix() -> None:
    assert shared_ids(UpstreamShare(civil_codes=["340201"])) == {CAM_A, CAM_B}
    assert shared_ids(UpstreamShare(civil_codes=["3402"])) == {CAM_A, CAM_B, CAM_C}
    # No digits in CivilCode: the ID's centre code (Annex D.1 digits 1-8) decides.
    odd = cam("34030000001310000007", civil_code="n/a")
    assert is_shared(odd, UpstreamShare(civil_codes=["3403"]))
    assert not is_shared(odd, UpstreamShare(civil_codes=["3402"]))


def test_share_by_group_follows_the_registry_chain() -> None:
    a = next(c for c in registry() if c.channel_id == CAM_A)
    # A names only VO2; BG and VO1 are reached through the registry's groups.
    assert is_shared(a, UpstreamShare(business_groups=[BG]), groups())
    assert is_shared(a, UpstreamShare(business_groups=[VO1]), groups())
    assert is_shared(a, UpstreamShare(business_groups=[VO1]), groups().get)
    assert not is_shared(a, UpstreamShare(business_groups=[BG]))
    assert is_shared(a, UpstreamShare(business_groups=[VO2]))
    assert shared_ids(UpstreamShare(business_groups=[BG])) == {CAM_A, CAM_B}
    assert shared_ids(UpstreamShare(business_groups=[VO2])) == {CAM_A}
    assert shared_ids(UpstreamShare(business_groups=[VO_UNUSED])) == set()


def test_share_by_channel_list_and_rules_combine() -> None:
    assert shared_ids(UpstreamShare(channels=[CAM_C])) == {CAM_C}
    assert shared_ids(UpstreamShare(channels=[CAM_C], business_groups=[VO2])) == {CAM_A, CAM_C}
    group = Channel(BG, LOWER, kind="business-group")
    assert not is_shared(group, "all")  # only cameras are shared


def test_nothing_matching_gives_one_empty_response() -> None:
    share = UpstreamShare(civil_codes=["11"], channels=["11000000001310000001"])
    items = catalog_items(registry(), local_id=LOCAL, share=share)
    assert items == []
    assert catalog_items([], local_id=LOCAL, share="all") == []
    bodies = catalog_bodies(items, sn=7, device_id=LOCAL, per_message=4)
    assert len(bodies) == 1
    msg = manscdp.parse(bodies[0])
    assert (msg.root, msg.cmd_type, msg.sn, msg.device_id) == ("Response", "Catalog", 7, LOCAL)
    assert msg.text("SumNum") == "0"
    assert msg.element.find("DeviceList").get("Num") == "0"  # type: ignore[union-attr]
    assert msg.items() == []


# ---------------------------------------------------------------- the tree


def test_tree_order_and_parents() -> None:
    items = catalog_items(registry(), local_id=LOCAL, share="all")
    assert ids(items) == ["34", "3402", "340201", "34020102", BG, VO1, VO2, CAM_A, CAM_B, CAM_C]
    by_id = {dict(it)["DeviceID"]: dict(it) for it in items}
    # Annex O a-d: civil-code items are DeviceID and Name only, named from the registry.
    assert by_id["34"] == {"DeviceID": "34", "Event": None, "Name": "安徽省"}
    assert by_id["340201"]["Name"] == "340201"  # not in the registry: the code itself
    assert by_id[BG]["ParentID"] == LOCAL
    assert (by_id[VO1]["ParentID"], by_id[VO1]["BusinessGroupID"]) == (BG, BG)
    assert (by_id[VO2]["ParentID"], by_id[VO2]["BusinessGroupID"]) == (VO1, BG)
    assert VO_UNUSED not in by_id
    assert by_id[CAM_A]["ParentID"] == f"{LOCAL}/{VO2}"
    assert by_id[CAM_B]["ParentID"] == f"{LOCAL}/{VO1}"
    assert by_id[CAM_C]["ParentID"] == LOCAL
    assert dict(by_id[CAM_A]["Info"])["BusinessGroupID"] == BG
    assert "BusinessGroupID" not in dict(by_id[CAM_C]["Info"] or [])
    for cid in (CAM_A, CAM_B, CAM_C):
        tags = [t for t, v in items[ids(items).index(cid)] if v is not None]
        assert tags == [t for t in ITEM_ORDER if t in tags]  # A.2.1g order
    g = groups()
    assert parent_of(registry()[6], LOCAL, g) == f"{LOCAL}/{VO2}"
    assert parent_of(registry()[6], LOCAL, g.get) == f"{LOCAL}/{VO2}"  # a registry's get works too
    assert parent_of(registry()[8], LOCAL, g) == LOCAL


def test_groups_only_named_in_parent_ids_still_form_a_tree() -> None:
    vo_a, vo_b = "34020100002160000011", "34020100002160000012"
    c = cam(CAM_A, parent_id=f"{LOWER}/{BG}/{vo_a}/{vo_b}", civil_code="34")
    items = catalog_items([c], local_id=LOCAL, share="all", names={vo_a: "甲", "34": "安徽"})
    assert ids(items) == ["34", BG, vo_a, vo_b, CAM_A]
    by_id = {dict(it)["DeviceID"]: dict(it) for it in items}
    assert (by_id[vo_a]["Name"], by_id[vo_b]["Name"], by_id["34"]["Name"]) == ("甲", vo_b, "安徽")
    assert (by_id[vo_a]["ParentID"], by_id[vo_b]["ParentID"]) == (BG, vo_a)
    assert by_id[vo_b]["BusinessGroupID"] == BG


def test_cyclic_group_parents_do_not_loop() -> None:
    vo_a, vo_b = "34020100002160000021", "34020100002160000022"
    reg = [Channel(vo_a, LOWER, kind="virtual-org", parent_id=vo_b),
           Channel(vo_b, LOWER, kind="virtual-org", parent_id=vo_a),
           cam(CAM_A, parent_id=f"{LOWER}/{vo_a}"), cam(CAM_B, parent_id=f"{LOWER}/{vo_b}")]
    items = catalog_items(reg, local_id=LOCAL, share="all")
    assert_parents_first(items)
    assert sorted(ids(items)[-2:]) == [CAM_A, CAM_B]


def assert_parents_first(items: list[Item]) -> None:
    seen = {LOCAL}
    for it in items:
        d = dict(it)
        for ref in [*(d.get("ParentID") or "").split("/"), d.get("BusinessGroupID") or ""]:
            if ref and ref != LOCAL:
                assert ref in seen, f"{d['DeviceID']} refers to {ref} before it is listed"
        code = d.get("CivilCode") or ""
        for n in (2, 4, 6, 8):
            if len(code) >= n and (n == 2 or code[n - 2:n] != "00"):
                assert code[:n] in seen
        seen.add(d["DeviceID"])


# ---------------------------------------------------------------- round trip and bodies


def test_round_trip_through_parser_and_item_to_channel() -> None:
    reg = registry()
    items = catalog_items(reg, local_id=LOCAL, share="all")
    bodies = catalog_bodies(items, sn=42, device_id=LOCAL, per_message=3)
    back = {ch.channel_id: ch for ch in (item_to_channel(i, LOCAL) for i in read_back(bodies))}
    assert list(back) == ids(items)
    a, c = back[CAM_A], back[CAM_C]
    assert (a.kind, a.name, a.civil_code, a.parent_id, a.business_group_id) == (
        "channel", "长江路与黄山路交叉口 01", "340201", f"{LOCAL}/{VO2}", BG)
    assert (a.status, a.longitude, a.latitude, a.ptz_type) == ("ON", 117.283, 31.861, 1)
    assert (a.manufacturer, a.model, a.owner, a.address, a.ip_address, a.port) == (
        "Hikvision", "DS-2CD", "公安", "长江路3号", "192.168.1.10", 8000)
    assert a.info == {"PTZType": "1", "RoomType": "1", "BusinessGroupID": BG}  # no vendor extras
    assert (c.parent_id, c.business_group_id, c.civil_code) == (LOCAL, "", "340200")
    assert [(back[g].kind, back[g].name) for g in (BG, VO1, VO2)] == [
        ("business-group", "视频监控业务分组"), ("virtual-org", "镜湖分局"), ("virtual-org", "重点路口")]
    assert (back[VO2].parent_id, back[VO2].business_group_id) == (VO1, BG)
    assert (back["3402"].kind, back["3402"].name) == ("civil-code", "芜湖市")


def test_multi_part_bodies() -> None:
    items = catalog_items(registry(), local_id=LOCAL, share="all")
    assert len(items) == 10
    bodies = catalog_bodies(items, sn=9, device_id=LOCAL, per_message=4)
    assert len(bodies) == 3
    nums = []
    for body in bodies:
        msg = manscdp.parse(body)
        assert (msg.root, msg.cmd_type, msg.sn, msg.device_id) == ("Response", "Catalog", 9, LOCAL)
        assert msg.text("SumNum") == "10"
        nums.append(int(msg.element.find("DeviceList").get("Num")))  # type: ignore[union-attr, arg-type]
        assert nums[-1] == len(msg.items())
    assert nums == [4, 4, 2]
    got = [i["DeviceID"] for i in read_back(bodies)]
    assert got == ids(items) and len(set(got)) == len(got)
    assert len(catalog_bodies(items, sn=9, device_id=LOCAL, per_message=100)) == 1
    with pytest.raises(ValueError):
        catalog_bodies(items, sn=9, device_id=LOCAL, per_message=0)


def test_gb2312_bodies_carry_chinese_names() -> None:
    items = catalog_items(registry(), local_id=LOCAL, share="all")
    body = catalog_bodies(items, sn=1, device_id=LOCAL, per_message=20)[0]
    assert body.startswith(b'<?xml version="1.0" encoding="GB2312"?>')
    assert "镜湖分局".encode("gb2312") in body
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")
    assert manscdp.parse(body).encoding == "gb18030"
    utf8 = catalog_bodies(items, sn=1, device_id=LOCAL, per_message=20, encoding="UTF-8")[0]
    assert "镜湖分局".encode() in utf8
    assert read_back([utf8]) == read_back([body])


def test_status_is_the_effective_state() -> None:
    reg = [cam(CAM_A, state="OFF", status="ON"), cam(CAM_B, state="VLOST", status="VLOST"),
           cam(CAM_C, state="ON")]
    back = [item_to_channel(i, LOCAL) for i in read_back(
        catalog_bodies(catalog_items(reg, local_id=LOCAL, share="all"), sn=1, device_id=LOCAL, per_message=5))]
    assert {c.channel_id: c.status for c in back if c.kind == "channel"} == {CAM_A: "OFF", CAM_B: "OFF", CAM_C: "ON"}


def test_garbage_channels() -> None:
    reg = [
        cam(CAM_A, name="  ", longitude=None, latitude=None, civil_code="34", info={}, ptz_type=None,
            manufacturer="", ip_address="", port=0, address="1<2 & 3"),
        cam(CAM_B, civil_code="", longitude=0.0, latitude=0.0, parent_id="garbage//x/", info={"PTZType": ""}),
        cam("3402010000131000000X", civil_code="340201"),  # not 20 digits: still a kind "channel" row
    ]
    items = catalog_items(reg, local_id=LOCAL, share="all")
    assert_parents_first(items)
    back = {c.channel_id: c for c in (item_to_channel(i, LOCAL) for i in read_back(
        catalog_bodies(items, sn=3, device_id=LOCAL, per_message=2)))}
    a, b = back[CAM_A], back[CAM_B]
    assert (a.name, a.civil_code, a.longitude, a.latitude) == (CAM_A, "34", None, None)
    assert (a.info, a.address) == ({}, "1<2 & 3")
    raw = a.raw
    assert "Longitude" not in raw and "IPAddress" not in raw and "Port" not in raw and "Info" not in raw
    assert raw["Manufacturer"] == "" and raw["Status"] == "ON"
    assert (b.civil_code, b.parent_id, b.longitude) == (CAM_B[:8], LOCAL, None)
    assert "Info" not in b.raw
    assert {"34", "3402", "340201"} <= set(back)


def test_notify_bodies_with_events() -> None:
    a, b, c = registry()[6], registry()[7], registry()[8]
    vo = registry()[4]
    events = [item(vo, parent_id=VO1, event="ADD", business_group_id=BG),
              item(a, parent_id=f"{LOCAL}/{VO2}", event="ADD"),
              item(b, event="DEL"), item(c, event="OFF"), item(c, event="UPDATE", parent_id=LOCAL)]
    bodies = notify_bodies(events, sn=77, device_id=LOCAL, per_message=2)
    assert len(bodies) == 3
    got: list[dict[str, Any]] = []
    for body in bodies:
        msg = manscdp.parse(body)
        assert (msg.root, msg.cmd_type, msg.sn, msg.device_id) == ("Notify", "Catalog", 77, LOCAL)
        part = msg.items()
        # Annex P: SumNum equals this body's DeviceList Num.
        assert msg.text("SumNum") == msg.element.find("DeviceList").get("Num") == str(len(part))  # type: ignore[union-attr]
        got.extend(part)
    assert [(i["DeviceID"], i["Event"]) for i in got] == [
        (VO2, "ADD"), (CAM_A, "ADD"), (CAM_B, "DEL"), (CAM_C, "OFF"), (CAM_C, "UPDATE")]
    assert got[2] == {"DeviceID": CAM_B, "Event": "DEL"} and got[3] == {"DeviceID": CAM_C, "Event": "OFF"}
    assert list(got[1])[:3] == ["DeviceID", "Event", "Name"]
    added = item_to_channel(got[1], LOCAL)
    assert (added.name, added.parent_id, added.status) == (a.name, f"{LOCAL}/{VO2}", "ON")
    assert item_to_channel(got[0], LOCAL).business_group_id == BG
    assert notify_bodies([], sn=1, device_id=LOCAL, per_message=2) == []
    with pytest.raises(ValueError):
        item(a, event="MOVED")


# ---------------------------------------------------------------- property


GROUP_POOL = [BG, "34020100002150000002", VO1, VO2, VO_UNUSED, "34020100002160000004"]
NAME_CHARS = "长江路与黄山交叉口镜湖分局 abcXYZ019&<>'\"-_/"


@st.composite
def channels(draw: st.DrawFn) -> list[Channel]:
    out: list[Channel] = []
    for gid in draw(st.lists(st.sampled_from(GROUP_POOL), unique=True, max_size=4)):
        parent = draw(st.sampled_from(["", LOWER, *GROUP_POOL]))
        kind = "business-group" if gid[10:13] == "215" else "virtual-org"
        out.append(Channel(gid, LOWER, kind=kind, name=draw(st.text(NAME_CHARS, max_size=8)), parent_id=parent,
                           business_group_id=draw(st.sampled_from(["", *GROUP_POOL[:2]]))))
    for n in range(draw(st.integers(0, 12))):
        path = draw(st.lists(st.sampled_from(GROUP_POOL), max_size=3))
        out.append(cam(
            f"3402{draw(st.sampled_from(['00', '01', '11']))}00001310{n:06d}",
            name=draw(st.text(NAME_CHARS, max_size=12)),
            civil_code=draw(st.sampled_from(["", "34", "3402", "340200", "34020102", "x", "340"])),
            parent_id="/".join([LOWER, *path]),
            business_group_id=draw(st.sampled_from(["", *GROUP_POOL])),
            state=draw(st.sampled_from(["ON", "OFF", "VLOST"])),
            longitude=draw(st.one_of(st.none(), st.floats(-180, 180))),
            latitude=draw(st.one_of(st.none(), st.floats(-90, 90)))))
    return out


@settings(max_examples=150, deadline=None)
@given(channels(), st.integers(1, 5), st.sampled_from(["GB2312", "UTF-8"]))
def test_property_every_item_once_parents_first_and_round_trips(
        reg: list[Channel], per: int, encoding: str) -> None:
    items = catalog_items(reg, local_id=LOCAL, share="all")
    assert_parents_first(items)
    bodies = catalog_bodies(items, sn=5, device_id=LOCAL, per_message=per, encoding=encoding)
    back = [item_to_channel(i, LOCAL) for i in read_back(bodies)]
    assert [c.channel_id for c in back] == ids(items)
    assert len(set(ids(items))) == len(items)
    cams = {c.channel_id: c for c in reg if c.kind == "channel"}
    assert {c.channel_id for c in back if c.kind == "channel"} == set(cams)
    for c in back:
        if c.channel_id in cams:
            orig = cams[c.channel_id]
            assert c.name == (orig.name.strip() or orig.channel_id)
            assert c.status == ("ON" if orig.state == "ON" else "OFF")
            if orig.has_location:
                assert (c.longitude, c.latitude) == (orig.longitude, orig.latitude)
            else:
                assert (c.longitude, c.latitude) == (None, None)


@settings(max_examples=150, deadline=None)
@given(channels(), st.lists(st.sampled_from(["34", "3402", "340201", "11"]), max_size=2),
       st.lists(st.sampled_from(GROUP_POOL), max_size=2), st.booleans())
def test_property_catalog_lists_exactly_the_shared_cameras(
        reg: list[Channel], civil: list[str], groups_: list[str], listed: bool) -> None:
    cams = [c for c in reg if c.kind == "channel"]
    share = UpstreamShare(civil_codes=civil, business_groups=groups_,
                          channels=[cams[0].channel_id] if cams and listed else [])
    index = {c.channel_id: c for c in reg if c.kind in ("business-group", "virtual-org")}
    items = catalog_items(reg, local_id=LOCAL, share=share)
    assert_parents_first(items)
    assert {i for i in ids(items) if i[10:13] == "131"} == {c.channel_id for c in cams if is_shared(c, share, index)}
