#!/usr/bin/env python3
"""Live video through a cascade (GB/T 28181-2016 §5.2, §9.2): county → city → province.

Three `gb28181 serve` processes on 127.0.0.1, each with one media worker process
(``tests/conftest.py``'s ``CascadeChain``: the county registered to the city as a lower platform,
the city to the province), and one `gb28181-sim` process at the county with NVRs of
``--channels`` cameras each (``ceil(streams / channels)`` NVRs). Every simulated frame carries
its send time (wall clock) in an SEI, so latency is measured per frame where a user sees it.

All ``--streams`` channels are played at the province (POST /api/v1/channels/{id}/play with
``--transport``; every level also uses it as its default, so each hop carries it), which INVITEs
the city, which INVITEs the county, which INVITEs the camera. Then the same channels are played
at the city and at the county, which share the stream already there. One HTTP-FLV viewer per
channel at each level, all in this process (aiohttp, relay.py's FLV reader), reading at once.
After the first frame at every viewer and ``--settle`` seconds (the cached GOP a new viewer
gets at once falls there), a window of ``--seconds``:

- latency at each level, SEI send time → FLV tag at the viewer: p50/p99 of every frame in the
  window; and per hop, frame by frame (the same SEI at both levels), city − county and
  province − city: what one more level adds;
- CPU of each level (the server and its media worker: user+sys from /proc via psutil) over the
  window, in % of one core per relayed stream, and the simulator's as a reference. The county
  receives from the camera and sends to the city, the city receives and sends to the province,
  the province only receives; each also feeds its own viewer;
- frames received by each viewer against fps × seconds, so a loss shows;
- the whole machine's CPU and load average, since load generators share its cores.

Everything is stopped on exit, error or Ctrl-C.

    python bench/cascade.py                               # 20 streams, 20 s window, UDP
    python bench/cascade.py --streams 50 --transport tcp-passive
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from relay import cpu_seconds, pct, read_flv, tree_cpu  # noqa: E402

# bench/registry.py would shadow the registry package the server's modules import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from tests.conftest import (  # noqa: E402
    CHAIN_IDS,
    TOKEN,
    CascadeChain,
    ServedServer,
    SimProcess,
    listed,
)

LEVELS = ("county", "city", "province")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FIRST_NVR = "34020100001180000001"


class Window:
    """Whether frames are being recorded now (the steady-state window)."""

    active = False


class Viewer:
    """One HTTP-FLV reader of one channel at one level."""

    def __init__(self, level: str, channel_id: str, url: str) -> None:
        self.level = level
        self.channel_id = channel_id
        self.url = url
        self.first_at: float | None = None
        self.frames = 0  # in the window
        self.no_sei = 0
        self.arrivals: dict[int, int] = {}  # SEI send ns -> arrival ns, in the window
        self.error = ""


async def view(session: aiohttp.ClientSession, v: Viewer) -> None:
    """Read ``v.url`` until cancelled (a 307 to the node is followed)."""
    def frames(seis: list[tuple[int, int] | None], now_ns: int) -> bool:
        for sei in seis:
            if v.first_at is None:
                v.first_at = time.perf_counter()
            if Window.active:
                v.frames += 1
                if sei is None:
                    v.no_sei += 1
                else:
                    v.arrivals[sei[1]] = now_ns
        return False
    v.error = await read_flv(session, v.url, frames)


# -- set-up ---------------------------------------------------------------------------------

def cameras(server: ServedServer) -> list[str]:
    """The channel IDs of the cameras a server lists ON, in order."""
    found: list[str] = []
    offset = 0
    while True:
        status, body = server.api(f"/api/v1/channels?limit=1000&offset={offset}")
        page = listed(body) if status == 200 else []
        found += [c["channel_id"] for c in page if c["kind"] == "channel" and c.get("state") == "ON"]
        offset += len(page)
        if not page or offset >= body.get("total", 0):
            return sorted(found)


def wait(predicate, timeout: float, what: str, check=None, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            result = predicate()
            if result:
                return result
        problem = check() if check is not None else None
        if problem:
            raise SystemExit(f"bench: {problem} while waiting for {what}")
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def play(server: ServedServer, channel_id: str, transport: str) -> str:
    """POST play; the server's FLV URL (which leads to the node carrying the stream)."""
    status, body = server.api(f"/api/v1/channels/{channel_id}/play", "POST", {"transport": transport})
    if status != 200:
        raise SystemExit(f"bench: play {channel_id} at {server.workdir.name}: HTTP {status} {body}")
    return body["urls"]["server_flv"]


def level_procs(server: ServedServer) -> list[psutil.Process]:
    """The server process and its media workers (GET /api/v1/nodes, "pid")."""
    assert server.proc is not None
    procs = [psutil.Process(server.proc.pid)]
    status, body = server.api("/api/v1/nodes")
    pids = {n["pid"] for n in listed(body) if n.get("worker") and n.get("pid")} if status == 200 else set()
    if not pids:  # older servers: the workers are its children
        pids = {c.pid for c in procs[0].children(recursive=True)}
    procs += [psutil.Process(pid) for pid in sorted(pids)]
    return procs


# -- figures --------------------------------------------------------------------------------

def latencies_ms(viewers: list[Viewer]) -> list[float]:
    return [(arr - sent) / 1e6 for v in viewers for sent, arr in v.arrivals.items()]


def hop_ms(lower: list[Viewer], upper: list[Viewer]) -> list[float]:
    """Per frame seen at both levels (same channel, same SEI): upper arrival − lower arrival."""
    out: list[float] = []
    below = {v.channel_id: v.arrivals for v in lower}
    for v in upper:
        seen = below.get(v.channel_id, {})
        out.extend((arr - seen[sent]) / 1e6 for sent, arr in v.arrivals.items() if sent in seen)
    return out


def table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    body = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


# -- the run --------------------------------------------------------------------------------

async def measure(args: argparse.Namespace, urls: dict[str, dict[str, str]],
                  chain: CascadeChain, sim: SimProcess) -> None:
    n = args.streams
    viewers = {lv: [Viewer(lv, cid, urls[lv][cid]) for cid in urls["province"]] for lv in LEVELS}
    everyone = [v for lv in LEVELS for v in viewers[lv]]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=20)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), read_bufsize=1 << 20,
                                     timeout=timeout, headers=AUTH) as session:
        tasks = [asyncio.create_task(view(session, v)) for v in everyone]
        try:
            t0 = time.perf_counter()
            while any(v.first_at is None and not v.error for v in everyone) and time.perf_counter() - t0 < 30:
                await asyncio.sleep(0.1)
            up = sum(v.first_at is not None for v in everyone)
            print(f"viewers: {up}/{len(everyone)} receiving after {time.perf_counter() - t0:.1f} s; "
                  f"settling {args.settle:.0f} s, then a {args.seconds:.0f} s window", flush=True)
            for v in everyone:
                if v.error:
                    print(f"  {v.level} {v.channel_id}: {v.error}")
            await asyncio.sleep(args.settle)

            procs = {lv: level_procs(chain[lv]) for lv in LEVELS}
            simp, me = psutil.Process(sim.proc.pid), psutil.Process()
            sim_family = [simp, *simp.children(recursive=True)]
            cpu0 = {lv: tree_cpu(p) for lv, p in procs.items()}
            sim0, me0, sys0 = tree_cpu(sim_family), cpu_seconds(me), psutil.cpu_times()
            w0 = time.perf_counter()
            Window.active = True
            await asyncio.sleep(args.seconds)
            Window.active = False
            window = time.perf_counter() - w0
            cpu = {lv: tree_cpu(p) - cpu0[lv] for lv, p in procs.items()}
            sim_cpu, me_cpu, sys1 = tree_cpu(sim_family) - sim0, cpu_seconds(me) - me0, psutil.cpu_times()
            load = os.getloadavg()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    busy = (sum(sys1) - sys1.idle - sys1.iowait) - (sum(sys0) - sys0.idle - sys0.iowait)
    machine = 100 * busy / window / (os.cpu_count() or 1)
    expected = args.fps * window
    lat = {lv: latencies_ms(viewers[lv]) for lv in LEVELS}
    print()
    print(f"{n} streams, {args.bitrate} kbit/s {args.video_size} H.264 at {args.fps} fps, "
          f"{args.transport}, window {window:.1f} s")
    print()
    print(table(["latency, SEI send → viewer", "frames", "p50 ms", "p99 ms"],
                [[f"at the {lv}", len(lat[lv]), f"{pct(lat[lv], 50):.1f}", f"{pct(lat[lv], 99):.1f}"]
                 for lv in LEVELS]))
    print()
    hops = [("city − county", hop_ms(viewers["county"], viewers["city"])),
            ("province − city", hop_ms(viewers["city"], viewers["province"])),
            ("province − county (two hops)", hop_ms(viewers["county"], viewers["province"]))]
    print(table(["added per hop, frame by frame", "frames", "p50 ms", "p99 ms"],
                [[name, len(d), f"{pct(d, 50):.1f}", f"{pct(d, 99):.1f}"] for name, d in hops]))
    print()
    rows = []
    for lv in LEVELS:
        rows.append([f"{lv} (server + {len(procs[lv]) - 1} worker)", f"{cpu[lv]:.2f}",
                     f"{100 * cpu[lv] / window:.1f}", f"{100 * cpu[lv] / window / n:.3f}"])
    rows.append(["simulator (reference)", f"{sim_cpu:.2f}", f"{100 * sim_cpu / window:.1f}",
                 f"{100 * sim_cpu / window / n:.3f}"])
    rows.append([f"bench viewers ({len(everyone)})", f"{me_cpu:.2f}", f"{100 * me_cpu / window:.1f}",
                 f"{100 * me_cpu / window / len(everyone):.3f} per viewer"])
    print(table(["CPU in the window", "CPU-s", "% of a core", "% of a core per stream"], rows))
    print()
    rows = []
    for lv in LEVELS:
        got = [v.frames for v in viewers[lv]]
        errs = sum(bool(v.error) for v in viewers[lv])
        rows.append([f"at the {lv}", f"{sum(got):,}", f"{expected * n:,.0f}",
                     f"{100 * sum(got) / (expected * n):.2f} %", min(got, default=0),
                     sum(v.no_sei for v in viewers[lv]), errs])
    print(table(["frames in the window", "received", "expected", "ratio", "fewest/viewer", "no SEI", "errors"],
                rows))
    print()
    others = 100 * busy / window - 100 * (sum(cpu.values()) + sim_cpu + me_cpu) / window
    print(f"machine: {machine:.0f} % of {os.cpu_count()} cores busy in the window (processes not "
          f"measured above: {others:.0f} % of a core); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    status, body = chain["county"].api("/api/v1/streams")
    legs = sorted({s.get("transport", "?") for s in listed(body)}) if status == 200 else []
    print(f"county: {len(listed(body)) if status == 200 else '?'} streams from the cameras ({', '.join(legs)})")
    for lv in ("city", "county"):
        status, body = chain[lv].api("/api/v1/upstreams/sessions")
        sessions = listed(body) if status == 200 else []
        kinds = sorted({s.get("transport", "?") for s in sessions})
        print(f"{lv}: {len(sessions)} upstream sessions ({', '.join(kinds)})")
    for lv in LEVELS:
        if errors := chain[lv].error_lines():
            print(f"{lv} log: {len(errors)} error lines, first: {errors[0][:200]}")


def run(args: argparse.Namespace, work: Path) -> None:
    n = args.streams
    env = {"GB28181_MEDIA__DEFAULT_TRANSPORT": args.transport, "GB28181_LOG__LEVEL": "warning",
           "GB28181_MEDIA__WORKERS": str(args.workers)}
    chain = CascadeChain(work, **env)
    sim: SimProcess | None = None
    try:
        t0 = time.perf_counter()
        chain.start()

        def problems() -> str | None:
            for lv, s in chain.servers.items():
                if (why := s.exited()) is not None:
                    return f"{lv}: {why}"
            return sim.exited() if sim is not None else None

        wait(lambda: all(chain[lv].api("/api/v1/upstreams")[1]["upstreams"][0]["status"] == "registered"
                         for lv in ("city", "county")), 30, "county and city to register upward", problems)
        nvrs = math.ceil(n / args.channels)
        sim = SimProcess(work, chain["county"], "--server-id", CHAIN_IDS["county"][0], "--first-id", FIRST_NVR,
                         "--nvr", "--channels", str(args.channels), "--devices", str(nvrs),
                         "--max-streams", str(args.channels),
                         "--bitrate", str(args.bitrate), "--fps", str(args.fps), "--gop", str(args.gop),
                         "--video-size", args.video_size, "--keepalive-interval", "10", name="sim")
        total = nvrs * args.channels
        ids = wait(lambda: len(c := cameras(chain["province"])) >= total and c, 90,
                   f"the province to list the county's {total} cameras", problems)[:n]
        print(f"set-up: chain up, {nvrs} NVRs × {args.channels} channels at the county, catalog at the "
              f"province in {time.perf_counter() - t0:.1f} s", flush=True)

        urls: dict[str, dict[str, str]] = {}
        with ThreadPoolExecutor(8) as pool:
            for lv in ("province", "city", "county"):  # the province first: it opens the chain
                t1 = time.perf_counter()
                got = list(pool.map(lambda cid, lv=lv: play(chain[lv], cid, args.transport), ids))
                urls[lv] = dict(zip(ids, got))
                print(f"played {n} at the {lv} in {time.perf_counter() - t1:.1f} s", flush=True)
        asyncio.run(measure(args, urls, chain, sim))
    finally:
        if sim is not None:
            with contextlib.suppress(Exception):
                sim.stop()
        chain.stop()


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=20, help="channels played through the chain (default 20)")
    p.add_argument("--seconds", type=float, default=20.0, help="the measured window (default 20)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds after every viewer's first frame (default 3)")
    p.add_argument("--bitrate", type=int, default=1000, help="kbit/s per stream (default 1000)")
    p.add_argument("--transport", default="udp", choices=("udp", "tcp-passive", "tcp-active"),
                   help="media transport of the plays and of every hop (default udp)")
    p.add_argument("--channels", type=int, default=10, help="channels per simulated NVR (default 10)")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--gop", type=int, default=50, help="frames per GOP (default 50)")
    p.add_argument("--video-size", default="640x360")
    p.add_argument("--workers", type=int, default=1, help="media workers per level (default 1)")
    args = p.parse_args()
    if min(args.streams, args.channels, args.fps, args.gop, args.workers) < 1 or args.seconds <= 0:
        p.error("counts must be at least 1 and --seconds positive")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
          flush=True)
    # SIGTERM as Ctrl-C (and Ctrl-C even where a shell started us ignoring it), so the finally
    # blocks stop the chain either way.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    with tempfile.TemporaryDirectory(prefix="bench-cascade-") as tmp:
        try:
            run(args, Path(tmp))
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
