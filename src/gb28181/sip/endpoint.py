"""asyncio transports around the sans-IO SIP core: UDP and TCP on one port.

``SipEndpoint`` is deliberately thin. Datagrams and TCP segments are cut and parsed
(``framing``, ``message``), handed to the ``TransactionLayer`` with ``loop.time()`` as now,
and whatever the layer wants sent goes out on the matching socket. One ``call_at`` handle
drives all transaction timers. New requests reach the application through ``on_request``, a
plain callable that may answer at once with ``respond`` (the registrar does, which keeps a
REGISTER on one trip through the event loop) or start a task and answer later.

Responses go back to the packet source (Via ``rport`` semantics, PROTOCOL.md §0): GB/T 28181
devices are routinely behind NAT, and the source address is the only one that works.
Broken input never escapes: a request we can make sense of gets a 400 naming the fault, the
rest is counted and dropped.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from .dialog import Dialog, DialogError
from .framing import FramingError, SipStreamFramer
from .message import (
    MAX_MESSAGE_SIZE,
    SipParseError,
    SipRequest,
    SipResponse,
    make_response,
    new_branch,
    parse_message,
)
from .netroute import LocalAddresses
from .overload import Overload, QueueProbe
from .transaction import (
    Addr,
    CancelReceived,
    ClientTransaction,
    RequestReceived,
    ResponseReceived,
    ServerTransaction,
    StrayResponse,
    TransactionLayer,
    TransactionTimedOut,
)

__all__ = ["EndpointStats", "SipEndpoint", "SipTimeoutError", "SipTransportError"]

log = logging.getLogger("gb28181.sip")

#: Linux's SO_RCVBUFFORCE (asm-generic/socket.h), which the socket module does not name.
_SO_RCVBUFFORCE = 33


class SipTimeoutError(TimeoutError):
    """No final response arrived in time (Timer B/F, i.e. a 408 of our own)."""


class SipTransportError(ConnectionError):
    """The request could not be sent (TCP connect refused, connection lost)."""


@dataclass(slots=True)
class EndpointStats:
    """Counters the metrics module exports."""

    received: int = 0
    sent: int = 0
    parse_errors: int = 0
    bad_requests_answered: int = 0
    tcp_connections: int = 0
    tcp_refused: int = 0


class _Pending:
    __slots__ = ("future", "on_provisional")

    def __init__(self, future: asyncio.Future, on_provisional: Callable | None) -> None:
        self.future = future
        self.on_provisional = on_provisional


class SipEndpoint:
    """One SIP endpoint (server or simulator fleet) bound on UDP and TCP at one port."""

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 5060,
        *,
        advertised_host: str | None = None,
        on_request: Callable[[RequestReceived], Any] | None = None,
        on_cancel: Callable[[CancelReceived], Any] | None = None,
        on_server_timeout: Callable[[ServerTransaction], Any] | None = None,
        udp: bool = True,
        tcp: bool = True,
        max_message_size: int = MAX_MESSAGE_SIZE,
        max_tcp_connections: int = 20_000,
        t1: float = 0.5,
        outgoing: Callable[[bytes], bytes] | None = None,
        overload_delay: float = 0.0,
        stateless: Callable[[SipRequest], bool] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        #: Our address per peer (Via, Contact): see ``netroute``.
        self.addresses = LocalAddresses(host, advertised_host)
        self.on_request = on_request
        #: Requests this says yes to skip the transaction layer and reach ``on_request`` with
        #: ``transaction=None``, to be answered with ``send_stateless`` (RFC 3261 §8.2.7): the
        #: first REGISTER of a registration, whose 401 is as good answered twice as once. Not
        #: while requests queue for longer than T1/2 (see ``_receive``).
        self.stateless = stateless
        self.on_cancel = on_cancel
        self.on_server_timeout = on_server_timeout
        #: Called with (response, address, transport) for a 2xx to one of our INVITEs that no
        #: caller waits for: a retransmission (our ACK was lost), or an answer that came after
        #: we gave up or CANCELled. The dialog's owner ACKs it, and BYEs a session it does
        #: not want (RFC 3261 §13.2.2.4). Without a handler, a 2xx that no caller received is
        #: ACKed and BYE'd here, and the retransmissions of one a caller did receive are left
        #: to that caller.
        self.on_invite_2xx: Callable[[SipResponse, Addr, str], Any] | None = None
        self.enable_udp = udp
        self.enable_tcp = tcp
        self.max_message_size = max_message_size
        self.max_tcp_connections = max_tcp_connections
        self.layer = TransactionLayer(t1=t1)
        #: Applied to every datagram or TCP message just before it is sent (retransmissions
        #: included): the simulator uses it to reproduce byte-level vendor quirks.
        self.outgoing = outgoing
        self.stats = EndpointStats()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp_server: asyncio.AbstractServer | None = None
        self._tcp_conns: dict[Addr, _SipTcpProtocol] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when: float | None = None
        self._closing = False
        self._error_log_at = 0.0
        self._tasks: set[asyncio.Task] = set()
        #: How long requests wait in the UDP receive queue (see ``overload``), and the verdict.
        self.queue_probe = QueueProbe()
        self.overload = Overload(enter=overload_delay)
        self.loop_lag = 0.0

    # -- life cycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        ephemeral = not self.port
        for attempt in range(20):
            try:
                await self._bind()
                if self._udp is not None and self.overload.enter > 0:
                    self._loop_spawn(self._probe_queue())
                return
            except OSError as exc:
                # Port 0: the kernel picked a UDP port whose TCP twin is taken; pick again.
                if not (ephemeral and self.enable_udp and self.enable_tcp
                        and exc.errno == errno.EADDRINUSE and attempt < 19):
                    raise
                if self._udp is not None:
                    self._udp.close()
                    self._udp = None
                self.port = 0

    async def _bind(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        if self.enable_udp:
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _SipUdpProtocol(self), local_addr=(self.host, self.port),
                reuse_port=False)
            sock = self._udp.get_extra_info("socket")
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:  # a registrar takes bursts of thousands of datagrams: give it room
                    sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
                except OSError:
                    pass
            if sys.platform.startswith("linux"):
                try:
                    # Beyond net.core.rmem_max (4 MiB on many hosts, a quarter of a second of a
                    # storm's REGISTERs) where the process may (CAP_NET_ADMIN): a datagram the
                    # kernel drops during a commit or a collection comes back as a
                    # retransmission half a second later, on top of the load that made it late.
                    sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 16 * 1024 * 1024)
                except OSError:
                    pass
            self.port = sock.getsockname()[1]
        if self.enable_tcp:
            self._tcp_server = await loop.create_server(
                lambda: _SipTcpProtocol(self, None), self.host, self.port, reuse_address=True,
                backlog=1024)
            if not self.port:
                self.port = self._tcp_server.sockets[0].getsockname()[1]

    @property
    def overloaded(self) -> bool:
        """Whether requests wait too long in the receive queue (or the loop runs late)."""
        return self.overload.active

    async def _probe_queue(self, interval: float = 0.1) -> None:
        """Send a probe through our own UDP receive queue every ``interval`` and judge the
        load from its delay and from this loop's own lag."""
        assert self._loop is not None and self._udp is not None
        host = self.host if self.host not in ("0.0.0.0", "::", "") else (
            "::1" if ":" in self.host else "127.0.0.1")
        own = (host, self.port)
        while not self._closing:
            started = self._loop.time()
            await asyncio.sleep(interval)
            now = self._loop.time()
            self.loop_lag = max(0.0, now - started - interval)
            self.overload.update(self.queue_probe.delay(now), self.loop_lag)
            if self._udp is not None and not self._udp.is_closing():
                self._udp.sendto(self.queue_probe.make(now), own)

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._timer is not None:
            self._timer.cancel()
        for txn in list(self.layer.client.values()):
            pending = txn.context
            if isinstance(pending, _Pending) and not pending.future.done():
                pending.future.set_exception(SipTransportError("endpoint closed"))
        if self._udp is not None:
            self._udp.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        for conn in list(self._tcp_conns.values()):
            conn.close()
        if self._tcp_server is not None:
            await self._tcp_server.wait_closed()

    # -- helpers for building requests --------------------------------------------------------
    @property
    def advertised_host(self) -> str:
        """Our address for a peer on the default route (see ``addresses.for_peer``)."""
        return self.addresses.default

    def via(self, transport: str = "udp", branch: str | None = None, *, peer: str | None = None) -> str:
        """A Via for a request to ``peer`` (a host), with our address as that peer reaches it."""
        return (f"SIP/2.0/{transport.upper()} {self.addresses.for_peer(peer)}:{self.port}"
                f";rport;branch={branch or new_branch()}")

    def contact(self, user: str, transport: str = "udp", *, peer: str | None = None) -> str:
        """Our Contact URI for ``peer``; over TCP it says so (RFC 3261 §19.1.1), so that
        requests to it come over TCP too."""
        param = ";transport=tcp" if transport == "tcp" else ""
        return f"sip:{user}@{self.addresses.for_peer(peer)}:{self.port}{param}"

    def has_connection(self, addr: Addr) -> bool:
        """Whether a TCP connection with ``addr`` is open (to reuse for requests to it)."""
        return addr in self._tcp_conns

    @property
    def now(self) -> float:
        return self._loop.time() if self._loop is not None else time.monotonic()

    # -- sending ---------------------------------------------------------------------------
    async def request(self, request: SipRequest, addr: Addr, transport: str = "udp", *,
                      timeout: float | None = None,
                      on_provisional: Callable[[SipResponse], Any] | None = None,
                      fallback: Addr | None = None) -> SipResponse:
        """Send ``request`` in a client transaction and wait for its final response.

        Over TCP an open connection with ``addr`` is reused (a device registered over TCP keeps
        one); without one a connection is made to ``fallback`` if given (the device's Contact:
        ``addr`` is then its old connection's ephemeral port), else to ``addr``.

        Raises ``SipTimeoutError`` when the transaction times out (or ``timeout`` passes) and
        ``SipTransportError`` when a TCP connection cannot be made. An INVITE given up on this
        way stays in its transaction until Timer B, so that a late answer is still ACKed
        (and a late 2xx handed to ``on_invite_2xx``); the caller CANCELs it.
        """
        if self._loop is None:
            raise RuntimeError("SipEndpoint.start() has not been called")
        if transport == "tcp" and addr not in self._tcp_conns:
            if fallback is not None and fallback != addr:
                addr = fallback
            if addr not in self._tcp_conns:
                await self._connect(addr)
        future = self._loop.create_future()
        txn = self.layer.send_request(request, addr, transport, self.now)
        txn.context = _Pending(future, on_provisional)
        self._flush()
        try:
            if timeout is None:
                return await future
            return await asyncio.wait_for(future, timeout)
        except SipTimeoutError:
            raise  # Timer B/F already said so (SipTimeoutError is itself a TimeoutError)
        except TimeoutError:
            if request.method != "INVITE":
                self.layer.fail(txn)
            raise SipTimeoutError(f"no final response to {request.method} from "
                                  f"{addr[0]}:{addr[1]} within {timeout} s") from None

    def respond(self, txn: ServerTransaction, response: SipResponse) -> None:
        self.layer.send_response(txn, response, self.now)
        self._flush()

    def respond_bytes(self, txn: ServerTransaction, status: int, data: bytes) -> None:
        """``respond`` with an answer already in wire form (``message.response_bytes``)."""
        self.layer.send_response_bytes(txn, status, data, self.now)
        self._flush()

    def send_stateless(self, message: SipRequest | SipResponse | bytes, addr: Addr,
                       transport: str = "udp") -> None:
        data = message if isinstance(message, bytes) else message.serialize()
        self.layer.send_stateless(data, addr, transport)
        self._flush()

    # -- internals -------------------------------------------------------------------------
    async def _connect(self, addr: Addr) -> None:
        assert self._loop is not None
        try:
            await self._loop.create_connection(lambda: _SipTcpProtocol(self, addr), addr[0], addr[1])
        except OSError as exc:
            raise SipTransportError(f"cannot open TCP connection to {addr[0]}:{addr[1]}: {exc}") from exc

    def flush(self) -> None:
        """Send what the transaction layer has queued (after ``layer.send_stateless``)."""
        self._flush()

    def _flush(self) -> None:
        out = self.layer.datagrams_to_send()
        for data, transport, addr in out:
            self.stats.sent += 1
            if self.outgoing is not None:
                data = self.outgoing(data)
            if transport == "udp":
                if self._udp is not None:
                    self._udp.sendto(data, addr)
            else:
                conn = self._tcp_conns.get(addr)
                if conn is not None:
                    conn.write(data)
        self._schedule()

    def _schedule(self) -> None:
        if self._timer_when is not None and self._timer_when <= self.layer.armed_min:
            return  # nothing armed since that needs an earlier wake-up
        when = self.layer.get_timer()
        if when is None or self._closing or self._loop is None:
            return
        if self._timer_when is not None and self._timer_when <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_when = when
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = None
        self._dispatch(self.layer.handle_timer(self.now))
        self._flush()

    def _dispatch(self, events: list) -> None:
        for ev in events:
            try:
                if isinstance(ev, RequestReceived):
                    if self.on_request is not None:
                        self.on_request(ev)
                    elif ev.transaction is not None:
                        self.respond(ev.transaction, make_response(ev.request, 501))
                elif isinstance(ev, ResponseReceived):
                    self._on_response(ev)
                elif isinstance(ev, TransactionTimedOut):
                    txn = ev.transaction
                    if isinstance(txn, ClientTransaction):
                        self._complete(txn, None)
                    elif self.on_server_timeout is not None:
                        self.on_server_timeout(txn)
                elif isinstance(ev, CancelReceived):
                    if self.on_cancel is not None:
                        self.on_cancel(ev)
                    else:
                        # Only a proceeding INVITE is cancelled, and it holds its request until answered.
                        assert ev.transaction.request is not None
                        self.respond(ev.transaction, make_response(ev.transaction.request, 487))
                elif isinstance(ev, StrayResponse):
                    resp = ev.response
                    if resp.cseq[1] == "INVITE" and 200 <= resp.status < 300:
                        self._late_invite_2xx(resp, ev.addr, ev.transport)
            except Exception:  # an application bug must not take the transport down
                log.exception("error handling %r", ev)

    def _on_response(self, ev: ResponseReceived) -> None:
        resp = ev.response
        txn = ev.transaction
        if resp.status < 200:
            pending = txn.context
            if isinstance(pending, _Pending) and pending.on_provisional is not None:
                pending.on_provisional(resp)
            return
        self._complete(txn, resp)

    def _complete(self, txn: ClientTransaction, resp: SipResponse | None) -> None:
        ctx = txn.context
        if isinstance(ctx, _Pending):
            if ctx.future.done():
                # A retransmitted 2xx (our ACK was lost), or one after we gave up.
                if resp is not None and txn.method == "INVITE" and 200 <= resp.status < 300:
                    future = ctx.future
                    delivered = not future.cancelled() and future.exception() is None
                    self._late_invite_2xx(resp, txn.addr, txn.transport, owned=delivered)
            else:
                if resp is None:
                    ctx.future.set_exception(SipTimeoutError(
                        f"no final response to {txn.method} from {txn.addr[0]}:{txn.addr[1]}"))
                else:
                    ctx.future.set_result(resp)

    def _late_invite_2xx(self, resp: SipResponse, addr: Addr, transport: str, *,
                         owned: bool = False) -> None:
        """``owned``: the caller got a 2xx of this INVITE, and ACKing is its business."""
        if self.on_invite_2xx is not None:
            self.on_invite_2xx(resp, addr, transport)
            return
        if owned:
            return
        # Nobody owns the dialog: accept it and end it at once (RFC 3261 §13.2.2.4, §15).
        try:
            dialog = Dialog.from_response(resp)
        except DialogError:
            return
        via = self.via(transport, peer=addr[0])
        self.layer.send_stateless(dialog.ack(resp.cseq[0], via=via).serialize(), addr, transport)
        self._flush()
        bye = dialog.request("BYE", via=self.via(transport, peer=addr[0]))
        self._loop_spawn(self._quiet_request(bye, addr, transport))

    async def _quiet_request(self, request: SipRequest, addr: Addr, transport: str) -> None:
        try:
            await self.request(request, addr, transport, timeout=10.0)
        except (SipTimeoutError, SipTransportError):
            pass

    def _loop_spawn(self, coro: Any) -> None:
        if self._loop is None or self._closing:
            coro.close()
            return
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _receive(self, data: bytes, addr: Addr, transport: str) -> None:
        self.stats.received += 1
        try:
            msg = parse_message(data, max_size=self.max_message_size, stream=transport != "udp")
        except SipParseError as exc:
            self._bad_message(exc, addr, transport)
            return
        if isinstance(msg, SipRequest):
            _mark_received(msg, addr)
            # Stateless only while requests are answered well within T1: a device retransmits
            # after T1, and under a backlog each retransmission answered anew would add load
            # to load; a transaction absorbs them instead.
            if (self.stateless is not None and self.queue_probe.last_delay < self.layer.t1 / 2
                    and self.stateless(msg)):
                self._dispatch([RequestReceived(msg, None, addr, transport)])
                self._flush()
                return
        self._dispatch(self.layer.receive(msg, addr, transport, self.now))
        self._flush()

    def _bad_message(self, exc: SipParseError, addr: Addr, transport: str) -> None:
        self.stats.parse_errors += 1
        now = time.monotonic()
        if now - self._error_log_at > 1.0:  # a flood of garbage must not flood the log too
            self._error_log_at = now
            log.warning("unparsable SIP message from %s:%s/%s: %s", addr[0], addr[1], transport, exc)
        partial = exc.message
        if isinstance(partial, SipRequest) and partial.method != "ACK" and all(
                partial.headers.get(h) for h in ("via", "from", "to", "call-id", "cseq")):
            reason = str(exc).replace("\r", " ").replace("\n", " ")[:120]
            try:
                resp = make_response(partial, 400, f"Bad Request: {reason}")
                self.layer.send_stateless(resp.serialize(), addr, transport)
                self.stats.bad_requests_answered += 1
                self._flush()
            except (KeyError, ValueError):
                pass


def _mark_received(request: SipRequest, addr: Addr) -> None:
    """Fill ``received``/``rport`` into the top Via (RFC 3261 §18.2.1, RFC 3581) for our answers."""
    vias = request.headers["via"]
    top = vias[0]
    if ";rport" in top:
        pos = top.find(";rport")
        end = pos + 6
        if end >= len(top) or top[end] == ";":
            vias[0] = f"{top[:end]}={addr[1]};received={addr[0]}{top[end:]}"
    elif ";received=" not in top:
        vias[0] = f"{top};received={addr[0]}"


class _SipUdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, endpoint: SipEndpoint) -> None:
        self.endpoint = endpoint

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if len(data) <= 4 and not data.strip():
            return  # CRLF keep-alive
        if not data[0]:  # no SIP message starts with a zero byte: our queue probe, or junk
            ep = self.endpoint
            if ep.queue_probe.receive(data, ep.now):
                return
        # uvloop and asyncio give IPv4 sources as (host, port) already; IPv6 ones carry two more.
        self.endpoint._receive(data, addr if len(addr) == 2 else (addr[0], addr[1]), "udp")

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from a device that went away: nothing to do, the
        # transaction will time out and the device go offline in time.
        log.debug("UDP error: %s", exc)


class _SipTcpProtocol(asyncio.Protocol):
    def __init__(self, endpoint: SipEndpoint, peer: Addr | None) -> None:
        self.endpoint = endpoint
        self.peer = peer
        self.framer = SipStreamFramer(endpoint.max_message_size)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's TCPTransport is not an asyncio.Transport subclass.
        self.transport = tcp = cast(asyncio.Transport, transport)
        ep = self.endpoint
        peername = transport.get_extra_info("peername")
        self.peer = (peername[0], peername[1])
        if len(ep._tcp_conns) >= ep.max_tcp_connections:
            ep.stats.tcp_refused += 1
            log.warning("refusing TCP connection from %s:%s: %d connections open (sip.max_tcp_connections)",
                        *self.peer, len(ep._tcp_conns))
            tcp.abort()
            return
        ep._tcp_conns[self.peer] = self
        ep.stats.tcp_connections += 1

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        try:
            messages = self.framer.feed(data)
        except FramingError as exc:
            self.endpoint._bad_message(exc, self.peer, "tcp")
            self.close()
            return
        for raw in messages:
            self.endpoint._receive(raw, self.peer, "tcp")

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.endpoint._tcp_conns.get(self.peer) is self:
            del self.endpoint._tcp_conns[self.peer]
