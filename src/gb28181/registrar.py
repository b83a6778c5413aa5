"""The registrar: REGISTER with digest authentication, refresh and unregister (§9.1, J.1, J.3).

Flow (PROTOCOL.md §2): a REGISTER without credentials gets 401 and a challenge; the retry
with ``Authorization`` is checked against the device's own password (or the configured
default); success is 200 with ``Expires`` and a ``Date`` header in Beijing time, which is how
GB/T 28181 devices set their clocks (§9.10.3). ``Expires: 0`` unregisters. A REGISTER never
gets 100 Trying: some Dahua firmware fails on it.

Refusals name their cause in the reason phrase, because that is what shows up in a device's
log or a packet capture: 403 for a malformed ID, an unknown ID (when unknown devices are
refused), a wrong password or a locked-out device; 423 with Min-Expires for too short a
registration; 400 for an unreadable Expires or Authorization.

Repeated wrong passwords from one device ID at one source address lock that pair out for a
while (``auth.max_failures`` in ``auth.failure_window`` → ``auth.lockout_seconds``): a
guesser is slowed down and the log is spared, while the real device at its own address is
not locked out by someone else's guessing.

Everything here runs synchronously on the event loop: the registry is in memory and writes
behind, so a REGISTER costs one trip through the loop.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from registry.devices import DeviceRegistry
from registry.models import Device

from .config import Config
from .ids import IdError, parse_id
from .presence import Presence
from .sip.auth import DigestServer
from .sip.endpoint import SipEndpoint
from .sip.message import SipRequest, make_response, new_tag, parse_name_addr, parse_uri, SipParseError
from .sip.transaction import RequestReceived
from .stats import Counters

__all__ = ["BEIJING", "Lockout", "Registrar", "sip_date"]

log = logging.getLogger("gb28181.registrar")

#: GB/T 28181 clocks run on Beijing time (UTC+8, no daylight saving).
BEIJING = timezone(timedelta(hours=8), "CST")


def sip_date(now: float) -> str:
    """``Date`` value for time sync: ``yyyy-MM-ddTHH:mm:ss.SSS`` in Beijing time (§9.10.3)."""
    dt = datetime.fromtimestamp(now, BEIJING)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}"


class Lockout:
    """Counts wrong passwords per (device ID, source host) and locks out repeat offenders."""

    def __init__(self, max_failures: int, window: float, duration: float,
                 max_entries: int = 100_000) -> None:
        self.max_failures = max_failures
        self.window = window
        self.duration = duration
        self.max_entries = max_entries
        self._failures: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._locked: dict[tuple[str, str], float] = {}

    def locked_for(self, key: tuple[str, str], now: float) -> float:
        """Seconds the key stays locked out (0 if it is not)."""
        until = self._locked.get(key)
        if until is None:
            return 0.0
        if until <= now:
            del self._locked[key]
            return 0.0
        return until - now

    def fail(self, key: tuple[str, str], now: float) -> bool:
        """Record a failure; True when this failure locks the key out."""
        times = self._failures.get(key)
        if times is None:
            times = self._failures[key] = deque()
            while len(self._failures) > self.max_entries:
                self._failures.popitem(last=False)
        times.append(now)
        while times and times[0] < now - self.window:
            times.popleft()
        if len(times) >= self.max_failures and self.duration > 0:
            self._locked[key] = now + self.duration
            del self._failures[key]
            if len(self._locked) > self.max_entries:
                # Drop the ones that have run out; under a spray of IDs drop the oldest.
                for k in [k for k, t in self._locked.items() if t <= now] or list(self._locked)[:1000]:
                    self._locked.pop(k, None)
            return True
        return False

    def clear(self, key: tuple[str, str]) -> None:
        self._failures.pop(key, None)


class Registrar:
    """Answers REGISTER requests; see the module docstring."""

    def __init__(self, *, config: Config, registry: DeviceRegistry, presence: Presence,
                 endpoint: SipEndpoint, counters: Counters,
                 on_registered: Callable[[Device], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.registry = registry
        self.presence = presence
        self.endpoint = endpoint
        self.counters = counters
        self.on_registered = on_registered
        self.clock = clock
        auth = config.auth
        self.digest = DigestServer(config.realm, nonce_ttl=auth.nonce_ttl, qop=auth.qop)
        self.lockout = Lockout(auth.max_failures, auth.failure_window, auth.lockout_seconds)

    def handle(self, ev: RequestReceived) -> None:
        req = ev.request
        txn = ev.transaction
        assert txn is not None
        counters = self.counters
        counters.register_requests += 1
        to_tag = new_tag()

        def reply(status: int, reason: str = "", **headers: str) -> None:
            resp = make_response(req, status, reason, to_tag=to_tag)
            for name, value in headers.items():
                resp.set(name.replace("_", "-"), value)
            self.endpoint.respond(txn, resp)

        now = self.clock()
        try:
            device_id = parse_uri(parse_name_addr(req.headers["to"][0]).uri).user
        except SipParseError as exc:
            counters.register_rejected("bad-request")
            reply(400, f"Bad Request: unreadable To header ({exc})")
            return
        try:
            gid = parse_id(device_id)
        except IdError as exc:
            counters.register_rejected("invalid-id")
            reply(403, f"Forbidden: {exc}")
            return
        if not gid.registrable:
            counters.register_rejected("invalid-id")
            reply(403, f"Forbidden: type code {gid.type_code} in {device_id} cannot register "
                       "(devices are 111-199, platforms 200)")
            return

        expires = self._requested_expires(req)
        if expires is None:
            counters.register_rejected("bad-request")
            reply(400, "Bad Request: Expires is not a number of seconds")
            return
        reg = self.config.registration
        if 0 < expires < reg.min_expires:
            counters.register_rejected("interval-too-brief")
            reply(423, "Interval Too Brief", min_expires=str(reg.min_expires))
            return
        expires = min(expires, reg.max_expires)

        key = (device_id, ev.addr[0])
        locked = self.lockout.locked_for(key, now)
        if locked:
            counters.register_rejected("locked-out")
            reply(403, f"Forbidden: too many wrong passwords, retry in {int(locked) + 1} s")
            return

        device = self.registry.get(device_id)
        if device is None and self.config.auth.unknown_devices == "refuse":
            counters.register_rejected("unknown-device")
            reply(403, "Forbidden: unknown device ID; add it through the API first")
            return

        authorization = req.get("authorization")
        if authorization is None:
            counters.register_challenged += 1
            reply(401, "Unauthorized", www_authenticate=self.digest.challenge(now))
            return
        password = (device.password if device is not None and device.password
                    else self.config.auth.default_password)
        result = self.digest.verify(authorization, method="REGISTER", password=password,
                                    now=now, username=device_id)
        if not result.ok:
            # Label by category only: reasons can quote attacker-chosen text.
            counters.auth_failed("stale-nonce" if result.stale else
                                 "wrong-password" if result.wrong_password else "bad-authorization")
            if result.stale:
                counters.register_challenged += 1
                reply(401, "Unauthorized", www_authenticate=self.digest.challenge(now, stale=True))
            elif result.wrong_password:
                if self.lockout.fail(key, now):
                    counters.lockouts += 1
                    log.warning("device %s at %s locked out for %.0f s after repeated wrong passwords",
                                device_id, ev.addr[0], self.lockout.duration)
                counters.register_rejected("wrong-password")
                reply(403, "Forbidden: wrong password")
            else:
                counters.register_rejected("bad-authorization")
                reply(403, f"Forbidden: {result.reason}")
            return
        self.lockout.clear(key)

        contact = req.get("contact", "") or ""
        if expires == 0:
            if device is not None:
                device.expires_at = 0.0
                device.expires = 0
                device.last_seen = now
                self.registry.set_online(device, False, "unregister", at=now)
                self.registry.touch(device)
                self.presence.forget(device_id)
            counters.unregistered += 1
            reply(200, "OK", expires="0", date=sip_date(now))
            return

        if device is None:
            device = self.registry.add(Device(device_id=device_id, kind=gid.kind))
        was_online = device.online
        device.transport = ev.transport
        device.host, device.port = ev.addr
        device.contact = contact
        device.expires = expires
        device.registered_at = now
        device.expires_at = now + expires
        device.last_seen = now
        if not device.kind:
            device.kind = gid.kind
        self.registry.set_online(device, True, "register", at=now)
        self.registry.touch(device)
        self.presence.seen(device)
        counters.register_ok += 1
        headers = {"expires": str(expires), "date": sip_date(now)}
        if contact:
            headers["contact"] = f"{contact};expires={expires}" if ";expires=" not in contact else contact
        reply(200, "OK", **headers)
        if not was_online and self.on_registered is not None:
            self.on_registered(device)

    def _requested_expires(self, req: SipRequest) -> int | None:
        value = req.get("expires")
        if value is None:
            contact = req.get("contact")
            if contact:
                try:
                    value = parse_name_addr(contact).params.get("expires")
                except SipParseError:
                    return None
        if value is None:
            return self.config.registration.default_expires
        value = value.strip()
        if not value.isdigit():
            return None
        return int(value)
