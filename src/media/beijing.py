"""Beijing time: UTC+8, no daylight saving. GB/T 28181 devices and platforms keep their clocks in it
and write their times in it (§9.10.3, A.2 time fields). Defined once, here in the lowest layer, so
that ``media`` (segment names) and ``gb28181`` (SIP Date, MANSCDP times) share it."""

from __future__ import annotations

from datetime import timedelta, timezone

__all__ = ["BEIJING"]

BEIJING = timezone(timedelta(hours=8), "CST")
