"""HTTP Digest authentication for SIP (RFC 2617 / RFC 3261 §22) as GB/T 28181 devices use it.

Both sides live here: ``DigestServer`` issues nonces, checks ``Authorization`` headers and
refuses replays; ``digest_response``/``authorization_header`` let the simulator (or a lower
platform registering upward) answer a challenge.

Nonces are self-validating: ``<issued-at hex>.<serial hex>.<MAC>`` (a keyed BLAKE2b), so a forged or garbled
nonce is refused without a lookup and an expired one is reported as stale (the device retries
with the fresh nonce of the 401, without counting as a wrong password). Each issued nonce is
also remembered (bounded) with the highest ``nc`` it was used with: without qop a nonce is
good for one REGISTER, with qop ``nc`` must grow. That is what makes a captured REGISTER
useless to replay. Retransmissions of one REGISTER never reach this code: the transaction
layer absorbs them.

Per PROTOCOL.md §2 the ``uri`` parameter is hashed exactly as sent (sipp sends
``sip:<server ip>:<port>``, not the Request-URI), any realm is accepted, and both the qop and
the plain RFC 2069 forms verify.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib
import itertools
import os
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .message import accelerated

__all__ = [
    "AuthResult",
    "DigestServer",
    "authorization_header",
    "digest_response",
    "parse_auth_params",
]

# A quoted value is matched as runs of plain characters between escapes ("unrolled"), which
# the regex engine does in bulk instead of one alternation per character.
_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("[^"\\]*(?:\\.[^"\\]*)*"|[^,\s]*)\s*(?:,|$)')


_SIMPLE_PARAM_RE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"([^"\\]*)"|([^",\s]*))\s*(?:,|$)')


def parse_auth_params(value: str) -> tuple[str, dict[str, str]]:
    """Split ``Digest k="v", k2=v2`` into the scheme and a dict with lower-case keys.

    Parameters are read up to the first piece that is not ``key=value`` (as before a comma
    gone astray); one regex pass finds them all, as a REGISTER costs several of these. The C
    twin (``_fast.parse_auth_params``) reads the values of printable ASCII without a
    backslash, which is every device's, the same way; tests hold the two equal.
    """
    if _fast_auth_params is not None:
        parsed = _fast_auth_params(value)
        if parsed is not None:
            return parsed
    value = value.strip()
    scheme, _, rest = value.partition(" ")
    params: dict[str, str] = {}
    if "\\" not in rest:
        # The usual shape, no escapes: one pass of a simpler pattern, stopping at the first
        # piece that is not key=value as the general one does.
        pos = 0
        rest = rest.strip()
        for m in _SIMPLE_PARAM_RE.finditer(rest):
            if m.start() != pos or m.end() == pos:
                break
            pos = m.end()
            key, quoted, bare = m.group(1, 2, 3)
            params[key.lower()] = quoted if quoted is not None else bare
        return scheme, params
    pos = 0
    for m in _PARAM_RE.finditer(rest.strip()):
        if m.start() != pos or m.end() == pos:
            break  # garbage between parameters: stop, as the strict parser did
        pos = m.end()
        raw = m.group(2)
        if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
            raw = raw[1:-1]
            if "\\" in raw:
                raw = raw.replace('\\"', '"').replace("\\\\", "\\")
        params[m.group(1).lower()] = raw
    return scheme, params


_fast_auth_params = accelerated("parse_auth_params")


def _load_md5() -> Callable[[bytes], Any]:
    """CPython's own MD5 when it has one: for a 40-byte input it costs half of OpenSSL 3's,
    which looks the algorithm up anew at every ``hashlib.md5()``; three per REGISTER."""
    try:
        return importlib.import_module("_md5").md5
    except (ImportError, AttributeError):
        return hashlib.md5


_md5_new = _load_md5()


def _md5(text: str) -> str:
    return _md5_new(text.encode("utf-8", "surrogateescape")).hexdigest()


def digest_response(*, username: str, realm: str, password: str, method: str, uri: str,
                    nonce: str, qop: str | None = None, nc: str = "00000001",
                    cnonce: str = "") -> str:
    """The ``response`` value: MD5(HA1:nonce[:nc:cnonce:qop]:HA2) in lower-case hex."""
    ha1 = _md5(f"{username}:{realm}:{password}")
    ha2 = _md5(f"{method}:{uri}")
    if qop:
        return _md5(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _md5(f"{ha1}:{nonce}:{ha2}")


def authorization_header(challenge: str, *, username: str, password: str, method: str,
                         uri: str, nc: int = 1) -> str:
    """Answer a ``WWW-Authenticate: Digest …`` challenge (client side)."""
    _, params = parse_auth_params(challenge)
    realm = params.get("realm", "")
    nonce = params.get("nonce", "")
    qop_offer = params.get("qop")
    qop = None
    if qop_offer is not None:
        offered = [q.strip() for q in qop_offer.split(",")]
        qop = "auth" if "auth" in offered else None
    cnonce = os.urandom(8).hex() if qop else ""
    ncs = f"{nc:08x}"
    resp = digest_response(username=username, realm=realm, password=password, method=method,
                           uri=uri, nonce=nonce, qop=qop, nc=ncs, cnonce=cnonce)
    parts = [f'Digest username="{username}"', f'realm="{realm}"', f'nonce="{nonce}"',
             f'uri="{uri}"', f'response="{resp}"', "algorithm=MD5"]
    if qop:
        parts += [f"qop={qop}", f"nc={ncs}", f'cnonce="{cnonce}"']
    if "opaque" in params:
        parts.append(f'opaque="{params["opaque"]}"')
    return ", ".join(parts)


@dataclass(slots=True, frozen=True)
class AuthResult:
    """Outcome of checking an Authorization header.

    ``ok`` — verified. ``stale`` — the nonce is expired, unknown or already used: challenge
    again with ``stale=true`` (not a password failure). Otherwise ``reason`` says why it
    failed and ``wrong_password`` is set when the digest itself did not match.
    """

    ok: bool
    stale: bool = False
    wrong_password: bool = False
    reason: str = ""


_OK = AuthResult(True)  # one object for every success: a frozen dataclass is slow to build


class DigestServer:
    """Issue challenges and verify digests; see the module docstring."""

    def __init__(self, realm: str, *, nonce_ttl: float = 300.0, qop: bool = False,
                 max_nonces: int = 200_000, secret: bytes | None = None) -> None:
        self.realm = realm
        self.nonce_ttl = nonce_ttl
        self.qop = qop
        self.max_nonces = max_nonces
        self._secret = secret or os.urandom(32)
        self._serial = itertools.count(int.from_bytes(os.urandom(4), "big"))
        #: nonce -> highest nc seen (-1: issued, never used). Oldest first, for eviction.
        self._nonces: OrderedDict[str, int] = OrderedDict()

    def challenge(self, now: float, *, stale: bool = False) -> str:
        """A fresh ``WWW-Authenticate`` value."""
        nonce = self._new_nonce(now)
        parts = [f'Digest realm="{self.realm}"', f'nonce="{nonce}"', "algorithm=MD5"]
        if self.qop:
            parts.append('qop="auth"')
        if stale:
            parts.append("stale=true")
        return ", ".join(parts)

    def _mac(self, body: str) -> str:
        # Keyed BLAKE2b: a MAC in one C call (the hmac module's pure-Python wrapper costs more
        # than the hash at thousands of REGISTERs a second).
        return hashlib.blake2b(body.encode(), key=self._secret[:64], digest_size=8).hexdigest()

    def _new_nonce(self, now: float) -> str:
        # Unique by the counter, unforgeable and unguessable by the MAC over it.
        body = f"{int(now * 1000):x}.{next(self._serial):x}"
        nonce = f"{body}.{self._mac(body)}"
        nonces = self._nonces
        nonces[nonce] = -1
        while len(nonces) > self.max_nonces:
            nonces.popitem(last=False)
        return nonce

    def _nonce_age(self, nonce: str, now: float) -> float | None:
        """Age in seconds of a nonce we issued, None if it is not one of ours."""
        body, _, mac = nonce.rpartition(".")
        if not body or len(mac) != 16:
            return None
        try:
            expect = self._mac(body)
        except UnicodeEncodeError:
            return None
        # Bytes, not str: compare_digest raises TypeError on non-ASCII str (a garbled nonce).
        if not hmac.compare_digest(expect.encode(), mac.encode("utf-8", "surrogateescape")):
            return None
        try:
            issued = int(body.partition(".")[0], 16) / 1000
        except ValueError:
            return None
        return now - issued

    @staticmethod
    def _remembered_age(nonce: str, now: float) -> float:
        return now - int(nonce.partition(".")[0], 16) / 1000

    def verify(self, authorization: str, *, method: str, password: str, now: float,
               username: str | None = None) -> AuthResult:
        """Check an Authorization header value for ``method`` against ``password``."""
        scheme, p = parse_auth_params(authorization)
        if scheme.lower() != "digest":
            return AuthResult(False, reason=f"unsupported authentication scheme {scheme[:20]!r}")
        for key in ("username", "nonce", "uri", "response"):
            if not p.get(key):
                return AuthResult(False, reason=f"Authorization lacks the {key} parameter")
        if username is not None and p["username"] != username:
            return AuthResult(False, reason="Authorization username does not match the device ID")
        algorithm = p.get("algorithm", "MD5")
        if algorithm.upper() != "MD5":
            return AuthResult(False, reason=f"unsupported digest algorithm {algorithm[:20]!r}")
        nonce = p["nonce"]
        last_nc = self._nonces.get(nonce)
        # A nonce we remember is ours (nobody else can put one there): only its age is read,
        # the MAC is checked for the others.
        age = self._remembered_age(nonce, now) if last_nc is not None else self._nonce_age(nonce, now)
        if age is None:
            return AuthResult(False, stale=True, reason="nonce was not issued by this server")
        if age > self.nonce_ttl or age < -5:
            self._nonces.pop(nonce, None)
            return AuthResult(False, stale=True, reason="nonce expired")
        if last_nc is None:
            # Ours and fresh, but forgotten (evicted under load or issued before a restart).
            return AuthResult(False, stale=True,
                              reason="nonce no longer tracked (already used, or forgotten)")
        qop = p.get("qop")
        if qop:
            if qop.lower() != "auth":
                return AuthResult(False, reason=f"unsupported qop {qop[:20]!r}")
            try:
                nc = int(p.get("nc", ""), 16)
            except ValueError:
                return AuthResult(False, reason="invalid nc parameter")
            if nc <= last_nc:
                return AuthResult(False, stale=True, reason="replayed nonce count")
            expected = digest_response(
                username=p["username"], realm=p.get("realm", ""), password=password,
                method=method, uri=p["uri"], nonce=nonce, qop=qop, nc=p.get("nc", ""),
                cnonce=p.get("cnonce", ""))
        else:
            if last_nc >= 0:
                return AuthResult(False, stale=True, reason="replayed nonce")
            nc = 0
            expected = digest_response(username=p["username"], realm=p.get("realm", ""),
                                       password=password, method=method, uri=p["uri"],
                                       nonce=nonce)
        if not hmac.compare_digest(expected.encode(),
                                   p["response"].lower().encode("utf-8", "surrogateescape")):
            # Burn the nonce: each guess at a password costs the guesser a new challenge.
            self._nonces[nonce] = max(nc, 0)
            return AuthResult(False, wrong_password=True,
                              reason="digest does not match (wrong password)")
        if qop:
            self._nonces[nonce] = nc
        else:
            # Single use: forgetting it is what refuses a replay, and 100k registrations
            # do not leave 100k spent nonces behind.
            del self._nonces[nonce]
        return _OK
