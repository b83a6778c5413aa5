"""Cutting a SIP-over-TCP stream into messages (gb28181.sip.framing)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gb28181.sip.framing import FramingError, SipStreamFramer
from gb28181.sip.message import SipParseError, SipRequest, new_request, parse_message

DEV = "34020000001320000001"
SRV = "34020000002000000001"


def _msg(n: int, body: bytes = b"", *, compact: bool = False) -> bytes:
    req = new_request(
        "MESSAGE", f"sip:{SRV}@3402000000",
        via=f"SIP/2.0/TCP 192.168.1.64:5060;rport;branch=z9hG4bK{n:08d}",
        from_uri=f"sip:{DEV}@3402000000", to_uri=f"sip:{SRV}@3402000000",
        from_tag=f"tag{n}", call_id=f"call-{n}", cseq=20, body=body,
        content_type="Application/MANSCDP+xml" if body else None)
    data = req.serialize()
    if compact:
        data = data.replace(b"\r\nContent-Length:", b"\r\nl:", 1)
    return data


KEEPALIVE_BODY = (
    f'<?xml version="1.0" encoding="UTF-8"?>\n<Notify>\n<CmdType>Keepalive</CmdType>\n'
    f"<SN>43</SN>\n<DeviceID>{DEV}</DeviceID>\n<Status>OK</Status>\n</Notify>\n"
).encode()

# A body that itself contains blank lines and what looks like another message.
TRICKY_BODY = b"\r\n\r\nREGISTER sip:x SIP/2.0\r\nContent-Length: 99\r\n\r\n\n\n"


def test_single_message() -> None:
    framer = SipStreamFramer()
    data = _msg(1, KEEPALIVE_BODY)
    assert framer.feed(data) == [data]
    assert framer.buffered == 0


def test_many_messages_in_one_feed() -> None:
    msgs = [_msg(i, KEEPALIVE_BODY if i % 2 else b"") for i in range(10)] + [_msg(10, TRICKY_BODY)]
    framer = SipStreamFramer()
    out = framer.feed(b"".join(msgs))
    assert out == msgs
    assert framer.buffered == 0
    parsed = [parse_message(m, stream=True) for m in out]
    assert [p.call_id for p in parsed] == [f"call-{i}" for i in range(11)]
    assert parsed[-1].body == TRICKY_BODY


def test_split_at_every_byte_boundary() -> None:
    data = _msg(7, KEEPALIVE_BODY)
    for cut in range(len(data) + 1):
        framer = SipStreamFramer()
        first = framer.feed(data[:cut])
        second = framer.feed(data[cut:])
        assert first + second == [data], cut
        assert (first == [data]) == (cut == len(data))
        assert framer.buffered == 0


def test_byte_at_a_time() -> None:
    msgs = [_msg(1, KEEPALIVE_BODY), _msg(2), _msg(3, TRICKY_BODY, compact=True)]
    stream = b"".join(msgs)
    framer = SipStreamFramer()
    out: list[bytes] = []
    for i in range(len(stream)):
        out += framer.feed(stream[i:i + 1])
    assert out == msgs


def test_body_waits_for_content_length() -> None:
    data = _msg(1, b"x" * 1000)
    head_len = data.index(b"\r\n\r\n") + 4
    framer = SipStreamFramer()
    assert framer.feed(data[:head_len]) == []
    assert framer.feed(data[head_len:-1]) == []
    assert framer.buffered == len(data) - 1
    assert framer.feed(data[-1:]) == [data]


def test_compact_and_padded_content_length() -> None:
    compact = _msg(1, b"abcdef", compact=True)
    padded = _msg(2, b"abcdef").replace(b"Content-Length: 6", b"content-length:    6  ")
    framer = SipStreamFramer()
    assert framer.feed(compact + padded + b"tail") == [compact, padded]
    assert framer.buffered == 4


def test_lf_only_message() -> None:
    data = _msg(1, KEEPALIVE_BODY).replace(b"\r\n", b"\n")
    framer = SipStreamFramer()
    out = framer.feed(data + data)
    assert out == [data, data]
    assert parse_message(out[0], stream=True).body == KEEPALIVE_BODY


def test_missing_content_length_means_no_body() -> None:
    data = _msg(1).replace(b"Content-Length: 0\r\n", b"")
    framer = SipStreamFramer()
    assert framer.feed(data + _msg(2)) == [data, _msg(2)]


def test_crlf_keepalives_between_messages() -> None:
    a, b = _msg(1, KEEPALIVE_BODY), _msg(2)
    framer = SipStreamFramer()
    assert framer.feed(b"\r\n\r\n") == []
    assert framer.buffered == 0  # a bare keep-alive leaves nothing behind
    out = framer.feed(b"\r\n\r\n" + a + b"\r\n\r\n\r\n\r\n" + b + b"\r\n")
    assert out == [a, b]
    assert framer.feed(b"\n\n\r\n") == []
    assert framer.buffered == 0
    assert framer.feed(a) == [a]


def test_keepalive_split_across_feeds() -> None:
    a = _msg(1)
    framer = SipStreamFramer()
    assert framer.feed(b"\r") == []
    assert framer.feed(b"\n\r") == []
    assert framer.feed(b"\n" + a[:5]) == []
    assert framer.feed(a[5:]) == [a]


def test_oversized_header_block() -> None:
    framer = SipStreamFramer(max_size=1000)
    framer.feed(b"MESSAGE sip:x SIP/2.0\r\n")
    with pytest.raises(FramingError, match="header block"):
        for _ in range(100):
            framer.feed(b"X-Filler: " + b"a" * 50 + b"\r\n")


def test_oversized_body() -> None:
    framer = SipStreamFramer(max_size=1000)
    head = _msg(1).replace(b"Content-Length: 0", b"Content-Length: 5000")
    with pytest.raises(FramingError, match="exceeds"):
        framer.feed(head)


def test_message_exactly_at_limit() -> None:
    data = _msg(1, b"z" * 300)
    assert SipStreamFramer(max_size=len(data)).feed(data) == [data]
    with pytest.raises(FramingError):
        SipStreamFramer(max_size=len(data) - 1).feed(data)


@pytest.mark.parametrize("value", [b"abc", b"-5", b"1e3", b"", b"0x10", b"\xc2\xb2", b"1 2"])
def test_invalid_content_length(value: bytes) -> None:
    data = _msg(1).replace(b"Content-Length: 0", b"Content-Length: " + value)
    with pytest.raises(FramingError, match="Content-Length"):
        SipStreamFramer().feed(data)


def test_absurd_content_length() -> None:
    data = _msg(1).replace(b"Content-Length: 0", b"Content-Length: " + b"9" * 6000)
    with pytest.raises(FramingError, match="exceeds"):
        SipStreamFramer().feed(data)


def test_framing_error_is_a_parse_error() -> None:
    assert issubclass(FramingError, SipParseError)


# -- property test -------------------------------------------------------------------------

_BODIES = st.one_of(st.just(b""), st.just(KEEPALIVE_BODY), st.just(TRICKY_BODY),
                    st.binary(max_size=200))


@st.composite
def _stream_and_chunks(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[int]]:
    bodies = draw(st.lists(_BODIES, min_size=1, max_size=6))
    msgs = [_msg(i, body, compact=draw(st.booleans())) for i, body in enumerate(bodies)]
    pieces = []
    for m in msgs:
        pieces.append(draw(st.sampled_from([b"", b"", b"\r\n", b"\r\n\r\n"])))
        pieces.append(m)
    pieces.append(draw(st.sampled_from([b"", b"\r\n\r\n"])))
    stream = b"".join(pieces)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=30)))
    return msgs, stream, cuts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_stream_and_chunks())
def test_random_chunking_yields_original_messages(case: tuple[list[bytes], bytes, list[int]]) -> None:
    msgs, stream, cuts = case
    framer = SipStreamFramer()
    out: list[bytes] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        out += framer.feed(stream[prev:cut])
        prev = cut
    assert out == msgs
    assert framer.buffered == 0
    for i, raw in enumerate(out):
        parsed = parse_message(raw, stream=True)
        assert isinstance(parsed, SipRequest) and parsed.call_id == f"call-{i}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=10))
def test_arbitrary_stream_only_raises_framing_error(chunks: list[bytes]) -> None:
    framer = SipStreamFramer(max_size=2000)
    try:
        for chunk in chunks:
            for raw in framer.feed(chunk):
                assert len(raw) <= 2000
    except FramingError:
        pass
