"""Subscriptions of upper platforms to us (GB/T 28181-2016 §9.11, Annex P; RFC 6665).

An upper platform SUBSCRIBEs to our catalog (``Event: Catalog``), our alarms or our mobile
positions (``Event: presence`` with a ``Query/Alarm`` or ``Query/MobilePosition`` body). The 200
carries ``Expires`` and a ``Response … Result OK`` body (J.19.2) and opens a dialog; a refresh in
that dialog extends it, ``Expires: 0`` ends it with a ``terminated`` NOTIFY. One subscription
per upper platform and kind: a new one replaces the last.

What goes up:

- catalog changes of shared channels (Annex P.4): ADD and UPDATE with the full item, DEL, and
  ON/OFF/VLOST/DEFECT as the channel's effective state moves (its device going offline makes its
  channels OFF). Changes are gathered for ``BATCH_DELAY`` seconds and sent as few NOTIFYs as
  the items fill, one after the other: a device with a thousand channels going offline is a
  handful of NOTIFYs, never a storm. Right after the 200 one NOTIFY lists the shared channels
  that are not ON (Annex P.4.1);
- alarms of shared channels (§9.4): a NOTIFY when the upper subscribed to alarms, else a
  ``Notify/Alarm`` MESSAGE, as a device reports them;
- mobile positions of shared channels (§9.11.2), when subscribed, at most one per ``Interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from registry.channels import REMOVED
from registry.models import Channel, ChannelEvent

from .. import manscdp
from ..queries import MANSCDP_CONTENT_TYPE
from ..sip.dialog import Dialog, DialogError
from ..sip.endpoint import SipTimeoutError, SipTransportError
from ..sip.message import make_response, new_tag
from ..sip.transaction import RequestReceived
from . import share
from .uplink import Uplink

if TYPE_CHECKING:
    from .manager import CascadeManager

__all__ = ["UpperSubscriptions"]

log = logging.getLogger("gb28181.cascade")

KINDS = ("Catalog", "Alarm", "MobilePosition")
DEFAULT_EXPIRES = {"Catalog": 600, "Alarm": 90, "MobilePosition": 600}  # P.2.1.2.1, J.18
MAX_EXPIRES = 86400
BATCH_DELAY = 0.2
MAX_QUEUE = 200_000  # catalog changes waiting for one subscription before older ones are dropped


@dataclass(slots=True, eq=False)
class UpSub:
    uplink: Uplink
    kind: str
    dialog: Dialog
    event: str
    expires: int
    expires_at: float
    interval: float = 5.0
    queue: list[tuple[Channel, str]] = field(default_factory=list)
    sender: asyncio.Task | None = None
    notifies: int = 0
    failures: int = 0
    last_position: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "event": self.event, "expires_in": max(0, round(self.expires_at - time.monotonic())),
                "notifies": self.notifies, "failures": self.failures, "queued": len(self.queue)}


class UpperSubscriptions:
    """See the module docstring."""

    def __init__(self, manager: CascadeManager) -> None:
        self.manager = manager
        self.subs: dict[tuple[str, str], UpSub] = {}  # (upstream ID, kind)
        self._by_call: dict[str, UpSub] = {}
        self._tasks: set[asyncio.Task] = set()
        self._expiry: asyncio.Task | None = None
        self.dropped = 0

    def start(self) -> None:
        self._expiry = asyncio.get_running_loop().create_task(self._expire_loop())

    async def stop(self) -> None:
        tasks = list(self._tasks) + [s.sender for s in self.subs.values() if s.sender]
        if self._expiry is not None:
            tasks.append(self._expiry)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def owns(self, call_id: str) -> bool:
        return call_id in self._by_call

    def describe(self, uplink: Uplink) -> list[dict]:
        return [s.as_dict() for (uid, _), s in self.subs.items() if uid == uplink.id]

    def _forget(self, sub: UpSub) -> None:
        if self.subs.get((sub.uplink.id, sub.kind)) is sub:
            del self.subs[(sub.uplink.id, sub.kind)]
        self._by_call.pop(sub.dialog.call_id, None)
        if sub.sender is not None and sub.sender is not asyncio.current_task():
            sub.sender.cancel()

    def end_for(self, uplink: Uplink, *, notify: bool = False) -> None:
        """Forget the subscriptions of ``uplink`` (it is gone, or being removed: then a
        ``terminated`` NOTIFY tells it so)."""
        for sub in [s for (uid, _), s in self.subs.items() if uid == uplink.id]:
            self._forget(sub)
            if notify:
                self._spawn(self._notify(sub, b"", state="terminated;reason=deactivated"))

    # -- SUBSCRIBE -----------------------------------------------------------------------------------
    def handle(self, ev: RequestReceived) -> None:
        req = ev.request
        txn = ev.transaction
        if txn is None:
            return
        existing = self._by_call.get(req.call_id)
        if req.method != "SUBSCRIBE":
            self.manager.endpoint.respond(txn, make_response(
                req, 481 if existing is None else 405,
                "Call/Transaction Does Not Exist" if existing is None else "Method Not Allowed",
                to_tag=new_tag()))
            return
        uplink = existing.uplink if existing is not None else self.manager.uplink_of(ev)
        if uplink is None:
            self.manager.endpoint.respond(txn, make_response(req, 403, "Forbidden: not an upper platform",
                                                             to_tag=new_tag()))
            return
        expires = self._expires(req.get("expires"))
        if existing is not None and req.to_tag == existing.dialog.local_tag:
            self._refresh(existing, ev, expires)
            return
        try:
            msg = manscdp.parse_request(req.content_type, req.body) if req.body.strip() else None
        except manscdp.BodyRefused as exc:
            self.manager.endpoint.respond(txn, make_response(req, exc.status, exc.reason, to_tag=new_tag()))
            return
        event = req.get("event") or ""
        kind = msg.cmd_type if msg is not None and msg.cmd_type in KINDS else \
            "Catalog" if event.lower().startswith("catalog") else None
        if kind is None:
            self.manager.endpoint.respond(txn, make_response(
                req, 489, "Bad Event: subscribe to Catalog, Alarm or MobilePosition", to_tag=new_tag()))
            return
        if expires is None:
            expires = DEFAULT_EXPIRES[kind]
        local_tag = new_tag()
        sn = msg.sn if msg is not None and msg.sn is not None else 0
        body = self.manager.build("Response", kind, sn, uplink.local_id, [("Result", "OK")])
        resp = make_response(req, 200, "OK", to_tag=local_tag, body=body,
                             content_type=MANSCDP_CONTENT_TYPE)
        resp.set("Expires", str(expires))
        resp.set("Contact", f"<{self.manager.endpoint.contact(uplink.local_id, ev.transport, peer=ev.addr[0])}>")
        if expires == 0:  # a fetch (RFC 6665 §4.4.3): answered, nothing kept
            self.manager.endpoint.respond(txn, resp)
            return
        try:
            dialog = Dialog.from_request(req, local_tag)
        except DialogError as exc:
            self.manager.endpoint.respond(txn, make_response(req, 400, f"Bad Request: {exc}", to_tag=local_tag))
            return
        self.manager.endpoint.respond(txn, resp)
        old = self.subs.get((uplink.id, kind))
        if old is not None:
            self._forget(old)
        interval = 5.0
        if kind == "MobilePosition" and msg is not None:
            text = msg.text("Interval")
            interval = float(text) if text.isdigit() and 0 < int(text) <= 3600 else 5.0
        sub = UpSub(uplink, kind, dialog, event or "presence", expires,
                    time.monotonic() + expires, interval=interval)
        self.subs[(uplink.id, kind)] = sub
        self._by_call[dialog.call_id] = sub
        log.info("upper platform %s subscribed to our %s for %d s", uplink.id, kind.lower(), expires)
        if kind == "Catalog":
            # Annex P.4.1: the first NOTIFY lists what is not ON.
            for channel in self.manager.answers.shared(uplink):
                if channel.state != "ON":
                    sub.queue.append((channel, channel.state))
            self._kick(sub, initial=True)

    def _expires(self, value: str | None) -> int | None:
        if value is None or not value.strip().isdigit():
            return None
        return min(int(value.strip()), MAX_EXPIRES)

    def _refresh(self, sub: UpSub, ev: RequestReceived, expires: int | None) -> None:
        req = ev.request
        sub.dialog.receive_request(req)
        expires = sub.expires if expires is None else expires
        resp = make_response(req, 200, "OK")
        resp.set("Expires", str(expires))
        assert ev.transaction is not None
        self.manager.endpoint.respond(ev.transaction, resp)
        if expires == 0:
            self._forget(sub)
            self._spawn(self._notify(sub, b"", state="terminated;reason=timeout"))
            log.info("upper platform %s ended its %s subscription", sub.uplink.id, sub.kind.lower())
            return
        sub.expires = expires
        sub.expires_at = time.monotonic() + expires

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for sub in [s for s in self.subs.values() if s.expires_at <= now]:
                log.info("%s subscription of upper platform %s expired", sub.kind, sub.uplink.id)
                self._forget(sub)

    # -- NOTIFY -------------------------------------------------------------------------------------
    async def _notify(self, sub: UpSub, body: bytes, *, state: str = "") -> bool:
        uplink = sub.uplink
        endpoint = self.manager.endpoint
        remaining = max(0, int(sub.expires_at - time.monotonic()))
        headers = {"event": sub.event, "subscription-state": state or f"active;expires={remaining}"}
        request = sub.dialog.request(
            "NOTIFY", via=endpoint.via(uplink.transport, peer=uplink.config.host),
            contact=endpoint.contact(uplink.local_id, uplink.transport, peer=uplink.config.host),
            headers=headers, body=body, content_type=MANSCDP_CONTENT_TYPE if body else None,
            user_agent="gb28181")
        try:
            resp = await endpoint.request(request, uplink.addr, uplink.transport, timeout=10.0)
        except (SipTimeoutError, SipTransportError, OSError) as exc:
            sub.failures += 1
            log.info("%s NOTIFY to upper platform %s lost: %s", sub.kind, uplink.id, exc)
            return False
        if resp.status == 481:
            log.info("upper platform %s no longer knows its %s subscription", uplink.id, sub.kind)
            self._forget(sub)
            return False
        if resp.status >= 300:
            sub.failures += 1
            return False
        sub.notifies += 1
        return True

    def _kick(self, sub: UpSub, *, initial: bool = False) -> None:
        if sub.sender is None or sub.sender.done():
            sub.sender = asyncio.get_running_loop().create_task(self._send_queue(sub, initial))

    async def _send_queue(self, sub: UpSub, initial: bool) -> None:
        if not initial:
            await asyncio.sleep(BATCH_DELAY)
        first = initial
        while (sub.queue or first) and self._by_call.get(sub.dialog.call_id) is sub:
            batch, sub.queue = sub.queue, []
            first = False
            items = self._items(sub, batch)
            bodies = share.notify_bodies(items, sn=self.manager.answers.queries.next_sn(),
                                         device_id=sub.uplink.local_id,
                                         per_message=self.manager.answers.per_message(sub.uplink),
                                         encoding=self.manager.charset())
            for body in bodies:
                if not await self._notify(sub, body):
                    break

    def _items(self, sub: UpSub, batch: list[tuple[Channel, str]]) -> list[share.Item]:
        """NOTIFY items for a batch of changes. Cameras that are added or changed come with the
        civil-code and group items above them (as ADD), so the upper's tree has their parents
        even when they arrive after its last catalog query (Annex O)."""
        full = {c.channel_id: (c, e) for c, e in batch if e in ("ADD", "UPDATE")}
        items: list[share.Item] = []
        if full:
            groups = [c for c in self.manager.channels if c.kind in ("business-group", "virtual-org")]
            tree = share.catalog_items(groups + [c for c, _ in full.values()],
                                       local_id=sub.uplink.local_id, share=sub.uplink.config.share)
            for entry in tree:
                ident = next((v for k, v in entry if k == "DeviceID"), "")
                event = full[ident][1] if ident in full else "ADD"
                items.append([entry[0], ("Event", event), *entry[1:]])
        for channel, event in batch:
            if event not in ("ADD", "UPDATE"):
                items.append(share.item(channel, parent_id=self._parent(sub, channel), event=event))
        return items

    def _parent(self, sub: UpSub, channel: Channel) -> str:
        return share.parent_of(channel, sub.uplink.local_id, self.manager.answers.lookup)

    def _catalog_subs(self) -> list[UpSub]:
        return [s for s in self.subs.values() if s.kind == "Catalog"]

    def _queue(self, channel: Channel, event: str) -> None:
        for sub in self._catalog_subs():
            if not share.is_shared(channel, sub.uplink.config.share, self.manager.answers.lookup):
                continue
            if len(sub.queue) >= MAX_QUEUE:
                del sub.queue[: MAX_QUEUE // 10]
                self.dropped += MAX_QUEUE // 10
            sub.queue.append((channel.copy() if event == "DEL" else channel, event))
            self._kick(sub)

    def channel_state(self, channel: Channel, event: ChannelEvent) -> None:
        if channel.kind != "channel" or not self.subs:
            return
        self._queue(channel, "DEL" if event.reason == REMOVED else event.state)

    def channel_changed(self, channel: Channel, change: str) -> None:
        if channel.kind == "channel" and self.subs:
            self._queue(channel, change)

    # -- alarms and positions ------------------------------------------------------------------------
    def _shared_target(self, uplink: Uplink, target_id: str, device_id: str) -> bool:
        """Whether an alarm or position of ``target_id`` (a camera, an alarm input, a device)
        goes to ``uplink``: a camera when it is shared; anything else when its device has a
        shared camera."""
        lookup = self.manager.answers.lookup
        channel = self.manager.channels.get(target_id) if target_id else None
        if channel is not None and channel.kind == "channel":
            return share.is_shared(channel, uplink.config.share, lookup)
        owner = channel.device_id if channel is not None else device_id
        return any(c.kind == "channel" and share.is_shared(c, uplink.config.share, lookup)
                   for c in self.manager.channels.of_device(owner))

    def alarm(self, data: dict) -> None:
        target = str(data.get("channel_id") or data.get("device_id") or "")
        device_id = str(data.get("device_id") or "")
        for uplink in self.manager.uplinks.values():
            if not uplink.registered or not self._shared_target(uplink, target, device_id):
                continue
            fields: list[tuple[str, Any]] = [
                ("AlarmPriority", data.get("priority")), ("AlarmMethod", data.get("method")),
                ("AlarmTime", (data.get("alarm_time") or "")[:19] or None),
                ("AlarmDescription", data.get("description") or None),
                ("Longitude", data.get("longitude")), ("Latitude", data.get("latitude"))]
            if data.get("type") is not None:
                fields.append(("Info", [("AlarmType", data.get("type"))]))
            body = self.manager.build("Notify", "Alarm", self.manager.answers.queries.next_sn(), target,
                                      [(k, v) for k, v in fields if v is not None])
            sub = self.subs.get((uplink.id, "Alarm"))
            if sub is not None:
                self._spawn(self._notify(sub, body))
            else:
                self._spawn(self._message(uplink, body))

    async def _message(self, uplink: Uplink, body: bytes) -> None:
        with contextlib.suppress(SipTimeoutError, SipTransportError, OSError):
            await uplink.message(body)

    def position(self, data: dict) -> None:
        target = str(data.get("target_id") or data.get("device_id") or "")
        device_id = str(data.get("device_id") or "")
        now = time.monotonic()
        for sub in [s for s in self.subs.values() if s.kind == "MobilePosition"]:
            # The interval first: it is a dict look-up, the share test may walk the device's channels.
            if now - sub.last_position.get(target, -1e9) < sub.interval:
                continue
            if not self._shared_target(sub.uplink, target, device_id):
                continue
            sub.last_position[target] = now
            fields = [("Time", (data.get("time") or "")[:19]), ("Longitude", data.get("longitude")),
                      ("Latitude", data.get("latitude")), ("Speed", data.get("speed")),
                      ("Direction", data.get("direction")), ("Altitude", data.get("altitude"))]
            body = self.manager.build("Notify", "MobilePosition", self.manager.answers.queries.next_sn(),
                                      target, [(k, v) for k, v in fields if v is not None])
            self._spawn(self._notify(sub, body))
