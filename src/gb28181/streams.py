"""On-demand live streams: one upstream INVITE per channel, shared by every viewer.

``StreamManager.play(channel_id)`` returns the channel's ``LiveStream``, opening it if needed:
the first request picks a media node (``nodes.NodeManager.allocate``) and sends the INVITE,
concurrent requests for the same channel wait for that one (never two INVITEs for a channel at
once), later ones join the running stream and start at its cached GOP on its node. When the
last viewer leaves (the node says so), the upstream is kept for ``media.idle_grace`` seconds (a
page reload does not cost a new INVITE) and then closed with a BYE. A stream whose RTP stops
for ``media.idle_timeout`` seconds (the node watches: Annex M), or whose device hangs up or
goes offline, is closed and its viewers' connections end. A stream whose node is lost is
opened again on another node at once (a new INVITE); its viewers reconnect through the
server's ``/live`` URL, which sends them to the new node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from registry.channels import ChannelRegistry
from registry.devices import DeviceRegistry
from registry.models import Channel, Device, StatusEvent

from .config import Config
from .invite import NODE_LOST, TRANSPORTS, InviteError, InviteManager, MediaSession
from .nodes import MediaLeg, NodeCallError, NodeHandle, NodeManager

__all__ = ["LiveStream", "PlayError", "StreamManager", "play_error", "resolve_channel"]

log = logging.getLogger("gb28181.streams")


class PlayError(RuntimeError):
    """A play request failed; ``http_status`` is what the API answers."""

    def __init__(self, text: str, http_status: int) -> None:
        super().__init__(text)
        self.http_status = http_status


@dataclass(slots=True)
class LiveStream:
    channel_id: str
    device_id: str
    transport: str
    leg: MediaLeg
    session: MediaSession | None = None
    created_at: float = field(default_factory=time.time)
    live_at: float = 0.0
    grace: asyncio.TimerHandle | None = None
    closed: bool = False

    @property
    def stream_id(self) -> str:
        return self.channel_id

    def as_dict(self, on_node: dict | None = None) -> dict:
        """JSON-ready; ``on_node`` is what the node reports of the stream (``streams`` command)."""
        on_node = on_node or {}
        return {
            "stream_id": self.stream_id, "channel_id": self.channel_id,
            "device_id": self.device_id, "transport": self.transport,
            "viewers": on_node.get("viewers", 0), "created_at": self.created_at,
            "live_at": self.live_at, "closing_in_grace": self.grace is not None,
            "node": self.leg.node.name, "node_id": self.leg.node.node_id,
            "session": self.session.as_dict() if self.session else None,
            "health": on_node.get("health"),
        }


def resolve_channel(channels: ChannelRegistry, registry: DeviceRegistry,
                    channel_id: str) -> tuple[Channel, Device]:
    """The channel to INVITE and its device, online; PlayError (404/409) says why not."""
    channel = channels.get(channel_id)
    device = registry.get(channel.device_id) if channel else None
    if channel is None:
        # An IPC may be played by its device ID before its catalog is in.
        device = registry.get(channel_id)
        if device is None:
            raise PlayError(f"no channel {channel_id}", 404)
        channel = Channel(channel_id=channel_id, device_id=device.device_id)
    if device is None:
        raise PlayError(f"the device of channel {channel_id} is unknown", 404)
    if not device.online:
        raise PlayError(f"device {device.device_id} of channel {channel_id} is offline", 409)
    return channel, device


def play_error(exc: InviteError) -> PlayError:
    """The API's answer to a failed INVITE: the device's refusal, or why there was none."""
    status = {404: 404, 480: 409, 408: 504, 503: 503, NODE_LOST: 503}.get(exc.status or 0, 502)
    return PlayError(str(exc), status)


class StreamManager:
    """See the module docstring."""

    def __init__(self, *, config: Config, registry: DeviceRegistry, channels: ChannelRegistry,
                 invites: InviteManager, nodes: NodeManager) -> None:
        self.config = config
        self.registry = registry
        self.channels = channels
        self.invites = invites
        self.nodes = nodes
        self.live: dict[str, LiveStream] = {}
        self.moved = 0  # streams re-established on another node after theirs was lost
        self._opening: dict[str, asyncio.Task] = {}
        self._tasks: set[asyncio.Task] = set()
        #: Called with (channel ID, reason) when a live stream closes (cascade sessions end with it).
        self.on_closed: list[Callable[[str, str], None]] = []
        registry.add_listener(self._device_changed)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._opening.values()):
            task.cancel()
        await asyncio.gather(*(self.close(ls.channel_id, "server stopping", bye_timeout=1.0)
                               for ls in list(self.live.values())), return_exceptions=True)
        self.registry.remove_listener(self._device_changed)

    # -- play ------------------------------------------------------------------------------
    def transport_for(self, device: Device, requested: str | None) -> str:
        transport = requested or device.extra.get("media_transport") or self.config.media.default_transport
        if transport not in TRANSPORTS:
            raise PlayError(f"unknown transport {transport!r}; use one of {', '.join(TRANSPORTS)}", 400)
        return transport

    async def play(self, channel_id: str, transport: str | None = None) -> LiveStream:
        """The live stream of ``channel_id``, opened on demand (see the module docstring)."""
        live = self.live.get(channel_id)
        if live is not None and not live.closed:
            return live
        task = self._opening.get(channel_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open(channel_id, transport))
            self._opening[channel_id] = task
            task.add_done_callback(lambda t: self._opening.pop(channel_id, None)
                                   if self._opening.get(channel_id) is t else None)
        # shield: one impatient caller must not cancel the INVITE the others wait for
        return await asyncio.shield(task)

    async def _open(self, channel_id: str, transport: str | None,
                    exclude: NodeHandle | None = None) -> LiveStream:
        channel, device = resolve_channel(self.channels, self.registry, channel_id)
        if len(self.live) >= self.config.media.max_streams:
            raise PlayError(f"{len(self.live)} streams are live (media.max_streams)", 503)
        chosen = self.transport_for(device, transport)
        try:
            leg = await self.nodes.allocate(channel_id, self, exclude=exclude)
        except NodeCallError as exc:
            raise PlayError(str(exc), 503) from None
        live = LiveStream(channel_id, device.device_id, chosen, leg)
        try:
            live.session = await self.invites.open(channel, device, chosen, leg)
        except InviteError as exc:
            if exc.status == NODE_LOST and exclude is None:
                log.info("%s: %s; opening it on another node", channel_id, exc)
                return await self._open(channel_id, transport, exclude=leg.node)
            raise play_error(exc) from None
        live.session.on_close = lambda s, c=channel_id: self._session_closed(c, s)
        live.live_at = time.time()
        self.live[channel_id] = live
        # Nobody has subscribed yet: start the grace period now, the first viewer cancels it.
        self._on_idle(channel_id, leg)
        return live

    async def describe(self, lives: list[LiveStream]) -> list[dict]:
        """``as_dict`` of ``lives`` with what their nodes report (viewers, health, forwards)."""
        nodes = {id(ls.leg.node): ls.leg.node for ls in lives}
        reports: dict[int, dict] = {}
        for key, node in nodes.items():
            try:
                reports[key] = (await node.call("streams", {})).get("streams", {})
            except NodeCallError:
                reports[key] = {}
        return [ls.as_dict(reports[id(ls.leg.node)].get(ls.channel_id)) for ls in lives]

    # -- ending ------------------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_idle(self, channel_id: str, leg: MediaLeg) -> None:
        live = self.live.get(channel_id)
        if live is None or live.closed or live.grace is not None or live.leg is not leg:
            return
        grace = self.config.media.idle_grace
        live.grace = asyncio.get_running_loop().call_later(grace, self._grace_over, channel_id)

    def _grace_over(self, channel_id: str) -> None:
        live = self.live.get(channel_id)
        if live is None:
            return
        live.grace = None
        self._spawn(self._close_if_unwatched(live))

    async def _close_if_unwatched(self, live: LiveStream) -> None:
        try:
            viewers = (await live.leg.call("viewers")).get("viewers", 0)
        except NodeCallError:
            viewers = 0
        if viewers == 0 and self.live.get(live.channel_id) is live and live.grace is None:
            await self.close(live.channel_id, "no viewers")

    # -- what the nodes say (nodes.LegOwner) ---------------------------------------------------
    def leg_idle(self, leg: MediaLeg) -> None:
        self._on_idle(leg.key, leg)

    def leg_stopped(self, leg: MediaLeg, why: str) -> None:
        live = self.live.get(leg.key)
        if live is not None and live.leg is leg:
            self._spawn(self.close(leg.key, why))

    def legs_lost(self, node: NodeHandle, legs: list[MediaLeg]) -> None:
        """Open the streams of a lost node again on another one (a new INVITE each)."""
        for leg in legs:
            live = self.live.get(leg.key)
            if live is not None and live.leg is leg:
                self._spawn(self._move(live, node))

    async def _move(self, live: LiveStream, lost: NodeHandle) -> None:
        await self.close(live.channel_id, f"media node {lost.name} was lost", bye_timeout=2.0)
        try:
            moved = await self.play(live.channel_id, live.transport)
        except PlayError as exc:
            log.warning("stream %s could not be moved off lost media node %s: %s",
                        live.channel_id, lost.name, exc)
            return
        self.moved += 1
        log.info("stream %s moved from lost media node %s to %s", live.channel_id, lost.name,
                 moved.leg.node.name)

    def viewer_joined(self, channel_id: str) -> None:
        """Cancel a pending grace-period BYE (call after subscribing)."""
        live = self.live.get(channel_id)
        if live is not None and live.grace is not None:
            live.grace.cancel()
            live.grace = None

    def _session_closed(self, channel_id: str, session: MediaSession) -> None:
        live = self.live.get(channel_id)
        if live is not None and live.session is session and not live.closed:
            self._spawn(self.close(channel_id, session.close_reason))

    async def close(self, channel_id: str, reason: str, *, bye_timeout: float = 5.0) -> bool:
        live = self.live.pop(channel_id, None)
        if live is None or live.closed:
            return False
        live.closed = True
        if live.grace is not None:
            live.grace.cancel()
        if live.session is not None:
            await self.invites.close(live.session, reason, bye_timeout=bye_timeout)
        else:
            await live.leg.release(reason)
        log.info("stream %s closed: %s", channel_id, reason)
        for listener in self.on_closed:
            try:
                listener(channel_id, reason)
            except Exception:
                log.exception("stream close listener")
        return True

    def _device_changed(self, device: Device, event: StatusEvent) -> None:
        if event.online:
            return
        for live in [ls for ls in self.live.values() if ls.device_id == device.device_id]:
            self._spawn(self.close(live.channel_id, f"device {device.device_id} went offline"))
