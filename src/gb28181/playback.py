"""History on the device: playback and download dialogs, and their control (GB/T 28181-2016
§9.8, §9.9, Annex B).

``PlaybackManager.open`` plays a recorded range of a channel: a ``Playback`` INVITE (Annex F:
``s=Playback``, ``u=<channel>:0``, ``t=<start> <end>``, a history ``y=`` SSRC) into a stream of
its own on a media node. Unlike live video a playback is never shared: each call gets a new
stream ID, and its viewers fetch it like a live stream (HTTP-FLV, WS-FLV; the node's FLV
timestamps run on across seeks and pauses).

``control`` sends MANSRTSP in an INFO of the dialog (Annex B, ``mansrtsp``): pause, resume,
seek (``Range: npt=`` seconds from the start of the range) and speed (``Scale``). Where the
playback is, in recorded time, is the range start plus the last seek plus the media time the
node has received since (its ``elapsed``: the device's timestamps run in recorded time, so a
faster scale advances it faster). The device's MediaStatus 121 (§9.8.2) ends the playback:
BYE, the node ends the stream for its viewers, and the API keeps the reason. A playback nobody
watches for ``media.idle_grace`` seconds is closed, as a live stream is; one whose node is
lost is opened again on another node from where it was.

Platform recordings (``source="platform"``; ``recording.py`` writes them) answer the same way: no
INVITE, the leg is a node stream fed from the segment files that cover the range (the node's
``file_play``, ``media/file_source.py``), controlled with ``file_control``, and the end of the
range ends it as MediaStatus 121 would (the cascade relays it up as such). The files are read
where the node runs: one machine, or storage every node mounts at the same path.

A download (§9.9) is the same dialog with ``s=Download`` and ``a=downloadspeed``: the device
sends the range that many times faster than real time, the node writes it to an MP4 file
(``media.mp4``), and MediaStatus 121 finishes it. Progress is the media time written against
the range; a device serves ``media.downloads_per_device`` downloads at once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from registry.channels import ChannelRegistry
from registry.devices import DeviceRegistry

from . import mansrtsp
from .config import Config
from .invite import History, InviteError, InviteManager, MediaSession
from .nodes import MediaLeg, NodeCallError, NodeHandle, NodeManager
from .registrar import BEIJING
from .streams import TRANSPORTS, PlayError, play_error, resolve_channel

__all__ = ["Playback", "PlaybackManager", "MAX_RANGE"]

log = logging.getLogger("gb28181.playback")

MAX_RANGE = 7 * 86400  # seconds one playback may span
_RECENT = 200  # ended playbacks the API still describes (with why they ended)
END_SETTLE = 0.5  # seconds between MediaStatus 121 and the BYE: the last packets arrive
ACTIONS = ("pause", "resume", "seek", "speed")
SOURCES = ("device", "platform")
PLATFORM_END = "end of the platform recording"  # a range played from the files is done
COVER_SLACK = 10.0  # seconds the recordings may miss at either end and still cover a range


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, BEIJING).isoformat(timespec="seconds")


@dataclass(slots=True, eq=False)
class Playback:
    stream_id: str
    channel_id: str
    device_id: str
    transport: str
    start: int  # the recorded range, Unix seconds
    end: int
    leg: MediaLeg
    kind: str = "Playback"
    session: MediaSession | None = None
    created_at: float = field(default_factory=time.time)
    state: str = "opening"  # opening | playing | paused | closing | ended
    scale: float = 1.0
    offset: float = 0.0  # seconds into the range where the node's elapsed count starts
    cseq: int = 0  # MANSRTSP CSeq of the last control (Annex B.2.1: numbered per dialog)
    ended_reason: str = ""
    ended_at: float = 0.0
    grace: asyncio.TimerHandle | None = None
    moves: int = 0
    speed: int = 1  # a=downloadspeed
    file: dict | None = None  # a download's MP4 once finished (path, bytes, frames, seconds)
    written: float = 0.0  # a download's media seconds written, at the last look
    source: str = "device"  # device (an INVITE) | platform (the node plays recordings)

    def position(self, elapsed: float | None) -> float:
        """Recorded time (Unix seconds) of the newest frame received."""
        return min(float(self.end), self.start + self.offset + (elapsed or 0.0))

    def as_dict(self, on_node: dict | None = None) -> dict:
        on_node = on_node or {}
        elapsed = on_node.get("elapsed")
        if self.kind == "Download":
            return self._download_dict(on_node)
        return {
            "stream_id": self.stream_id, "kind": self.kind.lower(), "channel_id": self.channel_id,
            "device_id": self.device_id, "transport": self.transport,
            "start": _iso(self.start), "end": _iso(self.end), "state": self.state,
            "scale": self.scale, "source": self.source, "position": _iso(self.position(elapsed)),
            "position_offset": round(self.position(elapsed) - self.start, 3),
            "viewers": on_node.get("viewers", 0), "node": self.leg.node.name,
            "created_at": self.created_at, "ended_reason": self.ended_reason or None,
            "session": self.session.as_dict() if self.session else None,
            "health": on_node.get("health"),
        }


    def _download_dict(self, on_node: dict) -> dict:
        recording = on_node.get("recording") or {}
        if recording:
            self.written = float(recording.get("seconds") or 0.0)
        span = self.end - self.start
        done = self.file is not None and self.file.get("path") is not None and (
            "MediaStatus" in self.ended_reason or self.ended_reason == PLATFORM_END)
        state = ("done" if done else "failed") if self.state == "ended" else "downloading"
        written = float(self.file["seconds"]) if self.file else self.written
        return {
            "id": self.stream_id, "stream_id": self.stream_id, "kind": "download",
            "channel_id": self.channel_id, "device_id": self.device_id, "transport": self.transport,
            "start": _iso(self.start), "end": _iso(self.end), "speed": self.speed, "state": state,
            "progress": 1.0 if done else round(min(1.0, written / span), 4),
            "seconds": round(written, 3),
            "bytes": (self.file or {}).get("bytes") or recording.get("bytes_in", 0),
            "frames": (self.file or {}).get("frames") or recording.get("frames", 0),
            "node": self.leg.node.name, "created_at": self.created_at,
            "ended_reason": self.ended_reason or None,
            "error": (self.file or {}).get("error") or recording.get("error"),
        }


class PlaybackManager:
    """See the module docstring."""

    def __init__(self, *, config: Config, registry: DeviceRegistry, channels: ChannelRegistry,
                 invites: InviteManager, nodes: NodeManager) -> None:
        self.config = config
        self.registry = registry
        self.channels = channels
        self.invites = invites
        self.nodes = nodes
        self.active: dict[str, Playback] = {}
        self.recent: OrderedDict[str, Playback] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        #: Called with (stream ID, reason) when a playback or download ends, and with
        #: (stream ID, "file-end") when its device reports MediaStatus 121 (cascade relays both).
        self.on_closed: list[Callable[[str, str], None]] = []
        #: Set by the server: the platform recordings' index (``recording.RecordingManager``),
        #: ``await segments(channel_id, start, end)`` → ``[{path, start, end}, ...]``.
        self.recordings: Any = None

    def get(self, stream_id: str) -> Playback | None:
        return self.active.get(stream_id) or self.recent.get(stream_id)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(self.close(sid, "server stopping", bye_timeout=1.0)
                               for sid in list(self.active)), return_exceptions=True)

    # -- opening -----------------------------------------------------------------------------------
    async def open(self, channel_id: str, start: float, end: float, transport: str | None,
                   *, download_speed: int | None = None, record: bool = True,
                   source: str = "device") -> Playback:
        """A playback, or with ``download_speed`` a download, of the range [start, end); a
        download is written to an MP4 on its node unless ``record`` is False (a download an upper
        platform asked for is sent to it, not kept here). ``source`` "platform" plays the
        platform's own recordings instead of asking the device."""
        start_s, end_s = int(start), int(end)
        if end_s <= start_s:
            raise PlayError("end must be after start", 400)
        if end_s - start_s > MAX_RANGE:
            raise PlayError(f"a playback spans at most {MAX_RANGE // 86400} days; ask a shorter range", 400)
        if source not in SOURCES:
            raise PlayError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}", 400)
        kind = "Playback" if download_speed is None else "Download"
        if source == "platform":
            # The device need not be online, nor even known: the files are the platform's.
            found = self.channels.get(channel_id)
            if found is None:
                raise PlayError(f"no channel {channel_id}", 404)
            channel_id, device_id, chosen = found.channel_id, found.device_id, "file"
        else:
            channel, device = resolve_channel(self.channels, self.registry, channel_id)
            channel_id, device_id = channel.channel_id, device.device_id
            chosen = transport or device.extra.get("media_transport") or self.config.media.default_transport
            if chosen not in TRANSPORTS:
                raise PlayError(f"unknown transport {chosen!r}; use one of {', '.join(TRANSPORTS)}", 400)
        if kind == "Download" and source == "device":
            busy = sum(1 for p in self.active.values()
                       if p.kind == "Download" and p.device_id == device_id and p.source == "device")
            limit = self.config.media.downloads_per_device
            if busy >= limit:
                raise PlayError(f"device {device_id} already serves {busy} downloads "
                                "(media.downloads_per_device); wait for one to finish", 429)
        stream_id = f"{channel_id}-{'dl' if download_speed else 'pb'}{secrets.token_hex(4)}"
        try:
            leg = await self.nodes.allocate(stream_id, self)
        except NodeCallError as exc:
            raise PlayError(str(exc), 503) from None
        pb = Playback(stream_id, channel_id, device_id, chosen, start_s, end_s, leg,
                      kind=kind, speed=download_speed or 1, source=source)
        self.active[stream_id] = pb
        try:
            await self._start(pb, start_s)
            if kind == "Download" and record:
                await pb.leg.call("record", name=stream_id)
        except (PlayError, NodeCallError) as exc:
            await self.close(stream_id, str(exc))
            self.recent.pop(stream_id, None)
            raise exc if isinstance(exc, PlayError) else PlayError(str(exc), 503) from None
        if kind == "Playback":
            self._idle(pb)  # nobody watches yet: the grace period runs until the first viewer
        return pb

    async def _start(self, pb: Playback, from_time: int) -> None:
        if pb.source == "platform":
            await self._play_files(pb, from_time)
        else:
            await self._invite(pb, from_time)

    async def platform_segments(self, channel_id: str, start: float, end: float) -> list[dict]:
        """The platform's segments of the channel overlapping [start, end), oldest first."""
        if self.recordings is None:
            return []
        found = await self.recordings.segments(channel_id, start, end)
        return sorted(({"path": str(s["path"]), "start": float(s["start"]), "end": float(s["end"])}
                       for s in found), key=lambda s: s["start"])

    async def recorded_source(self, channel_id: str, start: float, end: float) -> str:
        """Where a range is best played from: "platform" when its recordings cover it (within
        ``COVER_SLACK`` at either end), or cover some of it and the device is offline."""
        segments = await self.platform_segments(channel_id, start, end)
        if not segments:
            return "device"
        if segments[0]["start"] <= start + COVER_SLACK and segments[-1]["end"] >= end - COVER_SLACK:
            return "platform"
        channel = self.channels.get(channel_id)
        device = self.registry.get(channel.device_id) if channel is not None else None
        return "platform" if device is None or not device.online else "device"

    async def _play_files(self, pb: Playback, from_time: int) -> None:
        files = await self.platform_segments(pb.channel_id, pb.start, pb.end)
        if not files:
            raise PlayError(f"the platform has no recording of {pb.channel_id} from {_iso(pb.start)} "
                            f"to {_iso(pb.end)}; search with source=platform", 404)
        result = await pb.leg.call("file_play", files=files, from_time=from_time, start=pb.start,
                                   end=pb.end, speed=pb.speed)
        pb.offset = float(result.get("offset") or 0.0)
        pb.state = "playing"

    async def _invite(self, pb: Playback, from_time: int) -> None:
        channel, device = resolve_channel(self.channels, self.registry, pb.channel_id)
        try:
            session = await self.invites.open(channel, device, pb.transport, pb.leg,
                                              History(pb.kind, from_time, pb.end, pb.speed))
        except InviteError as exc:
            raise play_error(exc) from None
        session.on_close = lambda s, sid=pb.stream_id: self._session_closed(sid, s)
        session.on_file_end = lambda s, sid=pb.stream_id: self._file_end(sid, s)
        pb.session = session
        pb.state = "playing"
        pb.cseq = 0

    # -- control (Annex B) ---------------------------------------------------------------------------
    async def control(self, stream_id: str, action: str, *, offset: float | None = None,
                      scale: float | None = None) -> Playback:
        pb = self.active.get(stream_id)
        if pb is None or (pb.session is None and pb.source == "device"):
            ended = self.recent.get(stream_id)
            if ended is not None:
                raise PlayError(f"playback {stream_id} has ended: {ended.ended_reason}", 409)
            raise PlayError(f"no playback {stream_id}", 404)
        if action not in ACTIONS:
            raise PlayError(f"action must be one of {', '.join(ACTIONS)}", 400)
        pb.cseq += 1
        if action == "pause":
            control = mansrtsp.Control("PAUSE", pb.cseq)
        elif action == "resume":
            control = mansrtsp.Control("PLAY", pb.cseq, resume=True)
        elif action == "seek":
            if offset is None or not 0 <= offset < pb.end - pb.start:
                raise PlayError(f"seek needs an offset in seconds from 0 to {pb.end - pb.start}", 400)
            control = mansrtsp.Control("PLAY", pb.cseq, npt=offset)
        else:
            if scale is None or not mansrtsp.SCALE_MIN <= scale <= mansrtsp.SCALE_MAX:
                raise PlayError(f"speed needs a scale from {mansrtsp.SCALE_MIN:g} to "
                                f"{mansrtsp.SCALE_MAX:g}", 400)
            control = mansrtsp.Control("PLAY", pb.cseq, scale=scale)
        if pb.source == "platform":
            await self._control_files(pb, action, offset, scale)
            return pb
        assert pb.session is not None
        if action == "seek":
            # Count the position from the first packet after the seek (the node's mark).
            try:
                await pb.leg.call("mark")
            except NodeCallError as exc:
                raise PlayError(str(exc), 503) from None
        try:
            resp = await self.invites.info(pb.session, mansrtsp.build(control), mansrtsp.CONTENT_TYPE)
        except InviteError as exc:
            raise play_error(exc) from None
        if resp.status >= 300:
            raise PlayError(f"{pb.device_id} refused {action}: {resp.status} {resp.reason}", 502)
        if action == "pause":
            pb.state = "paused"
        elif action in ("resume", "seek"):
            pb.state = "playing"
            if action == "seek":
                pb.offset = float(offset or 0.0)
        else:
            pb.scale = float(scale or 1.0)
        return pb

    async def _control_files(self, pb: Playback, action: str, offset: float | None,
                             scale: float | None) -> None:
        """The same controls on a stream the node plays from recordings (``file_control``)."""
        try:
            # A seek also restarts the node's `elapsed` count at the first packet from the new
            # position (file_control does it once the source has moved).
            result = await pb.leg.call("file_control", action=action, offset=offset, scale=scale)
        except NodeCallError as exc:
            raise PlayError(str(exc), 503) from None
        if action == "pause":
            pb.state = "paused"
        elif action in ("resume", "seek"):
            pb.state = "playing"
            if action == "seek":
                pb.offset = float(result.get("offset") or 0.0)  # the keyframe it landed on
        else:
            pb.scale = float(scale or 1.0)

    # -- ending ----------------------------------------------------------------------------------------
    def _file_end(self, stream_id: str, session: MediaSession) -> None:
        pb = self.active.get(stream_id)
        if pb is None or pb.session is not session:
            return
        self._range_sent(pb, "end of the recording (MediaStatus 121)")

    def _range_sent(self, pb: Playback, reason: str) -> None:
        """The whole range was sent (§9.8.2): listeners hear "file-end", the playback ends."""
        self._tell(pb.stream_id, "file-end")

        async def end() -> None:
            # Its last packets may still be on the way to the node, or through it.
            await asyncio.sleep(END_SETTLE)
            if self.active.get(pb.stream_id) is pb:
                await self.close(pb.stream_id, reason)
        self._spawn(end())

    def _session_closed(self, stream_id: str, session: MediaSession) -> None:
        pb = self.active.get(stream_id)
        if pb is not None and pb.session is session and pb.state != "ended":
            self._spawn(self.close(stream_id, session.close_reason))

    async def close(self, stream_id: str, reason: str, *, bye_timeout: float = 5.0) -> bool:
        pb = self.active.pop(stream_id, None)
        if pb is None:
            return False
        pb.state = "closing"  # a download is not done (nor failed) before its file is finished
        pb.ended_reason = reason
        pb.ended_at = time.time()
        if pb.grace is not None:
            pb.grace.cancel()
        self.recent[stream_id] = pb
        while len(self.recent) > _RECENT:
            self.recent.popitem(last=False)
        if pb.kind == "Download" and pb.leg.node.alive:
            # The node finishes the MP4 (its moov box) when the stream closes, and says what it holds.
            try:
                pb.file = (await pb.leg.call("close", reason=reason)).get("file")
            except NodeCallError as exc:
                pb.file = {"path": None, "error": str(exc)}
        pb.state = "ended"
        if pb.session is not None:
            await self.invites.close(pb.session, reason, bye_timeout=bye_timeout)
        else:
            await pb.leg.release(reason)
        log.info("playback %s of %s ended: %s", stream_id, pb.channel_id, reason)
        self._tell(stream_id, reason)
        return True

    def _tell(self, stream_id: str, what: str) -> None:
        for listener in self.on_closed:
            try:
                listener(stream_id, what)
            except Exception:
                log.exception("playback listener")

    def _idle(self, pb: Playback) -> None:
        if pb.grace is None and pb.state != "ended":
            pb.grace = asyncio.get_running_loop().call_later(
                self.config.media.idle_grace, self._grace_over, pb.stream_id)

    def viewer_joined(self, stream_id: str) -> None:
        pb = self.active.get(stream_id)
        if pb is not None and pb.grace is not None:
            pb.grace.cancel()
            pb.grace = None

    def _grace_over(self, stream_id: str) -> None:
        pb = self.active.get(stream_id)
        if pb is None:
            return
        pb.grace = None

        async def check() -> None:
            try:
                viewers = (await pb.leg.call("viewers")).get("viewers", 0)
            except NodeCallError:
                viewers = 0
            if viewers == 0 and pb.grace is None and self.active.get(stream_id) is pb:
                await self.close(stream_id, "no viewers")
        self._spawn(check())

    # -- what the nodes say (nodes.LegOwner) -----------------------------------------------------------
    def leg_idle(self, leg: MediaLeg) -> None:
        pb = self.active.get(leg.key)
        if pb is not None and pb.leg is leg:
            self._idle(pb)

    def leg_stopped(self, leg: MediaLeg, why: str) -> None:
        pb = self.active.get(leg.key)
        if pb is None or pb.leg is not leg:
            return
        if pb.source == "platform":  # the node played the files to the end of the range
            self._range_sent(pb, PLATFORM_END)
        elif pb.state != "paused":
            self._spawn(self.close(leg.key, why))

    def legs_lost(self, node: NodeHandle, legs: list[MediaLeg]) -> None:
        for leg in legs:
            pb = self.active.get(leg.key)
            if pb is None or pb.leg is not leg:
                continue
            if pb.kind == "Download":  # its file was on that node
                self._spawn(self.close(pb.stream_id, f"media node {node.name} was lost"))
            else:
                self._spawn(self._move(pb, node))

    async def _move(self, pb: Playback, lost: NodeHandle) -> None:
        """Open the playback again on another node, from where it was (a new INVITE)."""
        where = int(pb.position(None))
        old = pb.session
        pb.session = None
        if old is not None:
            await self.invites.close(old, f"media node {lost.name} was lost", bye_timeout=2.0)
        if self.active.get(pb.stream_id) is not pb:
            return
        try:
            pb.leg = await self.nodes.allocate(pb.stream_id, self, exclude=lost)
            pb.offset = float(where - pb.start)
            await self._start(pb, where)
        except (PlayError, NodeCallError) as exc:
            await self.close(pb.stream_id, f"media node {lost.name} was lost and the playback could "
                                           f"not be moved: {exc}")
            return
        pb.moves += 1

    async def describe(self, pbs: list[Playback]) -> list[dict]:
        reports: dict[int, dict] = {}
        for pb in pbs:
            node = pb.leg.node
            if id(node) in reports or pb.state == "ended":
                continue
            try:
                reports[id(node)] = (await node.call("streams", {})).get("streams", {})
            except NodeCallError:
                reports[id(node)] = {}
        return [pb.as_dict(reports.get(id(pb.leg.node), {}).get(pb.stream_id)) for pb in pbs]
