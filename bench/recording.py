#!/usr/bin/env python3
"""Platform recording on one media node: N live streams recorded to MP4 segments in one process.

Each stream is a hub (``media.hub.Stream``) fed in real time with the simulator's real H.264
(``simulators.media.get_clip``: x264, ``--size`` at ``--fps`` and ``--bitrate`` kbit/s, a
keyframe every ``--gop`` frames; the streams start at different frames of the clip, so their
keyframes do not all fall on the same tick), PS-muxed as a device sends it. One asyncio loop
(uvloop) publishes a frame of every stream each 1/fps s, as the node's ingest would.

Runs, each for ``--seconds`` after a 2 s settle:

- ``hub only``: the publishing alone, the baseline;
- ``record``: a ``SegmentRecorder`` per stream (``media.recording``), ``--segment-seconds``;
- ``record + viewer``: the same plus, on ``--viewer-share`` of the streams, a viewer: a hub
  consumer muxing FLV (``media.flv.FlvMuxer``) as an HTTP-FLV viewer does, without the socket.

Printed per run: this process's CPU (user+sys, % of one core), the recording's CPU per stream
(over the baseline) and the recording streams one core carries at that rate, the longest
single publish tick (how long the loop was held: recording writes happen inside publish),
bytes written to disk per second against the video bitrate published, segments written, and
that every segment reads back (``probe_segment``; ``ffprobe -v error`` on a sample).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from media.flv import FlvMuxer
from media.hub import Stream
from media.packet import MediaPacket
from media.ps import PsFrame, PsMuxer
from media.recording import SegmentRecorder, probe_segment
from simulators.media import get_clip


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout.splitlines():
            if line.startswith("Model name"):
                model = line.split(":", 1)[1].strip()
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}"


class Source:
    """One camera: the clip from its own starting frame, 90 kHz timestamps running on."""

    def __init__(self, key: str, clip, ps: list[bytes], start: int, fps: int) -> None:
        self.hub = Stream(key)
        self.clip, self.ps, self.index, self.ticks = clip, ps, start, 90000 // fps
        self.ts = random.randrange(1 << 32)
        self.bytes = 0

    def publish(self) -> None:
        i = self.index % len(self.clip)
        au, key = self.clip.frames[i], self.clip.keyframes[i]
        ts = self.ts & 0xFFFFFFFF
        self.hub.publish(MediaPacket(self.ps[i], ts, [PsFrame("video", "h264", au, ts, ts, key)], key))
        self.index += 1
        self.ts += self.ticks
        self.bytes += len(au)


def on_disk(root: Path) -> int:
    """Bytes in the segment files (open ones too) under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def viewer(hub: Stream) -> None:
    """An HTTP-FLV viewer's work without its socket: every packet muxed to FLV tags."""
    consumer = hub.subscribe("viewer")
    muxer = FlvMuxer()

    def take() -> None:
        with contextlib.suppress(Exception):
            while (pkt := consumer.get_nowait()) is not None:
                muxer.mux(pkt)

    consumer.listen(take)


async def run(mode: str, args, clip, ps: list[bytes], root: Path) -> dict:
    sources = [Source(f"3402000000132{i:07d}", clip, ps, random.randrange(len(clip)), args.fps)
               for i in range(args.streams)]
    recorders = []
    if mode != "hub only":
        for s in sources:
            rec = SegmentRecorder(s.hub, s.hub.key, root, segment_seconds=args.segment_seconds)
            rec.start()
            recorders.append(rec)
    if mode == "record + viewer":
        for s in sources[: round(args.streams * args.viewer_share)]:
            viewer(s.hub)
    period = 1 / args.fps
    t0 = time.monotonic()
    tick = 0
    worst = 0.0
    window_from = t0 + 2.0  # settle: the first GOP and files opened
    cpu0 = bytes0 = None
    end = window_from + args.seconds
    while True:
        now = time.monotonic()
        if cpu0 is None and now >= window_from:
            cpu0, bytes0, w0 = time.process_time(), sum(s.bytes for s in sources), now
            disk0 = on_disk(root)
        if now >= end:
            break
        started = time.perf_counter()
        for s in sources:
            s.publish()
        worst = max(worst, time.perf_counter() - started) if cpu0 is not None else worst
        tick += 1
        delay = t0 + tick * period - time.monotonic()
        await asyncio.sleep(max(0.0, delay))
    assert cpu0 is not None and bytes0 is not None
    cpu = time.process_time() - cpu0
    wall = time.monotonic() - w0
    published = sum(s.bytes for s in sources) - bytes0
    written = on_disk(root) - disk0
    segments = []
    for rec in recorders:
        segments += await rec.stop()
    for s in sources:
        s.hub.close("bench done")
    return {"cpu": cpu / wall, "wall": wall, "worst_tick": worst, "published_bps": 8 * published / wall,
            "segments": segments, "written": written, "late": time.monotonic() - end}


def check(segments: list[dict], sample: int = 5) -> tuple[int, int]:
    """(segments that read back with probe_segment, ffprobe-clean ones of a sample)."""
    readable = sum(1 for seg in segments if (p := probe_segment(seg["path"])) and p["frames"] == seg["frames"])
    clean = 0
    for seg in random.sample(segments, min(sample, len(segments))):
        out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", seg["path"]], capture_output=True,
                             text=True, timeout=60)
        clean += out.returncode == 0 and not out.stderr.strip()
    return readable, clean


async def main_async(args) -> None:
    clip = get_clip("h264", args.size, args.fps, args.gop, args.bitrate)
    mux = PsMuxer("h264", None)
    ps = [mux.mux_video(au, i * 3600, i * 3600, key)
          for i, (au, key) in enumerate(zip(clip.frames, clip.keyframes, strict=True))]
    clip_bps = 8 * sum(map(len, clip.frames)) * args.fps / len(clip)
    print(f"# {machine()}; {args.streams} streams of {args.size} H.264 {args.fps} fps, GOP {args.gop}, "
          f"{clip_bps / 1000:.0f} kbit/s; {args.seconds:g} s per run, segments of {args.segment_seconds} s")
    base = None
    for mode in args.modes:
        with tempfile.TemporaryDirectory(prefix="gb-rec-", dir=args.dir) as tmp:
            r = await run(mode, args, clip, ps, Path(tmp))
            line = (f"{mode:16s} cpu {100 * r['cpu']:5.1f} %  worst tick {1000 * r['worst_tick']:6.1f} ms  "
                    f"late {r['late']:.2f} s")
            if mode == "hub only":
                base = r["cpu"]
            elif r["segments"]:
                per = (r["cpu"] - (base or 0.0)) / args.streams
                readable, clean = check(r["segments"])
                line += (f"  per stream {100 * per:.2f} % -> {1 / per if per > 0 else float('inf'):.0f} "
                         f"recording streams/core  written {8 * r['written'] / r['wall'] / 1e6:.2f} Mbit/s "
                         f"vs published {r['published_bps'] / 1e6:.2f} Mbit/s "
                         f"({r['written'] / (r['published_bps'] / 8 * r['wall']):.3f}x)  "
                         f"segments {len(r['segments'])}, {readable} read back, {clean} ffprobe-clean of a sample")
            print(line, flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=30.0, help="measured window per run (default 30)")
    ap.add_argument("--size", default="640x360")
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--gop", type=int, default=50)
    ap.add_argument("--bitrate", type=int, default=1000, help="kbit/s of the clip (default 1000)")
    ap.add_argument("--segment-seconds", type=int, default=60)
    ap.add_argument("--viewer-share", type=float, default=0.5, help="streams with a viewer (default 0.5)")
    ap.add_argument("--modes", nargs="+", default=["hub only", "record", "record + viewer"],
                    choices=["hub only", "record", "record + viewer"])
    ap.add_argument("--dir", default=None, help="where the segments go (default: the temp dir)")
    args = ap.parse_args(argv)
    if shutil.which("ffprobe") is None:
        raise SystemExit("ffprobe is needed to check the segments: install FFmpeg")
    random.seed(1)
    try:
        import uvloop
        uvloop.run(main_async(args))
    except ImportError:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
