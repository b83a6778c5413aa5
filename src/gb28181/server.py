"""The server process: wires the SIP endpoint, registrar, MESSAGE handler, online tracking,
registry and HTTP API together, and starts and stops them in order.

Start: load the registry (devices survive restarts), settle who went offline while we were
down, then open SIP and HTTP. Stop: close HTTP and SIP first, so nothing changes any more,
then flush the registry so nothing is lost.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from aiohttp import web

from registry.devices import DeviceRegistry
from registry.models import Device
from registry.sqlite import SqliteStore

from .api import make_app
from .config import Config, ensure_api_token
from .messages import MessageHandler
from .metrics import ServerCollector, make_registry
from .presence import Presence
from .queries import DeviceQueries, QueryError
from .registrar import Registrar
from .sip.endpoint import SipEndpoint
from .sip.message import make_response
from .sip.transaction import RequestReceived
from .stats import Counters

__all__ = ["GbServer"]

log = logging.getLogger("gb28181.server")


class GbServer:
    """One GB/T 28181 platform instance; ``await start()``, ``await stop()``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.counters = Counters()
        self.registry = DeviceRegistry(SqliteStore(config.database_path),
                                       flush_interval=config.database.flush_interval)
        self.presence = Presence(self.registry, interval=config.keepalive.interval,
                                 count=config.keepalive.count)
        sip = config.sip
        self.endpoint = SipEndpoint(
            sip.host, sip.port, advertised_host=sip.external_host, on_request=self._on_request,
            udp=sip.udp, tcp=sip.tcp, max_message_size=sip.max_message_size,
            max_tcp_connections=sip.max_tcp_connections, t1=sip.t1)
        self.queries = DeviceQueries(config=config, endpoint=self.endpoint, counters=self.counters)
        self.registrar = Registrar(config=config, registry=self.registry, presence=self.presence,
                                   endpoint=self.endpoint, counters=self.counters,
                                   on_registered=self._on_registered)
        self.messages = MessageHandler(registry=self.registry, presence=self.presence,
                                       endpoint=self.endpoint, queries=self.queries,
                                       counters=self.counters)
        self.metrics_registry = make_registry(ServerCollector(
            counters=self.counters, endpoint=self.endpoint, registry=self.registry))
        self.api_token = ""
        self.api_token_file: Path | None = None
        self._runner: web.AppRunner | None = None
        self.http_port = config.http.port
        self._tasks: set[asyncio.Task] = set()
        self.started_at = 0.0

    @property
    def sip_port(self) -> int:
        return self.endpoint.port

    async def start(self) -> None:
        self.started_at = time.time()
        self.api_token, self.api_token_file = ensure_api_token(self.config)
        await self.registry.start()
        gone = self.presence.resume()
        total, online = self.registry.counts()
        log.info("registry loaded: %d devices, %d still online, %d went offline while we were down",
                 total, online, gone)
        await self.endpoint.start()
        self.presence.start()
        app = make_app(self)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.http.host, self.config.http.port)
        await site.start()
        server = site._server  # the bound port when 0 was asked for
        if server is not None and server.sockets:  # type: ignore[union-attr]
            self.http_port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("SIP on %s:%d (udp=%s tcp=%s), HTTP on %s:%d, server ID %s, domain %s",
                 self.config.sip.host, self.sip_port, self.config.sip.udp, self.config.sip.tcp,
                 self.config.http.host, self.http_port, self.config.server.id,
                 self.config.server.domain)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in list(self._tasks):
            task.cancel()
        await self.endpoint.close()
        await self.presence.stop()
        await self.registry.stop()

    # -- SIP dispatch --------------------------------------------------------------------
    def _on_request(self, ev: RequestReceived) -> None:
        method = ev.request.method
        if method == "REGISTER":
            self.registrar.handle(ev)
        elif method == "MESSAGE":
            self.messages.handle(ev)
        elif ev.transaction is None:
            return  # an ACK that belongs to no dialog of ours
        elif method == "OPTIONS":
            resp = make_response(ev.request, 200, to_tag="opt")
            resp.set("Allow", "REGISTER, MESSAGE, OPTIONS")
            self.endpoint.respond(ev.transaction, resp)
        else:
            resp = make_response(ev.request, 405, f"Method Not Allowed: {method} is not supported yet")
            resp.set("Allow", "REGISTER, MESSAGE, OPTIONS")
            self.endpoint.respond(ev.transaction, resp)

    def _on_registered(self, device: Device) -> None:
        if not self.config.registration.query_device_info:
            return
        task = asyncio.get_running_loop().create_task(self._fetch_device_info(device))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch_device_info(self, device: Device) -> None:
        try:
            info = await self.queries.query(device, "DeviceInfo", timeout=10.0)
        except QueryError as exc:
            log.info("DeviceInfo of %s: %s", device.device_id, exc)
            return
        device.name = info.text("DeviceName") or device.name
        device.manufacturer = info.text("Manufacturer") or device.manufacturer
        device.model = info.text("Model") or device.model
        device.firmware = info.text("Firmware") or device.firmware
        channels = info.text("Channel")
        if channels.isdigit():
            device.extra["channels"] = int(channels)
        self.registry.touch(device)
