#!/usr/bin/env python3
"""How many streams the relay carries without loss, by number of media workers.

Runs ``bench/relay.py --workers W --streams N`` (a fresh server, fleet and viewers each time)
for N = ``--start``, ``--start + --step``, ... until a run is not lossless (kernel UDP drops,
RTP sequence gaps, a viewer error, or frames short beyond the window's edges: relay.py's
"lossless" line), for each W of ``--workers``. Prints every run's load line and, per W, the
largest lossless N, then each W's count against the first W's (issue 8: two workers on two
cores should carry at least 1.8x the streams of one).

Everything shares the machine: the simulator fleet (``--fleets`` processes) and the bench's
viewers use CPU too, so on a small machine the load generator limits what can be shown; the
CPU line of every run says who used what.

    python bench/relay_scale.py --workers 1 2 --start 50 --step 25
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_once(workers: int, streams: int, args: argparse.Namespace) -> tuple[bool, list[str]]:
    argv = [sys.executable, str(HERE / "relay.py"), "--workers", str(workers), "--streams", str(streams),
            "--window", str(args.window), "--cold", "0", "--cold-gop", "0", "--fleets", str(args.fleets),
            "--bitrate", str(args.bitrate), "--video-size", args.video_size]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=args.window + 240)
    lines = out.stdout.splitlines()
    keep = [ln for ln in lines if re.search(r"server CPU|RTP in:|frames:|lossless:|others in", ln)]
    if out.returncode != 0:
        keep.append(f"relay.py exited {out.returncode}: {out.stderr.strip().splitlines()[-1:]}")
    return any("lossless: yes" in ln for ln in lines), keep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    p.add_argument("--start", type=int, default=50, help="first stream count (default 50)")
    p.add_argument("--step", type=int, default=25, help="stream count step (default 25)")
    p.add_argument("--max", type=int, default=1000, help="stop at this many streams (default 1000)")
    p.add_argument("--window", type=float, default=10.0, help="measured seconds per run (default 10)")
    p.add_argument("--fleets", type=int, default=4, help="simulator processes (default 4)")
    p.add_argument("--bitrate", type=int, default=2000, help="kbit/s per stream (default 2000)")
    p.add_argument("--video-size", default="1280x720")
    args = p.parse_args()
    if args.start < 1 or args.step < 1 or any(w < 1 for w in args.workers):
        p.error("--start, --step and every --workers must be >= 1")
    best: dict[int, int] = {}
    for workers in args.workers:
        best[workers] = 0
        streams = args.start
        while streams <= args.max:
            ok, lines = run_once(workers, streams, args)
            print(f"workers {workers}, {streams} streams: {'lossless' if ok else 'LOSS'}", flush=True)
            for ln in lines:
                print("   " + ln.strip(), flush=True)
            if not ok:
                break
            best[workers] = streams
            streams += args.step
    print("largest lossless stream count: " + ", ".join(f"{w} worker{'s' if w > 1 else ''}: {n}"
                                                        for w, n in best.items()), flush=True)
    first = args.workers[0]
    for w in args.workers[1:]:
        if best[first]:
            print(f"  {w} workers carry {best[w] / best[first]:.2f}x the streams of {first}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
