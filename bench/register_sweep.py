#!/usr/bin/env python3
"""Registrar rate sweep: REGISTER+digest calls per CPU-second and success rate, against Kamailio.

For every offered rate of the sweep (``--rates``) and every target, in this order:

* ``kamailio``   Kamailio 5 as a plain digest registrar (the shared interop kamailio.cfg, copied
                 to a temporary directory with its listen port changed), the same-run reference;
* ``server-qoff`` our server (``python -m gb28181.cli serve``, uvloop, SQLite) with the
                 post-registration queries off (GB28181_REGISTRATION__QUERY_DEVICE_INFO=false,
                 GB28181_CATALOG__QUERY_ON_REGISTER=false);
* ``server-qon``  our server on its defaults: each newly registered device is sent query
                 MESSAGEs (DeviceInfo, then Catalog, and whatever else the server asks);
* ``server-nodurable`` (only when asked for with --targets) queries off, and the 200 sent
                 before the registration is committed: not a product mode, the measure of
                 what durable answers cost;

a freshly started target (fresh data directory, empty Kamailio location table) is registered by
sipp (C++; Debian package ``sip-tester``) with /work/shared/interop/sipp/gb_register_uac.xml
(REGISTER, 401, REGISTER with digest, 200) at the offered rate for ``--seconds`` of load, each
call a distinct device ID never used before in the sweep, so every call is a first
registration. sipp runs an out-of-call scenario (bench/sipp/gb_answer_message_ooc.xml) that
answers any MESSAGE with 200 OK as a device would, so the server's queries are delivered (sipp
sends no Response MESSAGE with data, so each query then waits for the server's own timeout).
Those answered MESSAGEs are not calls of the main scenario: sipp does not count them as
successful or failed calls (the notes count them from sipp's error log).

A call fails when sipp gives up retransmitting (no answer) or gets an answer the scenario does
not expect, e.g. 503 when the server sheds load; sipp then aborts the call by sending a BYE
(the server answers 481), and at exit it aborts the out-of-call calls still waiting to absorb
retransmissions the same way: both show in the server's SIP in/out counts.

Measured per point, from outside with psutil / wait4:
  achieved calls/s   successful calls / sipp's wall time (start to exit, which includes the
                     tail of retransmissions of calls that fail);
  target CPU         user+system seconds of the target over the same window (Kamailio: the sum
                     over all its processes), as CPU-seconds and as % of one core;
  calls/CPU-s        successful calls per target CPU-second; "vs kam" is the server's figure
                     divided by Kamailio's at the same offered rate;
  sipp CPU           sipp's own CPU (% of one core; sipp is single-threaded, so near 100 % it
                     is the bottleneck and the row is flagged);
  others             CPU used on the machine by everything else over the window (% of one
                     core), to show how busy the shared machine was.
After the table come per-point notes: sipp's failure reasons, retransmissions and unexpected
messages, response-time buckets, and the server's own counters (/metrics) for the window.

Every process it starts (targets, sipp) runs in its own session and is stopped, with all its
descendants, on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
SHARED = ROOT.parent / "shared" / "interop"
SIPP_SCENARIO = SHARED / "sipp" / "gb_register_uac.xml"
KAMAILIO_CFG = SHARED / "kamailio" / "kamailio.cfg"
OOC_SCENARIO = BENCH_DIR / "sipp" / "gb_answer_message_ooc.xml"

SERVER_ID = "34020000002000000001"
DOMAIN = "3402000000"
PASSWORD = "12345678"
HOST = "127.0.0.1"
MAX_SERIAL = 9_999_999  # device IDs carry a 7-digit serial

TARGETS = ("kamailio", "server-qoff", "server-qon", "server-nodurable")

# server-nodurable: the server with queries off whose registrar answers 200 at once instead of
# after the commit (the registration is still written, later). Not a product mode, only the
# measure of what durable answers cost.
NODURABLE = ("import sys; import gb28181.registrar as r; "
             "r.Registrar._when_durable = lambda self, answer: answer.committed(True); "
             "from gb28181.cli import main; sys.exit(main(sys.argv[1:]))")


class BenchError(RuntimeError):
    """A clear, expected failure: printed as one message, exit status 2."""


class Interrupted(BaseException):
    """SIGTERM/SIGHUP: unwind through every ``finally`` like Ctrl-C does."""


# -- processes ----------------------------------------------------------------------------------

def _load_prctl():
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # resolved here, so the child only makes one C call before exec


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if this script dies, even by SIGKILL (Linux)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Processes:
    """Every process this script starts; ``stop_all`` ends each with all its descendants."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, cmd: list[str], **kw) -> subprocess.Popen:
        # Own session: Ctrl-C in the terminal reaches only us, and we stop them in order.
        # preexec_fn only makes one C call (no locks taken), safe even with threads around.
        proc = subprocess.Popen(cmd, start_new_session=True,
                                preexec_fn=_die_with_parent, **kw)  # noqa: PLW1509
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 15.0) -> None:
        """SIGTERM the process (it stops its own children), then SIGKILL whatever of it and its
        descendants (as found before the SIGTERM) is left. psutil checks each process's
        identity (pid plus start time), so a recycled pid is never signalled."""
        family: list[psutil.Process] = []
        if proc.returncode is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                leader = psutil.Process(proc.pid)
                family = [leader] + leader.children(recursive=True)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(family, timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=5)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)  # sets returncode (already reaped: Popen copes)
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            with contextlib.suppress(Exception):
                self.stop(proc)


def wait_rusage(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
    """Wait for ``proc`` with wait4; returns (exit code or None on timeout, its CPU-seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, ru.ru_utime + ru.ru_stime
        if time.monotonic() >= deadline:
            return None, 0.0
        time.sleep(0.02)


def cpu_of(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def busy_cpu_seconds() -> float:
    """CPU-seconds spent on the whole machine, all cores, not idle or waiting for I/O."""
    t = psutil.cpu_times()  # on Linux, user already includes guest time
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)


def udp_drops(procs: list[psutil.Process]) -> int:
    """Datagrams the kernel dropped on the UDP sockets of ``procs`` (full receive buffer)."""
    inodes: set[str] = set()
    for p in procs:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p.pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{p.pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f, None)
            for line in f:
                cols = line.split()
                if len(cols) >= 13 and cols[9] in inodes:
                    total += int(cols[12])
    return total


def udp_rcvbuf_errors() -> int:
    """Machine-wide UDP receive-buffer drops (/proc/net/snmp RcvbufErrors)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()
                 if ln.startswith("Udp:")]
        return int(lines[1][lines[0].index("RcvbufErrors")])
    return 0


# -- ports --------------------------------------------------------------------------------------

def udp_port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_udp_port() -> int:
    """A port the kernel just gave us for UDP (bound to 0, read back, released).

    Racy by nature, since the tool we hand it to binds it later: callers check it again right
    before use and retry on a bind failure."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if udp_port_free(port):
            return port
    raise BenchError("no free UDP port on 127.0.0.1")


# -- devices ------------------------------------------------------------------------------------

def device_id(n: int) -> str:
    return f"{DOMAIN[:8]}00132{n:07d}"


def write_devices(path: Path, first: int, count: int) -> None:
    """sipp injection file, the format of /work/shared/interop/sipp/make_devices_csv.py."""
    with path.open("w") as f:
        f.write("SEQUENTIAL\n")
        for n in range(first, first + count):
            dev = device_id(n)
            f.write(f"{dev};{DOMAIN};{SERVER_ID};{PASSWORD};"
                    f"[authentication username={dev} password={PASSWORD}]\n")


# -- targets ------------------------------------------------------------------------------------

class Target:
    """A registrar under test: started fresh for each point, measured from outside."""

    name = ""
    port = 0

    def start(self, tag: str = "") -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def processes(self) -> list[psutil.Process]:
        raise NotImplementedError

    def counters(self) -> dict[str, float]:
        return {}

    def log_summary(self) -> str:
        return ""


class Kamailio(Target):
    """Kamailio in the foreground (-DD: the creator does not daemonise, its children stay ours)."""

    name = "kamailio"

    def __init__(self, procs: Processes, binary: str, work: Path, shm_mb: int) -> None:
        self.procs, self.binary, self.work, self.shm_mb = procs, binary, work, shm_mb
        self.proc: subprocess.Popen | None = None
        self.family: list[psutil.Process] = []
        self.log = work / "kamailio.log"  # renamed per point by start(tag)

    def start(self, tag: str = "") -> None:
        if tag:
            self.log = self.work / f"kamailio-{tag}.log"
        template = KAMAILIO_CFG.read_text()
        if not re.search(r"^listen=udp:127\.0\.0\.1:\d+", template, re.MULTILINE):
            raise BenchError(f"{KAMAILIO_CFG}: no 'listen=udp:127.0.0.1:PORT' line to change")
        last = ""
        for _attempt in range(5):
            port = pick_udp_port()
            cfg = self.work / "kamailio.cfg"
            cfg.write_text(re.sub(r"^listen=udp:127\.0\.0\.1:\d+", f"listen=udp:{HOST}:{port}",
                                  template, count=1, flags=re.MULTILINE))
            if not udp_port_free(port):  # taken between the pick and now: pick again
                continue
            with self.log.open("w") as out:
                self.proc = self.procs.start(
                    [self.binary, "-DD", "-E", "-f", str(cfg), "-m", str(self.shm_mb), "-M", "16"],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=self.work)
            if probe_sip(port, self.proc, timeout=15.0):
                self.port = port
                time.sleep(0.3)  # let every child finish its start-up
                main = psutil.Process(self.proc.pid)
                self.family = [main] + main.children(recursive=True)
                return
            code = self.proc.poll()
            last = (f"(exit status {code}) " if code is not None else "(no answer to OPTIONS) ") \
                + self.log.read_text(errors="replace")[-1500:]
            self.procs.stop(self.proc)
            self.proc = None
            if "in use" not in last and "bind" not in last.lower():
                break
        raise BenchError(f"kamailio did not start (see its log below):\n{last}")

    def processes(self) -> list[psutil.Process]:
        # Children are forked at start-up only; pick up any newcomer anyway.
        if self.proc is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                known = {p.pid for p in self.family}
                for p in psutil.Process(self.proc.pid).children(recursive=True):
                    if p.pid not in known:
                        self.family.append(p)
        return self.family

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None

    def log_summary(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        errors = [ln for ln in text.splitlines() if " ERROR:" in ln or "CRITICAL" in ln]
        return f"kamailio log: {len(errors)} ERROR lines" + (f", first: {errors[0][:160]}"
                                                            if errors else "")


class Server(Target):
    """Our server as bench/register.py starts it, on ports bound to 0 and read back."""

    def __init__(self, procs: Processes, work: Path, queries: bool, ready_file_supported: bool,
                 log_level: str = "warning", durable: bool = True) -> None:
        self.procs, self.work, self.queries, self.log_level = procs, work, queries, log_level
        self.ready_file_supported = ready_file_supported
        self.durable = durable
        self.name = "server-qon" if queries else "server-qoff" if durable else "server-nodurable"
        self.proc: subprocess.Popen | None = None
        self.http_port = 0
        self.log = work / f"{self.name}.log"  # renamed per point by start(tag)

    def start(self, tag: str = "") -> None:
        if tag:
            self.log = self.work / f"{self.name}-{tag}.log"
        data = self.work / f"data-{self.name}"
        shutil.rmtree(data, ignore_errors=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GB28181_")}
        env.update(GB28181_DATA_DIR=str(data), GB28181_SIP__HOST=HOST, GB28181_SIP__PORT="0",
                   GB28181_HTTP__HOST=HOST, GB28181_HTTP__PORT="0", GB28181_MEDIA__HOST=HOST,
                   GB28181_MEDIA__RTP_PORT="0", GB28181_LOG__LEVEL=self.log_level,
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                            os.environ.get("PYTHONPATH")])))
        if not self.queries:
            env.update(GB28181_REGISTRATION__QUERY_DEVICE_INFO="false",
                       GB28181_CATALOG__QUERY_ON_REGISTER="false")
        cmd = ([sys.executable, "-m", "gb28181.cli", "serve"] if self.durable
               else [sys.executable, "-c", NODURABLE, "serve"])
        ready = self.work / f"{self.name}.ready.json"
        ready.unlink(missing_ok=True)
        if self.ready_file_supported:
            cmd += ["--ready-file", str(ready)]
        # stdout to a file, not a pipe: if this script dies, the server must not find its
        # stdout broken when it prints its "stopping" line (it then hangs, see the report).
        out_path = self.log.with_suffix(".out")
        with self.log.open("w") as err, out_path.open("w") as out:
            self.proc = self.procs.start(cmd, env=env, cwd=self.work, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=err)
        serving: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not serving:
            if ready.exists():
                info = json.loads(ready.read_text())
                serving.update(sip=int(info["sip_port"]), http=int(info["http_port"]))
            else:  # servers without --ready-file print the bound ports
                m = re.search(r"serving: SIP \S+:(\d+) .*HTTP http://[^:/]+:(\d+)/",
                              out_path.read_text(errors="replace"))
                if m:
                    serving.update(sip=int(m.group(1)), http=int(m.group(2)))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        if not serving:
            log = self.log.read_text(errors="replace")[-2000:]
            raise BenchError(f"the server did not come up (exit {self.proc.poll()}); its log:\n{log}")
        self.port, self.http_port = serving["sip"], serving["http"]
        wait_http(self.http_port, self.proc)
        time.sleep(0.5)

    def processes(self) -> list[psutil.Process]:
        assert self.proc is not None
        return [psutil.Process(self.proc.pid)]

    def counters(self) -> dict[str, float]:
        out = scrape_metrics(self.http_port)
        if self.proc is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                out["rss_bytes"] = float(psutil.Process(self.proc.pid).memory_info().rss)
        return out

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc, timeout=60)
            self.proc = None

    def log_summary(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        lines = [ln for ln in text.splitlines() if re.search(r" (WARNING|ERROR|CRITICAL) ", ln)]
        if not lines:
            return "server log: no warnings"
        kinds: dict[str, int] = {}
        for ln in lines:
            key = re.sub(r"\d+", "N", ln.split(": ", 1)[-1])[:90]
            kinds[key] = kinds.get(key, 0) + 1
        top = sorted(kinds.items(), key=lambda kv: -kv[1])[:3]
        return f"server log: {len(lines)} warning/error lines; " + "; ".join(
            f"{n}x '{k}'" for k, n in top)


def probe_sip(port: int, proc: subprocess.Popen, timeout: float) -> bool:
    """True once something answers an OPTIONS on ``port``; False if ``proc`` exits first."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        s.settimeout(0.2)
        mine = s.getsockname()[1]
        deadline = time.monotonic() + timeout
        n = 0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            n += 1
            msg = (f"OPTIONS sip:{SERVER_ID}@{HOST}:{port} SIP/2.0\r\n"
                   f"Via: SIP/2.0/UDP {HOST}:{mine};rport;branch=z9hG4bKprobe{n}\r\n"
                   f"From: <sip:probe@{HOST}>;tag=probe\r\nTo: <sip:{SERVER_ID}@{HOST}>\r\n"
                   f"Call-ID: probe{n}@{HOST}\r\nCSeq: {n} OPTIONS\r\nMax-Forwards: 70\r\n"
                   "Content-Length: 0\r\n\r\n")
            s.sendto(msg.encode(), (HOST, port))
            try:
                if s.recv(65535).startswith(b"SIP/2.0 "):
                    return True
            except (TimeoutError, ConnectionRefusedError):
                time.sleep(0.1)
    return False


def wait_http(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the server exited with {proc.returncode} during start-up")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise BenchError("the server did not answer /healthz within 30 s")


def scrape_metrics(port: int) -> dict[str, float]:
    """The server's Prometheus counters as {'name{labels}': value}."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def server_supports_ready_file() -> bool:
    out = subprocess.run([sys.executable, "-m", "gb28181.cli", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    if out.returncode != 0:
        raise BenchError(f"cannot run the server ({sys.executable} -m gb28181.cli): "
                         f"{(out.stderr or out.stdout).strip()[-500:]}")
    return "--ready-file" in out.stdout


# -- sipp ---------------------------------------------------------------------------------------

@dataclass
class SippResult:
    ok: int
    failed: int
    created: int
    wall: float
    cpu: float
    stats: dict[str, str] = field(default_factory=dict)
    rtd_buckets: list[tuple[str, int]] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    timed_out: bool = False
    peak_open: int = -1
    limit: int = 0


def run_sipp(procs: Processes, sipp: str, work: Path, tag: str, port: int, devices: Path,
             calls: int, rate: int, limit: int, max_wait: float,
             on_started=None, trace: bool = False) -> SippResult:
    stat_file = work / f"{tag}.stat.csv"
    err_file = work / f"{tag}.errors.log"
    out_file = work / f"{tag}.sipp.out"
    last = ""
    for _attempt in range(5):
        local = pick_udp_port()
        for f in (stat_file, err_file):
            f.unlink(missing_ok=True)
        cmd = [sipp, f"{HOST}:{port}", "-sf", str(work / SIPP_SCENARIO.name),
               "-oocsf", str(work / OOC_SCENARIO.name), "-inf", str(devices),
               "-i", HOST, "-p", str(local), "-r", str(rate), "-m", str(calls), "-l", str(limit),
               "-nostdin", "-timeout", f"{int(max_wait)}s", "-buff_size", str(8 * 1024 * 1024),
               "-trace_stat", "-stf", str(stat_file), "-fd", "1",
               "-trace_err", "-error_file", str(err_file)]
        if trace:
            cmd += ["-trace_msg", "-message_file", str(work / f"{tag}.messages.log")]
        if not udp_port_free(local):
            continue
        t0 = time.perf_counter()
        with out_file.open("w") as out:
            proc = procs.start(cmd, cwd=work, stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT)
        if on_started is not None:
            on_started(proc)
        try:
            rc, cpu = wait_rusage(proc, max_wait + 30)
        finally:
            if proc.returncode is None:
                procs.stop(proc)
        wall = time.perf_counter() - t0
        if proc in procs.started:
            procs.started.remove(proc)
        text = out_file.read_text(errors="replace")
        stats = read_stat_csv(stat_file)
        if not stats and re.search(r"bind|in use", text, re.IGNORECASE):
            last = text[-1500:]
            continue  # the port went between the check and sipp's bind: pick another
        if not stats:
            raise BenchError(f"sipp gave no statistics (exit {rc}); its output:\n{text[-2000:]}")
        res = SippResult(ok=int(stats.get("SuccessfulCall(C)", 0)),
                         failed=int(stats.get("FailedCall(C)", 0)),
                         created=int(stats.get("TotalCallCreated", 0)),
                         wall=wall, cpu=cpu, stats=stats, timed_out=rc is None)
        res.rtd_buckets = [(k.split("_", 1)[1], int(v or 0)) for k, v in stats.items()
                           if k.startswith("ResponseTimeRepartition1_")]
        res.errors = summarise_errors(err_file)
        peaks = re.findall(r"Peak was (\d+) calls", text)
        res.peak_open, res.limit = (int(peaks[-1]) if peaks else -1), limit
        return res
    raise BenchError(f"sipp could not bind a local port after 5 tries:\n{last}")


def read_stat_csv(path: Path) -> dict[str, str]:
    """The last (cumulative) line of sipp's -trace_stat file."""
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter=";"))
    if len(rows) < 2:
        return {}
    return dict(zip(rows[0], rows[-1]))


def event_kind(event: str) -> str:
    """One sipp error-log event reduced to its kind: call IDs and numbers dropped, but what
    sipp expected and what it received (a status code or a method) kept."""
    head = event.strip().splitlines()[0] if event.strip() else ""
    received = re.search(r"received '([^'\r\n]*)", head)
    expecting = re.search(r"while expecting '([^']*)'", head)
    phrase = head.split("'")[0]
    phrase = re.sub(r"^Dead call \S+", "Dead call", phrase)
    phrase = re.sub(r"(,?\s*received\s*|\s*(for|with) Call-I[dD]\s*)$", "", phrase).rstrip(" :,")
    phrase = re.sub(r"\d+", "N", phrase)
    if expecting:
        phrase += f" (expecting {expecting.group(1)})"
    if received:
        got = received.group(1).split()
        if got and got[0].startswith("SIP/"):
            phrase += ", received " + " ".join(got[1:4]).rstrip(":")
        elif got:
            phrase += f", received {got[0]}"
    return phrase[:120]


def summarise_errors(path: Path) -> dict[str, int]:
    """sipp's error log by kind of event, most frequent first.

    sipp writes one event per timestamp, without reliable line breaks; an expected
    "Received out-of-call MESSAGE" event is logged for every query the out-of-call
    scenario answers."""
    if not path.exists():
        return {}
    text = path.read_text(errors="replace")
    events = re.split(r"\d{4}-\d\d-\d\d\t\d\d:\d\d:\d\d\.\d+\t\d+\.\d+: ", text)[1:]
    kinds: dict[str, int] = {}
    for ev in events:
        key = event_kind(ev)
        kinds[key] = kinds.get(key, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


# -- one point ----------------------------------------------------------------------------------

@dataclass
class Point:
    target: str
    rate: int
    sipp: SippResult
    cpu: float
    others: float
    counters: dict[str, float]
    log: str
    drops: int = 0
    rcvbuf_errors: int = 0

    @property
    def achieved(self) -> float:
        return self.sipp.ok / self.sipp.wall if self.sipp.wall > 0 else 0.0

    @property
    def per_cpu(self) -> float:
        return self.sipp.ok / self.cpu if self.cpu > 0 else float("nan")


def measure(target: Target, procs: Processes, args, work: Path, rate: int, first: int) -> Point:
    calls = max(1, round(rate * args.seconds))
    devices = work / f"devices-{target.name}-{rate}.csv"
    write_devices(devices, first, calls)
    before = target.counters()
    family = target.processes()
    box: dict[str, float] = {}

    drops0, rcvbuf0 = udp_drops(family), udp_rcvbuf_errors()

    def started(_proc) -> None:  # sample as close to sipp's start as possible
        box["cpu0"] = cpu_of(family)
        box["busy0"] = busy_cpu_seconds()
        box["self0"] = sum(os.times()[:2])

    max_wait = args.seconds * 4 + 60
    res = run_sipp(procs, args.sipp, work, f"{target.name}-{rate}", target.port, devices, calls,
                   rate, args.sipp_limit or max(3 * rate, 1000), max_wait, on_started=started,
                   trace=args.sipp_trace)
    cpu = cpu_of(target.processes()) - box["cpu0"]
    busy = busy_cpu_seconds() - box["busy0"]
    me = sum(os.times()[:2]) - box["self0"]
    drops, rcvbuf = udp_drops(target.processes()) - drops0, udp_rcvbuf_errors() - rcvbuf0
    others = max(0.0, busy - cpu - res.cpu - me)
    after = target.counters()
    delta = {k: v - before.get(k, 0.0) for k, v in after.items()}
    if "rss_bytes" in after:
        delta["rss_before"], delta["rss_after"] = before.get("rss_bytes", 0.0), after["rss_bytes"]
    devices.unlink(missing_ok=True)
    return Point(target.name, rate, res, cpu, others, delta, target.log_summary(), drops, rcvbuf)


# -- output -------------------------------------------------------------------------------------

HEADER = (f"{'target':<12} {'offered':>7} {'achieved':>8} {'ok':>7} {'failed':>6} {'ok %':>7} "
          f"{'CPU-s':>6} {'%core':>6} {'calls/CPU-s':>11} {'vs kam':>6} {'sipp %core':>10} "
          f"{'others %core':>12} {'wall s':>6}")


def row(p: Point, kam: Point | None) -> str:
    total = p.sipp.ok + p.sipp.failed
    ok_pct = 100.0 * p.sipp.ok / total if total else 0.0
    ratio = "" if p.target == "kamailio" else (
        f"{p.per_cpu / kam.per_cpu:.2f}" if kam and kam.per_cpu > 0 and p.cpu > 0 else "n/a")
    sipp_pct = 100 * p.sipp.cpu / p.sipp.wall
    flag = "!" if sipp_pct >= 85 else ""
    return (f"{p.target:<12} {p.rate:>7} {p.achieved:>8,.0f} {p.sipp.ok:>7} {p.sipp.failed:>6} "
            f"{ok_pct:>6.2f}% {p.cpu:>6.2f} {100 * p.cpu / p.sipp.wall:>5.0f}% {p.per_cpu:>11,.0f} "
            f"{ratio:>6} {sipp_pct:>9.0f}%{flag:1} {100 * p.others / p.sipp.wall:>11.0f}% "
            f"{p.sipp.wall:>6.1f}")


def percentile_bucket(buckets: list[tuple[str, int]], q: float) -> str:
    total = sum(n for _, n in buckets)
    if not total:
        return "?"
    acc = 0
    for label, n in buckets:
        acc += n
        if acc >= q * total:
            return f"{label} ms"
    return f"{buckets[-1][0]} ms"


def notes(p: Point) -> list[str]:
    s = p.sipp.stats
    out = []
    reasons = {k[len("Failed"):-3]: int(v) for k, v in s.items()
               if k.startswith("Failed") and k.endswith("(C)") and k != "FailedCall(C)"
               and v.isdigit() and int(v)}
    retrans = int(s.get("Retransmissions(C)", 0) or 0)
    ooc = int(s.get("OutOfCallMsgs(C)", 0) or 0)
    answered = sum(n for k, n in p.sipp.errors.items() if k.startswith("Received out-of-call MESSAGE"))
    dead = int(s.get("DeadCallMsgs(C)", 0) or 0)
    wd = f"{s.get('WatchdogMajor(C)', '0')}/{s.get('WatchdogMinor(C)', '0')}"
    out.append(f"sipp: created {p.sipp.created}, retransmissions {retrans}, "
               f"MESSAGEs answered 200 (-oocsf) {answered}, "
               f"out-of-call msgs discarded {ooc}, dead-call msgs {dead}, watchdog major/minor {wd}, "
               f"peak open calls {p.sipp.peak_open} (-l {p.sipp.limit}), "
               f"call time p50 {percentile_bucket(p.sipp.rtd_buckets, 0.5)}, "
               f"p99 {percentile_bucket(p.sipp.rtd_buckets, 0.99)}"
               + (f"; failures by reason {reasons}" if reasons else "")
               + (f"; error log (top kinds) {dict(list(p.sipp.errors.items())[:6])}"
                  if p.sipp.errors else "")
               + ("; sipp hit its -timeout" if p.sipp.timed_out else ""))
    c = p.counters
    if c:
        def g(name: str) -> int:
            return int(c.get(name, 0))
        rejected = {k.split('"')[1]: int(v) for k, v in c.items()
                    if k.startswith("gb28181_register_requests_total{") and "rejected" in k and v}
        reg = "gb28181_register_requests_total{result=\"%s\"}"
        sipm = "gb28181_sip_messages_total{direction=\"%s\"}"
        qry = "gb28181_queries_total{result=\"%s\"}"
        out.append(
            f"server: REGISTER ok {g(reg % 'ok')}, challenged {g(reg % 'challenged')}"
            + (f", rejected {rejected}" if rejected else "")
            + f"; SIP in {g(sipm % 'in')} out {g(sipm % 'out')}, "
            f"retransmissions sent {g('gb28181_sip_retransmissions_total')}, "
            f"absorbed {g('gb28181_sip_absorbed_total')}, "
            f"txn timeouts {g('gb28181_sip_timeouts_total')}, "
            f"parse errors {g('gb28181_sip_parse_errors_total')}, "
            f"answered 503 for overload {g('gb28181_sip_overload_rejected_total')}; "
            f"queries sent {g(qry % 'sent')}, answered {g(qry % 'answered')}, "
            f"timed out {g(qry % 'timed_out')}; RSS {c.get('rss_before', 0) / 2**20:.0f} -> "
            f"{c.get('rss_after', 0) / 2**20:.0f} MiB")
    out.append(f"kernel: {p.drops} datagrams dropped on the target's UDP sockets (receive buffer "
               f"full); {p.rcvbuf_errors} UDP receive-buffer drops machine-wide")
    if p.log:
        out.append(p.log)
    return out


def machine_line(sipp: str, kamailio: str) -> str:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        uv = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uv = "not installed (asyncio default loop)"
    def version(cmd: list[str], pattern: str) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, check=False, text=True, timeout=30)
        except OSError:
            return f"{cmd[0]} ?"
        m = re.search(pattern, out.stdout + out.stderr)
        return m.group(0) if m else f"{cmd[0]} ?"

    sipp_v = version([sipp, "-v"], r"SIPp v[\w.\-]+")
    kam_v = version([kamailio, "-v"], r"kamailio [\d.]+")
    load = os.getloadavg()
    rev = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], r"^[0-9a-f]+")
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True, check=False).stdout.count("\n")
    return (f"machine: {model or platform.machine()}, {os.cpu_count()} logical cores "
            f"({psutil.cpu_count(logical=False)} physical), "
            f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
            f"uvloop {uv}\ntools: {sipp_v}, {kam_v}; load average at start "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\nserver source: {ROOT / 'src'} at git {rev}"
            + (f" with {dirty} files under src/ changed or new since" if dirty else "")
            + f"; SIP parser: {_sip_parser()}")


def _sip_parser() -> str:
    """Which SIP head reader the server runs: the C twin or pure Python (message.ACCELERATOR)."""
    code = "import gb28181.sip.message as m; print(m.ACCELERATOR)"
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=False, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "?"


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="1000,2000,3000,4000,6000",
                   help="offered REGISTER+digest calls/s, comma-separated (default 1000,2000,3000,4000,6000)")
    p.add_argument("--seconds", type=float, default=10.0,
                   help="seconds of load per point: each point is rate x seconds calls (default 10)")
    p.add_argument("--targets", default=",".join(TARGETS[:3]),
                   help=f"comma-separated subset of {','.join(TARGETS)} (default: the first three; the "
                        "'vs kam' ratio needs kamailio)")
    p.add_argument("--sipp", default=shutil.which("sipp"), help="sipp binary (default: sipp on PATH)")
    p.add_argument("--kamailio", default=shutil.which("kamailio") or (
        "/usr/sbin/kamailio" if os.path.exists("/usr/sbin/kamailio") else None),
                   help="kamailio binary (default: kamailio on PATH or /usr/sbin/kamailio)")
    p.add_argument("--kamailio-shm", type=int, default=512, metavar="MB",
                   help="Kamailio shared memory, MB (default 512: room for every contact)")
    p.add_argument("--sipp-limit", type=int, default=0, metavar="N",
                   help="sipp -l, most calls open at once (default 3 x rate, at least 1000)")
    p.add_argument("--server-log-level", default="warning",
                   choices=("debug", "info", "warning", "error"),
                   help="the server's log level (default warning; info logs every failed query, "
                        "which costs CPU under load); the log is summarised in the notes")
    p.add_argument("--sipp-trace", action="store_true",
                   help="also log every SIP message sipp sends and receives (debugging; costs sipp "
                        "CPU; use with --keep)")
    p.add_argument("--keep", metavar="DIR",
                   help="keep logs, sipp statistics and configs in DIR instead of a temp dir")
    args = p.parse_args(argv)
    try:
        args.rates = [int(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        p.error("--rates: comma-separated whole numbers, e.g. 1000,2000,4000")
    if not args.rates or min(args.rates) <= 0:
        p.error("--rates: give at least one positive rate")
    if args.seconds <= 0:
        p.error("--seconds must be positive")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in TARGETS]
    if bad or not args.targets:
        p.error(f"--targets: choose from {', '.join(TARGETS)}")
    return args


def check_tools(args) -> None:
    if not args.sipp or not os.access(args.sipp, os.X_OK):
        raise BenchError("sipp not found: install the Debian package sip-tester "
                         "(apt-get install -y sip-tester) or pass --sipp PATH")
    if "kamailio" in args.targets and (not args.kamailio or not os.access(args.kamailio, os.X_OK)):
        raise BenchError("kamailio not found: install the Debian package kamailio "
                         "(apt-get install -y kamailio) or pass --kamailio PATH")
    for f in (SIPP_SCENARIO, OOC_SCENARIO) + ((KAMAILIO_CFG,) if "kamailio" in args.targets else ()):
        if not f.exists():
            raise BenchError(f"missing {f}")
    total = sum(round(r * args.seconds) for r in args.rates) * len(args.targets)
    if total > MAX_SERIAL:
        raise BenchError(f"the sweep needs {total:,} distinct device IDs, more than the "
                         f"{MAX_SERIAL:,} a 7-digit serial gives: lower --seconds or --rates")


def on_signal(signum, _frame) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs = Processes()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        check_tools(args)
        print(machine_line(args.sipp, args.kamailio or "kamailio"), flush=True)
        ready_file = any(t.startswith("server") for t in args.targets) and server_supports_ready_file()
        with contextlib.ExitStack() as stack:
            if args.keep:
                work = Path(args.keep).resolve()
                work.mkdir(parents=True, exist_ok=True)
            else:
                work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="register_sweep-")))
            shutil.copy(SIPP_SCENARIO, work / SIPP_SCENARIO.name)
            shutil.copy(OOC_SCENARIO, work / OOC_SCENARIO.name)
            print(f"sweep: rates {args.rates} calls/s, {args.seconds:g} s of load per point "
                  f"(rate x {args.seconds:g} calls, each a new device), targets {args.targets}; "
                  f"a fresh target per point\n", flush=True)
            print(HEADER, flush=True)
            points: list[Point] = []
            serial = 1
            for rate in args.rates:
                kam: Point | None = None
                for name in args.targets:
                    if name == "kamailio":
                        target: Target = Kamailio(procs, args.kamailio, work, args.kamailio_shm)
                    else:
                        target = Server(procs, work, queries=(name == "server-qon"),
                                        ready_file_supported=ready_file,
                                        log_level=args.server_log_level,
                                        durable=name != "server-nodurable")
                    target.start(str(rate))
                    try:
                        point = measure(target, procs, args, work, rate, serial)
                    finally:
                        target.stop()
                    serial += round(rate * args.seconds)
                    if name == "kamailio":
                        kam = point
                    points.append(point)
                    print(row(point, kam), flush=True)
            print("\n'!' after sipp %core: sipp used >= 85 % of a core, so sipp may be the limit "
                  "there.\n'others %core': CPU used by other processes on the machine over the "
                  "window (the machine is shared).\n")
            for p in points:
                print(f"[{p.target} @ {p.rate}/s]")
                for line in notes(p):
                    print(f"  {line}")
            if args.keep:
                print(f"\nlogs and sipp statistics kept in {work}")
        return 0
    except BenchError as exc:
        print(f"register_sweep: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted):
        print("\nregister_sweep: interrupted; stopping everything it started", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
