"""A media node's engine: the receive sockets, the hub and the outputs of the streams given to it.

The signalling server decides; a node carries media. The server tells a node what to do with
commands (``MediaNode.call(op, args)`` → a JSON-ready result, or ``NodeError``), and the node
tells the server what happened with events (``on_event(dict)``). Both are plain dicts so the
same engine runs inside the server process (``media.workers: 0``, called directly) and in a
``gb28181 media-node`` process (the same dicts as JSON over a WebSocket, ``media.node_link``).

Commands (``stream`` is the stream's key, the channel ID for live video):

- ``open {stream, transport, ssrc, source_host}``: make a stream and its receive path —
  ``udp``: expect ``ssrc`` on the node's shared RTP port; ``tcp-passive``: listen;
  ``tcp-active``: nothing yet (``connect`` follows). → ``{port}``: what goes in the SDP offer.
- ``add_ssrc {stream, ssrc}``: route the SSRC of the device's answer too (GB/T 28181-2016
  Annex F note 4 lets the callee choose its own). → ``{taken}``.
- ``connect {stream, hosts, port, timeout}``: we are the TCP client (RFC 4145 ``setup:active``,
  or a device that answered passive to our passive offer). → ``{peer}``.
- ``close {stream, reason}``.
- ``forward {stream, host, port, transport, ssrc, accept_timeout}``: RTP out, for a cascade;
  ``transport`` ``udp``, ``tcp`` (we connect: the upper platform offered RFC 4145
  ``a=setup:passive``) or ``tcp-passive`` (we listen: it offered ``a=setup:active``; ``port``
  is not used, and the first connection within ``accept_timeout`` seconds gets the stream).
  → ``{forward, port}``: the forward's node-unique ID and, for ``tcp-passive``, the port we
  listen on (what goes in our 200 answer), else null.
- ``unforward {stream, forward}`` → ``{stopped, packets_sent, frames_sent, bytes_sent}``
  (``{stopped: false}`` for a forward this node does not have, or no longer has).
- ``whep {stream, offer, host, ports}``: a WebRTC viewer (``webrtc.py``): ``offer`` is its SDP,
  ``host`` the address its ICE host candidate names, ``ports`` ``[low, high]`` the UDP range
  (``[0, 0]``: any port). → ``{session, answer, video, audio}``, or ``{refused, status}`` for an
  offer this stream cannot answer (400: not SDP / no video; 406: no codec in common, H.265).
- ``whep_close {session}`` → ``{closed}``.
- ``file_play {stream, files, from_time, speed, start, end}`` → ``{port: null, offset, position}``
  and ``file_control {stream, action, offset, scale}``: a stream fed from platform recordings
  (``file_source.py``); its end is a ``media_stopped`` with ``file_end: true``.
- ``record {stream, name}``: a download's video to ``<data_dir>/downloads/<name>.mp4``.
- ``record_start {stream, channel, root, segment_seconds, preroll, gap_before}``: the platform's
  own recording, MP4 segments under ``root`` (``recording.py``) → ``{recording}``;
  ``record_stop {stream}`` → ``{segments}``: the segments it finished.
- ``streams`` (health of every stream; ``elapsed``: media seconds since the start
  or the last ``mark``), ``mark {stream}`` (a playback seeks), ``viewers {stream}``, ``load``.

Events: ``first_packet {stream, peer}`` (the device's media arrived: the server's INVITE is
done), ``idle {stream}`` (the last viewer left: the server starts its grace period),
``media_stopped {stream, age}`` (no RTP for ``idle_timeout``: GB/T 28181-2016 Annex M, the
server ends the dialog), ``forward_ended {stream, forward, reason}`` (a forward stopped by
itself: the peer closed the TCP connection, nobody connected to a passive one, the UDP
destination is unreachable; the node has forgotten it), ``segment {...}`` (a recording segment
opened, closed or failed: ``recording.py``), and ``load {...}`` every
``load_interval`` seconds (what the server allocates new streams by).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import file_source, recording
from .forward import FORWARD_TRANSPORTS, RtpForwarder
from .hub import Stream, StreamClosed
from .ingest import RtpIngest
from .mp4 import DownloadRecorder
from .packet import MediaPacket
from .receiver import MediaReceiver, TcpHandle, UdpHandle
from .recording import SegmentRecorder
from .webrtc import OfferRefused, WebrtcOut

__all__ = ["MediaNode", "NodeError", "NodeStream", "TRANSPORTS"]

log = logging.getLogger("media.node")

TRANSPORTS = ("udp", "tcp-passive", "tcp-active")


class NodeError(RuntimeError):
    """A command could not be carried out; the text says why (sent back to the server)."""


@dataclass(slots=True, eq=False)
class NodeStream:
    """One stream on this node: its receive path, its hub stream and its RTP forwards."""

    key: str
    transport: str
    ssrc: int
    source_host: str | None
    hub: Stream
    ingest: RtpIngest = field(init=False)  # RTP in, access units out to ``publish``
    handle: UdpHandle | TcpHandle | None = None
    forwards: dict[str, RtpForwarder] = field(default_factory=dict)  # by node-unique ID
    opened_at: float = field(default_factory=time.time)
    first_task: asyncio.Task | None = None
    bytes_seen: int = 0  # ingest bytes at the last load report, for the bitrate
    # 90 kHz timestamps of the newest packet and of the first one since the last ``mark``: how
    # far a playback has come since its start or its last seek (``info`` "elapsed").
    last_ts: int | None = None
    mark_ts: int | None = None
    recorder: DownloadRecorder | None = None  # a download being written to MP4
    segments: SegmentRecorder | None = None  # the platform's recording (record_start)
    source: Any = None  # file_source.FileSource: the stream plays recordings, not RTP

    def __post_init__(self) -> None:
        self.ingest = RtpIngest(self.publish, expected_ssrc=self.ssrc)

    def publish(self, packet: MediaPacket) -> None:
        self.hub.publish(packet)
        self.last_ts = packet.timestamp
        if self.mark_ts is None:
            self.mark_ts = packet.timestamp

    @property
    def elapsed(self) -> float | None:
        if self.last_ts is None or self.mark_ts is None:
            return None
        return ((self.last_ts - self.mark_ts) & 0xFFFFFFFF) / 90000


def _str(args: dict, name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not value:
        raise NodeError(f"command argument {name!r} must be a non-empty string, not {value!r}")
    return value


def _int(args: dict, name: str, lo: int, hi: int) -> int:
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise NodeError(f"command argument {name!r} must be an integer from {lo} to {hi}, not {value!r}")
    return value


class MediaNode:
    """See the module docstring. ``await start()``, then ``await call(op, args)``."""

    def __init__(
        self,
        host: str = "0.0.0.0",
        *,
        name: str = "local",
        udp_port: int = 0,
        tcp_port_range: tuple[int, int] | None = None,
        idle_timeout: float = 15.0,
        max_streams: int = 1000,
        load_interval: float = 2.0,
        on_event: Callable[[dict], None] | None = None,
        data_dir: str | Path = "media-node-data",
    ) -> None:
        self.name = name
        self.data_dir = Path(data_dir)
        self.receiver = MediaReceiver(host, udp_port=udp_port, tcp_port_range=tcp_port_range)
        self.webrtc = WebrtcOut(host)
        self.tcp_port_range = tcp_port_range  # passive forwards listen there too (the open ports)
        self._forwards_made = 0  # for the forward IDs "f1", "f2", ...
        self.idle_timeout = idle_timeout
        self.max_streams = max_streams
        self.load_interval = load_interval
        self.on_event = on_event
        self.streams: dict[str, NodeStream] = {}
        self._watchdog: asyncio.Task | None = None
        self._cpu_mark = (time.monotonic(), time.process_time())
        self.cpu = 0.0  # share of one core used over the last load interval
        self.bitrate = 0.0  # bit/s received over the last load interval, all streams
        #: RTP packets received and sequence numbers given up as lost, by the streams already
        #: closed (the open ones add theirs in ``load``): counters since the node started.
        self.packets_closed = 0
        self.lost_closed = 0
        self._ops: dict[str, Callable[[dict], Any]] = {
            "open": self._open, "add_ssrc": self._add_ssrc, "connect": self._connect,
            "close": self._close, "forward": self._forward, "unforward": self._unforward,
            "streams": self._streams,
            "viewers": self._viewers, "mark": self._mark,
            "record": lambda a: recording.record(self, a),
            "record_start": lambda a: recording.record_start(self, a),
            "record_stop": lambda a: recording.record_stop(self, a),
            "load": lambda _args: self.load(), "whep": self._whep, "whep_close": self._whep_close,
            "file_play": lambda a: file_source.file_play(self, a),
            "file_control": lambda a: file_source.file_control(self, a),
        }

    async def start(self) -> None:
        await self.receiver.start()
        self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for key in list(self.streams):
            await self._drop(key, "media node stopping")
        await self.webrtc.close_all("media node stopping")
        await self.receiver.close()

    @property
    def udp_port(self) -> int:
        return self.receiver.udp_port

    def _emit(self, event: dict) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("event handler of media node %s", self.name)

    # -- commands ------------------------------------------------------------------------
    async def call(self, op: str, args: dict) -> dict:
        """Run one command; NodeError (with the reason) when it cannot be done."""
        handler = self._ops.get(op)
        if handler is None:
            raise NodeError(f"unknown media node command {op!r}; known: {', '.join(sorted(self._ops))}")
        if not isinstance(args, dict):
            raise NodeError("command arguments must be a JSON object")
        result = handler(args)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    def stream(self, key: str) -> NodeStream:
        ns = self.streams.get(key)
        if ns is None:
            raise NodeError(f"no stream {key!r} on media node {self.name}")
        return ns

    async def _open(self, args: dict) -> dict:
        key = _str(args, "stream")
        transport = _str(args, "transport")
        if transport not in TRANSPORTS:
            raise NodeError(f"unknown media transport {transport!r}; use one of {', '.join(TRANSPORTS)}")
        ssrc = _int(args, "ssrc", 0, 0xFFFFFFFF)
        source_host = args.get("source_host") or None
        if key in self.streams:
            await self._drop(key, "replaced by a new stream of the same key")
        if len(self.streams) >= self.max_streams:
            raise NodeError(f"media node {self.name} carries {len(self.streams)} streams, its limit")
        def idle(_hub: Stream) -> None:
            self._emit({"event": "idle", "stream": key})

        hub = Stream(key, on_idle=idle)
        ns = NodeStream(key, transport, ssrc, source_host, hub)
        ingest = ns.ingest
        try:
            if transport == "udp":
                ns.handle = self.receiver.expect_udp(ssrc, ingest, source_host=source_host)
                port = self.receiver.udp_port
            elif transport == "tcp-passive":
                ns.handle = await self.receiver.listen_tcp(ingest, ssrc=ssrc, source_host=source_host)
                port = ns.handle.port
            else:
                port = 9  # we connect later; RFC 4145: the port of an active offer is not used
        except (ValueError, OSError) as exc:
            hub.close(str(exc))
            raise NodeError(f"cannot receive {transport} media for {key}: {exc}") from None
        self.streams[key] = ns
        self._await_first(ns)
        return {"port": port}

    def _await_first(self, ns: NodeStream) -> None:
        """Report the stream's first RTP packet (on the current handle) once."""
        if ns.first_task is not None:
            ns.first_task.cancel()
            ns.first_task = None
        handle = ns.handle
        if handle is None:
            return

        async def wait() -> None:
            await handle.first_packet.wait()
            self._emit({"event": "first_packet", "stream": ns.key, "peer": handle.peer})

        ns.first_task = asyncio.get_running_loop().create_task(wait())

    def _add_ssrc(self, args: dict) -> dict:
        ns = self.stream(_str(args, "stream"))
        ssrc = _int(args, "ssrc", 0, 0xFFFFFFFF)
        if ns.handle is None:
            return {"taken": False}
        return {"taken": ns.handle.add_ssrc(ssrc)}

    async def _connect(self, args: dict) -> dict:
        ns = self.stream(_str(args, "stream"))
        hosts = args.get("hosts")
        if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
            raise NodeError("command argument 'hosts' must be a list of addresses")
        port = _int(args, "port", 1, 65535)
        timeout = args.get("timeout", 5.0)
        if not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
            raise NodeError("command argument 'timeout' must be seconds in (0, 60]")
        if ns.handle is not None:
            # Our listener (a passive offer) held the SSRC; the connection we make takes it over.
            ns.handle.close()
            ns.handle = None
        try:
            ns.handle = await self.receiver.connect_tcp(hosts, port, ns.ingest, timeout=float(timeout),
                                                        ssrc=ns.ssrc)
        except (OSError, ValueError) as exc:
            raise NodeError(str(exc)) from None
        if self.streams.get(ns.key) is not ns:  # closed while connecting
            ns.handle.close()
            raise NodeError(f"stream {ns.key} was closed while connecting")
        self._await_first(ns)
        return {"peer": ns.handle.peer}

    async def _close(self, args: dict) -> dict:
        key = _str(args, "stream")
        reason = args.get("reason") or "closed by the server"
        ns = self.streams.get(key)
        recorder = ns.recorder if ns is not None else None
        segments = ns.segments if ns is not None else None
        closed = await self._drop(key, str(reason))
        out: dict[str, Any] = {"closed": closed}
        if recorder is not None:
            out["file"] = await recorder.finish()
        if segments is not None:
            out["segments"] = await segments.stop()
        return out

    async def _drop(self, key: str, reason: str) -> bool:
        ns = self.streams.pop(key, None)
        if ns is None:
            return False
        self.packets_closed += ns.ingest.stats.packets
        self.lost_closed += ns.ingest.stats.lost
        if ns.first_task is not None:
            ns.first_task.cancel()
        if ns.handle is not None:
            ns.handle.close()
        if ns.source is not None:
            await ns.source.stop()
        ns.hub.close(reason)
        await self.webrtc.close_stream(key, reason)
        forwards = list(ns.forwards.values())
        ns.forwards.clear()  # before stopping them: no forward_ended for these
        for fwd in forwards:
            await fwd.stop()
        if ns.recorder is not None:
            await ns.recorder.finish()  # the file is finished (moov written) whoever ends it
        if ns.segments is not None:
            await ns.segments.stop()  # the open segment is closed cleanly (.part renamed)
        log.info("media node %s: stream %s closed: %s", self.name, key, reason)
        return True

    async def _forward(self, args: dict) -> dict:
        ns = self.stream(_str(args, "stream"))
        transport = args.get("transport", "udp")
        if transport not in FORWARD_TRANSPORTS:
            raise NodeError(f"command argument 'transport' must be one of {', '.join(FORWARD_TRANSPORTS)}, "
                            f"not {transport!r}")
        host = _str(args, "host")
        ssrc = _int(args, "ssrc", 0, 0xFFFFFFFF)
        passive = transport == "tcp-passive"
        port = 0 if passive else _int(args, "port", 1, 65535)  # passive: the peer's port is not used
        accept_timeout = args.get("accept_timeout", 20.0)
        if not isinstance(accept_timeout, (int, float)) or isinstance(accept_timeout, bool) \
                or not 0 < accept_timeout <= 300:
            raise NodeError("command argument 'accept_timeout' must be seconds in (0, 300]")
        self._forwards_made += 1
        fid = f"f{self._forwards_made}"

        def ended(fwd: RtpForwarder, reason: str) -> None:
            if ns.forwards.get(fid) is not fwd:
                return  # stopped by `unforward` or with its stream
            del ns.forwards[fid]
            self._emit({"event": "forward_ended", "stream": ns.key, "forward": fid, "reason": reason})

        fwd = RtpForwarder(ns.hub, host, port, transport=transport, ssrc=ssrc,
                           local_addr=(self.receiver.host, 0) if passive else None,
                           port_range=self.tcp_port_range if passive else None,
                           accept_timeout=float(accept_timeout), on_end=ended)
        try:
            await fwd.start()
        except OSError as exc:
            if passive:
                fix = "free a port of the media TCP port range or widen it" if self.tcp_port_range \
                    else "check the node's media host address"
                raise NodeError(f"cannot listen for the tcp-passive forward of {ns.key} on "
                                f"{self.receiver.host}: {exc}; {fix}") from None
            raise NodeError(f"cannot forward {ns.key} over {transport} to {host}:{port}: {exc}; "
                            f"check that the receiver listens there") from None
        except StreamClosed as exc:
            raise NodeError(f"cannot forward {ns.key}: its stream is closing ({exc})") from None
        if self.streams.get(ns.key) is not ns:  # closed while connecting
            await fwd.stop()
            raise NodeError(f"stream {ns.key} was closed while its forward was starting")
        ns.forwards[fid] = fwd
        return {"forward": fid, "port": fwd.port if passive else None}

    async def _unforward(self, args: dict) -> dict:
        key = _str(args, "stream")
        fid = _str(args, "forward")
        ns = self.streams.get(key)
        fwd = ns.forwards.pop(fid, None) if ns is not None else None
        if fwd is None:
            return {"stopped": False}
        await fwd.stop()
        return {"stopped": True, "packets_sent": fwd.packets_sent, "frames_sent": fwd.frames_sent,
                "bytes_sent": fwd.bytes_sent}

    async def _whep(self, args: dict) -> dict:
        ns = self.stream(_str(args, "stream"))
        offer = args.get("offer")
        host = _str(args, "host")
        ports = args.get("ports") or [0, 0]
        if not (isinstance(ports, list) and len(ports) == 2
                and all(isinstance(p, int) and not isinstance(p, bool) for p in ports)):
            raise NodeError("command argument 'ports' must be [low, high]")
        try:
            session, answer = await self.webrtc.open(ns.hub, offer if isinstance(offer, str) else "",
                                                     host, (ports[0], ports[1]))
        except OfferRefused as exc:
            return {"refused": str(exc), "status": exc.status}
        except (OSError, ValueError, TimeoutError) as exc:
            raise NodeError(f"cannot answer a WebRTC viewer of {ns.key}: {exc}") from None
        except StreamClosed as exc:
            raise NodeError(f"stream {ns.key} closed: {exc}") from None
        video = session.video
        return {"session": session.id, "answer": answer,
                "audio": session.audio is not None, "video": "h264" if video is not None else None}

    async def _whep_close(self, args: dict) -> dict:
        return {"closed": await self.webrtc.close(_str(args, "session"), "closed by the viewer")}

    def info(self, ns: NodeStream, now: float) -> dict:
        handle = ns.handle
        return {"stream": ns.key, "transport": ns.transport, "ssrc": ns.ssrc,
                "viewers": ns.hub.consumer_count, "media_from": handle.peer if handle else None,
                "ssrcs": list(handle.ssrcs) if handle else [],
                "health": ns.ingest.stats.as_dict(now), "elapsed": ns.elapsed,
                "recording": ns.recorder.progress() if ns.recorder is not None else None,
                "segments": ns.segments.progress() if ns.segments is not None else None,
                "forwards": [{"id": fid, "to": f"{fwd.transport}://{fwd.host}:{fwd.port}",
                              "transport": fwd.transport, "ssrc": fwd.ssrc, "peer": fwd.peer,
                              "running": fwd.running, "packets_sent": fwd.packets_sent,
                              "frames_sent": fwd.frames_sent, "bytes_sent": fwd.bytes_sent,
                              "error": str(fwd.error) if fwd.error else None}
                             for fid, fwd in ns.forwards.items()]}

    def _streams(self, args: dict) -> dict:
        now = time.monotonic()
        return {"streams": {key: self.info(ns, now) for key, ns in self.streams.items()}}

    def _mark(self, args: dict) -> dict:
        """Count ``elapsed`` from the next packet (a playback was sought)."""
        self.stream(_str(args, "stream")).mark_ts = None
        return {}

    def _viewers(self, args: dict) -> dict:
        ns = self.streams.get(_str(args, "stream"))
        return {"viewers": ns.hub.consumer_count if ns is not None else 0}

    def load(self) -> dict:
        return {"streams": len(self.streams), "max_streams": self.max_streams,
                "bitrate": round(self.bitrate), "cpu": round(self.cpu, 3),
                "viewers": sum(ns.hub.consumer_count for ns in self.streams.values()),
                "packets": self.packets_closed + sum(ns.ingest.stats.packets for ns in self.streams.values()),
                "lost": self.lost_closed + sum(ns.ingest.stats.lost for ns in self.streams.values()),
                "pid": os.getpid()}

    # -- watchdog --------------------------------------------------------------------------
    async def _watch(self) -> None:
        """Annex M: a stream whose RTP stopped is reported; the load is measured and sent."""
        next_load = 0.0
        while True:
            await asyncio.sleep(min(1.0, self.load_interval))
            now = time.monotonic()
            for ns in list(self.streams.values()):
                age = ns.ingest.stats.last_packet_age(now)
                if age is not None and age > self.idle_timeout:
                    self._emit({"event": "media_stopped", "stream": ns.key, "age": round(age, 1)})
                    await self._drop(ns.key, f"no RTP for {age:.0f} s")
            if now >= next_load:
                next_load = now + self.load_interval
                self._measure(now)
                self._emit({"event": "load", **self.load()})

    def _measure(self, now: float) -> None:
        wall0, cpu0 = self._cpu_mark
        cpu = time.process_time()
        self._cpu_mark = (now, cpu)
        elapsed = now - wall0
        if elapsed <= 0:
            return
        self.cpu = (cpu - cpu0) / elapsed
        total = 0
        for ns in self.streams.values():
            seen = ns.ingest.stats.bytes
            total += seen - ns.bytes_seen
            ns.bytes_seen = seen
        self.bitrate = 8 * total / elapsed

