"""The simulator as a catalog source: multi-part Catalog responses (Annex N), A.2.1g items,
Annex O groups, channels without coordinates, the Fleet's channel API, and the other queries
a device answers. A ``Probe`` (a real ``SipEndpoint`` playing the platform) is on the far side."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import re
import subprocess
import sys

import pytest
import pytest_asyncio

from gb28181 import manscdp
from gb28181.ids import parse_id
from simulators.catalog import DeviceCatalog, Group, IdBlocks, location_missing
from simulators.cli import config_from_args, parser
from simulators.fleet import FleetConfig, device_catalog, device_ids, id_blocks
from simulators.probe import Probe, Received, start_fleet

NVR = "34020000001180000001"

#: A.2.1g item fields in their standard order.
ITEM_ORDER = ["DeviceID", "Name", "Manufacturer", "Model", "Owner", "CivilCode", "Block", "Address",
              "Parental", "ParentID", "SafetyWay", "RegisterWay", "CertNum", "Certifiable", "ErrCode",
              "EndTime", "Secrecy", "IPAddress", "Port", "Password", "Status", "Longitude",
              "Latitude", "Info"]
INFO_ORDER = ["PTZType", "PositionType", "RoomType", "UseType", "SupplyLightType", "DirectionType",
              "Resolution", "BusinessGroupID", "DownloadSpeed", "SVCSpaceSupportMode",
              "SVCTimeSupportMode"]
MANDATORY = {"DeviceID", "Name", "Manufacturer", "Model", "Owner", "CivilCode", "Address", "Parental",
             "ParentID", "RegisterWay", "Secrecy", "Status"}


@pytest_asyncio.fixture
async def probe():
    p = await Probe(answer_delay=0.002).start()
    yield p
    await p.close()


@pytest_asyncio.fixture
async def fleet_of(probe):
    started = []

    async def start(**kw):
        fleet = await start_fleet(probe, **kw)
        started.append(fleet)
        return fleet

    yield start
    for fleet in started:
        await fleet.stop()


def part_items(part: Received) -> list[dict]:
    return part.body.items()


def check_serial(parts: list[Received]) -> None:
    """Annex N: a part leaves only after the 200 to the previous one."""
    parts = sorted(parts, key=lambda p: p.at)
    for prev, nxt in zip(parts, parts[1:]):
        assert prev.answered_at is not None and nxt.at >= prev.answered_at


def in_order(tags: list[str], order: list[str]) -> bool:
    known = [order.index(t) for t in tags if t in order]
    return known == sorted(known)


async def test_500_channels_arrive_in_serial_parts_of_the_configured_size(probe, fleet_of):
    fleet = await fleet_of(channels=500, catalog_items_per_message=7)
    parts = await probe.catalog(NVR)
    sn = parts[0].body.sn
    assert len(parts) == 72  # 71 × 7 + 3
    for part in parts:
        assert part.body.root == "Response" and part.body.sn == sn and part.body.device_id == NVR
        assert part.body.text("SumNum") == "500"
        assert int(part.body.element.find("DeviceList").get("Num")) == len(part_items(part))
    sizes = [len(part_items(p)) for p in sorted(parts, key=lambda p: p.at)]
    assert sizes == [7] * 71 + [3]
    check_serial(parts)

    listed = [item for part in parts for item in part_items(part)]
    channels = {ch.channel_id: ch for ch in fleet.devices[NVR].channels}
    assert len(listed) == 500 and {i["DeviceID"] for i in listed} == set(channels)
    for item in listed:
        ch = channels[item["DeviceID"]]
        assert item["Name"] == ch.name and item["CivilCode"] == ch.civil_code
        assert item["ParentID"] == NVR and item["Status"] == "ON"
        assert ("Longitude" in item) == (not location_missing(ch.channel_id, 0.05))
        if "Longitude" in item:
            assert float(item["Longitude"]) == pytest.approx(ch.longitude)
            assert float(item["Latitude"]) == pytest.approx(ch.latitude)


async def test_items_follow_a21g_with_civil_codes_from_the_centre_code(probe, fleet_of):
    await fleet_of(channels=300, catalog_items_per_message=50)
    parts = await probe.catalog(NVR)
    items = [item for part in parts for item in part_items(part)]
    for part in parts:
        for el in part.body.element.find("DeviceList"):
            tags = [child.tag for child in el]
            assert in_order(tags, ITEM_ORDER), tags
            assert MANDATORY <= set(tags)
            assert in_order([c.tag for c in el.find("Info")], INFO_ORDER)
    civil = [i["CivilCode"] for i in items]
    assert all(re.fullmatch(r"3402\d{2}(\d{2})?", c) for c in civil)
    assert {len(c) for c in civil} == {6, 8}
    assert len({c[:6] for c in civil}) == 3, "a few districts per NVR"
    assert all(re.search(r"[\u4e00-\u9fff]", i["Name"]) for i in items), "Chinese names"
    assert all(i["Info"]["PTZType"] in "1234" and i["Info"]["DownloadSpeed"] == "1/2/4/8" for i in items)
    assert {i["Info"]["RoomType"] for i in items} <= {"1", "2"}
    assert all(re.fullmatch(r"192\.168\.\d+\.\d+", i["IPAddress"]) for i in items)


def test_catalogs_are_deterministic_and_follow_the_device_id():
    a = DeviceCatalog(NVR, 50, is_nvr=True, groups=True, missing_location_ratio=0.1, malformed=True)
    b = DeviceCatalog(NVR, 50, is_nvr=True, groups=True, missing_location_ratio=0.1, malformed=True)
    assert a.items() == b.items()
    other = DeviceCatalog("34020000001180000002", 50, is_nvr=True)
    assert [c.name for c in other.channels] != [c.name for c in a.channels]
    # A centre code that already names its district keeps it; the grassroots unit varies.
    local = DeviceCatalog("34020300001180000001", 100, is_nvr=True)
    assert {c.civil_code[:6] for c in local.channels} == {"340203"}
    ipc = DeviceCatalog("34020000001320000001", 16, is_nvr=False)
    assert len(ipc.channels) == 1 and ipc.channels[0].channel_id[10:13] == "131"


# -- IDs across a fleet ------------------------------------------------------------------------

IPC = "34020000001320000001"


def fleet_ids(cfg: FleetConfig) -> list[str]:
    """Every ID a fleet of ``cfg`` gives out, as its devices build them: devices, cameras,
    business groups and virtual organisations, alarm inputs."""
    blocks = id_blocks(cfg)
    ids = []
    for device_id in device_ids(cfg.first_id, cfg.devices, nvr=cfg.nvr):
        catalog = device_catalog(cfg, device_id, blocks)
        ids.append(device_id)
        ids += [x.group_id if isinstance(x, Group) else x.channel_id for x in catalog.items()]
        ids += catalog.alarm_inputs
    return ids


FLEETS = {
    # Serials above 1000: the old `(serial * 1000 + n) % 1_000_000` gave IPC 1 and IPC 1001
    # the same camera.
    "2000-ipcs": (FleetConfig(devices=2000, first_id=IPC),
                  {"34020000001310000101", "34020000001310200001", "34020000001340020002"}),
    # The usual blocks fit: these are the IDs the simulator has always given.
    "200-nvrs-x64": (FleetConfig(devices=200, nvr=True, channels=64, first_id=NVR, groups=True),
                     {"34020000001310001001", "34020000001310200064", "34020000002150000200",
                      "34020000002160000101", "34020000001340000011"}),
    # Neither the usual camera block (1000) nor the organisation block (100) fits.
    "12000-nvrs-x4": (FleetConfig(devices=12000, nvr=True, channels=4, first_id=NVR, groups=True),
                      {"34020000001310000011", "34020000001310120004", "34020000002160120004"}),
}


def ids_digest(name: str) -> str:
    return hashlib.sha256(" ".join(fleet_ids(FLEETS[name][0])).encode()).hexdigest()


@pytest.mark.parametrize("name", FLEETS)
def test_every_id_of_a_fleet_is_unique_valid_and_fixed(name):
    cfg, expected = FLEETS[name]
    ids = fleet_ids(cfg)
    assert len(set(ids)) == len(ids), "duplicate IDs"
    assert expected <= set(ids)
    per_device = cfg.channels if cfg.nvr else 1
    assert sum(gb_id[10:13] == "131" for gb_id in ids) == cfg.devices * per_device
    first = parse_id(cfg.first_id)
    kinds = set()
    for gb_id in ids:
        gid = parse_id(gb_id)  # 20 digits
        # Annex D.1: centre code (digits 1-8), industry (9-10) and network (14) of the device.
        assert (gid.centre, gid.industry, gid.network) == (first.centre, first.industry, first.network)
        kinds.add(gid.type_code)
    assert kinds == ({118, 131, 134, 215, 216} if cfg.groups else {132, 131, 134})
    # Nothing random: another global random state gives the same IDs.
    state = random.getstate()
    try:
        random.seed(os.urandom(16))
        assert fleet_ids(cfg) == ids
    finally:
        random.setstate(state)


def test_fleet_ids_do_not_depend_on_the_process():
    # Python's str hash is salted per process: IDs must not depend on it, or on anything else.
    script = "from tests.test_sim_catalog import ids_digest; print(ids_digest('2000-ipcs'))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = {
        subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True,
                       check=True, env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip()
        for seed in ("1", "2")
    }
    assert digests == {ids_digest("2000-ipcs")}


def test_an_ipc_keeps_its_camera_id_while_the_usual_block_fits():
    assert DeviceCatalog(IPC, 1, is_nvr=False).channels[0].channel_id == "34020000001310001001"
    last = "34020000001320000999"
    assert device_ids(IPC, 999)[-1] == last
    blocks = id_blocks(FleetConfig(devices=999, first_id=IPC))
    assert blocks == IdBlocks()
    assert device_catalog(FleetConfig(devices=999), last, blocks).channels[0].channel_id == \
        "34020000001310999001"


@pytest.mark.parametrize("cfg,limit", [
    (FleetConfig(devices=15624, nvr=True, channels=64, first_id=NVR), "at most 15623 devices"),
    (FleetConfig(devices=10, nvr=True, channels=64, first_id="34020000001180500000"),
     "none from that serial"),
    (FleetConfig(devices=500_000, first_id=IPC), "at most 499998 devices"),  # 2 alarm inputs each
])
def test_a_fleet_that_cannot_fit_is_refused(cfg, limit):
    with pytest.raises(ValueError, match=limit) as info:
        id_blocks(cfg)
    assert "--first-id" in str(info.value) and "Annex D" in str(info.value)
    assert "fewer devices" in str(info.value)


def test_the_limit_is_exact():
    assert id_blocks(FleetConfig(devices=15623, nvr=True, channels=64, first_id=NVR)).channels == 64


def test_cli_reports_a_fleet_that_cannot_fit_in_one_line():
    args = parser().parse_args(["--devices", "20000", "--nvr", "--channels", "64",
                                "--first-id", NVR])
    with pytest.raises(SystemExit) as info:
        config_from_args(args)
    message = str(info.value.code)
    assert message.startswith("gb28181-sim: 20000 devices") and "\n" not in message
    assert "at most 15623 devices" in message


def test_added_channels_stay_inside_the_device_block():
    catalog = DeviceCatalog(NVR, 3, is_nvr=True, blocks=IdBlocks(channels=4))
    assert catalog.new_channel().channel_id == "34020000001310000008"  # serial 1 × 4 + 4
    with pytest.raises(ValueError, match="no camera ID left"):
        catalog.new_channel()
    assert len(catalog.channels) == 4


@pytest.mark.parametrize("ratio", [0.0, 0.2, 1.0])
def test_missing_location_ratio_is_a_stable_choice_per_channel_id(ratio):
    cat = DeviceCatalog(NVR, 400, is_nvr=True, missing_location_ratio=ratio)
    missing = {c.channel_id for c in cat.channels if c.longitude is None}
    assert missing == {c.channel_id for c in cat.channels if c.latitude is None}
    assert missing == {c.channel_id for c in cat.channels if location_missing(c.channel_id, ratio)}
    assert len(missing) == pytest.approx(400 * ratio, abs=30)


async def test_groups_build_a_tree_in_the_same_catalog(probe, fleet_of):
    fleet = await fleet_of(channels=24, groups=True, catalog_items_per_message=5)
    parts = await probe.catalog(NVR)
    check_serial(parts)
    items = [item for part in parts for item in part_items(part)]
    device = fleet.devices[NVR]
    assert all(p.body.text("SumNum") == str(len(device.catalog.items())) for p in parts)
    assert len(items) == 24 + len(device.catalog.groups)
    by_type = {}
    for item in items:
        by_type.setdefault(item["DeviceID"][10:13], []).append(item)
    (bg,) = by_type["215"]
    assert bg["ParentID"] == NVR  # Annex O: a business group hangs off the system
    vos = {i["DeviceID"]: i for i in by_type["216"]}
    assert len(vos) >= 2
    for vo in vos.values():
        assert vo["BusinessGroupID"] == bg["DeviceID"]
        assert vo["ParentID"] in {bg["DeviceID"], *vos}
    assert any(vo["ParentID"] in vos for vo in vos.values()), "one nested organisation"
    cams = by_type["131"]
    assert len(cams) == 24
    for cam in cams:
        device_part, vo = cam["ParentID"].split("/")
        assert device_part == NVR and vo in vos
        assert cam["Info"]["BusinessGroupID"] == bg["DeviceID"]
    # Parents are listed before their children.
    order = [i["DeviceID"] for i in items]
    assert all(order.index(vo["ParentID"]) < order.index(vid) for vid, vo in vos.items())


async def test_channel_api_changes_what_later_catalogs_return(probe, fleet_of):
    fleet = await fleet_of(channels=6)
    device = fleet.devices[NVR]
    first = device.channels[0]
    assert fleet.channel(first.channel_id) is first
    assert fleet.channel("34020000001310999999") is None
    with pytest.raises(ValueError):
        fleet.set_channel_status(first.channel_id, "BROKEN")
    with pytest.raises(KeyError):
        fleet.set_channel_status("34020000001310999999", "OFF")
    with pytest.raises(KeyError):
        fleet.add_channel("34020000001180009999")
    assert device.subscriptions == {}

    fleet.set_channel_status(first.channel_id, "off")
    fleet.set_channel_status(device.channels[1].channel_id, "VLOST")
    added = fleet.add_channel(NVR)
    removed = fleet.remove_channel(device.channels[2].channel_id)
    assert added.channel_id[10:13] == "131" and fleet.channel(added.channel_id) is added
    assert fleet.channel(removed.channel_id) is None

    items = {i["DeviceID"]: i for part in await probe.catalog(NVR) for i in part_items(part)}
    assert set(items) == {ch.channel_id for ch in device.channels}
    assert added.channel_id in items and removed.channel_id not in items
    assert items[added.channel_id]["Name"] == added.name
    assert items[first.channel_id]["Status"] == "OFF"
    assert items[device.channels[1].channel_id]["Status"] == "OFF"  # VLOST lists as OFF (A.2.1g)
    assert items[device.channels[3].channel_id]["Status"] == "ON"


async def test_device_status_config_presets_and_control(probe, fleet_of):
    fleet = await fleet_of(channels=4)
    cam = fleet.devices[NVR].channels[0].channel_id

    sn = await probe.query(NVR, "DeviceStatus")
    (status,) = await probe.wait_for(lambda: probe.responses("DeviceStatus", sn), what="DeviceStatus")
    assert status.body.text("Online") == "ONLINE" and status.body.text("Result") == "OK"
    assert manscdp.parse_time(status.body.text("DeviceTime")) is not None
    assert status.body.element.find("Alarmstatus").get("num") == "2"

    sn = await probe.query(NVR, "ConfigDownload", [("ConfigType", "BasicParam/VideoParamOpt")])
    answers = await probe.wait_for(lambda: len(probe.responses("ConfigDownload", sn)) == 2
                                   and probe.responses("ConfigDownload", sn), what="2 ConfigDownload")
    basic = next(a.body for a in answers if a.body.element.find("BasicParam") is not None)
    assert basic.text("Result") == "OK"
    assert [c.tag for c in basic.element.find("BasicParam")] == [
        "Name", "Expiration", "HeartBeatInterval", "HeartBeatCount", "PositionCapability",
        "Longitude", "Latitude"]
    assert basic.text("BasicParam/HeartBeatInterval") == "60"
    assert basic.text("BasicParam/HeartBeatCount") == "3"
    assert basic.text("BasicParam/Expiration") == "3600"
    assert any(a.body.element.find("VideoParamOpt") is not None for a in answers)

    sn = await probe.query(NVR, "PresetQuery", target_id=cam)
    (presets,) = await probe.wait_for(lambda: probe.responses("PresetQuery", sn), what="PresetQuery")
    assert presets.body.device_id == cam
    plist = presets.body.element.find("PresetList")
    assert int(plist.get("Num")) == len(presets.body.items("PresetList")) >= 2
    assert all(i["PresetID"].isdigit() and i["PresetName"] for i in presets.body.items("PresetList"))

    record = await probe.query(NVR, "DeviceControl", [("RecordCmd", "Record")], root="Control",
                               target_id=cam)
    guard = await probe.query(NVR, "DeviceControl", [("GuardCmd", "SetGuard")], root="Control")
    ptz = await probe.query(NVR, "DeviceControl", [("PTZCmd", "A50F0100000000B5")], root="Control",
                            target_id=cam)
    unknown = await probe.query(NVR, "Frobnicate")
    for sn in (record, guard):
        (ok,) = await probe.wait_for(lambda sn=sn: probe.responses("DeviceControl", sn), what="control")
        assert ok.body.text("Result") == "OK"
    assert probe.responses("DeviceControl", record)[0].body.device_id == cam
    await asyncio.sleep(0.2)
    assert probe.responses("DeviceControl", ptz) == [], "PTZ gets only the 200 (§9.3.1)"
    assert not [m for m in probe.messages if m.body is not None and m.body.sn == unknown]
