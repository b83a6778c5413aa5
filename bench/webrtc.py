#!/usr/bin/env python3
"""WebRTC viewers (WHEP): CPU per viewer, start time and added latency.

One `gb28181 serve` process with ``--workers`` media worker processes and one `gb28181-sim`
process of NVRs (``--channels-per-nvr`` cameras each) on 127.0.0.1; the viewers are aiortc peers
in this process, each a WHEP client (POST the offer, set the answer). Two runs:

- ``--viewers`` viewers of one channel (one upstream, shared);
- one viewer on each of ``--channels`` channels.

For each: start time (POST → the viewer's first frame out of aiortc) p50/p95; then, after
``--settle`` seconds, a window of ``--seconds``: CPU of the server and its media workers
(user+sys, psutil) per viewer, given as viewers per core; added latency, the simulator's SEI
send time (wall clock, inside the H.264 access unit) → the moment aiortc hands the
depacketized access unit to its decoder (the SEI is read there: aiortc's frames carry no
bitstream), p50/p99; frames per viewer against fps × seconds.

``--no-decode`` skips the viewers' H.264 decoding (the frame is counted when depacketized),
so that a hundred viewers in this process do not take the cores the server is measured on.

    python bench/webrtc.py                       # 10 viewers of 1 channel, 1 viewer × 20 channels
    python bench/webrtc.py --channels 100 --no-decode
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from relay import tree_cpu  # noqa: E402

# bench/registry.py would shadow the registry package the server's modules import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import av  # noqa: E402
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription  # noqa: E402
from aiortc.codecs import h264  # noqa: E402
from aiortc.mediastreams import MediaStreamError  # noqa: E402

from simulators.media import parse_sim_sei  # noqa: E402
from tests.conftest import TOKEN, ServedServer, SimProcess, listed  # noqa: E402

AUTH = {"Authorization": f"Bearer {TOKEN}"}
FIRST_NVR = "34020100001180000001"

# -- the SEI where aiortc decodes: the access unit as depacketized ---------------------------------
LATENCIES: list[float] = []  # ms, SEI send time → depacketized, every viewer's frames
_decode = h264.H264Decoder.decode
_DUMMY = av.VideoFrame(16, 16, "yuv420p")
NO_DECODE = False


def _measuring_decode(self, encoded_frame):  # runs in aiortc's decoder thread
    sei = parse_sim_sei(encoded_frame.data, "h264")
    if sei is not None:
        LATENCIES.append((time.time_ns() - sei[1]) / 1e6)
    if NO_DECODE:
        return [_DUMMY]
    return _decode(self, encoded_frame)


h264.H264Decoder.decode = _measuring_decode  # type: ignore[method-assign]


class Viewer:
    def __init__(self, base: str, channel_id: str) -> None:
        self.base = base
        self.channel_id = channel_id
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.frames = 0
        self.posted = 0.0
        self.first: float | None = None
        self.location = ""
        self.task: asyncio.Task | None = None

        @self.pc.on("track")
        def on_track(track) -> None:
            self.task = asyncio.get_running_loop().create_task(self._read(track))

    async def _read(self, track) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                await track.recv()
                if self.first is None:
                    self.first = time.monotonic()
                self.frames += 1

    async def start(self, http: aiohttp.ClientSession) -> None:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.posted = time.monotonic()
        async with http.post(f"{self.base}/api/v1/channels/{self.channel_id}/whep",
                             data=self.pc.localDescription.sdp,
                             headers={**AUTH, "Content-Type": "application/sdp"}) as r:
            if r.status != 201:
                raise SystemExit(f"bench: WHEP {self.channel_id}: HTTP {r.status} {await r.text()}")
            self.location = r.headers["Location"]
            answer = await r.text()
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))

    async def stop(self, http: aiohttp.ClientSession) -> None:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.delete(self.base + self.location, headers=AUTH):
                pass
        if self.task is not None:
            self.task.cancel()
        await self.pc.close()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def server_procs(server: ServedServer) -> list[psutil.Process]:
    assert server.proc is not None
    procs = [psutil.Process(server.proc.pid)]
    status, body = server.api("/api/v1/nodes")
    pids = {n["pid"] for n in listed(body) if n.get("worker") and n.get("pid")} if status == 200 else set()
    return procs + [psutil.Process(pid) for pid in sorted(pids)]


async def scenario(name: str, server: ServedServer, targets: list[str], args: argparse.Namespace) -> dict:
    procs = server_procs(server)
    async with aiohttp.ClientSession() as http:
        viewers = [Viewer(server.base, cid) for cid in targets]
        # Start in waves of 10 so the start times are not those of one huge queue.
        for i in range(0, len(viewers), 10):
            await asyncio.gather(*(v.start(http) for v in viewers[i:i + 10]))
        deadline = time.monotonic() + 30
        while any(v.first is None for v in viewers) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        starts = [(v.first - v.posted) * 1000 for v in viewers if v.first is not None]
        await asyncio.sleep(args.settle)
        LATENCIES.clear()
        frames0 = [v.frames for v in viewers]
        c0, w0 = tree_cpu(procs), time.monotonic()
        await asyncio.sleep(args.seconds)
        used, wall = tree_cpu(procs) - c0, time.monotonic() - w0
        lat = list(LATENCIES)
        got = [v.frames - f for v, f in zip(viewers, frames0, strict=True)]
        await asyncio.gather(*(v.stop(http) for v in viewers))
    cores = used / wall
    out = {"name": name, "viewers": len(viewers), "channels": len(set(targets)),
           "started": len(starts), "start_p50": pct(starts, 50), "start_p95": pct(starts, 95),
           "cores": cores, "per_core": len(viewers) / cores if cores else float("inf"),
           "lat_p50": pct(lat, 50), "lat_p99": pct(lat, 99),
           "frames_min": min(got) / (args.fps * wall), "frames_avg": sum(got) / len(got) / (args.fps * wall)}
    print(f"{name}: {out['viewers']} viewers on {out['channels']} channels, {out['started']} started; "
          f"start p50 {out['start_p50']:.0f} ms p95 {out['start_p95']:.0f} ms; server+workers "
          f"{cores * 100:.1f}% of a core → {out['per_core']:.0f} viewers per core; latency p50 "
          f"{out['lat_p50']:.1f} ms p99 {out['lat_p99']:.1f} ms; frames per viewer "
          f"{out['frames_avg'] * 100:.0f}% of fps×s (worst {out['frames_min'] * 100:.0f}%)", flush=True)
    return out


def run(args: argparse.Namespace, work: Path) -> None:
    server = ServedServer(work, GB28181_MEDIA__WORKERS=str(args.workers), GB28181_LOG__LEVEL="warning")
    sim: SimProcess | None = None
    try:
        server.start()
        nvrs = math.ceil(args.channels / args.channels_per_nvr)
        sim = SimProcess(work, server, "--first-id", FIRST_NVR, "--nvr", "--channels", str(args.channels_per_nvr),
                         "--devices", str(nvrs), "--max-streams", str(args.channels_per_nvr),
                         "--fps", str(args.fps), "--gop", str(args.gop), "--video-size", args.video_size,
                         "--bitrate", str(args.bitrate), "--keepalive-interval", "10", name="sim")
        deadline = time.monotonic() + 90
        while True:
            status, body = server.api("/api/v1/channels?limit=1000")
            ids = sorted(c["channel_id"] for c in listed(body)
                         if c["kind"] == "channel" and c.get("state") == "ON") if status == 200 else []
            if len(ids) >= args.channels:
                break
            if time.monotonic() > deadline or sim.exited() or server.exited():
                raise SystemExit(f"bench: {len(ids)} of {args.channels} cameras listed; "
                                 f"{sim.exited() or server.exited() or 'timeout'}")
            time.sleep(0.5)

        async def both() -> None:
            await scenario("one channel", server, [ids[0]] * args.viewers, args)
            await asyncio.sleep(1.0)
            await scenario("many channels", server, ids[:args.channels], args)

        asyncio.run(both())
    finally:
        if sim is not None:
            with contextlib.suppress(Exception):
                sim.stop()
        server.kill()


def main() -> int:
    global NO_DECODE
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--viewers", type=int, default=10, help="viewers of the one channel (default 10)")
    p.add_argument("--channels", type=int, default=20, help="channels with one viewer each (default 20)")
    p.add_argument("--channels-per-nvr", type=int, default=10)
    p.add_argument("--seconds", type=float, default=10.0, help="the measured window (default 10)")
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--gop", type=int, default=50)
    p.add_argument("--bitrate", type=int, default=500, help="kbit/s per stream (default 500)")
    p.add_argument("--video-size", default="320x240")
    p.add_argument("--workers", type=int, default=1, help="media worker processes (default 1)")
    p.add_argument("--no-decode", action="store_true", help="viewers do not decode (see above)")
    args = p.parse_args()
    NO_DECODE = args.no_decode
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor())
    print(f"machine: {os.cpu_count()} cores, {model}, Python {platform.python_version()}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with tempfile.TemporaryDirectory(prefix="bench-webrtc-") as tmp:
        run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
