"""Is the SIP server falling behind? The signal for answering 503 instead of timing out.

After a power cut thousands of devices register within seconds. Past what the server can
process, datagrams wait in the kernel's receive queue; once they wait longer than a device's
retransmission timers, every device retransmits (which makes it worse) and then gives up.
RFC 3261 §21.5.4 has the answer: 503 Service Unavailable with Retry-After, which a device can
act on at once. But a queue that drains in a second is no reason to refuse anyone, so what
matters is how long a request *waits*, not how full the queue is.

``QueueProbe`` measures exactly that: every ``interval`` the endpoint sends a small marked
datagram to its own UDP socket; it queues behind whatever is waiting, and when it comes out
its age is the queue's delay (a probe that has not come out yet counts with its age so far,
so a queue that drops datagrams reads as slow too). The probe starts with a zero byte, which
no SIP message does, and carries a random token, so nobody else can fake one. ``Overload``
turns the delay (and the event loop's lag) into a state with hysteresis: overloaded once the
delay passes ``enter`` seconds, normal again only below ``leave``, so it does not flap.
Both are sans-IO: the endpoint passes the bytes and the time.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import OrderedDict

__all__ = ["Overload", "QueueProbe"]

log = logging.getLogger("gb28181.sip")

_MAGIC = b"\x00GBQ"
_SEQ = struct.Struct("!I")
_MAX_OUTSTANDING = 64


class QueueProbe:
    """Marked datagrams through our own receive queue; see the module docstring."""

    def __init__(self) -> None:
        self._prefix = _MAGIC + os.urandom(8)
        self._seq = 0
        self._sent: OrderedDict[int, float] = OrderedDict()  # seq -> when sent, oldest first
        self.last_delay = 0.0

    def make(self, now: float) -> bytes:
        """The next probe datagram to send to ourselves."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        self._sent[self._seq] = now
        while len(self._sent) > _MAX_OUTSTANDING:
            self._sent.popitem(last=False)
        return self._prefix + _SEQ.pack(self._seq)

    def receive(self, data: bytes, now: float) -> bool:
        """True when ``data`` is one of our probes (and then it has been taken into account)."""
        if len(data) != len(self._prefix) + 4 or not data.startswith(self._prefix):
            return False
        seq = _SEQ.unpack_from(data, len(self._prefix))[0]
        sent = self._sent.get(seq)
        if sent is not None:
            self.last_delay = now - sent
            # Older probes that never came out were dropped by a full queue: forget them too.
            while self._sent:
                first, _ = next(iter(self._sent.items()))
                del self._sent[first]
                if first == seq:
                    break
        return True

    def delay(self, now: float) -> float:
        """The queue's delay now: the last probe's, or the age of one still inside if older."""
        if self._sent:
            oldest = next(iter(self._sent.values()))
            return max(self.last_delay, now - oldest)
        return self.last_delay


class Overload:
    """Overloaded or not, from the queue delay and the loop lag, with hysteresis."""

    def __init__(self, *, enter: float = 2.0, leave: float = 0.5, max_lag: float = 1.0) -> None:
        self.enter = enter
        self.leave = leave
        self.max_lag = max_lag
        self.active = False
        #: Times the server went into overload.
        self.episodes = 0

    def update(self, queue_delay: float, loop_lag: float) -> bool:
        if self.enter <= 0:
            return False
        if not self.active:
            if queue_delay > self.enter or loop_lag > self.max_lag:
                self.active = True
                self.episodes += 1
                log.warning("SIP overload: requests wait %.1f s in the receive queue, the loop runs "
                            "%.0f ms late; new registrations get 503 until it drains",
                            queue_delay, 1000 * loop_lag)
        elif queue_delay < self.leave and loop_lag < self.max_lag / 2:
            self.active = False
            log.warning("SIP overload over: requests wait %.2f s", queue_delay)
        return self.active
