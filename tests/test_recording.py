"""Platform recording, the server's side: plans per tier and channel, the segment index and its
reconciliation after a crash, retention and the low-space policy (injected clock, tiny quota),
search and export through the API (ffprobe reads the export), the storage report and its CLI,
and end to end: a served server recording simulated channels, SIGKILLed and restarted."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import datetime
from pathlib import Path

import pytest

from gb28181.config import RecordingSection, load_config
from gb28181.record_index import SegmentIndex, plan_sweep
from gb28181.record_report import format_report, storage_report
from gb28181.record_storage import LocalDiskStorage, StorageUsage
from gb28181.recording import in_schedule, mode_for, wanted
from gb28181.registrar import BEIJING
from media.mp4 import Mp4Writer
from media.ps import PsFrame
from media.recording import segment_path
from registry.models import Channel
from registry.sqlite import SqliteStore
from registry.store import RecordSegment
from simulators.media import get_clip

from .conftest import TOKEN, ffprobe, listed, wait_until

DAY = 86400.0
CH1 = "34020000001320000001"
CH2 = "34020000001320000002"
CH3 = "34020000001320000003"


def bj(text: str) -> float:
    """Unix time of a Beijing wall-clock time."""
    return datetime.fromisoformat(text).replace(tzinfo=BEIJING).timestamp()


# -- plans -------------------------------------------------------------------------------------

def test_plan_by_tier_and_channel_override():
    cfg = RecordingSection()
    assert [mode_for(t, None, cfg) for t in (1, 2, 3)] == ["continuous", "continuous", "off"]
    assert mode_for(3, "schedule", cfg) == "schedule"  # the channel's own mode wins
    assert mode_for(1, "off", cfg) == "off"
    assert mode_for(2, None, RecordingSection(plans={"tier1": "alarm", "tier2": "off"})) == "off"  # a tier not planned


def test_schedule_windows_in_beijing_time_across_midnight():
    windows = ["22:00-06:00", "12:00-13:00"]
    assert in_schedule(windows, bj("2026-11-22T23:30:00"))
    assert in_schedule(windows, bj("2026-11-23T00:10:00"))  # after midnight, same window
    assert in_schedule(windows, bj("2026-11-23T05:59:00"))
    assert not in_schedule(windows, bj("2026-11-23T06:00:00"))
    assert in_schedule(windows, bj("2026-11-23T12:30:00"))
    assert not in_schedule(windows, bj("2026-11-23T21:59:00"))
    # 16:00 UTC is 00:00 in Beijing: the window is read in Beijing time, not UTC
    assert in_schedule(["00:00-01:00"], datetime.fromisoformat("2026-11-22T16:30:00+00:00").timestamp())
    cfg = RecordingSection(schedule=["08:00-20:00"])
    assert wanted("schedule", cfg, bj("2026-11-22T09:00:00"))
    assert not wanted("schedule", cfg, bj("2026-11-22T21:00:00"))
    now = bj("2026-11-22T09:00:00")
    assert wanted("alarm", cfg, now, alarm_until=now + 1) and not wanted("alarm", cfg, now, alarm_until=now)
    assert wanted("continuous", cfg, now) and not wanted("off", cfg, now)


def test_bad_schedule_and_retry_settings_are_refused():
    with pytest.raises(Exception, match="schedule"):
        load_config(None, recording={"schedule": ["8:00-25:00"]})
    with pytest.raises(Exception, match="retry_max"):
        load_config(None, recording={"retry_min": 10, "retry_max": 5})
    cfg = load_config(None, recording={"plans": {"tier3": "schedule"}, "retention_days": {"tier1": 90}})
    assert cfg.recording.plans.of(3) == "schedule" and cfg.recording.retention_days.of(1) == 90


# -- segments made the way the nodes make them -----------------------------------------------------

def write_segment(root: Path, channel: str, start: float, seconds: float, *, part: bool = False) -> Path:
    """A fragmented MP4 of ``seconds`` of real H.264 (the simulator's clip, 25 fps, a keyframe
    each second) at ``segment_path``; ``part``: left as ``.mp4.part`` (not closed)."""
    clip = get_clip("h264", "320x240", fps=25, gop=25)
    final = segment_path(root, channel, start)
    writer = Mp4Writer(final.with_name(final.name + ".part"), fragmented=True,
                       metadata={"comment": json.dumps({"channel": channel, "start": start})})
    for i in range(round(seconds * 25)):
        k = i % len(clip)
        writer.write_frame(PsFrame("video", "h264", clip.frames[k], i * 3600, i * 3600, clip.keyframes[k]), 0)
    writer.close()
    if part:
        return writer.path
    os.replace(writer.path, final)
    return final


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def open_index(tmp_path: Path, clock: Clock, quota: int = 0, **cfg) -> tuple[SqliteStore, SegmentIndex]:
    store = SqliteStore(tmp_path / "db.sqlite")
    await store.open()
    storage = LocalDiskStorage(tmp_path / "records", quota)
    tiers = {CH1: 1, CH2: 2, CH3: 3}
    index = SegmentIndex(store, storage, RecordingSection(quota_bytes=quota, **cfg),
                         tier_of=lambda cid: tiers.get(cid, 3), clock=clock)
    return store, index


# -- retention and low space ---------------------------------------------------------------------------

def seg(channel: str, tier: int, start: float, size: int, state: str = "closed") -> RecordSegment:
    return RecordSegment(channel, f"{channel}/{start:.0f}.mp4", start, start + 3600, size, tier=tier, state=state)


def test_sweep_plan_deletes_by_retention_then_tier3_then_tier2_never_tier1():
    now = 100 * DAY
    cfg = RecordingSection(low_space_percent=10)
    old1 = seg(CH1, 1, now - 31 * DAY, 10)        # tier 1 beyond its 30 days: goes
    new1 = seg(CH1, 1, now - 2 * DAY, 10)         # tier 1 inside retention: never
    old3 = seg(CH3, 3, now - 8 * DAY, 10)         # tier 3 beyond 7 days
    a3, b3 = seg(CH3, 3, now - 3 * DAY, 10), seg(CH3, 3, now - 2 * DAY, 10)
    a2 = seg(CH2, 2, now - 5 * DAY, 10)
    open3 = seg(CH3, 3, now - 9 * DAY, 10, state="open")  # being written: never
    candidates = {1: [old1, new1], 2: [a2], 3: [open3, old3, a3, b3]}
    plenty = StorageUsage(used=70, free=900, capacity=1000)
    plan = plan_sweep(candidates, plenty, cfg, now)
    assert plan.expired == [old1, old3] and plan.low_space == [] and not plan.low
    # 85 free of 1000 (+20 freed by retention) is under 10 %: tier 3 goes first, oldest first
    plan = plan_sweep(candidates, StorageUsage(used=70, free=75, capacity=1000), cfg, now)
    assert plan.low and plan.low_space == [a3] and plan.short_bytes == 0
    # short by more than tier 3 holds: then tier 2; tier 1 inside retention stays, the rest is
    # reported short (the alert)
    plan = plan_sweep(candidates, StorageUsage(used=70, free=30, capacity=1000), cfg, now)
    assert plan.low_space == [a3, b3, a2] and plan.short_bytes == 100 - 30 - 20 - 30
    assert new1 not in plan.deletions and open3 not in plan.deletions


async def test_retention_and_a_tiny_quota_with_an_injected_clock(tmp_path):
    clock = Clock(bj("2026-11-22T12:00:00"))
    store, index = await open_index(tmp_path, clock, quota=10_000, low_space_percent=20,
                                    retention_days={"tier1": 30, "tier2": 15, "tier3": 7})
    root = index.storage.root
    try:
        rows = []
        for channel, tier, days_ago, size in ((CH1, 1, 40, 2000), (CH1, 1, 1, 2000), (CH2, 2, 3, 2000),
                                              (CH3, 3, 10, 1000), (CH3, 3, 2, 2000)):
            start = clock.now - days_ago * DAY
            path = segment_path(root, channel, start)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0" * size)
            rows.append(RecordSegment(channel, index.storage.key_of(path), start, start + 3600, size, tier=tier))
        await store.save_segments(rows)
        # used 9000 of 10000: 1000 free, under 20 %; retention frees 3000 (tier 1 at 40 days,
            # tier 3 at 10): 4000 free is above 2000, nothing more goes
        plan = await index.sweep()
        assert sorted(s.channel_id for s in plan.expired) == [CH1, CH3] and plan.low_space == []
        assert not any(index.storage.exists(s.path) for s in plan.expired)
        total, left = await store.segments()
        assert total == 3
        assert index.totals == {1: (1, 2000), 2: (1, 2000), 3: (1, 2000)}
        # Between recounts the totals follow what is deleted and what closes (no scan of the rows).
        store.segment_summary = None  # type: ignore[assignment]  # a recount now would fail
        await index.on_segment({"path": str(segment_path(root, CH2, clock.now - 60)), "channel": CH2,
                                "start": clock.now - 60, "end": clock.now, "bytes": 500, "frames": 25,
                                "codec": "h264", "state": "closed"})
        assert index.totals[2] == (2, 2500)
        await store.delete_segments([index.storage.key_of(segment_path(root, CH2, clock.now - 60))])
        index.totals[2] = (1, 2000)
        # a quota under what is used (6000): low space deletes tier 3, then tier 2, and then
        # only tier 1 inside its retention is left, which stays: short, the alert
        index.storage.quota = 2000
        plan = await index.sweep()
        assert [s.tier for s in plan.low_space] == [3, 2] and plan.short_bytes > 0
        total, left = await store.segments()
        assert [s.tier for s in left] == [1] and index.storage.exists(left[0].path)
        assert index.totals == {1: (1, 2000), 2: (0, 0), 3: (0, 0)}
        del store.segment_summary  # an hour on, the index is counted again
        # a day later nothing of tier 1 inside its 30 days goes: still short, still kept
        clock.now += DAY
        plan = await index.sweep()
        assert plan.deletions == [] and plan.short_bytes > 0
        assert index.usage is not None and index.usage.capacity == 2000
    finally:
        await store.close()


# -- the index after a crash ------------------------------------------------------------------------------

async def test_reconcile_repairs_cut_segments_adds_orphans_and_drops_missing_rows(tmp_path):
    clock = Clock(time.time())
    store, index = await open_index(tmp_path, clock)
    root = index.storage.root
    try:
        t0 = float(int(clock.now) - 600)
        kept = write_segment(root, CH1, t0, 3)
        orphan = write_segment(root, CH1, t0 + 10, 2)         # on disk, never indexed
        cut = write_segment(root, CH2, t0 + 20, 4, part=True)  # the crash: open, then cut short
        with open(cut, "r+b") as f:
            f.truncate(int(cut.stat().st_size * 0.7))
        garbage = segment_path(root, CH3, t0 + 30).with_suffix(".mp4.part")
        garbage.parent.mkdir(parents=True, exist_ok=True)
        garbage.write_bytes(b"\0" * 100)                       # cut before its first fragment
        await index.on_segment({"channel": CH1, "path": str(kept), "start": t0, "end": t0 + 3,
                                "bytes": kept.stat().st_size, "frames": 75, "codec": "h264",
                                "state": "closed"})
        await index.on_segment({"channel": CH2, "path": str(cut), "start": t0 + 20, "end": t0 + 20,
                                "state": "open", "gap_before": True})
        await store.save_segments([RecordSegment(CH3, f"{CH3}/20000101/{CH3}_20000101T000000.mp4",
                                                 1.0, 2.0, 10)])  # its file is gone
        done = await index.reconcile()
        assert done == {"repaired": 1, "dropped": 1, "added": 1, "removed": 1}
        assert not cut.exists() and not garbage.exists()
        paths = await store.segment_paths()
        on_disk = set(index.storage.scan())
        assert set(paths) == on_disk and all(state == "closed" for state in paths.values())
        _, rows = await store.segments(CH2)
        assert len(rows) == 1 and rows[0].path.endswith(".mp4") and rows[0].frames > 0
        assert abs(rows[0].start - (t0 + 20)) < 0.01 and rows[0].end > rows[0].start
        repaired = index.storage.path_for(rows[0].path)
        duration, frames, _, errors = ffprobe(repaired)
        assert errors == "" and frames == rows[0].frames
        _, rows = await store.segments(CH1)
        assert [r.path for r in rows] == [index.storage.key_of(kept), index.storage.key_of(orphan)]
        assert await index.reconcile() == {"repaired": 0, "dropped": 0, "added": 0, "removed": 0}
    finally:
        await store.close()


# -- the API: search, export, report, the channel's mode, metrics -------------------------------------------

async def api(server, method: str, path: str, **kw):
    import aiohttp
    url = f"http://127.0.0.1:{server.http_port}{path}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session:
        async with session.request(method, url, **kw) as resp:
            body = await resp.read()
            if "json" in resp.headers.get("Content-Type", ""):
                return resp.status, json.loads(body), resp.headers
            return resp.status, body, resp.headers


def add_channel(server, channel_id: str, tier: int) -> None:
    server.channels.upsert(Channel(channel_id=channel_id, device_id="34020000001110000001", name="gate",
                                   civil_code="340200", tier=tier))


async def test_search_export_report_and_metrics_through_the_api(make_server, tmp_path):
    data = tmp_path / "data"
    root = data / "records"
    t0 = float(int(time.time()) - 3600)
    # three segments of CH1 (20 s, 20 s, then a gap and 30 s), made before the server starts:
    # its start-up reconciliation indexes them
    write_segment(root, CH1, t0, 20)
    write_segment(root, CH1, t0 + 20, 20)
    write_segment(root, CH1, t0 + 50, 30)
    server = await make_server()
    add_channel(server, CH1, 1)
    status, body, _ = await api(server, "GET", f"/api/v1/channels/{CH1}/records?source=platform"
                                f"&start={int(t0) - 10}&end={int(t0) + 200}")
    assert status == 200, body
    assert body["total"] == 3 and [i["type"] for i in body["items"]] == ["time"] * 3
    first = body["items"][0]
    assert first["start"] == datetime.fromtimestamp(t0, BEIJING).isoformat(timespec="seconds")
    assert first["file_path"].endswith(".mp4") and first["file_size"] > 0 and first["segment_id"]
    status, page, _ = await api(server, "GET", f"/api/v1/channels/{CH1}/records?source=platform"
                                f"&start={int(t0) + 30}&end={int(t0) + 60}&limit=1")
    assert page["total"] == 2 and len(page["items"]) == 1  # overlapping segments, paged
    status, body, _ = await api(server, "GET", f"/api/v1/channels/{CH1}/records?source=nvr&start=1h")
    assert status == 400 and "source" in body["error"]

    # a 60 s export across the three segments (with the 10 s gap): ffprobe-clean, 60 s long
    status, mp4, headers = await api(server, "GET", f"/api/v1/channels/{CH1}/export?start={int(t0) + 10}"
                                     f"&end={int(t0) + 70}")
    assert status == 200, mp4
    assert headers["Content-Type"] == "video/mp4" and headers.get("Accept-Ranges") == "bytes"
    out = tmp_path / "export.mp4"
    out.write_bytes(mp4)
    duration, frames, _, errors = ffprobe(out)
    assert errors == ""
    assert abs(duration - 60) < 0.2, duration
    assert frames == 50 * 25  # 10 s + 20 s + (gap) + 20 s of 25 fps
    status, part, headers = await api(server, "GET", f"/api/v1/channels/{CH1}/export?start={int(t0) + 10}"
                                      f"&end={int(t0) + 70}", headers={"Range": "bytes=0-99"})
    assert status == 206 and part == mp4[:100]  # cached, and HTTP Range works
    status, body, _ = await api(server, "GET", f"/api/v1/channels/{CH1}/export?start={int(t0) - 7200}"
                                f"&end={int(t0) - 3600}")
    assert status == 404 and "no platform recording" in body["error"]
    status, body, _ = await api(server, "GET", f"/api/v1/channels/{CH1}/export?start=10d&end=now")
    assert status == 400 and "max_export_seconds" in body["error"]

    # the channel's own mode, then the report and the metrics
    add_channel(server, CH3, 3)
    status, body, _ = await api(server, "PATCH", f"/api/v1/channels/{CH3}", json={"recording": "schedule"})
    assert status == 200, body
    status, body, _ = await api(server, "GET", f"/api/v1/channels/{CH3}/recording")
    assert body["mode"] == "schedule" and body["from"] == "channel" and body["enabled"] is False
    status, body, _ = await api(server, "PATCH", f"/api/v1/channels/{CH3}", json={"recording": "tier"})
    status, body, _ = await api(server, "GET", f"/api/v1/channels/{CH3}/recording")
    assert body["mode"] == "off" and body["from"] == "tier"
    status, body, _ = await api(server, "PATCH", f"/api/v1/channels/{CH3}", json={"recording": "always"})
    assert status == 400

    status, report, _ = await api(server, "GET", "/api/v1/reports/storage")
    assert status == 200, report
    (group,) = report["groups"]
    assert group["tier"] == 1 and group["civil_code"] == "340200" and group["retention_days"] == 30
    assert group["channels_planned"] == 1 and group["channels_with_segments"] == 1
    assert 0.03 < group["days_held_min"] < 0.05 and group["meets_retention"] is False
    (bad,) = group["not_meeting_plan"]  # 70 s recorded of the last hour: gaps
    assert bad["channel_id"] == CH1 and any("gaps" in p for p in bad["problems"])
    assert report["disk"]["used_bytes"] > 0 and report["disk"]["bytes_per_day"] > 0
    assert report["disk"]["days_left"] > 0

    status, text, _ = await api(server, "GET", "/metrics")
    text = text.decode()
    for name in ("gb28181_recording_channels", "gb28181_recording_bytes_total", "gb28181_record_segments",
                 "gb28181_storage_free_bytes", "gb28181_storage_days_left", "gb28181_recording_failures_total",
                 "gb28181_recording_planned_channels", "gb28181_recording_active_channels"):
        assert name in text, name


def test_storage_report_table_and_cli(tmp_path, capsys, monkeypatch):
    from gb28181.cli import main

    config = load_config(None, data_dir=str(tmp_path / "data"))
    now = bj("2026-11-22T12:00:00")
    channels = [Channel(CH1, "d", civil_code="34020101", tier=1, name="gate"),
                Channel(CH2, "d", civil_code="34020101", tier=2, name="yard"),
                Channel(CH3, "d", civil_code="34020201", tier=3)]
    summary = [(CH1, 1, 24 * 35, 10**9, now - 35 * DAY, now, DAY, 0, 0, 10**8)]
    report = storage_report(config, channels, {}, summary, StorageUsage(10**9, 10**10, 10**11), now=now)
    one, two = report["groups"]  # tier 3 is off and holds nothing: not listed
    assert one["meets_retention"] and not one["not_meeting_plan"] and one["days_held_min"] == 35
    assert two["not_meeting_plan"][0]["problems"] == ["nothing recorded"]
    assert report["disk"]["bytes_per_day"] == 10**8 and report["disk"]["days_left"] == 100
    table = format_report(report)
    assert "DISABLED" in table and "nothing recorded" in table

    # from the database alone: the CLI opens the server's SQLite file
    async def seed():
        store = SqliteStore(config.database_path)
        await store.open()
        await store.save_segments([RecordSegment(CH1, f"{CH1}/x.mp4", time.time() - 7200, time.time() - 3600, 5000,
                                                 tier=1)])
        await store.close()
    asyncio.run(seed())
    monkeypatch.setenv("GB28181_DATA_DIR", str(tmp_path / "data"))
    assert main(["report", "storage", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["disk"]["used_bytes"] == 5000 and out["enabled"] is False
    assert main(["report", "storage"]) == 0
    assert "days left" in capsys.readouterr().out


# -- end to end: a served server records simulated channels, is killed, restarts ------------------------------

SIM_ARGS = ("--video-size", "320x240", "--gop", "25", "--fps", "25", "--progress", "0",
            "--keepalive-interval", "5")


def test_recording_survives_sigkill_and_the_index_matches_the_files(served, sims, tmp_path):
    from media.recording import probe_segment

    env = {"GB28181_RECORDING__ENABLED": "true", "GB28181_RECORDING__SEGMENT_SECONDS": "5",
           "GB28181_RECORDING__PLANS__TIER3": "continuous",
           "GB28181_MEDIA__WORKERS": "1"}
    server = served(**env)
    sims(server, "--devices", "3", *SIM_ARGS)
    root = server.data_dir / "records"

    def recording_now():
        status, body = server.api("/api/v1/recordings")
        return status == 200 and body["states"].get("recording", 0) >= 3 and body
    wait_until(recording_now, 40, "3 channels recording", server.exited)
    channels = [r["channel_id"] for r in recording_now()["recordings"]]

    def closed_segments(channel):
        status, body = server.api(f"/api/v1/channels/{channel}/records?source=platform&start=1h")
        return [i for i in listed(body) if i["state"] == "closed"] if status == 200 else []
    wait_until(lambda: all(len(closed_segments(c)) >= 2 for c in channels), 40, "two closed segments each",
               server.exited)
    items = closed_segments(channels[0])
    # one stream held open by the recording alone (no viewer): no gap between its segments
    assert not any(i["gap_before"] for i in items[1:]), items
    start = datetime.fromisoformat(items[0]["start"]).timestamp()
    end = datetime.fromisoformat(items[-1]["end"]).timestamp()
    status, mp4 = server.api(f"/api/v1/channels/{channels[0]}/export?start={start}&end={end}")
    assert status == 200, mp4
    (tmp_path / "e2e.mp4").write_bytes(mp4)
    duration, frames, _, errors = ffprobe(tmp_path / "e2e.mp4")
    assert errors == "" and abs(duration - (end - start)) < 1.0 and frames > 0

    # the crash: segments are open (.part) while the server dies
    wait_until(lambda: list(root.glob("*/*/*.mp4.part")), 10, "an open segment", server.exited)
    server.kill()
    assert list(root.glob("*/*/*.mp4.part"))
    again = served(server.workdir, **{**env, "GB28181_RECORDING__ENABLED": "false"})
    # every segment is a playable MP4, and the index lists exactly the files on disk
    files = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*/*.mp4*"))
    assert files and all(f.endswith(".mp4") for f in files)
    indexed = []
    for channel in {f.split("/", 1)[0] for f in files}:
        status, body = again.api(f"/api/v1/channels/{channel}/records?source=platform&start=1h&limit=1000")
        indexed += [i["file_path"] for i in listed(body)]
    assert sorted(indexed) == files
    for f in files:
        info = probe_segment(root / f)
        assert info is not None and info["frames"] > 0, f
