"""Signed play URLs: what lets a player that cannot send headers fetch one stream for a while.

The server signs ``<stream>:<expires>`` with a secret (HMAC-SHA256, 128 bits kept); whoever
serves the stream checks it: the server itself with its API token, a media node with the
token it joined with. The URL carries ``exp`` (Unix seconds) and ``sig``.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping

__all__ = ["sign_play", "check_play", "play_query"]


def sign_play(secret: str, stream: str, expires: int) -> str:
    return hmac.new(secret.encode(), f"{stream}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]


def play_query(secret: str, stream: str, expires: int) -> str:
    return f"exp={expires}&sig={sign_play(secret, stream, expires)}"


def check_play(secret: str, stream: str, query: Mapping[str, str], now: float | None = None) -> bool:
    """True when ``query`` holds an unexpired signature of ``stream`` made with ``secret``."""
    exp = query.get("exp", "")
    if not exp.isdigit() or len(exp) > 12 or int(exp) < (time.time() if now is None else now):
        return False
    return hmac.compare_digest(sign_play(secret, stream, int(exp)).encode(), query.get("sig", "").encode())
