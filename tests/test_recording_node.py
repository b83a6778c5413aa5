"""Platform recording on a media node (src/media/recording.py): real H.264 through a real hub
into fragmented MP4 segments that ffprobe reads without an error line.

The recorder's wall clock is injected: packets are published as fast as the test can, each with
the time it "arrived", so rotation at whole ``segment_seconds`` and the 5 s gap rule are checked
to the frame without sleeping. The node commands run on both event loops (conftest).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest

from media.hub import Stream
from media.node import MediaNode, NodeError
from media.packet import MediaPacket
from media.recording import (
    BEIJING,
    SegmentRecorder,
    complete_prefix,
    probe_segment,
    repair_segment,
    segment_path,
    segment_start_from_name,
)

from .conftest import ffprobe
from .test_hub import FPS, GOP, looped_packets

pytest.importorskip("av", exc_type=ImportError)

CH = "34020000001320000001"
T0 = 1_700_000_000.5  # Unix seconds; 1_700_000_000 is a whole 2 s (and a Beijing 2 s) boundary
STEP = 1 / FPS


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def probed(path: str | Path) -> dict:
    """ffprobe's duration, decoded frame count and codec; fails on any error line."""
    duration, frames, codec, errors = ffprobe(path)
    assert not errors, f"{path}: {errors}"
    return {"duration": duration, "frames": frames, "codec": codec}


def feed(hub: Stream, clock: Clock, packets: list[MediaPacket]) -> None:
    """Publish each video packet one frame interval after the previous one."""
    for p in packets:
        hub.publish(p)
        clock.now += STEP


def recorder(hub: Stream, root: Path, clock: Clock, events: list[dict], **kw) -> SegmentRecorder:
    rec = SegmentRecorder(hub, CH, root, clock=clock, on_event=events.append, **kw)
    rec.start()
    return rec


def closed(events: list[dict]) -> list[dict]:
    return [e for e in events if e["state"] == "closed"]


needs_ffprobe = pytest.mark.skipif(shutil.which("ffprobe") is None, reason="ffprobe not installed")


def test_segment_names_are_beijing_time() -> None:
    path = segment_path("/r", CH, T0)
    local = datetime.fromtimestamp(T0, BEIJING)
    assert path == Path("/r", CH, local.strftime("%Y%m%d"), f"{CH}_{local:%Y%m%dT%H%M%S}.mp4")
    assert local.utcoffset().total_seconds() == 8 * 3600
    assert segment_start_from_name(path) == (CH, int(T0))
    assert segment_start_from_name(str(path) + ".part") == (CH, int(T0))
    assert segment_start_from_name("/r/x.mp4") is None


@needs_ffprobe
async def test_segments_rotate_at_whole_segment_seconds_on_a_keyframe(tmp_path) -> None:
    hub, clock, events = Stream(CH), Clock(), []
    rec = recorder(hub, tmp_path, clock, events, segment_seconds=2)
    packets = looped_packets(150)  # 6 s, a keyframe every second
    feed(hub, clock, packets)
    segments = await rec.stop()

    # Keyframes at T0 + 0, 1, 2, ...: the boundaries T0 + 1.5 and T0 + 3.5 end a segment at the
    # keyframe after them, so three files of two seconds (50 frames) each.
    assert [e["state"] for e in events] == ["open", "closed"] * 3, events
    assert segments == closed(events)
    assert [s["start"] for s in segments] == pytest.approx([T0, T0 + 2, T0 + 4])
    assert [s["end"] for s in segments] == pytest.approx([T0 + 2, T0 + 4, T0 + 6])
    assert [s["frames"] for s in segments] == [50, 50, 50]
    assert not any(s["gap_before"] for s in segments)
    assert not list(tmp_path.rglob("*.part")), "a cleanly closed segment is renamed"
    for s in segments:
        path = Path(s["path"])
        assert path == segment_path(tmp_path, CH, s["start"]) and path.stat().st_size == s["bytes"]
        probe = probed(path)
        assert probe["frames"] == 50 and probe["codec"] == "h264"
        assert probe["duration"] == pytest.approx(2.0, abs=0.05)
        assert probe_segment(path) == {"path": str(path), "channel": CH, "start": pytest.approx(s["start"]),
                                       "end": pytest.approx(s["end"]), "bytes": s["bytes"], "frames": 50,
                                       "codec": "h264", "gap_before": False}
    assert hub.consumer_count == 0, "the recorder left the hub"


async def test_a_gap_closes_the_segment_and_the_next_one_says_so(tmp_path) -> None:
    hub, clock, events = Stream(CH), Clock(), []
    rec = recorder(hub, tmp_path, clock, events, segment_seconds=3600)
    packets = looped_packets(150)
    feed(hub, clock, packets[:50])
    rec.tick(clock.now + 4.9)
    assert [e["state"] for e in events] == ["open"], "4.9 s without a packet is not a gap"
    clock.now += 5.5
    rec.tick(clock.now)  # what the recorder's own task does every second
    assert [e["state"] for e in events] == ["open", "closed"]
    assert events[1]["frames"] == 50 and events[1]["end"] == pytest.approx(T0 + 2)
    # The stream goes on (the device is back, a mid-GOP packet first): a new segment from the
    # next keyframe, marked as following a gap.
    feed(hub, clock, packets[60:100])
    assert [e["state"] for e in events] == ["open", "closed", "open"]
    assert events[2]["gap_before"] and events[2]["start"] == pytest.approx(T0 + 2 + 5.5 + 15 * STEP)
    # A gap seen by the next packet itself (the task has not run yet) closes it all the same.
    clock.now += 6
    feed(hub, clock, packets[100:150])
    states = [(e["state"], e["gap_before"]) for e in events]
    assert states == [("open", False), ("closed", False), ("open", True), ("closed", True),
                      ("open", True)], states
    assert events[3]["frames"] == 25
    # The hub closes (the stream ended): the open segment is closed and the recorder stops.
    hub.close("stream restarted")
    assert rec.stopped and events[-1]["state"] == "closed" and events[-1]["frames"] == 50
    assert len(await rec.stop()) == 3
    assert not list(tmp_path.rglob("*.part"))


async def test_preroll_starts_at_the_cached_keyframe_else_at_the_next(tmp_path) -> None:
    packets = looped_packets(100)
    for preroll, first_frame in ((True, GOP), (False, 2 * GOP)):
        hub, clock, events = Stream(CH), Clock(), []
        feed(hub, clock, packets[:40])  # the GOP cache holds frames 25..39
        rec = recorder(hub, tmp_path / str(preroll), clock, events, preroll=preroll)
        feed(hub, clock, packets[40:])
        segments = await rec.stop()
        assert len(segments) == 1 and segments[0]["frames"] == 100 - first_frame, (preroll, segments)
        # The cached packets are dated back by their media time from the newest one.
        assert segments[0]["start"] == pytest.approx(T0 + first_frame * STEP - (STEP if preroll else 0))


async def test_stream_of_a_new_recorder_after_a_restart_is_marked(tmp_path) -> None:
    hub, clock, events = Stream(CH), Clock(), []
    rec = recorder(hub, tmp_path, clock, events, gap_before=True)
    feed(hub, clock, looped_packets(30))
    (segment,) = await rec.stop()
    assert segment["gap_before"] and segment["frames"] == 30
    assert probe_segment(segment["path"])["gap_before"] is True


@needs_ffprobe
async def test_a_segment_cut_mid_fragment_is_repaired_to_its_whole_gops(tmp_path) -> None:
    hub, clock, events = Stream(CH), Clock(), []
    rec = recorder(hub, tmp_path, clock, events)
    feed(hub, clock, looped_packets(110))
    # The recorder is still writing: GOPs 1-4 are on disk (a fragment is flushed when the next
    # keyframe comes), the fifth is in FFmpeg's memory. A SIGKILL now leaves the .part as it is;
    # cut it inside its last fragment as well, as a crash during a write would.
    (part,) = tmp_path.rglob("*.mp4.part")
    cut = part.with_name(part.name.replace(".mp4.part", "-cut.mp4.part"))
    shutil.copy(part, cut)
    size = cut.stat().st_size
    os.truncate(cut, size - 5000)
    assert complete_prefix(cut) < size - 5000
    fixed = repair_segment(cut)
    assert fixed is not None and not cut.exists()
    assert fixed["path"] == str(cut).removesuffix(".part")
    assert fixed["frames"] == 3 * GOP, "the whole fragments before the cut, and nothing broken"
    assert fixed["start"] == pytest.approx(T0) and fixed["end"] == pytest.approx(T0 + 3)
    probe = probed(fixed["path"])
    assert probe["frames"] == 3 * GOP and probe["duration"] == pytest.approx(3.0, abs=0.05)
    # The original, finished, has everything.
    (segment,) = await rec.stop()
    assert segment["frames"] == 110 and probed(segment["path"])["frames"] == 110

    # Nothing readable (a crash before the first fragment): the .part goes, nothing comes back.
    empty = tmp_path / f"{CH}_20231115T061320.mp4.part"
    empty.write_bytes(Path(segment["path"]).read_bytes()[:600])
    assert repair_segment(empty) is None and not empty.exists()
    assert not list(tmp_path.glob("*.repairing"))
    with pytest.raises(ValueError, match="not a .part"):
        repair_segment(segment["path"])


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full to stand for a full disk")
async def test_a_full_disk_fails_the_segment_and_stops_the_recorder(tmp_path, monkeypatch) -> None:
    import av

    real_open = av.open

    def full_disk(path, mode="r", **kw):  # every write to a segment: ENOSPC, from FFmpeg itself
        return real_open("/dev/full" if str(path).endswith(".part") else path, mode, **kw)

    monkeypatch.setattr(av, "open", full_disk)
    hub, clock, events = Stream(CH), Clock(), []
    rec = recorder(hub, tmp_path, clock, events)
    feed(hub, clock, looped_packets(60))  # nothing escapes into the publisher
    assert rec.stopped and "No space left on device" in rec.error, rec.error
    assert events[-1]["state"] == "failed" and "No space left" in events[-1]["error"], events
    assert hub.consumer_count == 0
    assert (await rec.stop())[-1]["state"] == "failed"


async def test_an_unwritable_directory_is_reported_as_failed(tmp_path) -> None:
    (tmp_path / CH).write_text("a file where the channel's directory should be")
    hub, clock, events = Stream(CH), Clock(), []
    rec = recorder(hub, tmp_path, clock, events)
    feed(hub, clock, looped_packets(30))
    assert rec.stopped and [e["state"] for e in events] == ["failed"], events
    assert events[0]["error"] and events[0]["frames"] == 0


async def test_record_start_and_stop_as_node_commands(tmp_path) -> None:
    events: list[dict] = []
    node = MediaNode("127.0.0.1", udp_port=0, data_dir=tmp_path, on_event=events.append)
    await node.start()
    try:
        await node.call("open", {"stream": CH, "transport": "udp", "ssrc": 1})
        ns = node.streams[CH]
        args = {"stream": CH, "channel": CH, "root": str(tmp_path / "records"), "segment_seconds": 60,
                "preroll": True}
        with pytest.raises(NodeError, match="segment_seconds"):
            await node.call("record_start", {**args, "segment_seconds": 0})
        with pytest.raises(NodeError, match="channel"):
            await node.call("record_start", {**args, "channel": "../etc"})
        with pytest.raises(NodeError, match="no stream"):
            await node.call("record_start", {**args, "stream": "nope"})
        assert await node.call("record_start", args) == {"recording": True}
        assert await node.call("record_start", args) == {"recording": True}  # already: the same one
        packets = looped_packets(70)
        for p in packets[:40]:
            ns.publish(p)
            await asyncio.sleep(0)
        info = (await node.call("streams", {}))["streams"][CH]
        assert info["segments"]["recording"] and info["segments"]["frames"] == 40
        result = await node.call("record_stop", {"stream": CH})
        (segment,) = result["segments"]
        assert segment["state"] == "closed" and segment["frames"] == 40 and segment["stream"] == CH
        assert Path(segment["path"]).exists() and probe_segment(segment["path"])["frames"] == 40
        assert [(e["event"], e["state"]) for e in events if e["event"] == "segment"] == [
            ("segment", "open"), ("segment", "closed")]
        assert await node.call("record_stop", {"stream": CH}) == {"segments": []}

        # Closing the stream closes the segment of a recorder still running (this one started
        # with the cached GOP: frames 25-39, then 30 more).
        await node.call("record_start", args)
        for p in packets[40:]:
            ns.publish(p)
        out = await node.call("close", {"stream": CH})
        assert out["closed"] and out["segments"][-1]["frames"] == 15 + 30
        assert out["segments"][-1]["state"] == "closed"
        assert not list((tmp_path / "records").rglob("*.part"))
    finally:
        await node.close()


CRASH = """
import asyncio, sys
from media.hub import Stream
from media.recording import SegmentRecorder
from tests.test_hub import looped_packets

async def main():
    clock = [1_700_000_000.5]
    hub = Stream("c")
    rec = SegmentRecorder(hub, sys.argv[1], sys.argv[2], clock=lambda: clock[0])
    rec.start()
    for p in looped_packets(110):
        hub.publish(p)
        clock[0] += 0.04
    print("written", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@needs_ffprobe
def test_a_recorder_killed_with_sigkill_leaves_a_part_that_repairs(tmp_path) -> None:
    import signal
    import sys

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-c", CRASH, CH, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, cwd=root, env={**os.environ, "PYTHONPATH": f"{root}:{root / 'src'}"})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    (part,) = tmp_path.rglob("*.mp4.part")
    fixed = repair_segment(part)
    assert fixed is not None and fixed["frames"] == 4 * GOP, fixed  # the fifth GOP was in memory
    assert probed(fixed["path"])["frames"] == 4 * GOP
    assert not list(tmp_path.rglob("*.part"))


@needs_ffprobe
async def test_h265_segments(tmp_path) -> None:
    from .test_hub import encode, make_packets

    hub, clock, events = Stream(CH), Clock(), []
    rec = recorder(hub, tmp_path, clock, events)
    feed(hub, clock, make_packets(encode("libx265"), codec="h265"))
    (segment,) = await rec.stop()
    assert segment["codec"] == "h265" and segment["frames"] == 75
    probe = probed(segment["path"])
    assert probe["codec"] == "hevc" and probe["frames"] == 75
    assert probe_segment(segment["path"])["codec"] == "h265"
