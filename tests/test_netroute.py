"""Our address as each peer sees it (Via, Contact, SDP c=), and the probe through our own
receive queue that tells overload from a queue that merely has something in it."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from gb28181.sip.endpoint import SipEndpoint
from gb28181.sip.netroute import LocalAddresses, is_loopback, route_source
from gb28181.sip.overload import Overload, QueueProbe

from .conftest import wait_for


def non_loopback_address() -> str | None:
    """An address of this host other than loopback (the one on its default route), if any."""
    addr = LocalAddresses("0.0.0.0").default
    return None if is_loopback(addr) else addr


def test_a_configured_or_bound_address_is_used_for_everyone():
    assert LocalAddresses("0.0.0.0", "203.0.113.7").for_peer("127.0.0.1") == "203.0.113.7"
    assert LocalAddresses("10.1.2.3").for_peer("192.0.2.99") == "10.1.2.3"
    assert LocalAddresses("10.1.2.3").default == "10.1.2.3"


def test_a_wildcard_bind_answers_each_peer_with_the_address_that_reaches_it():
    addresses = LocalAddresses("0.0.0.0")
    assert addresses.for_peer("127.0.0.1") == "127.0.0.1"
    own = non_loopback_address()
    if own is None:
        pytest.skip("this host has no address but loopback")
    # The default is never the loopback address gethostbyname(gethostname()) gives on Debian.
    assert not is_loopback(addresses.default)
    assert addresses.for_peer(own) == own
    # A peer out on the network is told our address on the route to it, not loopback.
    assert not is_loopback(addresses.for_peer("192.0.2.200"))
    assert addresses.for_peer(None) == addresses.default
    # A name is never resolved on this path (no DNS stalls on the event loop).
    assert route_source("camera.example") is None
    assert addresses.for_peer("camera.example") == addresses.default


def test_queue_probe_measures_the_wait_of_what_it_carries():
    probe = QueueProbe()
    first = probe.make(10.0)
    assert first[0] == 0, "no SIP message starts with a zero byte"
    assert probe.delay(10.5) == pytest.approx(0.5), "still inside the queue: its age counts"
    assert probe.receive(first, 10.8) and probe.last_delay == pytest.approx(0.8)
    assert probe.delay(11.0) == pytest.approx(0.8)
    lost, second = probe.make(11.0), probe.make(12.0)
    assert probe.receive(second, 12.1)            # the one before it was dropped: forgotten
    assert probe.delay(20.0) == pytest.approx(0.1)
    assert not probe.receive(b"\x00GBQ" + b"x" * 12, 13.0), "a forged probe does not count"
    assert not probe.receive(lost[:-1], 13.0)


def test_overload_has_hysteresis():
    o = Overload(enter=2.0, leave=0.5)
    assert not o.update(1.9, 0.0)
    assert o.update(2.1, 0.0) and o.episodes == 1
    assert o.update(1.0, 0.0), "still draining"
    assert not o.update(0.4, 0.0)
    assert o.update(0.0, 1.5), "a loop that runs seconds late is overloaded too"
    assert not Overload(enter=0).update(100.0, 100.0), "0 turns it off"


async def test_the_endpoint_sees_its_receive_queue_back_up():
    """A server that takes 3 ms a request, and a burst of 1,500: the probes queue behind the
    burst, so the endpoint knows requests wait, and knows when they stop waiting."""
    def slow(ev) -> None:
        time.sleep(0.003)

    ep = SipEndpoint("127.0.0.1", 0, overload_delay=0.5, tcp=False, on_request=slow)
    await ep.start()
    blaster = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        await asyncio.sleep(0.3)
        assert not ep.overloaded and ep.queue_probe.last_delay < 0.1
        for n in range(1500):
            blaster.sendto((f"OPTIONS sip:x@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bK{n}\r\n"
                            f"From: <sip:a@b>;tag=t\r\nTo: <sip:x@y>\r\nCall-ID: c{n}\r\n"
                            "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode(), ("127.0.0.1", ep.port))
        await wait_for(lambda: ep.overloaded, 10, what="overload while the burst waits")
        assert ep.queue_probe.delay(ep.now) > 0.5
        await wait_for(lambda: not ep.overloaded, 15, what="the queue drained")
        assert ep.overload.episodes == 1
    finally:
        blaster.close()
        await ep.close()
