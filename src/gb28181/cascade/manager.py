"""Cascade: this instance as a lower platform of one or more upper platforms (GB/T 28181-2016
§5.2, §9, Annex J).

``CascadeManager`` holds one ``Uplink`` per upper platform: those of the config file
(``upstreams:``) and those added through the API, which are kept in ``DATA_DIR/upstreams.json``
(written whole and atomically, so a crash leaves the old or the new list, never half of one).
It routes what the upper platforms send us:

- MESSAGE (``answers.UpperQueries``): Catalog, DeviceInfo, DeviceStatus and RecordInfo queries,
  answered with what this instance shares; controls relayed to the owning device and audited;
- SUBSCRIBE and the NOTIFYs they lead to (``subscribe_in``): catalog changes, alarms and mobile
  positions of shared channels go up;
- INVITE, ACK, BYE, INFO (``invite_in``): live, playback and download of shared channels,
  sent from the media node that carries the device's stream.

A request belongs to the cascade when its From is the ID of an upper platform we know, or when
it is inside one of the cascade's dialogs (by Call-ID).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from registry.channels import ChannelRegistry
from registry.devices import DeviceRegistry
from registry.models import Channel, ChannelEvent

from .. import manscdp
from ..audit import AuditLog
from ..config import Config, UpstreamSection
from ..control import DeviceControl
from ..queries import DeviceQueries
from ..sip.endpoint import SipEndpoint
from ..sip.message import make_response, new_tag, user_of
from ..sip.transaction import RequestReceived
from .answers import UpperQueries
from .invite_in import UpperSessions
from .subscribe_in import UpperSubscriptions
from .uplink import Uplink

__all__ = ["CascadeManager", "UpstreamError"]

log = logging.getLogger("gb28181.cascade")


class UpstreamError(ValueError):
    """An API change to the upstreams cannot be made; ``status`` is the HTTP status."""

    def __init__(self, text: str, status: int = 400) -> None:
        super().__init__(text)
        self.status = status


def _validated(data: dict) -> UpstreamSection:
    """``data`` as an upstream's settings; UpstreamError (400) naming each fault."""
    try:
        return UpstreamSection.model_validate(data)
    except ValidationError as exc:
        raise UpstreamError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}"
                                      for e in exc.errors())) from None


class CascadeManager:
    """See the module docstring."""

    def __init__(self, *, config: Config, endpoint: SipEndpoint, registry: DeviceRegistry,
                 channels: ChannelRegistry, queries: DeviceQueries, control: DeviceControl,
                 audit: AuditLog, streams: Any, playbacks: Any, invites: Any) -> None:
        self.config = config
        self.endpoint = endpoint
        self.registry = registry
        self.channels = channels
        self.queries = queries
        self.audit = audit
        self.path = Path(config.data_dir) / "upstreams.json"
        self.uplinks: dict[str, Uplink] = {}
        self.sources: dict[str, str] = {}  # upstream ID -> "config" | "api"
        self.answers = UpperQueries(self, control=control, queries=queries)
        self.subscriptions = UpperSubscriptions(self)
        self.sessions = UpperSessions(self, streams=streams, playbacks=playbacks, invites=invites)
        self.started = False
        channels.add_listener(self._channel_state)

    # -- upstreams ------------------------------------------------------------------------------
    def _uplink(self, cfg: UpstreamSection) -> Uplink:
        return Uplink(cfg, endpoint=self.endpoint, local_id=self.config.server.id,
                      keepalive_body=self.answers.keepalive_body,
                      on_registered=self._registered, on_lost=self._lost)

    def _load_api_upstreams(self) -> list[UpstreamSection]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return [UpstreamSection.model_validate(item) for item in data]
        except (OSError, ValueError, TypeError, ValidationError) as exc:
            log.error("cannot read the upstreams added through the API from %s: %s; fix or remove "
                      "the file (it is rewritten by the next API change)", self.path, exc)
            return []

    def _save(self) -> None:
        items = [u.config.model_dump(mode="json") for k, u in self.uplinks.items()
                 if self.sources.get(k) == "api"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        # Owner-only, like the API and node tokens beside it: it holds the uppers' passwords.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
            json.dump(items, f, ensure_ascii=False, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    async def start(self) -> None:
        for cfg in self.config.upstreams:
            self._add(cfg, "config")
        for cfg in self._load_api_upstreams():
            if cfg.id in self.uplinks:
                log.warning("upstream %s is in the config file and was also added through the API; "
                            "the config file's is used", cfg.id)
                continue
            self._add(cfg, "api")
        self.started = True
        for uplink in self.uplinks.values():
            uplink.start()
        self.subscriptions.start()

    def _add(self, cfg: UpstreamSection, source: str) -> Uplink:
        uplink = self._uplink(cfg)
        assert cfg.id is not None
        self.uplinks[cfg.id] = uplink
        self.sources[cfg.id] = source
        return uplink

    async def stop(self) -> None:
        self.started = False
        await self.sessions.stop()
        await self.subscriptions.stop()
        await asyncio.gather(*(u.stop() for u in self.uplinks.values()), return_exceptions=True)
        self.channels.remove_listener(self._channel_state)

    def by_server_id(self, server_id: str) -> Uplink | None:
        for uplink in self.uplinks.values():
            if uplink.config.server_id == server_id:
                return uplink
        return None

    def _registered(self, uplink: Uplink) -> None:
        self.events("upstream.registered", uplink)

    def _lost(self, uplink: Uplink) -> None:
        """The upper stopped answering: its sessions and subscriptions are over (§9.6.2)."""
        self.events("upstream.lost", uplink)
        self.sessions.end_for(uplink, f"upper platform {uplink.id} lost: {uplink.reason}")
        self.subscriptions.end_for(uplink)

    #: Set by the server: publish an event (type, data) on the event bus.
    on_event: Callable[[str, dict], object] | None = None

    def events(self, kind: str, uplink: Uplink) -> None:
        if self.on_event is not None:
            self.on_event(kind, {"upstream": uplink.id, "server_id": uplink.config.server_id,
                                 "status": uplink.status, "reason": uplink.reason})

    # -- the API's facade ------------------------------------------------------------------------
    def listing(self) -> list[dict]:
        return [self.describe(k) for k in self.uplinks]

    def describe(self, upstream_id: str) -> dict:
        uplink = self.uplinks[upstream_id]
        d = uplink.as_dict()
        d["source"] = self.sources.get(upstream_id, "api")
        d["subscriptions"] = self.subscriptions.describe(uplink)
        d["sessions"] = self.sessions.count(uplink)
        d["shared_channels"] = self.answers.shared_count(uplink)
        return d

    async def add(self, data: dict) -> dict:
        cfg = _validated(data)
        assert cfg.id is not None
        if cfg.id in self.uplinks:
            raise UpstreamError(f"upstream {cfg.id} exists; PATCH it or choose another id", 409)
        if self.by_server_id(cfg.server_id) is not None:
            raise UpstreamError(f"upper platform {cfg.server_id} is already an upstream", 409)
        uplink = self._add(cfg, "api")
        self._save()
        if self.started:
            uplink.start()
        return self.describe(cfg.id)

    async def update(self, upstream_id: str, patch: dict) -> dict:
        uplink = self._editable(upstream_id)
        merged = {**uplink.config.model_dump(), **patch, "id": upstream_id}
        cfg = _validated(merged)
        other = self.by_server_id(cfg.server_id)
        if other is not None and other is not uplink:
            raise UpstreamError(f"upper platform {cfg.server_id} is already upstream {other.id}", 409)
        await self._retire(uplink, "the upstream was changed")
        fresh = self._add(cfg, "api")
        self._save()
        if self.started:
            fresh.start()
        return self.describe(upstream_id)

    async def remove(self, upstream_id: str) -> None:
        uplink = self._editable(upstream_id)
        await self._retire(uplink, "the upstream was removed")
        del self.uplinks[upstream_id]
        self.sources.pop(upstream_id, None)
        self._save()

    def _editable(self, upstream_id: str) -> Uplink:
        uplink = self.uplinks.get(upstream_id)
        if uplink is None:
            raise UpstreamError(f"no upstream {upstream_id}", 404)
        if self.sources.get(upstream_id) == "config":
            raise UpstreamError(f"upstream {upstream_id} is defined in the config file "
                                "(upstreams:); change it there and restart", 409)
        return uplink

    async def _retire(self, uplink: Uplink, reason: str) -> None:
        self.sessions.end_for(uplink, reason)
        self.subscriptions.end_for(uplink, notify=True)
        await uplink.stop()

    # -- SIP ---------------------------------------------------------------------------------------
    def uplink_of(self, ev: RequestReceived) -> Uplink | None:
        try:
            return self.by_server_id(user_of(ev.request.headers["from"][0]))
        except (KeyError, IndexError, ValueError):
            return None

    def owns(self, ev: RequestReceived) -> bool:
        """Whether the request is the cascade's: from an upper platform, or in one of its dialogs."""
        if not self.uplinks:
            return False
        call_id = ev.request.call_id
        if self.sessions.owns(call_id) or self.subscriptions.owns(call_id):
            return True
        return self.uplink_of(ev) is not None

    def handle(self, ev: RequestReceived) -> None:
        method = ev.request.method
        call_id = ev.request.call_id
        if self.sessions.owns(call_id) or method == "INVITE":
            self.sessions.handle(ev)
        elif method == "SUBSCRIBE" or self.subscriptions.owns(call_id):
            self.subscriptions.handle(ev)
        elif method == "MESSAGE":
            uplink = self.uplink_of(ev)
            assert uplink is not None
            self.answers.handle(uplink, ev)
        elif ev.transaction is not None:
            if ev.request.to_tag or method in ("BYE", "INFO"):  # in a dialog we do not have
                resp = make_response(ev.request, 481, "Call/Transaction Does Not Exist", to_tag=new_tag())
            else:
                resp = make_response(ev.request, 405, f"Method Not Allowed: {method} from an upper platform",
                                     to_tag=new_tag())
            self.endpoint.respond(ev.transaction, resp)

    # -- what goes up ------------------------------------------------------------------------------
    def _channel_state(self, channel: Channel, event: ChannelEvent) -> None:
        if self.uplinks:
            self.subscriptions.channel_state(channel, event)

    def channel_changed(self, channel: Channel, change: str) -> None:
        """A catalog or notify added (ADD) or changed (UPDATE) a channel (``DeviceSync.on_change``)."""
        if self.uplinks:
            self.subscriptions.channel_changed(channel, change)

    def alarm(self, data: dict) -> None:
        """An alarm arrived from a device (the event bus's ``alarm`` event)."""
        if self.uplinks:
            self.subscriptions.alarm(data)

    def position(self, data: dict) -> None:
        if self.uplinks:
            self.subscriptions.position(data)

    def metrics(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        up = GaugeMetricFamily("gb28181_upstream_registered",
                               "1 while registered to the upper platform", labels=["upstream", "server_id"])
        misses = GaugeMetricFamily("gb28181_upstream_keepalive_misses",
                                   "Keepalives unanswered in a row", labels=["upstream"])
        regs = CounterMetricFamily("gb28181_upstream_registrations",
                                   "Successful registrations to the upper platform", labels=["upstream"])
        fails = CounterMetricFamily("gb28181_upstream_register_failures",
                                    "Failed registrations to the upper platform", labels=["upstream"])
        sessions = GaugeMetricFamily("gb28181_upstream_sessions",
                                     "Streams sent to the upper platform", labels=["upstream"])
        for uplink in self.uplinks.values():
            up.add_metric([uplink.id, uplink.config.server_id], 1.0 if uplink.registered else 0.0)
            misses.add_metric([uplink.id], uplink.keepalive_misses)
            regs.add_metric([uplink.id], uplink.registrations)
            fails.add_metric([uplink.id], uplink.failures)
            sessions.add_metric([uplink.id], self.sessions.count(uplink))
        yield from (up, misses, regs, fails, sessions)

    def charset(self) -> str:
        return self.config.catalog.charset

    def build(self, root: str, cmd_type: str, sn: int, device_id: str, fields: list) -> bytes:
        return manscdp.build(root, cmd_type, sn, device_id, fields, encoding=self.charset())
