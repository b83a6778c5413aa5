#!/usr/bin/env python3
"""Catalog sync benchmark: time and server CPU to sync an NVR's 10,000-channel catalog.

A real server process (``python -m gb28181.cli serve``) and, in this process, one simulated
NVR with ``--channels`` channels. For each items-per-message setting the NVR registers, the
initial sync is awaited, and then ``POST /api/v1/devices/{id}/sync`` is timed: wall time,
server CPU seconds (psutil on the server process), messages and items per CPU-second.
The settings are each other's reference in the same run: at 1 item per message the SIP
round trip per MESSAGE dominates, at 50 the parsing and storing of items does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from simulators.fleet import Fleet, FleetConfig  # noqa: E402

NVR = "34020000001180000001"
TOKEN = "bench-token-123456"




from gb28181.netutil import free_port  # noqa: E402


def http(port: int, method: str, path: str, timeout: float = 600) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


async def one_run(channels: int, per_message: int, transport: str) -> dict:
    sip_port, http_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GB28181_DATA_DIR=tmp, GB28181_SIP__HOST="127.0.0.1",
                   GB28181_SIP__PORT=str(sip_port), GB28181_HTTP__HOST="127.0.0.1",
                   GB28181_HTTP__PORT=str(http_port), GB28181_API__TOKEN=TOKEN,
                   GB28181_LOG__LEVEL="warning", GB28181_CATALOG__SUBSCRIBE="false",
                   GB28181_CATALOG__REFRESH_INTERVAL="0")
        server = subprocess.Popen([sys.executable, "-m", "gb28181.cli", "serve"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        fleet = None
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    http(http_port, "GET", "/healthz", 1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("bench: server did not start") from None
                    await asyncio.sleep(0.1)
            proc = psutil.Process(server.pid)
            fleet = Fleet(FleetConfig(server_port=sip_port, devices=1, nvr=True, channels=channels,
                                      first_id=NVR, catalog_items_per_message=per_message,
                                      keepalive_interval=30, transport=transport))
            await fleet.start()
            assert await fleet.wait_registered(30), fleet.summary()
            while True:  # the initial sync after registration
                _, page = await asyncio.to_thread(http, http_port, "GET",
                                                  f"/api/v1/devices/{NVR}/channels?limit=1")
                if page["total"] >= channels:
                    break
                await asyncio.sleep(0.2)
            rss = proc.memory_info().rss
            c0, t0 = cpu(proc), time.perf_counter()
            status, result = await asyncio.to_thread(http, http_port, "POST", f"/api/v1/devices/{NVR}/sync")
            wall, used = time.perf_counter() - t0, cpu(proc) - c0
            assert status == 200 and result["complete"], result
            messages = -(-channels // per_message)
            return {"per_message": per_message, "transport": transport, "wall": wall, "cpu": used,
                    "messages": messages, "items": result["items"], "rss": rss}
        finally:
            if fleet is not None:
                await fleet.stop()
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, default=10_000, help="channels of the NVR (default 10000)")
    p.add_argument("--per-message", default="1,2,10,50",
                   help="items per Response MESSAGE to try, comma-separated (default 1,2,10,50)")
    p.add_argument("--transport", choices=("udp", "tcp"), default="udp")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    for n in (int(x) for x in args.per_message.split(",")):
        r = asyncio.run(one_run(args.channels, n, args.transport))
        print(f"catalog of {r['items']} channels, {n} per message ({r['messages']} MESSAGEs, "
              f"{r['transport']}): {r['wall']:.2f} s wall, server CPU {r['cpu']:.2f} s -> "
              f"{r['items'] / r['cpu']:,.0f} items and {r['messages'] / r['cpu']:,.0f} messages per "
              f"CPU-second; server RSS {r['rss'] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
