"""A fleet of simulated GB/T 28181 devices (IPCs and NVRs) in one asyncio process.

Each ``SimDevice`` behaves like a camera's SIP stack (§9.1, §9.6): it registers with digest
authentication, refreshes before its registration runs out, sends a Keepalive every interval,
treats three unanswered keepalives or a refused one as lost registration and registers again,
and backs off (with jitter) after a refusal or timeout so a fleet never hammers a server in
lock-step. It answers DeviceInfo and Catalog queries: 200 at once, then the data in a separate
MESSAGE, multi-part catalogs sent serially (Annex N).

Sockets: by default all devices share one ``SipEndpoint`` (one UDP/TCP port) and incoming
requests are dispatched by Request-URI user, which checks that a server keys devices by ID
and not by address. ``per_device_ports`` gives each device its own endpoint instead.

The fleet can be paused (a link outage: nothing sent, nothing answered) and resumed, which the
integration tests use to check offline detection and recovery.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from gb28181 import manscdp
from gb28181.ids import parse_id
from gb28181.sip.auth import authorization_header
from gb28181.sip.endpoint import SipEndpoint, SipTimeoutError, SipTransportError
from gb28181.sip.message import (
    SipParseError,
    SipRequest,
    make_response,
    new_call_id,
    new_request,
    new_tag,
    parse_uri,
)
from gb28181.sip.transaction import RequestReceived

from .catalog import Channel, catalog_item, device_info_fields, make_channels

__all__ = ["Fleet", "FleetConfig", "SimDevice"]

log = logging.getLogger("gb28181.sim")

CONTENT_TYPE = "Application/MANSCDP+xml"


@dataclass(slots=True)
class FleetConfig:
    """Everything a fleet needs; the CLI flags map onto these fields."""

    server_host: str = "127.0.0.1"
    server_port: int = 5060
    server_id: str = "34020000002000000001"
    devices: int = 1
    first_id: str = "34020000001320000001"
    nvr: bool = False
    channels: int = 1
    password: str = "12345678"
    passwords: dict[str, str] = field(default_factory=dict)
    transport: str = "udp"
    bind_host: str = "127.0.0.1"
    bind_port: int = 0
    per_device_ports: bool = False
    expires: int = 3600
    keepalive_interval: float = 60.0
    keepalive_misses: int = 3
    register_rate: float = 500.0
    retry_min: float = 60.0
    retry_max: float = 600.0
    request_timeout: float | None = None
    catalog_items_per_message: int = 2
    manufacturer: str = "Simulator"
    model: str = "SIM-IPC"
    firmware: str = "V1.0.0"
    encoding: str = "GB2312"
    t1: float = 0.5

    @property
    def domain(self) -> str:
        return self.server_id[:10]


def device_ids(first_id: str, count: int, *, nvr: bool = False) -> list[str]:
    """``count`` consecutive IDs from ``first_id``; ``nvr`` sets the type code to 118."""
    gid = parse_id(first_id)
    prefix = gid.value[:10] + ("118" if nvr else gid.value[10:13]) + gid.value[13]
    serial = int(gid.value[14:])
    if serial + count > 1_000_000:
        raise ValueError(f"{count} devices from serial {serial} overflow the 6-digit serial of {first_id}")
    return [f"{prefix}{serial + n:06d}" for n in range(count)]


@dataclass(slots=True)
class DeviceStats:
    register_attempts: int = 0
    registrations: int = 0
    register_failures: int = 0
    register_latencies: list[float] = field(default_factory=list)
    keepalives_sent: int = 0
    keepalives_ok: int = 0
    keepalives_failed: int = 0
    queries_answered: int = 0


class SimDevice:
    """One simulated device; ``run()`` is its life."""

    def __init__(self, fleet: Fleet, device_id: str, endpoint: SipEndpoint | None) -> None:
        self.fleet = fleet
        self.cfg = fleet.cfg
        self.device_id = device_id
        self.endpoint = endpoint
        self.password = self.cfg.passwords.get(device_id, self.cfg.password)
        self.registered = False
        self.expires = self.cfg.expires
        self.registered_at = 0.0
        self.call_id = new_call_id()
        self.from_tag = new_tag()
        self.cseq = 0
        self.sn = 0
        self.stats = DeviceStats()
        self.last_error = ""
        self.server_date = ""
        self.channels: list[Channel] = make_channels(
            device_id, self.cfg.channels if self.cfg.nvr else 1,
            manufacturer=self.cfg.manufacturer, is_nvr=self.cfg.nvr)

    @property
    def ep(self) -> SipEndpoint:
        ep = self.endpoint or self.fleet.shared
        assert ep is not None
        return ep

    @property
    def server_addr(self) -> tuple[str, int]:
        return (self.cfg.server_host, self.cfg.server_port)

    def _from_uri(self) -> str:
        return f"sip:{self.device_id}@{self.cfg.domain}"

    # -- registration ----------------------------------------------------------------------
    def _register_request(self, authorization: str | None, expires: int | None = None) -> SipRequest:
        cfg = self.cfg
        ep = self.ep
        self.cseq += 1
        headers = {"expires": str(cfg.expires if expires is None else expires)}
        if authorization:
            headers["authorization"] = authorization
        return new_request(
            "REGISTER", f"sip:{cfg.server_id}@{cfg.domain}", via=ep.via(cfg.transport),
            from_uri=self._from_uri(), from_tag=self.from_tag, to_uri=self._from_uri(),
            call_id=self.call_id, cseq=self.cseq,
            contact=f"sip:{self.device_id}@{ep.advertised_host}:{ep.port}",
            headers=headers, user_agent="gb28181-sim")

    async def _send(self, request: SipRequest):
        return await self.ep.request(request, self.server_addr, self.cfg.transport,
                                     timeout=self.cfg.request_timeout)

    async def register(self) -> bool:
        """One REGISTER flow (challenge, answer); True when the server said 200."""
        st = self.stats
        st.register_attempts += 1
        started = time.perf_counter()
        try:
            resp = await self._send(self._register_request(None))
            for _ in range(2):  # a stale nonce earns one more round
                if resp.status != 401:
                    break
                challenge = resp.get("www-authenticate")
                if not challenge:
                    break
                auth = authorization_header(challenge, username=self.device_id,
                                            password=self.password, method="REGISTER",
                                            uri=f"sip:{self.cfg.server_id}@{self.cfg.domain}")
                resp = await self._send(self._register_request(auth))
        except (SipTimeoutError, SipTransportError) as exc:
            self.last_error = f"REGISTER: {exc}"
            st.register_failures += 1
            return False
        if resp.status != 200:
            self.last_error = f"REGISTER: {resp.status} {resp.reason}"
            st.register_failures += 1
            return False
        st.registrations += 1
        st.register_latencies.append(time.perf_counter() - started)
        granted = resp.get("expires")
        self.expires = int(granted) if granted and granted.strip().isdigit() else self.cfg.expires
        self.server_date = resp.get("date") or ""
        self.registered = True
        self.registered_at = time.monotonic()
        return True

    async def unregister(self) -> None:
        """REGISTER with Expires: 0 (J.3), answering the challenge like a registration."""
        try:
            resp = await self._send(self._register_request(None, expires=0))
            challenge = resp.get("www-authenticate")
            if resp.status == 401 and challenge:
                auth = authorization_header(challenge, username=self.device_id,
                                            password=self.password, method="REGISTER",
                                            uri=f"sip:{self.cfg.server_id}@{self.cfg.domain}")
                await self._send(self._register_request(auth, expires=0))
        except (SipTimeoutError, SipTransportError):
            pass
        finally:
            self.registered = False

    # -- keepalive --------------------------------------------------------------------------
    def _next_sn(self) -> int:
        self.sn += 1
        return self.sn

    def _message(self, body: bytes, to_id: str | None = None) -> SipRequest:
        cfg = self.cfg
        to = to_id or cfg.server_id
        return new_request(
            "MESSAGE", f"sip:{to}@{cfg.domain}", via=self.ep.via(cfg.transport),
            from_uri=self._from_uri(), to_uri=f"sip:{to}@{cfg.domain}", cseq=20,
            body=body, content_type=CONTENT_TYPE, user_agent="gb28181-sim")

    async def keepalive(self) -> str:
        """Send one keepalive: 'ok', 'refused' (4xx: register again) or 'lost'."""
        st = self.stats
        st.keepalives_sent += 1
        body = manscdp.build("Notify", "Keepalive", self._next_sn(), self.device_id,
                             [("Status", "OK")], encoding=self.cfg.encoding)
        timeout = self.cfg.request_timeout or min(self.cfg.keepalive_interval, 32.0)
        try:
            resp = await self.ep.request(self._message(body), self.server_addr, self.cfg.transport,
                                         timeout=timeout)
        except (SipTimeoutError, SipTransportError) as exc:
            st.keepalives_failed += 1
            self.last_error = f"keepalive: {exc}"
            return "lost"
        if resp.status == 200:
            st.keepalives_ok += 1
            return "ok"
        st.keepalives_failed += 1
        self.last_error = f"keepalive: {resp.status} {resp.reason}"
        return "refused"

    # -- life ------------------------------------------------------------------------------
    async def run(self) -> None:
        cfg = self.cfg
        fleet = self.fleet
        failures = 0
        while not fleet.stopping:
            await fleet.running.wait()
            if not self.registered:
                if not await self.register():
                    failures += 1
                    # §9.1.1: no sooner than 60 s by default; exponential, jittered.
                    delay = min(cfg.retry_max, cfg.retry_min * 2 ** min(failures - 1, 10))
                    await fleet.sleep(delay * random.uniform(0.8, 1.2))
                    continue
                failures = 0
            await self._registered_life()

    async def _registered_life(self) -> None:
        """Keepalives and refreshes until the registration is lost."""
        cfg = self.cfg
        fleet = self.fleet
        misses = 0
        # Spread the first keepalive over the interval so a fleet does not pulse.
        next_keepalive = time.monotonic() + cfg.keepalive_interval * random.uniform(0.1, 1.0)
        while not fleet.stopping and self.registered:
            refresh_at = self.registered_at + self.expires * 0.85
            now = time.monotonic()
            wake = min(next_keepalive, refresh_at)
            if wake > now:
                await fleet.sleep(wake - now)
                continue
            if not fleet.running.is_set():
                await fleet.running.wait()
                # The outage is over: carry on as a device whose link came back.
                next_keepalive = time.monotonic()
                continue
            if now >= refresh_at:
                if not await self.register():
                    self.registered = False
                    return
                continue
            next_keepalive = now + cfg.keepalive_interval
            result = await self.keepalive()
            if result == "ok":
                misses = 0
            elif result == "refused":
                self.registered = False
                return
            else:
                misses += 1
                if misses >= cfg.keepalive_misses:
                    self.registered = False
                    return

    # -- answering the server ---------------------------------------------------------------
    def on_request(self, ev: RequestReceived) -> None:
        req = ev.request
        txn = ev.transaction
        if txn is None:
            return
        if req.method != "MESSAGE":
            self.ep.respond(txn, make_response(req, 405, to_tag=new_tag()))
            return
        try:
            msg = manscdp.parse(req.body)
        except manscdp.ManscdpError as exc:
            self.ep.respond(txn, make_response(req, 400, f"Bad Request: {exc}"[:120], to_tag=new_tag()))
            return
        self.ep.respond(txn, make_response(req, 200, to_tag=new_tag()))
        if msg.root == "Query" and msg.cmd_type in ("DeviceInfo", "Catalog", "DeviceStatus"):
            self.fleet.spawn(self._answer(msg))

    async def _answer(self, query: manscdp.Manscdp) -> None:
        cfg = self.cfg
        sn = query.sn or 0
        bodies: list[bytes] = []
        if query.cmd_type == "DeviceInfo":
            fields = device_info_fields(
                name=f"{'NVR' if cfg.nvr else 'IPC'} {self.device_id[-6:]}",
                manufacturer=cfg.manufacturer, model=cfg.model, firmware=cfg.firmware,
                channels=len(self.channels))
            bodies.append(manscdp.build("Response", "DeviceInfo", sn, self.device_id, fields,
                                        encoding=cfg.encoding))
        elif query.cmd_type == "DeviceStatus":
            fields = [("Result", "OK"), ("Online", "ONLINE"), ("Status", "OK"),
                      ("Encode", "ON"), ("Record", "OFF")]
            bodies.append(manscdp.build("Response", "DeviceStatus", sn, self.device_id, fields,
                                        encoding=cfg.encoding))
        else:
            per = max(1, cfg.catalog_items_per_message)
            total = len(self.channels)
            for start in range(0, total, per):
                part = self.channels[start:start + per]
                items = [("Item", catalog_item(ch, model=cfg.model)) for ch in part]
                fields = [("SumNum", total), ("DeviceList", manscdp.Node({"Num": len(part)}, items))]
                bodies.append(manscdp.build("Response", "Catalog", sn, self.device_id, fields,
                                            encoding=cfg.encoding))
        for body in bodies:  # serially: each part waits for the 200 to the previous one
            try:
                await self._send(self._message(body))
            except (SipTimeoutError, SipTransportError):
                return
        self.stats.queries_answered += 1


class Fleet:
    """Start, pause, resume and stop a set of ``SimDevice``s; see the module docstring."""

    def __init__(self, cfg: FleetConfig) -> None:
        self.cfg = cfg
        self.shared: SipEndpoint | None = None
        self.devices: dict[str, SimDevice] = {}
        self.endpoints: list[SipEndpoint] = []
        self.running = asyncio.Event()
        self.stopping = False
        self._tasks: set[asyncio.Task] = set()
        self.started_at = 0.0

    def spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def sleep(self, seconds: float) -> None:
        # A plain sleep: stop() cancels the device tasks, which ends any sleep at once.
        if not self.stopping:
            await asyncio.sleep(max(0.0, seconds))

    def _dispatch(self, ev: RequestReceived) -> None:
        try:
            user = parse_uri(ev.request.uri).user
        except SipParseError:
            user = ""
        device = self.devices.get(user)
        if device is None:
            if ev.transaction is not None:
                ev_ep = self.shared
                assert ev_ep is not None
                ev_ep.respond(ev.transaction, make_response(ev.request, 404, "Not Found: no such device here",
                                                            to_tag=new_tag()))
            return
        if not self.running.is_set():
            return  # link outage: the server's request is lost
        device.on_request(ev)

    def _endpoint(self) -> SipEndpoint:
        cfg = self.cfg
        return SipEndpoint(cfg.bind_host, cfg.bind_port if not cfg.per_device_ports else 0,
                           on_request=self._dispatch, udp=cfg.transport == "udp",
                           tcp=cfg.transport == "tcp", t1=cfg.t1)

    async def start(self) -> None:
        cfg = self.cfg
        ids = device_ids(cfg.first_id, cfg.devices, nvr=cfg.nvr)
        self.started_at = time.monotonic()
        if not cfg.per_device_ports:
            self.shared = self._endpoint()
            await self.shared.start()
        for device_id in ids:
            ep = None
            if cfg.per_device_ports:
                ep = self._endpoint()
                await ep.start()
                self.endpoints.append(ep)
            self.devices[device_id] = SimDevice(self, device_id, ep)
        self.running.set()
        self.spawn(self._ramp())

    async def _ramp(self) -> None:
        # Start devices at register_rate per second: a fleet is a crowd, not a wave.
        interval = 1.0 / self.cfg.register_rate if self.cfg.register_rate > 0 else 0.0
        batch = max(1, int(self.cfg.register_rate / 100)) if interval else len(self.devices)
        for n, device in enumerate(self.devices.values()):
            if self.stopping:
                return
            self.spawn(device.run())
            if interval and (n + 1) % batch == 0:
                await asyncio.sleep(interval * batch)

    def pause(self) -> None:
        """Cut the link: devices send nothing and ignore the server until ``resume``."""
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    async def stop(self, *, unregister: bool = False) -> None:
        if unregister:
            await asyncio.gather(*(d.unregister() for d in self.devices.values() if d.registered))
        self.stopping = True
        self.running.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.shared is not None:
            await self.shared.close()
        for ep in self.endpoints:
            await ep.close()

    # -- reporting ------------------------------------------------------------------------
    def registered_count(self) -> int:
        return sum(1 for d in self.devices.values() if d.registered)

    async def wait_registered(self, timeout: float, count: int | None = None) -> bool:
        want = len(self.devices) if count is None else count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.registered_count() >= want:
                return True
            await asyncio.sleep(0.05)
        return self.registered_count() >= want

    def summary(self) -> dict[str, Any]:
        devs = list(self.devices.values())
        lat = sorted(x for d in devs for x in d.stats.register_latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 2) if lat else None

        errors: dict[str, int] = {}
        for d in devs:
            if d.last_error and not d.registered:
                errors[d.last_error] = errors.get(d.last_error, 0) + 1
        return {
            "devices": len(devs),
            "registered": sum(1 for d in devs if d.registered),
            "never_registered": sum(1 for d in devs if d.stats.registrations == 0),
            "registrations": sum(d.stats.registrations for d in devs),
            "register_failures": sum(d.stats.register_failures for d in devs),
            "keepalives_sent": sum(d.stats.keepalives_sent for d in devs),
            "keepalives_ok": sum(d.stats.keepalives_ok for d in devs),
            "keepalives_failed": sum(d.stats.keepalives_failed for d in devs),
            "queries_answered": sum(d.stats.queries_answered for d in devs),
            "register_latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99),
                                    "mean": round(statistics.fmean(lat) * 1000, 2) if lat else None},
            "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
            "elapsed_s": round(time.monotonic() - self.started_at, 2),
        }
