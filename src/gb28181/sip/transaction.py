"""RFC 3261 §17 transactions as a sans-IO state machine (with the RFC 6026 corrections).

Theory of operation. ``TransactionLayer`` owns every client and server transaction. Parsed
messages go in through ``receive(msg, addr, transport, now)``; requests we originate through
``send_request`` and our answers through ``send_response``. Bytes to put on the wire come
out of ``datagrams_to_send()`` as ``(data, transport, addr)``; what happened comes out as
events (small dataclasses below). Time is always passed in: ``get_timer()`` says when the
layer next needs ``handle_timer(now)``. Nothing here sleeps or touches a socket, so every
timer is testable in microseconds.

States and timers (T1 = 500 ms, T2 = 4 s, T4 = 5 s by default):

==================  =========================================================================
client non-INVITE   trying -E(retransmit, T1 doubling to T2)-> trying ... -F(64·T1)-> timed out
                    1xx -> proceeding; final -> completed -K(T4; 0 on TCP)-> terminated
client INVITE       calling -A(retransmit, doubling)-> ... -B(64·T1)-> timed-out -D(64·T1)->
                    terminated; 1xx -> proceeding; 2xx -> accepted -M(64·T1)-> terminated (2xx
                    retransmits and a 2xx after Timer B go to the TU, which ACKs); 3xx-6xx ->
                    ACK sent here (also after Timer B), completed -D(32 s; 0 on TCP)-> terminated
server non-INVITE   trying; TU 1xx -> proceeding; TU final -> completed -J(64·T1; 0 on TCP)->
                    terminated. A retransmitted request is answered with the last response.
server INVITE       proceeding; TU 2xx -> accepted: 2xx retransmitted (G) until the ACK (new
                    branch; matched by Call-ID and CSeq) -L(64·T1)-> terminated. TU 3xx-6xx ->
                    completed -G-> retransmit until ACK -> confirmed -I(T4)-> terminated;
                    no ACK by H(64·T1) -> timed out.
==================  =========================================================================

Server transactions are keyed on branch + From tag + Call-ID + CSeq + method rather than on the
branch alone: GB/T 28181 devices reuse CSeq 20 for every MESSAGE and some reuse branches, so
the Call-ID and CSeq are what really tell a retransmission from a new request (PROTOCOL.md §8).

Timers with a fixed duration (B, D, F, H, I, J, K, L, M) sit in one FIFO per duration, which is
already sorted, so the tens of thousands of completed transactions a busy registrar holds cost
an append each; only the short retransmission timers (A, E, G) use a heap.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

from .message import SipRequest, SipResponse, make_response

__all__ = [
    "Addr",
    "CancelReceived",
    "ClientTransaction",
    "RequestReceived",
    "ResponseReceived",
    "ServerTransaction",
    "StrayResponse",
    "TransactionLayer",
    "TransactionTimedOut",
]

Addr = tuple[str, int]

T1 = 0.5
T2 = 4.0
T4 = 5.0


# -- events ------------------------------------------------------------------------------

@dataclass(slots=True)
class RequestReceived:
    """A new request; ``transaction`` is None for an ACK to a 2xx (that ACK is its own thing)."""

    request: SipRequest
    transaction: ServerTransaction | None
    addr: Addr
    transport: str


@dataclass(slots=True)
class ResponseReceived:
    """A response for one of our client transactions (provisional or final)."""

    response: SipResponse
    transaction: ClientTransaction


@dataclass(slots=True)
class TransactionTimedOut:
    """Timer B/F (no final response) or H/L (no ACK) expired; for a client this means 408."""

    transaction: ClientTransaction | ServerTransaction


@dataclass(slots=True)
class CancelReceived:
    """A CANCEL matched a pending INVITE; the layer has already answered the CANCEL with 200."""

    transaction: ServerTransaction
    request: SipRequest


@dataclass(slots=True)
class StrayResponse:
    """A response that matched no client transaction (late, or not ours)."""

    response: SipResponse
    addr: Addr
    transport: str = "udp"


Event = RequestReceived | ResponseReceived | TransactionTimedOut | CancelReceived | StrayResponse


# -- transactions ----------------------------------------------------------------------------

class ClientTransaction:
    """A request we sent, waiting for its final response."""

    __slots__ = ("key", "request", "method", "addr", "transport", "reliable", "state",
                 "data", "interval", "timers", "last_response", "ack", "context")

    def __init__(self, key: tuple, request: SipRequest, addr: Addr, transport: str) -> None:
        self.key = key
        self.request = request
        self.method = request.method
        self.addr = addr
        self.transport = transport
        self.reliable = transport != "udp"
        self.state = "calling" if request.method == "INVITE" else "trying"
        self.data = request.serialize()
        self.interval = T1
        self.timers: dict[str, float] = {}
        self.last_response: SipResponse | None = None
        self.ack: bytes | None = None
        #: Anything the transaction user wants to hang on it (a future, a callback).
        self.context: Any = None

    @property
    def branch(self) -> str:
        return self.key[0]

    def __repr__(self) -> str:
        return f"<ClientTransaction {self.method} {self.state} {self.branch}>"


class ServerTransaction:
    """A request we received and must answer."""

    __slots__ = ("key", "request", "method", "addr", "transport", "reliable", "state",
                 "response", "interval", "timers", "ack_key", "context")

    def __init__(self, key: tuple, request: SipRequest, addr: Addr, transport: str) -> None:
        self.key = key
        self.request: SipRequest | None = request
        self.method = request.method
        self.addr = addr
        self.transport = transport
        self.reliable = transport != "udp"
        self.state = "proceeding" if request.method == "INVITE" else "trying"
        self.response: bytes | None = None
        self.interval = T1
        self.timers: dict[str, float] = {}
        self.ack_key: tuple | None = None
        self.context: Any = None

    @property
    def answered(self) -> bool:
        return self.state not in ("trying", "proceeding")

    def __repr__(self) -> str:
        return f"<ServerTransaction {self.method} {self.state}>"


def server_key(request: SipRequest) -> tuple:
    """Match key of a request; an ACK or CANCEL gets the key of the INVITE it refers to,
    with the method telling CANCEL apart."""
    via = request.headers["via"][0]
    branch = ""
    idx = via.find("branch=")
    if idx != -1:
        end = via.find(";", idx)
        branch = via[idx + 7:end if end != -1 else None].strip()
    num = request.headers["cseq"][0].partition(" ")[0].strip()
    method = request.method
    if method == "ACK":
        method = "INVITE"
    return (branch, request.from_tag or "", request.call_id, num, method)


# -- the layer ---------------------------------------------------------------------------------

class TransactionLayer:
    """All transactions of one SIP endpoint; see the module docstring."""

    def __init__(self, *, t1: float = T1, t2: float = T2, t4: float = T4) -> None:
        self.t1, self.t2, self.t4 = t1, t2, t4
        self.client: dict[tuple, ClientTransaction] = {}
        self.server: dict[tuple, ServerTransaction] = {}
        #: Accepted server INVITEs by (Call-ID, CSeq number): the ACK to a 2xx has a new branch.
        self._accepted: dict[tuple, ServerTransaction] = {}
        self._out: list[tuple[bytes, str, Addr]] = []
        self._heap: list[tuple[float, int, Any, str]] = []
        self._fifos: dict[tuple[str, float], deque[tuple[float, Any, str]]] = {}
        self._seq = 0
        self.armed_min = math.inf
        #: New non-INVITE server transactions, checked for an answer in datagrams_to_send().
        self._fresh: list[tuple[ServerTransaction, float]] = []
        self.stats = {"client_started": 0, "server_started": 0, "retransmissions": 0,
                      "absorbed": 0, "timeouts": 0, "stray": 0}

    # -- output -----------------------------------------------------------------------------
    def datagrams_to_send(self) -> list[tuple[bytes, str, Addr]]:
        """Bytes to send, in order, as (data, transport, addr); the list is handed over.

        Call it after every ``receive`` (and the TU's reaction to it): it is also when a new
        non-INVITE request the TU has not answered yet gets its clean-up timer.
        """
        if self._fresh:
            # Most requests are answered before the caller gets here (a registrar answers at
            # once); only the others need Timer Z, so only they pay for arming it.
            for txn, arrived in self._fresh:
                if txn.state == "trying":
                    self._arm(txn, "Z", 64 * self.t1, arrived)
            self._fresh.clear()
        out, self._out = self._out, []
        return out

    def send_stateless(self, data: bytes, addr: Addr, transport: str) -> None:
        """Queue bytes outside any transaction (an ACK to a 2xx, a 2xx retransmission)."""
        self._out.append((data, transport, addr))

    # -- timers -----------------------------------------------------------------------------
    def _arm(self, txn: Any, name: str, delay: float, now: float) -> None:
        when = now + delay
        txn.timers[name] = when
        if when < self.armed_min:
            self.armed_min = when
        if name in ("A", "E", "G"):
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, txn, name))
        else:
            # Same name, same duration for every transaction of a kind: a FIFO stays sorted.
            fifo = self._fifos.get((name, delay))
            if fifo is None:
                fifo = self._fifos[(name, delay)] = deque()
            fifo.append((when, txn, name))

    def get_timer(self) -> float | None:
        """The earliest time ``handle_timer`` has work to do, or None.

        ``armed_min`` is the earliest timer armed since the last call: a caller that already
        has a wake-up at or before it need not call this (a registrar arms two timers per
        request, and this walks every timer queue).
        """
        self.armed_min = math.inf
        # Drop cancelled timers at the heads first (handle_timer would skip them anyway), so
        # the caller is not woken for a timer that no longer exists.
        heap = self._heap
        while heap and heap[0][2].timers.get(heap[0][3]) != heap[0][0]:
            heapq.heappop(heap)
        best = heap[0][0] if heap else None
        for fifo in self._fifos.values():
            while fifo and fifo[0][1].timers.get(fifo[0][2]) != fifo[0][0]:
                fifo.popleft()
            if fifo and (best is None or fifo[0][0] < best):
                best = fifo[0][0]
        return best

    def handle_timer(self, now: float) -> list[Event]:
        events: list[Event] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            when, _, txn, name = heapq.heappop(heap)
            if txn.timers.get(name) == when:
                del txn.timers[name]
                self._fire(txn, name, now, events)
        for fifo in list(self._fifos.values()):  # firing may arm a timer of a new kind
            while fifo and fifo[0][0] <= now:
                when, txn, name = fifo.popleft()
                if txn.timers.get(name) == when:
                    del txn.timers[name]
                    self._fire(txn, name, now, events)
        return events

    def _fire(self, txn: Any, name: str, now: float, events: list[Event]) -> None:
        if isinstance(txn, ClientTransaction):
            if name in ("A", "E"):
                if txn.state in ("calling", "trying", "proceeding"):
                    self._out.append((txn.data, txn.transport, txn.addr))
                    self.stats["retransmissions"] += 1
                    if name == "A":
                        txn.interval *= 2
                    else:
                        txn.interval = self.t2 if txn.state == "proceeding" else min(
                            txn.interval * 2, self.t2)
                    self._arm(txn, name, txn.interval, now)
            elif name in ("B", "F"):
                if txn.state in ("calling", "trying", "proceeding"):
                    self.stats["timeouts"] += 1
                    events.append(TransactionTimedOut(txn))
                    if name == "B":
                        # Kept a while longer: a device that answers after Timer B still gets
                        # its non-2xx ACKed here, and its 2xx reaches the TU, which must ACK and
                        # then BYE a session nobody waits for (RFC 3261 §13.2.2.4).
                        txn.state = "timed-out"
                        txn.timers.clear()
                        self._arm(txn, "D", 64 * self.t1, now)
                    else:
                        self._terminate_client(txn)
            else:  # D, K, M
                self._terminate_client(txn)
            return
        # server transaction
        if name == "G":
            if txn.state in ("completed", "accepted") and txn.response is not None:
                self._out.append((txn.response, txn.transport, txn.addr))
                self.stats["retransmissions"] += 1
                txn.interval = min(txn.interval * 2, self.t2)
                self._arm(txn, "G", txn.interval, now)
        elif name == "H":
            if txn.state == "completed":
                self._terminate_server(txn)
                self.stats["timeouts"] += 1
                events.append(TransactionTimedOut(txn))
        elif name == "L":
            acked = txn.state != "accepted"
            self._terminate_server(txn)
            if not acked:
                self.stats["timeouts"] += 1
                events.append(TransactionTimedOut(txn))
        elif name == "Z":
            # The TU never answered a non-INVITE request: forget it rather than leak it.
            if txn.state in ("trying", "proceeding"):
                self._terminate_server(txn)
        else:  # I, J
            self._terminate_server(txn)

    def _terminate_client(self, txn: ClientTransaction) -> None:
        txn.state = "terminated"
        txn.timers.clear()
        self.client.pop(txn.key, None)

    def _terminate_server(self, txn: ServerTransaction) -> None:
        txn.state = "terminated"
        txn.timers.clear()
        self.server.pop(txn.key, None)
        if txn.ack_key is not None:
            self._accepted.pop(txn.ack_key, None)

    # -- client side ------------------------------------------------------------------------
    def send_request(self, request: SipRequest, addr: Addr, transport: str,
                     now: float) -> ClientTransaction:
        """Start a client transaction; the request must carry its Via with a fresh branch."""
        if request.method == "ACK":
            raise ValueError("an ACK is not a transaction; use send_stateless")
        via = request.headers["via"][0]
        idx = via.find("branch=")
        if idx == -1:
            raise ValueError("the request's top Via has no branch parameter")
        end = via.find(";", idx)
        branch = via[idx + 7:end if end != -1 else None].strip()
        key = (branch, request.method)
        if key in self.client:
            raise ValueError(f"a client transaction with branch {branch} is already running")
        txn = ClientTransaction(key, request, addr, transport)
        txn.interval = self.t1  # Timers A/E double from this layer's T1, not the default
        self.client[key] = txn
        self.stats["client_started"] += 1
        self._out.append((txn.data, transport, addr))
        if not txn.reliable:
            self._arm(txn, "A" if request.method == "INVITE" else "E", self.t1, now)
        self._arm(txn, "B" if request.method == "INVITE" else "F", 64 * self.t1, now)
        return txn

    def fail(self, txn: ClientTransaction | ServerTransaction) -> None:
        """The transport could not carry this transaction (connection refused or lost)."""
        if isinstance(txn, ClientTransaction):
            self._terminate_client(txn)
        else:
            self._terminate_server(txn)

    def _receive_response(self, resp: SipResponse, addr: Addr, transport: str,
                          now: float) -> list[Event]:
        via = resp.headers["via"][0]
        idx = via.find("branch=")
        branch = ""
        if idx != -1:
            end = via.find(";", idx)
            branch = via[idx + 7:end if end != -1 else None].strip()
        method = resp.cseq[1]
        txn = self.client.get((branch, method))
        if txn is None:
            self.stats["stray"] += 1
            return [StrayResponse(resp, addr, transport)]
        status = resp.status
        state = txn.state
        if txn.method == "INVITE":
            if status < 200:
                if state in ("calling", "proceeding"):
                    txn.state = "proceeding"
                    txn.timers.pop("A", None)
                    return [ResponseReceived(resp, txn)]
                return []
            if status < 300:
                if state in ("calling", "proceeding", "timed-out"):
                    txn.state = "accepted"
                    txn.timers.clear()
                    txn.last_response = resp
                    self._arm(txn, "M", 64 * self.t1, now)
                    return [ResponseReceived(resp, txn)]
                if state == "accepted":
                    return [ResponseReceived(resp, txn)]  # the TU re-sends its ACK
                return []
            if state == "timed-out":
                # Too late to matter, but the device retransmits it until ACKed.
                txn.ack = _ack_for(txn.request, resp).serialize()
                self._out.append((txn.ack, txn.transport, txn.addr))
                txn.state = "completed"
                return []
            if state in ("calling", "proceeding"):
                txn.state = "completed"
                txn.timers.clear()
                txn.last_response = resp
                txn.ack = _ack_for(txn.request, resp).serialize()
                self._out.append((txn.ack, txn.transport, txn.addr))
                if txn.reliable:
                    self._terminate_client(txn)
                else:
                    self._arm(txn, "D", 32.0, now)
                return [ResponseReceived(resp, txn)]
            if state == "completed" and txn.ack is not None:
                self._out.append((txn.ack, txn.transport, txn.addr))
                self.stats["absorbed"] += 1
            return []
        # non-INVITE
        if status < 200:
            if state in ("trying", "proceeding"):
                txn.state = "proceeding"
                return [ResponseReceived(resp, txn)]
            return []
        if state in ("trying", "proceeding"):
            txn.state = "completed"
            txn.timers.clear()
            txn.last_response = resp
            if txn.reliable:
                self._terminate_client(txn)
            else:
                self._arm(txn, "K", self.t4, now)
            return [ResponseReceived(resp, txn)]
        self.stats["absorbed"] += 1
        return []

    # -- server side ------------------------------------------------------------------------
    def receive(self, msg: SipRequest | SipResponse, addr: Addr, transport: str,
                now: float) -> list[Event]:
        """Feed one parsed message that arrived from ``addr`` over ``transport``."""
        if isinstance(msg, SipResponse):
            return self._receive_response(msg, addr, transport, now)
        key = server_key(msg)
        method = msg.method
        if method == "ACK":
            txn = self.server.get(key)
            if txn is not None and txn.state == "completed":
                txn.state = "confirmed"
                txn.timers.clear()
                if txn.reliable:
                    self._terminate_server(txn)
                else:
                    self._arm(txn, "I", self.t4, now)
                return []
            if txn is not None and txn.state == "confirmed":
                return []  # retransmitted ACK
            accepted = self._accepted.get((msg.call_id, key[3]))
            if accepted is not None and accepted.state == "accepted":
                # The ACK to our 2xx: stop retransmitting it; the TU wants to see it.
                accepted.state = "confirmed"
                accepted.timers.pop("G", None)
            return [RequestReceived(msg, None, addr, transport)]
        txn = self.server.get(key)
        if txn is not None:
            # A retransmission: answer with what we last said, never tell the TU twice.
            self.stats["absorbed"] += 1
            if txn.response is not None and txn.state != "confirmed":
                self._out.append((txn.response, txn.transport, addr))
            return []
        txn = ServerTransaction(key, msg, addr, transport)
        txn.interval = self.t1  # Timer G doubles from this layer's T1, not the default
        self.server[key] = txn
        self.stats["server_started"] += 1
        if method == "CANCEL":
            return self._receive_cancel(txn, msg, now)
        if method != "INVITE":
            self._fresh.append((txn, now))
        return [RequestReceived(msg, txn, addr, transport)]

    def _receive_cancel(self, txn: ServerTransaction, cancel: SipRequest,
                        now: float) -> list[Event]:
        invite_key = (*txn.key[:4], "INVITE")
        invite = self.server.get(invite_key)
        if invite is None:
            self.send_response(txn, make_response(cancel, 481), now)
            return []
        self.send_response(txn, make_response(cancel, 200), now)
        if invite.state != "proceeding":
            return []  # too late: the INVITE already has its final answer
        return [CancelReceived(invite, cancel)]

    def send_response(self, txn: ServerTransaction, response: SipResponse, now: float) -> None:
        """Send the TU's answer within ``txn`` and move the state machine on."""
        self.send_response_bytes(txn, response.status, response.serialize(), now)

    def send_response_bytes(self, txn: ServerTransaction, status: int, data: bytes,
                            now: float) -> None:
        """``send_response`` for an answer already in wire form (``message.response_bytes``)."""
        if txn.state in ("completed", "confirmed", "terminated", "accepted"):
            raise ValueError(f"{txn!r} already has its final response")
        self._out.append((data, txn.transport, txn.addr))
        txn.response = data
        if status < 200:
            if txn.state == "trying":
                txn.state = "proceeding"
            return
        txn.timers.clear()
        request = txn.request
        txn.request = None  # a completed transaction only needs its answer; keep memory low
        if txn.method == "INVITE":
            if status < 300:
                txn.state = "accepted"
                assert request is not None
                txn.ack_key = (request.call_id, txn.key[3])
                self._accepted[txn.ack_key] = txn
                if not txn.reliable:
                    self._arm(txn, "G", self.t1, now)
                self._arm(txn, "L", 64 * self.t1, now)
            else:
                txn.state = "completed"
                if not txn.reliable:
                    self._arm(txn, "G", self.t1, now)
                self._arm(txn, "H", 64 * self.t1, now)
            return
        txn.state = "completed"
        if txn.reliable:
            self._terminate_server(txn)
        else:
            self._arm(txn, "J", 64 * self.t1, now)


def _ack_for(invite: SipRequest, resp: SipResponse) -> SipRequest:
    """The ACK for a non-2xx final response (RFC 3261 §17.1.1.3): same branch, To from the response."""
    h = invite.headers
    headers: dict[str, list[str]] = {
        "via": [h["via"][0]],
        "from": list(h["from"]),
        "to": list(resp.headers["to"]),
        "call-id": list(h["call-id"]),
        "cseq": [f"{invite.cseq[0]} ACK"],
        "max-forwards": ["70"],
    }
    if "route" in h:
        headers["route"] = list(h["route"])
    return SipRequest("ACK", invite.uri, headers)
