#!/usr/bin/env python3
"""Alarm benchmark: alarm-to-webhook latency and alarms per server CPU-second, with a reference.

A real server process (``python -m gb28181.cli serve``, relay in-process and idle) with one
webhook pointing at an aiohttp receiver in this process, and ``--devices`` simulated IPCs
(default 10,000) in ``--sim-procs`` ``gb28181-sim`` processes raising an alarm every
``--alarm-interval`` seconds each (GB/T 28181-2016 §9.4: MESSAGE, 200, stored, Response MESSAGE,
webhook POST). Over a ``--seconds`` window after every device registered:

- latency: webhook arrival here minus the alarm's AlarmTime (the simulator's clock, same host,
  milliseconds), p50/p99/max;
- alarms per server CPU-second (psutil on the server; alarms counted by its /metrics).

Reference, same run and same devices: the alarm simulators are stopped and the same devices
sending keepalives at the same message rate instead (``--keepalive-interval`` = the alarm
interval), measured the same way: keepalives per server CPU-second. An alarm costs a MESSAGE in,
its 200, a Response MESSAGE out and its 200, a database row and a webhook POST; a keepalive one
MESSAGE and its 200.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import psutil
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from gb28181.netutil import free_port  # noqa: E402

TOKEN = "bench-token-123456"
FIRST = 34020000001320000001


def http(port: int, path: str, timeout: float = 60) -> bytes:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def metric(port: int, name: str) -> float:
    text = http(port, "/metrics").decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def sim_cmd() -> list[str]:
    script = Path(sys.executable).with_name("gb28181-sim")
    return [str(script)] if script.exists() else [sys.executable, "-m", "simulators.cli"]


def start_sims(sip_port: int, devices: int, procs: int, extra: list[str]) -> list[subprocess.Popen]:
    out = []
    per = -(-devices // procs)
    for k in range(procs):
        n = min(per, devices - k * per)
        if n <= 0:
            break
        out.append(subprocess.Popen(
            sim_cmd() + ["--server", f"127.0.0.1:{sip_port}", "--devices", str(n),
                         "--first-id", str(FIRST + k * per), "--rate", "1000", "--progress", "0",
                         *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    return out


def stop_sims(sims: list[subprocess.Popen]) -> None:
    for p in sims:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in sims:
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


async def wait_online(http_port: int, want: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        health = json.loads(await asyncio.to_thread(http, http_port, "/healthz"))
        if health["online"] >= want:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: only {health['online']} of {want} devices online after {timeout} s")
        await asyncio.sleep(0.5)


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(p * len(values)))] if values else float("nan")


async def run(args: argparse.Namespace) -> dict:
    got: list[tuple[float, float]] = []  # (arrival, AlarmTime)

    async def hook(request: web.Request) -> web.Response:
        event = json.loads(await request.read())
        if event["type"] == "alarm" and event["data"]["alarm_time"]:
            got.append((time.time(), datetime.fromisoformat(event["data"]["alarm_time"]).timestamp()))
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    sip_port, http_port = free_port(), free_port()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, GB28181_DATA_DIR=tmp, GB28181_SIP__HOST="127.0.0.1",
                   GB28181_SIP__PORT=str(sip_port), GB28181_HTTP__HOST="127.0.0.1",
                   GB28181_HTTP__PORT=str(http_port), GB28181_API__TOKEN=TOKEN,
                   GB28181_LOG__LEVEL="warning", GB28181_CATALOG__SUBSCRIBE="false",
                   GB28181_CATALOG__QUERY_ON_REGISTER="false", GB28181_CATALOG__REFRESH_INTERVAL="0",
                   GB28181_REGISTRATION__QUERY_DEVICE_INFO="false",
                   GB28181_REGISTRATION__QUERY_BASIC_PARAM="false", GB28181_MEDIA__WORKERS="0",
                   GB28181_MEDIA__RTP_PORT="0", GB28181_KEEPALIVE__INTERVAL="600",
                   GB28181_EVENTS__WEBHOOKS=json.dumps([{"url": f"http://127.0.0.1:{hook_port}/hook",
                                                         "secret": "bench", "events": ["alarm"]}]))
        server = subprocess.Popen([sys.executable, "-m", "gb28181.cli", "serve"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sims: list[subprocess.Popen] = []
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    http(http_port, "/healthz", 1)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("bench: server did not start") from None
                    await asyncio.sleep(0.1)
            proc = psutil.Process(server.pid)
            # -- alarms -------------------------------------------------------------------------
            sims = start_sims(sip_port, args.devices, args.sim_procs,
                              ["--alarm-interval", str(args.alarm_interval), "--keepalive-interval", "600"])
            await wait_online(http_port, args.devices, 300)
            await asyncio.sleep(args.alarm_interval)  # past the registration storm's tail
            a0 = metric(http_port, "gb28181_alarms_received_total")
            r0 = metric(http_port, 'gb28181_alarm_responses_total')
            c0, t0, n0 = cpu(proc), time.time(), len(got)
            await asyncio.sleep(args.seconds)
            used, t1 = cpu(proc) - c0, time.time()
            alarms = metric(http_port, "gb28181_alarms_received_total") - a0
            responses = metric(http_port, 'gb28181_alarm_responses_total') - r0
            window = sorted(arrival - sent for arrival, sent in got[n0:] if t0 <= arrival <= t1)
            results["alarms"] = {"alarms": alarms, "cpu": used, "wall": t1 - t0, "responses": responses,
                                 "webhooks": len(window),
                                 "p50_ms": pct(window, 0.5) * 1000, "p99_ms": pct(window, 0.99) * 1000,
                                 "max_ms": (window[-1] if window else float("nan")) * 1000}
            stop_sims(sims)
            # -- reference: the same devices sending keepalives at the same rate ------------------
            sims = start_sims(sip_port, args.devices, args.sim_procs,
                              ["--keepalive-interval", str(args.alarm_interval)])
            await asyncio.sleep(5)
            await wait_online(http_port, args.devices, 300)
            await asyncio.sleep(args.alarm_interval)
            k0 = metric(http_port, "gb28181_keepalives_total")
            c0, t0 = cpu(proc), time.time()
            await asyncio.sleep(args.seconds)
            used = cpu(proc) - c0
            keepalives = metric(http_port, "gb28181_keepalives_total") - k0
            results["keepalives"] = {"keepalives": keepalives, "cpu": used, "wall": time.time() - t0}
            results["rss"] = proc.memory_info().rss
        finally:
            stop_sims(sims)
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
            await runner.cleanup()
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=10_000, help="simulated IPCs (default 10000)")
    p.add_argument("--sim-procs", type=int, default=4, help="gb28181-sim processes (default 4)")
    p.add_argument("--alarm-interval", type=float, default=10.0,
                   help="mean seconds between one device's alarms (default 10: 1,000 alarms/s "
                        "from 10,000 devices)")
    p.add_argument("--seconds", type=float, default=20.0, help="measuring window (default 20)")
    args = p.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    r = asyncio.run(run(args))
    a, k = r["alarms"], r["keepalives"]
    print(f"{args.devices} devices, one alarm each every {args.alarm_interval:g} s on average "
          f"({args.sim_procs} simulator processes), {a['wall']:.1f} s window:")
    print(f"  alarms received {a['alarms']:.0f} ({a['alarms'] / a['wall']:,.0f}/s), Responses sent "
          f"{a['responses']:.0f}, webhooks received {a['webhooks']}")
    print(f"  alarm (AlarmTime) -> webhook received: p50 {a['p50_ms']:.1f} ms, p99 {a['p99_ms']:.1f} ms, "
          f"max {a['max_ms']:.1f} ms")
    print(f"  server CPU {a['cpu']:.2f} s -> {a['alarms'] / a['cpu']:,.0f} alarms per CPU-second")
    print(f"reference, same devices, keepalives at the same rate: {k['keepalives']:.0f} in "
          f"{k['wall']:.1f} s, server CPU {k['cpu']:.2f} s -> {k['keepalives'] / k['cpu']:,.0f} "
          f"keepalives per CPU-second; server RSS {r['rss'] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
