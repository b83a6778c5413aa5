"""On-demand live streams: one upstream INVITE per channel, shared by every viewer.

``StreamManager.play(channel_id)`` returns the channel's ``LiveStream``, opening it if needed:
the first request sends the INVITE, concurrent requests for the same channel wait for that one
(never two INVITEs for a channel at once), later ones join the running stream and start at its
cached GOP. When the last viewer leaves, the upstream is kept for ``media.idle_grace`` seconds
(a page reload does not cost a new INVITE) and then closed with a BYE. A stream whose RTP stops
for ``media.idle_timeout`` seconds, or whose device hangs up or goes offline, is closed and its
viewers' connections end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from media.hub import Stream
from media.packet import MediaPacket
from registry.channels import ChannelRegistry
from registry.devices import DeviceRegistry
from registry.models import Device, StatusEvent

from .config import Config
from .invite import TRANSPORTS, InviteError, InviteManager, MediaSession

__all__ = ["LiveStream", "PlayError", "StreamManager"]

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
    stream: Stream
    session: MediaSession | None = None
    created_at: float = field(default_factory=time.time)
    live_at: float = 0.0
    grace: asyncio.TimerHandle | None = None
    closed: bool = False

    @property
    def stream_id(self) -> str:
        return self.channel_id

    def as_dict(self, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        ingest = self.session.ingest if self.session else None
        return {
            "stream_id": self.stream_id, "channel_id": self.channel_id,
            "device_id": self.device_id, "transport": self.transport,
            "viewers": self.stream.consumer_count, "created_at": self.created_at,
            "live_at": self.live_at, "closing_in_grace": self.grace is not None,
            "session": self.session.as_dict() if self.session else None,
            "health": ingest.stats.as_dict(now) if ingest is not None else None,
        }


class StreamManager:
    """See the module docstring."""

    def __init__(self, *, config: Config, registry: DeviceRegistry, channels: ChannelRegistry,
                 invites: InviteManager) -> None:
        self.config = config
        self.registry = registry
        self.channels = channels
        self.invites = invites
        self.live: dict[str, LiveStream] = {}
        self._opening: dict[str, asyncio.Task] = {}
        self._watchdog: asyncio.Task | None = None
        registry.add_listener(self._device_changed)

    def start(self) -> None:
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
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
            task.add_done_callback(lambda _t: self._opening.pop(channel_id, None))
        # shield: one impatient caller must not cancel the INVITE the others wait for
        return await asyncio.shield(task)

    async def _open(self, channel_id: str, transport: str | None) -> LiveStream:
        channel = self.channels.get(channel_id)
        device = self.registry.get(channel.device_id) if channel else None
        if channel is None:
            # An IPC may be played by its device ID before its catalog is in.
            device = self.registry.get(channel_id)
            if device is None:
                raise PlayError(f"no channel {channel_id}", 404)
            from registry.models import Channel
            channel = Channel(channel_id=channel_id, device_id=device.device_id)
        if device is None:
            raise PlayError(f"the device of channel {channel_id} is unknown", 404)
        if not device.online:
            raise PlayError(f"device {device.device_id} of channel {channel_id} is offline", 409)
        if len(self.live) >= self.config.media.max_streams:
            raise PlayError(f"{len(self.live)} streams are live (media.max_streams)", 503)
        chosen = self.transport_for(device, transport)
        live = LiveStream(channel_id, device.device_id, chosen,
                          Stream(channel_id, on_idle=self._on_idle))

        def publish(packet: MediaPacket, _stream: Stream = live.stream) -> None:
            _stream.publish(packet)

        try:
            live.session = await self.invites.open(channel, device, chosen, publish)
        except InviteError as exc:
            live.stream.close(str(exc))
            raise PlayError(str(exc), 404 if exc.status == 404 else
                            409 if exc.status == 480 else 504 if exc.status == 408 else 502) from None
        live.session.on_close = lambda s, c=channel_id: self._session_closed(c, s)
        live.live_at = time.time()
        self.live[channel_id] = live
        # Nobody has subscribed yet: start the grace period now, the first viewer cancels it.
        self._on_idle(live.stream)
        return live

    # -- ending ------------------------------------------------------------------------------
    def _on_idle(self, stream: Stream) -> None:
        live = self.live.get(stream.key)
        if live is None or live.closed or live.grace is not None:
            return
        grace = self.config.media.idle_grace
        live.grace = asyncio.get_running_loop().call_later(grace, self._grace_over, stream.key)

    def _grace_over(self, channel_id: str) -> None:
        live = self.live.get(channel_id)
        if live is None:
            return
        live.grace = None
        if live.stream.consumer_count == 0:
            asyncio.get_running_loop().create_task(self.close(channel_id, "no viewers"))

    def viewer_joined(self, channel_id: str) -> None:
        """Cancel a pending grace-period BYE (call after subscribing)."""
        live = self.live.get(channel_id)
        if live is not None and live.grace is not None:
            live.grace.cancel()
            live.grace = None

    def _session_closed(self, channel_id: str, session: MediaSession) -> None:
        live = self.live.get(channel_id)
        if live is not None and live.session is session and not live.closed:
            asyncio.get_running_loop().create_task(self.close(channel_id, session.close_reason))

    async def close(self, channel_id: str, reason: str, *, bye_timeout: float = 5.0) -> bool:
        live = self.live.pop(channel_id, None)
        if live is None or live.closed:
            return False
        live.closed = True
        if live.grace is not None:
            live.grace.cancel()
        live.stream.close(reason)
        if live.session is not None:
            await self.invites.close(live.session, reason, bye_timeout=bye_timeout)
        log.info("stream %s closed: %s", channel_id, reason)
        return True

    def _device_changed(self, device: Device, event: StatusEvent) -> None:
        if event.online:
            return
        for live in [ls for ls in self.live.values() if ls.device_id == device.device_id]:
            asyncio.get_running_loop().create_task(
                self.close(live.channel_id, f"device {device.device_id} went offline"))

    async def _watch(self) -> None:
        """Annex M: a stream whose media stopped is torn down (both legs)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            limit = self.config.media.idle_timeout
            for live in list(self.live.values()):
                ingest = live.session.ingest if live.session else None
                if ingest is None:
                    continue
                age = ingest.stats.last_packet_age(now)
                if age is not None and age > limit:
                    await self.close(live.channel_id, f"no RTP for {age:.0f} s")
