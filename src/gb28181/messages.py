"""Incoming MESSAGE requests with MANSCDP bodies (§9.3–9.7): keepalives and query responses.

Every MESSAGE is answered at once with a bodiless 200 (A.1) unless it is refused:
415 for a body that is not MANSCDP, 400 for a body that cannot be read (the reason says why),
404 for a sender we have never seen and 403 for a keepalive from a device whose registration
is over, so that it registers again (PROTOCOL.md §3.1, WVP behaviour).

A keepalive refreshes the device's address (it may have moved behind NAT), its ``keepalive_at``
and, if it had gone offline, brings it back online. One with ``Status`` ERROR and an ``Info``
list of faulty sub-devices (A.2.5a) is kept as a fault event, and the device shows the fault
until a keepalive says OK again. After a server restart, devices whose
registration is still valid are online again with their next keepalive, without
re-registering. Catalog Responses go to the ``CatalogCollector`` (they come in parts), other
Responses to ``DeviceQueries``; ``Notify/Catalog`` MESSAGEs (catalog changes sent without a
subscription) to the sync's ``apply_notify``; ``Notify/Alarm`` MESSAGEs to ``on_alarm``
(alarms.py), which answers them itself (§9.4.2), and ``Notify/MobilePosition`` MESSAGEs
(positions sent without a subscription, §9.11.2) to ``on_position`` (positions.py), likewise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from registry.devices import DeviceRegistry

from . import manscdp
from .catalog import CatalogCollector
from .presence import Presence
from .queries import DeviceQueries
from .sip.endpoint import SipEndpoint
from .sip.message import make_response, new_tag, user_of
from .sip.transaction import RequestReceived
from .stats import Counters

__all__ = ["MessageHandler"]

log = logging.getLogger("gb28181.messages")


class MessageHandler:
    """Answers MESSAGE requests; see the module docstring."""

    def __init__(self, *, registry: DeviceRegistry, presence: Presence, endpoint: SipEndpoint,
                 queries: DeviceQueries, counters: Counters, collector: CatalogCollector,
                 on_catalog_notify: Callable | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.registry = registry
        self.presence = presence
        self.endpoint = endpoint
        self.queries = queries
        self.counters = counters
        self.collector = collector
        self.on_catalog_notify = on_catalog_notify
        #: (Call-ID, NotifyType) of a MediaStatus Notify → True when it belongs to one of our
        #: playback dialogs (set by the server).
        self.on_media_status: Callable[[str, str], bool] | None = None
        #: (device, Notify/Alarm body, reply) → answers it itself (§9.4.2; set by the server).
        self.on_alarm: Callable[..., None] | None = None
        #: (device, Notify/MobilePosition body, reply) → answers it itself (§9.11.2; the server).
        self.on_position: Callable[..., None] | None = None
        #: channel ID → the ID of the registered device it belongs to, or None (the server).
        self.owner_of: Callable[[str], str | None] | None = None
        self.clock = clock

    def handle(self, ev: RequestReceived) -> None:
        req = ev.request
        txn = ev.transaction
        assert txn is not None
        counters = self.counters

        def reply(status: int, reason: str = "") -> None:
            self.endpoint.respond(txn, make_response(req, status, reason, to_tag=new_tag()))

        try:
            msg = manscdp.parse_request(req.content_type, req.body)
        except manscdp.BodyRefused as exc:
            counters.messages_rejected["unsupported-content-type" if exc.status == 415 else "bad-body"] += 1
            reply(exc.status, exc.reason)
            return
        counters.messages[msg.cmd_type if len(counters.messages) < 64 else "other"] += 1
        if (msg.root == "Notify" and msg.cmd_type == "MediaStatus" and self.on_media_status is not None
                and self.on_media_status(req.call_id, msg.text("NotifyType"))):
            # §9.8.2: sent inside the playback dialog; matched by Call-ID, since the From of a
            # Hikvision NVR's is not always the channel or a registered device.
            reply(200)
            return
        sender = user_of(req.headers["from"][0]) or msg.device_id
        device = self.registry.get(sender)
        if device is None and self.owner_of is not None:
            # A sub-device of a registered device speaking for itself: an audio output's
            # Broadcast Response comes From the output's ID (§9.12, A.2.6 example).
            owner = self.owner_of(sender) or self.registry.get(msg.device_id) and msg.device_id \
                or self.owner_of(msg.device_id)
            device = self.registry.get(owner) if owner else None
            if device is not None:
                sender = device.device_id
        if device is None:
            counters.messages_rejected["unknown-device"] += 1
            reply(404, "Not Found: unknown device; REGISTER first")
            return
        now = self.clock()
        if msg.root == "Notify" and msg.cmd_type == "Keepalive":
            if device.expires_at <= now:
                counters.keepalives_rejected["not-registered"] += 1
                reply(403, "Forbidden: not registered; REGISTER first")
                return
            counters.keepalives += 1
            device.keepalive_at = now
            device.last_seen = now
            device.transport = ev.transport
            device.host, device.port = ev.addr
            if not device.online:
                self.registry.set_online(device, True, "keepalive", at=now)
            self.registry.touch(device)
            self.presence.seen(device)
            reply(200)
            status = msg.text("Status").upper()
            if status == "ERROR" or (status == "OK" and "fault" in device.extra):
                # A.2.5a: ERROR comes with <Info><DeviceID> of each faulty sub-device.
                faulty = tuple(el.text for el in msg.element.iterfind("Info/DeviceID") if el.text)
                if self.registry.record_fault(device, status, faulty, at=now):
                    counters.faults_reported += status == "ERROR"
                    log.warning("device %s reports %s%s", device.device_id, status,
                                f": faulty {', '.join(faulty)}" if faulty else "")
            return
        device.last_seen = now
        if msg.root == "Notify" and msg.cmd_type == "Alarm" and self.on_alarm is not None:
            self.on_alarm(device, msg, reply)  # 200 (400 for garbage), then the Response MESSAGE
            return
        if msg.root == "Notify" and msg.cmd_type == "MobilePosition" and self.on_position is not None:
            self.on_position(device, msg, reply)  # sent unsubscribed: 200 (400 for garbage)
            return
        reply(200)
        if msg.root == "Response":
            if msg.cmd_type == "Catalog" and self.collector.feed(sender, msg):
                return
            self.queries.resolve(sender, msg)
        elif msg.root == "Notify" and msg.cmd_type == "Catalog" and self.on_catalog_notify:
            # Some devices report catalog changes as MESSAGEs rather than in a subscription.
            self.on_catalog_notify(device, msg)
