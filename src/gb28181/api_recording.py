"""HTTP API of platform recordings (recording.py, record_index.py, record_export.py).

- ``GET /api/v1/channels/{id}/records?source=platform&start=&end=&offset=&limit=``: the
  platform's segments overlapping the range, in the shape of a device record search (api.py's
  ``channel_records`` hands ``source=platform`` here): ``items`` with start/end (Beijing time),
  ``type`` "time", ``file_path`` (the segment's key), ``file_size``, plus ``segment_id``,
  ``gap_before``, ``codec``, ``state``; ``total`` for paging.
- ``GET /api/v1/channels/{id}/export?start=&end=``: one MP4 of the range, remuxed from the
  covering segments (cut at keyframes), cached under DATA_DIR/exports by range and segments;
  served with Range support. 400 for a bad or too long range (``recording.max_export_seconds``),
  404 when no segment covers it.
- ``GET /api/v1/channels/{id}/recording``: the channel's mode, where it comes from and its
  recording's state; the mode is set with ``PATCH /api/v1/channels/{id}`` ``{"recording": ...}``.
- ``GET /api/v1/recordings``: every channel being recorded, or waiting to retry, and why.
- ``GET /api/v1/reports/storage``: the compliance report (record_report.py).
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import datetime
from typing import Any

from aiohttp import web

from registry.models import Channel

from .api import _bad, _channel_or_404, _error, _int_param, _iso, _server
from .openapi import Media, Param, doc
from .record_export import ExportError, export_range
from .record_report import storage_report
from .records import RecordQuery
from .registrar import BEIJING

__all__ = ["add_recording_routes", "platform_records"]

_WHEN = "ISO 8601 (Beijing time without an offset), 24h, now or Unix seconds"
_RANGE: dict[str, Param] = {"start": ("string", _WHEN, True), "end": ("string", _WHEN + "; default now")}


def _channel_range(request: web.Request) -> tuple[Channel, float, float]:
    """The channel (404) and the query's (start, end), parsed as a device record search parses
    them (400 naming the parameter)."""
    channel = _channel_or_404(request)
    try:
        query = RecordQuery.from_params(channel.channel_id, request.query)
    except ValueError as exc:
        raise _bad(str(exc)) from None
    return channel, query.start.timestamp(), query.end.timestamp()


async def platform_records(request: web.Request) -> web.Response:
    """The platform's own segments of a channel (``source=platform``), as a record search answers."""
    server = _server(request)
    channel, start, end = _channel_range(request)
    offset = _int_param(request, "offset", 0, 0, 10**9)
    limit = _int_param(request, "limit", 100, 1, 1000)
    total, page = await server.recordings.index.search(channel.channel_id, start, end,
                                                       offset=offset, limit=limit)
    items = [{"start": _iso(s.start), "end": _iso(s.end), "type": "time", "name": channel.name,
              "file_path": s.path, "address": "", "secrecy": 0, "recorder_id": server.config.server.id,
              "file_size": s.bytes, "device_id": channel.channel_id, "segment_id": s.id,
              "gap_before": s.gap_before, "codec": s.codec, "state": s.state, "frames": s.frames}
             for s in page]
    return web.json_response({"source": "platform", "items": items, "sum_num": total, "total": total,
                              "offset": offset, "limit": limit, "complete": True, "queries": 0})


@doc(summary="One MP4 of a time range of the platform's recordings (HTTP Range works)", query=_RANGE,
     responses={200: Media("video/mp4", "the range, remuxed from its segments"),
                400: "bad or too long range", 404: "no such channel, or nothing recorded in the range"})
async def export(request: web.Request) -> web.StreamResponse:
    server = _server(request)
    channel, start, end = _channel_range(request)
    longest = server.config.recording.max_export_seconds
    if end - start > longest:
        return _error(400, f"the range is {end - start:.0f} s; one export covers at most {longest:g} s "
                           "(recording.max_export_seconds): split it")
    index = server.recordings.index
    _, segments = await index.search(channel.channel_id, start, end, limit=10000, count=False)
    usable = [s for s in segments if s.state != "failed" and index.storage.exists(s.path)]
    if not usable:
        return _error(404, f"no platform recording of {channel.channel_id} between {_iso(start)} and "
                           f"{_iso(end)}: search with GET /api/v1/channels/{channel.channel_id}/"
                           "records?source=platform")
    # The cache key covers the segments' sizes: a range whose last segment still grows is redone.
    fingerprint = hashlib.sha256(repr([(s.path, index.storage.size(s.path)) for s in usable]).encode())
    name = f"{channel.channel_id}_{int(start)}_{int(end)}_{fingerprint.hexdigest()[:12]}.mp4"
    out = server.config.data_dir / "exports" / name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        inputs = [(index.storage.path_for(s.path), s.start) for s in usable]
        try:
            await asyncio.get_running_loop().run_in_executor(None, export_range, inputs, start, end, out)
        except ExportError as exc:
            return _error(404, f"{channel.channel_id} {_iso(start)}..{_iso(end)}: {exc}")
    from .api import _who
    who, source = _who(request)
    server.audit.record("export", who=who, source=source, target=channel.channel_id,
                        start=_iso(start), end=_iso(end))
    return web.FileResponse(out, headers={
        "Content-Type": "video/mp4",
        "Content-Disposition": f'attachment; filename="{channel.channel_id}_'
                               f'{datetime.fromtimestamp(start, BEIJING):%Y%m%dT%H%M%S}.mp4"'})


def _recording_json(server: Any, channel_id: str) -> dict[str, Any]:
    rec = server.recordings
    own = rec.overrides.get(channel_id)
    active = rec.active.get(channel_id)
    return {"channel_id": channel_id, "mode": rec.mode(channel_id),
            "from": "channel" if own else "tier", "enabled": rec.config.enabled,
            "recording": active.as_dict() if active else None}


@doc(summary="A channel's recording mode and state", responses={404: "no such channel"})
async def channel_recording(request: web.Request) -> web.Response:
    channel = _channel_or_404(request)
    return web.json_response(_recording_json(_server(request), channel.channel_id))


@doc(summary="Channels being recorded, or waiting to retry, and why")
async def recordings(request: web.Request) -> web.Response:
    rec = _server(request).recordings
    return web.json_response({"enabled": rec.config.enabled, "states": rec.states(),
                              "failures_total": rec.failures_total,
                              "recordings": [r.as_dict() for r in rec.active.values()]})


@doc(summary="Recordings held against the plan, per tier and civil code; disk use and days left",
     query={"civil_code_digits": ({"type": "integer", "minimum": 2, "maximum": 8}, "civil-code prefix length")})
async def report(request: web.Request) -> web.Response:
    server = _server(request)
    rec = server.recordings
    digits = _int_param(request, "civil_code_digits", server.config.reports.civil_code_digits, 2, 8)
    now = rec.clock()
    summary = await rec.store.segment_summary(now - 86400, now)
    used = sum(int(row[3] or 0) for row in summary)
    usage = rec.storage.usage(used)
    failing = {r.channel_id: r.reason for r in rec.active.values() if r.state == "waiting" and r.reason}
    out = storage_report(server.config, server.channels, rec.overrides, summary, usage, now=now,
                         recording={cid: r.state for cid, r in rec.active.items()}, failures=failing,
                         digits=digits)
    out["at"] = _iso(out["at"])
    return web.json_response(out)


def add_recording_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/channels/{channel_id}/export", export)
    r.add_get("/api/v1/channels/{channel_id}/recording", channel_recording)
    r.add_get("/api/v1/recordings", recordings)
    r.add_get("/api/v1/reports/storage", report)
