"""Shared fixtures: a real server on loopback with ephemeral ports and a throwaway data dir."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import uvloop

from gb28181.config import Config, load_config
from gb28181.server import GbServer

TOKEN = "test-token-0123456789"


def pytest_asyncio_loop_factories(config, item):
    """Every async test runs on both loops: the default one and uvloop, which `gb28181 serve`
    ships with (uvloop's transports are not asyncio's classes, and once that alone broke TCP)."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def server_config(tmp_path, **overrides) -> Config:
    """Loopback, ephemeral ports, fast keepalive timers; overrides are config sections."""
    base = {
        "data_dir": str(tmp_path / "data"),
        "sip": {"host": "127.0.0.1", "port": 0},
        "http": {"host": "127.0.0.1", "port": 0},
        "api": {"token": TOKEN},
        "keepalive": {"interval": 0.5, "count": 3},
        # Simulated devices report whole seconds (BasicParam HeartBeatInterval) and would
        # override the fast timer above; tests of that feature turn it back on.
        "registration": {"query_basic_param": False},
        "database": {"flush_interval": 0.1},
        # The relay in this process (an in-process media node), so tests can look inside it;
        # the shipped tests (ServedServer) and tests/test_nodes.py run real node processes.
        "media": {"host": "127.0.0.1", "rtp_port": 0, "workers": 0},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return load_config(None, **base)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """A developer's GB28181_* variables must not change what the tests see."""
    import os
    for name in list(os.environ):
        if name.upper().startswith("GB28181_"):
            monkeypatch.delenv(name)


@pytest_asyncio.fixture
async def make_server(tmp_path):
    """``await make_server(**overrides)`` → a started GbServer, stopped at teardown."""
    servers: list[GbServer] = []

    async def factory(**overrides) -> GbServer:
        server = GbServer(server_config(tmp_path, **overrides))
        await server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        try:
            await server.stop()
        except Exception:
            pass


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0,
                   interval: float = 0.05, what: str = "condition") -> None:
    """Poll until ``predicate`` is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)


# -- the product as users run it: `gb28181 serve` and `gb28181-sim` in subprocesses -------------

def command(name: str) -> list[str]:
    """The console script installed beside this interpreter (the README's .venv/bin/...)."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    module = {"gb28181": "gb28181.cli", "gb28181-sim": "simulators.cli"}[name]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus a developer's GB28181_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GB28181_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def http(url: str, method: str = "GET", body: Any = None, token: str | None = None,
         timeout: float = 20.0) -> tuple[int, Any]:
    """(status, JSON or bytes) of one HTTP request; HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, method=method, data=data)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, raw, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    return status, json.loads(raw) if "json" in ctype and raw else raw


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               check: Callable[[], str | None] | None = None, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); ``check`` may report a
    dead process early. Fails the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except OSError:
            result = None
        if result:
            return result
        problem = check() if check is not None else None
        if problem:
            pytest.fail(f"{problem} while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class ServedServer:
    """`gb28181 serve` in its own process group, on its shipped event loop (uvloop), with
    ephemeral ports read back from ``--ready-file``. ``env`` entries are GB28181_* settings."""

    def __init__(self, workdir: Path, **env: str) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "server.log"
        self.ready_path = workdir / "ready.json"
        settings = {"GB28181_DATA_DIR": str(self.data_dir), "GB28181_SIP__HOST": "127.0.0.1",
                    "GB28181_SIP__PORT": "0", "GB28181_HTTP__HOST": "127.0.0.1",
                    "GB28181_HTTP__PORT": "0", "GB28181_MEDIA__HOST": "127.0.0.1",
                    "GB28181_MEDIA__RTP_PORT": "0", "GB28181_API__TOKEN": TOKEN, **env}
        self.env = clean_env(**settings)
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, Any] = {}

    def start(self, timeout: float = 30.0) -> ServedServer:
        self.ready_path.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command("gb28181") + ["serve", "--ready-file", str(self.ready_path)],
                                         cwd=self.workdir, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.ports = wait_until(lambda: self.ready_path.exists() and json.loads(self.ready_path.read_text()),
                                timeout, "the server to listen", self.exited)
        return self

    def exited(self) -> str | None:
        if self.proc is not None and self.proc.poll() is not None:
            return f"gb28181 serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}"
        return None

    @property
    def sip_port(self) -> int:
        return int(self.ports["sip_port"])

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.ports['http_port']}"

    def api(self, path: str, method: str = "GET", body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        return http(self.base + path, method, body, TOKEN, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def error_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if "Traceback" in line or " ERROR " in line]

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, as an init system stops it; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"gb28181 serve did not stop within {timeout} s of SIGTERM")

    def kill(self) -> None:
        """SIGKILL: a crash or a power cut of the process."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


class SimProcess:
    """`gb28181-sim` in its own process group, as installed."""

    def __init__(self, workdir: Path, server: ServedServer, *args: str, name: str = "sim") -> None:
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command("gb28181-sim") + ["--server", f"127.0.0.1:{server.sip_port}", *args],
                cwd=workdir, env=clean_env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exited(self) -> str | None:
        if self.proc.poll() is not None:
            return f"gb28181-sim exited with {self.proc.returncode}:\n{self.log()[-2000:]}"
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


class NodeProcess:
    """`gb28181 media-node` joining a ServedServer, as started on another machine."""

    def __init__(self, workdir: Path, server: ServedServer, *args: str, token: str, name: str) -> None:
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                command("gb28181") + ["media-node", "--server", server.base, "--name", name,
                                      "--http-host", "127.0.0.1", "--media-host", "127.0.0.1", *args],
                cwd=workdir, env=clean_env(GB28181_NODE_TOKEN=token), stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exited(self) -> str | None:
        if self.proc.poll() is not None:
            return f"gb28181 media-node exited with {self.proc.returncode}:\n{self.log()[-2000:]}"
        return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


#: (server ID, SIP domain) of the three levels of a cascade test chain (Annex D.1 civil codes:
#: province 34, city 3402, county 340201).
CHAIN_IDS = {"province": ("34000000002000000001", "3400000000"),
             "city": ("34020000002000000001", "3402000000"),
             "county": ("34020100002000000001", "3402010000")}


class CascadeChain:
    """Three `gb28181 serve` instances on loopback, cascaded county → city → province (GB/T
    28181-2016 §5.2): each lower one lists the one above it under ``upstreams`` with short
    keepalives, so that losses are noticed within seconds. ``env`` goes to all three."""

    def __init__(self, workdir: Path, **env: str) -> None:
        self.workdir = workdir
        self.env = {"GB28181_MEDIA__WORKERS": "1", **env}
        self.servers: dict[str, ServedServer] = {}

    def upstream(self, level: str) -> dict:
        server_id, domain = CHAIN_IDS[level]
        return {"server_id": server_id, "domain": domain, "host": "127.0.0.1",
                "port": self.servers[level].sip_port, "password": "12345678",
                "keepalive_interval": 1.0, "keepalive_count": 5, "retry_min": 0.5, "retry_max": 2.0}

    def _server(self, level: str, upper: str | None) -> ServedServer:
        server_id, domain = CHAIN_IDS[level]
        env = {**self.env, "GB28181_SERVER__ID": server_id, "GB28181_SERVER__DOMAIN": domain,
               "GB28181_SERVER__NAME": level}
        if upper is not None:
            env["GB28181_UPSTREAMS"] = json.dumps([self.upstream(upper)])
        workdir = self.workdir / level
        workdir.mkdir(parents=True, exist_ok=True)
        return ServedServer(workdir, **env)

    def start(self) -> CascadeChain:
        for level, upper in (("province", None), ("city", "province"), ("county", "city")):
            # Known before it is up, so that stop() also ends a level whose start failed.
            server = self.servers[level] = self._server(level, upper)
            server.start()
        return self

    def __getitem__(self, level: str) -> ServedServer:
        return self.servers[level]

    def restart(self, level: str, *, kill: bool = False) -> ServedServer:
        """Stop one level (SIGTERM, or SIGKILL with ``kill``) and start it again on the same
        SIP port, where the levels around it look for it."""
        server = self.servers[level]
        port = server.sip_port
        if kill:
            server.kill()
        else:
            server.stop()
        server.env["GB28181_SIP__PORT"] = str(port)
        return server.start()

    def stop(self) -> None:
        for server in self.servers.values():
            server.kill()


@pytest.fixture
def media_nodes(tmp_path):
    """``media_nodes(server, *args, token=..., name=...)`` → a NodeProcess; killed at teardown."""
    running: list[NodeProcess] = []

    def factory(server: ServedServer, *args: str, token: str, name: str) -> NodeProcess:
        node = NodeProcess(tmp_path, server, *args, token=token, name=name)
        running.append(node)
        return node

    yield factory
    for node in running:
        node.kill()


@pytest.fixture
def served(tmp_path):
    """``served(**GB28181_settings)`` → a started ServedServer; everything is stopped at teardown."""
    started: list[ServedServer] = []

    def factory(workdir: Path | None = None, **env: str) -> ServedServer:
        workdir = workdir or tmp_path / f"server{len(started)}"
        workdir.mkdir(parents=True, exist_ok=True)
        server = ServedServer(workdir, **env).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.kill()


@pytest.fixture
def sims(tmp_path):
    """``sims(server, *gb28181-sim args)`` → a running SimProcess; stopped at teardown."""
    running: list[SimProcess] = []

    def factory(server: ServedServer, *args: str) -> SimProcess:
        sim = SimProcess(tmp_path, server, *args, name=f"sim{len(running)}")
        running.append(sim)
        return sim

    yield factory
    for sim in running:
        sim.stop()


def listed(payload: Any) -> list[dict]:
    """The list in an API listing ({"devices": [...], "total": n} and the like)."""
    if isinstance(payload, list):
        return payload
    return next((v for v in payload.values() if isinstance(v, list)), [])


def read_stream(url: str, seconds: float, token: str | None = TOKEN) -> bytes:
    """The first ``seconds`` of a live HTTP stream (HTTP-FLV), read with a plain HTTP client."""
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    data = bytearray()
    deadline = time.monotonic() + seconds
    with urllib.request.urlopen(req, timeout=max(5.0, seconds)) as resp:
        assert resp.status == 200, resp.status
        while time.monotonic() < deadline:
            chunk = resp.read1(65536)
            if not chunk:
                break
            data += chunk
    return bytes(data)


def sei_latencies(url: str, seconds: float, token: str | None = TOKEN,
                  skip: float = 2.0) -> tuple[int, list[float]]:
    """Read a live HTTP-FLV stream for ``seconds``: (video frames received, the latency in ms of
    each frame that arrived after the first ``skip`` seconds: its arrival time less the send time
    the simulator wrote into its SEI). The frames of the cached GOP, sent at once to a new viewer,
    fall in the skipped part. One FLV reader for tests and benches: bench/relay.py's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from relay import FlvReader  # bench/relay.py
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    reader = FlvReader()
    frames = 0
    latencies: list[float] = []
    start = time.monotonic()
    with urllib.request.urlopen(req, timeout=max(5.0, seconds)) as resp:
        assert resp.status == 200, resp.status
        while time.monotonic() - start < seconds:
            chunk = resp.read1(65536)
            if not chunk:
                break
            now_ns = time.time_ns()
            for sei in reader.feed(chunk):
                frames += 1
                if sei is not None and time.monotonic() - start >= skip:
                    latencies.append((now_ns - sei[1]) / 1e6)
    return frames, latencies


def ffprobe(path: str | Path) -> tuple[float, int, str, str]:
    """(duration in s, decoded video frames, video codec, ffprobe's error lines) of a media file."""
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-show_entries",
                          "format=duration:stream=codec_name,nb_read_frames", "-of", "json", str(path)],
                         capture_output=True, text=True, timeout=60)
    info = json.loads(out.stdout or "{}")
    video = next((s for s in info.get("streams", []) if "nb_read_frames" in s), {})
    return (float(info.get("format", {}).get("duration", 0) or 0), int(video.get("nb_read_frames", 0) or 0),
            str(video.get("codec_name", "")), out.stderr.strip())


def whole_tags(flv: bytes) -> bytes:
    """An FLV capture cut at the end of its last complete tag (a live read stops anywhere)."""
    pos = 9 + 4  # header, PreviousTagSize0
    while pos + 11 <= len(flv):
        end = pos + 11 + int.from_bytes(flv[pos + 1:pos + 4], "big") + 4
        if end > len(flv):
            break
        pos = end
    return flv[:pos]


def avcc_to_annexb(data: bytes) -> bytes:
    """An FLV/MP4 video packet (4-byte lengths) as Annex-B (start codes)."""
    out, pos = bytearray(), 0
    while pos + 4 <= len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        out += b"\x00\x00\x00\x01" + data[pos + 4:pos + 4 + n]
        pos += 4 + n
    return bytes(out)


def video_timeline(flv: bytes) -> list[tuple[float, bool, tuple[int, int] | None]]:
    """(FLV timestamp in s, keyframe, simulator SEI (counter, ns) or None) of every video frame
    of an FLV capture, each decoded by FFmpeg on the way (a decode error raises)."""
    import io

    import av

    from simulators.media import parse_sim_sei
    out = []
    with av.open(io.BytesIO(whole_tags(flv)), format="flv") as container:
        stream = container.streams.video[0]
        for packet in container.demux(stream):
            if not packet.size:
                continue
            packet.decode()
            ts = float(packet.pts * packet.time_base) if packet.pts is not None else 0.0
            out.append((ts, bool(packet.is_keyframe), parse_sim_sei(avcc_to_annexb(bytes(packet)))))
    return out


def decode_video(flv: bytes) -> list:
    """Every video frame of an FLV capture decoded by FFmpeg (PyAV); a decode error raises."""
    import io

    import av
    frames = []
    with av.open(io.BytesIO(whole_tags(flv)), format="flv") as container:
        for packet in container.demux(container.streams.video[0]):
            frames.extend(packet.decode())
    return frames
