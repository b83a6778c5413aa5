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

The digest username may differ from the device ID (Hikvision's "SIP user authentication ID"):
the hash is checked with the username sent and the password of the device named in From; an
``auth_username`` set for the device (API) must then match. A Contact ``expires`` parameter
beats the Expires header, and the 200 echoes the time granted. A registration under a new
Call-ID while the device is online is a reboot, and syncs the device again.

The checks run synchronously on the event loop against the in-memory registry; the 200 waits
for the registry's group commit (``DeviceRegistry.durable``), so a registration that was
answered survives a crash of the server, while the commits of many registrations are shared.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from datetime import datetime

from media.beijing import BEIJING  # GB/T 28181 clocks run on Beijing time (§9.10.3)
from registry.devices import DeviceRegistry
from registry.models import Device

from .config import Config
from .ids import IdError, kind_of_type, parse_id, registrable_type, type_digits
from .presence import Presence
from .sip.auth import DigestServer
from .sip.endpoint import SipEndpoint
from .sip.message import SipParseError, SipRequest, new_tag, parse_name_addr, parse_uri, response_bytes
from .sip.transaction import RequestReceived
from .stats import Counters

__all__ = ["BEIJING", "Lockout", "Registrar", "sip_date"]

log = logging.getLogger("gb28181.registrar")

#: Seconds a device is told to wait (Retry-After) when its registration cannot be stored.
STORE_RETRY_AFTER = 30
#: Retry-After range, seconds, when overloaded: random, so that the retries do not come back
#: as one wave.
OVERLOAD_RETRY_AFTER = (10, 60)



_date_cache: tuple[int, str] = (-1, "")
_date_ms: tuple[int, str] = (-1, "")


def sip_date(now: float) -> str:
    """``Date`` value for time sync: ``yyyy-MM-ddTHH:mm:ss.SSS`` in Beijing time (§9.10.3)."""
    global _date_cache, _date_ms
    ms = int(now * 1000)
    if _date_ms[0] == ms:  # a registration storm answers several in the same millisecond
        return _date_ms[1]
    second, fraction = divmod(ms, 1000)
    if _date_cache[0] != second:  # formatting a date costs more than the rest of a 200
        _date_cache = (second, datetime.fromtimestamp(second, BEIJING).strftime("%Y-%m-%dT%H:%M:%S."))
    text = f"{_date_cache[1]}{fraction:03d}"
    _date_ms = (ms, text)
    return text


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


def stateless_request(req: SipRequest) -> bool:
    """The REGISTERs answered without a server transaction: those without credentials. Their
    answer is a challenge (or a refusal) that nothing depends on, so a retransmission may as
    well get a fresh one (RFC 3261 §8.2.7); that spares half of a registration's requests the
    transaction's state and timers. A REGISTER with credentials keeps its transaction: its
    nonce is single-use, and a retransmission must get the same 200 again."""
    return req.method == "REGISTER" and "authorization" not in req.headers


def _device_id(req: SipRequest) -> str:
    """The registering device's ID: the user of From (who sends), which GB/T 28181 devices
    also put in To; To when From names no user."""
    value = req.headers["from"][0]
    # The common shape, read without building a NameAddr and a SipUri: <sip:ID@host>;tag=...
    start = value.find("<sip:")
    at = value.find("@", start)
    if start != -1 and at != -1 and value.find(">", start) > at:
        user = value[start + 5:at]
        if user.isdigit():
            return user
    user = parse_uri(parse_name_addr(value).uri).user
    return user or parse_uri(parse_name_addr(req.headers["to"][0]).uri).user


def _with_expires(contact: str, expires: str) -> str:
    """The Contact echoed in the 200 with the time actually granted (RFC 3261 §10.3 step 8)."""
    if contact.endswith(">") and contact.count("<") == 1:  # <uri> without parameters
        return f"{contact};expires={expires}"
    try:
        addr = parse_name_addr(contact)
    except SipParseError:
        return contact
    addr.params["expires"] = expires
    return str(addr)


class _Answer:
    """The answer to one REGISTER: sent at once (refusals, challenges) or, for a registration,
    once the registry has committed it (``committed``, the group commit's callback). One
    object per REGISTER instead of a closure per step: a registrar makes thousands a second."""

    __slots__ = ("registrar", "ev", "to_tag", "extra", "device", "unregister")

    def __init__(self, registrar: Registrar, ev: RequestReceived) -> None:
        self.registrar = registrar
        self.ev = ev
        #: Every answer to this REGISTER carries the same To tag (RFC 3261 §8.2.6.2).
        self.to_tag = new_tag()
        #: Headers of the 200 (Expires, Date, Contact).
        self.extra: dict[str, str] | None = None
        #: The device to hand to ``on_registered`` after the 200: newly online or rebooted.
        self.device: Device | None = None
        self.unregister = False

    def reply(self, status: int, reason: str = "", headers: dict[str, str] | None = None) -> None:
        ev = self.ev
        data = response_bytes(ev.request, status, reason, to_tag=self.to_tag, extra=headers)
        endpoint = self.registrar.endpoint
        if ev.transaction is None:  # a first REGISTER, answered statelessly (see stateless_request)
            endpoint.send_stateless(data, ev.addr, ev.transport)
        else:
            endpoint.respond_bytes(ev.transaction, status, data)

    def committed(self, ok: bool) -> None:
        registrar = self.registrar
        counters = registrar.counters
        if not ok:
            counters.register_rejected("store-unavailable")
            self.reply(503, "Service Unavailable: the registry database cannot be written",
                       {"retry-after": str(STORE_RETRY_AFTER)})
            return
        if self.unregister:
            counters.unregistered += 1
        else:
            counters.register_ok += 1
        self.reply(200, "OK", self.extra)
        device = self.device
        if device is not None and registrar.on_registered is not None:
            registrar.on_registered(device)


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
        #: Whether the server is past capacity (see ``sip.overload``); never, unless wired.
        self.overloaded: Callable[[], bool] = lambda: False
        self.lockout = Lockout(auth.max_failures, auth.failure_window, auth.lockout_seconds)

    def handle(self, ev: RequestReceived) -> None:
        req = ev.request
        headers = req.headers
        counters = self.counters
        counters.register_requests += 1
        answer = _Answer(self, ev)
        reply = answer.reply

        now = self.clock()
        try:
            device_id = _device_id(req)
        except SipParseError as exc:
            counters.register_rejected("bad-request")
            reply(400, f"Bad Request: unreadable From/To header ({exc})")
            return
        digits = type_digits(device_id)  # without building a GbId per REGISTER
        if not digits:  # not 20 digits
            try:
                parse_id(device_id)  # names the fault
            except IdError as exc:
                counters.register_rejected("invalid-id")
                reply(403, f"Forbidden: {exc}")
                return
        type_code = int(digits)
        if not registrable_type(type_code):
            counters.register_rejected("invalid-id")
            reply(403, f"Forbidden: type code {type_code} in {device_id} cannot register "
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
            reply(423, "Interval Too Brief", {"min-expires": str(reg.min_expires)})
            return
        if expires > reg.max_expires:
            expires = reg.max_expires

        key = (device_id, ev.addr[0])
        lockout = self.lockout
        locked = lockout.locked_for(key, now)
        if locked:
            counters.register_rejected("locked-out")
            reply(403, f"Forbidden: too many wrong passwords, retry in {int(locked) + 1} s")
            return

        device = self.registry.get(device_id)
        if device is None and self.config.auth.unknown_devices == "refuse":
            counters.register_rejected("unknown-device")
            reply(403, "Forbidden: unknown device ID; add it through the API first")
            return

        authorization = headers.get("authorization")
        if authorization is None and self.overloaded() and (device is None or not device.online):
            # Past capacity a fast 503 beats a timeout (RFC 3261 §21.5.4): the first leg of a
            # new registration is shed, spreading the retries; the ones under way finish.
            counters.overload_rejected += 1
            counters.register_rejected("overloaded")
            reply(503, "Service Unavailable: overloaded, retry later",
                  {"retry-after": str(random.randint(*OVERLOAD_RETRY_AFTER))})
            return
        if authorization is None:
            counters.register_challenged += 1
            reply(401, "Unauthorized", {"www-authenticate": self.digest.challenge(now)})
            return
        password = (device.password if device is not None and device.password
                    else self.config.auth.default_password)
        # The digest is computed over the username the device sent, which Hikvision lets
        # differ from the device ID (its "SIP user authentication ID"); the password is the
        # device's. A username configured for the device must match, if there is one.
        username = device.extra.get("auth_username") if device is not None else None
        result = self.digest.verify(authorization[0], method="REGISTER", password=password,
                                    now=now, username=username or None)
        if not result.ok:
            # Label by category only: reasons can quote attacker-chosen text.
            counters.auth_failed("stale-nonce" if result.stale else
                                 "wrong-password" if result.wrong_password else "bad-authorization")
            if result.stale:
                counters.register_challenged += 1
                reply(401, "Unauthorized", {"www-authenticate": self.digest.challenge(now, stale=True)})
            elif result.wrong_password:
                if lockout.fail(key, now):
                    counters.lockouts += 1
                    log.warning("device %s at %s locked out for %.0f s after repeated wrong passwords",
                                device_id, ev.addr[0], lockout.duration)
                counters.register_rejected("wrong-password")
                reply(403, "Forbidden: wrong password")
            else:
                counters.register_rejected("bad-authorization")
                reply(403, f"Forbidden: {result.reason}")
            return
        lockout.clear(key)

        contacts = headers.get("contact")
        contact = contacts[0] if contacts else ""
        if expires == 0:
            if device is not None:
                device.expires_at = 0.0
                device.expires = 0
                device.last_seen = now
                self.registry.set_online(device, False, "unregister", at=now)
                self.registry.touch(device)
                self.presence.forget(device_id)
            answer.extra = {"expires": "0", "date": sip_date(now)}
            answer.unregister = True
            self._when_durable(answer)
            return

        registry = self.registry
        if device is None:
            device = registry.add(Device(device_id=device_id, kind=kind_of_type(type_code)))
        # A registration under a new Call-ID while online is a rebooted device (RFC 3261
        # §10.2.4: a UA keeps its Call-ID across refreshes): it has lost its subscriptions
        # and maybe its catalog, so it is synced again as if it had been offline.
        extra = device.extra
        call_id = headers["call-id"][0]
        online = device.online
        rebooted = online and extra.get("register_call_id") not in (None, call_id)
        extra["register_call_id"] = call_id
        device.transport = ev.transport
        device.host, device.port = ev.addr
        device.contact = contact
        device.expires = expires
        device.registered_at = now
        device.expires_at = now + expires
        device.last_seen = now
        if not device.kind:
            device.kind = kind_of_type(type_code)
        registry.set_online(device, True, "register", at=now)
        registry.touch(device)
        self.presence.seen(device)
        granted = str(expires)
        answer.extra = ({"expires": granted, "date": sip_date(now),
                         "contact": _with_expires(contact, granted)} if contact else
                        {"expires": granted, "date": sip_date(now)})
        if not online or rebooted:
            answer.device = device  # handed to on_registered once answered
        self._when_durable(answer)

    def _when_durable(self, answer: _Answer) -> None:
        """Answer once the registry has committed this registration (group commit: the
        answers of a few milliseconds share one transaction), so that a 200 is never
        forgotten by a crash. A store that cannot commit gets the device a 503 to retry."""
        self.registry.after_commit(answer.committed)

    def _requested_expires(self, req: SipRequest) -> int | None:
        """The registration time asked for: a Contact ``expires`` parameter beats the Expires
        header (RFC 3261 §10.2.1.1); neither gives the default; garbage gives None."""
        value = None
        headers = req.headers
        contacts = headers.get("contact")
        if contacts and "expires" in contacts[0].lower():
            try:
                value = parse_name_addr(contacts[0]).params.get("expires")
            except SipParseError:
                return None
        if value is None:
            values = headers.get("expires")
            if not values:
                return self.config.registration.default_expires
            value = values[0]
            if value.isdigit() and value.isascii() and len(value) <= 10:
                return int(value)  # the parser stored it as plain decimal seconds
        value = value.strip()
        if not value.isascii() or not value.isdigit() or len(value) > 10:
            return None
        return int(value)
