#!/usr/bin/env python3
"""Platform recording end to end (issue 13's acceptance run), with the shipped processes.

One `gb28181 serve` (``tests/conftest.py``'s ``ServedServer``, ``--workers`` media worker
processes) with recording on for every channel (``GB28181_RECORDING__ENABLED=true``, tier 3
``continuous``, ``--segment-seconds`` segments), and one `gb28181-sim` of ``--nvrs`` NVRs ×
``--channels`` cameras (``--video-size``, ``--bitrate`` kbit/s, ``--records 0``). Once every
channel records, a window of ``--seconds``: the first half with the recording alone, the second
half with an HTTP-FLV viewer on ``--viewers`` of the channels (this process, aiohttp). Sampled
meanwhile: CPU (user+sys from /proc) of the server and its media workers (GET /api/v1/nodes
gives their pids) and the bytes under DATA_DIR/records.

Then, through the API as a user does:

- segments per channel (GET /api/v1/channels/{id}/records?source=platform&start=&end=), their
  ``gap_before`` flags, and the time not covered between the first segment's start and the last
  one's end (from the server's index read-only: the API gives whole seconds);
- bytes written per second against the stream's bitrate (segment bytes / recorded seconds /
  (bitrate / 8)), and the disk's growth over the window;
- CPU per recorded stream in % of one core, without and with the viewers;
- a 60 s export across a segment boundary (GET /api/v1/channels/{id}/export?start=&end=),
  checked with ``ffprobe -v error -show_entries format=duration``;
- a platform playback (POST /api/v1/channels/{id}/playback ``{"source": "platform"}``) read
  as HTTP-FLV, a seek (POST /api/v1/streams/{id}/control ``{"action": "seek"}``), and the
  recorded time the simulator wrote into each frame's SEI, read after the seek, against the
  time asked for.

Last, without the processes: the segment index at scale. A fresh ``SqliteStore`` gets
``--index-channels`` × ``--index-days`` × 24 hourly segments, inserted with ``executemany`` in
one transaction (timed), then the store's own query methods the server calls are timed over
random arguments: ``segments`` (a search: one channel, one day) and ``segment_summary`` (the
storage report, over the last day), p50/p99.

    python bench/recording_e2e.py                       # 20 channels, 5 minutes, 5 viewers
    python bench/recording_e2e.py --seconds 60 --index-channels 100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from cascade import cameras, interrupted, level_procs, table, wait  # noqa: E402
from relay import pct, read_flv, tree_cpu  # noqa: E402

# bench/registry.py would shadow the registry package the server's modules import.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from registry.sqlite import SqliteStore  # noqa: E402
from tests.conftest import TOKEN, ServedServer, SimProcess, listed  # noqa: E402

AUTH = {"Authorization": f"Bearer {TOKEN}"}


# -- sampling -------------------------------------------------------------------------------

def disk_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, name)).st_size
    return total


class Sampler(threading.Thread):
    """CPU-seconds of the server's processes and bytes under the records root, every ``every`` s."""

    def __init__(self, procs: list[psutil.Process], root: Path, every: float) -> None:
        super().__init__(daemon=True)
        self.procs, self.root, self.every = procs, root, every
        self.samples: list[tuple[float, float, int]] = []  # (t, cpu s, bytes)
        self.stop = threading.Event()

    def sample(self) -> tuple[float, float, int]:
        s = (time.time(), tree_cpu(self.procs), disk_bytes(self.root))
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.sample()


# -- viewers --------------------------------------------------------------------------------

class Viewer:
    def __init__(self, channel_id: str, url: str) -> None:
        self.channel_id, self.url = channel_id, url
        self.frames = 0
        self.error = ""


async def view(session: aiohttp.ClientSession, v: Viewer) -> None:
    def frames(seis: list[tuple[int, int] | None], now_ns: int) -> bool:
        v.frames += len(seis)
        return False
    v.error = await read_flv(session, v.url, frames)


async def watch(urls: dict[str, str], seconds: float) -> list[Viewer]:
    viewers = [Viewer(cid, url) for cid, url in urls.items()]
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=20)
    async with aiohttp.ClientSession(headers=AUTH, timeout=timeout) as session:
        tasks = [asyncio.create_task(view(session, v)) for v in viewers]
        await asyncio.sleep(seconds)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return viewers


# -- platform playback with a seek ----------------------------------------------------------

async def playback_seek(server: ServedServer, channel_id: str, start: int, end: int,
                        offset: float) -> dict:
    """Open a platform playback of [start, end), read 3 s, seek to ``offset``, read 5 s more.
    Returns the frames' (arrival, SEI send s) and what the API answered."""
    out: dict = {"frames": [], "seek_at": None}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=20)
    async with aiohttp.ClientSession(headers=AUTH, timeout=timeout) as session:
        async with session.post(f"{server.base}/api/v1/channels/{channel_id}/playback",
                                json={"start": str(start), "end": str(end), "source": "platform"}) as r:
            body = await r.json()
            if r.status != 200:
                raise SystemExit(f"bench: platform playback: HTTP {r.status} {body}")
        out["open"] = body

        async def read() -> None:
            def frames(seis: list[tuple[int, int] | None], now_ns: int) -> bool:
                out["frames"] += [(now_ns / 1e9, None if sei is None else sei[1] / 1e9) for sei in seis]
                return False
            await read_flv(session, body["urls"]["http_flv"], frames)

        task = asyncio.create_task(read())
        try:
            await asyncio.sleep(3.0)
            out["seek_at"] = time.time()
            async with session.post(f"{server.base}/api/v1/streams/{body['stream_id']}/control",
                                    json={"action": "seek", "offset": offset}) as r:
                out["seek"] = await r.json()
                out["seek_status"] = r.status
            out["seek_done"] = time.time()
            await asyncio.sleep(5.0)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        async with session.delete(f"{server.base}/api/v1/streams/{body['stream_id']}"):
            pass
    return out


def seek_figures(pb: dict, start: int, offset: float, fps: int) -> list[list[str]]:
    frames = [(a, s) for a, s in pb["frames"] if s is not None]
    before = [f for f in frames if f[0] < pb["seek_at"]]
    rows = []
    if before:
        rows.append(["first frame after opening, recorded time − start", f"{before[0][1] - start:+.3f} s"])
    # The first frame after the seek: the first jump in recorded time once the seek was sent.
    jump = next((i for i in range(1, len(frames)) if frames[i][0] >= pb["seek_at"]
                 and abs(frames[i][1] - frames[i - 1][1] - 1 / fps) > 0.5), None)
    reported = pb.get("seek", {}).get("position_offset")
    rows.append(["seek asked (offset from start)", f"{offset:.1f} s; HTTP {pb.get('seek_status')}, "
                 f"position_offset {reported}"])
    if jump is None:
        rows.append(["first frame after the seek", "no jump in recorded time seen"])
        return rows
    t_arr, t_rec = frames[jump]
    rows.append(["first frame after the seek, recorded time − (start + offset)",
                 f"{t_rec - (start + offset):+.3f} s"])
    if isinstance(reported, (int, float)):
        rows.append(["  − (start + position_offset)", f"{t_rec - (start + reported):+.3f} s"])
    rows.append(["  arrived after the seek was answered", f"{1000 * (t_arr - pb['seek_done']):.0f} ms"])
    after = frames[jump:]
    back = sum(b[1] <= a[1] for a, b in zip(after, after[1:]))
    span_rec, span_arr = after[-1][1] - after[0][1], after[-1][0] - after[0][0]
    rows.append(["frames after the seek (recorded time not increasing)",
                 f"{len(after)} ({back}); {span_rec:.2f} s recorded in {span_arr:.2f} s"])
    return rows


# -- the server's index, read-only ----------------------------------------------------------

def indexed(db: Path, channel_id: str) -> list[tuple]:
    """(start, end, bytes, frames, gap_before, state) of a channel's segments, precise times."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT start, end, bytes, frames, gap_before, state FROM record_segments "
                           "WHERE channel_id = ? ORDER BY start", (channel_id,)).fetchall()
    finally:
        con.close()


def ffprobe_duration(path: Path) -> tuple[str, str]:
    p = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of",
                        "default=nw=1:nk=1", str(path)], capture_output=True, text=True, timeout=60)
    return p.stdout.strip(), p.stderr.strip()


# -- the live run ---------------------------------------------------------------------------

def live(args: argparse.Namespace, work: Path) -> None:
    env = {"GB28181_LOG__LEVEL": "warning", "GB28181_MEDIA__WORKERS": str(args.workers),
           "GB28181_RECORDING__ENABLED": "true", "GB28181_RECORDING__PLANS__TIER3": "continuous",
           "GB28181_RECORDING__SEGMENT_SECONDS": str(args.segment_seconds)}
    (work / "server").mkdir()
    server = ServedServer(work / "server", **env)
    sim: SimProcess | None = None
    n = args.nvrs * args.channels
    try:
        server.start()
        sim = SimProcess(work, server, "--nvr", "--devices", str(args.nvrs), "--channels", str(args.channels),
                         "--max-streams", str(args.channels), "--video-size", args.video_size,
                         "--bitrate", str(args.bitrate), "--fps", str(args.fps), "--gop", str(args.gop),
                         "--records", "0", "--progress", "0", "--keepalive-interval", "10", name="sim")

        def problems() -> str | None:
            return server.exited() or (sim.exited() if sim is not None else None)

        t0 = time.perf_counter()
        ids = wait(lambda: len(c := cameras(server)) >= n and c, 60, f"{n} cameras listed", problems)[:n]

        def recording() -> bool:
            status, body = server.api("/api/v1/recordings")
            return status == 200 and body["states"].get("recording", 0) >= n
        wait(recording, 120, f"{n} channels recording", problems, interval=0.5)
        print(f"set-up: {n} channels listed and recording in {time.perf_counter() - t0:.1f} s", flush=True)

        root = server.data_dir / "records"
        procs = level_procs(server)
        sampler = Sampler(procs, root, 5.0)
        w0, cpu0, disk0 = sampler.sample()
        sampler.start()
        half = args.seconds / 2
        time.sleep(half)
        w1, cpu1, disk1 = sampler.sample()
        urls = {}
        for cid in ids[:args.viewers]:
            status, body = server.api(f"/api/v1/channels/{cid}/play", "POST", {})
            if status != 200:
                raise SystemExit(f"bench: play {cid}: HTTP {status} {body}")
            urls[cid] = body["urls"]["http_flv"]
        print(f"{half:.0f} s recorded without viewers; {len(urls)} viewers for {args.seconds - half:.0f} s",
              flush=True)
        viewers = asyncio.run(watch(urls, args.seconds - half))
        w2, cpu2, disk2 = sampler.sample()
        sampler.stop.set()
        print(f"window over; letting the segments of the window close ({args.segment_seconds} s at most)",
              flush=True)
        # The segment open at the window's end closes at the next boundary: wait for it, so the
        # figures cover closed segments and the export and playback read finished files.
        boundary = (int(w2) // args.segment_seconds + 1) * args.segment_seconds
        time.sleep(max(0.0, boundary + 3 - time.time()))

        # -- segments and gaps, through the API and (precise times) the index ------------------
        q0, q1 = int(w0) - args.segment_seconds, int(time.time()) + 1
        per: dict[str, list[dict]] = {}
        for cid in ids:
            status, body = server.api(f"/api/v1/channels/{cid}/records?source=platform&start={q0}&end={q1}"
                                      "&limit=1000")
            per[cid] = listed(body) if status == 200 else []
        db = server.data_dir / "gb28181.db"
        rows = {cid: indexed(db, cid) for cid in ids}
        counts = [len(per[c]) for c in ids]
        closed = [sum(i["state"] == "closed" for i in per[c]) for c in ids]
        flags = sum(bool(i["gap_before"]) for c in ids for i in per[c][1:])
        uncovered, spans, rec_s, seg_bytes, failed = [], 0.0, 0.0, 0, 0
        for cid in ids:
            segs = [r for r in rows[cid] if r[5] == "closed"]
            failed += sum(r[5] == "failed" for r in rows[cid])
            if not segs:
                continue
            span = segs[-1][1] - segs[0][0]
            covered = sum(e - s for s, e, *_ in segs)
            uncovered.append(span - covered)
            spans += span
            rec_s += sum(r[3] for r in segs) / args.fps
            seg_bytes += sum(r[2] for r in segs)
        inter = [b[0] - a[1] for cid in ids for a, b in zip(rows[cid], rows[cid][1:])]
        stream_bps = args.bitrate * 1000 / 8

        print()
        print(f"{n} channels ({args.nvrs} NVRs × {args.channels}), {args.video_size} {args.bitrate} kbit/s "
              f"H.264 {args.fps} fps GOP {args.gop}, segments of {args.segment_seconds} s, "
              f"{args.workers} media worker(s); window {w2 - w0:.0f} s ({w1 - w0:.0f} s without viewers, "
              f"{w2 - w1:.0f} s with {len(urls)})")
        print()
        print(table(["segments (from 1 segment before the window to now)", "value"], [
            ["segments per channel, min / max (closed)", f"{min(counts)} / {max(counts)} "
             f"({min(closed)} / {max(closed)})"],
            ["gap_before flags after each channel's first segment", f"{flags}"],
            ["failed segments", f"{failed}"],
            ["time not covered, first start → last end, sum over channels",
             f"{sum(uncovered):.2f} s of {spans:.0f} s ({100 * sum(uncovered) / max(spans, 1):.3f} %)"],
            ["  worst channel", f"{max(uncovered, default=0):.2f} s"],
            ["between consecutive segments: p50 / max",
             f"{1000 * pct(inter, 50):.0f} / {1000 * max(inter, default=0):.0f} ms"],
            ["recorded seconds (frames / fps), closed segments", f"{rec_s:.0f} s"],
            ["segment bytes / recorded second / (bitrate / 8)",
             f"{seg_bytes / max(rec_s, 1) / 1e3:.1f} kB/s / {stream_bps / 1e3:.1f} kB/s = "
             f"{seg_bytes / max(rec_s, 1) / stream_bps:.3f}×"],
            ["disk growth under records/ in the window", f"{(disk2 - disk0) / (w2 - w0) / 1e6:.2f} MB/s "
             f"= {(disk2 - disk0) / (w2 - w0) / n / stream_bps:.3f}× the bitrate per channel"],
        ]))
        print()
        a, b = (cpu1 - cpu0) / (w1 - w0), (cpu2 - cpu1) / (w2 - w1)
        print(table(["CPU, server + worker(s)", "% of a core", "per recorded stream", "per viewer (over)"], [
            ["recording only", f"{100 * a:.1f}", f"{100 * a / n:.2f} %", ""],
            [f"recording + {len(urls)} viewers", f"{100 * b:.1f}", f"{100 * b / n:.2f} %",
             f"{100 * (b - a) / max(len(urls), 1):.2f} %"],
        ]))
        print(f"processes measured: server pid {procs[0].pid} + workers {[p.pid for p in procs[1:]]}")
        fps_got = [v.frames / (w2 - w1) for v in viewers]
        print(f"viewers: {sum(v.frames for v in viewers)} frames, {min(fps_got, default=0):.1f}-"
              f"{max(fps_got, default=0):.1f} fps each; errors: "
              f"{[v.error for v in viewers if v.error and v.error != 'stream ended'] or 'none'}")
        samples = sampler.samples
        rates = [(b2 - b1) / (t2 - t1) / 1e6 for (t1, _, b1), (t2, _, b2) in zip(samples, samples[1:])]
        print(f"disk samples every 5 s: {len(samples)}; MB/s min / max {min(rates, default=0):.2f} / "
              f"{max(rates, default=0):.2f} (a fragment lands per GOP, a segment's moov at its close)")

        # -- export ---------------------------------------------------------------------------
        print()
        cid = ids[-1]
        segs = [r for r in rows[cid] if r[5] == "closed"]
        boundary_t = segs[len(segs) // 2][0] if len(segs) > 1 else segs[0][0] + 30
        e0 = int(boundary_t) - 30
        t = time.perf_counter()
        status, mp4 = server.api(f"/api/v1/channels/{cid}/export?start={e0}&end={e0 + 60}", timeout=120)
        took = time.perf_counter() - t
        if status != 200:
            print(f"export {cid}: HTTP {status} {mp4}")
        else:
            out = work / "export.mp4"
            out.write_bytes(mp4 if isinstance(mp4, bytes) else str(mp4).encode())
            duration, errors = ffprobe_duration(out)
            print(table(["60 s export across a segment boundary", "value"], [
                ["channel, range", f"{cid}, {e0}..{e0 + 60} (boundary at +{boundary_t - e0:.2f} s)"],
                ["HTTP, bytes, time", f"{status}, {len(mp4):,}, {took:.2f} s"],
                ["ffprobe -v error stderr", errors or "clean"],
                ["format duration", f"{duration} s"],
            ]))

        # -- platform playback with a seek ----------------------------------------------------
        print()
        cid = ids[1]
        segs = [r for r in rows[cid] if r[5] == "closed"]
        p0, p1 = int(segs[0][0]) + 2, int(segs[-1][1]) - 1
        offset = min(args.seek, max(5.0, (p1 - p0) - 10.0))
        pb = asyncio.run(playback_seek(server, cid, p0, p1, offset))
        print(table([f"platform playback of {cid}, {p1 - p0} s range", "value"],
                    seek_figures(pb, p0, offset, args.fps)))
        if errors := server.error_lines():
            print(f"server log: {len(errors)} error lines, first: {errors[0][:200]}")
    finally:
        if sim is not None:
            with contextlib.suppress(Exception):
                sim.stop()
        server.kill()


# -- the index at scale ---------------------------------------------------------------------

async def index_bench(args: argparse.Namespace, work: Path) -> None:
    path = work / "index.db"
    store = SqliteStore(path)
    await store.open()
    await store.close()
    n_ch, days = args.index_channels, args.index_days
    channels = [f"3402000000131{i:07d}" for i in range(n_ch)]
    now = float(int(time.time()) // 3600 * 3600)
    first = now - days * 86400
    rng = random.Random(13)

    def rows():
        for cid in channels:
            tier = rng.choice((1, 2, 3))
            for d in range(days):
                for h in range(24):
                    s = first + d * 86400 + h * 3600
                    yield (cid, f"{cid}/{d:03d}/{h:02d}.mp4", s, s + 3599.96, 450_000_000, 90_000, "h264",
                           0, tier, "closed", s + 3600)

    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    t = time.perf_counter()
    with con:
        con.executemany("INSERT INTO record_segments (channel_id, path, start, end, bytes, frames, codec, "
                        "gap_before, tier, state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows())
    insert_s = time.perf_counter() - t
    total = con.execute("SELECT COUNT(*) FROM record_segments").fetchone()[0]
    con.execute("ANALYZE")
    con.close()
    size = path.stat().st_size + sum(p.stat().st_size for p in work.glob("index.db-*"))

    store = SqliteStore(path)
    await store.open()
    try:
        search = []
        found = 0
        for _ in range(args.index_queries):
            cid = rng.choice(channels)
            d0 = first + rng.randrange(days) * 86400
            t = time.perf_counter()
            count, page = await store.segments(cid, d0, d0 + 86400, limit=100)
            search.append(1000 * (time.perf_counter() - t))
            found += len(page)
        summary = []
        for _ in range(args.summary_queries):
            since = now - 86400 - rng.uniform(0, 3600)
            t = time.perf_counter()
            out = await store.segment_summary(since, since + 86400)
            summary.append(1000 * (time.perf_counter() - t))
    finally:
        await store.close()
    print()
    print(f"segment index: {total:,} rows ({n_ch:,} channels × {days} days × 24 hourly segments = "
          f"{n_ch * days:,} channel-days), {size / 1e6:.0f} MB on disk; inserted in {insert_s:.1f} s "
          f"({total / insert_s:,.0f} rows/s, executemany in one transaction)")
    print(table(["query (SqliteStore, as the server calls it)", "runs", "p50 ms", "p99 ms", "max ms"], [
        ["segments(channel, one day, limit 100): a search", len(search), f"{pct(search, 50):.2f}",
         f"{pct(search, 99):.2f}", f"{max(search):.2f}"],
        ["segment_summary(last day): the storage report", len(summary), f"{pct(summary, 50):.0f}",
         f"{pct(summary, 99):.0f}", f"{max(summary):.0f}"],
    ]))
    print(f"searches returned {found / len(search):.1f} segments each on average (24-25 expected); "
          f"the summary has {len(out):,} channel rows")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=300.0, help="the window (default 300): the first half "
                   "without viewers, the second with")
    p.add_argument("--viewers", type=int, default=5, help="HTTP-FLV viewers in the second half (default 5)")
    p.add_argument("--nvrs", type=int, default=2, help="simulated NVRs (default 2)")
    p.add_argument("--channels", type=int, default=10, help="channels per NVR (default 10)")
    p.add_argument("--bitrate", type=int, default=1000, help="kbit/s per stream (default 1000)")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--gop", type=int, default=50, help="frames per GOP (default 50)")
    p.add_argument("--video-size", default="640x360")
    p.add_argument("--segment-seconds", type=int, default=60, help="recording.segment_seconds (default 60)")
    p.add_argument("--workers", type=int, default=1, help="media worker processes (default 1)")
    p.add_argument("--seek", type=float, default=90.0, help="playback seek offset in s (default 90)")
    p.add_argument("--index-channels", type=int, default=1000, help="index bench channels (default 1000)")
    p.add_argument("--index-days", type=int, default=100, help="index bench days per channel (default 100)")
    p.add_argument("--index-queries", type=int, default=2000, help="random searches timed (default 2000)")
    p.add_argument("--summary-queries", type=int, default=20, help="storage summaries timed (default 20)")
    p.add_argument("--skip-live", action="store_true", help="only the index bench")
    p.add_argument("--skip-index", action="store_true", help="only the live run")
    args = p.parse_args()
    if min(args.nvrs, args.channels, args.fps, args.gop, args.workers, args.index_channels,
           args.index_days, args.index_queries, args.summary_queries) < 1 or args.seconds <= 0:
        p.error("counts must be at least 1 and --seconds positive")
    if args.viewers > args.nvrs * args.channels:
        p.error("--viewers is at most the number of channels")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
          flush=True)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    with tempfile.TemporaryDirectory(prefix="bench-recording-e2e-") as tmp:
        try:
            if not args.skip_live:
                live(args, Path(tmp))
            if not args.skip_index:
                asyncio.run(index_bench(args, Path(tmp)))
        except KeyboardInterrupt:
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
