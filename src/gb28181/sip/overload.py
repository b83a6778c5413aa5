"""Is the SIP server falling behind? The signal for answering 503 instead of timing out.

After a power cut thousands of devices register within seconds. Past what the server can
process, datagrams wait in the kernel's receive buffer, every device times out and
retransmits, and the retransmissions make it worse. RFC 3261 §21.5.4 has the answer: 503
Service Unavailable with Retry-After, which a device can act on at once.

Falling behind shows in two places, and ``OverloadMonitor`` samples both every ``interval``:
the bytes queued in the kernel for our UDP socket (Linux reports them per socket in
/proc/net/udp, matched by the socket's inode; elsewhere this reads 0), and the event loop's
lag (how late a timer fires). Overload starts when the queue passes ``enter`` of the socket's
buffer or the lag passes ``max_lag``, and ends only when the queue is below ``leave`` and the
lag is normal again, so the state does not flap.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

__all__ = ["OverloadMonitor", "udp_queue_bytes"]

log = logging.getLogger("gb28181.sip")

_PROC_TABLES = ("/proc/net/udp", "/proc/net/udp6")


def udp_queue_bytes(sock: socket.socket) -> int | None:
    """Bytes waiting in the kernel receive queue of ``sock`` (Linux), None where unknown."""
    try:
        inode = str(os.fstat(sock.fileno()).st_ino)
    except OSError:
        return None
    for table in _PROC_TABLES:
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)  # header
                for line in f:
                    fields = line.split()
                    # sl local rem st tx_queue:rx_queue tr:tm retrnsmt uid timeout inode ...
                    if len(fields) > 9 and fields[9] == inode:
                        return int(fields[4].partition(":")[2], 16)
        except (OSError, ValueError):
            continue
    return None


class OverloadMonitor:
    """Samples the receive queue of ``sock`` and the loop's lag; see the module docstring."""

    def __init__(self, sock: socket.socket | None, *, enter: float = 0.25, leave: float = 0.05,
                 max_lag: float = 0.5, interval: float = 0.1) -> None:
        self.sock = sock
        self.enter = enter
        self.leave = leave
        self.max_lag = max_lag
        self.interval = interval
        self.overloaded = False
        self.queue_bytes = 0
        self.lag = 0.0
        #: Times the server went into overload, for metrics and logs.
        self.episodes = 0
        self._rcvbuf = 0
        self._task: asyncio.Task | None = None
        self._supported = sock is not None and udp_queue_bytes(sock) is not None

    def start(self) -> None:
        if self.sock is not None:
            try:
                self._rcvbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            except OSError:
                self._rcvbuf = 0
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sip-overload")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def sample(self, lag: float) -> bool:
        """Take one sample (the lag of the timer that called) and return the new state."""
        self.lag = lag
        queued = udp_queue_bytes(self.sock) if self._supported and self.sock is not None else None
        self.queue_bytes = queued or 0
        fill = self.queue_bytes / self._rcvbuf if self._rcvbuf else 0.0
        if not self.overloaded:
            if fill > self.enter or lag > self.max_lag:
                self.overloaded = True
                self.episodes += 1
                log.warning("SIP overload: %.0f %% of the receive buffer queued, loop %.0f ms late; "
                            "answering new REGISTERs 503 until it drains", 100 * fill, 1000 * lag)
        elif fill < self.leave and lag < self.max_lag / 2:
            self.overloaded = False
            log.warning("SIP overload over")
        return self.overloaded

    async def _run(self) -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(self.interval)
            lag = max(0.0, time.monotonic() - start - self.interval)
            try:
                self.sample(lag)
            except Exception:  # never let monitoring take anything down
                log.exception("overload sample failed")
