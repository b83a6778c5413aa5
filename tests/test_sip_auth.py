"""Digest authentication (gb28181.sip.auth): RFC 2617 vectors and the registrar's checks."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gb28181.sip.auth import (
    AuthResult,
    DigestServer,
    authorization_header,
    digest_response,
    parse_auth_params,
)

DEV = "34020000001320000001"
SRV_URI = "sip:34020000002000000001@3402000000"
PASSWORD = "12345678"
T0 = 1_000_000.0  # an arbitrary "now"; time is always injected


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _nonce(server: DigestServer, now: float = T0) -> str:
    return parse_auth_params(server.challenge(now))[1]["nonce"]


def _auth(nonce: str, *, uri: str = SRV_URI, password: str = PASSWORD, username: str = DEV,
          realm: str = "3402000000", qop: str | None = None, nc: str = "00000001",
          cnonce: str = "0a4f113b", method: str = "REGISTER", algorithm: str | None = "MD5",
          response: str | None = None) -> str:
    resp = response or digest_response(username=username, realm=realm, password=password,
                                       method=method, uri=uri, nonce=nonce, qop=qop, nc=nc,
                                       cnonce=cnonce)
    parts = [f'Digest username="{username}"', f'realm="{realm}"', f'nonce="{nonce}"',
             f'uri="{uri}"', f'response="{resp}"']
    if algorithm:
        parts.append(f"algorithm={algorithm}")
    if qop:
        parts += [f"qop={qop}", f"nc={nc}", f'cnonce="{cnonce}"']
    return ",".join(parts)


# -- known answers ------------------------------------------------------------------------------


def test_rfc2617_mufasa_vector() -> None:
    # RFC 2617 §3.5: GET /dir/index.html with qop=auth.
    resp = digest_response(username="Mufasa", realm="testrealm@host.com",
                           password="Circle Of Life", method="GET", uri="/dir/index.html",
                           nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", qop="auth",
                           nc="00000001", cnonce="0a4f113b")
    assert resp == "6629fae49393a05397450978507c4ef1"


def test_response_without_qop_is_rfc2069_form() -> None:
    nonce = "dcd98b7102dd2f0e8b11d0f600bfb0c093"
    ha1 = _md5("Mufasa:testrealm@host.com:Circle Of Life")
    ha2 = _md5("GET:/dir/index.html")
    assert digest_response(username="Mufasa", realm="testrealm@host.com",
                           password="Circle Of Life", method="GET", uri="/dir/index.html",
                           nonce=nonce) == _md5(f"{ha1}:{nonce}:{ha2}")


def test_gb_register_formula() -> None:
    # PROTOCOL.md §2: HA2 = MD5("REGISTER:" + uri verbatim); lower-case hex.
    nonce, realm, uri = "9bd055", "3402000000", "sip:34020000002000000001@3402000000"
    ha1 = _md5(f"{DEV}:{realm}:{PASSWORD}")
    ha2 = _md5(f"REGISTER:{uri}")
    got = digest_response(username=DEV, realm=realm, password=PASSWORD, method="REGISTER",
                          uri=uri, nonce=nonce)
    assert got == _md5(f"{ha1}:{nonce}:{ha2}") and got == got.lower()


# -- parse_auth_params ----------------------------------------------------------------------------


def test_parse_auth_params_commas_inside_quotes() -> None:
    scheme, p = parse_auth_params(
        'Digest username="34020000001320000001", realm="a,b,c", '
        'nonce="x,y", uri="sip:34020000002000000001@3402000000", response="abc",'
        'algorithm=MD5,qop=auth , nc=00000001,cnonce="q=1, r=2", opaque=""')
    assert scheme == "Digest"
    assert p == {"username": "34020000001320000001", "realm": "a,b,c", "nonce": "x,y",
                 "uri": "sip:34020000002000000001@3402000000", "response": "abc",
                 "algorithm": "MD5", "qop": "auth", "nc": "00000001", "cnonce": "q=1, r=2",
                 "opaque": ""}


def test_parse_auth_params_escapes_and_case() -> None:
    scheme, p = parse_auth_params('  DIGEST Realm="say \\"hi\\"" , NONCE = abc  ')
    assert scheme == "DIGEST"
    assert p == {"realm": 'say "hi"', "nonce": "abc"}


def test_parse_auth_params_challenge_with_qop_list() -> None:
    _, p = parse_auth_params('Digest realm="3402000000",nonce="n1",qop="auth,auth-int",algorithm=MD5')
    assert p["qop"] == "auth,auth-int" and p["algorithm"] == "MD5"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_parse_auth_params_never_raises(text: str) -> None:
    scheme, params = parse_auth_params(text)
    assert isinstance(scheme, str) and all(k == k.lower() for k in params)


# -- DigestServer -----------------------------------------------------------------------------


def test_challenge_shape() -> None:
    plain = DigestServer("3402000000").challenge(T0)
    scheme, p = parse_auth_params(plain)
    assert scheme == "Digest" and p["realm"] == "3402000000" and p["algorithm"] == "MD5"
    assert "qop" not in p and "stale" not in p
    _, q = parse_auth_params(DigestServer("3402000000", qop=True).challenge(T0, stale=True))
    assert q["qop"] == "auth" and q["stale"] == "true"
    assert _nonce(DigestServer("r")) != _nonce(DigestServer("r"))


def test_verify_without_qop() -> None:
    server = DigestServer("3402000000")
    nonce = _nonce(server)
    result = server.verify(_auth(nonce), method="REGISTER", password=PASSWORD, now=T0 + 1,
                           username=DEV)
    assert result == AuthResult(True)


def test_verify_with_qop() -> None:
    server = DigestServer("3402000000", qop=True)
    nonce = _nonce(server)
    result = server.verify(_auth(nonce, qop="auth"), method="REGISTER", password=PASSWORD,
                           now=T0 + 1)
    assert result.ok and not result.stale


def test_any_realm_and_missing_algorithm_accepted() -> None:
    # Realm: STD uses 64010000, eXosip 34020000; algorithm defaults to MD5 when absent.
    server = DigestServer("3402000000")
    nonce = _nonce(server)
    auth = _auth(nonce, realm="64010000", algorithm=None)
    assert server.verify(auth, method="REGISTER", password=PASSWORD, now=T0).ok


def test_upper_case_response_hex_accepted() -> None:
    server = DigestServer("3402000000")
    nonce = _nonce(server)
    good = digest_response(username=DEV, realm="3402000000", password=PASSWORD,
                           method="REGISTER", uri=SRV_URI, nonce=nonce)
    assert server.verify(_auth(nonce, response=good.upper()), method="REGISTER",
                         password=PASSWORD, now=T0).ok


def test_uri_is_hashed_verbatim() -> None:
    # sipp answers with uri="sip:127.0.0.1:5060", not the Request-URI; hash what was sent.
    server = DigestServer("3402000000")
    nonce = _nonce(server)
    auth = _auth(nonce, uri="sip:127.0.0.1:5060")
    assert server.verify(auth, method="REGISTER", password=PASSWORD, now=T0).ok
    # A digest computed over a different uri than the one in the header fails.
    nonce2 = _nonce(server)
    wrong = digest_response(username=DEV, realm="3402000000", password=PASSWORD,
                            method="REGISTER", uri=SRV_URI, nonce=nonce2)
    res = server.verify(_auth(nonce2, uri="sip:127.0.0.1:5060", response=wrong),
                        method="REGISTER", password=PASSWORD, now=T0)
    assert not res.ok and res.wrong_password


def test_method_is_part_of_the_digest() -> None:
    server = DigestServer("3402000000")
    nonce = _nonce(server)
    res = server.verify(_auth(nonce, method="MESSAGE"), method="REGISTER", password=PASSWORD,
                        now=T0)
    assert res.wrong_password


def test_wrong_password() -> None:
    server = DigestServer("3402000000")
    nonce = _nonce(server)
    res = server.verify(_auth(nonce, password="guess"), method="REGISTER", password=PASSWORD,
                        now=T0)
    assert not res.ok and res.wrong_password and not res.stale
    assert "wrong password" in res.reason
    # The nonce is burnt: even the right password needs a fresh challenge now.
    again = server.verify(_auth(nonce), method="REGISTER", password=PASSWORD, now=T0)
    assert not again.ok and again.stale


def test_replay_without_qop_is_stale() -> None:
    server = DigestServer("3402000000")
    nonce = _nonce(server)
    auth = _auth(nonce)
    assert server.verify(auth, method="REGISTER", password=PASSWORD, now=T0).ok
    replay = server.verify(auth, method="REGISTER", password=PASSWORD, now=T0 + 1)
    assert not replay.ok and replay.stale and not replay.wrong_password


def test_qop_nc_replay_is_stale_and_increasing_nc_accepted() -> None:
    server = DigestServer("3402000000", qop=True)
    nonce = _nonce(server)
    first = _auth(nonce, qop="auth", nc="00000001")
    assert server.verify(first, method="REGISTER", password=PASSWORD, now=T0).ok
    replay = server.verify(first, method="REGISTER", password=PASSWORD, now=T0)
    assert replay.stale and not replay.ok
    # A growing nc (hex) with the same nonce is a legitimate reuse.
    for nc in ("00000002", "0000000a", "00000010"):
        res = server.verify(_auth(nonce, qop="auth", nc=nc, cnonce=f"c{nc}"), method="REGISTER",
                            password=PASSWORD, now=T0 + 10)
        assert res.ok, nc
    # Going back is a replay even with a new cnonce.
    back = server.verify(_auth(nonce, qop="auth", nc="0000000f", cnonce="new"),
                         method="REGISTER", password=PASSWORD, now=T0 + 10)
    assert back.stale


def test_qop_wrong_password_burns_that_nc() -> None:
    server = DigestServer("3402000000", qop=True)
    nonce = _nonce(server)
    bad = server.verify(_auth(nonce, qop="auth", password="x"), method="REGISTER",
                        password=PASSWORD, now=T0)
    assert bad.wrong_password
    assert server.verify(_auth(nonce, qop="auth"), method="REGISTER", password=PASSWORD,
                         now=T0).stale
    assert server.verify(_auth(nonce, qop="auth", nc="00000002"), method="REGISTER",
                         password=PASSWORD, now=T0).ok


def test_expired_nonce_is_stale() -> None:
    server = DigestServer("3402000000", nonce_ttl=300.0)
    nonce = _nonce(server, T0)
    res = server.verify(_auth(nonce), method="REGISTER", password=PASSWORD, now=T0 + 300.5)
    assert not res.ok and res.stale and "expired" in res.reason
    # Within the TTL it would have been fine.
    nonce2 = _nonce(server, T0)
    assert server.verify(_auth(nonce2), method="REGISTER", password=PASSWORD, now=T0 + 299).ok


def test_nonce_from_the_future_is_stale() -> None:
    server = DigestServer("3402000000")
    nonce = _nonce(server, T0 + 60)
    assert server.verify(_auth(nonce), method="REGISTER", password=PASSWORD, now=T0).stale


@pytest.mark.parametrize("forge", [
    lambda n: n[:-1] + ("0" if n[-1] != "0" else "1"),   # MAC changed
    lambda n: "0" + n,                                    # issue time changed
    lambda n: n.rpartition(".")[0] + "." + "\u00e9" * 16,  # non-ASCII MAC
    lambda n: "dcd98b7102dd2f0e8b11d0f600bfb0c093",        # someone else's nonce
    lambda n: "...",
    lambda n: "1.2.3",
])
def test_forged_nonce_is_stale(forge) -> None:  # type: ignore[no-untyped-def]
    server = DigestServer("3402000000")
    nonce = forge(_nonce(server))
    res = server.verify(_auth(nonce), method="REGISTER", password=PASSWORD, now=T0)
    assert not res.ok and res.stale and not res.wrong_password


def test_nonce_of_another_server_is_stale() -> None:
    a, b = DigestServer("3402000000"), DigestServer("3402000000")
    res = b.verify(_auth(_nonce(a)), method="REGISTER", password=PASSWORD, now=T0)
    assert res.stale


def test_shared_secret_survives_restart_but_forgets_use() -> None:
    a = DigestServer("3402000000", secret=b"k" * 32)
    nonce = _nonce(a)
    b = DigestServer("3402000000", secret=b"k" * 32)
    res = b.verify(_auth(nonce), method="REGISTER", password=PASSWORD, now=T0)
    assert res.stale and "no longer tracked" in res.reason


def test_evicted_nonce_is_stale() -> None:
    server = DigestServer("3402000000", max_nonces=2)
    first = _nonce(server)
    _nonce(server)
    _nonce(server)
    assert server.verify(_auth(first), method="REGISTER", password=PASSWORD, now=T0).stale


def test_username_mismatch() -> None:
    server = DigestServer("3402000000")
    nonce = _nonce(server)
    res = server.verify(_auth(nonce, username="34020000001320000099"), method="REGISTER",
                        password=PASSWORD, now=T0, username=DEV)
    assert not res.ok and not res.stale and not res.wrong_password
    assert "username" in res.reason


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5-sess", "sha-512-256"])
def test_non_md5_algorithm(algorithm: str) -> None:
    server = DigestServer("3402000000")
    nonce = _nonce(server)
    res = server.verify(_auth(nonce, algorithm=algorithm), method="REGISTER",
                        password=PASSWORD, now=T0)
    assert not res.ok and not res.stale and "algorithm" in res.reason


def test_lower_case_md5_algorithm_accepted() -> None:
    server = DigestServer("3402000000")
    assert server.verify(_auth(_nonce(server), algorithm="md5"), method="REGISTER",
                         password=PASSWORD, now=T0).ok


@pytest.mark.parametrize("header,reason", [
    ('Basic dXNlcjpwYXNz', "scheme"),
    ('Digest realm="r", nonce="n", uri="u", response="r"', "username"),
    ('Digest username="u", realm="r", uri="u", response="r"', "nonce"),
    ('Digest username="u", nonce="n", response="r"', "uri"),
    ('Digest username="u", nonce="n", uri="u"', "response"),
    ("", "scheme"),
])
def test_malformed_authorization(header: str, reason: str) -> None:
    res = DigestServer("r").verify(header, method="REGISTER", password="p", now=T0)
    assert not res.ok and not res.wrong_password and reason in res.reason


def test_unsupported_qop_and_bad_nc() -> None:
    server = DigestServer("3402000000", qop=True)
    nonce = _nonce(server)
    res = server.verify(_auth(nonce, qop="auth-int"), method="REGISTER", password=PASSWORD,
                        now=T0)
    assert not res.ok and "qop" in res.reason
    res = server.verify(_auth(nonce, qop="auth", nc="zz"), method="REGISTER",
                        password=PASSWORD, now=T0)
    assert not res.ok and "nc" in res.reason


def test_non_ascii_response_is_a_wrong_password_not_a_crash() -> None:
    server = DigestServer("3402000000")
    nonce = _nonce(server)
    res = server.verify(_auth(nonce, response="\u00e9" * 32), method="REGISTER",
                        password=PASSWORD, now=T0)
    assert res.wrong_password


# -- client side --------------------------------------------------------------------------------


@pytest.mark.parametrize("qop", [False, True])
def test_authorization_header_answers_challenge(qop: bool) -> None:
    server = DigestServer("3402000000", qop=qop)
    challenge = server.challenge(T0)
    header = authorization_header(challenge, username=DEV, password=PASSWORD,
                                  method="REGISTER", uri=SRV_URI)
    scheme, p = parse_auth_params(header)
    assert scheme == "Digest" and p["username"] == DEV and p["uri"] == SRV_URI
    assert p["realm"] == "3402000000" and p["algorithm"] == "MD5"
    assert ("qop" in p) == qop
    if qop:
        assert p["qop"] == "auth" and p["nc"] == "00000001" and len(p["cnonce"]) == 16
    assert server.verify(header, method="REGISTER", password=PASSWORD, now=T0 + 1,
                         username=DEV) == AuthResult(True)
    # The same header again is a replay.
    assert server.verify(header, method="REGISTER", password=PASSWORD, now=T0 + 2).stale
    if qop:
        nc2 = authorization_header(challenge, username=DEV, password=PASSWORD,
                                   method="REGISTER", uri=SRV_URI, nc=2)
        assert parse_auth_params(nc2)[1]["nc"] == "00000002"
        assert server.verify(nc2, method="REGISTER", password=PASSWORD, now=T0 + 3).ok


def test_authorization_header_wrong_password_detected() -> None:
    server = DigestServer("3402000000", qop=True)
    header = authorization_header(server.challenge(T0), username=DEV, password="nope",
                                  method="REGISTER", uri=SRV_URI)
    assert server.verify(header, method="REGISTER", password=PASSWORD, now=T0).wrong_password


def test_authorization_header_foreign_challenges() -> None:
    # WVP/GOW-style challenge with qop list and opaque; eXosip-style without algorithm.
    wvp = 'Digest realm="3402000000",qop="auth-int, auth",nonce="abc,def",opaque="op1",algorithm=MD5'
    _, p = parse_auth_params(authorization_header(wvp, username=DEV, password=PASSWORD,
                                                  method="REGISTER", uri=SRV_URI))
    assert p["opaque"] == "op1" and p["qop"] == "auth" and p["nonce"] == "abc,def"
    assert p["response"] == digest_response(username=DEV, realm="3402000000", password=PASSWORD,
                                            method="REGISTER", uri=SRV_URI, nonce="abc,def",
                                            qop="auth", nc="00000001", cnonce=p["cnonce"])
    exosip = 'Digest realm="34020000", nonce="0a1b"'
    _, p = parse_auth_params(authorization_header(exosip, username=DEV, password=PASSWORD,
                                                  method="REGISTER", uri=SRV_URI))
    assert "qop" not in p and p["realm"] == "34020000"
    assert p["response"] == digest_response(username=DEV, realm="34020000", password=PASSWORD,
                                            method="REGISTER", uri=SRV_URI, nonce="0a1b")
    # Only auth-int offered: answer without qop (RFC 2069 form).
    _, p = parse_auth_params(authorization_header('Digest realm="r", nonce="n", qop="auth-int"',
                                                  username="u", password="p", method="REGISTER",
                                                  uri="sip:r"))
    assert "qop" not in p


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200), st.booleans())
def test_verify_arbitrary_header_never_raises(text: str, qop: bool) -> None:
    server = DigestServer("r", qop=qop)
    nonce = _nonce(server)
    for header in (text, f'Digest username="u", nonce="{nonce}", uri="x", response="{text}"',
                   f'Digest username="u", nonce="{text}", uri="x", response="a"',
                   f'Digest username="u", nonce="{nonce}", uri="x", response="a", qop=auth, nc={text}'):
        res = server.verify(header, method="REGISTER", password="p", now=T0)
        assert isinstance(res, AuthResult)
