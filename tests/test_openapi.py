"""The OpenAPI document (GET /api/v1/openapi.json) against the real server: it validates as
OpenAPI 3.1, lists every route the router has (computed here from the router, so routes added later
are covered without touching this file), declares every path parameter, carries the very schemas
the handlers validate bodies with, and says what the server really answers; /api/docs reads it."""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openapi_spec_validator import validate
from pydantic import BaseModel

from gb28181.api_control import PtzBody
from gb28181.api_video import PlaybackBody
from gb28181.openapi import DOCS_PATH, OPENAPI_PATH, Doc, add_openapi_routes, build_document, doc

from .conftest import TOKEN

REF = "#/components/schemas/{model}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def _get(server, path: str, **kw) -> tuple[int, Any, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.http_port}{path}", headers=AUTH, **kw) as resp:
            text = await resp.text()
            return resp.status, resp.headers.get("Content-Type", ""), text


async def _call(server, method: str, path: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"http://127.0.0.1:{server.http_port}{path}", headers=AUTH,
                                   json=body) as resp:
            return resp.status, await resp.json()


async def _document(server) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.http_port}{OPENAPI_PATH}", headers=AUTH) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


def _routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, OpenAPI path) of every route, worked out from aiohttp's own view of them."""
    out: set[tuple[str, str]] = set()
    for route in app.router.routes():
        resource = route.resource
        assert resource is not None
        methods = {r.method for r in resource}
        if route.method == "HEAD" and "GET" in methods:
            continue  # the HEAD aiohttp adds to each GET
        path = resource.canonical
        if isinstance(resource, web.StaticResource):
            path = path.rstrip("/") + "/{filename}"
        out.add(("get" if route.method == "*" else route.method.lower(), path))
    return out


def _resolve(doc_: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = doc_["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _model_schema(model: type[BaseModel]) -> dict:
    schema = model.model_json_schema(ref_template=REF)
    schema.pop("$defs", None)
    return schema


def _example(doc_: dict, schema: dict) -> dict:
    """A body built from the schema alone: each required field's first enum value, minimum or
    a string; each optional one its default."""
    schema = _resolve(doc_, schema)
    out: dict[str, Any] = {}
    for name, prop in schema["properties"].items():
        if "default" in prop:
            out[name] = prop["default"]
        elif "enum" in prop:
            out[name] = prop["enum"][0]
        elif prop.get("type") == "integer":
            out[name] = prop.get("minimum", 0)
        else:
            out[name] = "x"
    return out


async def test_the_document_validates_and_lists_every_route(make_server):
    server = await make_server()
    doc_ = await _document(server)
    validate(doc_)  # OpenAPI 3.1 (the validator picks the version from "openapi")
    assert doc_["openapi"].startswith("3.1")
    app = server._runner.app
    listed = {(m, p) for p, item in doc_["paths"].items() for m in item}
    missing = _routes(app) - listed
    assert not missing, f"routes not in the document: {sorted(missing)}"
    assert ("get", OPENAPI_PATH) in listed and ("get", DOCS_PATH) in listed
    for path, item in doc_["paths"].items():
        placeholders = set(re.findall(r"\{(\w+)\}", path))
        for method, op in item.items():
            declared = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert declared == placeholders, (method, path)
            assert all(p["required"] for p in op.get("parameters", []) if p["in"] == "path")
            assert op["summary"] and op["tags"], (method, path)
            for status in ("4XX", "5XX"):  # every error is {"error": "..."}
                schema = op["responses"][status]["content"]["application/json"]["schema"]
                assert _resolve(doc_, schema)["properties"] == {"error": {"title": "Error", "type": "string"}}
            if op.get("security") != []:
                assert "401" in op["responses"], (method, path)
    what = next(p for p in doc_["paths"]["/api/v1/devices/{device_id}/{what}"]["get"]["parameters"]
                if p["name"] == "what")
    assert what["schema"] == {"type": "string", "enum": ["info", "status", "config", "presets"]}
    assert doc_["paths"]["/healthz"]["get"]["security"] == []
    assert doc_["paths"][OPENAPI_PATH]["get"]["security"] == []
    schemes = doc_["components"]["securitySchemes"]
    assert schemes["session"] == {"type": "apiKey", "in": "cookie", "name": "gb28181_session",
                                  "description": schemes["session"]["description"]}
    assert {"token": []} in doc_["security"] and {"bearer": []} in doc_["security"]


async def test_every_documented_body_is_its_model(make_server):
    server = await make_server()
    doc_ = await _document(server)
    by_op = {(m, p): op for p, item in doc_["paths"].items() for m, op in item.items()}
    seen: set[str] = set()
    for route in server._runner.app.router.routes():
        described = getattr(route.handler, "__openapi__", None)
        if not isinstance(described, Doc) or not isinstance(described.body, type):
            continue
        path = route.resource.canonical  # type: ignore[union-attr]
        body = by_op[(route.method.lower(), path)]["requestBody"]
        schema = _resolve(doc_, body["content"]["application/json"]["schema"])
        expected = _model_schema(described.body)
        if described.partial:
            expected.pop("required", None)
            schema = {k: v for k, v in schema.items() if k != "description"}
            expected.pop("description", None)
        assert schema == expected, (route.method, path)
        seen.add(described.body.__name__)
    # the handlers of api.py are described in openapi.py's table, not by decorators
    assert _resolve(doc_, by_op[("post", "/api/v1/devices")]["requestBody"]["content"]["application/json"]
                    ["schema"])["properties"].keys() == {"device_id", "password", "name", "auth_username"}
    assert {"PtzBody", "PlaybackBody", "DownloadBody", "UpstreamSection", "AlarmSubscriptionBody"} <= seen
    ptz = by_op[("post", "/api/v1/channels/{channel_id}/ptz")]
    assert _resolve(doc_, ptz["requestBody"]["content"]["application/json"]["schema"]) == _model_schema(PtzBody)
    playback = by_op[("post", "/api/v1/channels/{channel_id}/playback")]
    assert (_resolve(doc_, playback["requestBody"]["content"]["application/json"]["schema"])
            == _model_schema(PlaybackBody))
    # non-JSON answers say their content types
    assert "video/x-flv" in by_op[("get", "/live/{channel_id}.flv")]["responses"]["200"]["content"]
    assert "text/event-stream" in by_op[("get", "/api/v1/events")]["responses"]["200"]["content"]
    assert "text/plain" in by_op[("get", "/metrics")]["responses"]["200"]["content"]
    assert "101" in by_op[("get", "/api/v1/channels/{channel_id}/broadcast/ws")]["responses"]
    assert "multipart/form-data" in by_op[("post", "/api/v1/channels/{channel_id}/broadcast")]["requestBody"][
        "content"]
    assert by_op[("get", "/api/v1/devices")]["parameters"][0]["in"] == "query"


async def test_bodies_built_from_the_schema_are_accepted_and_the_answers_match(make_server):
    server = await make_server()
    doc_ = await _document(server)
    ptz = doc_["paths"]["/api/v1/channels/{channel_id}/ptz"]["post"]
    example = _example(doc_, ptz["requestBody"]["content"]["application/json"]["schema"])
    assert example == {"command": "up", "speed": 128}
    path = "/api/v1/channels/34020000001310000099/ptz"
    status, body = await _call(server, "POST", path, example)
    assert status == 404, body  # the body passed; the channel is unknown
    # playback reads its body before it looks for the channel: 400 against 404 tells which failed
    playback = doc_["paths"]["/api/v1/channels/{channel_id}/playback"]["post"]
    example = _example(doc_, playback["requestBody"]["content"]["application/json"]["schema"])
    assert set(example) == {"start", "end", "transport", "source"}
    example.update(start="2026-01-01T08:00:00", end="2026-01-01T09:00:00")
    path = "/api/v1/channels/34020000001310000099/playback"
    status, body = await _call(server, "POST", path, example)
    assert status == 404, body
    status, body = await _call(server, "POST", path, dict(example, transport="sctp"))  # not the pattern
    assert status == 400 and "transport" in body["error"]

    create = doc_["paths"]["/api/v1/devices"]["post"]
    new = _example(doc_, create["requestBody"]["content"]["application/json"]["schema"])
    new.update(device_id="34020000001320000077", password=None, auth_username=None)
    status, created = await _call(server, "POST", "/api/v1/devices", new)
    assert status == 201, created
    # the document claims exactly the fields the server returns
    device = _resolve(doc_, create["responses"]["201"]["content"]["application/json"]["schema"])
    assert set(device["properties"]) == set(created)
    assert set(device["required"]) == set(created)
    status, again = await _call(server, "POST", "/api/v1/devices", new)
    assert status == 409 and "409" in create["responses"]
    status, page = await _call(server, "GET", "/api/v1/devices?limit=5", None)
    listing = doc_["paths"]["/api/v1/devices"]["get"]
    page_schema = _resolve(doc_, listing["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(page_schema["properties"]) == set(page)
    assert {p["name"] for p in listing["parameters"]} == {"offset", "limit", "status", "kind"}


async def test_channel_shape_is_what_channel_json_returns():
    from gb28181.api import channel_json
    from gb28181.openapi import Channel as ChannelShape
    from registry.models import Channel
    assert set(ChannelShape.model_fields) == set(channel_json(Channel("34020000001310000001", "3402000000"
                                                                       "1320000001")))


async def test_a_route_added_later_is_documented_from_its_docstring():
    async def gadget(request: web.Request) -> web.Response:
        """Read one gadget.

        Gadgets are whatever a later module adds."""
        return web.json_response({})

    @doc(query={"limit": ("integer", "page size")}, responses={200: "gadgets", 404: "none"}, public=True)
    async def gadgets(request: web.Request) -> web.Response:
        return web.json_response({})

    app = web.Application()
    app.router.add_get(r"/api/v1/gadgets/{gadget_id:\d{4}}/{part}", gadget)
    app.router.add_route("*", "/api/v1/gadgets", gadgets)
    add_openapi_routes(app)
    doc_ = build_document(app)
    validate(doc_)
    op = doc_["paths"]["/api/v1/gadgets/{gadget_id}/{part}"]["get"]
    assert op["summary"] == "Read one gadget." and op["description"] == "Gadgets are whatever a later module adds."
    assert op["tags"] == ["gadgets"]
    params = {p["name"]: p for p in op["parameters"]}
    assert params["gadget_id"]["schema"] == {"type": "string", "pattern": r"^(?:\d{4})$"}
    assert params["part"]["schema"] == {"type": "string"}
    listed = doc_["paths"]["/api/v1/gadgets"]
    assert {"get", "post", "put", "patch", "delete"} <= set(listed)
    assert listed["get"]["security"] == [] and listed["get"]["parameters"][0]["name"] == "limit"
    assert "404" in listed["get"]["responses"]


@pytest.mark.parametrize("path", [DOCS_PATH])
async def test_the_docs_page_reads_the_document(make_server, path):
    server = await make_server()
    status, ctype, html = await _get(server, path)
    assert status == 200 and ctype.startswith("text/html")
    assert OPENAPI_PATH in html and "<script" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)  # nothing from elsewhere
