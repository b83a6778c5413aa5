"""Which of our addresses a peer can reach us at: the host in Via, Contact and SDP ``c=``.

A server bound to the wildcard address (0.0.0.0, the default) has no single address of its
own, and the host name's address is no answer: on common Linux hosts it resolves to a loopback
address (127.0.1.1 on Debian and Ubuntu), which sends a camera's RTP and in-dialog requests
nowhere. The address that works is the one the kernel would use as source to reach that peer
(it picks the interface by its routing table); ``LocalAddresses.for_peer`` asks the kernel
with a connected, never-used UDP socket and caches the answer for a while. A configured
address (``sip.external_host`` / ``media.advertised_host``, for NAT) or a specific bind
address always wins.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time

__all__ = ["LocalAddresses", "is_loopback", "route_source"]

log = logging.getLogger("gb28181.sip")

_WILDCARDS = ("", "0.0.0.0", "::")
#: Where the default route leads (RFC 5737 TEST-NET-1 / RFC 3849): only a route lookup, no packet.
_PROBE_V4, _PROBE_V6 = "192.0.2.1", "2001:db8::1"
_CACHE_TTL = 300.0
_CACHE_MAX = 10_000


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback(host: str) -> bool:
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def route_source(dest: str) -> str | None:
    """The local address the kernel would send from to reach ``dest`` (an IP literal), or None
    when there is no route (or ``dest`` is not an IP address: no DNS lookup here)."""
    ip = _ip(dest)
    if ip is None:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((dest, 9))  # UDP connect() only chooses the route; nothing is sent
            return str(s.getsockname()[0])
    except OSError:
        return None


def _default_address() -> str:
    """Our address on the default route, else any non-loopback address of this host, else
    the loopback address."""
    for probe in (_PROBE_V4, _PROBE_V6):
        addr = route_source(probe)
        if addr is not None and not is_loopback(addr):
            return addr
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_DGRAM)
    except OSError:
        infos = []
    for info in infos:
        addr = str(info[4][0])
        if not is_loopback(addr):
            return addr
    return "127.0.0.1"


class LocalAddresses:
    """Our address as seen by each peer; see the module docstring.

    ``bound`` is the address the socket is bound to, ``configured`` the operator's override.
    """

    def __init__(self, bound: str, configured: str | None = None) -> None:
        self.bound = bound
        self.configured = configured or None
        self._cache: dict[str, tuple[str, float]] = {}
        self._default: tuple[str, float] | None = None

    @property
    def fixed(self) -> str | None:
        """The one address used for every peer, if the operator or the bind address says so."""
        if self.configured:
            return self.configured
        if self.bound not in _WILDCARDS:
            return self.bound
        return None

    @property
    def default(self) -> str:
        """What a peer on the default route is told (and what /healthz reports)."""
        fixed = self.fixed
        if fixed is not None:
            return fixed
        now = time.monotonic()
        if self._default is None or now - self._default[1] > _CACHE_TTL:
            self._default = (_default_address(), now)
        return self._default[0]

    def for_peer(self, host: str | None) -> str:
        """The address ``host`` can reach us at: a loopback address only for a loopback peer."""
        fixed = self.fixed
        if fixed is not None:
            return fixed
        if not host:
            return self.default
        now = time.monotonic()
        hit = self._cache.get(host)
        if hit is not None and now - hit[1] < _CACHE_TTL:
            return hit[0]
        addr = route_source(host) or self.default
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[host] = (addr, now)
        return addr

    def warn_if_unreachable(self, what: str, setting: str) -> None:
        """Log a warning at start when only loopback is found: nothing off this host can reach us."""
        if self.fixed is None and is_loopback(self.default):
            log.warning("%s: this host has no address but loopback, so devices on other hosts "
                        "cannot reach it; connect it to the network or set %s", what, setting)
