"""RTP/PS forwarding from a hub `Stream` to one destination (the cascade building block).

GB/T 28181-2016 Annex C.1: the PS packets are forwarded as they came, without re-muxing;
each `MediaPacket.ps` is re-packetized with `media.rtp.packetize` under this leg's own SSRC
(the `y=` value negotiated with the upper platform, Annex F) and its own sequence numbers,
keeping the packet's RTP timestamp, marker on the last packet of each PS packet, every RTP
packet within `mtu` bytes. Over TCP each packet gets the RFC 4571 2-byte length (Annex L).

Three ways to reach the upper platform, from its SDP offer:

- ``udp``: send datagrams to its m= address.
- ``tcp`` (it offers RFC 4145 ``a=setup:passive``): we connect to its m= address.
- ``tcp-passive`` (it offers ``a=setup:active``): we listen, our port goes into the 200
  answer, and the first connection that arrives gets the stream; later ones are refused.

The forwarder is one hub consumer: it starts at the cached GOP's keyframe, so the upper
platform can decode at once (a passive forwarder subscribes only once its peer is connected,
for that reason), and if the destination cannot keep up the hub skips it to a keyframe
rather than buffering without bound. A forwarder that ends by itself (peer gone, nobody
connected, destination unreachable, stream closed) tells `on_end` why; `stop()` does not.
Its neighbours: `media.hub` (the source), `media.rtp`/`media.rtp_tcp` (the codecs) and
`media.node` (the `forward`/`unforward` commands).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
import time
from collections.abc import Callable
from typing import Literal

from .hub import Consumer, Stream, StreamClosed
from .receiver_tcp import listen_socket
from .rtp import DEFAULT_MTU, packetize
from .rtp_tcp import frame_rfc4571

__all__ = ["RtpForwarder", "UnreachableWatch", "FORWARD_TRANSPORTS"]

log = logging.getLogger(__name__)

FORWARD_TRANSPORTS = ("udp", "tcp", "tcp-passive")
ForwardTransport = Literal["udp", "tcp", "tcp-passive"]

# An ICMP error streak ends after this long without an error: routers rate-limit ICMP
# (RFC 1812 4.3.2.8; Linux about one a second per peer), so a gap of a second or two
# between errors does not mean the destination came back.
UDP_QUIET_S = 3.0


class UnreachableWatch:
    """Whether a UDP destination is gone, from the times of its ICMP errors (sans-IO).

    `error(now)` is called for each error and says True once errors have kept coming for
    `after` seconds, with no gap of `quiet` seconds between two of them (a quiet gap means
    the packets got through for a while: the streak starts again).
    """

    __slots__ = ("after", "quiet", "first", "last")

    def __init__(self, after: float, quiet: float = UDP_QUIET_S) -> None:
        self.after = after
        self.quiet = quiet
        self.first: float | None = None  # first error of the current streak
        self.last: float | None = None

    def error(self, now: float) -> bool:
        if self.last is None or self.first is None or now - self.last > self.quiet:
            self.first = now
        self.last = now
        return now - self.first >= self.after


class _UdpSender(asyncio.DatagramProtocol):
    """Datagram protocol with write flow control (pause_writing / resume_writing)."""

    def __init__(self, on_error: Callable[[Exception], None]) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._on_error = on_error
        self.errors = 0
        self.last_error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the receiver may not be up yet, so one error
        # does not end the forward; a long streak of them does (`UnreachableWatch`).
        self.errors += 1
        self.last_error = exc
        self._on_error(exc)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._can_write.set()

    async def writable(self) -> None:
        await self._can_write.wait()


def _listen_socket(host: str, port: int, port_range: tuple[int, int] | None) -> socket.socket:
    """A listening TCP socket on host, on the first free port of port_range (else `port`)."""
    ports = range(port_range[0], port_range[1] + 1) if port_range is not None else (port,)
    for p in ports:
        try:
            return listen_socket(host, p, 4)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or p == ports[-1]:
                raise
    raise AssertionError("unreachable")


class RtpForwarder:
    """Send a stream's PS packets as RTP to host:port over UDP or TCP (RFC 4571).

    `transport`: "udp", "tcp" (we connect to host:port) or "tcp-passive" (we listen on
    `local_addr`'s host, on a port of `port_range` or else `local_addr`'s port or an
    ephemeral one; `port` then becomes the bound port and `host` is only the peer we
    expect, for the logs: the first connection from anywhere is taken, RFC 4145 leaves
    the address to the active side). A passive forwarder that nobody connects to within
    `accept_timeout` seconds ends; a UDP one ends when ICMP errors keep coming for
    `unreachable_after` seconds.

    `start()` opens the socket (TCP: connects, raising OSError if it cannot) and starts;
    `stop()` ends it. `on_end(forwarder, reason)` is called once if it ends by itself.
    Counters: `packets_sent`, `bytes_sent` (RTP bytes, without the TCP length prefix),
    `frames_sent`. `error` holds the exception that ended it early, `peer` the TCP peer's
    address, `running` tells whether it is sending or waiting for its peer.
    """

    def __init__(
        self,
        stream: Stream,
        host: str,
        port: int,
        *,
        transport: ForwardTransport = "udp",
        ssrc: int,
        payload_type: int = 96,
        mtu: int = DEFAULT_MTU,
        local_addr: tuple[str, int] | None = None,
        port_range: tuple[int, int] | None = None,
        accept_timeout: float = 20.0,
        unreachable_after: float = 10.0,
        on_end: Callable[[RtpForwarder, str], None] | None = None,
    ) -> None:
        if transport not in FORWARD_TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(FORWARD_TRANSPORTS)}, not {transport!r}")
        if not 0 <= ssrc <= 0xFFFFFFFF:
            raise ValueError("ssrc must fit in 32 bits")
        if mtu <= 12:
            raise ValueError(f"mtu {mtu} leaves no room for payload")
        if port_range is not None and not 1 <= port_range[0] <= port_range[1] <= 65535:
            raise ValueError(f"bad TCP port range {port_range[0]}-{port_range[1]}")
        if accept_timeout <= 0 or unreachable_after <= 0:
            raise ValueError("accept_timeout and unreachable_after must be positive")
        self.stream = stream
        self.host = host
        self.port = port
        self.transport = transport
        self.ssrc = ssrc
        self.payload_type = payload_type
        self.mtu = mtu
        self.local_addr = local_addr
        self.port_range = port_range
        self.accept_timeout = accept_timeout
        self.on_end = on_end
        self.seq = random.randrange(0x10000)  # next sequence number (RFC 3550: random start)
        self.packets_sent = 0
        self.bytes_sent = 0
        self.frames_sent = 0
        self.error: BaseException | None = None
        self.peer: tuple[str, int] | None = None
        self._unreachable = UnreachableWatch(unreachable_after)
        self._stopping = False
        self._consumer: Consumer | None = None
        self._task: asyncio.Task | None = None
        self._udp: _UdpSender | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._server: asyncio.AbstractServer | None = None
        self._accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None

    def __repr__(self) -> str:
        return (f"RtpForwarder({self.stream.key!r} -> {self.transport}://{self.host}:{self.port}, "
                f"ssrc={self.ssrc}, packets={self.packets_sent})")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def consumer(self) -> Consumer | None:
        return self._consumer

    async def start(self) -> None:
        """Open the socket (TCP: connect or listen) and start sending (passive: once connected)."""
        if self._task is not None:
            raise RuntimeError("forwarder already started")
        loop = asyncio.get_running_loop()
        if self.transport == "tcp-passive":
            host, port = self.local_addr or ("::" if ":" in self.host else "0.0.0.0", 0)
            sock = _listen_socket(host, port, self.port_range)
            self._accepted = loop.create_future()
            try:
                self._server = await asyncio.start_server(self._accept, sock=sock)
            except BaseException:
                sock.close()
                raise
            self.port = sock.getsockname()[1]
            self._task = asyncio.create_task(self._run(), name=f"rtp-forward {self.stream.key}")
            return
        if self.transport == "udp":
            _, proto = await loop.create_datagram_endpoint(
                lambda: _UdpSender(self._udp_error), remote_addr=(self.host, self.port),
                local_addr=self.local_addr,
            )
            self._udp = proto
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port, local_addr=self.local_addr)
            self._connected(reader, writer)
        try:
            self._subscribe()
        except StreamClosed:
            self._close_socket()
            raise
        self._task = asyncio.create_task(self._run(), name=f"rtp-forward {self.stream.key}")

    async def stop(self) -> None:
        """Stop sending and close the socket (idempotent); `on_end` is not called."""
        self._stopping = True
        if self._consumer is not None:
            self._consumer.close()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self._reader_task
        writer = self._writer
        self._close_socket()
        if writer is not None:
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def wait(self) -> None:
        """Wait until sending ends (stream closed, stop() or an error)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    def _subscribe(self) -> None:
        self._consumer = self.stream.subscribe(f"rtp-forward {self.transport}://{self.host}:{self.port}")

    def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        peer = writer.get_extra_info("peername")
        self.peer = (peer[0], peer[1]) if peer else None
        # Nothing is expected from the receiver; reading notices when it closes.
        self._reader_task = asyncio.create_task(self._watch_tcp(reader))

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection to our passive port: the first one gets the stream, the rest are closed."""
        fut = self._accepted
        if fut is None or fut.done():
            writer.close()
            return
        fut.set_result((reader, writer))
        if self._server is not None:
            self._server.close()  # one peer per forward (Annex L: one RTP stream per connection)

    def _close_socket(self) -> None:
        if self._server is not None:
            self._server.close()
        accepted = self._accepted
        if accepted is not None:
            if not accepted.done():
                accepted.cancel()  # a connection still on its way is closed by `_accept`
            elif not accepted.cancelled() and accepted.exception() is None:
                accepted.result()[1].close()  # accepted but maybe never taken over
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        if self._writer is not None:
            self._writer.close()

    def _end(self, exc: BaseException) -> None:
        """End the forward from a callback (peer gone, destination unreachable)."""
        if not self.running:
            return
        self.error = self.error or exc
        if self._consumer is not None:
            self._consumer.close()  # the pending get() raises StreamClosed: _run ends

    def _udp_error(self, exc: Exception) -> None:
        if self._unreachable.error(time.monotonic()):
            self._end(ConnectionRefusedError(
                f"{self.host}:{self.port} unreachable: ICMP errors for {self._unreachable.after:g} s ({exc})"))

    async def _watch_tcp(self, reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(4096):
                pass  # RTCP or junk from the receiver: ignored
        except ConnectionError:
            pass
        self._end(ConnectionResetError("receiver closed the TCP connection"))

    async def _run(self) -> None:
        reason = ""
        try:
            if self._accepted is not None:
                try:
                    reader, writer = await asyncio.wait_for(self._accepted, self.accept_timeout)
                except TimeoutError:
                    raise TimeoutError(f"no TCP connection to port {self.port} "
                                       f"within {self.accept_timeout:g} s") from None
                self._connected(reader, writer)
                self._subscribe()
            await self._send()
            reason = f"stream closed: {self.stream.close_reason}" if self.stream.closed else "consumer closed"
        except StreamClosed as exc:  # closed before the passive peer came
            reason = f"stream closed: {exc}"
        except OSError as exc:  # ConnectionError and TimeoutError among them
            self.error = self.error or exc
        finally:
            if self._consumer is not None:
                self._consumer.close()
        if self.error is not None:
            reason = str(self.error) or type(self.error).__name__
            log.warning("RTP forward of %s to %s:%s ended: %s", self.stream.key, self.host, self.port, reason)
        if not self._stopping:
            self._close_socket()
            if self._reader_task is not None:
                self._reader_task.cancel()
            if self.on_end is not None:
                try:
                    self.on_end(self, reason)
                except Exception:
                    log.exception("on_end callback of the RTP forward of %s", self.stream.key)

    async def _send(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        udp, writer = self._udp, self._writer
        ssrc, pt, mtu = self.ssrc, self.payload_type, self.mtu
        while True:
            try:
                pkt = await consumer.get()
            except StreamClosed:
                return
            rtp, self.seq = packetize(pkt.ps, ssrc=ssrc, seq=self.seq, timestamp=pkt.timestamp,
                                      payload_type=pt, mtu=mtu)
            if not rtp:
                continue
            n = sum(map(len, rtp))
            if udp is not None:
                transport = udp.transport
                if transport is None or transport.is_closing():
                    raise ConnectionError("UDP socket closed")
                for p in rtp:
                    transport.sendto(p)
                await udp.writable()
            else:
                assert writer is not None
                writer.write(b"".join(map(frame_rfc4571, rtp)))
                await writer.drain()
            self.packets_sent += len(rtp)
            self.bytes_sent += n
            self.frames_sent += 1
            # Let other tasks run between frames even while catching up on a GOP burst.
            await asyncio.sleep(0)
