"""RTP/PS forwarding from a hub `Stream` to one destination (the cascade building block).

PROTOCOL.md 6.4: the PS packets are forwarded as they came, without re-muxing; each
`MediaPacket.ps` is re-packetized with `media.rtp.packetize` under this leg's own SSRC
(the `y=` value negotiated with the upper platform) and its own sequence numbers, keeping
the packet's RTP timestamp, marker on the last packet of each PS packet, every RTP packet
within `mtu` bytes. Over TCP each packet gets the RFC 4571 2-byte length (Annex L).

The forwarder is one hub consumer: it starts at the cached GOP's keyframe, so the upper
platform can decode at once, and if the destination cannot keep up the hub skips it to a
keyframe rather than buffering without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Literal

from .hub import Consumer, Stream, StreamClosed
from .rtp import DEFAULT_MTU, packetize
from .rtp_tcp import frame_rfc4571

__all__ = ["RtpForwarder"]

log = logging.getLogger(__name__)


class _UdpSender(asyncio.DatagramProtocol):
    """Datagram protocol with write flow control (pause_writing / resume_writing)."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self.errors = 0
        self.last_error: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: the receiver may not be up yet; keep sending.
        self.errors += 1
        self.last_error = exc

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._can_write.set()

    async def writable(self) -> None:
        await self._can_write.wait()


class RtpForwarder:
    """Send a stream's PS packets as RTP to host:port over UDP or TCP (RFC 4571).

    `start()` subscribes and, for TCP, connects (raising OSError if it cannot);
    `stop()` ends it. Counters: `packets_sent`, `bytes_sent` (RTP bytes, without the TCP
    length prefix), `frames_sent`. `error` holds the exception that ended it early (e.g.
    the TCP peer closed), `running` tells whether it is sending.
    """

    def __init__(
        self,
        stream: Stream,
        host: str,
        port: int,
        *,
        transport: Literal["udp", "tcp"] = "udp",
        ssrc: int,
        payload_type: int = 96,
        mtu: int = DEFAULT_MTU,
        local_addr: tuple[str, int] | None = None,
    ) -> None:
        if transport not in ("udp", "tcp"):
            raise ValueError(f"transport must be 'udp' or 'tcp', not {transport!r}")
        if not 0 <= ssrc <= 0xFFFFFFFF:
            raise ValueError("ssrc must fit in 32 bits")
        if mtu <= 12:
            raise ValueError(f"mtu {mtu} leaves no room for payload")
        self.stream = stream
        self.host = host
        self.port = port
        self.transport = transport
        self.ssrc = ssrc
        self.payload_type = payload_type
        self.mtu = mtu
        self.local_addr = local_addr
        self.seq = random.randrange(0x10000)  # next sequence number (RFC 3550: random start)
        self.packets_sent = 0
        self.bytes_sent = 0
        self.frames_sent = 0
        self.error: BaseException | None = None
        self._consumer: Consumer | None = None
        self._task: asyncio.Task | None = None
        self._udp: _UdpSender | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None

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
        """Open the socket (TCP: connect), subscribe to the stream and start sending."""
        if self._task is not None:
            raise RuntimeError("forwarder already started")
        loop = asyncio.get_running_loop()
        if self.transport == "udp":
            _, proto = await loop.create_datagram_endpoint(
                _UdpSender, remote_addr=(self.host, self.port), local_addr=self.local_addr
            )
            self._udp = proto
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port, local_addr=self.local_addr)
            self._writer = writer
            # Nothing is expected from the receiver; reading notices when it closes.
            self._reader_task = asyncio.create_task(self._watch_tcp(reader))
        try:
            self._consumer = self.stream.subscribe(f"rtp-forward {self.transport}://{self.host}:{self.port}")
        except StreamClosed:
            self._close_socket()
            raise
        self._task = asyncio.create_task(self._run(), name=f"rtp-forward {self.stream.key}")

    async def stop(self) -> None:
        """Stop sending and close the socket (idempotent)."""
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

    def _close_socket(self) -> None:
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        if self._writer is not None:
            self._writer.close()

    async def _watch_tcp(self, reader: asyncio.StreamReader) -> None:
        try:
            while await reader.read(4096):
                pass  # RTCP or junk from the receiver: ignored
        except ConnectionError:
            pass
        if self._consumer is not None and self.running:
            self.error = self.error or ConnectionResetError("receiver closed the TCP connection")
            self._consumer.close()

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        udp, writer = self._udp, self._writer
        ssrc, pt, mtu = self.ssrc, self.payload_type, self.mtu
        try:
            while True:
                try:
                    pkt = await consumer.get()
                except StreamClosed:
                    break
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
        except (OSError, ConnectionError) as exc:
            self.error = exc
            log.warning("RTP forward of %s to %s:%s ended: %s", self.stream.key, self.host, self.port, exc)
        finally:
            consumer.close()
