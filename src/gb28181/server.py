"""The server process: wires the SIP endpoint, registrar, MESSAGE handler, online tracking,
registry and HTTP API together, and starts and stops them in order.

Start: load the registry (devices survive restarts), settle who went offline while we were
down, then open SIP and HTTP. Stop: close HTTP and SIP first, so nothing changes any more,
then flush the registry so nothing is lost.
"""

from __future__ import annotations

import collections
import logging
import os
import time
from pathlib import Path

from aiohttp import web

from media.node import MediaNode
from registry.channels import ChannelRegistry
from registry.devices import DeviceRegistry
from registry.models import Channel, ChannelEvent, Device, StatusEvent
from registry.sqlite import SqliteStore
from registry.writebehind import Persistence

from .alarms import AlarmService
from .api import make_app
from .audit import AuditLog
from .broadcast import BroadcastManager
from .cascade.manager import CascadeManager
from .catalog import CatalogCollector
from .config import Config, ensure_api_token, ensure_node_token
from .control import DeviceControl
from .events import EventBus
from .invite import InviteManager
from .messages import MessageHandler
from .metrics import ServerCollector, make_registry
from .nodes import MediaLeg, NodeManager
from .playback import PlaybackManager
from .positions import PositionService
from .presence import Presence
from .queries import DeviceQueries
from .recording import RecordingManager
from .registrar import Registrar, stateless_request
from .sip.endpoint import SipEndpoint
from .sip.message import make_response
from .sip.transaction import RequestReceived
from .stats import Counters
from .streams import StreamManager
from .subscriptions import SubscriptionManager
from .sync import DeviceSync
from .users import UserService
from .workers import Workers, worker_count

__all__ = ["GbServer"]

log = logging.getLogger("gb28181.server")

ALLOW = "REGISTER, MESSAGE, NOTIFY, SUBSCRIBE, INVITE, ACK, BYE, INFO, OPTIONS"  # what a device may send us


class GbServer:
    """One GB/T 28181 platform instance; ``await start()``, ``await stop()``."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.counters = Counters()
        store = SqliteStore(config.database_path)
        # One persistence for both registries: a device and its channels commit together.
        persistence = Persistence(store, flush_interval=config.database.flush_interval,
                                  commit_delay=config.database.commit_delay)
        self.registry = DeviceRegistry(store, persistence=persistence)
        self.channels = ChannelRegistry(store, persistence=persistence)
        self.users = UserService(store)  # accounts of the console and API, in the same database
        # A device's channels are online only while the device is.
        self.registry.add_listener(self._device_status)
        self.presence = Presence(self.registry, interval=config.keepalive.interval,
                                 count=config.keepalive.count)
        sip = config.sip
        self.endpoint = SipEndpoint(
            sip.host, sip.port, advertised_host=sip.external_host, on_request=self._on_request,
            udp=sip.udp, tcp=sip.tcp, max_message_size=sip.max_message_size,
            max_tcp_connections=sip.max_tcp_connections, t1=sip.t1,
            overload_delay=sip.overload_queue_delay, stateless=stateless_request)
        self.queries = DeviceQueries(config=config, endpoint=self.endpoint, counters=self.counters,
                                     encoding=config.catalog.charset)
        self.collector = CatalogCollector(silence=config.catalog.silence,
                                          first_part=config.catalog.first_part)
        self.sync = DeviceSync(config=config, registry=self.registry, channels=self.channels,
                               queries=self.queries, collector=self.collector)
        self.subscriptions = SubscriptionManager(config=config, endpoint=self.endpoint,
                                                 registry=self.registry, queries=self.queries,
                                                 sync=self.sync)
        self.sync.subscriptions = self.subscriptions
        # Alarms (§9.4) and the event feed; alarm subscriptions (§9.11.1) reuse the dialogs above.
        self.events = EventBus(config.events)
        self.alarms = AlarmService(registry=self.registry, queries=self.queries, bus=self.events)
        self.alarm_subscriptions = SubscriptionManager(
            config=config, endpoint=self.endpoint, registry=self.registry, queries=self.queries,
            sync=self.sync, kind="Alarm", on_notify=self.alarms.on_notify)
        # Mobile positions (§9.11.2): their subscriptions are a third kind on the same machinery.
        self.positions = PositionService(config=config.positions, registry=self.registry,
                                         channels=self.channels, bus=self.events)
        self.position_subscriptions = SubscriptionManager(
            config=config, endpoint=self.endpoint, registry=self.registry, queries=self.queries,
            sync=self.sync, kind="MobilePosition", on_notify=self.positions.on_notify)
        self.channels.add_listener(self._channel_state)
        self.nodes = NodeManager(token="", idle_timeout=config.media.idle_timeout)
        self.nodes.on_viewer = self._viewer
        self.workers: Workers | None = None
        self.node_token_file: Path | None = None
        self.invites = InviteManager(config=config, endpoint=self.endpoint, registry=self.registry)
        self.streams = StreamManager(config=config, registry=self.registry, channels=self.channels,
                                     invites=self.invites, nodes=self.nodes)
        # Platform recording (recording.py): plans, the segment index, retention; its streams
        # are opened through the stream manager like any viewer's.
        self.recordings = RecordingManager(self, store)
        self.nodes.on_segment = self.recordings.on_segment
        self.playbacks = PlaybackManager(config=config, registry=self.registry, channels=self.channels,
                                         invites=self.invites, nodes=self.nodes)
        self.playbacks.recordings = self.recordings  # playback and cascade from platform recordings
        self.audit = AuditLog(config.data_dir / "audit.log")
        self.control = DeviceControl(config=config, registry=self.registry, queries=self.queries,
                                     presence=self.presence, audit=self.audit)
        # Voice broadcast (§9.12.1): the notify, the device's audio INVITE and the G.711 sender.
        self.broadcasts = BroadcastManager(config=config, endpoint=self.endpoint, queries=self.queries,
                                           media_addresses=self.invites.media_addresses,
                                           ssrcs=self.invites.ssrcs, audit=self.audit)
        self.broadcasts.registry = self.registry
        self.registrar = Registrar(config=config, registry=self.registry, presence=self.presence,
                                   endpoint=self.endpoint, counters=self.counters,
                                   on_registered=self.sync.on_registered)
        self.registrar.overloaded = lambda: self.endpoint.overloaded
        # Cascade (§9, Annex J): this instance as the lower platform of its upstreams.
        self.cascade = CascadeManager(config=config, endpoint=self.endpoint, registry=self.registry,
                                      channels=self.channels, queries=self.queries, control=self.control,
                                      audit=self.audit, streams=self.streams, playbacks=self.playbacks,
                                      invites=self.invites)
        self.cascade.on_event = lambda kind, data: self.events.publish(kind, data)
        self.sync.on_change = self.cascade.channel_changed
        self.events.listeners.append(self._cascade_event)
        self.nodes.on_forward_ended = self.cascade.sessions.forward_ended
        self.messages = MessageHandler(registry=self.registry, presence=self.presence,
                                       endpoint=self.endpoint, queries=self.queries,
                                       counters=self.counters, collector=self.collector,
                                       on_catalog_notify=self.sync.apply_notify)
        self.messages.on_media_status = self.invites.media_status
        self.messages.owner_of = lambda cid: (c := self.channels.get(cid)) and c.device_id or None
        self.messages.on_alarm = self.alarms.on_message
        self.messages.on_position = self.positions.on_message
        self.metrics_registry = make_registry(ServerCollector(
            counters=self.counters, endpoint=self.endpoint, registry=self.registry,
            extra=self._channel_metrics))
        self.api_token = ""
        #: HTTP answers by (method, route template, status), for /metrics (api._count_requests).
        self.http_requests: collections.Counter[tuple[str, str, int]] = collections.Counter()
        self.api_token_file: Path | None = None
        self._runner: web.AppRunner | None = None
        self.http_port = config.http.port
        self.started_at = 0.0

    @property
    def sip_port(self) -> int:
        return self.endpoint.port

    async def start(self) -> None:
        self.started_at = time.time()
        self.api_token, self.api_token_file = ensure_api_token(self.config)
        await self.registry.start()
        await self.channels.start()
        await self.users.start()  # the store is open once the registry has started
        for device in self.registry:
            self.channels.set_device_online(device.device_id, device.online, at=device.status_changed_at or None)
        gone = self.presence.resume()
        total, online = self.registry.counts()
        log.info("registry loaded: %d devices, %d still online, %d went offline while we were down",
                 total, online, gone)
        self.audit.open()
        self.nodes.token, self.node_token_file = ensure_node_token(self.config)
        workers = worker_count(self.config)
        if workers == 0:
            media = self.config.media
            await self.nodes.start_local(MediaNode(
                media.host, udp_port=media.rtp_port, tcp_port_range=media.tcp_port_range,
                max_streams=media.node_max_streams, data_dir=self.config.data_dir))
        await self.endpoint.start()
        self.endpoint.addresses.warn_if_unreachable("SIP", "sip.external_host (GB28181_SIP__EXTERNAL_HOST)")
        self.invites.media_addresses.warn_if_unreachable(
            "media", "media.advertised_host (GB28181_MEDIA__ADVERTISED_HOST)")
        self.presence.start()
        self.sync.start()
        if resumed := self.sync.resume():
            log.info("%d devices still registered: syncing and subscribing to them again", resumed)
        self.subscriptions.start()
        self.alarm_subscriptions.start()
        self.position_subscriptions.start()
        self.positions.start()
        self.events.start()
        await self.cascade.start()
        app = make_app(self)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.http.host, self.config.http.port)
        await site.start()
        server = site._server  # the bound port when 0 was asked for
        # aiohttp types it as AbstractServer, which lacks .sockets; asyncio's and uvloop's servers have it.
        if server is not None and server.sockets:  # type: ignore[attr-defined]
            self.http_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        if workers:
            self.workers = Workers(self.config, count=workers, token=self.nodes.token)
            self.workers.start(self.http_port)
            linked = await self.nodes.wait_for_nodes(workers, 30.0)
            if linked < workers:
                log.error("only %d of %d media workers linked within 30 s: see their log lines above",
                          linked, workers)
            else:
                log.info("%d media workers linked", linked)
        await self.recordings.start()  # the index reconciled with the files, then plans armed
        log.info("SIP on %s:%d (udp=%s tcp=%s), HTTP on %s:%d, server ID %s, domain %s",
                 self.config.sip.host, self.sip_port, self.config.sip.udp, self.config.sip.tcp,
                 self.config.http.host, self.http_port, self.config.server.id,
                 self.config.server.domain)

    def listening(self) -> dict:
        """Where the server listens, with the ports actually bound (port 0 in the config)."""
        return {"pid": os.getpid(), "sip_host": self.config.sip.host, "sip_port": self.sip_port,
                "http_host": self.config.http.host, "http_port": self.http_port,
                "rtp_port": self.rtp_port(), "media_nodes": self.nodes.as_list(), **self.addresses()}

    def rtp_port(self) -> int | None:
        """The RTP port of the in-process node, else of the first linked node."""
        if self.nodes.local is not None:
            return self.nodes.local.node.udp_port
        ports = [n.as_dict().get("rtp_port") for n in self.nodes.alive()]
        return next((p for p in ports if p), None)

    def addresses(self) -> dict[str, str]:
        """The addresses a device on the default route is told to use (Via/Contact, SDP c=)."""
        return {"sip_address": self.endpoint.addresses.default,
                "media_address": self.invites.media_addresses.default}

    async def stop(self) -> None:
        self.nodes.stopping = True  # streams are ending, not moving
        await self.recordings.stop()  # segments finished cleanly while their nodes are still up
        await self.cascade.stop()
        await self.broadcasts.stop_all()
        await self.playbacks.stop()
        await self.streams.stop()
        if self.workers is not None:
            await self.workers.stop()
        self.events.close_clients()  # SSE streams end, or the HTTP server waits for them
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.nodes.stop()
        await self.control.stop()
        await self.sync.stop()
        await self.subscriptions.stop()
        await self.alarm_subscriptions.stop()
        await self.position_subscriptions.stop()
        await self.positions.stop()
        await self.alarms.stop()
        await self.endpoint.close()
        self.audit.close()
        await self.presence.stop()
        await self.channels.stop()
        await self.registry.stop()
        await self.events.stop()

    # -- SIP dispatch --------------------------------------------------------------------
    def _on_request(self, ev: RequestReceived) -> None:
        method = ev.request.method
        if method != "REGISTER" and self.cascade.uplinks and self.cascade.owns(ev):
            self.cascade.handle(ev)  # from an upper platform, or in one of its dialogs
            return
        if method == "REGISTER":
            self.registrar.handle(ev)
        elif method == "MESSAGE":
            self.messages.handle(ev)
        elif method == "NOTIFY":
            if self.alarm_subscriptions.owns(ev.request.call_id):
                self.alarm_subscriptions.handle_notify(ev)
            elif self.position_subscriptions.owns(ev.request.call_id):
                self.position_subscriptions.handle_notify(ev)
            else:
                self.subscriptions.handle_notify(ev)
        elif method == "INVITE" or self.broadcasts.owns(ev.request.call_id):
            self.broadcasts.handle(ev)  # devices INVITE us only for voice (§9.12.1.2)
        elif method == "BYE":
            self.invites.handle_bye(ev)
        elif ev.transaction is None:
            return  # an ACK that belongs to no dialog of ours
        elif method == "OPTIONS":
            resp = make_response(ev.request, 200)
            resp.set("Allow", ALLOW)
            self.endpoint.respond(ev.transaction, resp)
        else:
            resp = make_response(ev.request, 405, f"Method Not Allowed: {method} is not supported yet")
            resp.set("Allow", ALLOW)
            self.endpoint.respond(ev.transaction, resp)

    def _channel_metrics(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        states = GaugeMetricFamily("gb28181_channels", "Channels by effective state", labels=["state"])
        for state, n in sorted(self.channels.counts().items()):
            states.add_metric([state], n)
        yield states
        ratio = GaugeMetricFamily("gb28181_channel_online_ratio",
                                  "Share of channels online now, by tier and civil-code prefix",
                                  labels=["tier", "civil_code"])
        online = GaugeMetricFamily("gb28181_channels_online", "Channels online now",
                                   labels=["tier", "civil_code"])
        totals = GaugeMetricFamily("gb28181_channels_total", "Channels, by tier and civil-code prefix",
                                   labels=["tier", "civil_code"])
        digits = self.config.reports.civil_code_digits
        for (tier, civil), (up, total) in sorted(self.channels.live_ratios(
                group_by="civil_code", civil_code_digits=digits).items()):
            ratio.add_metric([str(tier), civil], up / total if total else 0.0)
            online.add_metric([str(tier), civil], up)
            totals.add_metric([str(tier), civil], total)
        yield ratio
        yield online
        yield totals
        subs = GaugeMetricFamily("gb28181_catalog_subscriptions", "Live catalog subscriptions")
        subs.add_metric([], len(self.subscriptions.by_device))
        yield subs
        yield from self.alarms.metrics()
        yield from self.broadcasts.metrics()
        yield from self.positions.metrics()
        yield from self.events.metrics()
        yield from self._node_metrics()
        yield from self.cascade.metrics()
        http = CounterMetricFamily("gb28181_http_requests", "HTTP API answers, by route and status",
                                   labels=["method", "route", "status"])
        for (method, route, status), n in sorted(self.http_requests.items()):
            http.add_metric([method, route, str(status)], n)
        yield http

    def _node_metrics(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        nodes = self.nodes.alive()
        up = GaugeMetricFamily("gb28181_media_nodes", "Media nodes linked")
        up.add_metric([], len(nodes))
        yield up
        streams = GaugeMetricFamily("gb28181_media_node_streams", "Streams carried, by media node",
                                    labels=["node"])
        cpu = GaugeMetricFamily("gb28181_media_node_cpu", "CPU of a media node (share of one core)",
                                labels=["node"])
        bitrate = GaugeMetricFamily("gb28181_media_node_bitrate_bps", "RTP received by a media node",
                                    labels=["node"])
        packets = CounterMetricFamily("gb28181_media_rtp_packets", "RTP packets received by a media node",
                                      labels=["node"])
        rtp_lost = CounterMetricFamily("gb28181_media_rtp_lost", "RTP packets a media node gave up as "
                                       "lost (sequence gaps not filled in time)", labels=["node"])
        for node in nodes:
            streams.add_metric([node.name], len(node.legs))
            cpu.add_metric([node.name], node.cpu)
            bitrate.add_metric([node.name], float(node.load.get("bitrate", 0)))
            packets.add_metric([node.name], float(node.load.get("packets", 0)))
            rtp_lost.add_metric([node.name], float(node.load.get("lost", 0)))
        yield streams
        yield cpu
        yield bitrate
        yield packets
        yield rtp_lost
        lost = CounterMetricFamily("gb28181_media_nodes_lost", "Media nodes whose link dropped")
        lost.add_metric([], self.nodes.lost_total)
        yield lost
        moved = CounterMetricFamily("gb28181_streams_moved", "Streams re-opened on another node")
        moved.add_metric([], self.streams.moved)
        yield moved
        yield from self.recordings.metrics()

    def _cascade_event(self, event) -> None:
        if event.type == "alarm":
            self.cascade.alarm(event.data)
        elif event.type == "position":
            self.cascade.position(event.data)

    def _viewer(self, leg: MediaLeg, event: dict) -> None:
        """A viewer opened a stream on its node: it counts as watching; audited."""
        self.streams.viewer_joined(leg.key)
        self.playbacks.viewer_joined(leg.key)
        self.audit.record("view", who="play-url", source=str(event.get("remote", "")),
                          target=leg.key, output=str(event.get("output", "")), node=leg.node.name)

    def _device_status(self, device: Device, event: StatusEvent) -> None:
        self.channels.set_device_online(device.device_id, event.online, at=event.at)
        self.events.publish("device.online" if event.online else "device.offline",
                            {"device_id": device.device_id, "reason": event.reason}, at=event.at)

    def _channel_state(self, channel: Channel, event: ChannelEvent) -> None:
        self.events.publish("channel.state", {"channel_id": channel.channel_id,
                                              "device_id": channel.device_id, "state": event.state,
                                              "reason": event.reason}, at=event.at)
