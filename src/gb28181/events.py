"""The live event feed: alarms, device and channel state changes, to SSE clients and webhooks.

What happens on the platform is published here: alarms (GB/T 28181-2016 §9.4, Annex A.2.5;
``alarms.py`` publishes each once it is stored), mobile position fixes (§9.11.2; ``positions.py``,
likewise), devices going online or offline (the device registry's listener) and channels
changing effective state (the channel registry's listener).
``EventBus.publish`` stamps an event with an ID and its time, keeps the last ``history`` events
in a ring and hands the event on without waiting for anyone:

- to every SSE client (``serve_sse``, ``GET /api/v1/events`` in api_events.py) through a bounded
  queue: a client that falls ``sse_backlog`` events behind is cut off instead of being buffered
  without bound, and resumes from the ring with ``Last-Event-ID`` when it reconnects (an ``event:
  gap`` tells it when the ring no longer holds what it missed);
- to every webhook (``WebhookSink``) through a bounded queue per URL: beyond ``webhook_queue``
  the oldest event is dropped and counted, so a dead receiver costs a fixed amount of memory
  and never slows alarm handling.

A webhook delivery is one JSON POST of the event, with ``X-GB28181-Signature: sha256=<hex
HMAC-SHA256 of the body with the secret>`` (``sign``/``verify``), ``X-GB28181-Timestamp`` (the
attempt's Unix time), ``X-GB28181-Event`` and ``X-GB28181-Delivery`` (the event ID, the same on
every attempt, so a receiver can drop duplicates). Connection errors, timeouts, 408, 429 and 5xx
are retried after ``Backoff`` delays (``webhook_retry_min`` doubled per failure up to
``webhook_retry_max``, jittered) for as long as the event is queued; other answers are final.
The HTTP call, the clock and the sleep are injected, so back-off is tested with a fake clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from .config import ConfigError, EventsSection, Webhook
from .manscdp import BEIJING

__all__ = ["Backoff", "Event", "EventBus", "SseClient", "WebhookSink", "iso", "sign", "verify"]

log = logging.getLogger("gb28181.events")

#: Event types, and the ``events`` category of a webhook each belongs to.
TYPES = {"alarm": "alarm", "device.online": "device", "device.offline": "device",
         "channel.state": "channel", "position": "position",
         "upstream.registered": "upstream", "upstream.lost": "upstream", "storage.low": "storage"}
SIGNATURE_HEADER = "X-GB28181-Signature"
TIMESTAMP_HEADER = "X-GB28181-Timestamp"

Post = Callable[[str, bytes, dict[str, str]], Awaitable[int]]


def iso(ts: float | None) -> str | None:
    """Beijing time with milliseconds (§9.10 times are Beijing local time)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, BEIJING).isoformat(timespec="milliseconds")


def sign(secret: str, body: bytes) -> str:
    """The ``X-GB28181-Signature`` value of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """Whether ``header`` is the signature of ``body`` with ``secret`` (constant time)."""
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode())


@dataclass(slots=True)
class Event:
    """One published event; ``body`` is its JSON, shared by SSE frames and webhook POSTs."""

    id: int
    type: str
    at: float
    data: dict[str, Any]
    _body: bytes = field(default=b"", repr=False)
    _frame: bytes = field(default=b"", repr=False)

    @property
    def body(self) -> bytes:
        """The JSON, encoded when first read: most events (a registration storm's thousands of
        ``device.online``) reach no SSE client and no webhook, and are never encoded at all."""
        if not self._body:
            self._body = json.dumps({"id": self.id, "type": self.type, "at": iso(self.at),
                                     "data": self.data},
                                    ensure_ascii=False, separators=(",", ":")).encode()
        return self._body

    @property
    def frame(self) -> bytes:
        """The SSE frame (``id:``, ``event:``, ``data:`` lines), built once for all clients."""
        if not self._frame:
            self._frame = b"id: %d\nevent: %s\ndata: %s\n\n" % (self.id, self.type.encode(), self.body)
        return self._frame


class SseClient:
    """One SSE connection's queue; ``dropped`` once it fell ``limit`` events behind."""

    __slots__ = ("queue", "limit", "types", "visible", "wake", "dropped", "closed", "abort")

    def __init__(self, limit: int, types: frozenset[str] | None,
                 visible: Callable[[Event], bool] | None = None) -> None:
        self.queue: deque[Event] = deque()
        self.limit = limit
        self.types = types
        #: Whether this client may see an event (a user's scope); None: every event.
        self.visible = visible
        self.wake = asyncio.Event()
        self.dropped = False
        self.closed = False
        #: Closes the connection at once: a writer stuck on a client that stopped reading.
        self.abort: Callable[[], None] | None = None

    def offer(self, event: Event) -> bool:
        """Queue ``event``; False (and dropped) when the client is too far behind."""
        if self.types is not None and TYPES.get(event.type, event.type) not in self.types:
            return True
        if self.visible is not None and not self.visible(event):
            return True
        if len(self.queue) >= self.limit:
            self.dropped = True
            self.queue.clear()
            self.wake.set()
            if self.abort is not None:
                self.abort()
            return False
        self.queue.append(event)
        self.wake.set()
        return True


class Backoff:
    """Delay before retry number ``failures`` (1, 2, ...): ``first`` doubled each time, at most
    ``most``, spread by ±``jitter`` so that retries after an outage do not arrive together."""

    def __init__(self, first: float, most: float, *, jitter: float = 0.2,
                 rand: Callable[[], float] = random.random) -> None:
        self.first = first
        self.most = max(first, most)
        self.jitter = jitter
        self.rand = rand

    def delay(self, failures: int) -> float:
        base = min(self.most, self.first * 2 ** min(max(failures - 1, 0), 30))
        return base * (1 + self.jitter * (2 * self.rand() - 1))


def _retryable(status: int) -> bool:
    return status == 0 or status in (408, 429) or status >= 500


class WebhookSink:
    """Delivers events to one URL: a bounded queue and ``concurrency`` workers; see the module
    docstring. ``post(url, body, headers)`` returns the HTTP status, or 0 when no answer came."""

    def __init__(self, hook: Webhook, *, post: Post, queue_size: int = 10000,
                 concurrency: int = 4, backoff: Backoff | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 clock: Callable[[], float] = time.time) -> None:
        self.url = hook.url
        self.secret = hook.secret
        self.categories = frozenset(hook.events) or None
        self.post = post
        self.queue: deque[Event] = deque()
        self.queue_size = queue_size
        self.concurrency = concurrency
        self.backoff = backoff or Backoff(1.0, 60.0)
        self.sleep = sleep
        self.clock = clock
        self.ready = asyncio.Event()
        #: delivered, retried (attempts that will be repeated), failed (final refusals),
        #: dropped (pushed out of a full queue).
        self.counts: Counter[str] = Counter()
        self.in_flight = 0
        self.last_error = ""
        self._tasks: list[asyncio.Task] = []
        parts = urlsplit(self.url)
        #: The URL as metrics label it: no query string or credentials, which may hold secrets.
        self.label = f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}{parts.path}"

    def offer(self, event: Event) -> None:
        if self.categories is not None and TYPES.get(event.type, event.type) not in self.categories:
            return
        if len(self.queue) >= self.queue_size:
            self.queue.popleft()
            self.counts["dropped"] += 1
        self.queue.append(event)
        self.ready.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks = []

    async def _worker(self) -> None:
        while True:
            while not self.queue:
                self.ready.clear()
                await self.ready.wait()
            event = self.queue.popleft()
            self.in_flight += 1
            try:
                await self.deliver(event)
            finally:
                self.in_flight -= 1

    def headers(self, event: Event) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "gb28181",
                   "X-GB28181-Event": event.type, "X-GB28181-Delivery": str(event.id),
                   TIMESTAMP_HEADER: str(int(self.clock()))}
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, event.body)
        return headers

    async def deliver(self, event: Event) -> bool:
        """POST ``event`` until it is accepted (True) or refused for good (False)."""
        failures = 0
        while True:
            status = await self.post(self.url, event.body, self.headers(event))
            if 200 <= status < 300:
                self.counts["delivered"] += 1
                return True
            if not _retryable(status):
                self.counts["failed"] += 1
                self.last_error = f"HTTP {status}: event {event.id} not delivered"
                log.warning("webhook %s refused event %d with %d; not retried", self.label,
                            event.id, status)
                return False
            failures += 1
            self.counts["retried"] += 1
            self.last_error = f"HTTP {status}" if status else (self.last_error or "no answer")
            await self.sleep(self.backoff.delay(failures))

    def as_dict(self) -> dict[str, Any]:
        return {"url": self.label, "events": sorted(self.categories) if self.categories else [],
                "signed": bool(self.secret), "queued": len(self.queue), "in_flight": self.in_flight,
                "delivered": self.counts["delivered"], "retried": self.counts["retried"],
                "failed": self.counts["failed"], "dropped": self.counts["dropped"],
                "last_error": self.last_error}


class EventBus:
    """Publishes events to SSE clients and webhooks; see the module docstring."""

    def __init__(self, config: EventsSection, *, clock: Callable[[], float] = time.time,
                 post: Post | None = None) -> None:
        self.config = config
        self.clock = clock
        # IDs grow across restarts (they start at the start time in microseconds), so a
        # client's Last-Event-ID from before a restart reads as older than anything now held.
        self._ids = itertools.count(int(clock() * 1_000_000))
        self.first_id = 0
        self.ring: deque[Event] = deque(maxlen=config.history)
        self.clients: set[SseClient] = set()
        self.published: Counter[str] = Counter()
        self.clients_dropped = 0
        #: Called with every event as it is published, in process (the cascade sends alarms up).
        self.listeners: list[Callable[[Event], None]] = []
        self._session: Any = None
        for hook in config.webhooks:
            if urlsplit(hook.url).scheme not in ("http", "https"):
                raise ConfigError(f"events.webhooks url {hook.url!r} is not an http:// or https:// URL")
        self.sinks = [WebhookSink(
            hook, post=post or self._post, queue_size=config.webhook_queue,
            concurrency=config.webhook_concurrency,
            backoff=Backoff(config.webhook_retry_min, config.webhook_retry_max))
            for hook in config.webhooks]

    # -- life cycle -------------------------------------------------------------------------
    def start(self) -> None:
        for sink in self.sinks:
            sink.start()

    def close_clients(self) -> None:
        """End every SSE stream (the HTTP server is about to stop)."""
        for client in list(self.clients):
            client.closed = True
            client.wake.set()
        self.clients.clear()

    async def stop(self) -> None:
        self.close_clients()
        for sink in self.sinks:
            await sink.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> int:
        import aiohttp
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.webhook_timeout))
        try:
            async with self._session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            for sink in self.sinks:
                if sink.url == url:
                    sink.last_error = f"{type(exc).__name__}: {exc}"[:200]
            return 0

    # -- publishing -------------------------------------------------------------------------
    def publish(self, type_: str, data: dict[str, Any], at: float | None = None) -> Event:
        at = self.clock() if at is None else at
        event = Event(next(self._ids), type_, at, data)
        if not self.first_id:
            self.first_id = event.id
        self.published[type_] += 1
        self.ring.append(event)
        if self.clients:
            for client in [c for c in self.clients if not c.offer(event)]:
                self.clients.discard(client)
                self.clients_dropped += 1
                log.info("SSE client dropped: more than %d events behind", client.limit)
        for sink in self.sinks:
            sink.offer(event)
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:
                log.exception("event listener %r", listener)
        return event

    # -- SSE ----------------------------------------------------------------------------------
    def attach(self, last_id: int | None, types: frozenset[str] | None,
               visible: Callable[[Event], bool] | None = None) -> tuple[SseClient, list[Event], bool]:
        """A new SSE client; the events after ``last_id`` still in the ring, and whether some
        it missed are no longer there (a gap)."""
        client = SseClient(self.config.sse_backlog, types, visible)
        replay: list[Event] = []
        gap = False
        if last_id is not None:
            replay = [e for e in self.ring if e.id > last_id]
            if replay:
                gap = replay[0].id > max(last_id + 1, self.first_id)
            if types is not None:
                replay = [e for e in replay if TYPES.get(e.type, e.type) in types]
            if visible is not None:
                replay = [e for e in replay if visible(e)]
        self.clients.add(client)
        return client, replay, gap

    def detach(self, client: SseClient) -> None:
        self.clients.discard(client)

    # -- metrics --------------------------------------------------------------------------------
    def metrics(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        published = CounterMetricFamily("gb28181_events_published", "Events published, by type",
                                        labels=["type"])
        for type_, n in sorted(self.published.items()):
            published.add_metric([type_], n)
        yield published
        clients = GaugeMetricFamily("gb28181_sse_clients", "SSE clients connected to /api/v1/events")
        clients.add_metric([], len(self.clients))
        yield clients
        dropped = CounterMetricFamily("gb28181_sse_clients_dropped",
                                      "SSE clients cut off for falling too far behind")
        dropped.add_metric([], self.clients_dropped)
        yield dropped
        deliveries = CounterMetricFamily("gb28181_webhook_deliveries",
                                         "Webhook POSTs by outcome (retried: attempts repeated later; "
                                         "dropped: pushed out of a full queue)",
                                         labels=["url", "result"])
        queued = GaugeMetricFamily("gb28181_webhook_queue", "Events waiting per webhook", labels=["url"])
        for sink in self.sinks:
            for result in ("delivered", "retried", "failed", "dropped"):
                deliveries.add_metric([sink.label, result], sink.counts[result])
            queued.add_metric([sink.label], len(sink.queue) + sink.in_flight)
        yield deliveries
        yield queued


async def serve_sse(bus: EventBus, request: Any, *, last_id: int | None,
                    types: frozenset[str] | None, visible: Callable[[Event], bool] | None = None) -> Any:
    """Stream ``bus`` events to ``request`` (an aiohttp request) as ``text/event-stream``."""
    from aiohttp import web
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    client, replay, gap = bus.attach(last_id, types, visible)
    transport = request.transport
    if transport is not None:
        client.abort = transport.close
    keepalive = bus.config.sse_keepalive
    try:
        head = b"retry: 2000\n: connected\n\n"
        if gap:
            first = replay[0].id if replay else 0
            head += (b"event: gap\ndata: {\"after\":%d,\"next\":%d}\n\n" % (last_id or 0, first))
        await resp.write(head + b"".join(e.frame for e in replay))
        while not client.closed and not client.dropped:
            if not client.queue:
                client.wake.clear()
                try:
                    await asyncio.wait_for(client.wake.wait(), keepalive)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
            if client.dropped or client.closed:
                break
            frames = b"".join(e.frame for e in client.queue)
            client.queue.clear()
            await resp.write(frames)
    except ConnectionResetError:
        pass
    finally:
        bus.detach(client)
    return resp
