"""The OpenAPI 3.1 document of the HTTP API (``GET /api/v1/openapi.json``) and a page that reads
it (``GET /api/docs``).

The document is built from ``app.router`` each time it is asked for, so a route any module adds is
in it without a word here: its path (aiohttp's ``{name}`` and ``{name:regex}`` placeholders become
path parameters, a regex of plain alternatives an enum), its summary and description (the handler's
docstring: first line, rest) and its tag (the first path segment after ``/api/v1/``). A handler
says more with ``@doc(...)``: the pydantic model of its body (the same class ``api._body`` checks,
so the schema cannot drift from what the server accepts), query parameters and headers, and its
responses. The handlers of ``api.py`` are described in ``_CORE`` below instead, so that module only
mounts the two routes.

Every error of the API is ``{"error": "..."}`` (``api._auth_and_errors``); every operation lists
it for 4XX and 5XX. Neighbours: ``api.py`` (routes, token middleware, error shape), the ``api_*``
modules (their handlers carry ``@doc``), ``web_docs.html`` (the page).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel

__all__ = ["DOCS_PATH", "OPENAPI_PATH", "Doc", "Media", "add_openapi_routes", "build_document", "doc"]

OPENAPI_PATH = "/api/v1/openapi.json"
DOCS_PATH = "/api/docs"

Schema = dict[str, Any]
#: A query, header or path parameter: (type name or JSON schema, description[, required]).
Param = tuple[str | Schema, str] | tuple[str | Schema, str, bool]
H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Media:
    """A body that is not the API's JSON: its content type, what it is, and its schema if any."""

    content_type: str
    description: str = ""
    schema: Schema | type[BaseModel] | None = None


#: A response: a model (JSON), ``(model or schema, description)``, a description alone (JSON
#: object for 2xx, the error shape for 4xx/5xx, nothing for 1xx/204/3xx) or a ``Media``.
Response = type[BaseModel] | tuple[type[BaseModel] | Schema, str] | str | Media | Sequence[Media]


@dataclass(frozen=True, slots=True)
class Doc:
    """What ``@doc`` says about one handler (kept on it as ``__openapi__``)."""

    body: type[BaseModel] | Media | Sequence[Media] | None = None
    partial: bool = False          # the body is a patch: any subset of the model's fields
    body_required: bool = True
    query: Mapping[str, Param] = field(default_factory=dict)
    headers: Mapping[str, Param] = field(default_factory=dict)
    path: Mapping[str, Param] = field(default_factory=dict)
    responses: Mapping[int, Response] = field(default_factory=dict)
    tags: tuple[str, ...] = ()
    public: bool = False           # no credential needed (the middleware lets it through)
    summary: str | None = None     # instead of the docstring's first line


def doc(*, body: type[BaseModel] | Media | Sequence[Media] | None = None, partial: bool = False,
        body_required: bool = True, query: Mapping[str, Param] | None = None,
        headers: Mapping[str, Param] | None = None, path: Mapping[str, Param] | None = None,
        responses: Mapping[int, Response] | None = None, tags: Sequence[str] = (),
        public: bool = False, summary: str | None = None) -> Callable[[H], H]:
    """Describe a handler in the OpenAPI document; the handler itself is returned unchanged.

    ``@doc(body=PtzBody, query={"limit": ("integer", "page size")}, responses={200: Model,
    404: "no such channel", 409: "device offline"})``
    """
    described = Doc(body=body, partial=partial, body_required=body_required, query=query or {},
                    headers=headers or {}, path=path or {}, responses=responses or {},
                    tags=tuple(tags), public=public, summary=summary)

    def mark(handler: H) -> H:
        handler.__openapi__ = described  # type: ignore[attr-defined]
        return handler
    return mark


# -- response shapes (what api.device_json, api.channel_json and api_video return) -------------

class Error(BaseModel):
    """Every error of the API: what was wrong and how to fix it."""

    error: str


class Fault(BaseModel):
    status: str | None
    devices: list[str]
    since: str | None


class Heartbeat(BaseModel):
    interval: float
    count: int | None


class Device(BaseModel):
    """A device (api.device_json); times are ISO 8601 in Beijing time, null when never."""

    device_id: str
    kind: str
    name: str
    manufacturer: str
    model: str
    firmware: str
    status: Literal["online", "offline"]
    transport: str
    host: str
    port: int
    contact: str
    expires: int
    registered: bool
    registered_at: str | None
    expires_at: str | None
    last_seen: str | None
    keepalive_at: str | None
    status_changed_at: str | None
    has_password: bool
    auth_username: str | None
    fault: Fault | None
    heartbeat: Heartbeat | None
    position: dict[str, Any] | None


class PatchedDevice(Device):
    """A device after a PATCH, with the per-device settings it holds."""

    charset: str | None
    media_transport: str | None


class DevicePage(BaseModel):
    total: int
    offset: int
    limit: int
    devices: list[Device]


class Channel(BaseModel):
    """A catalog item (api.channel_json); ``state`` is the effective one (OFF while its device is
    offline), ``reported_status`` what the device last said."""

    channel_id: str
    device_id: str
    kind: str
    name: str
    manufacturer: str
    model: str
    owner: str
    civil_code: str
    block: str
    address: str
    parental: int
    parent_id: str
    business_group_id: str
    safety_way: int | None
    register_way: int | None
    secrecy: int
    ip_address: str
    port: int
    reported_status: str
    state: Literal["ON", "OFF", "VLOST", "DEFECT"]
    status: Literal["online", "offline"]
    longitude: float | None
    latitude: float | None
    ptz_type: int | None
    info: dict[str, Any]
    tier: int
    tier_locked: bool
    state_changed_at: str | None
    seen_at: str | None
    created_at: str | None
    updated_at: str | None


class ChannelPage(BaseModel):
    total: int
    offset: int
    limit: int
    channels: list[Channel]


class PlayUrls(BaseModel):
    """Signed URLs of a stream; ``server_flv`` always leads to the stream's current node."""

    http_flv: str
    ws_flv: str
    server_flv: str
    node: str
    expires_at: str | None


class Play(BaseModel):
    stream_id: str
    channel_id: str
    transport: str
    urls: PlayUrls


class Playback(Play):
    start: str | None
    end: str | None


# -- api.py's handlers --------------------------------------------------------------------------

_PAGE = {"offset": ({"type": "integer", "minimum": 0, "default": 0}, "items to skip"),
         "limit": ({"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "page size")}
_STATUS = ({"type": "string", "enum": ["online", "offline"]}, "only devices or channels in this status")
_WHEN = "24h, 30m, now, Unix seconds or ISO 8601 (no offset: Beijing time)"


def _limit(default: int, hi: int, lo: int = 1) -> Param:
    return ({"type": "integer", "minimum": lo, "maximum": hi, "default": default}, "at most this many")


def _core_docs() -> dict[Callable[..., Any], Doc]:
    from . import api
    from .metrics import CONTENT_TYPE
    channel_query: dict[str, Param] = {
        **_PAGE, "status": _STATUS,
        "state": ({"type": "string", "enum": ["ON", "OFF", "VLOST", "DEFECT"]}, "effective state"),
        "tier": ({"type": "integer", "minimum": 1, "maximum": 3}, "1 key sites, 2 key organisations, 3 the rest"),
        "device_id": ("string", "only this device's channels"),
        "civil_code": ("string", "civil-code prefix"), "kind": ("string", "catalog item kind"),
        "text": ("string", "in the name, ID or address"), "parent_id": ("string", "parent item"),
        "missing_location": ({"type": "string", "enum": ["true", "false"]}, "without longitude/latitude"),
    }
    return {
        api.healthz: Doc(public=True, summary="Liveness, device counts and the server's addresses",
                         responses={200: "status ok, devices, online and the listening addresses"}),
        api.metrics: Doc(summary="Prometheus metrics",
                         responses={200: Media(CONTENT_TYPE.split(";")[0], "Prometheus text format 0.0.4")}),
        api.list_devices: Doc(summary="Devices, a page at a time", query={
            **_PAGE, "status": _STATUS, "kind": ("string", "ipc, nvr, platform ... (from the ID's type code)")},
            responses={200: DevicePage}),
        api.create_device: Doc(summary="Add a device (and its own password)", body=api.NewDevice,
                               responses={201: Device, 409: "the device exists"}),
        api.get_device: Doc(summary="One device", responses={200: Device, 404: "no such device"}),
        api.delete_device: Doc(summary="Forget a device", responses={
            200: ({"type": "object", "properties": {"deleted": {"type": "string"}}}, "the deleted ID"),
            404: "no such device"}),
        api.set_password: Doc(summary="Set a device's own password (adds the device if unknown)",
                              body=api.PasswordBody, responses={200: Device, 201: Device}),
        api.patch_device: Doc(summary="Change a device's name, charset, media transport or digest user",
                              body=api.DevicePatch, responses={200: PatchedDevice, 404: "no such device"}),
        api.device_events: Doc(summary="A device's online/offline history, newest first",
                               query={"limit": _limit(100, 10000)}, responses={404: "no such device"}),
        api.device_faults: Doc(summary="A device's fault reports", query={"limit": _limit(100, 10000)},
                               responses={404: "no such device"}),
        api.device_channels: Doc(summary="A device's channels", query={
            k: v for k, v in channel_query.items() if k != "device_id"},
            responses={200: ChannelPage, 404: "no such device"}),
        api.sync_device: Doc(summary="Query the device's catalog now", responses={
            200: "the sync's result", 409: "the device is offline", 502: "the catalog query failed"}),
        api.live_query: Doc(summary="Ask the device: DeviceInfo, DeviceStatus, ConfigDownload or PresetQuery",
                            query={"channel_id": ("string", "address the query to this channel")},
                            responses={200: "the device's answer as JSON", 404: "no such device",
                                       409: "the device is offline", 504: "no answer in time"}),
        api.list_channels: Doc(summary="Channels (catalog items), a page at a time", query=channel_query,
                               responses={200: ChannelPage}),
        api.get_channel: Doc(summary="One channel", responses={200: Channel, 404: "no such channel"}),
        api.patch_channel: Doc(summary="Lock a channel's tier, or correct its name, address or location",
                               body=api.ChannelPatch, responses={200: Channel, 404: "no such channel"}),
        api.channel_records: Doc(query={
            "start": ("string", _WHEN), "end": ("string", _WHEN),
            "type": ("string", "all, time, alarm or manual"),
            "source": ({"type": "string", "enum": ["device", "platform"], "default": "device"},
                       "the device's history (RecordInfo) or the platform's own recordings"),
            "offset": ("integer", "platform: items to skip"), "limit": ("integer", "platform: page size")},
            responses={200: "the recordings found", 404: "no such channel", 409: "the device is offline",
                       504: "the device did not answer in time"}),
        api.tree: Doc(query={"by": ({"type": "string", "enum": ["civil", "group"], "default": "civil"},
                                    "civil codes or business groups/virtual organisations"),
                             "channels": ({"type": "string", "enum": ["true", "false"]}, "list the channels too")}),
        api.archive_report: Doc(summary="Channels missing catalog fields", query={"limit": _limit(1000, 100000, 0)}),
        api.online_report: Doc(summary="Channel availability over a time range", query={
            "since": ("string", _WHEN + "; default 24h"), "until": ("string", _WHEN + "; default now"),
            "group_by": ({"type": "string", "enum": ["tier", "civil_code", "all"], "default": "tier"}, "grouping"),
            "civil_code_digits": ({"type": "integer", "minimum": 2, "maximum": 8}, "civil-code prefix length")}),
        api.audit_log: Doc(summary="Recent audit entries, newest first", query={"limit": _limit(100, 1000)}),
    }


_core: dict[Callable[..., Any], Doc] | None = None


def _doc_of(handler: Any) -> Doc:
    global _core
    described = getattr(handler, "__openapi__", None)
    if isinstance(described, Doc):
        return described
    if _core is None:
        _core = _core_docs()
    try:
        return _core.get(handler) or Doc()
    except TypeError:  # an unhashable handler
        return Doc()


# -- the document -------------------------------------------------------------------------------

_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_DEFAULT_PART = "[^{}/]+"  # aiohttp's pattern of a plain {name}
_WORDS = re.compile(r"[\w.-]+(?:\|[\w.-]+)*")
_ID_TEXT = {"device_id": "20-digit device ID", "channel_id": "20-digit channel ID (or a playback's stream ID)",
            "stream_id": "stream ID", "upstream_id": "upstream name", "broadcast_id": "broadcast ID",
            "download_id": "download ID", "filename": "file path below the prefix"}


def _groups(pattern: str) -> dict[str, str]:
    """The named groups of an aiohttp route regex and their own regexes, in order."""
    out: dict[str, str] = {}
    for m in re.finditer(r"\(\?P<(\w+)>", pattern):
        depth, i, in_class = 1, m.end(), False
        while i < len(pattern) and depth:
            c = pattern[i]
            if c == "\\":
                i += 1
            elif in_class:
                in_class = c != "]"
            elif c == "[":
                in_class = True
                if pattern[i + 1:i + 2] == "]":  # a ] first in a class is literal
                    i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            i += 1
        out[m.group(1)] = pattern[m.end():i - 1]
    return out


def _path_schema(rx: str) -> Schema:
    if rx == _DEFAULT_PART:
        return {"type": "string"}
    if _WORDS.fullmatch(rx):
        return {"type": "string", "enum": rx.split("|")}
    return {"type": "string", "pattern": f"^(?:{rx})$"}


def route_path(resource: web.AbstractResource) -> tuple[str, dict[str, Schema]]:
    """A resource's OpenAPI path template and the schema of each of its path parameters."""
    if isinstance(resource, web.StaticResource):
        return f"{resource.canonical.rstrip('/')}/{{filename}}", {"filename": {"type": "string"}}
    if isinstance(resource, web.DynamicResource):
        info = resource.get_info()
        groups = _groups(info["pattern"].pattern)
        return info["formatter"], {name: _path_schema(rx) for name, rx in groups.items()}
    path = resource.canonical
    return path, {name: {"type": "string"} for name in re.findall(r"\{(\w+)\}", path)}


def _tag(path: str) -> str:
    if path in (OPENAPI_PATH, DOCS_PATH):
        return "docs"
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        parts = parts[2:]
    if not parts or path in ("/healthz", "/metrics"):
        return "system"
    return re.sub(r"[{].*", "", parts[0]) or "system"


def _param(name: str, where: str, spec: Param, required: bool = False) -> Schema:
    kind, text, *rest = spec
    schema = {"type": kind} if isinstance(kind, str) else dict(kind)
    out: Schema = {"name": name, "in": where, "schema": schema}
    if text:
        out["description"] = text
    if where == "path" or (rest and rest[0]) or required:
        out["required"] = True
    return out


class _Components:
    """Schemas met while the paths are built, each once under its model's name."""

    def __init__(self) -> None:
        self.schemas: dict[str, Schema] = {"Error": {}}
        self.models: dict[str, type[BaseModel]] = {}
        self.ref(Error)

    def ref(self, model: type[BaseModel], partial: bool = False) -> Schema:
        name = model.__name__ + ("Patch" if partial else "")
        if self.models.get(name) not in (None, model):
            name = f"{model.__module__}.{name}".replace("gb28181.", "")
        if name not in self.models:
            self.models[name] = model
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for def_name, sub in schema.pop("$defs", {}).items():
                self.schemas.setdefault(def_name, sub)
            if partial:
                schema.pop("required", None)
                schema["description"] = f"any of the fields of {model.__name__}; the rest stay as they are"
            self.schemas[name] = schema
        return {"$ref": f"#/components/schemas/{name}"}

    def schema(self, what: type[BaseModel] | Schema) -> Schema:
        return self.ref(what) if isinstance(what, type) else what


_ERROR = {"$ref": "#/components/schemas/Error"}


def _response(status: int, spec: Response, comps: _Components) -> Schema:
    phrase = _phrase(status)
    media = _media(spec)
    if media:
        return {"description": "; ".join(m.description for m in media if m.description) or phrase,
                "content": _content(media, comps)}
    if isinstance(spec, str):
        out: Schema = {"description": spec}
        if status >= 400:
            out["content"] = {"application/json": {"schema": _ERROR}}
        elif 200 <= status < 300 and status != 204:
            out["content"] = {"application/json": {"schema": {"type": "object"}}}
        elif 300 <= status < 400:
            out["headers"] = {"Location": {"description": "where to go", "schema": {"type": "string"}}}
        return out
    if isinstance(spec, tuple):
        what, text = spec
        return {"description": text, "content": {"application/json": {"schema": comps.schema(what)}}}
    assert isinstance(spec, type)
    text = (spec.__doc__ or "").strip().split("\n")[0]
    return {"description": text or phrase, "content": {"application/json": {"schema": comps.ref(spec)}}}


def _media(spec: object) -> list[Media]:
    """``spec`` as a list of Media when it is one or a sequence of them, else []."""
    if isinstance(spec, Media):
        return [spec]
    if isinstance(spec, Sequence) and not isinstance(spec, str) and spec and all(
            isinstance(m, Media) for m in spec):
        return list(spec)
    return []


def _content(media: list[Media], comps: _Components) -> Schema:
    return {m.content_type: ({"schema": comps.schema(m.schema)} if m.schema is not None else {})
            for m in media}


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return str(status)


def _body(described: Doc, comps: _Components) -> Schema:
    body = described.body
    if isinstance(body, type):
        content = {"application/json": {"schema": comps.ref(body, described.partial)}}
    else:
        content = _content(_media(body), comps)
    return {"required": described.body_required, "content": content}


def _texts(handler: Any, described: Doc, method: str, path: str) -> tuple[str, str]:
    raw = getattr(handler, "__doc__", None) or ""
    # A bound method of a class the document did not write (StaticResource._handle) says nothing useful.
    if getattr(handler, "__module__", "").startswith("aiohttp"):
        raw = ""
    lines = raw.strip().split("\n\n", 1)
    first = " ".join(lines[0].split())
    rest = "\n".join(line.strip() for line in lines[1].splitlines()).strip() if len(lines) > 1 else ""
    if described.summary:
        return described.summary, " ".join(raw.split()) if raw else ""
    if first:
        return first, rest
    name = getattr(handler, "__name__", "")
    if name and not name.startswith("_"):
        return name.replace("_", " ").capitalize(), ""
    return f"{method.upper()} {path}", ""


def _public(path: str, app: web.Application, described: Doc) -> bool:
    if described.public or path in ("/healthz", OPENAPI_PATH, DOCS_PATH):
        return True
    if path == "/metrics":
        from .api import SERVER_KEY
        server = app.get(SERVER_KEY)
        return bool(server is not None and server.config.api.metrics_public)  # type: ignore[attr-defined]
    return False


def _operation(app: web.Application, method: str, path: str, handler: Any,
               path_params: dict[str, Schema], comps: _Components, op_ids: set[str]) -> Schema:
    described = _doc_of(handler)
    summary, description = _texts(handler, described, method, path)
    op_id = getattr(handler, "__name__", "") or ""
    if not op_id or op_id.startswith("_") or op_id in op_ids:
        op_id = re.sub(r"\W+", "_", f"{method}_{path}").strip("_")
    op_ids.add(op_id)
    params: list[Schema] = []
    for name, schema in path_params.items():
        spec = described.path.get(name)
        param = _param(name, "path", spec or ("string", _ID_TEXT.get(name, "")))
        if spec is None:
            param["schema"] = schema
        params.append(param)
    params += [_param(name, "query", spec) for name, spec in described.query.items()]
    params += [_param(name, "header", spec) for name, spec in described.headers.items()]
    op: Schema = {"operationId": op_id, "summary": summary, "tags": list(described.tags) or [_tag(path)]}
    if description:
        op["description"] = description
    if params:
        op["parameters"] = params
    if described.body is not None and method not in ("get", "head", "delete"):
        op["requestBody"] = _body(described, comps)
    responses: dict[str, Schema] = {}
    for status, answer in sorted(described.responses.items()):
        responses[str(status)] = _response(status, answer, comps)
    if not any(100 <= s < 400 for s in described.responses):
        responses["200"] = {"description": "success"}
    if described.body is not None:
        responses.setdefault("400", _response(400, "the body is not valid JSON or not valid for the model "
                                              "(the error says which field and why)", comps))
    if _public(path, app, described):
        op["security"] = []
    else:
        responses.setdefault("401", _response(401, "missing or wrong credential", comps))
    responses["4XX"] = _response(400, "client error", comps)
    responses["5XX"] = _response(500, "server error", comps)
    op["responses"] = dict(sorted(responses.items()))
    return op


def _route_methods(resource_routes: list[web.AbstractRoute]) -> list[tuple[str, Any]]:
    methods = [(r.method.lower(), r.handler) for r in resource_routes]
    have = {m for m, _ in methods}
    out: list[tuple[str, Any]] = []
    for method, handler in methods:
        if method == "*":  # any method: every one the resource does not route elsewhere
            out += [(m, handler) for m in ("get", "put", "post", "delete", "patch") if m not in have]
        elif method == "head" and "get" in have:
            continue  # aiohttp's automatic HEAD of a GET route
        elif method in _METHODS:
            out.append((method, handler))
    return out


def build_document(app: web.Application) -> Schema:
    """The OpenAPI 3.1 document of every route ``app`` has now."""
    comps = _Components()
    by_resource: dict[int, tuple[web.AbstractResource, list[web.AbstractRoute]]] = {}
    for route in app.router.routes():
        if route.resource is None:
            continue
        by_resource.setdefault(id(route.resource), (route.resource, []))[1].append(route)
    paths: dict[str, Schema] = {}
    tags: list[str] = []
    op_ids: set[str] = set()
    for resource, resource_routes in by_resource.values():
        path, path_params = route_path(resource)
        item = paths.setdefault(path, {})
        for method, handler in _route_methods(resource_routes):
            op = _operation(app, method, path, handler, path_params, comps, op_ids)
            item[method] = op
            tags += [t for t in op["tags"] if t not in tags]
    from . import __version__ as version  # noqa: PLC0415
    return {
        "openapi": "3.1.0",
        "info": {"title": "GB/T 28181 platform HTTP API", "version": version,
                 "description": "Devices, channels, live video and playback, PTZ and device control, "
                                "alarms, positions, broadcast and cascade of a GB/T 28181 platform. "
                                "Every error is JSON {\"error\": \"...\"} saying what was wrong."},
        "servers": [{"url": "/"}],
        "tags": [{"name": t} for t in tags],
        "security": [{"bearer": []}, {"token": []}, {"session": []}],
        "paths": paths,
        "components": {
            "schemas": comps.schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "api.token in the config, or DATA_DIR/api-token"},
                "token": {"type": "apiKey", "in": "query", "name": "token",
                          "description": "the API token as a query parameter (players, WebSockets)"},
                "session": {"type": "apiKey", "in": "cookie", "name": "gb28181_session",
                            "description": "the web console's login session"},
                "playUrl": {"type": "apiKey", "in": "query", "name": "sig",
                            "description": "a signed play URL (sig and exp) from POST .../play"},
            },
        },
    }


# -- the routes -----------------------------------------------------------------------------------

_PAGE_FILE = Path(__file__).with_name("web_docs.html")


@doc(public=True, responses={200: ({"type": "object"}, "this document (OpenAPI 3.1)")})
async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this server's HTTP API, built from its routes."""
    return web.json_response(build_document(request.app))


@doc(public=True, responses={200: Media("text/html", "a page that reads /api/v1/openapi.json")})
async def api_docs(request: web.Request) -> web.Response:
    """The API's documentation as a web page (no external scripts)."""
    return web.Response(body=_PAGE_FILE.read_bytes(), content_type="text/html", charset="utf-8")


def add_openapi_routes(app: web.Application) -> None:
    app.router.add_get(OPENAPI_PATH, openapi_json)
    app.router.add_get(DOCS_PATH, api_docs)
