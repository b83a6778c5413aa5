"""The C twins of gb28181.sip._fast against the pure-Python code they stand in for.

parse_head (the SIP head reader) against message.parse_head:

Both read only heads of the plain shape (CRLF lines, no folding, printable ASCII, token
names, one value per Via field) and give None for anything else; on the plain ones they must
agree with each other and with the general loop of ``parse_message``, and ``parse_message``
must give the same message, or the same error, with the C reader as without it. Inputs are
the vendor captures of test_sip_message, their mutations, and arbitrary bytes.

parse_auth_params (digest parameters) against auth.parse_auth_params run without it: the same
(scheme, params) for every value it reads, None for the others (non-ASCII, controls, a
backslash), and never an error, on captured headers, their mutations and arbitrary text.
"""

from __future__ import annotations

import importlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gb28181.sip import auth, message
from gb28181.sip.message import SipParseError, parse_head, parse_message

from .test_sip_message import (
    _SIPPY,
    DAHUA_101,
    DAHUA_REGISTER,
    FUZZ,
    HIK_REGISTER,
    _basic,
    _hik_keepalive,
    _mutated,
    _same,
)

try:
    fast = importlib.import_module("gb28181.sip._fast")
except ImportError:  # built without a C compiler: the twin alone is still checked
    fast = None

ARGS = (message._COMPACT, message._SPLIT_ON_COMMA)

REGISTER_WITH_AUTH = (
    b"REGISTER sip:34020000002000000001@3402000000 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5061;rport;branch=z9hG4bK-1-2\r\n"
    b"From: <sip:34020000001320000001@3402000000>;tag=1SIPpTag001\r\n"
    b"To: <sip:34020000001320000001@3402000000>\r\n"
    b"Call-ID: 1-123@127.0.0.1\r\n"
    b"CSeq: 2 REGISTER\r\n"
    b"Contact: <sip:34020000001320000001@127.0.0.1:5061>\r\n"
    b'Authorization: Digest username="34020000001320000001", realm="3402000000", '
    b'nonce="18c2.1f.0123456789abcdef", uri="sip:34020000002000000001@3402000000", '
    b'response="0123456789abcdef0123456789abcdef", algorithm=MD5\r\n'
    b"Max-Forwards: 70\r\n"
    b"User-Agent: SIPp-GB28181-sim\r\n"
    b"Expires: 3600\r\n"
    b"Content-Length: 0\r\n\r\n"
)

CORPUS = [
    HIK_REGISTER, DAHUA_REGISTER, DAHUA_101, _hik_keepalive("\n"), _hik_keepalive("\r\n"),
    REGISTER_WITH_AUTH, _basic(body=b"<?xml?>"), _basic("v: SIP/2.0/UDP a;branch=1\r\n"),
    _basic("Via: SIP/2.0/UDP a;branch=1, SIP/2.0/UDP b;branch=2\r\n"),  # split: general loop
    _basic("Route: <sip:a;lr>\r\n"), _basic("Subject: a, b\r\n"),  # a comma outside the split names
    _basic("X-Odd:\t padded \t\r\n"), _basic("Empty:\r\n"), _basic("Folded: a\r\n b\r\n"),
    _basic("Bad Name: x\r\n"), _basic("NoColon\r\n"), _basic(": no name\r\n"),
    _basic("X-High: \xff\r\n".encode("latin-1").decode("latin-1")),
    b"\r\n" + DAHUA_REGISTER, DAHUA_REGISTER.replace(b"\r\n", b"\n"), DAHUA_REGISTER[:-2],
    DAHUA_REGISTER.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards: 70\r\r\n"),
    DAHUA_REGISTER.replace(b"CSeq: 2 REGISTER", b"CSeq: 3\x1c REGISTER"),
    b"", b"\r\n\r\n", b"X\r\n\r\n", b"X\r\n\r", b"SIP/2.0 200 OK\r\n\r\n", b"A" * 300 + b":\r\n\r\n",
    b"X\r\n" + b"N" * 127 + b": v\r\n\r\n", b"X\r\n" + b"N" * 128 + b": v\r\n\r\n",
]


def _general(data: bytes):
    try:
        msg, body_start = message._parse_head_general(data)
    except SipParseError:
        return None
    return msg, body_start


def _check(data: bytes, monkeypatch: pytest.MonkeyPatch | None = None) -> None:
    twin = parse_head(data, *ARGS)
    if fast is not None:
        assert fast.parse_head(data, *ARGS) == twin
        assert fast.parse_head(bytearray(data), *ARGS) == twin
    if twin is not None:
        # A plain head reads the same through the general loop.
        # (The general loop reads the start line first: a bad one stops it there.)
        first, headers, body_start = twin
        general = _general(data)
        if general is None:
            with pytest.raises(SipParseError):
                message._start_line(first)
        else:
            msg, general_start = general
            assert msg.headers == headers
            assert general_start == body_start
            assert message._start_line(first).start_line() == msg.start_line()
    # And parse_message says the same with the C reader as without it.
    outcomes = []
    for reader in (message._fast_parse_head, None):
        saved = message._fast_parse_head
        message._fast_parse_head = reader
        try:
            outcomes.append(parse_message(data))
        except SipParseError as exc:
            outcomes.append(str(exc))
        finally:
            message._fast_parse_head = saved
    with_c, without = outcomes
    if isinstance(with_c, str) or isinstance(without, str):
        assert with_c == without
    else:
        assert _same(with_c, without)
        assert with_c.body == without.body


@pytest.mark.parametrize("data", CORPUS, ids=range(len(CORPUS)))
def test_corpus(data: bytes) -> None:
    _check(data)


def test_plain_register_is_read_by_the_fast_path() -> None:
    first, headers, body_start = parse_head(REGISTER_WITH_AUTH, *ARGS)
    assert first == "REGISTER sip:34020000002000000001@3402000000 SIP/2.0"
    assert headers["authorization"][0].startswith('Digest username="34020000001320000001"')
    assert body_start == len(REGISTER_WITH_AUTH)
    if fast is not None and message.ACCELERATOR.startswith("C"):  # not turned off by SIP_ACCEL=0
        assert message._fast_parse_head is fast.parse_head


@pytest.mark.parametrize("data", [
    b"X\r\nVia: a, b\r\n\r\n", b"X\r\n v: folded\r\n\r\n", b"X\r\nA\x00: b\r\n\r\n",
    b"X\r\nA: \x7f\r\n\r\n", b"X\r\nA: b\n\r\n", b"X\r\nA: b", b"\nX\r\n\r\n",
])
def test_odd_shapes_go_to_the_general_loop(data: bytes) -> None:
    assert parse_head(data, *ARGS) is None
    if fast is not None:
        assert fast.parse_head(data, *ARGS) is None


@pytest.mark.skipif(fast is None, reason="gb28181.sip._fast is not built")
def test_c_reader_refuses_bad_arguments() -> None:
    assert fast is not None
    with pytest.raises(TypeError):
        fast.parse_head("text", *ARGS)
    with pytest.raises(TypeError):
        fast.parse_head(b"X\r\n\r\n", [], message._SPLIT_ON_COMMA)
    with pytest.raises(TypeError):
        fast.parse_head(b"X\r\n\r\n", message._COMPACT, ["via"])
    with pytest.raises(TypeError):
        fast.parse_head(b"X\r\n\r\n")
    # A compact table whose value is not a str is not trusted: the general loop reads it.
    assert fast.parse_head(b"X\r\nv: a\r\n\r\n", {"v": 1}, frozenset()) is None


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _check(data)


@FUZZ
@given(st.lists(st.one_of(_SIPPY, st.binary(max_size=8)), max_size=60))
def test_fuzz_sip_like_tokens(parts: list[bytes]) -> None:
    _check(b"".join(parts))


@FUZZ
@given(_mutated())
def test_fuzz_mutated_captures(data: bytes) -> None:
    _check(data)


@FUZZ
@given(st.sampled_from(CORPUS), st.integers(0, 2000), st.binary(min_size=1, max_size=4))
def test_fuzz_insertions_into_plain_heads(base: bytes, pos: int, junk: bytes) -> None:
    pos = min(pos, len(base))
    _check(base[:pos] + junk + base[pos:])


# -- digest parameters -------------------------------------------------------------------------

AUTH_CORPUS = [
    'Digest username="34020000001320000001", realm="3402000000", nonce="18c2.1f.0123456789abcdef", '
    'uri="sip:34020000002000000001@3402000000", response="0123456789abcdef0123456789abcdef", '
    "algorithm=MD5",
    'Digest username="a",realm="b",nonce="c",uri="sip:x",response="d",qop=auth,nc=00000001,'
    'cnonce="e"',
    '  Digest   username = "a" ,\trealm=b ,  ', "Digest", "", " ", "Digest ", 'Digest a=""',
    "Digest a=", "Digest a=,b=1", "Digest a=1,,b=2", 'Digest a="x"y, b=2', 'Digest a="unterminated',
    'Digest a="q,uoted", B=2', "Digest a b=1", "Digest =1", "Digest a=1 b=2", "Digest a=1, b",
    'Digest a="x\\"y"', "Digest\tusername=1", "Basic dXNlcjpwYXNz", 'Digest a="\u00e9"',
    "Digest a=1\x1c", "Digest a=1\n", "Digest " + "K" * 300 + "=v", 'Digest a="x",b="y"z,c=3',
    "Digest a=1, A=2", 'Digest a=1 , ,', "Digest a=1,\t",
]


def _auth_pure(value: str) -> tuple[str, dict[str, str]]:
    saved = auth._fast_auth_params
    auth._fast_auth_params = None
    try:
        return auth.parse_auth_params(value)
    finally:
        auth._fast_auth_params = saved


def _check_auth(value: str) -> None:
    pure = _auth_pure(value)
    assert auth.parse_auth_params(value) == pure
    if fast is not None:
        got = fast.parse_auth_params(value)
        assert got is None or got == pure
        if value.isascii() and "\\" not in value and all(c == "\t" or " " <= c <= "~" for c in value):
            assert got == pure  # the values it is meant for are all read in C


@pytest.mark.parametrize("value", AUTH_CORPUS, ids=range(len(AUTH_CORPUS)))
def test_auth_corpus(value: str) -> None:
    _check_auth(value)


@pytest.mark.skipif(fast is None, reason="gb28181.sip._fast is not built")
def test_c_auth_reader_refuses_bad_arguments() -> None:
    assert fast is not None
    with pytest.raises(TypeError):
        fast.parse_auth_params(b"Digest a=1")


_AUTHY = st.sampled_from(['Digest ', "username", "=", '"', ",", ", ", " ", "\t", "a", "Z9_-",
                          "\\", "\u00e9", "\x1c", "\n", "md5", '"sip:1@2"', "=,", '""'])


@FUZZ
@given(st.lists(st.one_of(_AUTHY, st.text(max_size=6)), max_size=40))
def test_fuzz_auth_params(parts: list[str]) -> None:
    _check_auth("".join(parts))


@FUZZ
@given(st.sampled_from(AUTH_CORPUS[:2]), st.integers(0, 300), st.text(min_size=0, max_size=4),
       st.integers(0, 4))
def test_fuzz_auth_mutations(base: str, pos: int, junk: str, cut: int) -> None:
    pos = min(pos, len(base))
    _check_auth(base[:pos] + junk + base[pos + cut:])
