"""``gb28181 report …``: the online-rate and archive reports, read straight from the database.

The same numbers as ``/api/v1/reports/*`` but without a running server: the registry is
loaded from the SQLite file (WAL lets a running server keep writing meanwhile) and the report
is printed as a table or JSON. Targets from the field rules are shown beside each tier.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime

from registry.channels import ChannelRegistry
from registry.devices import DeviceRegistry
from registry.sqlite import SqliteStore
from registry.store import StoreError

from .config import Config
from .registrar import BEIJING
from .timeparse import parse_when

__all__ = ["archive_report", "online_report", "TIER_TARGETS"]

#: Online-rate targets of the field's rules: tier 1 >= 95 %, tier 2 >= 90 %.
TIER_TARGETS = {1: 0.95, 2: 0.90}


async def _with_channels(config: Config, fn):
    if not config.database_path.exists():
        raise SystemExit(f"gb28181: no database at {config.database_path}; point --config (or "
                         "GB28181_DATA_DIR) at the server's data directory")
    store = SqliteStore(config.database_path)
    devices = DeviceRegistry(store)
    channels = ChannelRegistry(store)
    try:
        await devices.start()
        await channels.start()
        return await fn(channels)
    except StoreError as exc:
        raise SystemExit(f"gb28181: {exc}") from None
    finally:
        await channels.stop()
        await devices.stop()


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, BEIJING).isoformat(timespec="seconds")


def online_report(config: Config, *, since: str, until: str, group_by: str,
                  digits: int | None, as_json: bool) -> int:
    try:
        end = parse_when(until)
        start = parse_when(since, now=end)
    except ValueError as exc:
        print(f"gb28181: {exc}", file=sys.stderr)
        return 2
    if start >= end:
        print("gb28181: --since must be before --until", file=sys.stderr)
        return 2
    digits = digits or config.reports.civil_code_digits

    async def run(channels: ChannelRegistry):
        return await channels.availability(start, end, group_by=group_by, civil_code_digits=digits)

    rows = asyncio.run(_with_channels(config, run))
    if as_json:
        print(json.dumps({"since": _when(start), "until": _when(end), "group_by": group_by,
                          "groups": rows}, indent=2, ensure_ascii=False))
        return 0
    print(f"online rate {_when(start)} .. {_when(end)}, by {group_by}")
    print(f"{'group':<12} {'channels':>9} {'online':>9} {'working':>9} {'now on':>7}  target")
    for row in rows:
        target = TIER_TARGETS.get(row["group"]) if group_by == "tier" else None
        verdict = ""
        if target is not None:
            verdict = f">= {target:.0%} {'ok' if row['online_ratio'] >= target else 'BELOW'}"
        print(f"{str(row['group']):<12} {row['channels']:>9} {row['online_ratio']:>9.2%} "
              f"{row['working_ratio']:>9.2%} {row['currently_online']:>7}  {verdict}")
    if not rows:
        print("(no channels in that window)")
    return 0


def archive_report(config: Config, *, limit: int, as_json: bool) -> int:
    async def run(channels: ChannelRegistry):
        return channels.archive_report(limit=limit)

    report = asyncio.run(_with_channels(config, run))
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return 0
    print(f"channels {report['channels']}: complete {report['complete']} "
          f"({report['complete_ratio']:.1%}), missing location {report['missing_location']}")
    for row in report["incomplete"][:limit]:
        print(f"  {row['channel_id']}  {row['name'][:24]:<24} missing: {', '.join(row['missing'])}")
    return 0
