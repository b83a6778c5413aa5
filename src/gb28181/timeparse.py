"""Times as operators type them: ``24h``, ``30m``, ``7d``, ``now``, epoch seconds, ISO 8601."""

from __future__ import annotations

import re
import time
from datetime import datetime

__all__ = ["parse_when"]

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, *, now: float | None = None) -> float:
    """Unix time for ``text``: a duration means that long ago; raises ValueError naming the forms."""
    now = time.time() if now is None else now
    value = text.strip()
    if value.lower() == "now":
        return now
    m = _RELATIVE.fullmatch(value)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2).lower()]
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if number > 1e8:
            return number
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"cannot read the time {text!r}: use a duration like 24h, 30m or 7d, "
                         "'now', Unix seconds, or ISO 8601 (2026-11-22T08:00:00+08:00)") from None
    if dt.tzinfo is None:
        from .registrar import BEIJING
        dt = dt.replace(tzinfo=BEIJING)
    return dt.timestamp()
