"""HTTP-FLV and WebSocket-FLV outputs (aiohttp handlers) over a hub `Stream`.

Each viewer is one hub consumer with its own `FlvMuxer`: it starts at the cached GOP's
keyframe, so playback begins at once. An HTTP-FLV viewer is written to from `publish`
itself (`Consumer.listen`, `_PushWriter`): each frame is muxed and handed to the socket
in the call that published it, with no task switch. The socket's flow control is the
viewer's pace: while the transport is paused, the handler's task waits for it to drain
and the viewer reads nothing; one that falls behind is skipped to a keyframe by the hub,
so a slow client costs a bounded amount of memory (the hub's shared ring plus the
transport's write buffer). WS-FLV viewers read in their own task.

The FLV header is written with the first packet, so that `audio=None` can decide from the
stream's stats whether to announce an audio track (the cached GOP usually tells).

Both handlers end cleanly when the stream closes (the HTTP body ends with the last tag /
the WebSocket is closed with 1000) or the client leaves, and close their consumer in
every case. Routing, authentication and CORS are left to the application.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractStreamWriter

from .flv import FlvMuxer
from .hub import Consumer, Stream, StreamClosed

__all__ = ["serve_http_flv", "serve_ws_flv", "FLV_CONTENT_TYPE"]

log = logging.getLogger(__name__)

FLV_CONTENT_TYPE = "video/x-flv"
# Packets already waiting are joined into one write up to this many bytes (a GOP-cache
# burst at start becomes a few large writes instead of one per frame).
_COALESCE_BYTES = 256 * 1024
# How often a silent stream checks whether the HTTP client has gone.
_WATCH_INTERVAL = 1.0

_CLIENT_GONE = (ConnectionError, asyncio.IncompleteReadError)


def _consumer_name(request: web.Request, kind: str) -> str:
    peer = request.remote or "?"
    return f"{kind} {peer}"


async def _next_parts(consumer: Consumer, muxer_box: list, stream: Stream, audio: bool | None
                      ) -> tuple[list, int]:
    """Wait for the next packet, then mux it and whatever else is ready: (FLV parts, size).

    The parts are not joined (see `FlvMuxer.mux_parts`). Raises StreamClosed when the
    consumer or stream is closed.
    """
    pkt = await consumer.get()
    muxer = muxer_box[0]
    parts: list = []
    size = 0
    if muxer is None:
        has_audio = stream.stats.audio_codec is not None if audio is None else audio
        muxer = muxer_box[0] = FlvMuxer(video=True, audio=has_audio)
        head = muxer.header()
        parts.append(head)
        size = len(head)
    mux_parts = muxer.mux_parts
    get_nowait = consumer.get_nowait
    while True:
        size += mux_parts(pkt, parts)
        if size >= _COALESCE_BYTES:
            break
        nxt = get_nowait()
        if nxt is None:
            break
        pkt = nxt
    return parts, size


class _PushWriter:
    """A consumer's listener (`Consumer.listen`): muxes what the hub has for it and writes
    it to the HTTP transport inside `Stream.publish`, so no task switch per frame.

    Each write is one HTTP/1.1 chunk (RFC 9112 7.1: size line, data, CRLF) handed to the
    transport as the muxer's parts (no joined copy of the frame). When the transport is
    paused (the client reads too slowly), closing, or something failed, it resolves `kick`
    and stops: the handler's task takes over (drains, ends the response).
    """

    __slots__ = ("consumer", "muxer", "transport", "writer", "kick", "high", "error")

    def __init__(self, consumer: Consumer, muxer: FlvMuxer, transport: asyncio.Transport,
                 writer: AbstractStreamWriter, kick: asyncio.Future) -> None:
        self.consumer = consumer
        self.muxer = muxer
        self.transport = transport
        self.writer = writer
        self.kick = kick
        self.high = transport.get_write_buffer_limits()[1]  # paused above this
        self.error: BaseException | None = None

    def __call__(self) -> None:
        kick = self.kick
        if kick.done():
            return
        consumer = self.consumer
        transport = self.transport
        try:
            while not (consumer.closed or transport.is_closing()
                       or transport.get_write_buffer_size() > self.high):
                pkt = consumer.get_nowait()
                if pkt is None:
                    return  # caught up
                parts: list = [b""]
                size = self.muxer.mux_parts(pkt, parts)
                while size < _COALESCE_BYTES:
                    pkt = consumer.get_nowait()
                    if pkt is None:
                        break
                    size += self.muxer.mux_parts(pkt, parts)
                if size:
                    parts[0] = b"%x\r\n" % size
                    parts.append(b"\r\n")
                    transport.writelines(parts)
                    self.writer.output_size += size
        except Exception as exc:
            self.error = exc
        kick.set_result(None)


async def _next_chunk(consumer: Consumer, muxer_box: list, stream: Stream, audio: bool | None) -> bytes:
    """`_next_parts` joined into one chunk."""
    parts, _ = await _next_parts(consumer, muxer_box, stream, audio)
    return b"".join(parts)


async def serve_http_flv(
    request: web.Request, stream: Stream, *, audio: bool | None = None
) -> web.StreamResponse:
    """Stream `stream` as HTTP-FLV (chunked `video/x-flv`) until the client or stream ends.

    `audio`: write the audio track (G.711) — None means "if the stream has audio".
    Returns 404 if the stream is already closed.
    """
    try:
        consumer = stream.subscribe(_consumer_name(request, "http-flv"))
    except StreamClosed:
        return web.Response(status=404, text="stream closed\n")
    watchdog: asyncio.Task | None = None
    resp = web.StreamResponse(
        headers={
            "Content-Type": FLV_CONTENT_TYPE,
            "Cache-Control": "no-cache, no-store",
            "X-Accel-Buffering": "no",  # no proxy buffering (nginx)
        }
    )
    resp.enable_chunked_encoding()
    try:
        await resp.prepare(request)
        watchdog = asyncio.create_task(_watch_http_client(request, consumer))
        muxer_box: list[FlvMuxer | None] = [None]
        while True:
            # The first chunk goes through aiohttp, which sends the response head with it.
            try:
                parts, size = await _next_parts(consumer, muxer_box, stream, audio)
            except StreamClosed:
                break
            if size:
                await resp.write(b"".join(parts))
                muxer = muxer_box[0]
                assert muxer is not None  # made with the first chunk
                await _push(request, consumer, muxer)
                break
        if stream.closed:
            # The stream ended: finish the chunked body so the client sees a clean end.
            with contextlib.suppress(*_CLIENT_GONE):
                await resp.write_eof()
        return resp
    except _CLIENT_GONE:
        log.debug("http-flv client %s left stream %s", request.remote, stream.key)
        return resp
    finally:
        consumer.close()
        if watchdog is not None:
            watchdog.cancel()


async def _push(request: web.Request, consumer: Consumer, muxer: FlvMuxer) -> None:
    """Write the consumer's packets as they are published (`_PushWriter`) until it closes.

    Raises ConnectionResetError when the client has gone.
    """
    transport = request.transport
    writer = request.writer
    loop = asyncio.get_running_loop()
    while True:
        if transport is None or transport.is_closing():
            raise ConnectionResetError("HTTP-FLV client transport closed")
        kick = loop.create_future()
        pusher = _PushWriter(consumer, muxer, transport, writer, kick)
        consumer.listen(pusher)
        try:
            pusher()  # what was published since
            await kick
        finally:
            consumer.listen(None)
        if consumer.closed:
            return
        if pusher.error is not None:
            raise pusher.error
        if transport.is_closing():
            raise ConnectionResetError("HTTP-FLV client transport closed")
        await writer.drain()  # paused: the client reads slower than the stream comes


async def _watch_http_client(request: web.Request, consumer: Consumer) -> None:
    """Close the consumer when the client's connection goes, even if no packet comes."""
    while not consumer.closed:
        await asyncio.sleep(_WATCH_INTERVAL)
        transport = request.transport
        if transport is None or transport.is_closing():
            consumer.close()
            return


async def serve_ws_flv(
    request: web.Request, stream: Stream, *, audio: bool | None = None
) -> web.WebSocketResponse:
    """Stream `stream` as FLV in binary WebSocket messages (mpegts.js / flv.js over WS).

    The first message is the FLV header together with the first tags; each later message
    holds the tags of one or more packets. Incoming messages are ignored. The socket is
    closed with 1000 when the stream ends, and 1011 if it was already closed.
    """
    ws = web.WebSocketResponse(compress=False, heartbeat=30.0, max_msg_size=4096)
    await ws.prepare(request)
    try:
        consumer = stream.subscribe(_consumer_name(request, "ws-flv"))
    except StreamClosed:
        await ws.close(code=1011, message=b"stream closed")
        return ws
    reader = asyncio.create_task(_drain_ws(ws, consumer))
    try:
        muxer_box: list[FlvMuxer | None] = [None]
        while True:
            try:
                chunk = await _next_chunk(consumer, muxer_box, stream, audio)
            except StreamClosed:
                break
            if chunk:
                await ws.send_bytes(chunk)
    except _CLIENT_GONE:
        log.debug("ws-flv client %s left stream %s", request.remote, stream.key)
    finally:
        consumer.close()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, *_CLIENT_GONE):
            await reader
        if not ws.closed:
            with contextlib.suppress(*_CLIENT_GONE):
                await ws.close(code=1000, message=b"stream ended")
    return ws


async def _drain_ws(ws: web.WebSocketResponse, consumer: Consumer) -> None:
    """Read (and ignore) client messages; the client closing ends the consumer."""
    try:
        async for msg in ws:
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                break
    finally:
        consumer.close()
