"""MANSCDP queries to devices as awaitable request/response pairs (§9.5, A.2.4, A.2.6).

A query is a MESSAGE with a ``<Query>`` body; the device answers it with a bodiless 200 and
later sends the data in a separate MESSAGE whose ``<Response>`` carries the same CmdType and
SN (A.1). ``DeviceQueries.query`` sends the first and waits for the second; the MESSAGE
handler hands every incoming Response to ``resolve``.

Two bounds keep a crowd of devices from hurting anyone. A device has one query conversation at
a time (``exclusive``): a slow or silent device makes only its own queries wait, never
another's. And a global limit bounds the MESSAGE transactions on the wire (waiting for the
200, not for the data), so that no burst of queries becomes a storm. How fast queries start
after registrations is paced one level up (``sync.DeviceSync``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from registry.models import Device

from . import manscdp
from .config import Config
from .routing import device_target
from .sip.endpoint import SipEndpoint, SipTimeoutError, SipTransportError
from .sip.message import new_request
from .stats import Counters

__all__ = ["DeviceQueries", "QueryError", "MANSCDP_CONTENT_TYPE"]

log = logging.getLogger("gb28181.queries")

MANSCDP_CONTENT_TYPE = "Application/MANSCDP+xml"


class QueryError(RuntimeError):
    """A query failed: refused by the device, not answered, or the device is unreachable."""


class DeviceQueries:
    """Send MANSCDP requests to devices and await their Responses."""

    def __init__(self, *, config: Config, endpoint: SipEndpoint, counters: Counters,
                 in_flight: int = 256, encoding: str = "GB2312") -> None:
        self.config = config
        self.endpoint = endpoint
        self.counters = counters
        self.encoding = encoding
        self._in_flight = asyncio.Semaphore(in_flight)
        # device ID -> [lock, users]; an entry lives while somebody holds or waits for it.
        self._gates: dict[str, list] = {}
        self._sn = itertools.count(random.randint(1, 100_000))
        self._pending: dict[tuple[str, str, int], asyncio.Future] = {}
        #: Multi-part answers (Annex N: RecordInfo) being collected: every part goes to the sink.
        self._parts: dict[tuple[str, str, int], Callable[[manscdp.Manscdp], None]] = {}

    def next_sn(self) -> int:
        return next(self._sn)

    def message_to(self, device: Device, body: bytes) -> Any:
        """A MESSAGE request from this platform to ``device`` carrying ``body``."""
        server = self.config.server
        ep = self.endpoint
        domain = device.device_id[:10]
        return new_request(
            "MESSAGE", f"sip:{device.device_id}@{device.host}:{device.port}",
            via=ep.via(device.transport, peer=device.host),
            from_uri=f"sip:{server.id}@{server.domain}",
            to_uri=f"sip:{device.device_id}@{domain}",
            body=body, content_type=MANSCDP_CONTENT_TYPE, user_agent="gb28181")

    def charset(self, device: Device) -> str:
        """Charset of bodies to ``device``: its own override, else the configured one."""
        return device.extra.get("charset") or self.encoding

    async def send(self, device: Device, cmd_type: str, fields: Sequence[tuple[str, Any]] = (),
                   *, sn: int | None = None, root: str = "Query", timeout: float = 10.0,
                   target: str | None = None) -> int:
        """Deliver one MANSCDP request (wait for its 200, not for data); returns the SN."""
        if not device.host:
            raise QueryError(f"device {device.device_id} has no known address; it must register first")
        sn = self.next_sn() if sn is None else sn
        # ``target``: a channel of the device (PresetQuery, DeviceStatus of one camera).
        body = manscdp.build(root, cmd_type, sn, target or device.device_id, fields,
                             encoding=self.charset(device))
        self.counters.queries_sent += 1
        dest = device_target(device)
        try:
            async with self._in_flight:
                resp = await self.endpoint.request(self.message_to(device, body), dest.addr,
                                                   dest.transport, timeout=timeout,
                                                   fallback=dest.fallback)
        except (SipTimeoutError, SipTransportError) as exc:
            raise QueryError(f"{cmd_type} to {device.device_id} not delivered: {exc}") from None
        if resp.status >= 300:
            raise QueryError(f"{device.device_id} refused {cmd_type}: {resp.status} {resp.reason}")
        return sn

    async def query(self, device: Device, cmd_type: str,
                    fields: Sequence[tuple[str, Any]] = (), *, timeout: float = 10.0,
                    root: str = "Query", target: str | None = None) -> manscdp.Manscdp:
        """Send ``<Query><CmdType>cmd_type</CmdType>…`` and return the device's Response."""
        async with self.exclusive(device.device_id):
            sn = self.next_sn()
            key = (device.device_id, cmd_type, sn)
            future = asyncio.get_running_loop().create_future()
            # Registered before sending: a fast device may answer before our 200 arrives.
            self._pending[key] = future
            try:
                await self.send(device, cmd_type, fields, sn=sn, root=root, timeout=timeout,
                                target=target)
                try:
                    return await asyncio.wait_for(future, timeout)
                except TimeoutError:
                    self.counters.queries_timed_out += 1
                    raise QueryError(f"{device.device_id} accepted the {cmd_type} query but sent "
                                     f"no Response within {timeout} s") from None
            finally:
                self._pending.pop(key, None)

    @contextlib.asynccontextmanager
    async def exclusive(self, device_id: str) -> AsyncIterator[None]:
        """One query conversation with ``device_id`` at a time (a catalog collection is one)."""
        gate = self._gates.get(device_id)
        if gate is None:
            gate = self._gates[device_id] = [asyncio.Lock(), 0]
        gate[1] += 1
        try:
            async with gate[0]:
                yield
        finally:
            gate[1] -= 1
            if gate[1] == 0:
                del self._gates[device_id]

    @contextlib.contextmanager
    def parts(self, device_id: str, cmd_type: str, sn: int,
              sink: Callable[[manscdp.Manscdp], None]) -> Iterator[None]:
        """While open, every ``cmd_type`` Response with ``sn`` from ``device_id`` goes to ``sink``
        (a multi-part answer, Annex N); use inside :meth:`exclusive`, open before :meth:`send`."""
        key = (device_id, cmd_type, sn)
        self._parts[key] = sink
        try:
            yield
        finally:
            self._parts.pop(key, None)

    def resolve(self, device_id: str, msg: manscdp.Manscdp) -> bool:
        """Hand a Response to whoever waits for it; False if nobody does."""
        if msg.sn is None:
            return False
        if self._parts:
            sink = self._parts.get((device_id, msg.cmd_type, msg.sn))
            if sink is None:  # a channel ID in <DeviceID>, as below
                sink = next((f for (dev, cmd, sn), f in self._parts.items()
                             if sn == msg.sn and cmd == msg.cmd_type
                             and msg.device_id.startswith(dev[:10])), None)
            if sink is not None:
                self.counters.queries_answered += 1
                sink(msg)
                return True
        future = self._pending.get((device_id, msg.cmd_type, msg.sn))
        if future is None:
            # Some devices put a channel ID in <DeviceID>; the SN is unique enough to match.
            for (dev, cmd, sn), fut in self._pending.items():
                if sn == msg.sn and cmd == msg.cmd_type and msg.device_id.startswith(dev[:10]):
                    future = fut
                    break
        if future is None or future.done():
            return False
        self.counters.queries_answered += 1
        future.set_result(msg)
        return True
