#!/usr/bin/env python3
"""Playback and download of device recordings (GB/T 28181-2016 §9.8, §9.9), end to end.

The server (``gb28181 serve`` with ``--workers`` media workers) and a simulator fleet
(``gb28181-sim``) run as subprocesses on 127.0.0.1; this process is the client, over
the HTTP API and HTTP-FLV. Every simulated frame carries its recorded time in an SEI, read back
with relay.py's FLV reader, so each figure is measured where a user would see it:

1. playback start: POST /channels/{id}/playback, then GET its HTTP-FLV URL, until the first
   video frame; and how far that frame's recorded time is from the one asked (one GOP at most);
2. seek: with a viewer on a playback, POST /streams/{id}/control seek 600 s, until the first
   frame recorded at or after the target's GOP arrives;
3. downloads: ``--downloads`` at once of ``--download-seconds`` each at ``--speed``, until all
   are done: wall time, MP4 bytes and recorded seconds per server CPU-second (server and its
   workers), against the simulator's CPU for the same sending in the same run.

    python bench/playback.py                       # 20 samples, 4 downloads of 60 s at speed 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from relay import FlvReader, cpu_seconds, pct, tree, tree_cpu  # noqa: E402

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]

import aiohttp  # noqa: E402

from gb28181.registrar import BEIJING  # noqa: E402

TOKEN = "bench-token-123456"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, BEIJING).isoformat(timespec="seconds")


def ms(x: float) -> str:
    return f"{x * 1000:.0f} ms"


async def api(session: aiohttp.ClientSession, base: str, method: str, path: str, body=None) -> dict:
    async with session.request(method, base + path, json=body, headers=AUTH) as r:
        out = await r.json()
        if r.status >= 300:
            raise RuntimeError(f"{method} {path}: {r.status} {out}")
        return out


async def first_frame(session: aiohttp.ClientSession, url: str, after: float = 0.0,
                      timeout: float = 20.0) -> float | None:
    """Recorded time of the first frame (recorded at or after ``after``) of an HTTP-FLV URL."""
    reader = FlvReader()
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        while True:
            chunk = await r.content.readany()
            if not chunk:
                return None
            for sei in reader.feed(chunk):
                if sei is not None and sei[1] / 1e9 >= after:
                    return sei[1] / 1e9


async def run(args: argparse.Namespace, work: Path) -> None:
    sip, http = free_port(socket.SOCK_DGRAM), free_port()
    env = dict(os.environ, GB28181_DATA_DIR=str(work / "data"), GB28181_SIP__HOST="127.0.0.1",
               GB28181_SIP__PORT=str(sip), GB28181_HTTP__HOST="127.0.0.1", GB28181_HTTP__PORT=str(http),
               GB28181_MEDIA__HOST="127.0.0.1", GB28181_MEDIA__RTP_PORT="0", GB28181_API__TOKEN=TOKEN,
               GB28181_LOG__LEVEL="warning", GB28181_MEDIA__WORKERS=str(args.workers),
               GB28181_MEDIA__DOWNLOADS_PER_DEVICE=str(max(2, args.downloads)))
    bin_dir = Path(sys.executable).parent
    log = open(work / "server.log", "ab")
    server = subprocess.Popen([str(bin_dir / "gb28181"), "serve"], env=env, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    sim = subprocess.Popen([str(bin_dir / "gb28181-sim"), "--server", f"127.0.0.1:{sip}", "--devices",
                            str(args.devices), "--video-size", args.video_size, "--bitrate", str(args.bitrate),
                            "--gop", "25", "--fps", "25", "--progress", "0"],
                           stdout=open(work / "sim.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{http}"
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            channels: list[str] = []
            while time.monotonic() < deadline and len(channels) < args.devices:
                await asyncio.sleep(0.5)
                try:
                    body = await api(session, base, "GET", "/api/v1/channels?status=online&limit=1000")
                except (aiohttp.ClientError, RuntimeError):
                    continue
                channels = sorted(c["channel_id"] for c in body["channels"] if c["kind"] == "channel")
            if len(channels) < args.devices:
                raise SystemExit(f"bench: only {len(channels)} of {args.devices} channels came online")
            now = int(time.time())
            print(f"set-up: {args.devices} simulated IPCs ({args.video_size} H.264 25 fps, GOP 1 s, "
                  f"{args.bitrate} kbit/s), relay in "
                  f"{'the server process' if not args.workers else f'{args.workers} media worker(s)'}",
                  flush=True)

            # Warm-up (not measured): the simulator encodes its clip for the first stream.
            pb = await api(session, base, "POST", f"/api/v1/channels/{channels[0]}/playback",
                           {"start": iso(now - 60), "end": iso(now - 30)})
            await first_frame(session, pb["urls"]["http_flv"], timeout=60)
            await api(session, base, "DELETE", f"/api/v1/streams/{pb['stream_id']}")

            # 1. playback start
            starts, offsets = [], []
            for i in range(args.samples):
                cid = channels[i % len(channels)]
                t = now - 3600 - 97 * i
                t0 = time.perf_counter()
                pb = await api(session, base, "POST", f"/api/v1/channels/{cid}/playback",
                               {"start": iso(t), "end": iso(t + 1800), "transport": args.transport})
                t1 = time.perf_counter()
                rec = await first_frame(session, pb["urls"]["http_flv"])
                if args.verbose:
                    print(f"  {cid}: POST {ms(t1 - t0)}, GET -> frame {ms(time.perf_counter() - t1)}")
                if rec is not None:
                    starts.append(time.perf_counter() - t0)
                    offsets.append(rec - t)
                await api(session, base, "DELETE", f"/api/v1/streams/{pb['stream_id']}")
            print(f"playback start, POST playback -> first video frame ({len(starts)}/{args.samples}, "
                  f"{args.transport}): p50 {ms(pct(starts, 50))}, p95 {ms(pct(starts, 95))}; first frame "
                  f"recorded {min(offsets, default=0):+.2f}..{max(offsets, default=0):+.2f} s from the "
                  f"time asked (the keyframe at or before it)", flush=True)

            # 2. seek
            seeks = []
            for i in range(args.samples):
                cid = channels[i % len(channels)]
                t = now - 5400 - 89 * i
                pb = await api(session, base, "POST", f"/api/v1/channels/{cid}/playback",
                               {"start": iso(t), "end": iso(t + 1800), "transport": args.transport})
                viewer = asyncio.ensure_future(first_frame(session, pb["urls"]["http_flv"],
                                                           after=t + 600 - 1.05))
                await asyncio.sleep(1.0)  # playing
                t0 = time.perf_counter()
                await api(session, base, "POST", f"/api/v1/streams/{pb['stream_id']}/control",
                          {"action": "seek", "offset": 600})
                landed = await viewer
                if landed is not None:
                    seeks.append(time.perf_counter() - t0)
                await api(session, base, "DELETE", f"/api/v1/streams/{pb['stream_id']}")
            print(f"seek 600 s, POST control -> first frame at the target ({len(seeks)}/{args.samples}): "
                  f"p50 {ms(pct(seeks, 50))}, p95 {ms(pct(seeks, 95))}", flush=True)

            # 3. downloads
            sproc, simproc = psutil.Process(server.pid), psutil.Process(sim.pid)
            family = tree(sproc)
            c0, s0, t0 = tree_cpu(family), cpu_seconds(simproc), time.perf_counter()
            ids = []
            for i in range(args.downloads):
                cid = channels[i % len(channels)]
                t = now - 7200 - 300 * i
                dl = await api(session, base, "POST", f"/api/v1/channels/{cid}/downloads",
                               {"start": iso(t), "end": iso(t + args.download_seconds), "speed": args.speed,
                                "transport": args.transport})
                ids.append(dl["id"])
            done: dict[str, dict] = {}
            while len(done) < len(ids) and time.perf_counter() - t0 < args.download_seconds * 3 + 60:
                await asyncio.sleep(0.2)
                for i in ids:
                    if i not in done:
                        d = await api(session, base, "GET", f"/api/v1/downloads/{i}")
                        if d["state"] != "downloading":
                            done[i] = d
            wall = time.perf_counter() - t0
            cpu, sim_cpu = tree_cpu(family) - c0, cpu_seconds(simproc) - s0
            ok = [d for d in done.values() if d["state"] == "done"]
            for d in done.values():
                if d["state"] != "done":
                    print(f"  download {d['id']} {d['state']}: {d['ended_reason']} {d.get('error') or ''}")
            total_bytes = sum(d["bytes"] for d in ok)
            total_s = sum(d["seconds"] for d in ok)
            print(f"downloads: {len(ok)}/{args.downloads} done ({args.download_seconds} s each at speed "
                  f"{args.speed}: {args.download_seconds / args.speed:.0f} s expected) in {wall:.1f} s; "
                  f"{total_bytes / 2**20:.1f} MiB of MP4, {total_s:.0f} recorded seconds; server CPU "
                  f"{cpu:.2f} s -> {total_bytes / 2**20 / max(cpu, 1e-9):.1f} MiB and "
                  f"{total_s / max(cpu, 1e-9):.0f} recorded seconds per server CPU-second", flush=True)
            print(f"reference, the simulator sending the same downloads: {sim_cpu:.2f} CPU-s -> "
                  f"{total_s / max(sim_cpu, 1e-9):.0f} recorded seconds per simulator CPU-second", flush=True)
    finally:
        for p in (sim, server):
            if p.poll() is None:
                os.killpg(p.pid, 15)
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=4, help="simulated IPCs (default 4)")
    p.add_argument("--samples", type=int, default=20, help="playback starts and seeks measured (default 20)")
    p.add_argument("--downloads", type=int, default=4, help="downloads at once (default 4)")
    p.add_argument("--download-seconds", type=int, default=60, help="recorded seconds per download")
    p.add_argument("--speed", type=int, default=4, help="a=downloadspeed (default 4)")
    p.add_argument("--transport", default="udp", choices=("udp", "tcp-passive", "tcp-active"))
    p.add_argument("--workers", type=int, default=1, help="media workers (default 1)")
    p.add_argument("--video-size", default="1280x720")
    p.add_argument("--bitrate", type=int, default=2000, help="kbit/s (default 2000)")
    p.add_argument("--verbose", action="store_true", help="print every sample")
    args = p.parse_args()
    if min(args.devices, args.samples, args.downloads, args.download_seconds, args.speed) < 1:
        p.error("every count must be at least 1")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            asyncio.run(run(args, Path(tmp)))
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
