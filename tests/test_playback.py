"""Playback of device recordings (GB/T 28181-2016 §9.8, Annex B) on the shipped server.

`gb28181 serve` (with its media workers) and `gb28181-sim`, whose every frame carries its
recorded time in an SEI: playback starts at the asked time, a seek lands where it should, a
faster scale advances recorded time faster, pause stops and resume continues, one viewer's
FLV decodes cleanly with timestamps that run on across all of it, and the end of the range
ends the stream through MediaStatus 121. Over udp, tcp-passive and tcp-active.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

import pytest

from gb28181 import mansrtsp
from gb28181.registrar import BEIJING

from .conftest import ffprobe, listed, read_stream, video_timeline, wait_until

pytestmark = pytest.mark.slow

GOP_S = 1.0  # the simulator runs --gop 25 at 25 fps
SIM_ARGS = ("--video-size", "320x240", "--gop", "25", "--fps", "25", "--progress", "0",
            "--keepalive-interval", "5")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, BEIJING).isoformat(timespec="seconds")


def recorded(frame) -> float:
    """Recorded time (Unix seconds) the simulator wrote into a frame's SEI."""
    assert frame[2] is not None, "a frame without the simulator's SEI"
    return frame[2][1] / 1e9


def channels_of(server, count: int) -> list[str]:
    def ready():
        status, body = server.api("/api/v1/channels?limit=100")
        found = sorted(c["channel_id"] for c in listed(body) if c["kind"] == "channel"
                       and c["status"] == "online")
        return len(found) >= count and found[:count]
    return wait_until(ready, 30, f"{count} camera channels", server.exited)


def stream(server, stream_id: str) -> dict:
    status, body = server.api(f"/api/v1/streams/{stream_id}")
    assert status == 200, body
    return body


def control(server, stream_id: str, **body) -> dict:
    status, out = server.api(f"/api/v1/streams/{stream_id}/control", "POST", body)
    assert status == 200, out
    return out


def play_and_control(server, channel_id: str, transport: str, t0: int) -> None:
    status, body = server.api(f"/api/v1/channels/{channel_id}/playback", "POST",
                              {"start": iso(t0), "end": iso(t0 + 1800), "transport": transport})
    assert status == 200, body
    sid, url = body["stream_id"], body["urls"]["http_flv"]
    assert sid != channel_id and stream(server, sid)["kind"] == "playback"
    with ThreadPoolExecutor(1) as pool:
        capture = pool.submit(read_stream, url, 13.0, None)  # one viewer through everything
        time.sleep(2.0)
        control(server, sid, action="seek", offset=600)
        time.sleep(2.0)
        control(server, sid, action="speed", scale=4)
        time.sleep(0.5)
        p1, w1 = stream(server, sid)["position_offset"], time.monotonic()
        time.sleep(2.5)
        p2, w2 = stream(server, sid)["position_offset"], time.monotonic()
        paused = control(server, sid, action="pause")
        assert paused["state"] == "paused"
        time.sleep(0.5)
        q1 = stream(server, sid)["position_offset"]
        time.sleep(1.5)
        q2 = stream(server, sid)["position_offset"]
        control(server, sid, action="resume")
        time.sleep(1.0)
        q3 = stream(server, sid)["position_offset"]
        flv = capture.result()
    frames = video_timeline(flv)  # every frame decodes, across the seek and the pause
    where = f"{transport}: "
    # Playback from T starts at the keyframe at or before T.
    assert frames[0][1], where + "the first frame is not a keyframe"
    assert t0 - GOP_S - 0.05 <= recorded(frames[0]) <= t0 + 0.05, where + f"{recorded(frames[0]) - t0:+.2f} s"
    # The seek lands within one GOP of T+600, and nothing from before it follows it.
    after = [f for f in frames if recorded(f) >= t0 + 300]
    assert after, where + "no frame after the seek"
    landed = recorded(after[0]) - t0 - 600
    assert -GOP_S - 0.05 <= landed <= 0.05, where + f"the seek landed {landed:+.2f} s from T+600"
    assert after[0][1], where + "the first frame after the seek is not a keyframe"
    first_after = frames.index(after[0])
    assert all(recorded(f) >= t0 + 300 for f in frames[first_after:]), where + "frames from before the seek after it"
    # Scale 4: recorded time runs 4x wall time (within 10 %).
    rate = (p2 - p1) / (w2 - w1)
    assert 3.6 <= rate <= 4.4, where + f"recorded time ran {rate:.2f}x wall time at scale 4"
    # Pause stops the frames (one frame may be in flight); resume continues from there.
    assert q2 - q1 <= 0.2, where + f"the position moved {q2 - q1:.2f} s while paused"
    assert q3 > q2 + 1.0, where + "resume did not continue"
    # One viewer, one timeline: FLV timestamps from 0, never back, never a jump.
    stamps = [f[0] for f in frames]
    assert stamps[0] == 0.0
    assert all(b >= a for a, b in zip(stamps, stamps[1:])), where + "FLV timestamps went back"
    assert max(b - a for a, b in zip(stamps, stamps[1:])) <= 0.5, where + "FLV timestamps jumped"
    status, _ = server.api(f"/api/v1/streams/{sid}", "DELETE")
    assert status == 200


def test_playback_seek_speed_pause_over_every_transport(served, sims):
    server = served()
    sims(server, "--devices", "3", *SIM_ARGS)
    channels = channels_of(server, 3)
    t0 = int(time.time()) - 7200
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda a: play_and_control(server, *a, t0),
                      zip(channels, ("udp", "tcp-passive", "tcp-active"), strict=True)))
    status, body = server.api("/api/v1/audit?limit=200")
    actions = [e["action"] for e in body["entries"]]
    assert actions.count("playback") == 3 and actions.count("control") == 12, actions
    assert not server.error_lines(), server.error_lines()


def test_the_end_of_the_range_ends_the_stream_through_media_status(served, sims):
    server = served()
    sims(server, "--devices", "1", *SIM_ARGS)
    (channel,) = channels_of(server, 1)
    t0 = int(time.time()) - 3600
    status, body = server.api(f"/api/v1/channels/{channel}/playback", "POST",
                              {"start": iso(t0), "end": iso(t0 + 3)})
    assert status == 200, body
    sid = body["stream_id"]
    started = time.monotonic()
    flv = read_stream(body["urls"]["http_flv"], 15.0, None)  # returns when the stream ends
    assert time.monotonic() - started < 10, "the stream did not end with the range"
    frames = video_timeline(flv)
    assert t0 + 2.9 <= recorded(frames[-1]) < t0 + 3.05
    ended = wait_until(lambda: (s := stream(server, sid))["state"] == "ended" and s, 5,
                       "the playback ended", server.exited)
    assert "MediaStatus 121" in ended["ended_reason"]
    status, out = server.api(f"/api/v1/streams/{sid}/control", "POST", {"action": "pause"})
    assert status == 409 and "ended" in out["error"]
    assert sid not in {s["stream_id"] for s in listed(server.api("/api/v1/streams")[1])}


def test_playback_requests_with_bad_input_get_reasons(served):
    server = served(GB28181_MEDIA__WORKERS="1")
    cases = [({"start": "yesterday", "end": "now"}, 400), ({"start": "2h", "end": "3h"}, 400),
             ({"start": "2h", "end": "now", "transport": "sctp"}, 400),
             ({"start": "2h", "end": "now", "speed": 2}, 400)]
    for body, want in cases:
        status, out = server.api("/api/v1/channels/34020000001310000001/playback", "POST", body)
        assert status == want and out["error"], (body, status, out)
    status, out = server.api("/api/v1/channels/34020000001310000001/playback", "POST",
                             {"start": "2h", "end": "1h"})
    assert status == 404 and "no channel" in out["error"]
    status, out = server.api("/api/v1/streams/nope/control", "POST", {"action": "pause"})
    assert status == 404
    status, out = server.api("/api/v1/streams/nope/control", "POST", {"action": "rewind"})
    assert status == 400


def test_mansrtsp_bodies_round_trip_and_bad_ones_are_refused():
    for c in (mansrtsp.Control("PAUSE", 1), mansrtsp.Control("PLAY", 2, resume=True),
              mansrtsp.Control("PLAY", 3, npt=600.0), mansrtsp.Control("PLAY", 4, scale=0.25),
              mansrtsp.Control("TEARDOWN", 5)):
        assert mansrtsp.parse(mansrtsp.build(c)) == c
    assert mansrtsp.parse(b"PLAY MANSRTSP/1.0\nCSeq: 7\nScale: 2.0\n").action == "speed"
    assert mansrtsp.parse(b"PAUSE RTSP/1.0\r\nCSeq: 8\r\nPauseTime: now\r\n\r\n").action == "pause"
    for bad in (b"", b"GET / HTTP/1.1\r\n", b"PLAY RTSP/1.0\r\nCSeq: x\r\n", b"PLAY RTSP/1.0\r\n",
                b"PLAY RTSP/1.0\r\nCSeq: 1\r\nScale: 100\r\n", b"PLAY RTSP/1.0\r\nCSeq: 1\r\nRange: clock=1-\r\n",
                b"PLAY RTSP/1.0\r\nCSeq: 1\r\nRange: npt=abc-\r\n", b"\xff\xfe", b"PLAY RTSP/1.0\r\nnoheader\r\n",
                b"PLAY RTSP/1.0\r\nCSeq: 1\r\n" + b"X: y\r\n" * 400):
        with pytest.raises(mansrtsp.MansrtspError):
            mansrtsp.parse(bad)


def test_a_download_at_speed_4_is_an_mp4_of_the_range(served, sims, tmp_path):
    import urllib.request

    from .conftest import TOKEN
    server = served(GB28181_MEDIA__DOWNLOADS_PER_DEVICE="3")
    sims(server, "--devices", "1", *SIM_ARGS)
    (channel,) = channels_of(server, 1)
    t0 = int(time.time()) - 7200
    began = time.monotonic()
    status, dl = server.api(f"/api/v1/channels/{channel}/downloads", "POST",
                            {"start": iso(t0), "end": iso(t0 + 60), "speed": 4, "transport": "tcp-passive"})
    assert status == 201, dl
    assert dl["state"] == "downloading" and dl["speed"] == 4
    # More downloads of the device over the other transports are served, up to its limit.
    others = []
    for transport in ("udp", "tcp-active"):
        status, other = server.api(f"/api/v1/channels/{channel}/downloads", "POST",
                                   {"start": iso(t0 - 600), "end": iso(t0 - 590), "speed": 2,
                                    "transport": transport})
        assert status == 201, other
        others.append(other)
    status, refused = server.api(f"/api/v1/channels/{channel}/downloads", "POST",
                                 {"start": iso(t0 - 300), "end": iso(t0 - 290)})
    assert status == 429 and "downloads_per_device" in refused["error"], refused
    time.sleep(5)
    midway = server.api(f"/api/v1/downloads/{dl['id']}")[1]
    assert 0.1 < midway["progress"] < 0.9 and midway["state"] == "downloading", midway
    status, early = server.api(f"/api/v1/downloads/{dl['id']}/file")
    assert status == 409
    done = wait_until(lambda: (d := server.api(f"/api/v1/downloads/{dl['id']}")[1])["state"] != "downloading" and d,
                      40, "the download to finish", server.exited)
    took = time.monotonic() - began
    assert done["state"] == "done" and done["progress"] == 1.0, done
    assert 10 <= took <= 30, f"60 s at speed 4 took {took:.1f} s"
    # The file, through the API as a user fetches it, and a byte range of it.
    req = urllib.request.Request(f"{server.base}/api/v1/downloads/{dl['id']}/file",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Content-Type"] == "video/mp4"
        data = resp.read()
    assert len(data) == done["bytes"] > 100_000
    path = tmp_path / "download.mp4"
    path.write_bytes(data)
    duration, frames, _, errors = ffprobe(path)
    assert not errors, errors
    assert 59.0 <= duration <= 61.0 and 59 * 25 <= frames <= 61 * 25, (duration, frames)
    print(f"download of 60 s at speed 4: {took:.1f} s, {duration:.2f} s in the MP4, {frames} frames")
    req.add_header("Range", "bytes=100-199")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.status == 206 and resp.read() == data[100:200]
    for other in others:  # 10 s at speed 2, over udp and tcp-active
        d = server.api(f"/api/v1/downloads/{other['id']}")[1]
        assert d["state"] == "done" and 9.0 <= d["seconds"] <= 11.0, d
    listed_ids = {d["id"] for d in server.api("/api/v1/downloads")[1]["downloads"]}
    assert {dl["id"], *(o["id"] for o in others)} <= listed_ids
    status, body = server.api("/api/v1/audit?limit=50")
    actions = [e["action"] for e in body["entries"]]
    assert actions.count("download") == 3 and "download-failed" in actions and "export" in actions
    assert not server.error_lines(), server.error_lines()


def test_playback_skips_what_the_device_did_not_record(served, sims):
    from simulators.records import RecordIndex
    server = served()
    sims(server, "--devices", "1", "--records", "2", *SIM_ARGS)
    (channel,) = channels_of(server, 1)
    files = RecordIndex(channel, 2, time.time()).segments()
    # The first gap of a minute or more between two files yesterday or today.
    gap = next((a.end.timestamp(), b.start.timestamp()) for a, b in zip(files, files[1:])
               if (b.start - a.end).total_seconds() >= 60)
    t0, t1 = int(gap[0]) - 3, int(gap[1]) + 3
    status, body = server.api(f"/api/v1/channels/{channel}/playback", "POST",
                              {"start": iso(t0), "end": iso(t1)})
    assert status == 200, body
    frames = video_timeline(read_stream(body["urls"]["http_flv"], 12.0, None))
    times = [recorded(f) for f in frames]
    assert not [t for t in times if gap[0] <= t < gap[1]], "frames from inside the gap"
    before = [t for t in times if t < gap[0]]
    after = [f for f in frames if recorded(f) >= gap[1]]
    assert before and after, (len(before), len(after))
    assert after[0][1] and recorded(after[0]) - gap[1] < GOP_S, "the next file starts at its first keyframe"
    assert max(times) >= t1 - 0.2, "the range was played to its end"
    ended = wait_until(lambda: (s := stream(server, body["stream_id"]))["state"] == "ended" and s, 10,
                       "the playback ended", server.exited)
    assert "MediaStatus 121" in ended["ended_reason"]
    # A range with nothing recorded in it: the device ends it at once, and so does the play.
    asked = time.monotonic()
    status, out = server.api(f"/api/v1/channels/{channel}/playback", "POST",
                             {"start": iso(gap[0] + 10), "end": iso(gap[0] + 40)})
    assert status == 404 and "nothing" in out["error"], out
    assert time.monotonic() - asked < 5
