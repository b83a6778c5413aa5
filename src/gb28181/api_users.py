"""HTTP API for accounts: console sign-in, users, their API tokens.

- ``POST /api/v1/session`` ``{"username", "password"}``: sign in (public); 200 with the user and
  the ``gb28181_session`` cookie (HttpOnly, SameSite=Strict); 401 for a wrong name or password
  (which one is not said); 429 with ``retry_after`` while the name is locked out at that address.
- ``GET /api/v1/session``: who this request is (any credential); ``DELETE``: sign out.
- ``GET|POST /api/v1/users``, ``GET|PATCH|DELETE /api/v1/users/{name}`` (admin): accounts; a
  password is write-only.
- ``POST /api/v1/users/{name}/tokens`` ``{"label"}``: a new API token, shown in this answer only;
  ``DELETE /api/v1/users/{name}/tokens/{id}`` revokes one.

Every change and every sign-in is audited under the name of who did it. Accounts themselves are
``users.UserService``; who may call what is ``users.RULES``, applied by ``api.py``'s middleware.
"""

from __future__ import annotations

import math
import re
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .api import _body, _error, _server, _who
from .ids import GROUP_TYPES, type_digits
from .openapi import doc
from .users import NAME_RE, PRINCIPAL, ROLES, SESSION_COOKIE, LockedOut, UserError, user_json

__all__ = ["add_user_routes"]

_ROLE = f"^({'|'.join(ROLES)})$"
_NAME = f"^{NAME_RE.pattern}$"


class Scopes(BaseModel):
    """What an account sees; both empty (the default): everything."""

    model_config = ConfigDict(extra="forbid")
    civil_codes: list[str] = Field(default_factory=list, max_length=1000,
                                   description="civil-code prefixes (GB/T 2260, 2-8 digits)")
    business_groups: list[str] = Field(default_factory=list, max_length=1000,
                                       description="business group (215) or virtual organisation "
                                                   "(216) IDs, 20 digits")

    @field_validator("civil_codes")
    @classmethod
    def _civil(cls, codes: list[str]) -> list[str]:
        for code in codes:
            if not re.fullmatch(r"\d{2,8}", code):
                raise ValueError(f"civil code prefix {code!r} must be 2 to 8 digits (e.g. 3402)")
        return codes

    @field_validator("business_groups")
    @classmethod
    def _groups(cls, ids: list[str]) -> list[str]:
        for gid in ids:
            if type_digits(gid) not in GROUP_TYPES:  # GB/T 28181-2016 Annex D.1, Annex O
                raise ValueError(f"{gid!r} is not a business group (type 215) or virtual "
                                 "organisation (type 216) ID of 20 digits")
        return ids


class LoginBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class NewUser(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=_NAME, description="1-64 characters of A-Z a-z 0-9 _ . @ -")
    password: str = Field(min_length=8, max_length=1024)
    role: str = Field(pattern=_ROLE, description="viewer, operator or admin")
    scopes: Scopes = Field(default_factory=Scopes)


class UserPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: str | None = Field(None, min_length=8, max_length=1024)
    role: str | None = Field(None, pattern=_ROLE)
    scopes: Scopes | None = None
    disabled: bool | None = None


class NewToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = Field("", max_length=64, description="what the token is for (a script, a host)")


def _audit(request: web.Request, action: str, target: str, **detail: Any) -> None:
    who, source = _who(request)
    _server(request).audit.record(action, who=who, source=source, target=target, **detail)


def _user_error(exc: UserError) -> web.Response:
    return _error(exc.status, str(exc))


# -- console sessions ----------------------------------------------------------------------------

@doc(body=LoginBody, public=True,
     responses={200: "signed in: the user, and the gb28181_session cookie",
                401: "wrong user name or password", 403: "the user is disabled",
                429: "locked out after repeated wrong passwords (Retry-After)"})
async def login(request: web.Request) -> web.Response:
    """Sign in to the console: a session cookie for the user."""
    body = await _body(request, LoginBody)
    assert isinstance(body, LoginBody)
    server = _server(request)
    source = request.remote or ""
    try:
        user = await server.users.authenticate(body.username, body.password, source)
    except LockedOut as exc:
        seconds = math.ceil(exc.seconds)
        server.audit.record("login-locked", who=body.username, source=source, target=body.username,
                            retry_after=seconds)
        return web.json_response(
            {"error": f"too many wrong passwords for {body.username} from {source}: try again in "
                      f"{seconds} s, or ask an admin to set a new password", "retry_after": seconds},
            status=429, headers={"Retry-After": str(seconds)})
    except UserError as exc:
        server.audit.record("login-failed", who=body.username, source=source, target=body.username)
        return _user_error(exc)
    if user.disabled:
        server.audit.record("login-refused", who=user.name, source=source, target=user.name,
                            reason="disabled")
        return _error(403, f"user {user.name} is disabled; an admin enables it with "
                           f"PATCH /api/v1/users/{user.name}")
    cookie = server.users.open_session(user.name)
    server.audit.record("login", who=user.name, source=source, target=user.name)
    resp = web.json_response({"user": user_json(user)})
    resp.set_cookie(SESSION_COOKIE, cookie, httponly=True, samesite="Strict", path="/")
    return resp


@doc(responses={200: "who is signed in, with role and scopes"})
async def whoami(request: web.Request) -> web.Response:
    """The principal this request authenticated as."""
    p = request[PRINCIPAL]
    return web.json_response({"name": p.name, "role": p.role, "scopes": p.scope.as_json(), "via": p.via})


@doc(responses={200: "signed out"})
async def logout(request: web.Request) -> web.Response:
    """Sign out: the session ends at once (tokens are revoked separately)."""
    cookie = request.cookies.get(SESSION_COOKIE, "")
    ended = bool(cookie) and _server(request).users.close_session(cookie)
    if ended:
        _audit(request, "logout", request[PRINCIPAL].name)
    resp = web.json_response({"ended": ended})
    resp.del_cookie(SESSION_COOKIE, path="/")
    return resp


# -- accounts (admin) ----------------------------------------------------------------------------

@doc(responses={200: "every user (passwords never shown)"})
async def list_users(request: web.Request) -> web.Response:
    """Every account (no password hashes, no tokens: their IDs and labels only)."""
    users = [user_json(u) for u in _server(request).users]
    return web.json_response({"users": users, "total": len(users)})


@doc(body=NewUser, responses={201: "created", 409: "the name is taken"})
async def create_user(request: web.Request) -> web.Response:
    """Add an account with a role and optional scopes."""
    body = await _body(request, NewUser)
    assert isinstance(body, NewUser)
    try:
        user = await _server(request).users.create(body.name, body.password, body.role,
                                                   body.scopes.model_dump())
    except UserError as exc:
        return _user_error(exc)
    _audit(request, "user-create", user.name, role=user.role, scopes=user.scopes)
    return web.json_response(user_json(user), status=201)


@doc(responses={404: "no such user"})
async def get_user(request: web.Request) -> web.Response:
    """One account."""
    try:
        return web.json_response(user_json(_server(request).users.get(request.match_info["name"])))
    except UserError as exc:
        return _user_error(exc)


@doc(body=UserPatch, partial=True, responses={404: "no such user"})
async def patch_user(request: web.Request) -> web.Response:
    """Change an account's password, role, scopes or disabled flag."""
    body = await _body(request, UserPatch)
    assert isinstance(body, UserPatch)
    name = request.match_info["name"]
    try:
        user = await _server(request).users.update(
            name, password=body.password, role=body.role, disabled=body.disabled,
            scopes=body.scopes.model_dump() if body.scopes is not None else None)
    except UserError as exc:
        return _user_error(exc)
    changed = sorted(k for k in body.model_fields_set)
    _audit(request, "user-change", name, fields=changed, role=user.role, disabled=user.disabled)
    return web.json_response(user_json(user))


@doc(responses={204: "deleted", 404: "no such user"})
async def delete_user(request: web.Request) -> web.Response:
    """Remove an account; its tokens and sessions stop working at once."""
    name = request.match_info["name"]
    try:
        await _server(request).users.delete(name)
    except UserError as exc:
        return _user_error(exc)
    _audit(request, "user-delete", name)
    return web.json_response({"deleted": name})


@doc(body=NewToken, responses={201: "the token, shown this once, and its id", 404: "no such user"})
async def create_token(request: web.Request) -> web.Response:
    """A new API token for the account; the token is in this answer and nowhere else."""
    body = NewToken()
    if request.can_read_body:
        body = await _body(request, NewToken)  # type: ignore[assignment]
    name = request.match_info["name"]
    try:
        token, entry = await _server(request).users.add_token(name, body.label)
    except UserError as exc:
        return _user_error(exc)
    _audit(request, "token-create", name, token_id=entry["id"], label=entry["label"])
    return web.json_response({"token": token, "id": entry["id"], "label": entry["label"],
                              "created_at": entry["created_at"],
                              "note": "shown once: store it now; only its hash is kept"}, status=201)


@doc(responses={204: "revoked", 404: "no such user or token"})
async def revoke_token(request: web.Request) -> web.Response:
    """Revoke one of the account's API tokens."""
    name, token_id = request.match_info["name"], request.match_info["token_id"]
    try:
        await _server(request).users.revoke_token(name, token_id)
    except UserError as exc:
        return _user_error(exc)
    _audit(request, "token-revoke", name, token_id=token_id)
    return web.json_response({"revoked": token_id})


def add_user_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/session", login)
    r.add_get("/api/v1/session", whoami)
    r.add_delete("/api/v1/session", logout)
    r.add_get("/api/v1/users", list_users)
    r.add_post("/api/v1/users", create_user)
    r.add_get("/api/v1/users/{name}", get_user)
    r.add_patch("/api/v1/users/{name}", patch_user)
    r.add_delete("/api/v1/users/{name}", delete_user)
    r.add_post("/api/v1/users/{name}/tokens", create_token)
    r.add_delete("/api/v1/users/{name}/tokens/{token_id}", revoke_token)
