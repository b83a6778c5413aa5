"""The ``gb28181 media-node`` process: a ``MediaNode``, the HTTP port its viewers use, and its
link to the signalling server.

The link is one WebSocket that the node opens to the server (``/api/v1/nodes/link``, the
node token as a Bearer credential), so a node behind NAT or on another machine joins the same
way as the server's own workers. Over it the node sends ``{"hello": ...}`` (where viewers and
devices reach it), then events; the server sends ``{"welcome": ...}`` (settings), then
commands ``{"id", "op", "args"}`` that the node answers ``{"id", "ok", "result"|"error"}``
(see ``media.node`` for both). Everything leaves the node through one queue, so events and
answers reach the server in the order they happened.

When the link drops, the node drops its streams (the server moves them to another node and
must not find them here twice) and dials again with back-off. Viewers fetch
``/live/<stream>.flv?exp=&sig=`` (HTTP-FLV, or WS-FLV on a WebSocket upgrade), signed by the
server with the node token (``media.playurl``); each view is reported to the server, which
audits it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from .http_flv import serve_http_flv, serve_ws_flv
from .node import MediaNode, NodeError
from .playurl import check_play

__all__ = ["NodeService", "NodeSettings", "LINK_PATH", "run_node"]

log = logging.getLogger("media.node_service")

LINK_PATH = "/api/v1/nodes/link"
_BACKOFF = (0.2, 0.5, 1.0, 2.0, 5.0)  # seconds between attempts to reach the server
_HEARTBEAT = 2.0  # WebSocket ping interval; a link silent for half of it more is dead


@dataclass(slots=True)
class NodeSettings:
    server: str  # the signalling server's HTTP base, e.g. http://10.0.0.1:8080
    token: str  # media.node_token of the server
    name: str = ""
    http_host: str = "0.0.0.0"
    http_port: int = 0
    public_url: str | None = None  # how viewers reach http_host:http_port, if not directly
    media_host: str = "0.0.0.0"
    media_address: str | None = None  # SDP c= for devices; None: the server's own choice
    rtp_port: int = 0
    tcp_port_range: tuple[int, int] | None = None
    max_streams: int = 1000
    parent_pid: int | None = None  # a worker of `gb28181 serve`: exit when it is gone
    ready_file: str | None = None
    data_dir: str = "media-node-data"  # downloads are written under <data_dir>/downloads


class NodeService:
    """See the module docstring."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.name = settings.name or f"node-{os.getpid()}"
        self.node = MediaNode(settings.media_host, name=self.name, udp_port=settings.rtp_port,
                              tcp_port_range=settings.tcp_port_range,
                              max_streams=settings.max_streams, on_event=self._event,
                              data_dir=settings.data_dir)
        self.http_port = settings.http_port
        self.linked = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._outbox: asyncio.Queue[dict] | None = None
        self._link_task: asyncio.Task | None = None
        self._stopping = False
        self.refused = ""  # why the server refused us, if it did

    # -- life cycle --------------------------------------------------------------------------
    async def start(self) -> None:
        await self.node.start()
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/live/{stream}.flv", self._live)
        app.router.add_get("/downloads/{name}.mp4", self._download)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.http_host, self.settings.http_port)
        await site.start()
        server = site._server
        if server is not None and server.sockets:  # type: ignore[attr-defined]
            self.http_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._link_task = asyncio.get_running_loop().create_task(self._link_forever())
        log.info("media node %s: RTP on %s:%d, viewers on %s:%d, server %s", self.name,
                 self.settings.media_host, self.node.udp_port, self.settings.http_host,
                 self.http_port, self.settings.server)

    async def stop(self) -> None:
        self._stopping = True
        if self._link_task is not None:
            self._link_task.cancel()
            await asyncio.gather(self._link_task, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.node.close()

    def hello(self) -> dict:
        s = self.settings
        return {"name": self.name, "http_port": self.http_port, "public_url": s.public_url,
                "media_address": s.media_address, "rtp_port": self.node.udp_port,
                "max_streams": s.max_streams, "pid": os.getpid(), "local": s.parent_pid is not None}

    # -- the link to the server -----------------------------------------------------------------
    def _event(self, event: dict) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(event)

    async def _link_forever(self) -> None:
        url = self.settings.server.rstrip("/") + LINK_PATH
        attempt = 0
        while not self._stopping:
            try:
                await self._link_once(url)
                attempt = 0
            except asyncio.CancelledError:
                raise
            except aiohttp.WSServerHandshakeError as exc:
                self.refused = (f"the server at {self.settings.server} refused the link ({exc.status}): "
                                "check the node token (--token / GB28181_NODE_TOKEN = the server's "
                                "media.node_token)" if exc.status in (401, 403) else str(exc))
                log.error("media node %s: %s", self.name, self.refused)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.warning("media node %s: cannot reach the server at %s: %s", self.name, url, exc)
            self.linked.clear()
            await self._drop_all("the link to the server was lost")
            await asyncio.sleep(_BACKOFF[min(attempt, len(_BACKOFF) - 1)])
            attempt += 1

    async def _link_once(self, url: str) -> None:
        headers = {"Authorization": f"Bearer {self.settings.token}"}
        async with aiohttp.ClientSession() as session, session.ws_connect(
                url, headers=headers, heartbeat=_HEARTBEAT, max_msg_size=1 << 20) as ws:
            await ws.send_json({"hello": self.hello()})
            first = await ws.receive(timeout=10.0)
            if first.type != aiohttp.WSMsgType.TEXT or "welcome" not in (welcome := json.loads(first.data)):
                raise aiohttp.ClientError(f"the server did not welcome us: {first.data!r}")
            settings = welcome["welcome"]
            self.node.idle_timeout = float(settings.get("idle_timeout", self.node.idle_timeout))
            self.node.load_interval = float(settings.get("load_interval", self.node.load_interval))
            self.refused = ""
            self._outbox = asyncio.Queue()
            writer = asyncio.get_running_loop().create_task(self._write(ws, self._outbox))
            self.linked.set()
            log.info("media node %s: linked to %s as %s", self.name, self.settings.server,
                     settings.get("node_id"))
            tasks: set[asyncio.Task] = set()
            try:
                async for msg in ws:
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    task = asyncio.get_running_loop().create_task(self._command(msg.data))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:
                self._outbox = None
                writer.cancel()
                for task in list(tasks):
                    task.cancel()
                await asyncio.gather(writer, *tasks, return_exceptions=True)

    @staticmethod
    async def _write(ws: aiohttp.ClientWebSocketResponse, outbox: asyncio.Queue[dict]) -> None:
        while True:
            message = await outbox.get()
            await ws.send_str(json.dumps(message, separators=(",", ":")))

    async def _command(self, data: str) -> None:
        try:
            msg = json.loads(data)
            ident, op, args = msg["id"], msg["op"], msg.get("args", {})
        except (ValueError, KeyError, TypeError):
            log.warning("media node %s: unreadable command from the server: %.200r", self.name, data)
            return
        reply: dict[str, Any] = {"id": ident}
        try:
            reply.update(ok=True, result=await self.node.call(op, args))
        except NodeError as exc:
            reply.update(ok=False, error=str(exc))
        except Exception as exc:  # a bug: answer anyway, the server must not wait forever
            log.exception("media node %s: command %s failed", self.name, op)
            reply.update(ok=False, error=f"internal error in media node {self.name}: {exc}")
        if self._outbox is not None:
            self._outbox.put_nowait(reply)

    async def _drop_all(self, reason: str) -> None:
        for key in list(self.node.streams):
            await self.node.call("close", {"stream": key, "reason": reason})

    # -- viewers ---------------------------------------------------------------------------------
    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"name": self.name, "linked": self.linked.is_set(),
                                  "refused": self.refused or None, **self.node.load()})

    async def _live(self, request: web.Request) -> web.StreamResponse:
        key = request.match_info["stream"]
        if not check_play(self.settings.token, key, request.query):
            return web.json_response({"error": "play URL signature is wrong or expired: ask the "
                                      "server (POST /api/v1/channels/{id}/play) for a new URL"}, status=403)
        ns = self.node.streams.get(key)
        if ns is None:
            return web.json_response({"error": f"stream {key} is not on media node {self.name} (any "
                                      "more): open the server's /live URL, which sends you to the "
                                      "node that carries it"}, status=404)
        websocket = request.headers.get("Upgrade", "").lower() == "websocket"
        self._event({"event": "viewer", "stream": key, "remote": request.remote or "",
                     "output": "ws-flv" if websocket else "http-flv"})
        if websocket:
            return await serve_ws_flv(request, ns.hub)
        return await serve_http_flv(request, ns.hub)


    async def _download(self, request: web.Request) -> web.StreamResponse:
        """A finished download's MP4 (HTTP Range served by aiohttp), signed like a play URL."""
        name = request.match_info["name"]
        if not check_play(self.settings.token, name, request.query):
            return web.json_response({"error": "download URL signature is wrong or expired: ask the "
                                      "server (GET /api/v1/downloads/{id}/file) again"}, status=403)
        path = self.node.data_dir / "downloads" / f"{name}.mp4"
        if "/" in name or not path.is_file():
            return web.json_response({"error": f"no file {name}.mp4 on media node {self.name}"}, status=404)
        return web.FileResponse(path, headers={"Content-Type": "video/mp4"})


def run_node(settings: NodeSettings) -> int:
    """Run a node until SIGINT/SIGTERM (or, for a worker, until its parent is gone)."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is optional on platforms without it
        pass

    async def main() -> None:
        service = NodeService(settings)
        try:
            await service.start()
        except OSError as exc:
            await service.stop()
            raise SystemExit(f"gb28181 media-node: cannot bind: {exc}. Free the port or choose "
                             "another with --http-port / --rtp-port.") from None
        if settings.ready_file:
            tmp = settings.ready_file + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"pid": os.getpid(), "http_port": service.http_port,
                           "rtp_port": service.node.udp_port}, f)
            os.replace(tmp, settings.ready_file)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            with_parent = settings.parent_pid
            if with_parent is not None and os.getppid() != with_parent:
                log.warning("media node %s: the server (pid %d) is gone: stopping", service.name, with_parent)
                break
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass
        await service.stop()

    asyncio.run(main())
    return 0
