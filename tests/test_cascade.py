"""Cascade end to end: three `gb28181 serve` instances (county → city → province, GB/T 28181-2016
§5.2, §9, Annex J) and simulated devices at the county, all as users run them.

The tests share one chain (starting three servers and their media workers is the slow part) and
run in order: catalog, live, playback, PTZ, offline, then restarting the city.
"""

from __future__ import annotations

import re
import statistics
import time
from datetime import datetime

import pytest

from .conftest import (
    CHAIN_IDS,
    CascadeChain,
    SimProcess,
    decode_video,
    listed,
    read_stream,
    sei_latencies,
    video_timeline,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)

COUNTY_NVR = "34020100001180000001"  # first of 2 NVRs with 4 channels each, grouped (215/216)
IPC = "34020100001320000101"  # a camera on its own, registered by a second simulator
CAMERA = "34020100001310001001"  # channel 1 of the first NVR
NEW_IPC = "34020100001320000201"  # a camera that joins after the city's restart
CAMERAS = 2 * 4 + 1


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cascade")
    rig = CascadeChain(workdir).start()
    county = rig["county"]
    sims = [SimProcess(workdir, county, "--server-id", CHAIN_IDS["county"][0], "--first-id", COUNTY_NVR,
                       "--nvr", "--channels", "4", "--groups", "--devices", "2", "--records", "2",
                       "--keepalive-interval", "5", "--alarm-interval", "4", "--mobile", "1",
                       "--mobile-interval", "1", name="nvrs"),
            SimProcess(workdir, county, "--server-id", CHAIN_IDS["county"][0], "--first-id", IPC,
                       "--unregister", name="ipc")]
    rig.sims = sims  # type: ignore[attr-defined]
    try:
        yield rig
    finally:
        for sim in sims:
            sim.stop()
        rig.stop()


def channels(server, **query) -> dict[str, dict]:
    params = "&".join(f"{k}={v}" for k, v in {"limit": 1000, **query}.items())
    status, body = server.api(f"/api/v1/channels?{params}")
    assert status == 200, body
    return {c["channel_id"]: c for c in listed(body)}


def cameras(server) -> dict[str, dict]:
    return {k: c for k, c in channels(server).items() if c["kind"] == "channel"}


def sim_counter(sim: SimProcess, name: str) -> int:
    """The last progress line's count of ``name`` (streams, ptz)."""
    found = re.findall(rf"\b{name} (\d+)", sim.log())
    return int(found[-1]) if found else 0


def problems(chain: CascadeChain) -> str | None:
    for level, server in chain.servers.items():
        if (why := server.exited()) is not None:
            return f"{level}: {why}"
    return None


def test_upstreams_register_and_province_lists_the_county_tree(chain):
    wait_until(lambda: all(chain[lv].api("/api/v1/upstreams")[1]["upstreams"][0]["status"] == "registered"
                           for lv in ("city", "county")), 30, "county and city to register upward",
               lambda: problems(chain))
    status, body = chain["county"].api("/api/v1/upstreams")
    up = body["upstreams"][0]
    assert up["server_id"] == CHAIN_IDS["city"][0] and up["local_id"] == CHAIN_IDS["county"][0]
    assert up["source"] == "config" and up["password_set"] and "password" not in up
    # The city sees the county as a lower platform (type 200), online.
    status, dev = chain["city"].api(f"/api/v1/devices/{CHAIN_IDS['county'][0]}")
    assert status == 200 and dev["kind"] == "platform" and dev["status"] == "online"

    county = wait_until(lambda: len(cameras(chain["county"])) == CAMERAS and cameras(chain["county"]),
                        60, "the county's catalog", lambda: problems(chain))
    province = wait_until(lambda: len(cameras(chain["province"])) == CAMERAS and cameras(chain["province"]),
                          60, "the province to list the county's cameras", lambda: problems(chain))
    assert set(province) == set(county)
    for cid, c in province.items():
        # Owned by the city (the province's lower platform), with the county's names and places.
        assert c["device_id"] == CHAIN_IDS["city"][0]
        assert c["name"] == county[cid]["name"] and c["civil_code"] == county[cid]["civil_code"]
        assert c["state"] == "ON"
    # The group tree (Annex O) reaches the province: the county's business groups and virtual
    # organisations, with each grouped camera under its innermost organisation.
    county_all, province_all = channels(chain["county"]), channels(chain["province"])
    groups = {k: c for k, c in county_all.items() if c["kind"] in ("business-group", "virtual-org")}
    assert groups and set(groups) <= set(province_all)
    for gid, g in groups.items():
        assert province_all[gid]["name"] == g["name"]
        assert province_all[gid]["kind"] == g["kind"]
    for cid, c in county.items():
        inner = [p for p in c["parent_id"].split("/") if p in groups]
        if inner:
            assert province[cid]["parent_id"].split("/")[-1] == inner[-1]
    status, tree = chain["province"].api("/api/v1/tree?by=group")
    assert status == 200
    names = {g["name"] for g in groups.values() if g["kind"] == "business-group"}
    assert names <= {n["name"] for n in tree["tree"]["children"]}


def test_province_plays_a_county_camera_through_the_chain(chain):
    province, city, county = chain["province"], chain["city"], chain["county"]
    status, play = province.api(f"/api/v1/channels/{CAMERA}/play", "POST", {})
    assert status == 200, play
    flv = read_stream(play["urls"]["server_flv"], 3.0)
    assert len(decode_video(flv)) >= 25  # decodable H.264 from two hops down
    # One stream at each level; the city and the county each send it to the level above.
    for server in (city, county):
        status, sessions = server.api("/api/v1/upstreams/sessions")
        assert [s["channel_id"] for s in sessions["sessions"]] == [CAMERA]
    # A second viewer at the county shares the device's stream: still one INVITE to the camera.
    status, local = county.api(f"/api/v1/channels/{CAMERA}/play", "POST", {})
    assert status == 200, local
    status, streams = county.api("/api/v1/streams")
    assert [s["channel_id"] for s in listed(streams)] == [CAMERA]
    frames, county_ms = sei_latencies(local["urls"]["server_flv"], 4.0)
    assert frames >= 50
    frames, province_ms = sei_latencies(play["urls"]["server_flv"], 4.0)
    assert frames >= 50 and province_ms
    wait_until(lambda: sim_counter(chain.sims[0], "streams") == 1, 5, "the simulator's progress line")
    # Added latency per hop, from the SEI send time (the benchmark measures it properly).
    per_hop = (statistics.median(province_ms) - statistics.median(county_ms)) / 2
    print(f"latency p50: county {statistics.median(county_ms):.1f} ms, province "
          f"{statistics.median(province_ms):.1f} ms, {per_hop:.1f} ms per hop")
    assert statistics.median(province_ms) < 1500
    # The audit names who watched: the upper platform, at each level.
    status, audit = county.api("/api/v1/audit?limit=50")
    assert any(e["action"] == "view" and e["who"] == f"upstream:{CHAIN_IDS['city'][0]}"
               and e["target"] == CAMERA for e in audit["entries"])


def _recorded_seconds(frame) -> float:
    assert frame[2] is not None, "a frame without the simulator's SEI"
    return frame[2][1] / 1e9


def test_province_playback_with_seek_through_the_chain(chain):
    province = chain["province"]
    status, found = province.api(f"/api/v1/channels/{CAMERA}/records?start=24h")
    assert status == 200, found
    items = found["items"]
    assert items, "RecordInfo relayed through two levels found nothing"
    first = items[0]
    start = datetime.fromisoformat(first["start"]).timestamp() + 60
    end = start + 600
    status, pb = province.api(f"/api/v1/channels/{CAMERA}/playback", "POST",
                              {"start": datetime.fromtimestamp(start).astimezone().isoformat(),
                               "end": datetime.fromtimestamp(end).astimezone().isoformat()})
    assert status == 200, pb
    frames = video_timeline(read_stream(pb["urls"]["server_flv"], 2.5))
    assert frames and abs(_recorded_seconds(frames[0]) - start) < 5
    status, moved = province.api(f"/api/v1/streams/{pb['stream_id']}/control", "POST",
                                 {"action": "seek", "offset": 300})
    assert status == 200, moved
    later = video_timeline(read_stream(pb["urls"]["server_flv"], 3.0))
    sought = [f for f in later if f[2] is not None and _recorded_seconds(f) >= start + 290]
    assert sought and abs(_recorded_seconds(sought[0]) - (start + 300)) < 10
    status, _ = province.api(f"/api/v1/streams/{pb['stream_id']}", "DELETE")
    assert status in (200, 204)
    # The BYE goes down the chain: the county's playback session to the city ends.
    wait_until(lambda: all(s["kind"] != "playback" for s in
                           chain["county"].api("/api/v1/upstreams/sessions")[1]["sessions"]),
               10, "the county's playback session to end")


def test_ptz_from_the_province_reaches_the_camera(chain):
    before = sim_counter(chain.sims[0], "ptz")
    status, sent = chain["province"].api(f"/api/v1/channels/{CAMERA}/ptz", "POST",
                                         {"command": "left", "speed": 100})
    assert status == 200, sent
    wait_until(lambda: sim_counter(chain.sims[0], "ptz") > before, 10,
               "the simulator to get the PTZ command")
    for level, upper in (("city", "province"), ("county", "city")):
        status, audit = chain[level].api("/api/v1/audit?limit=50")
        assert any(e["action"] == "control" and e["who"] == f"upstream:{CHAIN_IDS[upper][0]}"
                   and e["target"] == CAMERA and e.get("ptzcmd") for e in audit["entries"]), level


def test_province_downloads_through_the_chain_to_the_end_of_the_range(chain):
    """A download ends with the device's MediaStatus 121 (§9.8.2, §9.9), relayed up both levels."""
    province = chain["province"]
    status, found = province.api(f"/api/v1/channels/{CAMERA}/records?start=24h")
    start = datetime.fromisoformat(found["items"][0]["start"]).timestamp() + 30
    status, dl = province.api(f"/api/v1/channels/{CAMERA}/downloads", "POST",
                              {"start": datetime.fromtimestamp(start).astimezone().isoformat(),
                               "end": datetime.fromtimestamp(start + 20).astimezone().isoformat(),
                               "speed": 4})
    assert status in (200, 201), dl
    done = wait_until(lambda: (d := province.api(f"/api/v1/downloads/{dl['id']}")[1])["state"] != "downloading"
                      and d, 30, "the download to finish")
    assert done["state"] == "done", done
    assert "MediaStatus" in done["ended_reason"] and done["seconds"] >= 15


def test_alarms_and_positions_go_up_the_chain(chain):
    province, city = chain["province"], chain["city"]
    city_id, county_id = CHAIN_IDS["city"][0], CHAIN_IDS["county"][0]
    # Alarms go up unasked (§9.4: as a device reports them), from the county's NVRs to the province.
    alarms = wait_until(lambda: listed(province.api(f"/api/v1/alarms?device_id={city_id}")[1]), 20,
                        "an alarm of the county's devices at the province")
    assert alarms[0]["device_id"] == city_id
    # Mobile positions go up where the upper subscribed (§9.11.2): each level to the one below.
    for server, lower in ((city, county_id), (province, city_id)):
        status, sub = server.api(f"/api/v1/devices/{lower}/position-subscription", "PUT",
                                 {"interval": 1, "expires": 600})
        assert status in (200, 201), sub
    track = wait_until(lambda: province.api(f"/api/v1/devices/{city_id}/positions")[1]["positions"], 20,
                       "positions of the county's moving device at the province")
    assert track[0]["longitude"] and track[0]["latitude"]


def test_camera_offline_at_the_county_shows_off_at_the_province_within_5_s(chain):
    ipc = next(cid for cid, c in cameras(chain["county"]).items() if c["device_id"] == IPC)
    assert cameras(chain["province"])[ipc]["state"] == "ON"
    chain.sims[1].stop()  # --unregister: the camera says goodbye
    went = time.monotonic()
    wait_until(lambda: cameras(chain["county"])[ipc]["state"] == "OFF", 5, "the county to see it")
    wait_until(lambda: cameras(chain["province"])[ipc]["state"] == "OFF", 5, "the province to see it")
    print(f"OFF at the province {time.monotonic() - went:.2f} s after the camera unregistered")
    assert time.monotonic() - went < 5


def test_restarting_the_city_recovers_by_itself(chain):
    province, county = chain["province"], chain["county"]
    before = cameras(province)
    chain.restart("city")
    city = chain["city"]
    wait_until(lambda: city.api("/api/v1/upstreams")[1]["upstreams"][0]["status"] == "registered",
               30, "the city to register to the province again", lambda: problems(chain))
    # Nothing lost: the city's archive survived, and the province still lists every camera.
    assert set(cameras(city)) == set(before)
    assert set(cameras(province)) == set(before)
    # The province subscribed to the city's catalog again (the city is a new process).
    wait_until(lambda: city.api("/api/v1/upstreams")[1]["upstreams"][0]["subscriptions"], 30,
               "the province to subscribe to the city again")
    # The county still counts as registered at the city, and streams come up on the next play.
    status, play = province.api(f"/api/v1/channels/{CAMERA}/play", "POST", {})
    if status != 200:  # the old stream may still be winding down at the province
        time.sleep(2)
        status, play = province.api(f"/api/v1/channels/{CAMERA}/play", "POST", {})
    assert status == 200, play
    assert len(decode_video(read_stream(play["urls"]["server_flv"], 3.0))) >= 25
    assert county.api("/api/v1/upstreams")[1]["upstreams"][0]["status"] == "registered"
    # The city subscribed to the county again too: a camera that registers at the county now
    # reaches the province, through both new subscriptions.
    new = SimProcess(chain.workdir, county, "--server-id", CHAIN_IDS["county"][0], "--first-id", NEW_IPC,
                     name="new-ipc")
    chain.sims.append(new)
    added = wait_until(lambda: [c for c in cameras(province).values() if c["device_id"] == CHAIN_IDS["city"][0]
                                and c["channel_id"] not in before and c["state"] == "ON"],
                       30, "a camera added at the county after the restart to reach the province",
                       lambda: problems(chain) or new.exited())
    assert len(added) == 1
    for level, server in chain.servers.items():
        assert not server.error_lines(), (level, server.error_lines()[:5])
