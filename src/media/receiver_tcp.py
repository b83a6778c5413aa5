"""Media receiver, TCP half: RTP over TCP into `media.ingest.RtpIngest` (Annex L).

`media.receiver.MediaReceiver` owns this module's objects and is the only way in
(`listen_tcp`, `connect_tcp`). Framing (RFC 4571 or `$`-interleaved, bounded
buffer) is the sans-IO `media.rtp_tcp.TcpRtpFramer`; the SSRC claims that tie
connections to streams are the receiver's (`_claim`, `_fallback_refusal`).

- Active (we connect): the connection is the stream's from the start.
- Passive (we listen, PROTOCOL.md 6.3): the device connects after the ACK, and
  not necessarily from its signalling address (an NVR's media NIC, a lower
  platform's media server), so any address is accepted. `TcpListeners` gives
  each stream a port: an ephemeral listener of its own, or with a port range a
  shared one, the port with the fewest streams still waiting for their
  connection (opened lazily, ports in use skipped, closed with its last stream).
  A new connection is pending until its first RTP packet: bounded in time
  (`pending_timeout`), in number (the oldest is dropped past `pending_max`) and
  in memory (the framer holds at most one frame). Its SSRC is looked up among
  the stream SSRCs of that port (offered, answered, learned); an unknown SSRC
  goes to the port's one stream still waiting, if there is exactly one, which
  is then flagged `ssrc_mismatch` (PROTOCOL.md 5.2: never drop RTP over a
  mismatch). A guess needs two packets with that SSRC, so that a stray
  connection's random bytes cannot take a stream. Anything else is closed and
  counted in `TcpListeners.unbound` by reason. The packets read while pending
  are the stream's first. A reconnect (same SSRC) replaces the old connection.
- Garbage: TCP neither loses nor corrupts bytes, so a connection that keeps
  failing to frame, or keeps changing SSRC, is not RTP and is aborted.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING

from .ingest import RtpIngest
from .rtp_tcp import TcpRtpFramer

if TYPE_CHECKING:
    from .receiver import MediaReceiver

__all__ = ["TcpHandle", "TcpListeners", "TCP_PENDING_S", "TCP_PENDING_MAX", "listen_socket"]

log = logging.getLogger("media.receiver")

# TCP garbage limits. A peer that sends RTP has no framing errors at all and keeps
# one SSRC; random bytes pass the framer's checks about once per resync but with a
# new "SSRC" each time. A connection is given up after this many framing errors plus
# SSRC changes (and one more per 1000 packets), or this many bytes dropped in a row.
TCP_ERROR_LIMIT = 8
TCP_GARBAGE_BYTES = 128 << 10
# A passive connection with no RTP packet after this long is closed; so is the
# oldest pending one when this many wait at once.
TCP_PENDING_S = 10.0
TCP_PENDING_MAX = 256
_BACKLOG = 64

_unpack_ssrc = struct.Struct("!I").unpack_from


class TcpHandle:
    """One stream over TCP, passive (we listen) or active (we connect).

    `port` is the listening port (passive) or our local port (active); `peer`
    the device's address of the current or last connection. `ssrc` is the
    offered SSRC (None: none given) and `ssrcs` every SSRC of the stream
    (offered, answered through `add_ssrc`, learned from a mismatched device).
    `waiting` is true for a passive stream until a connection is tied to it.
    `disconnects` counts why connections ended ("eof", "garbage", "replaced",
    "error", "closed"); `close_reason` is the last one.
    """

    transport = "tcp"

    __slots__ = (
        "_receiver",
        "mode",
        "ingest",
        "ssrc",
        "ssrcs",
        "source_host",
        "first_packet",
        "port",
        "peer",
        "packets",
        "connections",
        "disconnects",
        "close_reason",
        "closed",
        "waiting",
        "_listener",
        "_conn",
    )

    def __init__(
        self, receiver: MediaReceiver, mode: str, ingest: RtpIngest, ssrc: int | None, source_host: str | None
    ) -> None:
        self._receiver = receiver
        self.mode = mode  # "passive" | "active"
        self.ingest = ingest
        self.ssrc = ssrc
        self.ssrcs: list[int] = []
        self.source_host = source_host  # the device's signalling host: informational
        self.first_packet = asyncio.Event()
        self.port = 0
        self.peer: tuple[str, int] | None = None
        self.packets = 0
        self.connections = 0
        self.disconnects: dict[str, int] = {}
        self.close_reason: str | None = None
        self.closed = False
        self.waiting = mode == "passive"  # for its first connection
        self._listener: _Listener | None = None
        self._conn: _TcpConnection | None = None

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def framer(self) -> TcpRtpFramer | None:
        """The framer of the current connection (its counters say how framing went)."""
        return self._conn.framer if self._conn is not None else None

    def add_ssrc(self, ssrc: int) -> bool:
        """Take the SSRC of the device's answer (`y=`) as this stream's too.

        False (and nothing changes) if another live stream claimed it.
        """
        return self._receiver._claim(self, ssrc, answer=True)

    def close(self) -> None:
        """Close the connection and release the port and the SSRCs (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self.waiting = False
        if self._listener is not None:
            self._receiver._tcp_listeners.remove(self)
        if self._conn is not None:
            self._conn.abort("closed")
        self._receiver._release(self)

    def _attach(self, conn: _TcpConnection) -> None:
        old = self._conn
        self._conn = conn
        self.connections += 1
        self.waiting = False
        self.peer = conn.peer
        if old is not None:
            log.info("media TCP %s reconnected from %s:%s", self.mode, *conn.peer)
            old.abort("replaced")

    def _detach(self, conn: _TcpConnection, reason: str) -> None:
        self.disconnects[reason] = self.disconnects.get(reason, 0) + 1
        self.close_reason = reason
        if self._conn is conn:
            self._conn = None


class _TcpConnection(asyncio.Protocol):
    """One TCP connection: pending on a listener until tied, then feeding a TcpHandle's ingest."""

    __slots__ = (
        "handle",
        "listener",
        "framer",
        "transport",
        "peer",
        "_reason",
        "_dropped_mark",
        "_ssrc",
        "_ssrc_changes",
        "_held",
        "_timer",
    )

    def __init__(self, handle: TcpHandle | None = None, listener: _Listener | None = None) -> None:
        self.handle = handle
        self.listener = listener
        self.framer = TcpRtpFramer()
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("?", 0)
        self._reason: str | None = None
        self._dropped_mark = 0  # framer.dropped_bytes when the last good packet came
        self._ssrc = b""  # SSRC bytes of the last packet
        self._ssrc_changes = 0
        self._held: list[bytes] = []  # one packet of a pending connection, awaiting a second
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's TCPTransport is not an asyncio.Transport subclass.
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer = (peer[0], peer[1])
        if self.handle is not None:
            self.handle._attach(self)
        else:
            assert self.listener is not None
            self.listener.pool._pend(self)

    def data_received(self, data: bytes) -> None:
        if self._reason is not None:
            return
        framer = self.framer
        packets = framer.feed(data)
        if packets and self.handle is None:
            packets = self.listener.pool._tie(self, packets)  # type: ignore[union-attr]
        if packets and self.handle is not None:
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
        if self._reason is None and (
            framer.resyncs + self._ssrc_changes > TCP_ERROR_LIMIT + framer.packets // 1000
            or framer.dropped_bytes - self._dropped_mark > TCP_GARBAGE_BYTES
        ):
            log.warning(
                "media TCP from %s:%s is not RTP (%d framing errors, %d SSRC changes, %d bytes dropped): "
                "disconnecting",
                *self.peer,
                framer.resyncs,
                self._ssrc_changes,
                framer.dropped_bytes,
            )
            self.abort("garbage")

    def eof_received(self) -> bool:
        self._reason = self._reason or "eof"
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        reason = self._reason or ("eof" if exc is None else "error")
        if self.handle is not None:
            if exc is not None and self._reason is None:
                log.info("media TCP from %s:%s lost: %s", *self.peer, exc)
            self.handle._detach(self, reason)
        elif self.listener is not None:
            self.listener.pool._unbound(self, reason)

    def abort(self, reason: str) -> None:
        if self._reason is None or self._reason == "eof":
            self._reason = reason
        if self.listener is not None and self.handle is None:
            self.listener.pool._unpend(self)
        if self.transport is not None:
            self.transport.abort()

    def _expire(self) -> None:
        self._timer = None
        if self.handle is None and self._reason is None:
            self.abort("timeout")


class _Listener:
    """A listening port and the passive streams given it."""

    __slots__ = ("pool", "port", "sock", "server", "streams", "pending", "ready", "closed")

    def __init__(self, pool: TcpListeners, sock: socket.socket) -> None:
        self.pool = pool
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.server: asyncio.AbstractServer | None = None
        self.streams: list[TcpHandle] = []  # oldest first
        self.pending: dict[_TcpConnection, None] = {}
        self.ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.closed = False

    def waiting(self) -> int:
        return sum(1 for h in self.streams if h.waiting)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.server is not None:
            self.server.close()
        elif self.ready.done():  # never served
            self.sock.close()
        # else `TcpListeners.add` is serving it right now, and closes it when done
        for conn in list(self.pending):
            conn.abort("closed")


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A non-blocking TCP socket listening on host:port (0: an ephemeral port); OSError as bind raises it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if os.name != "nt":  # rebind over TIME_WAIT; a live listener still gets EADDRINUSE
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class TcpListeners:
    """The passive-TCP ports of a MediaReceiver and their pending connections.

    `port_range` None: one ephemeral port per stream. `unbound` counts the
    connections closed before they were tied to a stream, by reason:
    "unmatched" (unknown SSRC, not exactly one stream waiting), "claimed" (the
    SSRC of a stream on another port or transport), "stale" (of a stream closed
    moments ago), "timeout", "overflow", "garbage", "eof", "error", "closed"
    (the port's last stream went away). `ssrc_fallbacks` counts connections
    tied to the one waiting stream despite an unknown SSRC.
    """

    def __init__(
        self,
        receiver: MediaReceiver,
        host: str,
        port_range: tuple[int, int] | None,
        pending_timeout: float,
        pending_max: int,
    ) -> None:
        if port_range is not None:
            lo, hi = port_range
            if not 1 <= lo <= hi <= 65535:
                raise ValueError(f"bad TCP port range {lo}-{hi}")
        self._receiver = receiver
        self.host = host
        self.port_range = port_range
        self.pending_timeout = pending_timeout
        self.pending_max = max(1, pending_max)
        self.listeners: dict[int, _Listener] = {}
        self._pending: dict[_TcpConnection, None] = {}  # every listener's, oldest first
        self.unbound: dict[str, int] = {}
        self.ssrc_fallbacks = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    # -- ports --

    async def add(self, h: TcpHandle) -> None:
        """Give passive stream `h` a port (`h.port`) and listen on it."""
        listener, fresh = self._choose()
        listener.streams.append(h)
        h._listener = listener
        h.port = listener.port
        if fresh:
            try:
                listener.server = await asyncio.get_running_loop().create_server(
                    lambda: _TcpConnection(listener=listener), sock=listener.sock
                )
            except BaseException:
                listener.ready.set_result(False)
                self._drop(listener)
                listener.sock.close()
                raise
            listener.ready.set_result(True)
            if listener.closed:  # its streams went away meanwhile
                listener.server.close()
        elif not await asyncio.shield(listener.ready):
            raise OSError(f"media TCP listener on port {listener.port} failed")

    def _choose(self) -> tuple[_Listener, bool]:
        """The listener for a new stream, and whether it was just bound."""
        if self.port_range is None:
            return self._bind(0), True
        best = min(
            self.listeners.values(), key=lambda lst: (lst.waiting(), len(lst.streams), lst.port), default=None
        )
        if best is None or best.waiting():
            lo, hi = self.port_range
            for port in range(lo, hi + 1):
                if port in self.listeners:
                    continue
                try:
                    return self._bind(port), True
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE:
                        raise
        if best is None:
            lo, hi = self.port_range
            raise OSError(errno.EADDRINUSE, f"no TCP port free for media in {lo}-{hi}")
        return best, False

    def _bind(self, port: int) -> _Listener:
        listener = _Listener(self, listen_socket(self.host, port, _BACKLOG))
        self.listeners[listener.port] = listener
        return listener

    def remove(self, h: TcpHandle) -> None:
        listener = h._listener
        h._listener = None
        if listener is None:
            return
        if h in listener.streams:
            listener.streams.remove(h)
        if not listener.streams:
            self._drop(listener)

    def _drop(self, listener: _Listener) -> None:
        if self.listeners.get(listener.port) is listener:
            del self.listeners[listener.port]
        listener.close()

    def close(self) -> None:
        for listener in list(self.listeners.values()):
            self._drop(listener)

    def as_dict(self) -> dict[int, int]:
        """Port -> streams on it."""
        return {port: len(lst.streams) for port, lst in self.listeners.items()}

    # -- pending connections --

    def _pend(self, conn: _TcpConnection) -> None:
        listener = conn.listener
        assert listener is not None
        if listener.closed:
            conn.abort("closed")
            return
        while len(self._pending) >= self.pending_max:
            next(iter(self._pending)).abort("overflow")
        self._pending[conn] = None
        listener.pending[conn] = None
        conn._timer = asyncio.get_running_loop().call_later(self.pending_timeout, conn._expire)

    def _unpend(self, conn: _TcpConnection) -> None:
        self._pending.pop(conn, None)
        if conn.listener is not None:
            conn.listener.pending.pop(conn, None)
        if conn._timer is not None:
            conn._timer.cancel()
            conn._timer = None

    def _unbound(self, conn: _TcpConnection, reason: str) -> None:
        self._unpend(conn)
        self.unbound[reason] = self.unbound.get(reason, 0) + 1

    def _tie(self, conn: _TcpConnection, packets: list[bytes]) -> list[bytes]:
        """Tie a pending connection by the SSRC of its first packets.

        Returns the packets to feed the stream (all of them, the held one
        first), or [] if the connection is still pending or was closed.
        """
        if conn._held:
            packets = conn._held + packets
            conn._held = []
        listener = conn.listener
        assert listener is not None
        i = 0
        while i < len(packets):
            ssrc = _unpack_ssrc(packets[i], 8)[0]
            for h in listener.streams:
                if ssrc in h.ssrcs:
                    self._bind_conn(conn, h, ssrc, guessed=False)
                    return packets[i:] if i else packets
            if i + 1 == len(packets):
                conn._held = [packets[i]]  # one packet is no evidence yet: wait for the next
                return []
            if packets[i + 1][8:12] != packets[i][8:12]:
                conn._ssrc_changes += 1  # counts towards the garbage limit
                i += 1
                continue
            reason = self._receiver._fallback_refusal(ssrc)
            if reason is None:
                waiting = [h for h in listener.streams if h.waiting]
                if len(waiting) == 1:
                    self._bind_conn(conn, waiting[0], ssrc, guessed=True)
                    return packets[i:] if i else packets
                reason = "unmatched"
            log.info(
                "media TCP from %s:%s to port %d with SSRC %d closed: %s (%d streams waiting)",
                *conn.peer,
                listener.port,
                ssrc,
                reason,
                listener.waiting(),
            )
            conn.abort(reason)
            return []
        return []

    def _bind_conn(self, conn: _TcpConnection, h: TcpHandle, ssrc: int, *, guessed: bool) -> None:
        self._unpend(conn)
        conn.handle = h
        if guessed:
            h.ssrcs.append(ssrc)  # a reconnect of this device is then recognised
            if h.ssrc is not None:
                h.ingest.stats.ssrc_mismatch = True
                self.ssrc_fallbacks += 1
                log.info(
                    "media TCP from %s:%s with SSRC %d tied to the stream offered SSRC %d on port %d "
                    "(device ignored y=)",
                    *conn.peer,
                    ssrc,
                    h.ssrc,
                    h.port,
                )
        h._attach(conn)
