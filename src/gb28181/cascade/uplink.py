"""One upper platform, from below: registration, keepalive and requests to it (GB/T 28181-2016
§9.1, §9.6, Annex J.1, J.12).

An ``Uplink`` registers this instance to an upper platform under our platform ID (type code
200): ``REGISTER sip:<upper ID>@<host>:<port>`` with From and To ``sip:<local ID>@<local
domain>``, answered 401 with a digest challenge, which is met (qop=auth or not, §9.1.2 and
RFC 2617) with the upstream's password and the local ID as the username. The Call-ID stays the
same for the life of the process, so the upper tells our refreshes (at 80 % of the time it
granted) from a restart. A keepalive (``Notify/Keepalive``, §9.6.1) goes every
``keepalive_interval`` seconds; ``keepalive_count`` missed or refused ones in a row mean the
upper has lost us (or is gone), and we register again.

A registration that fails (no answer, refused, no route) is tried again after a back-off that
starts at ``retry_min`` and doubles to ``retry_max``, with jitter so a fleet of lower platforms
restarted together does not come back as one wave. ``status`` says where it stands and
``reason`` why, in words an operator can act on ("403 Forbidden: wrong password").
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import Any

from ..config import UpstreamSection
from ..queries import MANSCDP_CONTENT_TYPE
from ..sip.auth import authorization_header
from ..sip.endpoint import SipEndpoint, SipTimeoutError, SipTransportError
from ..sip.message import SipRequest, SipResponse, new_call_id, new_request, new_tag

__all__ = ["Uplink"]

log = logging.getLogger("gb28181.cascade")

REQUEST_TIMEOUT = 10.0  # seconds for the upper to answer one of our requests


class Uplink:
    """Our registration with one upper platform; ``start()`` runs it until ``stop()``."""

    def __init__(self, config: UpstreamSection, *, endpoint: SipEndpoint, local_id: str,
                 keepalive_body: Callable[[Uplink], bytes],
                 on_registered: Callable[[Uplink], None] | None = None,
                 on_lost: Callable[[Uplink], None] | None = None) -> None:
        self.config = config
        self.endpoint = endpoint
        self.local_id = config.local_id or local_id
        self.keepalive_body = keepalive_body
        self.on_registered = on_registered
        self.on_lost = on_lost
        self.call_id = new_call_id()
        self.from_tag = new_tag()
        self.cseq = 0
        self.status = "disabled" if not config.enabled else "registering"
        self.reason = ""
        self.registered_at = 0.0
        self.expires_at = 0.0
        self.last_keepalive_at = 0.0
        self.keepalive_misses = 0
        self.registrations = 0
        self.failures = 0
        self.keepalives_sent = 0
        self._task: asyncio.Task | None = None

    # -- identity -----------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.config.id or self.config.server_id

    @property
    def addr(self) -> tuple[str, int]:
        return (self.config.host, self.config.port)

    @property
    def transport(self) -> str:
        return self.config.transport

    @property
    def registered(self) -> bool:
        return self.status == "registered"

    def local_uri(self) -> str:
        return f"sip:{self.local_id}@{self.local_id[:10]}"

    def remote_uri(self) -> str:
        return f"sip:{self.config.server_id}@{self.config.domain}"

    def request_uri(self) -> str:
        return f"sip:{self.config.server_id}@{self.config.host}:{self.config.port}"

    def as_dict(self) -> dict[str, Any]:
        c = self.config
        return {"id": self.id, "name": c.name, "server_id": c.server_id, "domain": c.domain,
                "host": c.host, "port": c.port, "transport": c.transport, "local_id": self.local_id,
                "password_set": bool(c.password), "enabled": c.enabled,
                "share": c.share if isinstance(c.share, str) else c.share.model_dump(),
                "expires": c.expires, "keepalive_interval": c.keepalive_interval,
                "keepalive_count": c.keepalive_count,
                "status": self.status, "reason": self.reason or None,
                "registered_at": self.registered_at or None, "expires_at": self.expires_at or None,
                "last_keepalive_at": self.last_keepalive_at or None,
                "keepalive_misses": self.keepalive_misses, "registrations": self.registrations,
                "failures": self.failures}

    # -- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None and self.config.enabled:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"uplink {self.id}")

    async def stop(self, *, unregister: bool = True) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if unregister and self.registered:
            try:
                await self._register(expires=0, timeout=2.0)
            except (SipTimeoutError, SipTransportError, OSError, RuntimeError) as exc:
                log.info("unregister from %s: %s", self.id, exc)
        self.status = "disabled" if not self.config.enabled else "stopped"

    async def _run(self) -> None:
        backoff = self.config.retry_min
        while True:
            self.status = "registering"
            try:
                granted = await self._register(expires=self.config.expires)
            except (SipTimeoutError, SipTransportError, OSError) as exc:
                granted = None
                self.reason = f"no answer from {self.config.host}:{self.config.port} " \
                              f"over {self.transport}: {exc}"
            except RegisterRefused as exc:
                granted = None
                self.reason = str(exc)
            if granted is None:
                self.failures += 1
                self.status = "failed"
                delay = backoff * random.uniform(0.8, 1.2)
                log.warning("registration to upper platform %s failed: %s; retry in %.1f s",
                            self.id, self.reason, delay)
                backoff = min(backoff * 2, self.config.retry_max)
                await asyncio.sleep(delay)
                continue
            backoff = self.config.retry_min
            first = not self.registered
            self.status = "registered"
            self.reason = ""
            self.registrations += 1
            now = time.time()
            self.registered_at = now
            self.expires_at = now + granted
            self.keepalive_misses = 0
            if first:
                log.info("registered to upper platform %s (%s at %s:%d over %s) for %d s",
                         self.id, self.config.server_id, self.config.host, self.config.port,
                         self.transport, granted)
                if self.on_registered is not None:
                    self.on_registered(self)
            lost = await self._registered_life(granted)
            if lost:
                self.status = "registering"
                if self.on_lost is not None:
                    self.on_lost(self)

    async def _registered_life(self, granted: int) -> bool:
        """Keepalives until the refresh is due (False) or the upper is lost (True)."""
        refresh_at = time.monotonic() + granted * 0.8
        interval = self.config.keepalive_interval
        while True:
            wait = min(interval, refresh_at - time.monotonic())
            if wait > 0:
                await asyncio.sleep(wait)
            if time.monotonic() >= refresh_at:
                return False
            ok = await self._keepalive()
            if ok is None:  # refused: it does not know us
                return True
            self.keepalive_misses = 0 if ok else self.keepalive_misses + 1
            if self.keepalive_misses >= self.config.keepalive_count:
                self.reason = f"{self.keepalive_misses} keepalives in a row unanswered"
                log.warning("upper platform %s lost: %s; registering again", self.id, self.reason)
                return True

    async def _keepalive(self) -> bool | None:
        """One keepalive: True answered, False lost, None refused (403/404: register again)."""
        self.keepalives_sent += 1
        # A keepalive is late once the next one is due: a dead upper is noticed within
        # keepalive_count intervals, not keepalive_count transaction timeouts.
        timeout = min(REQUEST_TIMEOUT, max(2.0, self.config.keepalive_interval))
        try:
            resp = await self.message(self.keepalive_body(self), timeout=timeout)
        except (SipTimeoutError, SipTransportError, OSError):
            return False
        if resp.status < 300:
            self.last_keepalive_at = time.time()
            return True
        if resp.status in (401, 403, 404, 481):
            self.reason = f"keepalive refused: {resp.status} {resp.reason}"
            log.warning("upper platform %s refused our keepalive (%d %s); registering again",
                        self.id, resp.status, resp.reason)
            return None
        return False

    # -- REGISTER -------------------------------------------------------------------------------
    def _register_request(self, expires: int, authorization: str | None) -> SipRequest:
        self.cseq += 1
        peer = self.config.host
        headers = {"expires": str(expires)}
        if authorization:
            headers["authorization"] = authorization
        return new_request(
            "REGISTER", self.request_uri(), via=self.endpoint.via(self.transport, peer=peer),
            from_uri=self.local_uri(), from_tag=self.from_tag, to_uri=self.local_uri(),
            call_id=self.call_id, cseq=self.cseq,
            contact=self.endpoint.contact(self.local_id, self.transport, peer=peer),
            headers=headers, user_agent="gb28181")

    async def _register(self, *, expires: int, timeout: float = REQUEST_TIMEOUT) -> int:
        """REGISTER (answering one challenge); the seconds granted. RegisterRefused says why not."""
        authorization = None
        for _ in range(3):  # a challenge, then maybe a stale nonce
            req = self._register_request(expires, authorization)
            resp = await self._send(req, timeout)
            if resp.status in (401, 407):
                header = resp.get("www-authenticate" if resp.status == 401 else "proxy-authenticate")
                if not header:
                    raise RegisterRefused(f"{resp.status} without a challenge from the upper platform")
                if authorization is not None and "stale=true" not in header.lower():
                    raise RegisterRefused(f"{resp.status} {resp.reason}: wrong password for "
                                          f"{self.local_id}? set the upstream's password")
                authorization = authorization_header(header, username=self.local_id,
                                                     password=self.config.password,
                                                     method="REGISTER", uri=req.uri)
                continue
            if resp.status == 423:
                raise RegisterRefused(f"423 Interval Too Brief: the upper wants Expires >= "
                                      f"{resp.get('min-expires')}; raise the upstream's expires")
            if resp.status >= 300:
                raise RegisterRefused(f"{resp.status} {resp.reason}")
            granted = (resp.get("expires") or "").strip()
            return int(granted) if granted.isdigit() and int(granted) > 0 else expires
        raise RegisterRefused("the upper platform keeps challenging: check the password and local_id")

    async def _send(self, req: SipRequest, timeout: float) -> SipResponse:
        return await self.endpoint.request(req, self.addr, self.transport, timeout=timeout)

    # -- requests to the upper ------------------------------------------------------------------------
    def message_request(self, body: bytes, content_type: str = MANSCDP_CONTENT_TYPE) -> SipRequest:
        return new_request(
            "MESSAGE", self.request_uri(), via=self.endpoint.via(self.transport, peer=self.config.host),
            from_uri=self.local_uri(), to_uri=self.remote_uri(), body=body,
            content_type=content_type, user_agent="gb28181")

    async def message(self, body: bytes, *, timeout: float = REQUEST_TIMEOUT) -> SipResponse:
        """Send one MANSCDP MESSAGE to the upper; its final response."""
        return await self._send(self.message_request(body), timeout)


class RegisterRefused(RuntimeError):
    """The upper platform answered our REGISTER with a refusal."""
