"""Where requests to a device go: which address, which transport, which TCP connection.

Out-of-dialog requests (MESSAGE, SUBSCRIBE, INVITE) go to the address the device's last
REGISTER or keepalive came from, not to its Contact: GB/T 28181 devices routinely sit behind
NAT, and the source address is the only one that reaches them (RFC 3581 symmetric response
routing, extended to requests as GB/T 28181 platforms do). Over TCP the device's open
connection is reused (RFC 3261 §18.1.1; RFC 5626's "flow"); when that connection is gone, a new
one goes to the device's Contact, because the old source port was an ephemeral one nobody
listens on.

In-dialog requests (ACK, BYE, INFO, a SUBSCRIBE refresh) go to the dialog's next hop (its first
Route, else its remote target: RFC 3261 §12.2.1.1), except where that is the device's own
private Contact behind NAT, or its TCP connection is still open: then the device's flow is used.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from registry.models import Device

from .sip.dialog import Dialog
from .sip.endpoint import SipEndpoint
from .sip.message import SipParseError, parse_name_addr, parse_uri
from .sip.transaction import Addr

__all__ = ["Target", "contact_addr", "dialog_target", "device_target"]

DEFAULT_SIP_PORT = 5060


@dataclass(slots=True, frozen=True)
class Target:
    """Where to send: ``addr`` over ``transport``; over TCP without a connection to ``addr``,
    connect to ``fallback`` instead (see ``SipEndpoint.request``)."""

    addr: Addr
    transport: str
    fallback: Addr | None = None


def _ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _uri_addr(uri_text: str) -> Addr | None:
    """host:port of a SIP URI when its host is an IP address (no DNS lookups on this path)."""
    try:
        uri = parse_uri(uri_text)
    except SipParseError:
        return None
    if not _ip_literal(uri.host):
        return None
    return (uri.host, uri.port or DEFAULT_SIP_PORT)


def contact_addr(device: Device) -> Addr | None:
    """The address in the Contact of the device's REGISTER, if it names one."""
    if not device.contact:
        return None
    try:
        return _uri_addr(parse_name_addr(device.contact).uri)
    except SipParseError:
        return None


def device_target(device: Device) -> Target:
    """Where an out-of-dialog request to ``device`` goes (see the module docstring)."""
    source = (device.host, device.port)
    if device.transport == "tcp":
        return Target(source, "tcp", contact_addr(device) or source)
    return Target(source, device.transport or "udp")


def dialog_target(endpoint: SipEndpoint, device: Device | None, dialog: Dialog,
                  transport: str) -> Target:
    """Where an in-dialog request goes (see the module docstring). ``device`` is the dialog's
    device when known; ``transport`` the one the dialog was set up over."""
    hop = dialog.next_hop()
    hop_addr = None
    if hop is not None and _ip_literal(hop.host):
        hop_addr = (hop.host, hop.port or DEFAULT_SIP_PORT)
    if device is None or not device.host:
        if hop_addr is None:
            raise ValueError(f"no address to reach the remote target {dialog.remote_target}")
        return Target(hop_addr, transport, hop_addr)
    source = (device.host, device.port)
    registered = contact_addr(device)
    behind_nat = registered is not None and registered[0] != source[0]
    # The hop is the device itself when it names the device's host, public or private.
    to_device = hop_addr is None or hop_addr[0] in (source[0], registered[0] if registered else None)
    if transport == "tcp":
        if to_device and endpoint.has_connection(source):
            return Target(source, "tcp", hop_addr or registered)
        dest = hop_addr or registered or source
        return Target(dest, "tcp", dest)
    if to_device and (behind_nat or hop_addr is None):
        return Target(source, transport)
    return Target(hop_addr or source, transport)
