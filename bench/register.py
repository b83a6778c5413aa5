#!/usr/bin/env python3
"""Registrar benchmark: REGISTER+auth calls/s, keepalives/s, CPU and RSS per 10k devices.

It starts one real server process (``python -m gb28181.cli serve``, uvloop, SQLite) on
loopback and measures it from outside with psutil while load runs:

1. REGISTER+auth: sipp (a C++ peer, so the load generator is not the bottleneck) registers
   ``--devices`` distinct devices at ``--rate`` calls/s (each call = REGISTER, 401,
   REGISTER with digest, 200). Reports achieved calls/s and calls per server CPU-second.
2. RSS right after that load, then of a restarted server holding all those devices (the
   steady state), per 10k devices.
3. On the restarted server (the devices are still registered, so their keepalives count),
   keepalives at the rate those devices would send them with a 60 s interval
   (devices / 60 per second) for ``--window`` seconds: server CPU as % of one core.
4. Keepalive capacity: keepalives as fast as the blaster goes; keepalives per CPU-second.
5. Reference in the same run: a bare uvloop UDP echo server under the same blaster, so the
   keepalive figure can be read as a ratio to "doing nothing but receiving and sending".

Needs sipp (apt-get install sip-tester). Prints its figures; copy them to BENCHMARKS.md.

``--in-process N`` measures instead what one REGISTER+401+REGISTER+200 call costs the server's
own code, without sockets and without a load generator: a GbServer started as ``gb28181 serve``
starts it (uvloop, SQLite, its collector settings), whose UDP transport is swapped for one that
keeps what is sent; N new devices register in batches of 200, their datagrams handed to the
endpoint as the socket would, the second REGISTER answering the 401's nonce. The server's CPU
(process time, its SQLite thread included) is reported per call and per leg: the first REGISTER,
the second, and the wait for the group commit and the 200. The client's work (building the
requests, computing the digests) is timed apart and left out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SIPP_DIR = ROOT.parent / "shared" / "interop" / "sipp"
SERVER_ID = "34020000002000000001"
DOMAIN = "3402000000"

ECHO_SERVER = """
import asyncio, sys
try:
    import uvloop; uvloop.install()
except ImportError:
    pass
class P(asyncio.DatagramProtocol):
    def connection_made(self, t): self.t = t
    def datagram_received(self, d, a): self.t.sendto(b"SIP/2.0 200 OK\\r\\n\\r\\n", a)
async def main():
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(P, local_addr=("127.0.0.1", int(sys.argv[1])))
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""




from gb28181.netutil import free_port  # noqa: E402


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def device_id(n: int) -> str:
    return f"{DOMAIN[:8]}00132{n:07d}"


def write_csv(path: Path, count: int) -> None:
    with path.open("w") as f:
        f.write("SEQUENTIAL\n")
        for n in range(1, count + 1):
            dev = device_id(n)
            f.write(f"{dev};{DOMAIN};{SERVER_ID};12345678;"
                    f"[authentication username={dev} password=12345678]\n")


class Blaster(asyncio.DatagramProtocol):
    """Sends keepalive MESSAGEs at a fixed rate (or flat out) and counts the 200s."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.ok = 0
        self.other = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr) -> None:
        if data.startswith(b"SIP/2.0 200"):
            self.ok += 1
        else:
            self.other += 1

    def keepalive(self, n: int, seq: int) -> bytes:
        dev = device_id(n % self.count + 1)
        body = (f'<?xml version="1.0" encoding="GB2312"?>\r\n<Notify>\r\n<CmdType>Keepalive</CmdType>\r\n'
                f"<SN>{seq}</SN>\r\n<DeviceID>{dev}</DeviceID>\r\n<Status>OK</Status>\r\n</Notify>\r\n")
        return (f"MESSAGE sip:{SERVER_ID}@{DOMAIN} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{self.port};rport;branch=z9hG4bK{seq:x}k{n}\r\n"
                f"From: <sip:{dev}@{DOMAIN}>;tag={seq:x}\r\nTo: <sip:{SERVER_ID}@{DOMAIN}>\r\n"
                f"Call-ID: ka{seq}x{n}\r\nCSeq: 20 MESSAGE\r\nMax-Forwards: 70\r\n"
                f"Content-Type: Application/MANSCDP+xml\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()


async def blast(port: int, count: int, rate: float | None, seconds: float,
                proc: psutil.Process) -> dict:
    """Send keepalives for ``seconds``; rate None = as fast as responses come back (window 200)."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: Blaster(count),
                                                           local_addr=("127.0.0.1", 0))
    sent = 0
    cpu0, t0 = cpu_seconds(proc), time.perf_counter()
    try:
        if rate is not None:
            tick = 0.01
            while time.perf_counter() - t0 < seconds:
                due = int((time.perf_counter() - t0) * rate)
                while sent < due:
                    transport.sendto(proto.keepalive(sent, sent + 1), ("127.0.0.1", port))
                    sent += 1
                await asyncio.sleep(tick)
        else:
            window = 200
            while time.perf_counter() - t0 < seconds:
                while sent - (proto.ok + proto.other) < window:
                    transport.sendto(proto.keepalive(sent, sent + 1), ("127.0.0.1", port))
                    sent += 1
                await asyncio.sleep(0)
        await asyncio.sleep(0.3)
    finally:
        transport.close()
    elapsed = time.perf_counter() - t0
    cpu = cpu_seconds(proc) - cpu0
    return {"sent": sent, "ok": proto.ok, "other": proto.other, "elapsed": elapsed, "cpu": cpu}


def wait_http(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("bench: the server did not come up; run it by hand to see why")


def start_server(env: dict, http_port: int) -> subprocess.Popen:
    server = subprocess.Popen([sys.executable, "-m", "gb28181.cli", "serve"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(http_port, 60)
    time.sleep(0.5)
    return server


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(60)
    except subprocess.TimeoutExpired:
        server.kill()


def health(port: int) -> dict:
    import json
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
        return json.loads(r.read())


def run_sipp(sipp: str, port: int, csv: Path, count: int, rate: int, workdir: Path) -> tuple[int, int, float]:
    scenario = SIPP_DIR / "gb_register_uac.xml"
    t0 = time.perf_counter()
    out = subprocess.run(
        [sipp, f"127.0.0.1:{port}", "-sf", str(scenario), "-inf", str(csv), "-i", "127.0.0.1",
         "-p", str(free_port()), "-r", str(rate), "-m", str(count), "-l", str(max(rate, 1000)),
         "-nostdin", "-timeout", "300s", "-buff_size", str(8 * 1024 * 1024)],
        cwd=workdir, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    text = out.stdout + out.stderr
    ok = re.search(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)", text)
    failed = re.search(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)", text)
    if ok is None:
        raise SystemExit(f"bench: could not read sipp's result:\n{text[-2000:]}")
    return int(ok.group(1)), int(failed.group(1)) if failed else -1, elapsed


_REGISTER = ("REGISTER sip:{server}@{domain} SIP/2.0\r\n"
             "Via: SIP/2.0/UDP 127.0.0.1:{port};rport;branch=z9hG4bK-{n}-{cseq}\r\n"
             "From: <sip:{dev}@{domain}>;tag={n}SIPpTag00{n}\r\n"
             "To: <sip:{dev}@{domain}>\r\n"
             "Call-ID: {n}-inproc@127.0.0.1\r\n"
             "CSeq: {cseq} REGISTER\r\n"
             "Contact: <sip:{dev}@127.0.0.1:{port}>\r\n"
             "{auth}"
             "Max-Forwards: 70\r\n"
             "User-Agent: SIPp-GB28181-sim\r\n"
             "Expires: 3600\r\n"
             "Content-Length: 0\r\n\r\n")


class _KeptUdp:
    """Stands in for the endpoint's UDP transport: keeps what is sent; the overload probe's
    datagrams come back as the socket would bring them."""

    def __init__(self, endpoint) -> None:
        self.endpoint = endpoint
        self.sent: list[tuple[bytes, tuple]] = []

    def sendto(self, data: bytes, addr) -> None:
        if not data[0]:
            ep = self.endpoint
            asyncio.get_running_loop().call_soon(lambda: ep.queue_probe.receive(data, ep.now))
            return
        self.sent.append((data, addr))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


async def in_process(calls: int, batch: int = 200) -> None:
    import gc

    from gb28181.config import load_config
    from gb28181.server import GbServer
    from gb28181.sip import message
    from gb28181.sip.auth import authorization_header

    parser = getattr(message, "ACCELERATOR", "pure Python")  # older trees have only Python

    challenge = re.compile(rb"WWW-Authenticate: (.*?)\r\n")
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, data_dir=tmp, sip={"host": "127.0.0.1", "port": 0},
                             http={"host": "127.0.0.1", "port": 0}, api={"token": "x" * 20},
                             media={"host": "127.0.0.1", "rtp_port": 0, "workers": 0},
                             registration={"query_device_info": False},
                             catalog={"query_on_register": False})
        server = GbServer(config)
        await server.start()
        endpoint = server.endpoint
        socket_transport, kept = endpoint._udp, _KeptUdp(endpoint)
        endpoint._udp = kept  # type: ignore[assignment]
        gc.collect()
        gc.freeze()  # as `gb28181 serve` does (cli.py)
        gc.set_threshold(20_000, 20, 20)
        legs = [0.0, 0.0, 0.0]
        client = 0.0
        done = n = 0
        start = time.process_time()
        try:
            while done < calls:
                t = time.process_time()
                firsts = []
                for _ in range(min(batch, calls - done)):
                    n += 1
                    dev, port = f"3402000000132{n:07d}", 10_000 + n % 50_000
                    firsts.append((n, dev, port, _REGISTER.format(
                        server=SERVER_ID, domain=DOMAIN, port=port, n=n, dev=dev, cseq=1,
                        auth="").encode()))
                client += time.process_time() - t
                t = time.process_time()
                for _, _, port, data in firsts:
                    endpoint._receive(data, ("127.0.0.1", port), "udp")
                legs[0] += time.process_time() - t
                t = time.process_time()
                seconds = []
                for (i, dev, port, _), (answer, _) in zip(firsts, kept.sent, strict=True):
                    m = challenge.search(answer)
                    assert m is not None, answer[:80]
                    auth = authorization_header(m.group(1).decode(), username=dev, password="12345678",
                                                method="REGISTER", uri=f"sip:{SERVER_ID}@{DOMAIN}")
                    seconds.append((port, _REGISTER.format(
                        server=SERVER_ID, domain=DOMAIN, port=port, n=i, dev=dev, cseq=2,
                        auth=f"Authorization: {auth}\r\n").encode()))
                kept.sent.clear()
                client += time.process_time() - t
                t = time.process_time()
                for port, data in seconds:
                    endpoint._receive(data, ("127.0.0.1", port), "udp")
                legs[1] += time.process_time() - t
                t = time.process_time()
                while len(kept.sent) < len(seconds):  # the group commit, then the 200s
                    await asyncio.sleep(0.001)
                legs[2] += time.process_time() - t
                ok = sum(1 for answer, _ in kept.sent if answer.startswith(b"SIP/2.0 200 "))
                if ok != len(seconds):
                    raise SystemExit(f"bench: {len(seconds) - ok} of {len(seconds)} REGISTERs not answered 200")
                kept.sent.clear()
                done += len(seconds)
            cpu = time.process_time() - start - client
        finally:
            endpoint._udp = socket_transport
            await server.stop()
    us = [leg / done * 1e6 for leg in legs]
    print(f"in-process, SIP parser {parser}: {done} REGISTER+401+REGISTER+200 calls, server "
          f"CPU {cpu / done * 1e6:.1f} us per call (first REGISTER {us[0]:.1f} us, second "
          f"{us[1]:.1f} us, group commit and 200 {us[2]:.1f} us); client work left out "
          f"({client:.2f} s)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=100_000, help="devices to register (default 100000)")
    p.add_argument("--rate", type=int, default=6000, help="sipp REGISTER+auth calls/s offered (default 6000)")
    p.add_argument("--window", type=float, default=30.0, help="seconds of keepalive load per phase (default 30)")
    p.add_argument("--sipp", default=shutil.which("sipp"), help="path of sipp")
    p.add_argument("--in-process", type=int, metavar="N", default=0,
                   help="instead: N REGISTER+401+REGISTER+200 calls through the server's code "
                        "without sockets, CPU per call (see above)")
    args = p.parse_args()
    if args.in_process:
        sys.path.insert(0, str(ROOT / "src"))
        import uvloop
        uvloop.run(in_process(args.in_process))
        return 0
    if not args.sipp:
        raise SystemExit("bench: sipp not found; apt-get install sip-tester")
    if not (SIPP_DIR / "gb_register_uac.xml").exists():
        raise SystemExit(f"bench: sipp scenarios not found in {SIPP_DIR}")
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sip_port, http_port = free_port(), free_port()
        env = dict(os.environ, GB28181_DATA_DIR=str(work / "data"), GB28181_SIP__HOST="127.0.0.1",
                   GB28181_SIP__PORT=str(sip_port), GB28181_HTTP__HOST="127.0.0.1",
                   GB28181_HTTP__PORT=str(http_port), GB28181_LOG__LEVEL="warning",
                   GB28181_REGISTRATION__QUERY_DEVICE_INFO="false",
                   GB28181_CATALOG__QUERY_ON_REGISTER="false",
                   GB28181_KEEPALIVE__INTERVAL="60")
        server = start_server(env, http_port)
        try:
            proc = psutil.Process(server.pid)
            rss0 = proc.memory_info().rss

            csv = work / "devices.csv"
            write_csv(csv, args.devices)
            cpu0 = cpu_seconds(proc)
            ok, failed, elapsed = run_sipp(args.sipp, sip_port, csv, args.devices, args.rate, work)
            cpu = cpu_seconds(proc) - cpu0
            print(f"REGISTER+auth: {ok} calls ok, {failed} failed in {elapsed:.1f} s offered at "
                  f"{args.rate}/s -> {ok / elapsed:,.0f} calls/s achieved; server CPU {cpu:.1f} s "
                  f"({100 * cpu / elapsed:.0f} % of a core) -> {ok / cpu:,.0f} calls per CPU-second")
            time.sleep(1.5)  # let the write-behind flush settle
            h = health(http_port)
            rss1 = proc.memory_info().rss
            print(f"memory under registration load: RSS {rss0 / 2**20:.0f} MiB empty -> "
                  f"{rss1 / 2**20:.0f} MiB right after {h['devices']} registrations "
                  f"(peak: includes completed transactions kept 32 s for retransmissions)")
        finally:
            stop_server(server)

        # Steady state: a restarted server holding the devices, as in production.
        server = start_server(env, http_port)
        try:
            proc = psutil.Process(server.pid)
            h = health(http_port)
            rss2 = proc.memory_info().rss
            print(f"memory, restarted with {h['devices']} devices loaded ({h['online']} still "
                  f"online): RSS {rss2 / 2**20:.0f} MiB, {(rss2 - rss0) / max(1, h['devices']) * 10_000 / 2**20:.1f} "
                  f"MiB per 10k devices over the empty server")

            rate = args.devices / 60.0
            r = asyncio.run(blast(sip_port, args.devices, rate, args.window, proc))
            print(f"keepalive load of {args.devices} devices every 60 s ({rate:,.0f}/s) for "
                  f"{r['elapsed']:.0f} s: {r['ok']}/{r['sent']} answered 200; server CPU "
                  f"{100 * r['cpu'] / r['elapsed']:.1f} % of a core")

            r = asyncio.run(blast(sip_port, args.devices, None, min(10.0, args.window), proc))
            ka_per_cpu = r["ok"] / max(r["cpu"], 1e-9)
            print(f"keepalive capacity: {r['ok'] / r['elapsed']:,.0f} keepalives/s answered "
                  f"(blaster-bound: server at {100 * r['cpu'] / r['elapsed']:.0f} % of a core) -> "
                  f"{ka_per_cpu:,.0f} keepalives per CPU-second")
        finally:
            stop_server(server)

        echo_port = free_port()
        echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, str(echo_port)],
                                stdout=subprocess.PIPE, text=True)
        try:
            echo.stdout.readline()
            r = asyncio.run(blast(echo_port, args.devices, None, min(10.0, args.window),
                                  psutil.Process(echo.pid)))
            echo_per_cpu = r["ok"] / max(r["cpu"], 1e-9)
            print(f"reference (bare uvloop UDP echo, same blaster): {echo_per_cpu:,.0f} datagrams "
                  f"per CPU-second; a keepalive costs {echo_per_cpu / ka_per_cpu:.1f}x a bare echo")
        finally:
            echo.terminate()
            echo.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
