"""Playback of platform recordings (media/file_source.py, playback.py source="platform").

Real segments: fragmented MP4 (ISO/IEC 14496-12, ``frag_keyframe+empty_moov+default_base_moof``)
written with PyAV from the simulator's H.264 clip, each frame's SEI carrying its recorded time.
The node's ``file_play`` stream is paced in real time × speed, seeks land on the keyframe at or
before the asked time (the SEI says where), pause stops it, the end of the range ends it (the
node's ``media_stopped`` with ``file_end``), its PS packets round-trip through the PS demuxer, and
through an in-process server an HTTP-FLV viewer of a platform playback decodes.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import pytest

from gb28181.registrar import BEIJING
from media.mp4 import Mp4Writer
from media.node import MediaNode, NodeError
from media.ps import PsDemuxer, PsFrame
from registry.models import Channel
from simulators.media import get_clip, parse_sim_sei

from .conftest import TOKEN, read_stream, video_timeline, wait_for

FPS, GOP = 25, 25  # one keyframe a second
T0 = 1_760_000_000.0  # recorded time of the first segment's first frame
CHANNEL = "34020000001320000001"


def write_segment(path, t0: float, count: int, first: int = 0) -> dict:
    """A fragmented MP4 of ``count`` frames from recorded time ``t0``, as the recorder writes."""
    clip = get_clip("h264", "320x240", FPS, GOP, 300)
    writer = Mp4Writer(path, fragmented=True)
    for i in range(count):
        k = (first + i) % len(clip)
        ts = i * 90000 // FPS
        au = clip.access_unit(k, first + i, round((t0 + i / FPS) * 1e9))
        writer.write_frame(PsFrame("video", "h264", au, ts, ts, clip.keyframes[k]), 0)
    writer.close()
    return {"path": str(path), "start": t0, "end": t0 + (count - 1) / FPS}


@pytest.fixture
def segments(tmp_path):
    """[T0, T0+20) and, after a 10 s gap, [T0+30, T0+40)."""
    return [write_segment(tmp_path / "a.mp4", T0, 20 * FPS),
            write_segment(tmp_path / "b.mp4", T0 + 30, 10 * FPS, first=20 * FPS)]


def recorded(packet) -> float:
    sei = parse_sim_sei(packet.frames[0].data, "h264")
    assert sei is not None, "a frame lost the simulator's SEI"
    return sei[1] / 1e9


class Played:
    """A node playing recordings into stream "pb", and one consumer of it."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.node = MediaNode("127.0.0.1", on_event=self.events.append, data_dir="unused")
        self.packets: list[tuple[float, object]] = []  # (wall clock, MediaPacket)
        self.task: asyncio.Task | None = None

    async def play(self, files: list[dict], **args) -> dict:
        await self.node.start()
        out = await self.node.call("file_play", {"stream": "pb", "files": files, **args})
        consumer = self.node.streams["pb"].hub.subscribe("test")

        async def read() -> None:
            async for packet in consumer:
                self.packets.append((time.monotonic(), packet))
        self.task = asyncio.get_running_loop().create_task(read())
        return out

    def control(self, **args):
        return self.node.call("file_control", {"stream": "pb", **args})

    def since(self, wall: float) -> list:
        return [p for w, p in self.packets if w >= wall]

    def ended(self) -> bool:
        return any(e.get("event") == "media_stopped" and e.get("file_end") for e in self.events)

    async def close(self) -> None:
        await self.node.close()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def played():
    p = Played()
    yield p
    await p.close()


async def test_real_time_and_double_speed(played, segments):
    out = await played.play(segments, from_time=T0 + 2.5, start=T0, end=T0 + 40)
    assert out["port"] is None and out["offset"] == 2.0  # the keyframe at or before 2.5 s
    await asyncio.sleep(0.3)  # past the start
    w1 = time.monotonic()
    await asyncio.sleep(1.5)
    normal = played.since(w1)
    await played.control(action="speed", scale=2)
    await asyncio.sleep(0.2)
    w2 = time.monotonic()
    await asyncio.sleep(1.5)
    fast = played.since(w2)
    assert 1.5 * FPS * 0.7 <= len(normal) <= 1.5 * FPS * 1.3, len(normal)
    assert 1.5 * FPS * 2 * 0.7 <= len(fast) <= 1.5 * FPS * 2 * 1.3, len(fast)
    span = recorded(fast[-1]) - recorded(fast[0])
    assert 1.8 <= span / 1.5 <= 2.2  # recorded time runs twice as fast as the wall clock
    # 90 kHz timestamps run in recorded time, rising; elapsed counts from the landing point.
    stamps = [p.timestamp for _, p in played.packets]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))
    info = (await played.node.call("streams", {}))["streams"]["pb"]
    assert info["transport"] == "file"
    assert abs(info["elapsed"] - (recorded(played.packets[-1][1]) - (T0 + 2.0))) < 0.1


async def test_seek_lands_on_the_keyframe_before(played, segments):
    await played.play(segments, start=T0, end=T0 + 40)
    await asyncio.sleep(0.5)
    before = played.packets[-1][1].timestamp
    out = await played.control(action="seek", offset=12.3)
    assert out["offset"] == 12.0
    w = time.monotonic()
    await asyncio.sleep(0.5)
    after = played.since(w)
    assert after[0].keyframe and abs(recorded(after[0]) - (T0 + 12.0)) < 0.01
    assert after[0].timestamp > before  # timestamps go on across the seek
    # A seek into the gap lands at the next segment's start.
    out = await played.control(action="seek", offset=25)
    assert out["offset"] == 30.0
    w = time.monotonic()
    await asyncio.sleep(0.4)
    assert abs(recorded(played.since(w)[0]) - (T0 + 30)) < 0.01
    with pytest.raises(NodeError, match="offset"):
        await played.control(action="seek", offset=99)


async def test_pause_stops_and_resume_goes_on(played, segments):
    await played.play(segments, start=T0, end=T0 + 40)
    await asyncio.sleep(0.4)
    await played.control(action="pause")
    await asyncio.sleep(0.1)
    w = time.monotonic()
    last = recorded(played.packets[-1][1])
    await asyncio.sleep(0.6)
    assert played.since(w) == []
    await played.control(action="resume")
    w = time.monotonic()
    await asyncio.sleep(0.4)
    resumed = played.since(w)
    assert resumed and abs(recorded(resumed[0]) - last - 1 / FPS) < 0.01  # from where it stopped


async def test_gap_and_end_of_range(played, segments):
    await played.play(segments, from_time=T0 + 19, start=T0, end=T0 + 31, speed=8)
    await wait_for(played.ended, 5.0, what="the end of the range")
    times = [recorded(p) for _, p in played.packets]
    assert times[0] == pytest.approx(T0 + 19) and max(times) < T0 + 31
    assert any(t >= T0 + 30 for t in times)  # the gap was skipped, the next segment played
    stamps = [p.timestamp for _, p in played.packets]
    assert all(0 < b - a <= 3600 for a, b in zip(stamps, stamps[1:]))  # one frame on over the gap
    info = (await played.node.call("streams", {}))["streams"]["pb"]
    assert info["elapsed"] == pytest.approx(max(times) - (T0 + 19), abs=0.05)  # gap included
    assert "pb" in played.node.streams  # left open: the server ends it (MediaStatus 121)


async def test_ps_packets_round_trip(played, segments):
    await played.play(segments[:1], speed=8)
    await asyncio.sleep(0.5)
    assert played.packets[0][1].keyframe
    for _, packet in played.packets:
        demuxer = PsDemuxer()
        frames = demuxer.feed(packet.ps) + demuxer.flush()
        assert [(f.stream, f.codec, f.data, f.pts, f.dts, f.keyframe) for f in frames] == \
            [(f.stream, f.codec, f.data, f.pts, f.dts, f.keyframe) for f in packet.frames]


async def test_unreadable_files_are_refused(played, tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"not an mp4")
    with pytest.raises(NodeError, match="can be read"):
        await played.play([{"path": str(tmp_path / "junk.mp4"), "start": T0, "end": T0 + 10},
                           {"path": str(tmp_path / "gone.mp4"), "start": T0 + 10, "end": T0 + 20}])
    assert "pb" not in played.node.streams


# -- through the server -------------------------------------------------------------------------


class Index:
    """The recordings index as PlaybackManager asks it (recording.RecordingManager.segments)."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    async def segments(self, channel_id: str, start: float, end: float) -> list[dict]:
        return [r for r in self.rows if channel_id == CHANNEL and r["end"] > start and r["start"] < end]


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, BEIJING).isoformat(timespec="seconds")


async def test_platform_playback_over_http_flv(make_server, segments):
    import aiohttp

    server = await make_server()
    server.channels.upsert(Channel(channel_id=CHANNEL, device_id="34020000001110000001", name="gate"))
    server.playbacks.recordings = Index(segments)  # device never registered: offline, unknown
    base = f"http://127.0.0.1:{server.http_port}"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{base}/api/v1/channels/{CHANNEL}/playback",
                             json={"start": iso(T0 + 5), "end": iso(T0 + 40), "source": "platform"}) as r:
            body = await r.json()
            assert r.status == 200, body
        assert body["source"] == "platform" and body["position_offset"] == 0.0
        sid = body["stream_id"]
        flv = await asyncio.to_thread(read_stream, body["urls"]["http_flv"], 2.0, None)
        timeline = video_timeline(flv)  # every frame decodes
        assert len(timeline) >= 25
        sent = [sei[1] / 1e9 for _, _, sei in timeline if sei is not None]
        assert sent[0] == pytest.approx(T0 + 5) and all(b > a for a, b in zip(sent, sent[1:]))

        async with http.post(f"{base}/api/v1/streams/{sid}/control",
                             json={"action": "seek", "offset": 26.5}) as r:
            out = await r.json()
            assert r.status == 200, out
        assert out["source"] == "platform" and out["state"] == "playing"
        # The keyframe at or before 26.5 s, counted from the seek (not from what played before it).
        assert 25.0 <= out["position_offset"] <= 26.5, out["position_offset"]
        async with http.post(f"{base}/api/v1/streams/{sid}/control",
                             json={"action": "speed", "scale": 8}) as r:
            assert r.status == 200
        async with http.post(f"{base}/api/v1/channels/{CHANNEL}/playback",
                             json={"start": iso(T0 + 100), "end": iso(T0 + 200), "source": "platform"}) as r:
            assert r.status == 404 and "no recording" in (await r.json())["error"]

    async def ended() -> bool:
        pb = server.playbacks.get(sid)
        return pb is not None and pb.state == "ended"
    await wait_for(ended, 10.0, what="the playback to end at the end of its range")
    assert server.playbacks.get(sid).ended_reason == "end of the platform recording"


async def test_cascade_uses_the_recordings(make_server, segments):
    from types import SimpleNamespace

    from gb28181.records import RecordQuery

    server = await make_server()
    server.channels.upsert(Channel(channel_id=CHANNEL, device_id="34020000001110000001", name="gate"))
    server.playbacks.recordings = Index(segments)
    playbacks = server.playbacks
    assert await playbacks.recorded_source(CHANNEL, T0, T0 + 40) == "platform"
    assert await playbacks.recorded_source(CHANNEL, T0 + 100, T0 + 200) == "device"
    # Half covered, device unknown (so not online): the recordings are better than nothing.
    assert await playbacks.recorded_source(CHANNEL, T0 + 30, T0 + 300) == "platform"

    uplink = SimpleNamespace(local_id="34020000002000000009")
    channel = server.channels.get(CHANNEL)
    query = RecordQuery(CHANNEL, datetime.fromtimestamp(T0 + 10, BEIJING),
                        datetime.fromtimestamp(T0 + 35, BEIJING), "all")
    items = await server.cascade.answers._platform_records(uplink, channel, query)
    assert [(i["FilePath"], i["StartTime"], i["EndTime"]) for i in items] == [
        ("a.mp4", iso(T0 + 10)[:19], iso(segments[0]["end"])[:19]),
        ("b.mp4", iso(T0 + 30)[:19], iso(T0 + 35)[:19])]
    assert items[0]["Type"] == "time" and items[0]["RecorderID"] == uplink.local_id
    alarm = RecordQuery(CHANNEL, query.start, query.end, "alarm")
    assert await server.cascade.answers._platform_records(uplink, channel, alarm) == []


async def test_platform_download(make_server, segments):
    import aiohttp
    import av

    server = await make_server()
    server.channels.upsert(Channel(channel_id=CHANNEL, device_id="34020000001110000001", name="gate"))
    server.playbacks.recordings = Index(segments)
    base = f"http://127.0.0.1:{server.http_port}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        async with http.post(f"{base}/api/v1/channels/{CHANNEL}/downloads",
                             json={"start": iso(T0 + 30), "end": iso(T0 + 38), "speed": 16,
                                   "source": "platform"}) as r:
            body = await r.json()
            assert r.status == 201, body

        async def done() -> bool:
            async with http.get(f"{base}/api/v1/downloads/{body['id']}") as r:
                return (await r.json())["state"] == "done"
        await wait_for(done, 10.0, what="the download to be done")
        async with http.get(f"{base}/api/v1/downloads/{body['id']}/file") as r:
            assert r.status == 200
            data = await r.read()
    path = segments[0]["path"] + ".out.mp4"
    with open(path, "wb") as f:
        f.write(data)
    with av.open(path) as container:
        frames = [p for p in container.demux(container.streams.video[0]) if p.size]
    assert 7 * FPS <= len(frames) <= 8 * FPS + 1
