"""User accounts: who is asking, with which role and over which part of the fleet.

The field's rules want every view, control and export audited by the person who did it, so
one shared API token is not enough. Each account has a role (``viewer`` < ``operator`` <
``admin``), optional scopes (civil-code prefixes, business groups / virtual organisations),
an argon2id password hash (argon2-cffi), per-user API tokens (kept as SHA-256 hashes, shown
once) and console sessions. Repeated wrong passwords lock a name out at a source address
(``registrar.Lockout``, the registrar's own rule for devices).

``UserService`` keeps every account in memory (the API's middleware asks it on every request,
with no database access) and writes each change through to the registry's store before it
answers. Console sessions live in memory only: a restart signs every console user out, which
is also what a server that was taken over should do. ``api.token`` from the config stays the
admin credential for scripts (principal ``api-token``); a signed play URL is principal
``play-url``. The HTTP side is ``api_users.py``; the rule of which role may do what is in
``api.py``'s middleware.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from registry.models import Channel
from registry.store import Store, UserRecord

from .registrar import Lockout

__all__ = ["PRINCIPAL", "ROLES", "RULES", "LockedOut", "Principal", "Scope", "UserError", "UserService", "needed_role",
           "role_at_least"]

#: Roles from least to most; each may do what the ones before it may.
ROLES = ("viewer", "operator", "admin")
NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
#: Principals that are not accounts; an account may not take their names, or the audit log
#: could not tell them apart.
RESERVED = frozenset({"api-token", "play-url"})

MAX_FAILURES = 5          # wrong passwords ...
FAILURE_WINDOW = 300.0    # ... within 5 minutes ...
LOCKOUT = 600.0           # ... lock the name out at that address for 10 minutes
SESSION_IDLE = 12 * 3600.0  # a console session ends after 12 h without a request
MAX_SESSIONS = 10_000     # bounded: a login loop must not grow memory without end
TOKEN_PREFIX = "gbu_"     # tells a user token from api.token in logs and secret scanners
SESSION_COOKIE = "gb28181_session"  # the console session's cookie (set by api_users, read by api)


def role_at_least(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


# -- who may do what ---------------------------------------------------------------------------
# One table, read top to bottom, first match wins: (methods, path pattern, least role). In a
# pattern ``*`` is one path segment and a trailing ``/**`` is the path itself or anything under
# it; otherwise the path must match whole. A route no rule names needs ``admin``, so a new
# route is closed until it is given a rule here. Public paths (login, console files, health)
# never get this far (api.py's middleware).
_READ = ("GET", "HEAD")
RULES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    # reads that are administration or an export, not viewing
    (_READ, "/api/v1/users/**", "admin"),
    (_READ, "/api/v1/upstreams/**", "admin"),
    (_READ, "/api/v1/nodes/**", "admin"),
    (_READ, "/api/v1/audit/**", "admin"),
    (_READ, "/api/v1/webhooks/**", "admin"),
    (_READ, "/api/v1/downloads/**", "operator"),              # recordings exported as files
    (_READ, "/api/v1/channels/*/export", "operator"),         # platform recordings as one MP4
    (_READ, "/api/v1/channels/*/broadcast/**", "operator"),   # push-to-talk WebSocket
    (_READ, "/**", "viewer"),                                 # every other read, in scope
    (("DELETE",), "/api/v1/session", "viewer"),               # sign out
    # watching: live, playback, WHEP, and ending one's own WHEP session
    (("POST",), "/api/v1/channels/*/play", "viewer"),
    (("POST",), "/api/v1/channels/*/playback", "viewer"),
    (("POST",), "/api/v1/channels/*/whep", "viewer"),
    (("DELETE",), "/api/v1/whep/*", "viewer"),
    # control: PTZ, presets, cruise, scan, aux, home, dragzoom, downloads, broadcasts
    (("POST",), "/api/v1/channels/*/*/**", "operator"),
    (("PUT", "POST", "DELETE"), "/api/v1/devices/*/password", "admin"),
    # device control and config, sync, alarm and position subscriptions
    (("PUT", "POST", "DELETE"), "/api/v1/devices/*/*/**", "operator"),
    # stream stop, playback control (MANSRTSP), RTP forwards
    (("POST", "DELETE"), "/api/v1/streams/*/**", "operator"),
    (("DELETE",), "/api/v1/broadcasts/*", "operator"),
)


def _compile(pattern: str) -> re.Pattern[str]:
    below = pattern.endswith("/**")
    body = pattern[:-3] if below else pattern
    regex = "/".join("[^/]+" if part == "*" else re.escape(part) for part in body.split("/"))
    return re.compile(regex + ("(?:/.*)?" if below else ""))


_COMPILED = tuple((frozenset(methods), _compile(pattern), role) for methods, pattern, role in RULES)


def needed_role(method: str, path: str) -> str:
    """The least role that may send ``method`` to ``path`` (``RULES``; admin if none says)."""
    for methods, regex, role in _COMPILED:
        if method in methods and regex.fullmatch(path):
            return role
    return "admin"


class UserError(Exception):
    """A request about accounts that cannot be done; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


class LockedOut(Exception):
    """Too many wrong passwords for this name from this address; ``seconds`` until retry."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"locked out for {seconds:.0f} s")
        self.seconds = seconds


@dataclass(frozen=True, slots=True)
class Scope:
    """The channels an account sees. Empty: all of them. A channel is in scope if its civil
    code (or the first 8 digits of its ID, the centre/civil code of GB/T 28181-2016 Annex D)
    starts with one of ``civil_codes``, or its business group or ParentID path (Annex O:
    ``<device>/<216 VO>``) names one of ``business_groups``."""

    civil_codes: tuple[str, ...] = ()
    business_groups: frozenset[str] = frozenset()

    @classmethod
    def of(cls, scopes: dict[str, Any]) -> Scope:
        return cls(tuple(scopes.get("civil_codes") or ()), frozenset(scopes.get("business_groups") or ()))

    @property
    def everything(self) -> bool:
        return not self.civil_codes and not self.business_groups

    def covers(self, channel: Channel) -> bool:
        if self.everything:
            return True
        if self.civil_codes:
            code = channel.civil_code if channel.civil_code.isdigit() else channel.channel_id[:8]
            if code.startswith(self.civil_codes):
                return True
        if self.business_groups:
            if channel.channel_id in self.business_groups or channel.business_group_id in self.business_groups:
                return True
            if channel.parent_id and not self.business_groups.isdisjoint(channel.parent_id.split("/")):
                return True
        return False

    def covers_device(self, device_id: str, channels: Iterable[Channel]) -> bool:
        """A device is in scope when one of its channels is, or, by civil code, its own ID's
        centre code (Annex D digits 1-8) is (a device whose catalog has not come in yet)."""
        if self.everything:
            return True
        if self.civil_codes and device_id[:8].startswith(self.civil_codes):
            return True
        return any(self.covers(c) for c in channels)

    def as_json(self) -> dict[str, list[str]]:
        return {"civil_codes": list(self.civil_codes), "business_groups": sorted(self.business_groups)}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from, as the middleware and the audit log see it."""

    name: str
    role: str
    scope: Scope = field(default_factory=Scope)
    via: str = "token"  # token, session, api-token, play-url

    def may(self, needed: str) -> bool:
        return role_at_least(self.role, needed)


#: Where api.py's middleware puts the request's Principal for the handlers.
PRINCIPAL: web.RequestKey[Principal] = web.RequestKey("principal", Principal)

API_TOKEN = Principal("api-token", "admin", via="api-token")
PLAY_URL = Principal("play-url", "viewer", via="play-url")


def user_json(user: UserRecord) -> dict[str, Any]:
    """An account as the API shows it: never the password hash nor a token hash."""
    return {"name": user.name, "role": user.role, "scopes": Scope.of(user.scopes).as_json(),
            "disabled": user.disabled, "created_at": user.created_at, "updated_at": user.updated_at,
            "tokens": [{"id": t["id"], "label": t.get("label", ""), "created_at": t.get("created_at")}
                       for t in user.tokens]}


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(slots=True)
class _Session:
    name: str
    expires_at: float


class UserService:
    """Accounts in memory, written through to ``store``; ``await start()`` loads them."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time,
                 hasher: PasswordHasher | None = None) -> None:
        self.store = store
        self.clock = clock
        # argon2id with argon2-cffi's defaults (RFC 9106's second recommended option).
        self.hasher = hasher or PasswordHasher()
        self.lockout = Lockout(MAX_FAILURES, FAILURE_WINDOW, LOCKOUT)
        self.users: dict[str, UserRecord] = {}
        self._principals: dict[str, Principal] = {}
        self._tokens: dict[str, str] = {}  # SHA-256 of a token → user name
        self._sessions: dict[str, _Session] = {}
        self._dummy_hash = ""

    async def start(self) -> None:
        for user in await self.store.load_users():
            self.users[user.name] = user
            self._index(user)

    def _index(self, user: UserRecord) -> None:
        self._principals[user.name] = Principal(user.name, user.role, Scope.of(user.scopes))
        self._drop_tokens(user.name)
        for token in user.tokens:
            self._tokens[token["hash"]] = user.name

    def _drop_tokens(self, name: str) -> None:
        for h in [h for h, n in self._tokens.items() if n == name]:
            del self._tokens[h]

    def _forget(self, name: str) -> None:
        self._principals.pop(name, None)
        self._drop_tokens(name)
        self.end_sessions(name)

    def get(self, name: str) -> UserRecord:
        user = self.users.get(name)
        if user is None:
            raise UserError(404, f"no user {name}")
        return user

    def __iter__(self):
        return iter(sorted(self.users.values(), key=lambda u: u.name))

    # -- changes, each written through before it returns ---------------------------------

    async def _hash(self, password: str) -> str:
        # ~50 ms of CPU and 64 MiB by design; off the event loop so SIP is not held up.
        return await asyncio.to_thread(self.hasher.hash, password)

    async def create(self, name: str, password: str, role: str,
                     scopes: dict[str, Any] | None = None) -> UserRecord:
        if not NAME_RE.fullmatch(name):
            raise UserError(400, f"user name {name!r} must be 1-64 characters of A-Z a-z 0-9 _ . @ -")
        if name in RESERVED:
            raise UserError(400, f"user name {name!r} is reserved for the audit log; choose another")
        if role not in ROLES:
            raise UserError(400, f"role must be one of {', '.join(ROLES)}")
        if name in self.users:
            raise UserError(409, f"user {name} exists; PATCH /api/v1/users/{name} changes it")
        now = self.clock()
        user = UserRecord(name=name, role=role, password_hash=await self._hash(password),
                          scopes=dict(scopes or {}), created_at=now, updated_at=now)
        if name in self.users:  # created meanwhile, while the hash was computed
            raise UserError(409, f"user {name} exists; PATCH /api/v1/users/{name} changes it")
        await self._save(user)
        return user

    async def _save(self, user: UserRecord) -> None:
        """Stored first, then in memory: a failed write changes nothing anyone sees."""
        await self.store.save_user(user)
        self.users[user.name] = user
        self._index(user)

    async def update(self, name: str, *, password: str | None = None, role: str | None = None,
                     scopes: dict[str, Any] | None = None, disabled: bool | None = None) -> UserRecord:
        user = self.get(name)
        if role is not None and role not in ROLES:
            raise UserError(400, f"role must be one of {', '.join(ROLES)}")
        password_hash = await self._hash(password) if password is not None else None
        changed = replace(user, role=role or user.role,
                          password_hash=password_hash or user.password_hash,
                          scopes=dict(scopes) if scopes is not None else user.scopes,
                          disabled=user.disabled if disabled is None else disabled,
                          updated_at=self.clock())
        await self._save(changed)
        if password is not None or changed.disabled:
            self.end_sessions(name)  # a new password or a disabled account signs the console out
        return changed

    async def delete(self, name: str) -> None:
        self.get(name)
        await self.store.delete_user(name)
        self.users.pop(name, None)
        self._forget(name)

    async def add_token(self, name: str, label: str = "") -> tuple[str, dict[str, Any]]:
        """A new API token for ``name``: (the token, shown this once; its stored entry)."""
        user = self.get(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        ids = {t["id"] for t in user.tokens}
        token_id = secrets.token_hex(4)
        while token_id in ids:
            token_id = secrets.token_hex(4)
        entry = {"id": token_id, "hash": _sha256(token), "created_at": self.clock(), "label": label}
        await self._save(replace(user, tokens=[*user.tokens, entry], updated_at=self.clock()))
        return token, entry

    async def revoke_token(self, name: str, token_id: str) -> None:
        user = self.get(name)
        kept = [t for t in user.tokens if t["id"] != token_id]
        if len(kept) == len(user.tokens):
            raise UserError(404, f"user {name} has no token {token_id}; GET /api/v1/users/{name} lists them")
        await self._save(replace(user, tokens=kept, updated_at=self.clock()))

    # -- who is asking ---------------------------------------------------------------------

    def principal(self, name: str, via: str = "token") -> Principal | None:
        """The account's principal (built once per change, not per request)."""
        found = self._principals.get(name)
        return replace(found, via=via) if found is not None and via != found.via else found

    def by_token(self, token: str) -> UserRecord | None:
        """The account owning this API token. The lookup is by SHA-256, so comparing the
        stored value leaks nothing about the token itself."""
        if not token.startswith(TOKEN_PREFIX):
            return None
        name = self._tokens.get(_sha256(token))
        return self.users.get(name) if name is not None else None

    async def authenticate(self, name: str, password: str, source: str) -> UserRecord:
        """The account if ``password`` is its password. Raises LockedOut while (name, source)
        is locked out, UserError 401 otherwise, without saying whether the name exists."""
        key = (name, source)
        now = self.clock()
        if (left := self.lockout.locked_for(key, now)) > 0:
            raise LockedOut(left)
        user = self.users.get(name)
        ok = False
        if user is None:
            # As long as a real check, so the answer's timing does not tell which names exist.
            if not self._dummy_hash:
                self._dummy_hash = await self._hash(secrets.token_hex(16))
            await self._verify(self._dummy_hash, password)
        else:
            ok = await self._verify(user.password_hash, password)
        if not ok:
            if self.lockout.fail(key, self.clock()):
                raise LockedOut(self.lockout.locked_for(key, self.clock()))
            raise UserError(401, "wrong user name or password")
        assert user is not None
        self.lockout.clear(key)
        if self.hasher.check_needs_rehash(user.password_hash):
            # Hashed with older parameters: upgrade while the password is at hand.
            user = replace(user, password_hash=await self._hash(password))
            await self._save(user)
        return user

    async def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return await asyncio.to_thread(self.hasher.verify, password_hash, password)
        except (VerificationError, InvalidHashError):
            return False

    # -- console sessions (in memory: a restart signs everyone out) -----------------------

    def open_session(self, name: str) -> str:
        """A new session for ``name``; the value is the cookie (32 random bytes)."""
        now = self.clock()
        if len(self._sessions) >= MAX_SESSIONS:
            for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
                del self._sessions[key]
            while len(self._sessions) >= MAX_SESSIONS:  # still full: the oldest go first
                del self._sessions[next(iter(self._sessions))]
        cookie = secrets.token_urlsafe(32)
        self._sessions[cookie] = _Session(name, now + SESSION_IDLE)
        return cookie

    def session(self, cookie: str) -> UserRecord | None:
        """The account of a live session, whose idle deadline moves on (sliding expiry)."""
        s = self._sessions.get(cookie)
        if s is None:
            return None
        now = self.clock()
        if s.expires_at <= now or s.name not in self.users:
            del self._sessions[cookie]
            return None
        s.expires_at = now + SESSION_IDLE
        return self.users[s.name]

    def close_session(self, cookie: str) -> bool:
        return self._sessions.pop(cookie, None) is not None

    def end_sessions(self, name: str) -> None:
        for key in [k for k, s in self._sessions.items() if s.name == name]:
            del self._sessions[key]
