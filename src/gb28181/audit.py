"""Audit trail: every view, stop and control is written down (who, what, when, from where).

The field's rules want every view, control and export audited. Records are JSON lines appended
to ``DATA_DIR/audit.log`` (one ``write`` each, so a crash loses at most the record being
written) and the most recent ones are kept in memory for ``GET /api/v1/audit``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

__all__ = ["AuditLog"]

log = logging.getLogger("gb28181.audit")


class AuditLog:
    def __init__(self, path: Path, *, keep: int = 1000) -> None:
        self.path = path
        self.recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._fd: int | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def record(self, action: str, *, who: str, source: str, target: str, **detail: Any) -> dict:
        entry = {"at": round(time.time(), 3), "action": action, "who": who, "source": source,
                 "target": target, **detail}
        self.recent.append(entry)
        if self._fd is not None:
            try:
                os.write(self._fd, (json.dumps(entry, ensure_ascii=False) + "\n").encode())
            except OSError as exc:  # a full disk must not stop the video; it is logged loudly
                log.error("cannot write the audit log %s: %s", self.path, exc)
        return entry
