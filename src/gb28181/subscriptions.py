"""Catalog subscriptions to devices (RFC 3265 as GB/T 28181 §9.11 and Annex P use it).

``subscribe`` sends ``SUBSCRIBE`` with ``Event: Catalog;id=<n>``, ``Expires`` (600 s by
default) and a ``Query/Catalog`` body; the 200 opens the dialog (a ``sip.dialog.Dialog``: its To
tag, its Contact as the remote target, its Record-Route as the route set). A refresh is an
in-dialog SUBSCRIBE at 80 % of the granted time; ``Expires: 0`` ends it. NOTIFYs are matched to
their subscription by Call-ID (a NOTIFY can overtake the 200 and then completes the dialog
itself, RFC 6665 §4.1.2.4), checked against the dialog (CSeq order; a new Contact moves the
target), answered 200, and their catalog changes handed to ``DeviceSync.apply_notify`` at
once. A NOTIFY for no subscription of ours gets 481 so the device stops sending it.

The same machinery carries alarm subscriptions (§9.11.1, J.18): a second manager with
``kind="Alarm"`` sends ``Event: presence`` and a ``Query/Alarm`` body with the filter fields
it is given, and hands each NOTIFY to ``on_notify`` (alarms.py) instead of the catalog sync.
A third, ``kind="MobilePosition"``, carries mobile position subscriptions (§9.11.2, A.2.4 h):
``Event: presence``, a ``Query/MobilePosition`` body with ``Interval``, NOTIFYs to positions.py.

Subscriptions die with the device's registration: when it goes offline they are forgotten
(the next registration's sync subscribes again). Some NVRs drop subscriptions silently
(PROTOCOL.md §4, #553), which is why periodic Catalog queries stay on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from registry.devices import DeviceRegistry
from registry.models import Device, StatusEvent

from . import manscdp
from .config import Config
from .queries import MANSCDP_CONTENT_TYPE, DeviceQueries, QueryError
from .routing import Target, device_target, dialog_target
from .sip.dialog import Dialog, DialogError
from .sip.endpoint import SipEndpoint, SipTimeoutError, SipTransportError
from .sip.message import SipResponse, make_response, new_request, new_tag
from .sip.transaction import RequestReceived
from .sync import DeviceSync

__all__ = ["Subscription", "SubscriptionManager"]

log = logging.getLogger("gb28181.subscriptions")


@dataclass(slots=True)
class Subscription:
    device_id: str
    call_id: str
    local_tag: str
    event: str
    target: Target
    expires: int
    expires_at: float
    refresh_at: float
    #: The dialog, once the 200 (or a NOTIFY overtaking it) has arrived.
    dialog: Dialog | None = None
    notifies: int = 0
    #: Fields of the Query body after DeviceID (an alarm subscription's filter, A.2.4).
    fields: tuple[tuple[str, Any], ...] = ()

    @property
    def transport(self) -> str:
        return self.target.transport


class SubscriptionManager:
    """See the module docstring."""

    def __init__(self, *, config: Config, endpoint: SipEndpoint, registry: DeviceRegistry,
                 queries: DeviceQueries, sync: DeviceSync, kind: str = "Catalog",
                 on_notify: Callable[[Device, manscdp.Manscdp], None] | None = None) -> None:
        self.config = config
        #: The CmdType of the Query body and of the NOTIFYs: "Catalog", "Alarm" or "MobilePosition".
        self.kind = kind
        self.on_notify = on_notify or self._catalog_notify
        self.endpoint = endpoint
        self.registry = registry
        self.queries = queries
        self.sync = sync
        self.by_device: dict[str, Subscription] = {}
        self._by_call: dict[str, Subscription] = {}
        self._event_ids = itertools.count(1)
        self._task: asyncio.Task | None = None
        registry.add_listener(self._device_changed)

    # -- life cycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.registry.remove_listener(self._device_changed)

    def _device_changed(self, device: Device, event: StatusEvent) -> None:
        if not event.online:
            self._forget(device.device_id)

    def _forget(self, device_id: str) -> Subscription | None:
        sub = self.by_device.pop(device_id, None)
        if sub is not None:
            self._by_call.pop(sub.call_id, None)
        return sub

    # -- subscribing ------------------------------------------------------------------------
    def _server_uri(self) -> str:
        s = self.config.server
        return f"sip:{s.id}@{s.domain}"

    def owns(self, call_id: str) -> bool:
        """Whether a NOTIFY with this Call-ID belongs to one of this manager's subscriptions."""
        return call_id in self._by_call

    async def subscribe(self, device: Device, fields: Sequence[tuple[str, Any]] = (),
                        expires: int | None = None) -> Subscription:
        """Open (or replace) the subscription of ``device``; ``fields`` follow DeviceID in the
        Query body."""
        # A previous dialog simply lapses at the device; we stop listening to it.
        self._forget(device.device_id)
        if expires is None:
            expires = self.config.catalog.subscribe_expires
        # J.18 subscribes to alarms with Event: presence; catalogs name their package (P.4.1).
        event = f"{'Catalog' if self.kind == 'Catalog' else 'presence'};id={next(self._event_ids)}"
        body = manscdp.build("Query", self.kind, self.queries.next_sn(), device.device_id, fields,
                             encoding=self.queries.charset(device))
        local_tag = new_tag()
        target = device_target(device)
        peer = device.host
        request = new_request(
            "SUBSCRIBE", f"sip:{device.device_id}@{device.host}:{device.port}",
            via=self.endpoint.via(target.transport, peer=peer), from_uri=self._server_uri(),
            from_tag=local_tag, to_uri=f"sip:{device.device_id}@{device.device_id[:10]}", cseq=1,
            contact=self.endpoint.contact(self.config.server.id, target.transport, peer=peer),
            headers={"event": event, "expires": str(expires)},
            body=body, content_type=MANSCDP_CONTENT_TYPE, user_agent="gb28181")
        now = time.monotonic()
        sub = Subscription(device.device_id, request.call_id, local_tag, event, target,
                           expires, now + expires, now + expires * 0.8, fields=tuple(fields))
        # Known before the request leaves: the first NOTIFY may overtake the 200.
        self._by_call[sub.call_id] = sub
        self.by_device[device.device_id] = sub
        try:
            resp = await self.endpoint.request(request, target.addr, target.transport,
                                               timeout=10.0, fallback=target.fallback)
        except (SipTimeoutError, SipTransportError) as exc:
            self._forget(device.device_id)
            raise QueryError(f"SUBSCRIBE to {device.device_id} not delivered: {exc}") from None
        if resp.status >= 300:
            self._forget(device.device_id)
            raise QueryError(f"{device.device_id} refused the {self.kind.lower()} subscription: "
                             f"{resp.status} {resp.reason}")
        if sub.dialog is None:
            try:
                sub.dialog = Dialog.from_response(resp, fallback_target=request.uri)
            except DialogError as exc:
                self._forget(device.device_id)
                raise QueryError(f"{device.device_id} accepted the subscription with an unusable "
                                 f"200: {exc}") from None
        else:
            sub.dialog.receive_response(resp)
        self._granted(sub, resp)
        return sub

    def _granted(self, sub: Subscription, resp: SipResponse) -> None:
        granted = (resp.get("expires") or "").strip()
        if granted.isdigit():
            sub.expires = int(granted)
        now = time.monotonic()
        sub.expires_at = now + sub.expires
        sub.refresh_at = now + sub.expires * 0.8

    async def _in_dialog(self, sub: Subscription, expires: int) -> None:
        dialog = sub.dialog
        if dialog is None:
            raise QueryError(f"the subscription to {sub.device_id} has no dialog yet")
        target = dialog_target(self.endpoint, self.registry.get(sub.device_id), dialog, sub.transport)
        peer = target.addr[0]
        request = dialog.request(
            "SUBSCRIBE", via=self.endpoint.via(target.transport, peer=peer),
            contact=self.endpoint.contact(self.config.server.id, target.transport, peer=peer),
            headers={"event": sub.event, "expires": str(expires)}, user_agent="gb28181")
        resp = await self.endpoint.request(request, target.addr, target.transport, timeout=10.0,
                                           fallback=target.fallback)
        if resp.status >= 300:
            raise QueryError(f"{sub.device_id} refused the subscription refresh: {resp.status} {resp.reason}")
        dialog.receive_response(resp)
        if expires:
            self._granted(sub, resp)

    async def unsubscribe(self, device_id: str) -> bool:
        sub = self._forget(device_id)
        if sub is None:
            return False
        try:
            await self._in_dialog(sub, 0)
        except (QueryError, SipTimeoutError, SipTransportError) as exc:
            log.info("unsubscribe from %s: %s", device_id, exc)
        return True

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for sub in [s for s in self.by_device.values() if s.refresh_at <= now]:
                sub.refresh_at = now + 30.0  # no second refresh while this one is under way
                asyncio.get_running_loop().create_task(self._refresh(sub))

    async def _refresh(self, sub: Subscription) -> None:
        try:
            await self._in_dialog(sub, sub.expires)
        except (QueryError, SipTimeoutError, SipTransportError) as exc:
            log.info("%s subscription to %s lost (%s); subscribing anew", self.kind.lower(),
                     sub.device_id, exc)
            device = self.registry.get(sub.device_id)
            if self.by_device.get(sub.device_id) is sub:
                self._forget(sub.device_id)
            if device is not None and device.online:
                try:
                    await self.subscribe(device, sub.fields,
                                         None if self.kind == "Catalog" else sub.expires)
                except QueryError as exc2:
                    log.info("resubscribe to %s: %s", sub.device_id, exc2)

    # -- NOTIFY ------------------------------------------------------------------------------
    def _catalog_notify(self, device: Device, msg: manscdp.Manscdp) -> None:
        if msg.cmd_type == "Catalog":
            self.sync.apply_notify(device, msg)

    def handle_notify(self, ev: RequestReceived) -> None:
        req = ev.request
        txn = ev.transaction
        assert txn is not None
        sub = self._by_call.get(req.call_id)

        def reply(status: int, reason: str = "") -> None:
            self.endpoint.respond(txn, make_response(req, status, reason, to_tag=sub.local_tag if sub else None))

        if sub is None or req.to_tag != sub.local_tag:
            reply(481, "Subscription Does Not Exist")
            return
        if sub.dialog is None:
            # The NOTIFY overtook the 200 of our SUBSCRIBE: it creates the dialog (RFC 6665).
            try:
                sub.dialog = Dialog.from_request(req, sub.local_tag)
            except DialogError as exc:
                reply(400, f"Bad Request: {exc}"[:120])
                return
            sub.dialog.local_cseq = 1
        elif sub.dialog.remote_tag and req.from_tag != sub.dialog.remote_tag:
            reply(481, "Subscription Does Not Exist")
            return
        else:
            refused = sub.dialog.receive_request(req)
            if refused is not None:
                reply(refused, "Server Internal Error: CSeq out of order")
                return
        state = (req.get("subscription-state") or "").strip().lower()
        device = self.registry.get(sub.device_id)
        msg = None
        if req.body.strip():
            try:
                msg = manscdp.parse_request(req.content_type, req.body)
            except manscdp.BodyRefused as exc:
                reply(exc.status, exc.reason)
                return
        reply(200)
        sub.notifies += 1
        if msg is not None and device is not None:
            self.on_notify(device, msg)
        if state.startswith("terminated"):
            if self.by_device.get(sub.device_id) is sub:
                self._forget(sub.device_id)
            self._by_call.pop(sub.call_id, None)
