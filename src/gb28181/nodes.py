"""Media nodes as the signalling server sees them: which exist, how loaded, which stream is where.

The relay's work (RTP receive, PS demux, the hub, HTTP-FLV/WS-FLV and RTP forward outputs) is
done by media nodes (``media.node``); the server only decides. ``NodeManager`` knows the nodes:

- ``media.workers: 0``: one ``LocalNode``, a ``MediaNode`` inside this process, called directly;
- ``media.workers: N`` (``auto``: one per CPU core): N ``gb28181 media-node`` processes that
  ``nodes_workers.Workers`` starts, watches and restarts, each joining over the same link as a
  node on another machine (``RemoteNode``, a WebSocket at ``media.node_service.LINK_PATH``,
  authenticated with ``media.node_token``).

A new stream goes to the least-loaded node that has room: the fewest streams for its limit plus,
on a node busier than half a core, its CPU share (``choose``). Its ``MediaLeg`` is the server's
handle on that stream: commands go through it, and the node's events for the stream come back
to it. When a remote node's link drops (the process died, the machine is gone: the WebSocket
heartbeat notices within seconds), ``on_node_lost`` gets the legs it carried, so the stream
manager re-establishes them elsewhere.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from media.hub import Stream
from media.node import MediaNode, NodeError
from media.playurl import play_query

__all__ = ["LocalNode", "MediaLeg", "NodeCallError", "NodeHandle", "NodeManager", "RemoteNode"]

log = logging.getLogger("gb28181.nodes")

CALL_TIMEOUT = 20.0  # seconds a node has to answer a command (connect tries two hosts x 5 s)
NO_NODE_WAIT = 10.0  # seconds a new stream waits for a first node to link
BUSY_CPU = 0.5  # a node's CPU share (of one core) counts in the choice of a node from here on
LINK_HEARTBEAT = 2.0  # WebSocket ping interval on the link; a dead node is noticed within ~3 s


class NodeHello(BaseModel):
    """What a node says first on its link (``media.node_service.NodeService.hello``)."""

    model_config = ConfigDict(extra="ignore")
    name: str = Field("", max_length=64)
    http_port: int = Field(ge=1, le=65535)
    rtp_port: int = Field(ge=1, le=65535)
    public_url: str | None = Field(None, max_length=255, pattern=r"^https?://")
    media_address: str | None = Field(None, max_length=255)
    max_streams: int = Field(1000, ge=1, le=1_000_000)
    pid: int | None = None
    local: bool = False


class NodeLoad(BaseModel):
    """A node's ``load`` event; anything else in it is ignored."""

    model_config = ConfigDict(extra="ignore")
    streams: int = Field(0, ge=0)
    viewers: int = Field(0, ge=0)
    bitrate: float = Field(0.0, ge=0)
    cpu: float = Field(0.0, ge=0)
    packets: int = Field(0, ge=0)  # RTP packets received since the node started
    lost: int = Field(0, ge=0)  # of which given up as lost


class NodeCallError(RuntimeError):
    """A command to a node failed: the node refused it, or the node is gone."""


class NodeHandle:
    """One media node as the manager sees it."""

    local = False

    def __init__(self, node_id: str, name: str, max_streams: int) -> None:
        self.node_id = node_id
        self.name = name
        self.max_streams = max_streams
        self.legs: dict[str, MediaLeg] = {}
        self.load: dict[str, Any] = {}
        self.alive = True
        self.joined_at = time.time()

    async def call(self, op: str, args: dict) -> dict:
        raise NotImplementedError

    def media_address(self) -> str | None:
        """The address devices send this node's RTP to; None: the server's own (same host)."""
        return None

    def viewer_base(self, request_host: str) -> str | None:
        """Where viewers fetch streams (``http://host:port``); None: from the server itself."""
        return None

    @property
    def cpu(self) -> float:
        return float(self.load.get("cpu", 0.0))

    def as_dict(self) -> dict:
        return {"node_id": self.node_id, "name": self.name, "local": self.local, "alive": self.alive,
                "streams": len(self.legs), "max_streams": self.max_streams,
                "joined_at": self.joined_at, "load": self.load}


class LocalNode(NodeHandle):
    """A ``MediaNode`` in the server's own process (``media.workers: 0``)."""

    local = True

    def __init__(self, node: MediaNode) -> None:
        super().__init__("local", node.name, node.max_streams)
        self.node = node

    async def call(self, op: str, args: dict) -> dict:
        try:
            return await self.node.call(op, args)
        except NodeError as exc:
            raise NodeCallError(str(exc)) from None


class RemoteNode(NodeHandle):
    """A node process linked over a WebSocket (a local worker, or a node on another machine)."""

    def __init__(self, node_id: str, hello: NodeHello, ws: web.WebSocketResponse, peer: str) -> None:
        super().__init__(node_id, hello.name or node_id, hello.max_streams)
        self.hello = hello
        self.ws = ws
        self.peer = peer
        self.worker = hello.local
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}

    async def call(self, op: str, args: dict) -> dict:
        if not self.alive:
            raise NodeCallError(f"media node {self.name} is gone")
        ident = next(self._ids)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[ident] = fut
        try:
            await self.ws.send_str(json.dumps({"id": ident, "op": op, "args": args}, separators=(",", ":")))
            return await asyncio.wait_for(fut, CALL_TIMEOUT)
        except TimeoutError:
            raise NodeCallError(f"media node {self.name} did not answer {op} within {CALL_TIMEOUT:g} s") from None
        except ConnectionError as exc:
            raise NodeCallError(f"media node {self.name} is unreachable: {exc}") from None
        finally:
            self._pending.pop(ident, None)

    def answered(self, msg: dict) -> None:
        fut = self._pending.get(msg.get("id", -1))
        if fut is None or fut.done():
            return
        if msg.get("ok"):
            result = msg.get("result")
            fut.set_result(result if isinstance(result, dict) else {})
        else:
            fut.set_exception(NodeCallError(str(msg.get("error") or "the media node refused")))

    def lost(self) -> None:
        self.alive = False
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(NodeCallError(f"media node {self.name} is gone"))

    def media_address(self) -> str | None:
        if self.hello.media_address:
            return self.hello.media_address
        return None if self.worker else self.peer

    def viewer_base(self, request_host: str) -> str | None:
        if self.hello.public_url:
            return self.hello.public_url.rstrip("/")
        host = request_host if self.worker else self.peer
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self.hello.http_port}"

    def as_dict(self) -> dict:
        h = self.hello
        return {**super().as_dict(), "peer": self.peer, "worker": self.worker, "pid": h.pid,
                "rtp_port": h.rtp_port, "http_port": h.http_port, "media_address": h.media_address,
                "public_url": h.public_url}


class LegOwner(Protocol):
    """Who opened a stream (live streams, playbacks) hears what its node says of it."""

    def leg_idle(self, leg: MediaLeg) -> None: ...

    def leg_stopped(self, leg: MediaLeg, why: str) -> None: ...

    def legs_lost(self, node: NodeHandle, legs: list[MediaLeg]) -> None: ...


class MediaLeg:
    """One stream on one node, from the server's side: commands out, the node's events in."""

    def __init__(self, manager: NodeManager, node: NodeHandle, key: str, owner: LegOwner | None) -> None:
        self.manager = manager
        self.node = node
        self.key = key
        self.owner = owner
        self.first_packet = asyncio.Event()  # also set when the node is lost (see node_lost)
        self.peer: tuple[str, int] | None = None
        self.released = False
        self.node_lost = False

    async def call(self, op: str, **args: Any) -> dict:
        return await self.node.call(op, {"stream": self.key, **args})

    def play_url(self, request_host: str, ttl: int, scheme: str = "http") -> str | None:
        """A signed URL of this stream on its node; None when the server itself serves it."""
        base = self.node.viewer_base(request_host)
        if base is None:
            return None
        if scheme == "ws":
            base = "ws" + base[4:] if base.startswith("http") else base
        expires = int(time.time()) + ttl
        return f"{base}/live/{self.key}.flv?{play_query(self.manager.token, self.key, expires)}"

    async def release(self, reason: str) -> None:
        """Close the stream on its node (if the node is still there) and forget it, once."""
        if self.released:
            return
        self.released = True
        if self.node.legs.get(self.key) is self:
            del self.node.legs[self.key]
        if self.node.alive:
            try:
                await self.node.call("close", {"stream": self.key, "reason": reason})
            except NodeCallError:
                pass


class NodeManager:
    """See the module docstring."""

    def __init__(self, *, token: str, idle_timeout: float, load_interval: float = 2.0) -> None:
        self.token = token
        self.idle_timeout = idle_timeout
        self.load_interval = load_interval
        self.nodes: dict[str, NodeHandle] = {}
        self.local: LocalNode | None = None
        self.joined = asyncio.Condition()
        # Set by the server: views on a node are audited there.
        self.on_viewer: Callable[[MediaLeg, dict], None] | None = None
        #: Set by the server: a forward ended by itself (its receiver went away): (leg, forward ID, reason).
        self.on_forward_ended: Callable[[MediaLeg, str, str], None] | None = None
        #: Set by the server: a recording segment opened, closed or failed (recording.py).
        self.on_segment: Callable[[MediaLeg | None, dict], None] | None = None
        self.stopping = False  # the server is stopping: lost nodes' streams are not moved
        self._ids = itertools.count(1)
        self.lost_total = 0

    # -- nodes -----------------------------------------------------------------------------
    async def start_local(self, node: MediaNode) -> LocalNode:
        node.on_event = lambda ev, n=node: self._event(self.local, ev) if self.local else None
        node.idle_timeout = self.idle_timeout
        await node.start()
        self.local = LocalNode(node)
        self.nodes[self.local.node_id] = self.local
        async with self.joined:
            self.joined.notify_all()
        return self.local

    async def stop(self) -> None:
        if self.local is not None:
            await self.local.node.close()
        for handle in list(self.nodes.values()):
            if isinstance(handle, RemoteNode):
                await handle.ws.close()

    def local_stream(self, key: str) -> Stream | None:
        """The hub stream of ``key`` when the in-process node carries it."""
        if self.local is None:
            return None
        ns = self.local.node.streams.get(key)
        return ns.hub if ns is not None else None

    def alive(self) -> list[NodeHandle]:
        return [n for n in self.nodes.values() if n.alive]

    async def wait_for_nodes(self, count: int, timeout: float) -> int:
        """Wait until ``count`` nodes are linked (or ``timeout``); returns how many are."""
        async def enough() -> None:
            async with self.joined:
                await self.joined.wait_for(lambda: len(self.alive()) >= count)
        try:
            await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            pass
        return len(self.alive())

    def choose(self, exclude: NodeHandle | None = None) -> NodeHandle:
        """The least-loaded node with room: streams for its limit, plus its CPU share once that
        is past ``BUSY_CPU``. Below it a node's CPU is noise (a few percent that jump with every
        load report) and would decide alone between nodes the stream counts say are alike."""
        candidates = [n for n in self.alive() if n is not exclude and len(n.legs) < n.max_streams]
        if not candidates:
            alive = self.alive()
            if not alive:
                raise NodeCallError("no media node is linked: check the server log for the media "
                                    "workers, or start `gb28181 media-node` with the node token")
            raise NodeCallError(f"every media node is full ({sum(len(n.legs) for n in alive)} streams "
                                "on " + ", ".join(n.name for n in alive) + "): add a node or raise "
                                "its --max-streams")
        def load(n: NodeHandle) -> float:
            return len(n.legs) / n.max_streams + (min(n.cpu, 1.0) if n.cpu >= BUSY_CPU else 0.0)
        return min(candidates, key=lambda n: (load(n), n.node_id))

    async def allocate(self, key: str, owner: LegOwner | None = None,
                       exclude: NodeHandle | None = None) -> MediaLeg:
        """A leg for stream ``key`` on the node ``choose`` picks. With no node linked at all
        (the workers are still starting, or being restarted) it waits ``NO_NODE_WAIT`` first."""
        if not self.alive():
            await self.wait_for_nodes(1, NO_NODE_WAIT)
        node = self.choose(exclude)
        leg = MediaLeg(self, node, key, owner)
        old = node.legs.get(key)
        if old is not None:
            old.released = True
        node.legs[key] = leg
        return leg

    # -- events ------------------------------------------------------------------------------
    def _event(self, node: NodeHandle | None, ev: dict) -> None:
        if node is None:
            return
        kind = ev.get("event")
        if kind == "load":
            try:
                node.load = NodeLoad.model_validate(ev).model_dump()
            except ValidationError:
                log.warning("media node %s sent an unreadable load report: %.200r", node.name, ev)
            return
        leg = node.legs.get(str(ev.get("stream")))
        if kind == "segment":
            # Also after the stream's leg is gone: its last segment closes as the stream ends.
            if self.on_segment is not None:
                self.on_segment(leg, ev)
            return
        if leg is None or leg.released:
            return
        if kind == "first_packet":
            peer = ev.get("peer")
            leg.peer = (str(peer[0]), int(peer[1])) if isinstance(peer, (list, tuple)) and len(peer) == 2 else None
            leg.first_packet.set()
        elif kind == "idle" and leg.owner is not None:
            leg.owner.leg_idle(leg)
        elif kind == "media_stopped" and leg.owner is not None:
            leg.owner.leg_stopped(leg, f"no RTP for {ev.get('age', '?')} s")
        elif kind == "viewer" and self.on_viewer is not None:
            self.on_viewer(leg, ev)
        elif kind == "forward_ended" and self.on_forward_ended is not None:
            self.on_forward_ended(leg, str(ev.get("forward")), str(ev.get("reason") or "the receiver went away"))

    # -- the link (aiohttp handler) ----------------------------------------------------------------
    async def link(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/v1/nodes/link``: a node joins (WebSocket, Bearer node token)."""
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not token or not secrets.compare_digest(token.encode(), self.token.encode()):
            return web.json_response({"error": "wrong or missing node token: start the node with "
                                      "--token (or GB28181_NODE_TOKEN) = the server's media.node_token "
                                      "(DATA_DIR/node-token)"}, status=401)
        ws = web.WebSocketResponse(heartbeat=LINK_HEARTBEAT, max_msg_size=4 << 20)
        await ws.prepare(request)
        try:
            first = await ws.receive(timeout=10.0)
            hello = NodeHello.model_validate(json.loads(first.data)["hello"])
        except (TimeoutError, ValueError, TypeError, KeyError, ValidationError) as exc:
            why = f"the first message must be a valid hello: {str(exc)[:300]}"
            log.warning("media node link from %s refused: %s", request.remote, why)
            await ws.close(code=4000, message=why.encode()[:120])
            return ws
        node = RemoteNode(f"n{next(self._ids)}", hello, ws, request.remote or "")
        self.nodes[node.node_id] = node
        await ws.send_json({"welcome": {"node_id": node.node_id, "idle_timeout": self.idle_timeout,
                                        "load_interval": self.load_interval}})
        log.info("media node %s (%s) joined from %s: RTP port %d, viewers on port %d", node.name,
                 node.node_id, node.peer, hello.rtp_port, hello.http_port)
        async with self.joined:
            self.joined.notify_all()
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(data, dict):
                    continue
                if "id" in data:
                    node.answered(data)
                elif "event" in data:
                    self._event(node, data)
        finally:
            self._lost(node)
        return ws

    def _lost(self, node: RemoteNode) -> None:
        node.lost()
        self.nodes.pop(node.node_id, None)
        legs = [leg for leg in node.legs.values() if not leg.released]
        node.legs.clear()
        for leg in legs:
            leg.node_lost = True
            leg.first_packet.set()  # an INVITE waiting for this node's first packet gives up now
        self.lost_total += 1
        log.warning("media node %s (%s) is gone, with %d streams", node.name, node.node_id, len(legs))
        if self.stopping:
            return
        owners: dict[int, tuple[LegOwner, list[MediaLeg]]] = {}
        for leg in legs:
            if leg.owner is not None:
                owners.setdefault(id(leg.owner), (leg.owner, []))[1].append(leg)
        for owner, owned in owners.values():
            owner.legs_lost(node, owned)

    def as_list(self) -> list[dict]:
        return [n.as_dict() for n in self.nodes.values()]
