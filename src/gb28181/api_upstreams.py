"""HTTP API for the upper platforms this instance registers to (cascade; GB/T 28181-2016 §9.1,
Annex J). Handling is ``cascade.manager``; the API reaches it only through its facade
(``listing``, ``describe``, ``add``, ``update``, ``remove``, ``sessions.describe``).

- ``GET /api/v1/upstreams``: every upstream with its ``status`` (``registered``, ``registering``,
  ``failed`` with the ``reason``, ``disabled``), its subscriptions, sessions and shared channels.
- ``POST /api/v1/upstreams`` ``{"server_id", "host", "port", "password", "transport": "udp"|"tcp",
  "domain", "local_id", "share": "all" | {"civil_codes": [...], "business_groups": [...],
  "channels": [...]}, ...}``: add one (kept in ``DATA_DIR/upstreams.json``); 201.
- ``GET|PATCH|DELETE /api/v1/upstreams/{id}``: one upstream; a PATCH re-registers with the
  change; a DELETE unregisters. Upstreams of the config file are changed there (409 here).
- ``GET /api/v1/upstreams/sessions``: the streams being sent to upper platforms.
"""

from __future__ import annotations

from aiohttp import web

from .api import _bad, _error, _server
from .cascade.manager import UpstreamError
from .config import UpstreamSection
from .openapi import doc

__all__ = ["add_upstream_routes"]


async def _json_object(request: web.Request) -> dict:
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise _bad("the body must be a JSON object") from None
    if not isinstance(data, dict):
        raise _bad("the body must be a JSON object")
    return data


@doc(summary="Upper platforms this instance registers to, with their status")
async def list_upstreams(request: web.Request) -> web.Response:
    items = _server(request).cascade.listing()
    return web.json_response({"upstreams": items, "total": len(items)})


@doc(summary="Add an upper platform (kept in DATA_DIR/upstreams.json)", body=UpstreamSection,
     responses={201: "the upstream", 409: "the id or server_id is taken"})
async def add_upstream(request: web.Request) -> web.Response:
    server = _server(request)
    try:
        created = await server.cascade.add(await _json_object(request))
    except UpstreamError as exc:
        return _error(exc.status, str(exc))
    server.audit.record("upstream-add", who="api", source=request.remote or "",
                        target=created["id"], server_id=created["server_id"])
    return web.json_response(created, status=201)


@doc(summary="One upstream", responses={200: "the upstream", 404: "no such upstream"})
async def get_upstream(request: web.Request) -> web.Response:
    cascade = _server(request).cascade
    upstream_id = request.match_info["upstream_id"]
    if upstream_id not in cascade.uplinks:
        return _error(404, f"no upstream {upstream_id}")
    return web.json_response(cascade.describe(upstream_id))


@doc(summary="Change an upstream; it registers again with the change", body=UpstreamSection, partial=True,
     responses={200: "the upstream", 404: "no such upstream", 409: "set in the config file, or server_id taken"})
async def patch_upstream(request: web.Request) -> web.Response:
    server = _server(request)
    upstream_id = request.match_info["upstream_id"]
    patch = await _json_object(request)
    try:
        changed = await server.cascade.update(upstream_id, patch)
    except UpstreamError as exc:
        return _error(exc.status, str(exc))
    server.audit.record("upstream-change", who="api", source=request.remote or "", target=upstream_id,
                        fields=",".join(sorted(k for k in patch if k != "password")))
    return web.json_response(changed)


@doc(summary="Remove an upstream (it unregisters)",
     responses={204: "removed", 404: "no such upstream", 409: "set in the config file"})
async def delete_upstream(request: web.Request) -> web.Response:
    server = _server(request)
    upstream_id = request.match_info["upstream_id"]
    try:
        await server.cascade.remove(upstream_id)
    except UpstreamError as exc:
        return _error(exc.status, str(exc))
    server.audit.record("upstream-remove", who="api", source=request.remote or "", target=upstream_id)
    return web.Response(status=204)


@doc(summary="Streams being sent to upper platforms")
async def upstream_sessions(request: web.Request) -> web.Response:
    items = _server(request).cascade.sessions.describe()
    return web.json_response({"sessions": items, "total": len(items)})


def add_upstream_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/api/v1/upstreams", list_upstreams)
    r.add_post("/api/v1/upstreams", add_upstream)
    r.add_get("/api/v1/upstreams/sessions", upstream_sessions)
    r.add_get("/api/v1/upstreams/{upstream_id}", get_upstream)
    r.add_patch("/api/v1/upstreams/{upstream_id}", patch_upstream)
    r.add_delete("/api/v1/upstreams/{upstream_id}", delete_upstream)
