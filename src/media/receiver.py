"""Media receiver: the sockets in front of `media.ingest.RtpIngest`.

A thin asyncio adapter, in the aioquic/h11 manner: everything that decides
anything about RTP lives in the sans-IO ingest; this module only moves bytes
from sockets to `RtpIngest.feed` and keeps counters of what it threw away.

- SSRC claims: a stream claims the SSRC we offered (`y=`) when it is created,
  and the SSRC of the device's answer when the 200 arrives
  (`handle.add_ssrc`, PROTOCOL.md 5.2: the callee may choose, Annex F note 4).
  A claimed SSRC belongs to one live stream: it is routed to it at once, and
  no guess below ever gives it to another stream (a claim even takes back an
  SSRC a guess gave to another stream, which then waits again). Closing a
  stream releases its SSRCs; they are "retired" for a while, since a device
  goes on sending for a moment after BYE, and no guess takes them then.
- UDP: ONE shared port for every stream (like ZLMediaKit's single RTP port).
  Datagrams are told apart by the SSRC in bytes 8-12 of the RTP header, read
  without parsing the packet. A device that ignores the offered `y=` (answers
  may differ, or be missing) is caught by a fallback guess: a packet with an
  unclaimed SSRC from a host that has a stream waiting for its first packet is
  routed to that stream from then on (the oldest waiting stream whose answer
  gave no SSRC of its own, else the oldest), and the stream is flagged
  `ssrc_mismatch`. Anything else with an unknown SSRC is counted and dropped.
- TCP (`media.receiver_tcp`): passive (we offered `a=setup:passive`, Annex L
  default; `listen_tcp`) on a port of the stream's own or shared with other
  streams (`tcp_port_range`), from any address, each connection tied to its
  stream by the SSRC of its first packets; or active (`connect_tcp`), trying
  the answer's `c=` address, then the device's signalling address.

On TCP the framing (RFC 4571, or RTSP `$`-interleaved, auto-detected) is
`media.rtp_tcp.TcpRtpFramer`, whose buffer is bounded by one maximal packet; a
connection that keeps failing to frame (garbage) is aborted and the reason
counted. No stage here buffers anything else.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
import time
from collections.abc import Sequence

from . import accel
from .ingest import RtpIngest
from .receiver_tcp import TCP_PENDING_MAX, TCP_PENDING_S, TcpHandle, TcpListeners, _TcpConnection
from .rtp import RTP_HEADER_SIZE

__all__ = ["MediaReceiver", "UdpHandle", "TcpHandle", "UDP_RCVBUF"]

log = logging.getLogger("media.receiver")

# Hundreds of ~3 Mbit/s streams are ~100 MB/s: a 64 MiB kernel buffer rides out a
# stall of half a second. Linux caps SO_RCVBUF at net.core.rmem_max unless the
# process may use SO_RCVBUFFORCE; the effective size is in `udp_rcvbuf`.
UDP_RCVBUF = 64 << 20
# A device may keep sending for a while after BYE; its SSRC is not taken by a
# fallback guess for another stream within this many seconds.
RETIRED_SSRC_S = 10.0
_MAX_UNKNOWN_SSRCS = 256  # distinct unknown SSRCs remembered for diagnostics
_RTCP_TYPES = (192, 223)  # RFC 5761 4: RTCP packet types, byte 1
_MIN_RTCP_SIZE = 8  # an empty receiver report (RFC 3550 6.4.2)
_NO_ADDRESS = ("", "0.0.0.0", "::")

_unpack_ssrc = struct.Struct("!I").unpack_from


def _advertise(host: str) -> str:
    """The address to put in SDP `c=` when none is configured."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    # A wildcard bind: the address of the interface with the default route.
    # connect() on a UDP socket only picks the route, nothing is sent.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1 (RFC 5737)
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class UdpHandle:
    """One stream expected on the shared UDP port.

    `ssrc` is the offered SSRC; `ssrcs` every SSRC routed here (offered,
    answered through `add_ssrc`, then fallback guesses).
    """

    transport = "udp"

    __slots__ = (
        "_receiver",
        "ssrc",
        "ssrcs",
        "ingest",
        "source_host",
        "first_packet",
        "peer",
        "_packets",
        "lane",
        "closed",
        "_answered",
        "_order",
    )

    def __init__(self, receiver: MediaReceiver, ssrc: int, ingest: RtpIngest, source_host: str | None) -> None:
        self._receiver = receiver
        self.ssrc = ssrc  # the SSRC we offered (y=)
        self.ssrcs: list[int] = []
        self.ingest = ingest
        self.source_host = source_host
        self.first_packet = asyncio.Event()
        self.peer: tuple[str, int] | None = None
        self._packets = 0  # routed through Python; `packets` adds the lane's
        self.lane = None  # the C fast path's state for this stream (media._fast.Lane)
        if receiver._fast is not None:
            self.lane = receiver._fast.Lane(self)
            ingest.attach_lane(self.lane)
        self.closed = False
        self._answered = False  # the answer named an SSRC of its own
        self._order = 0  # creation order, oldest first among the waiting

    @property
    def packets(self) -> int:
        """Datagrams routed to this stream."""
        return self._packets + (self.lane.total if self.lane is not None else 0)

    def add_ssrc(self, ssrc: int) -> bool:
        """Route `ssrc` (the answer's `y=`) here from now on.

        False (and nothing changes) if another live stream claimed it.
        """
        return self._receiver._claim(self, ssrc, answer=True)

    def close(self) -> None:
        """Stop routing to this stream and release its SSRCs (idempotent)."""
        if not self.closed:
            self.closed = True
            if self.lane is not None:
                self.lane.armed = 0
            self._receiver._release(self)

    def _first(self, addr: tuple) -> None:
        self.peer = (addr[0], addr[1])
        self.first_packet.set()
        self._receiver._unwait(self)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, receiver: MediaReceiver) -> None:
        self.datagram_received = receiver._datagram  # type: ignore[method-assign]

    def error_received(self, exc: Exception) -> None:
        log.debug("media UDP error: %s", exc)


class MediaReceiver:
    """The platform's media sockets; see the module docstring.

    `tcp_port_range` (inclusive) makes passive TCP streams share listening
    ports from that range; None gives each its own ephemeral port. A passive
    connection waits at most `tcp_pending_timeout` seconds for its first RTP
    packet, and at most `tcp_pending_max` connections wait at once.

    Counters: `udp_packets` (routed to a stream), `invalid` (not RTP v2),
    `rtcp`, `unknown_ssrc` (dropped, with `unknown_ssrcs` = SSRC -> count for
    the first few SSRCs seen), `stale` (SSRC of a recently closed stream),
    `ssrc_fallbacks` (unknown SSRCs routed by source host), `ssrc_revoked`
    (guesses taken back by a claim), `ingest_errors` (exceptions raised
    downstream of an ingest); passive TCP's are in `as_dict()`.
    """

    def __init__(
        self,
        host: str = "0.0.0.0",
        *,
        advertised_host: str | None = None,
        udp_port: int = 0,
        udp_rcvbuf: int = UDP_RCVBUF,
        tcp_port_range: tuple[int, int] | None = None,
        tcp_pending_timeout: float = TCP_PENDING_S,
        tcp_pending_max: int = TCP_PENDING_MAX,
    ) -> None:
        self.host = host
        self.advertised_host = advertised_host or _advertise(host)
        self.udp_port = udp_port
        self.udp_rcvbuf_requested = udp_rcvbuf
        self.udp_rcvbuf = 0  # effective size, known after start()
        self._udp: asyncio.DatagramTransport | None = None
        # With the C twin (media._fast): the socket read in batches by `_readable`, and the
        # lanes of the UDP routes, SSRC -> the stream's Lane, kept with `_by_ssrc`.
        self._fast = accel.fast  # None where it was not built (recvmmsg is Linux's)
        self._sock: socket.socket | None = None
        self._lanes: dict[int, object] = {}
        self._batch: list = []
        self._by_ssrc: dict[int, UdpHandle] = {}  # UDP routes: claims and guesses
        self._owner: dict[int, UdpHandle | TcpHandle] = {}  # claimed SSRC -> its live stream
        self._waiting: dict[str, list[UdpHandle]] = {}  # source host -> handles with no packet yet
        self._retired: dict[int, float] = {}  # SSRC of a closed stream -> when
        self._udp_order = 0
        self._tcp: set[TcpHandle] = set()
        self._tcp_listeners = TcpListeners(self, host, tcp_port_range, tcp_pending_timeout, tcp_pending_max)
        self.udp_packets = 0
        self.invalid = 0
        self.rtcp = 0
        self.unknown_ssrc = 0
        self.unknown_ssrcs: dict[int, int] = {}
        self.stale = 0
        self.ssrc_fallbacks = 0
        self.ssrc_revoked = 0
        self.ingest_errors = 0
        self._error_log_at = 0.0

    # -- life cycle --

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._set_rcvbuf(sock)
            sock.bind((self.host, self.udp_port))
            sock.setblocking(False)
            if self._fast is not None:
                loop.add_reader(sock.fileno(), self._readable)
                self._sock = sock
            else:
                self._udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self.udp_port = sock.getsockname()[1]
        log.info("media UDP on port %d, receive path: %s", self.udp_port,
                 accel.name if self._fast is not None else "pure Python")

    def _set_rcvbuf(self, sock: socket.socket) -> None:
        want = self.udp_rcvbuf_requested
        # Python does not export SO_RCVBUFFORCE; on Linux it is 33 (asm-generic/socket.h).
        force = getattr(socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None)
        try:
            if force is None:
                raise OSError
            sock.setsockopt(socket.SOL_SOCKET, force, want)  # beyond rmem_max, if privileged
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
            except OSError:
                pass
        # Linux reports twice the size asked for (bookkeeping overhead included).
        self.udp_rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if self.udp_rcvbuf < want:
            log.warning(
                "media UDP receive buffer is %d KiB, not the %d KiB asked for: raise "
                "net.core.rmem_max to avoid drops with many streams",
                self.udp_rcvbuf >> 10,
                want >> 10,
            )

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for h in list(self._tcp):
            h.close()
        self._tcp_listeners.close()
        for u in {id(u): u for u in self._by_ssrc.values()}.values():
            u.close()

    def as_dict(self) -> dict:
        """Counters, JSON-ready."""
        passive = self._tcp_listeners
        return {
            "udp_port": self.udp_port,
            "udp_rcvbuf": self.udp_rcvbuf,
            "udp_streams": len({id(h) for h in self._by_ssrc.values()}),
            "tcp_streams": len(self._tcp),
            "tcp_ports": passive.as_dict(),
            "tcp_pending": passive.pending,
            "tcp_unbound": dict(passive.unbound),
            "tcp_ssrc_fallbacks": passive.ssrc_fallbacks,
            "udp_packets": self.udp_packets,
            "invalid": self.invalid,
            "rtcp": self.rtcp,
            "unknown_ssrc": self.unknown_ssrc,
            "stale": self.stale,
            "ssrc_fallbacks": self.ssrc_fallbacks,
            "ssrc_revoked": self.ssrc_revoked,
            "ingest_errors": self.ingest_errors,
        }

    # -- SSRC claims (both transports) --

    def _claim(self, h: UdpHandle | TcpHandle, ssrc: int, *, answer: bool = False) -> bool:
        """Make `ssrc` belong to live stream `h`; False if another live stream claimed it."""
        ssrc &= 0xFFFFFFFF
        if h.closed:
            return False
        owner = self._owner.get(ssrc)
        if owner is not None and owner is not h:
            if answer:
                log.warning(
                    "SSRC %d of the answer for the %s stream offered SSRC %s is another stream's: not taken",
                    ssrc,
                    h.transport,
                    h.ssrc,
                )
            return False
        self._owner[ssrc] = h
        self._retired.pop(ssrc, None)
        if ssrc not in h.ssrcs:
            h.ssrcs.append(ssrc)
        guessed = self._by_ssrc.get(ssrc)
        if guessed is not None and guessed is not h:
            self._revoke(guessed, ssrc)
        if h.transport == "udp":
            self._route(ssrc, h)  # type: ignore[arg-type]
            if answer:
                h._answered = True  # type: ignore[union-attr]
        return True

    def _revoke(self, g: UdpHandle, ssrc: int) -> None:
        """Take back an SSRC that a fallback guess gave to `g`; `g` waits again.

        If `g` has its own packets after all, the next one ends its wait again.
        """
        self._unroute(ssrc)
        g.ssrcs.remove(ssrc)
        self.ssrc_revoked += 1
        log.info("SSRC %d claimed by its stream: no longer routed to the stream offered SSRC %d", ssrc, g.ssrc)
        if g.peer is not None and g.source_host is not None:
            g.peer = None
            if g.lane is not None:
                g.lane.armed = 0  # its next packet goes through Python, which ends the wait
            g.first_packet.clear()
            waiting = self._waiting.setdefault(g.source_host, [])
            pos = next((i for i, w in enumerate(waiting) if w._order > g._order), len(waiting))
            waiting.insert(pos, g)

    def _fallback_refusal(self, ssrc: int) -> str | None:
        """Why a guess may not give `ssrc` to a stream: "claimed", "stale", or None."""
        if ssrc in self._owner:
            return "claimed"
        retired = self._retired.get(ssrc)
        if retired is not None:
            if time.monotonic() - retired < RETIRED_SSRC_S:
                return "stale"
            del self._retired[ssrc]
        return None

    def _release(self, h: UdpHandle | TcpHandle) -> None:
        if h.transport == "udp":
            self._unwait(h)  # type: ignore[arg-type]
        else:
            self._tcp.discard(h)
        now = time.monotonic()
        retired = self._retired
        for ssrc in h.ssrcs:
            if self._owner.get(ssrc) is h:
                del self._owner[ssrc]
            if self._by_ssrc.get(ssrc) is h:
                self._unroute(ssrc)
            if ssrc not in self._owner:
                retired.pop(ssrc, None)
                retired[ssrc] = now  # re-inserted: the dict stays ordered by time
        while retired:
            oldest = next(iter(retired))
            if now - retired[oldest] < RETIRED_SSRC_S:
                break
            del retired[oldest]

    # -- UDP --

    def expect_udp(self, ssrc: int, ingest: RtpIngest, *, source_host: str | None = None) -> UdpHandle:
        """Route datagrams with `ssrc` (the offered `y=`) to `ingest`; `source_host` enables the fallback.

        ValueError if another live stream claimed `ssrc`.
        """
        ssrc &= 0xFFFFFFFF
        h = UdpHandle(self, ssrc, ingest, source_host)
        if not self._claim(h, ssrc):
            raise ValueError(f"SSRC {ssrc} is already expected by another stream")
        self._udp_order += 1
        h._order = self._udp_order
        if source_host is not None:
            self._waiting.setdefault(source_host, []).append(h)
        return h

    def _route(self, ssrc: int, h: UdpHandle) -> None:
        self._by_ssrc[ssrc] = h
        if h.lane is not None:
            self._lanes[ssrc] = h.lane

    def _unroute(self, ssrc: int) -> None:
        del self._by_ssrc[ssrc]
        self._lanes.pop(ssrc, None)

    def _readable(self) -> None:
        """The UDP socket has datagrams: read a batch in C (media._fast.recv; module docstring
        of _fast.c). Packets on an armed lane's fast path were taken there; what comes back is
        each completed frame's lane and every other datagram, in arrival order."""
        assert self._fast is not None and self._sock is not None
        out = self._batch
        try:
            try:
                taken = self._fast.recv(self._sock.fileno(), self._lanes, time.monotonic(), out, 1024)
            except OSError as exc:
                log.debug("media UDP error: %s", exc)
                return
            self.udp_packets += taken
            datagram = self._datagram
            for item in out:
                if type(item) is tuple:
                    datagram(item[0], item[1])
                    continue
                h = item.owner
                if h.closed:
                    continue
                try:
                    h.ingest.lane_frame()
                except Exception:
                    self._ingest_error(h)
        finally:
            out.clear()

    def _datagram(self, data: bytes, addr: tuple) -> None:
        # The hot path: a few byte reads and one dict lookup before the ingest.
        if len(data) < RTP_HEADER_SIZE or data[0] >> 6 != 2:
            if len(data) >= _MIN_RTCP_SIZE and data[0] >> 6 == 2 and _RTCP_TYPES[0] <= data[1] <= _RTCP_TYPES[1]:
                self.rtcp += 1
            else:
                self.invalid += 1
            return
        if _RTCP_TYPES[0] <= data[1] <= _RTCP_TYPES[1]:
            self.rtcp += 1
            return
        ssrc = _unpack_ssrc(data, 8)[0]
        h = self._by_ssrc.get(ssrc)
        if h is None:
            h = self._fallback(ssrc, addr)
            if h is None:
                return
        if h.peer is None:
            h._first(addr)
        h._packets += 1
        self.udp_packets += 1
        ingest = h.ingest
        try:
            ingest.feed(data)
        except Exception:
            self._ingest_error(h)
        if h.lane is not None:
            ingest.lane_sync()

    def _fallback(self, ssrc: int, addr: tuple) -> UdpHandle | None:
        refusal = self._fallback_refusal(ssrc)
        if refusal == "stale":
            self.stale += 1
            return None
        waiting = self._waiting.get(addr[0])
        if not waiting or refusal is not None:
            self.unknown_ssrc += 1
            seen = self.unknown_ssrcs
            if ssrc in seen:
                seen[ssrc] += 1
            elif len(seen) < _MAX_UNKNOWN_SSRCS:
                seen[ssrc] = 1
                log.info("media UDP from %s:%s with unknown SSRC %d dropped", addr[0], addr[1], ssrc)
            return None
        # The oldest stream of that host still waiting, unless its answer told its own SSRC.
        h = next((w for w in waiting if not w._answered), waiting[0])
        self._route(ssrc, h)
        h.ssrcs.append(ssrc)
        h.ingest.stats.ssrc_mismatch = True
        self.ssrc_fallbacks += 1
        log.info(
            "media UDP from %s:%s with SSRC %d routed to the stream offered SSRC %d (device ignored y=)",
            addr[0],
            addr[1],
            ssrc,
            h.ssrc,
        )
        return h

    def _unwait(self, h: UdpHandle) -> None:
        if h.source_host is None:
            return
        waiting = self._waiting.get(h.source_host)
        if waiting and h in waiting:
            waiting.remove(h)
            if not waiting:
                del self._waiting[h.source_host]

    def _ingest_error(self, h: UdpHandle | TcpHandle) -> None:
        self.ingest_errors += 1
        now = time.monotonic()
        if now - self._error_log_at > 10.0:
            self._error_log_at = now
            log.exception("media consumer of %s stream from %s raised", h.transport, h.peer)

    # -- TCP --

    async def listen_tcp(
        self, ingest: RtpIngest, *, ssrc: int | None = None, source_host: str | None = None
    ) -> TcpHandle:
        """Listen for the device to connect (TCP passive); put `handle.port` in the offer.

        `ssrc` is the offered `y=` (ValueError if another live stream claimed
        it); connections from any address are tied to the stream by SSRC.
        `source_host` is only recorded. OSError if no port can be had.
        """
        h = TcpHandle(self, "passive", ingest, None if ssrc is None else ssrc & 0xFFFFFFFF, source_host)
        if h.ssrc is not None and not self._claim(h, h.ssrc):
            raise ValueError(f"SSRC {h.ssrc} is already expected by another stream")
        self._tcp.add(h)
        try:
            await self._tcp_listeners.add(h)
        except BaseException:
            h.close()
            raise
        return h

    async def connect_tcp(
        self,
        hosts: str | Sequence[str],
        port: int,
        ingest: RtpIngest,
        *,
        timeout: float = 5.0,
        ssrc: int | None = None,
    ) -> TcpHandle:
        """Connect to the device's media port (TCP active), trying `hosts` in order.

        `hosts` is the answer's `c=` address, then the device's signalling
        address (duplicates and wildcard addresses are skipped); `timeout`
        applies to each attempt. Raises OSError naming every address tried.
        """
        candidates = [hosts] if isinstance(hosts, str) else list(hosts)
        tried: list[str] = []
        failures: list[str] = []
        h = TcpHandle(self, "active", ingest, None if ssrc is None else ssrc & 0xFFFFFFFF, None)
        if h.ssrc is not None and not self._claim(h, h.ssrc):
            raise ValueError(f"SSRC {h.ssrc} is already expected by another stream")
        self._tcp.add(h)
        loop = asyncio.get_running_loop()
        try:
            for host in candidates:
                if host in _NO_ADDRESS or host in tried:
                    continue
                tried.append(host)
                where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                try:
                    transport, _ = await asyncio.wait_for(
                        loop.create_connection(lambda: _TcpConnection(h), host, port), timeout
                    )
                except TimeoutError:
                    failures.append(f"{where} (timed out after {timeout:g} s)")
                    continue
                except OSError as exc:
                    failures.append(f"{where} ({exc.strerror or exc})")
                    continue
                h.port = transport.get_extra_info("sockname")[1]
                return h
        except BaseException:
            h.close()
            raise
        h.close()
        if not tried:
            raise OSError(f"no address to connect to for the device's media port {port}: {candidates!r}")
        raise OSError(f"cannot connect to the device's media port: {'; '.join(failures)}")
