"""Media receiver: the sockets in front of `media.ingest.RtpIngest`.

A thin asyncio adapter, in the aioquic/h11 manner: everything that decides
anything about RTP lives in the sans-IO ingest; this module only moves bytes
from sockets to `RtpIngest.feed` and keeps counters of what it threw away.

- UDP: ONE shared port for every stream (like ZLMediaKit's single RTP port).
  Datagrams are told apart by the SSRC in bytes 8-12 of the RTP header, read
  without parsing the packet. A device that ignores the offered `y=` SSRC
  (PROTOCOL.md 5.2: answers may differ, or be missing) is caught by a fallback:
  a packet with an unknown SSRC from a host that has a stream waiting for its
  first packet is routed to that stream from then on, and the stream is
  flagged `ssrc_mismatch`. SSRCs of recently closed streams are not eligible
  (a device goes on sending for a moment after BYE), and anything else with an
  unknown SSRC is counted and dropped.
- TCP passive (we offered `a=setup:passive`, Annex L default): `listen_tcp`
  opens a listening socket on an ephemeral port; the device connects after the
  ACK. A device may reconnect: the newest connection wins.
- TCP active (we offered `a=setup:active`): `connect_tcp` connects to the
  port in the device's answer.

On TCP the framing (RFC 4571, or RTSP `$`-interleaved, auto-detected) is
`media.rtp_tcp.TcpRtpFramer`, whose buffer is bounded by one maximal packet; a
connection that keeps failing to frame (garbage) is aborted and the reason
counted on its handle. No stage here buffers anything else.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import struct
import time

from .ingest import RtpIngest
from .rtp import RTP_HEADER_SIZE
from .rtp_tcp import TcpRtpFramer

__all__ = ["MediaReceiver", "UdpHandle", "TcpHandle", "UDP_RCVBUF"]

log = logging.getLogger("media.receiver")

# Hundreds of ~3 Mbit/s streams are ~100 MB/s: a 64 MiB kernel buffer rides out a
# stall of half a second. Linux caps SO_RCVBUF at net.core.rmem_max unless the
# process may use SO_RCVBUFFORCE; the effective size is in `udp_rcvbuf`.
UDP_RCVBUF = 64 << 20
# A device may keep sending for a while after BYE; its SSRC is not taken by the
# fallback for another stream of the same host within this many seconds.
RETIRED_SSRC_S = 10.0
# TCP garbage limits. TCP does not lose or corrupt bytes, so a peer that sends
# RTP has no framing errors at all and keeps one SSRC; random bytes, by contrast,
# pass the framer's checks about once per resync but with a new "SSRC" each
# time. A connection is given up after this many framing errors plus SSRC
# changes (and one more per 1000 packets), or this many bytes dropped in a row.
TCP_ERROR_LIMIT = 8
TCP_GARBAGE_BYTES = 128 << 10
_MAX_UNKNOWN_SSRCS = 256  # distinct unknown SSRCs remembered for diagnostics
_RTCP_TYPES = (192, 223)  # RFC 5761 4: RTCP packet types, byte 1
_MIN_RTCP_SIZE = 8  # an empty receiver report (RFC 3550 6.4.2)

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
    """One stream expected on the shared UDP port."""

    transport = "udp"

    __slots__ = ("_receiver", "ssrc", "ssrcs", "ingest", "source_host", "first_packet", "peer", "packets", "closed")

    def __init__(self, receiver: MediaReceiver, ssrc: int, ingest: RtpIngest, source_host: str | None) -> None:
        self._receiver = receiver
        self.ssrc = ssrc  # the SSRC we offered (y=)
        self.ssrcs = [ssrc]  # every SSRC routed here (the offered one, then fallbacks)
        self.ingest = ingest
        self.source_host = source_host
        self.first_packet = asyncio.Event()
        self.peer: tuple[str, int] | None = None
        self.packets = 0
        self.closed = False

    def close(self) -> None:
        """Stop routing to this stream (idempotent)."""
        if not self.closed:
            self.closed = True
            self._receiver._release_udp(self)

    def _first(self, addr: tuple) -> None:
        self.peer = (addr[0], addr[1])
        self.first_packet.set()
        self._receiver._unwait(self)


class TcpHandle:
    """One stream over TCP, passive (we listen) or active (we connect).

    `port` is the listening port (passive) or our local port (active);
    `peer` the device's address of the current or last connection.
    `disconnects` counts why connections ended ("eof", "garbage", "replaced",
    "error", "closed"); `close_reason` is the last one; `rejected` counts
    connections refused because they came from another host than `source_host`.
    """

    transport = "tcp"

    __slots__ = (
        "_receiver",
        "mode",
        "ingest",
        "source_host",
        "first_packet",
        "port",
        "peer",
        "packets",
        "connections",
        "rejected",
        "disconnects",
        "close_reason",
        "closed",
        "_server",
        "_conn",
    )

    def __init__(self, receiver: MediaReceiver, mode: str, ingest: RtpIngest, source_host: str | None) -> None:
        self._receiver = receiver
        self.mode = mode  # "passive" | "active"
        self.ingest = ingest
        self.source_host = source_host
        self.first_packet = asyncio.Event()
        self.port = 0
        self.peer: tuple[str, int] | None = None
        self.packets = 0
        self.connections = 0
        self.rejected = 0
        self.disconnects: dict[str, int] = {}
        self.close_reason: str | None = None
        self.closed = False
        self._server: asyncio.AbstractServer | None = None
        self._conn: _TcpConnection | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def framer(self) -> TcpRtpFramer | None:
        """The framer of the current connection (its counters say how framing went)."""
        return self._conn.framer if self._conn is not None else None

    def close(self) -> None:
        """Close the listener and the connection (idempotent)."""
        if self.closed:
            return
        self.closed = True
        if self._server is not None:
            self._server.close()
        if self._conn is not None:
            self._conn.abort("closed")
        self._receiver._tcp.discard(self)

    def _attach(self, conn: _TcpConnection, peer: tuple) -> bool:
        if self.closed:
            return False
        if self.source_host is not None and peer[0] != self.source_host:
            self.rejected += 1
            log.warning("media TCP connection from %s refused: expecting %s", peer[0], self.source_host)
            return False
        old = self._conn
        self._conn = conn
        self.connections += 1
        self.peer = (peer[0], peer[1])
        if old is not None:
            log.info("media TCP %s reconnected from %s:%s", self.mode, peer[0], peer[1])
            old.abort("replaced")
        return True

    def _detach(self, conn: _TcpConnection, reason: str) -> None:
        self.disconnects[reason] = self.disconnects.get(reason, 0) + 1
        self.close_reason = reason
        if self._conn is conn:
            self._conn = None


class _TcpConnection(asyncio.Protocol):
    """One TCP connection feeding a TcpHandle's ingest."""

    __slots__ = ("handle", "framer", "transport", "_reason", "_dropped_mark", "_attached", "_ssrc", "_ssrc_changes")

    def __init__(self, handle: TcpHandle) -> None:
        self.handle = handle
        self.framer = TcpRtpFramer()
        self.transport: asyncio.Transport | None = None
        self._reason: str | None = None
        self._dropped_mark = 0  # framer.dropped_bytes when the last good packet came
        self._attached = False
        self._ssrc = b""  # SSRC bytes of the last packet
        self._ssrc_changes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("?", 0)
        if not self.handle._attach(self, peer):
            self._reason = "rejected"
            transport.abort()
            return
        self._attached = True

    def data_received(self, data: bytes) -> None:
        if self._reason is not None:
            return
        framer = self.framer
        packets = framer.feed(data)
        if packets:
            self._dropped_mark = framer.dropped_bytes
            h = self.handle
            if not h.first_packet.is_set():
                h.first_packet.set()
            h.packets += len(packets)
            feed = h.ingest.feed
            for p in packets:
                ssrc = p[8:12]
                if ssrc != self._ssrc:
                    if self._ssrc:
                        self._ssrc_changes += 1
                    self._ssrc = ssrc
                try:
                    feed(p)
                except Exception:
                    h._receiver._ingest_error(h)
        if (
            framer.resyncs + self._ssrc_changes > TCP_ERROR_LIMIT + framer.packets // 1000
            or framer.dropped_bytes - self._dropped_mark > TCP_GARBAGE_BYTES
        ):
            log.warning(
                "media TCP from %s is not RTP (%d framing errors, %d SSRC changes, %d bytes dropped): "
                "disconnecting",
                self.handle.peer,
                framer.resyncs,
                self._ssrc_changes,
                framer.dropped_bytes,
            )
            self.abort("garbage")

    def eof_received(self) -> bool:
        self._reason = self._reason or "eof"
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._attached:
            return
        reason = self._reason or ("eof" if exc is None else "error")
        if exc is not None and self._reason is None:
            log.info("media TCP from %s lost: %s", self.handle.peer, exc)
        self.handle._detach(self, reason)

    def abort(self, reason: str) -> None:
        if self._reason is None or self._reason == "eof":
            self._reason = reason
        if self.transport is not None:
            self.transport.abort()


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, receiver: MediaReceiver) -> None:
        self.datagram_received = receiver._datagram  # type: ignore[method-assign]

    def error_received(self, exc: Exception) -> None:
        log.debug("media UDP error: %s", exc)


class MediaReceiver:
    """The platform's media sockets; see the module docstring.

    Counters: `udp_packets` (routed to a stream), `invalid` (not RTP v2),
    `rtcp`, `unknown_ssrc` (dropped, with `unknown_ssrcs` = SSRC -> count for
    the first few SSRCs seen), `stale` (SSRC of a recently closed stream),
    `ssrc_fallbacks` (unknown SSRCs routed by source host), `ingest_errors`
    (exceptions raised downstream of an ingest).
    """

    def __init__(
        self,
        host: str = "0.0.0.0",
        *,
        advertised_host: str | None = None,
        udp_port: int = 0,
        udp_rcvbuf: int = UDP_RCVBUF,
    ) -> None:
        self.host = host
        self.advertised_host = advertised_host or _advertise(host)
        self.udp_port = udp_port
        self.udp_rcvbuf_requested = udp_rcvbuf
        self.udp_rcvbuf = 0  # effective size, known after start()
        self._udp: asyncio.DatagramTransport | None = None
        self._by_ssrc: dict[int, UdpHandle] = {}
        self._waiting: dict[str, list[UdpHandle]] = {}  # source host -> handles with no packet yet
        self._retired: dict[int, float] = {}  # SSRC of a closed stream -> when
        self._tcp: set[TcpHandle] = set()
        self.udp_packets = 0
        self.invalid = 0
        self.rtcp = 0
        self.unknown_ssrc = 0
        self.unknown_ssrcs: dict[int, int] = {}
        self.stale = 0
        self.ssrc_fallbacks = 0
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
            self._udp, _ = await loop.create_datagram_endpoint(lambda: _UdpProtocol(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self.udp_port = sock.getsockname()[1]

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
        for h in list(self._tcp):
            h.close()
        self._by_ssrc.clear()
        self._waiting.clear()

    def as_dict(self) -> dict:
        """Counters, JSON-ready."""
        return {
            "udp_port": self.udp_port,
            "udp_rcvbuf": self.udp_rcvbuf,
            "udp_streams": len({id(h) for h in self._by_ssrc.values()}),
            "tcp_streams": len(self._tcp),
            "udp_packets": self.udp_packets,
            "invalid": self.invalid,
            "rtcp": self.rtcp,
            "unknown_ssrc": self.unknown_ssrc,
            "stale": self.stale,
            "ssrc_fallbacks": self.ssrc_fallbacks,
            "ingest_errors": self.ingest_errors,
        }

    # -- UDP --

    def expect_udp(self, ssrc: int, ingest: RtpIngest, *, source_host: str | None = None) -> UdpHandle:
        """Route datagrams with `ssrc` to `ingest`; `source_host` enables the fallback."""
        ssrc &= 0xFFFFFFFF
        if ssrc in self._by_ssrc:
            raise ValueError(f"SSRC {ssrc} is already expected by another stream")
        h = UdpHandle(self, ssrc, ingest, source_host)
        self._by_ssrc[ssrc] = h
        self._retired.pop(ssrc, None)
        if source_host is not None:
            self._waiting.setdefault(source_host, []).append(h)
        return h

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
        h.packets += 1
        self.udp_packets += 1
        try:
            h.ingest.feed(data)
        except Exception:
            self._ingest_error(h)

    def _fallback(self, ssrc: int, addr: tuple) -> UdpHandle | None:
        retired = self._retired.get(ssrc)
        if retired is not None:
            if time.monotonic() - retired < RETIRED_SSRC_S:
                self.stale += 1
                return None
            del self._retired[ssrc]
        waiting = self._waiting.get(addr[0])
        if not waiting:
            self.unknown_ssrc += 1
            seen = self.unknown_ssrcs
            if ssrc in seen:
                seen[ssrc] += 1
            elif len(seen) < _MAX_UNKNOWN_SSRCS:
                seen[ssrc] = 1
                log.info("media UDP from %s:%s with unknown SSRC %d dropped", addr[0], addr[1], ssrc)
            return None
        h = waiting[0]  # the oldest stream of that host still waiting
        self._by_ssrc[ssrc] = h
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

    def _release_udp(self, h: UdpHandle) -> None:
        self._unwait(h)
        now = time.monotonic()
        retired = self._retired
        for ssrc in h.ssrcs:
            if self._by_ssrc.get(ssrc) is h:
                del self._by_ssrc[ssrc]
                retired.pop(ssrc, None)
                retired[ssrc] = now  # re-inserted: the dict stays ordered by time
        while retired:
            oldest = next(iter(retired))
            if now - retired[oldest] < RETIRED_SSRC_S:
                break
            del retired[oldest]

    def _ingest_error(self, h: UdpHandle | TcpHandle) -> None:
        self.ingest_errors += 1
        now = time.monotonic()
        if now - self._error_log_at > 10.0:
            self._error_log_at = now
            log.exception("media consumer of %s stream from %s raised", h.transport, h.peer)

    # -- TCP --

    async def listen_tcp(self, ingest: RtpIngest, *, source_host: str | None = None) -> TcpHandle:
        """Listen on an ephemeral port (`handle.port`) for the device to connect (TCP passive)."""
        loop = asyncio.get_running_loop()
        h = TcpHandle(self, "passive", ingest, source_host)
        server = await loop.create_server(lambda: _TcpConnection(h), self.host, 0, backlog=8, reuse_address=True)
        h._server = server
        h.port = server.sockets[0].getsockname()[1]
        self._tcp.add(h)
        return h

    async def connect_tcp(self, host: str, port: int, ingest: RtpIngest, *, timeout: float = 5.0) -> TcpHandle:
        """Connect to the device's media port (TCP active); raises OSError/TimeoutError."""
        loop = asyncio.get_running_loop()
        h = TcpHandle(self, "active", ingest, None)
        transport, _ = await asyncio.wait_for(loop.create_connection(lambda: _TcpConnection(h), host, port), timeout)
        h.port = transport.get_extra_info("sockname")[1]
        self._tcp.add(h)
        return h
