"""The storage compliance report: recordings held against the plan, per tier and civil code.

``GET /api/v1/reports/storage`` (api_recording.py) and ``gb28181 report storage`` (cli.py, from
the database alone) print the same numbers. Per group (tier, civil-code prefix of
``reports.civil_code_digits``):

- channels planned (mode not off) and recording now (the server's view; the CLI does not know);
- days held: how far back each channel's recordings reach (its earliest segment), the group's
  least and the target (``recording.retention_days`` of the tier; the field's plans: tier 1 30
  days or more, tier 2 15);
- channels not meeting the plan: continuous channels whose last day has more than
  ``recording.max_gap_percent`` uncovered (gaps), channels with failed segments or failed starts, and
  planned channels with no recording at all;
- disk: bytes used, free, bytes per day at the current rate and the days that leaves.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from registry.models import Channel

from .config import Config
from .record_index import DAY, daily_rate
from .record_storage import StorageUsage
from .recording import mode_for

__all__ = ["format_report", "storage_cli", "storage_report"]

def storage_report(config: Config, channels: Iterable[Channel], overrides: dict[str, str],
                   summary: list[tuple], usage: StorageUsage, *, now: float | None = None,
                   recording: dict[str, str] | None = None, failures: dict[str, str] | None = None,
                   digits: int | None = None) -> dict[str, Any]:
    """The report (see the module docstring). ``summary``: ``Store.segment_summary(now - 1 day,
    now)``; ``recording``: channel → state from the running manager; ``failures``: channel →
    why its recording could not start."""
    now = time.time() if now is None else now
    rec_cfg = config.recording
    digits = digits or config.reports.civil_code_digits
    by_channel = {row[0]: row for row in summary}
    recording = recording or {}
    failures = failures or {}
    groups: dict[tuple[int, str], dict[str, Any]] = {}
    for ch in channels:
        if ch.kind != "channel":
            continue
        mode = mode_for(ch.tier, overrides.get(ch.channel_id), rec_cfg)
        row = by_channel.get(ch.channel_id)
        if mode == "off" and row is None:
            continue
        key = (ch.tier, ch.area_code[:digits])
        g = groups.get(key)
        if g is None:
            target = rec_cfg.retention_days.of(ch.tier)
            g = groups[key] = {"tier": ch.tier, "civil_code": key[1], "retention_days": target,
                               "channels_planned": 0, "channels_recording": 0, "channels_with_segments": 0,
                               "days_held_min": None, "days_held_max": None, "bytes": 0,
                               "not_meeting_plan": []}
        if mode != "off":
            g["channels_planned"] += 1
        if recording.get(ch.channel_id) == "recording":
            g["channels_recording"] += 1
        problems: list[str] = []
        if row is not None:
            _, _, _, size, earliest, latest, covered, gaps, failed, _ = row
            held = max(0.0, (now - float(earliest)) / DAY)
            g["channels_with_segments"] += 1
            g["bytes"] += int(size or 0)
            g["days_held_min"] = held if g["days_held_min"] is None else min(g["days_held_min"], held)
            g["days_held_max"] = held if g["days_held_max"] is None else max(g["days_held_max"], held)
            if mode == "continuous":
                expected = min(DAY, now - float(earliest))
                if expected > 0 and float(covered or 0) < (1 - rec_cfg.max_gap_percent / 100) * expected:
                    problems.append(f"gaps: {1 - float(covered or 0) / expected:.0%} of the last "
                                    f"{expected / 3600:.1f} h not recorded")
            if gaps:
                problems.append(f"{gaps} gap(s) in the last day")
            if failed:
                problems.append(f"{failed} failed segment(s) in the last day")
        elif mode != "off":
            problems.append("nothing recorded")
        if ch.channel_id in failures:
            problems.append(f"recording failure: {failures[ch.channel_id]}")
        if problems and mode != "off":
            g["not_meeting_plan"].append({"channel_id": ch.channel_id, "name": ch.name, "mode": mode,
                                          "problems": problems})
    rate = daily_rate(summary, now)
    rows = []
    for key in sorted(groups):
        g = groups[key]
        g["meets_retention"] = g["days_held_min"] is not None and g["days_held_min"] >= g["retention_days"]
        for name in ("days_held_min", "days_held_max"):
            if g[name] is not None:
                g[name] = round(g[name], 3)
        rows.append(g)
    return {
        "at": now, "enabled": rec_cfg.enabled, "groups": rows,
        "disk": {**usage.as_dict(), "bytes_per_day": round(rate),
                 "days_left": round(max(0, usage.free) / rate, 1) if rate > 0 else None},
        "channels_not_meeting_plan": sum(len(g["not_meeting_plan"]) for g in rows),
    }


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def format_report(report: dict[str, Any]) -> str:
    """The report as a table for a terminal."""
    disk = report["disk"]
    days_left = "n/a (nothing written)" if disk["days_left"] is None else f"{disk['days_left']:.1f}"
    lines = [f"recording {'enabled' if report['enabled'] else 'DISABLED (recording.enabled: false)'}; "
             f"disk: {_size(disk['used_bytes'])} used, {_size(disk['free_bytes'])} free "
             f"({disk['free_percent']:.1f} %), {_size(disk['bytes_per_day'])}/day, days left {days_left}",
             f"{'tier':<5} {'civil code':<10} {'planned':>8} {'rec now':>8} {'held min':>9} "
             f"{'target':>7} {'bytes':>10}  verdict"]
    for g in report["groups"]:
        held = "-" if g["days_held_min"] is None else f"{g['days_held_min']:.2f}"
        verdict = "ok" if g["meets_retention"] and not g["not_meeting_plan"] else (
            f"{len(g['not_meeting_plan'])} not meeting plan" if g["not_meeting_plan"] else "BELOW TARGET")
        lines.append(f"{g['tier']:<5} {g['civil_code']:<10} {g['channels_planned']:>8} "
                     f"{g['channels_recording']:>8} {held:>9} {g['retention_days']:>7g} "
                     f"{_size(g['bytes']):>10}  {verdict}")
        for bad in g["not_meeting_plan"][:20]:
            lines.append(f"    {bad['channel_id']} {bad['name'][:20]:<20} {'; '.join(bad['problems'])}")
    if not report["groups"]:
        lines.append("(no channel is planned for recording and none has segments)")
    return "\n".join(lines)


def storage_cli(config: Config, *, as_json: bool, digits: int | None = None) -> int:
    """``gb28181 report storage``: the report from the database and the records directory
    alone (a running server's live view, channels recording now, is not known here)."""
    import asyncio
    import json

    from registry.channels import ChannelRegistry

    from .record_storage import LocalDiskStorage
    from .reports import _with_channels

    async def run(channels: ChannelRegistry) -> dict[str, Any]:
        now = time.time()
        store = channels.store
        summary = await store.segment_summary(now - DAY, now)
        overrides = await store.load_record_plans()
        storage = LocalDiskStorage(config.records_dir, config.recording.quota_bytes)
        usage = storage.usage(sum(int(row[3] or 0) for row in summary))
        return storage_report(config, channels, overrides, summary, usage, now=now, digits=digits)

    report = asyncio.run(_with_channels(config, run))
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
    return 0
