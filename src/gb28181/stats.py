"""Plain counters bumped on the hot path and read by the Prometheus collector at scrape time.

Incrementing an int attribute costs a few nanoseconds; a labelled prometheus-client counter
costs a lock and a dict lookup. The registrar takes thousands of REGISTERs a second, so it
counts here and ``metrics.py`` turns these into metric families only when scraped.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["Counters"]


class Counters:
    """Event counts of the signalling application (not the transport: see EndpointStats)."""

    __slots__ = ("register_requests", "register_ok", "register_challenged", "unregistered",
                 "register_failures", "auth_failures", "lockouts", "keepalives",
                 "keepalives_rejected", "messages", "messages_rejected", "queries_sent",
                 "queries_answered", "queries_timed_out", "faults_reported", "overload_rejected")

    def __init__(self) -> None:
        self.register_requests = 0
        self.register_ok = 0
        self.register_challenged = 0
        self.unregistered = 0
        self.register_failures: Counter[str] = Counter()
        self.auth_failures: Counter[str] = Counter()
        self.lockouts = 0
        self.keepalives = 0
        self.keepalives_rejected: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()
        self.messages_rejected: Counter[str] = Counter()
        self.queries_sent = 0
        self.queries_answered = 0
        self.queries_timed_out = 0
        self.faults_reported = 0
        self.overload_rejected = 0

    def register_rejected(self, reason: str) -> None:
        self.register_failures[reason] += 1

    def auth_failed(self, reason: str) -> None:
        self.auth_failures[reason] += 1
